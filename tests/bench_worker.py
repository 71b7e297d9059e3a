"""Runs ``vlm-tta`` in a subprocess for the benchmark tests, with two small test methods registered:

* ``_running`` (online, features): logits of the original view plus a running mean of the stream's
  features, so its result depends on the stream order (one row per seed);
* ``_slow`` (online, features): zero-shot that sleeps ``delay`` seconds per chunk, so a test can
  kill the run in the middle.

Usage: ``python bench_worker.py <vlm-tta arguments>``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from vlm_tta.methods import Method, Prediction, register_method


@dataclass
class RunningConfig:
    weight: float = 0.5


@register_method("_running")
class Running(Method):
    config_class = RunningConfig
    episodic = False

    def reset(self):
        self.total, self.count = None, 0

    def predict_batch(self, features):
        out = []
        for f in features:
            x = f[0]
            self.total = x.clone() if self.total is None else self.total + x
            self.count += 1
            out.append(Prediction(self.ctx.logits(x + self.config.weight * self.total / self.count)))
        return out


@dataclass
class SlowConfig:
    delay: float = 0.3


@register_method("_slow")
class Slow(Method):
    config_class = SlowConfig
    episodic = False

    def stream_batch_size(self):
        return 1

    def predict_batch(self, features):
        time.sleep(self.config.delay)
        return [Prediction(self.ctx.logits(f[0])) for f in features]


if __name__ == "__main__":
    from vlm_tta.cli import main

    sys.exit(main(sys.argv[1:]))
