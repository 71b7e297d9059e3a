"""AdaND, the Adaptive Noise Detector of zero-shot noisy test-time adaptation (ZS-NTTA).

Cao, Zhong, Zhou, Liu, Liu, Zhang and Han, "Noisy Test-Time Adaptation in Vision-Language
Models", ICLR 2025 (arXiv 2502.14604); reference code ``tmlr-group/ZS-NTTA``
(``ttda_method/zs_noisytta.py``, ``main.py``, ``configs/zs_noisytta_configs.py``).

The test stream mixes clean images of the known classes with noisy ones (images of other classes).
The frozen zero-shot classifier labels every image; a small noise detector, ``Linear(D, 2)`` on the
encoder's **raw (un-normalised)** image embedding (output 1 = clean, 0 = noisy), learns online which
images are noisy. Its training labels always come from the frozen zero-shot model: the OOD score
``s = 1 - max softmax(logit_scale x cos)`` (the model's own logit scale, 100 for OpenAI CLIP, so MSP
at CLIP's temperature, not MCM's T = 1) is thresholded by Otsu's criterion over the last 512 scores
(``s > threshold`` is noisy). One Adam step (lr 5e-4, plain cross-entropy) per batch of 128. To
teach the detector what noise looks like, Gaussian-noise images (1 per 8 stream images on average)
are interleaved with the stream and always trained as noisy; they are not part of the result.
For the first 10 updates the zero-shot mask decides; after that the detector does: a sample is noisy
when the detector's noisy probability exceeds Otsu's threshold over the last 512 of those
probabilities. Within a batch the decision uses the detector from *before* that batch's update.

Streams and batches. A batch is ``adapt_batch_size`` rows of the stream (:meth:`stream_batch_size`, so
``classify``'s own ``batch_size`` never changes the result) plus the noise rows injected among them;
the detector decides from batch ``warmup_updates + 1`` on (batch 128: from stream item 11 x 128 of
the mixed stream when the caller marks the noise rows). With ``adapt_batch_size=1`` the detector is trained
every 64 samples on the last 64 (``batch1_window``) and decides from sample 641 on. Noise comes
from one of three places:

* images (:func:`vlm_tta.classify`): the method draws the noise images itself (the reference's
  recipe: ``randn(3, 224, 224)`` min-max scaled to uint8, an RGB PIL image, then the model's
  preprocessing) and encodes them through the shared cache (``ctx.store``);
* ``noise_features`` (M x D raw embeddings, ``classify_features``): noise rows are taken from it in
  order (cycling if it runs out);
* ``injected_noise`` (a bool per stream row): the stream already holds the noise, e.g. one replayed
  from the reference; those rows are trained as noisy, kept in the result with ``noisy=True``, and
  listed in :meth:`run_info` under ``injected_noise_rows`` (leave them out of metrics).

With images or ``noise_features`` the number of noise rows before each stream row is geometric with
mean ``noise_rate`` (i.i.d. slots, noise with probability ``rate / (1 + rate)``): the streaming form
of the reference's uniform shuffle of ``int(rate x N)`` noise images into N. The detector's initial
weights (PyTorch's ``nn.Linear`` init) and the injection are drawn from generators seeded with
``seed``, never the global RNG, so runs repeat exactly.

Reference quirks reproduced by default, each with the option that corrects it:

* first sample of a batch-1 stream: the detector trains when ``step % 64 == 0 and step != 0`` on a
  64-long queue, so its windows are samples 1-64, 65-128, ... and sample 0 never trains it; and
  sample 0 is judged by Otsu on a single score, which gives threshold 0 (flagged noisy unless its
  score is 0; the same happens to the detector's first decision). ``fix_first_sample=True`` trains
  on 0-63, 64-127, ... (switching over one sample earlier, at sample 640) and lets a queue that no
  threshold can split flag nothing;
* the injected noise's scores enter both Otsu queues; ``noise_in_queues=False`` keeps them out (they
  still train the detector as noisy);
* the ID score used for AUROC/FPR95 mixes two scales: zero-shot MSP before the switch-over, the
  detector's clean probability after (``score="mixed"``); ``score="detector"`` gives the detector's
  clean probability throughout (the detector as a zero-shot OOD detector), ``score="msp"`` MSP.

Not reproduced: ``update_classifier='TDA'`` (TDA on top of the detector; off in the reference) and
fp16 autocast (everything here is fp32).
"""

