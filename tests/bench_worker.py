"""Runs ``vlm-tta`` in a subprocess for the benchmark tests, with two small test methods registered:

* ``_running`` (online, features): logits of the original view plus a running mean of the stream's
  features, so its result depends on the stream order (one row per seed);
* ``_slow`` (online, features): zero-shot that sleeps ``delay`` seconds per chunk, so a test can
  kill the run in the middle;
* ``_pause`` (episodic, features): zero-shot that sleeps ``$BENCH_WORKER_DELAY`` seconds per chunk
  (an environment variable, not an option, so a slowed run has the same job ids as a fast one).

:func:`tiny_suite` is the suite the benchmark tests run (two tiny datasets of ``conftest.data_root``).

Usage: ``python bench_worker.py <vlm-tta arguments>``, also as torchrun's script. With
``$BENCH_WORKER_PIDS`` set to a folder, the process writes its pid to ``rank<RANK>.pid`` there.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vlm_tta.methods import Method, Prediction, register_method


def tiny_suite(**overrides) -> dict:
    """A suite as its YAML mapping: zero-shot (episodic) and ``_running`` (online) on eurosat and
    oxford_pets, two seeds; ``overrides`` replace keys."""
    suite = {
        "name": "tiny",
        "protocol": "classification",
        "seeds": [0, 1],
        "methods": ["zeroshot", "_running"],
        "defaults": {"templates": "single"},
        "datasets": ["eurosat", "oxford_pets"],
    }
    suite.update(overrides)
    return suite


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


@register_method("_pause")
class Pause(Method):
    episodic = True

    def predict_batch(self, features):
        time.sleep(float(os.environ.get("BENCH_WORKER_DELAY", "0")))
        return [Prediction(self.ctx.logits(f[0])) for f in features]


if __name__ == "__main__":
    from vlm_tta.cli import main

    if os.environ.get("BENCH_WORKER_PIDS"):
        pid_file = Path(os.environ["BENCH_WORKER_PIDS"]) / f"rank{os.environ.get('RANK', '0')}.pid"
        pid_file.write_text(str(os.getpid()))

    sys.exit(main(sys.argv[1:]))