from __future__ import annotations

import math
import os
import warnings
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import FeatureError, MethodOptionError
from ..views import ViewSet
from .base import Method, Prediction, register_method
from .common import OtsuQueue

NOISE_TYPES = ("gaussian", "uniform", "salt_and_pepper", "poisson")
SCORES = ("mixed", "detector", "msp")


@dataclass
class AdaNDConfig:
    #: the batch AdaND learns from (ZS-NTTA configs/zs_noisytta_configs.py, `inference.batch_size`);
    #: its own option, not `classify(batch_size=...)`, which only cuts the reading of the stream
    adapt_batch_size: int = 128
    lr: float = 5e-4  # `optim.lr`; Adam, betas (0.9, 0.999) (`optim.beta1`), weight decay 0
    queue_length: int = 512  # `inference.queue_length`: Otsu queues of zero-shot and detector scores
    #: detector updates before it decides (`inference.using_ttda_step`); the reference's test is
    #: `step * batch > using_ttda_step * window` (window = adapt_batch_size, or batch1_window at batch size 1)
    warmup_updates: int = 10
    batch1_window: int = 64  # `inference.ttda_queue_length`: at batch size 1, train every 64 on the last 64
    noise_rate: float = 0.125  # `inference.gaussian_rate`: injected noise images per stream image
    noise_type: str = "gaussian"  # `inference.inject_noise_type` (data/build_dataset.py NoiseDataset)
    noise_size: int = 224  # NoiseDataset draws 3 x 224 x 224 noise, then the test transform
    #: None: Otsu's adaptive threshold (`threshold_type="adaptive"`); a number: that fixed threshold
    #: for both masks (`threshold_type="fixed"`, `fixed_threshold=0.5`)
    fixed_threshold: float | None = None
    #: Prediction.score: "mixed" (reference's AUROC score: MSP before the switch-over, detector's
    #: clean probability after), "detector" (always the detector's clean probability), "msp"
    score: str = "mixed"
    noise_in_queues: bool = True  # reference: injected noise's scores enter both Otsu queues
    fix_first_sample: bool = False  # reference: a batch-1 stream's sample 0 never trains the detector
    seed: int = 0  # detector init and noise injection (method-owned generators)
    #: initial detector weights (safetensors or torch file with `weight` 2 x D and `bias` 2, optionally
    #: under `fc.` as in the reference's OODDetector); None draws PyTorch's Linear init from `seed`
    detector_init: str | None = None

    def __post_init__(self) -> None:
        for name in ("adapt_batch_size", "queue_length", "warmup_updates", "batch1_window", "noise_size"):
            value = getattr(self, name)
            low = 0 if name == "warmup_updates" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise MethodOptionError(f"{name} must be an integer >= {low}; got {value!r}")
        if isinstance(self.lr, bool) or not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise MethodOptionError(f"lr must be a positive number; got {self.lr!r}")
        if not (isinstance(self.noise_rate, (int, float)) and 0 <= self.noise_rate < math.inf):
            raise MethodOptionError(f"noise_rate must be a number >= 0 (0 injects no noise); got {self.noise_rate!r}")
        if self.noise_type not in NOISE_TYPES:
            raise MethodOptionError(f"noise_type must be one of {', '.join(NOISE_TYPES)}; got {self.noise_type!r}")
        if self.score not in SCORES:
            raise MethodOptionError(f"score must be one of {', '.join(SCORES)}; got {self.score!r}")
        t = self.fixed_threshold
        if t is not None and not (isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1):
            raise MethodOptionError(f"fixed_threshold must be in [0, 1] or None (Otsu); got {self.fixed_threshold!r}")
        for name in ("noise_in_queues", "fix_first_sample"):
            if not isinstance(getattr(self, name), bool):
                raise MethodOptionError(f"{name} must be true or false; got {getattr(self, name)!r}")
        if isinstance(self.detector_init, os.PathLike):
            self.detector_init = os.fspath(self.detector_init)
        if self.detector_init is not None and not isinstance(self.detector_init, str):
            raise MethodOptionError(f"detector_init must be a file path or None; got {self.detector_init!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise MethodOptionError(f"seed must be an integer; got {self.seed!r}")


@register_method("adand", "zs-ntta", "zs_ntta")
class AdaND(Method):
    """Frozen zero-shot classifier + an online noise detector on raw image embeddings (ZS-NTTA)."""

    config_class = AdaNDConfig
    episodic = False
    raw_features = True

    def view_set(self) -> ViewSet:
        return ViewSet("original", 1)

    def stream_batch_size(self) -> int:
        return self.config.adapt_batch_size

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        cfg, ctx = self.config, self.ctx
        dim = ctx.class_features.shape[-1]
        self._noise_rng = torch.Generator().manual_seed(cfg.seed + 1)  # injection
        self.detector = _new_detector(dim, torch.Generator().manual_seed(cfg.seed), cfg.detector_init)
        self.detector.to(ctx.class_features.device)
        self.optimizer = torch.optim.Adam(self.detector.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0)
        self._zs_queue = OtsuQueue(cfg.queue_length, cfg.fixed_threshold)  # zero-shot OOD scores
        self._det_queue = OtsuQueue(cfg.queue_length, cfg.fixed_threshold)  # detector's noisy probabilities
        self._window: deque = deque(maxlen=cfg.batch1_window)  # batch size 1: (detector output, noisy label)
        self._step = 0  # detector steps taken: batches, or samples at batch size 1 (noise included)
        self.updates = 0  # optimizer steps of the detector
        self._rows = 0  # stream rows seen (the caller's, noise rows of the caller included)
        self._noise_added = 0  # noise rows this method injected (not in the result)
        self._injected_rows: list[int] = []  # the caller's noise rows (in the result, flagged noisy)
        self._decided_from: int | None = None  # first stream row decided by the detector
        self._noise_features, self._injected = _stream_extras(ctx.extras, dim)
        if self._injected is None and self._noise_features is None and cfg.noise_rate > 0 and ctx.store is None:
            raise FeatureError(
                "AdaND injects noise images into the stream (noise_rate > 0) but has no model to encode them: "
                "on embeddings pass noise_features= (M x D raw noise embeddings) or injected_noise= (a bool per "
                "row marking the stream's noise rows), or set noise_rate=0"
            )
        if self._injected is not None and self._noise_features is not None:
            raise FeatureError("pass either noise_features or injected_noise, not both")

    # ------------------------------------------------------------------ prediction
    def predict_features(self, features: torch.Tensor) -> Prediction:
        raise NotImplementedError("AdaND learns from batches of the stream: call predict_batch (N x V x D)")

    def predict_batch(self, features: torch.Tensor) -> list[Prediction]:
        raw = features[:, 0] if features.ndim == 3 else features
        if not torch.isfinite(raw).all():
            bad = int((~torch.isfinite(raw)).any(-1).sum())
            raise FeatureError(f"AdaND: {bad} image embedding(s) contain NaN or infinite values; check the encoder")
        raw = raw.float()
        out: list[Prediction] = []
        for start in range(0, len(raw), self.config.adapt_batch_size):  # a longer call is several batches
            out.extend(self._predict_chunk(raw[start : start + self.config.adapt_batch_size]))
        return out

    def _predict_chunk(self, x: torch.Tensor) -> list[Prediction]:
        """One batch of the stream: inject noise rows, run the detector step(s), return the stream rows."""
        n, first_row = len(x), self._rows
        from_caller = self._caller_noise(n)
        counts = self._noise_counts(n)
        mixed, is_noise, is_row = _interleave(x, from_caller, counts, self._noise_rows(int(counts.sum())))
        steps = [slice(i, i + 1) for i in range(len(mixed))] if self.config.adapt_batch_size == 1 else [slice(None)]
        logits, scores, noisy, detector_decided = [], [], [], []
        for part in steps:
            lg, sc, ns, decided = self._run_step(mixed[part], is_noise[part])
            logits.append(lg)
            scores.append(sc)
            noisy.append(ns)
            detector_decided.append(torch.full((len(lg),), decided))
        logits, scores, noisy = torch.cat(logits)[is_row], torch.cat(scores)[is_row], torch.cat(noisy)[is_row]
        decided = torch.cat(detector_decided)[is_row]
        if self._decided_from is None and decided.any():
            self._decided_from = first_row + int(decided.nonzero()[0])
        noisy = noisy | from_caller  # the caller's noise rows are always reported noisy
        return [Prediction(lg, sc, ns) for lg, sc, ns in zip(logits.unbind(0), scores.tolist(), noisy.tolist())]

    def _run_step(self, raw: torch.Tensor, is_noise: torch.Tensor):
        """One detector step on k rows (a batch, or one sample at batch size 1): the zero-shot mask,
        the decision by the detector as it was before this step, then the detector's training."""
        cfg = self.config
        logits = self.ctx.logits(F.normalize(raw, dim=-1))
        msp = logits.softmax(-1).max(-1).values
        zs_ood = 1 - msp
        queued = torch.ones_like(is_noise) if cfg.noise_in_queues else ~is_noise
        self._zs_queue.push(zs_ood[queued])
        zs_noisy = zs_ood > self._zs_queue.threshold(self._no_split)  # float32 comparison, as the reference

        with torch.inference_mode(False), torch.enable_grad():
            det_out = self.detector(raw.clone() if raw.is_inference() else raw)
        det_prob = det_out.detach().softmax(-1)  # the pre-update detector decides for this step
        decided = self._switched()
        self._train(det_out, zs_noisy | is_noise)

        if decided:
            self._det_queue.push(det_prob[queued, 0])
            noisy = det_prob[:, 0] > self._det_queue.threshold(self._no_split)
        else:
            noisy = zs_noisy
        if cfg.score == "msp" or (cfg.score == "mixed" and not decided):
            score = msp
        else:
            score = det_prob[:, 1]
        self._step += 1
        return logits, score, noisy, decided

    @property
    def _no_split(self) -> float | None:
        """Otsu's threshold when nothing splits the queue: the reference's 0.0, or (corrected) +inf."""
        return math.inf if self.config.fix_first_sample else None

    def _switched(self) -> bool:
        """Whether the detector decides at this step (the reference: step * batch > warm-up * window)."""
        cfg = self.config
        if cfg.adapt_batch_size == 1:
            start = cfg.warmup_updates * cfg.batch1_window
            return self._step >= start if cfg.fix_first_sample else self._step > start
        return self._step > cfg.warmup_updates

    def _train(self, det_out: torch.Tensor, noisy: torch.Tensor) -> None:
        """Cross-entropy on the zero-shot pseudo-labels (clean = 1), one Adam step per batch; at batch
        size 1 every ``batch1_window`` samples on the last ``batch1_window`` outputs."""
        cfg = self.config
        with torch.inference_mode(False), torch.enable_grad():
            if cfg.adapt_batch_size == 1:
                self._window.append((det_out, noisy))
                if cfg.fix_first_sample:
                    due = (self._step + 1) % cfg.batch1_window == 0
                else:
                    due = self._step != 0 and self._step % cfg.batch1_window == 0
                if not due:
                    return
                det_out = torch.cat([out for out, _ in self._window])
                noisy = torch.cat([mask for _, mask in self._window])
            # clean rows first, then noisy ones, as the reference concatenates them
            order = torch.cat([torch.nonzero(~noisy).flatten(), torch.nonzero(noisy).flatten()])
            loss = F.cross_entropy(det_out[order], (~noisy[order]).long())
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        self.updates += 1

    # ------------------------------------------------------------------ injected noise
    def _caller_noise(self, n: int) -> torch.Tensor:
        """The caller's ``injected_noise`` flags of the next n stream rows (all False without them)."""
        start, self._rows = self._rows, self._rows + n
        if self._injected is None:
            return torch.zeros(n, dtype=torch.bool)
        if start + n > len(self._injected):
            raise FeatureError(
                f"injected_noise has {len(self._injected)} entries but the stream has more rows ({start + n} so far)"
            )
        flags = self._injected[start : start + n]
        self._injected_rows.extend(start + int(i) for i in torch.nonzero(flags).flatten())
        return flags

    def _noise_counts(self, n: int) -> torch.Tensor:
        """How many noise rows go before each of n stream rows: geometric, mean ``noise_rate``."""
        rate = self.config.noise_rate
        if self._injected is not None or rate == 0:
            return torch.zeros(n, dtype=torch.long)
        trials = torch.empty(n, dtype=torch.float64).geometric_(1 / (1 + rate), generator=self._noise_rng)
        return trials.long() - 1

    def _noise_rows(self, k: int) -> torch.Tensor:
        """k raw noise embeddings: from ``noise_features`` in order, or noise images encoded through
        the shared cache."""
        dim = self.ctx.class_features.shape[-1]
        if k == 0:
            return torch.zeros(0, dim)
        start, self._noise_added = self._noise_added, self._noise_added + k
        if self._noise_features is not None:
            pool = self._noise_features
            if start + k > len(pool) and start <= len(pool):
                warnings.warn(
                    f"AdaND: the {len(pool)} noise_features are used up; reusing them from the first", stacklevel=4
                )
            return pool[(start + torch.arange(k)) % len(pool)]
        cfg = self.config
        images = [noise_image(cfg.noise_type, cfg.noise_size, self._noise_rng) for _ in range(k)]
        feats = self.ctx.store.view_features(images, ViewSet("original", 1), normalize=False)[:, 0].float()
        if not torch.isfinite(feats).all():
            raise FeatureError("AdaND: the encoder returned NaN or infinite embeddings for the injected noise images")
        return feats.to(self.ctx.class_features.device)

    # ------------------------------------------------------------------ end of stream
    def finish(self) -> None:
        if self._rows and self._decided_from is None:
            cfg = self.config
            if cfg.adapt_batch_size == 1:
                first = cfg.warmup_updates * cfg.batch1_window + (0 if cfg.fix_first_sample else 1)
                need = f"it decides from sample {first}, counting from 0"
            else:
                need = f"it decides from batch {cfg.warmup_updates + 1} of {cfg.adapt_batch_size}, counting from 0"
            warnings.warn(
                f"AdaND: the stream ended after {self._rows} rows, before the detector's first decision ({need}, "
                "injected noise included): every noisy decision came from the zero-shot score and Otsu's threshold",
                stacklevel=2,
            )
        if self._injected is not None and self._rows != len(self._injected):
            warnings.warn(
                f"AdaND: injected_noise has {len(self._injected)} entries for a stream of {self._rows} rows",
                stacklevel=2,
            )

    def run_info(self) -> dict:
        return {
            "detector_updates": self.updates,
            # first result row whose noisy decision came from the detector (None: it never decided)
            "detector_decides_from_row": self._decided_from,
            # noise rows AdaND injected itself (trained as noisy, not in the result)
            "noise_injected": self._noise_added,
            # stream rows the caller marked as injected noise: in the result with noisy=True; leave them
            # out of metrics
            "injected_noise_rows": list(self._injected_rows),
            # pseudo-label score 1 - max softmax(logit_scale x cos) uses the model's own logit scale
            "pseudo_label_logit_scale": float(self.ctx.logit_scale),
        }


# ---------------------------------------------------------------------- helpers
def _new_detector(dim: int, generator: torch.Generator, path: str | None) -> torch.nn.Linear:
    """``Linear(dim, 2)`` with PyTorch's default init drawn from ``generator`` (what ``nn.Linear``
    draws right after ``torch.manual_seed(seed)``), or the weights stored at ``path``."""
    det = torch.nn.utils.skip_init(torch.nn.Linear, dim, 2)  # no draw from the global RNG
    with torch.no_grad():
        if path is None:
            torch.nn.init.kaiming_uniform_(det.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(dim)
            torch.nn.init.uniform_(det.bias, -bound, bound, generator=generator)
        else:
            weight, bias = _load_detector_weights(path)
            if tuple(weight.shape) != (2, dim) or tuple(bias.shape) != (2,):
                raise MethodOptionError(
                    f"detector_init {path}: expected weight 2 x {dim} and bias 2; got {tuple(weight.shape)} "
                    f"and {tuple(bias.shape)}"
                )
            det.weight.copy_(weight)
            det.bias.copy_(bias)
    return det


def _load_detector_weights(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise MethodOptionError(f"detector_init: cannot read {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise MethodOptionError(f"detector_init {path}: expected a state dict with 'weight' and 'bias'")
    state = {k.removeprefix("fc."): v for k, v in state.items()}
    if "weight" not in state or "bias" not in state:
        raise MethodOptionError(
            f"detector_init {path}: needs 'weight' and 'bias' (or 'fc.weight', 'fc.bias'); has {sorted(state)}"
        )
    return state["weight"].float(), state["bias"].float()


def _stream_extras(extras: dict, dim: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The caller's ``noise_features`` (M x D raw, float32) and ``injected_noise`` (bool per row)."""
    noise, injected = extras.get("noise_features"), extras.get("injected_noise")
    if noise is not None:
        noise = torch.as_tensor(np.asarray(noise) if not isinstance(noise, torch.Tensor) else noise).float()
        if noise.ndim != 2 or noise.shape[1] != dim or len(noise) == 0:
            raise FeatureError(
                f"noise_features must be M x {dim} (M >= 1) raw embeddings; got shape {tuple(noise.shape)}"
            )
        if not torch.isfinite(noise).all():
            raise FeatureError("noise_features contain NaN or infinite values")
    if injected is not None:
        injected = torch.as_tensor(np.asarray(injected) if not isinstance(injected, torch.Tensor) else injected)
        if injected.ndim != 1 or not (injected.dtype == torch.bool or ((injected == 0) | (injected == 1)).all()):
            raise FeatureError("injected_noise must be one boolean per stream row")
        injected = injected.bool().cpu()
    return noise, injected


def _interleave(x: torch.Tensor, x_noise: torch.Tensor, counts: torch.Tensor, noise: torch.Tensor):
    """The mixed batch: ``counts[i]`` noise rows before stream row i. Returns the rows, which are
    noise (the caller's flagged rows or injected ones), and which are the stream's rows."""
    if len(noise) == 0:
        return x, x_noise, torch.ones(len(x), dtype=torch.bool)
    total = len(x) + len(noise)
    at = torch.arange(len(x)) + torch.cumsum(counts, 0)  # position of stream row i
    is_row = torch.zeros(total, dtype=torch.bool)
    is_row[at] = True
    mixed = torch.empty(total, x.shape[1], dtype=x.dtype, device=x.device)
    mixed[at] = x
    mixed[~is_row] = noise.to(x)
    is_noise = ~is_row
    is_noise[at] = x_noise
    return mixed, is_noise, is_row


def noise_image(noise_type: str, size: int, generator: torch.Generator) -> Image.Image:
    """One injected noise image, ZS-NTTA's ``NoiseDataset`` recipe: a 3 x size x size tensor of
    noise min-max scaled to [0, 255], truncated to uint8, as an RGB PIL image."""
    shape = (3, size, size)
    if noise_type == "gaussian":
        x = torch.randn(shape, generator=generator)
    elif noise_type == "uniform":
        x = torch.rand(shape, generator=generator)
    elif noise_type == "salt_and_pepper":  # 5 %: half white (salt), half black (pepper) on black
        x = (torch.rand(shape, generator=generator) < 0.025).float() * 255
    elif noise_type == "poisson":  # Poisson(1) counts
        x = torch.poisson(torch.ones(shape), generator=generator)
    else:
        raise MethodOptionError(f"noise_type must be one of {', '.join(NOISE_TYPES)}; got {noise_type!r}")
    span = x.max() - x.min()
    x = (x - x.min()) / span * 255 if span > 0 else torch.zeros(shape)
    return Image.fromarray(x.byte().permute(1, 2, 0).numpy(), "RGB")
