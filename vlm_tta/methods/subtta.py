"""SubTTA (Zeng et al., "Subspace Alignment for Vision-Language Model Test-time Adaptation",
EMNLP 2026 / arXiv 2601.08139): online test-time adaptation over batches that aligns the image
encoder's principal subspace with the class text subspace, then runs a standard TTA loss on image
features projected onto the text subspace.

Per batch of B images (the loop cuts the stream into batches of ``adapt_batch_size``):

1. **Subspaces.** The text basis U_T (k x D) is fixed for the stream: right singular vectors
   1..k of the centred class embeddings (index 0, the first principal component, dropped by
   default), k = min(C - 1, ``rank``). The visual basis U_V comes from a running covariance of the
   encoder's raw image embeddings X: Sigma <- alpha Sigma + (1 - alpha) (X~'X~ / (B - 1) + 1e-6 I),
   with Sigma initialised to the text covariance; U_V = its singular vectors 1..k.
2. **Alignment step.** L_align = -||U_V U_T'||_F^2 / (k (1 - alpha)) (the chordal distance
   d^2 = k - ||U_V U_T'||_F^2 up to a constant) is back-propagated through the SVD of Sigma into the
   affine parameters of the image encoder's normalisation layers (LayerNorm in ViTs; nothing else
   changes) and one optimizer step is taken.
3. **Base step** (unless ``loss="source"``). The batch is encoded again, projected with
   P_T = U_T'U_T and L2-normalised; pseudo-labels are the argmax of its logits against the classes,
   and one more step is taken on the base loss: ``mint`` (intra-class minus total variance of the
   projected features, a batch-only form of MINT), ``batclip`` (mean cosine between the normalised
   pseudo-class means, BATCLIP's inter-class term) or ``tent`` (entropy, see the quirks).
4. **Prediction**: the ordinary logits of the adapted model on the (un-projected) batch.

SubTTA keeps its adapted weights itself and loads them into the backbone only while it handles a
batch: before :meth:`SubTTA.predict_samples` returns, the user's weights, ``requires_grad`` flags
and ``.grad`` are back, so other methods fed by the same pass, and the shared embedding cache (whose
keys name the original weights), never see the adapted model; :meth:`SubTTA.finish` (called by the
loop when the stream ends, also on errors) makes sure of it after an interrupted batch.
:meth:`SubTTA.reset` returns to the original weights with a fresh optimizer, between domains. Its
features come from the backbone itself, never through the cache.

Reference code: github.com/zhichenz98/SubTTA_EMNLP26 (``classification/methods/subtta.py``, the
``cfgs/*/subtta.yaml`` configs, ``methods/base.py``). Quirks reproduced by default, each with the
option that corrects it:

* The rank is k = min(C - 1, ``rank``) although the centred text embeddings span only C - 1
  directions of which the first is dropped: with few classes (CIFAR-10: k = 9 of 8 real directions)
  the last basis vector lies outside that span, in a direction the SVD picks arbitrarily (this happens
  whenever C <= ``rank`` + 1 and C <= D; ``run_info()`` counts such rows).
  ``rank_within_text_span=True`` caps k at the number of real directions.
* The projector P_T, built from *centred* text embeddings, is applied to the raw, un-centred image
  embeddings (``projection="linear"``). ``projection="affine"`` projects the L2-normalised embedding
  onto the affine text subspace instead: mu_T + (x - mu_T) P_T, with mu_T the class-embedding mean.
* ``loss="tent"`` takes the entropy of softmax(``ent_scale`` x projected feature) over the D *feature
  dimensions*, as the code does (``tent_over="features"``); ``tent_over="classes"`` takes TENT's
  entropy over the classes of the projected logits.
* The alignment step starts without ``zero_grad()``: the gradient left by the previous batch's last
  step is added to the alignment gradient after the reference's (fresh, per batch) CUDA GradScaler
  divided it by its scale 2**16. This is reproduced on every device; ``zero_grad_before_align=True``
  clears it.
* The running covariance is not reset between domains: the reference resets the model and the
  optimizer but keeps the covariance (an attribute of its wrapper). :meth:`SubTTA.reset` does the same;
  ``reset_covariance=True`` also restarts it from the text covariance. A new stream (``setup``, i.e.
  every ``classify`` call) always starts from the text covariance.

Choices where the reference crashes or is silent (documented, tested):

* a batch of one image (only the stream's last batch can have one, as ``adapt_batch_size >= 2``) has no
  covariance: it is predicted with the current weights and no update, with one warning;
* when the pseudo-labels of a batch name fewer than two classes, MINT and BATCLIP have no loss (the
  reference calls ``backward()`` on a constant and fails): the base step is skipped;
* a non-finite loss or gradient skips that update (the reference's CUDA GradScaler skips steps with
  non-finite gradients silently); one warning names the step, and ``run_info()`` counts the skips.
  The usual cause is the alignment step early in a stream when B + C - 2 < D (CIFAR-10: 199 + 9 <
  512): the running covariance is then rank-deficient, its tail singular values can be exactly
  equal, and the SVD's backward gives NaN. After a skipped step the gradient is cleared (the
  reference leaves it in ``.grad``, where with ``loss="source"`` it would spoil every later step).
* the logits are computed in fp32 (the reference's are under fp16 autocast on CUDA).

The adapted parameters are the affine weights and biases of the image encoder's ``nn.LayerNorm``,
``nn.BatchNorm1d/2d`` and ``nn.GroupNorm`` modules, the set the reference's ``configure_model``
picks (ViTs have only LayerNorms). The model stays in eval mode. A features-only variant is not
offered: SubTTA's alignment acts through the image encoder, and a linear map on cached embeddings
would be a different method.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from ..errors import ClassNamesError, MethodOptionError, ModelSpecError
from ..views import ViewSet
from .base import Method, Prediction, register_method
from .common import entropy, resolve_preset

if TYPE_CHECKING:
    from ..features import Sample

LOSSES = ("mint", "tent", "batclip", "source")
OPTIMIZERS = ("adam", "adamw")

#: The reference's per-benchmark configs (``classification/cfgs/<dataset>/subtta.yaml``; ViT-B-16,
#: OpenAI weights, prompt "a photo of a {}."). ``preset=None`` uses ``imagenet_c``.
PRESETS: dict[str, dict] = {
    "imagenet_c": dict(
        adapt_batch_size=64,
        optimizer="adamw",
        lr=5e-4,
        weight_decay=0.01,
        rank=256,
        cov_momentum=0.5,
        loss="mint",
        ent_scale=3.0,
    ),
    "cifar10_c": dict(
        adapt_batch_size=200,
        optimizer="adamw",
        lr=1e-3,
        weight_decay=0.01,
        rank=256,
        cov_momentum=0.1,
        loss="mint",
        ent_scale=0.05,
    ),
    "cifar100_c": dict(
        adapt_batch_size=200,
        optimizer="adam",
        lr=5e-4,
        weight_decay=0.01,
        rank=64,
        cov_momentum=0.5,
        loss="mint",
        ent_scale=0.05,
    ),
}
DEFAULT_PRESET = "imagenet_c"

#: Modules whose affine parameters are adapted (the reference's ``configure_model``).
NORM_TYPES = (torch.nn.LayerNorm, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.GroupNorm)
#: The scale of a fresh ``torch.cuda.amp.GradScaler`` (the reference makes one per batch).
REFERENCE_GRAD_SCALE = 2.0**16
#: Added to the batch covariance's diagonal and its denominator, as in the reference.
COV_EPS = 1e-6


@dataclass
class SubTTAConfig:
    #: per-benchmark settings from :data:`PRESETS` (``imagenet_c``, ``cifar10_c``, ``cifar100_c``) for
    #: every option below left at None; None uses ``imagenet_c``.
    preset: str | None = None
    #: images per adaptation batch (reference ``TEST.BATCH_SIZE``: 64 ImageNet-C, 200 CIFAR); >= 2. The
    #: loop feeds SubTTA batches of this size whatever ``classify(batch_size=...)`` (its chunk size) is.
    adapt_batch_size: int | None = None
    #: ``adamw`` or ``adam`` (``OPTIM.METHOD``: AdamW ImageNet-C / CIFAR-10-C, Adam CIFAR-100-C)
    optimizer: str | None = None
    #: learning rate (``OPTIM.LR``: 5e-4 ImageNet-C / CIFAR-100-C, 1e-3 CIFAR-10-C)
    lr: float | None = None
    #: weight decay (``OPTIM.WD`` = 0.01 in every SubTTA config; L2 for Adam, decoupled for AdamW)
    weight_decay: float | None = None
    beta1: float = 0.9  # OPTIM.BETA in every config; beta2 = 0.999 (methods/base.py)
    #: subspace rank before capping at C - 1 (``SUBTTA.SUBSPACE_RANK``: 256 ImageNet-C / CIFAR-10-C, 64 CIFAR-100-C)
    rank: int | None = None
    #: momentum alpha of the running covariance (``SUBTTA.COV_MOMENTUM``: 0.5 ImageNet-C / CIFAR-100-C,
    #: 0.1 CIFAR-10-C); 0 skips the alignment step, as in the reference
    cov_momentum: float | None = None
    #: base loss on the projected features: ``mint``, ``tent``, ``batclip`` or ``source`` (none);
    #: ``SUBTTA.LOSS_TYPE`` = mint in every config
    loss: str | None = None
    #: temperature factor of the TENT loss over feature dimensions (``SUBTTA.ENT_SCALE``: 3.0 / 0.05)
    ent_scale: float | None = None
    #: ``features``: the reference's entropy over the D feature dimensions; ``classes``: over the classes
    tent_over: str = "features"
    remove_first_pc: bool = True  # SUBTTA.REMOVE_FIRST_PC = True in every config
    #: cap k at the directions the centred text embeddings span (the reference does not, see the quirks)
    rank_within_text_span: bool = False
    #: also restart the running covariance from the text covariance on reset() (the reference keeps it)
    reset_covariance: bool = False
    #: clear the previous batch's gradient before the alignment step (the reference does not)
    zero_grad_before_align: bool = False
    #: ``linear``: x P_T on the raw embedding (reference); ``affine``: mu_T + (x^ - mu_T) P_T
    projection: str = "linear"

    def __post_init__(self) -> None:
        preset = resolve_preset(PRESETS, self.preset, DEFAULT_PRESET, "SubTTA")
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        size = self.adapt_batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise MethodOptionError(
                f"adapt_batch_size must be an integer >= 2 (SubTTA needs a batch covariance); got {size!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise MethodOptionError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if not self.lr > 0:
            raise MethodOptionError(f"lr must be > 0; got {self.lr}")
        if not self.weight_decay >= 0:
            raise MethodOptionError(f"weight_decay must be >= 0; got {self.weight_decay}")
        if not 0 <= self.beta1 < 1:
            raise MethodOptionError(f"beta1 must be in [0, 1); got {self.beta1}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise MethodOptionError(f"rank must be an integer >= 1; got {self.rank!r}")
        if not 0 <= self.cov_momentum < 1:
            raise MethodOptionError(f"cov_momentum must be in [0, 1); got {self.cov_momentum}")
        if self.loss not in LOSSES:
            raise MethodOptionError(f"loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        if not self.ent_scale > 0:
            raise MethodOptionError(f"ent_scale must be > 0; got {self.ent_scale}")
        if self.tent_over not in ("features", "classes"):
            raise MethodOptionError(f"tent_over must be 'features' or 'classes'; got {self.tent_over!r}")
        if self.projection not in ("linear", "affine"):
            raise MethodOptionError(f"projection must be 'linear' or 'affine'; got {self.projection!r}")


# ---------------------------------------------------------------------- subspaces
@dataclass
class TextSubspace:
    basis: torch.Tensor  # k' x D orthonormal rows (k' = k unless D is smaller)
    covariance: torch.Tensor  # D x D, the running covariance's starting point
    mean: torch.Tensor  # D, the class-embedding mean
    rank: int  # k, the loss normaliser (the reference keeps it even when fewer rows exist)
    null_directions: int  # basis rows outside the span of the centred embeddings


def text_subspace(
    text: torch.Tensor, rank: int, remove_first_pc: bool = True, within_span: bool = False
) -> TextSubspace:
    """The principal subspace of the centred class embeddings ``text`` (C x D).

    Rows ``s .. s + k - 1`` of the SVD's right singular vectors (``s = 1`` drops the first principal
    component). The reference's k is ``min(C - s, rank)``; ``within_span`` caps it at the
    ``min(C - 1, D) - s`` directions the centred embeddings can span.
    """
    n, dim = text.shape
    if n < 2:
        raise ClassNamesError(
            f"SubTTA needs at least 2 classes (its text subspace comes from centred class embeddings); got {n}"
        )
    start = int(remove_first_pc)
    span = min(n - 1, dim) - start  # directions with a (generically) non-zero singular value
    k = min(span if within_span else n - start, rank)
    if k < 1:
        raise MethodOptionError(
            f"with {n} classes the centred class embeddings span {min(n - 1, dim)} direction(s) and "
            f"remove_first_pc={remove_first_pc} leaves none: use more classes or remove_first_pc=False"
        )
    mean = text.mean(0, keepdim=True)
    centred = text - mean
    covariance = centred.T @ centred / (n - 1 + COV_EPS)
    vh = torch.linalg.svd(centred, full_matrices=False).Vh
    basis = vh[start : start + k]
    return TextSubspace(basis, covariance, mean[0], k, max(0, len(basis) - max(span, 0)))


def batch_covariance(x: torch.Tensor) -> torch.Tensor:
    """The reference's batch covariance of B x D features: X~'X~ / (B - 1 + 1e-6) + 1e-6 I."""
    centred = x - x.mean(0, keepdim=True)
    eye = torch.eye(x.shape[1], device=x.device, dtype=x.dtype)
    return centred.T @ centred / (len(x) - 1 + COV_EPS) + COV_EPS * eye


def update_covariance(running: torch.Tensor, x: torch.Tensor, momentum: float) -> torch.Tensor:
    """alpha * running + (1 - alpha) * batch covariance; differentiable w.r.t. ``x`` only."""
    return momentum * running.detach() + (1 - momentum) * batch_covariance(x)


def principal_rows(matrix: torch.Tensor, start: int, k: int) -> torch.Tensor:
    """Right singular vectors ``start .. start + k - 1`` of ``matrix`` (fewer when it has fewer)."""
    return torch.linalg.svd(matrix, full_matrices=False).Vh[start : start + min(k, matrix.shape[1] - start)]


def alignment_loss(visual: torch.Tensor, text: torch.Tensor, rank: int, momentum: float) -> torch.Tensor:
    """-||U_V U_T'||_F^2 / (k (1 - alpha)): the chordal distance up to a constant, scaled as the reference."""
    return -(visual @ text.T).pow(2).sum() / (rank * max(1 - momentum, 1e-6))


def chordal_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sqrt(k - ||A B'||_F^2) between the spans of the orthonormal rows of ``a`` and ``b`` (k x D each):
    0 for the same subspace, sqrt(k) for orthogonal ones."""
    return (a.shape[0] - (a @ b.T).pow(2).sum()).clamp(min=0).sqrt()


# ---------------------------------------------------------------------- base losses
def _pseudo_class_means(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(means of the features of each pseudo-class present, sorted by label; each row's class index)."""
    _, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    onehot = F.one_hot(inverse).to(features.dtype)  # B x G
    means = onehot.T @ features / onehot.sum(0)[:, None]
    return means, inverse


def mint_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """SubTTA's batch MINT: mean squared distance to the own pseudo-class mean minus mean squared
    distance to the batch mean (= -inter-class variance); None with fewer than 2 classes present."""
    if len(features) < 2 or labels.unique().numel() < 2:
        return None
    means, inverse = _pseudo_class_means(features, labels)
    intra = (features - means[inverse]).pow(2).sum(1).mean()
    total = (features - features.mean(0)).pow(2).sum(1).mean()
    return intra - total


def batclip_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """Mean pairwise cosine similarity of the L2-normalised pseudo-class means (BATCLIP's inter-class
    term, without its image-to-text term); None with fewer than 2 classes present."""
    if labels.unique().numel() < 2:
        return None
    means, _ = _pseudo_class_means(features, labels)
    means = F.normalize(means, dim=-1)
    upper = torch.triu_indices(len(means), len(means), offset=1, device=means.device)
    return (means @ means.T)[upper[0], upper[1]].mean()


def tent_loss(projected: torch.Tensor, logits: torch.Tensor, ent_scale: float, over: str) -> torch.Tensor:
    """Mean entropy of softmax(``ent_scale`` x projected feature) over feature dimensions (the
    reference), or of softmax(logits) over classes (``over="classes"``)."""
    return entropy(ent_scale * projected if over == "features" else logits).mean()


# ---------------------------------------------------------------------- the backbone
def image_tower(model) -> torch.nn.Module:
    """The image encoder module of a backbone: open_clip's ``model.visual``, transformers'
    ``model.vision_model``."""
    module = getattr(model, "model", None)
    for name in ("visual", "vision_model"):
        tower = getattr(module, name, None)
        if isinstance(tower, torch.nn.Module):
            return tower
    raise ModelSpecError(
        f"SubTTA adapts the image encoder, but {model!r} exposes none (it looks for an open_clip model's "
        "`.visual` or a transformers model's `.vision_model`)"
    )


def norm_parameters(tower: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the affine weight and bias of every normalisation layer in ``tower``."""
    out = []
    for mod_name, module in tower.named_modules():
        if isinstance(module, NORM_TYPES):
            for p_name in ("weight", "bias"):
                param = getattr(module, p_name, None)
                if isinstance(param, torch.nn.Parameter):
                    out.append((f"{mod_name}.{p_name}" if mod_name else p_name, param))
    return out


# ---------------------------------------------------------------------- the method
ORIGINAL = ViewSet("original", 1)


@register_method("subtta", "sub-tta")
class SubTTA(Method):
    """SubTTA: align the image encoder's principal subspace with the text subspace (LayerNorm
    updates through an SVD), then a TTA loss on features projected onto the text subspace."""

    config_class = SubTTAConfig
    episodic = False
    needs_pixels = True

    def stream_batch_size(self) -> int:
        return self.config.adapt_batch_size

    # ------------------------------------------------------------------ life cycle
    def setup(self, ctx) -> None:
        if ctx.model is None:
            raise ModelSpecError("SubTTA updates the image encoder: it needs the model (use vlm_tta.classify)")
        self.finish()  # a method set up twice first gives the previous model back
        cfg = self.config
        model = ctx.model
        # Everything that can fail comes before the model is touched.
        named = norm_parameters(image_tower(model))
        if not named:
            raise ModelSpecError(
                f"SubTTA adapts the affine parameters of the image encoder's normalisation layers "
                f"(LayerNorm, BatchNorm, GroupNorm), and {model!r} has none"
            )
        self._device = model.device
        self._classes = ctx.class_features.to(self._device, torch.float32)
        self._text = text_subspace(self._classes, cfg.rank, cfg.remove_first_pc, cfg.rank_within_text_span)
        self._projector = self._text.basis.T @ self._text.basis
        self.ctx = ctx
        self._params = [p for _, p in named]
        self._n_adapted = sum(p.numel() for p in self._params)
        # The user's model as it is: the weights SubTTA adapts, every requires_grad flag and .grad.
        self._originals = [p.detach().clone() for p in self._params]
        self._saved_flags = [(p, p.requires_grad, p.grad) for p in model.model.parameters()]
        self._covariance = None  # a new stream starts from the text covariance (created in reset)
        self.reset()

    def reset(self) -> None:
        """The reference's per-domain reset: the original weights and a fresh optimizer; the running
        covariance is kept (``reset_covariance=True`` restarts it from the text covariance)."""
        cfg = self.config
        self._adapted = [w.clone() for w in self._originals]  # the weights SubTTA has learnt so far
        self._grads: list[torch.Tensor | None] = [None] * len(self._params)  # their .grad between batches
        opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self._optimizer = opt(self._params, lr=cfg.lr, betas=(cfg.beta1, 0.999), weight_decay=cfg.weight_decay)
        if self._covariance is None or cfg.reset_covariance:
            self._covariance = self._text.covariance.clone()
        self._batches = 0
        self._skipped: dict[str, int] = {}
        self._warned: set[str] = set()

    @contextlib.contextmanager
    def _adapted_backbone(self):
        """The backbone holds SubTTA's weights (with gradients on them only) inside this block and the
        user's own weights, flags and gradients outside it, so between two batches the model can be
        used by anyone (other methods of one pass, the cache)."""
        self.ctx.model.model.requires_grad_(False)
        with torch.no_grad():
            for p, w, g in zip(self._params, self._adapted, self._grads):
                p.copy_(w)
                p.grad = g
                p.requires_grad_(True)
        try:
            yield
        finally:
            with torch.no_grad():
                for i, p in enumerate(self._params):
                    self._adapted[i].copy_(p)
                    self._grads[i] = p.grad
            self._give_back()

    def _give_back(self) -> None:
        with torch.no_grad():
            for p, w in zip(self._params, self._originals):
                p.copy_(w)
        for p, flag, grad in self._saved_flags:
            p.requires_grad_(flag)
            p.grad = grad

    def finish(self) -> None:
        """Make sure the user's model is exactly as before: weights, ``requires_grad`` flags, ``.grad``."""
        if getattr(self, "_params", None) is None:
            return
        self._give_back()
        self._params = self._originals = self._saved_flags = self._optimizer = self._adapted = self._grads = None

    def run_info(self) -> dict:
        return {
            "subtta_rank": self._text.rank,
            # text basis rows outside the span of the centred class embeddings (the reference's rank cap)
            "subtta_text_null_directions": self._text.null_directions,
            "subtta_adapted_parameters": self._n_adapted,
            "subtta_batches": self._batches,
            "subtta_skipped_steps": dict(self._skipped),
        }

    # ------------------------------------------------------------------ prediction
    def predict_sample(self, sample: "Sample") -> Prediction:
        return self.predict_samples([sample])[0]

    def predict_samples(self, samples: "Sequence[Sample]") -> list[Prediction]:
        if getattr(self, "_params", None) is None:
            raise RuntimeError("SubTTA.predict_samples called before setup() or after finish()")
        pixels = torch.cat([s.views(ORIGINAL) for s in samples]).to(self._device)
        with self._adapted_backbone():
            if len(samples) < 2:
                self._warn_once(
                    "single",
                    "SubTTA: a batch of 1 image has no covariance; it is predicted with the current weights and "
                    "no update (only the stream's last batch can be this small)",
                )
            else:
                self._adapt(pixels)
                self._batches += 1
            with torch.no_grad():
                logits = self.ctx.logits(F.normalize(self._encode(pixels), dim=-1).cpu())
        probs = logits.softmax(-1)
        return [Prediction(logits[i], float(probs[i].max())) for i in range(len(logits))]

    def _adapt(self, pixels: torch.Tensor) -> None:
        """One batch: the alignment step, then the base-loss step on the projected features."""
        cfg = self.config
        model = self.ctx.model
        # The reference's fresh per-batch GradScaler; only fp16 autocast on CUDA needs one.
        scaler = None
        if self._device.type == "cuda" and model.precision == "amp":
            scaler = torch.amp.GradScaler("cuda", init_scale=REFERENCE_GRAD_SCALE)
        with torch.enable_grad():
            if cfg.cov_momentum != 0:
                self._align(pixels, scaler)
            if cfg.loss == "source":
                return
            features = self._encode(pixels)
            projected = F.normalize(self._project(features), dim=-1)
            logits = self.ctx.logit_scale * projected @ self._classes.T
            labels = logits.detach().argmax(1)
            self._optimizer.zero_grad()
            if cfg.loss == "mint":
                loss = mint_loss(projected, labels)
            elif cfg.loss == "batclip":
                loss = batclip_loss(projected, labels)
            else:
                loss = tent_loss(projected, logits, cfg.ent_scale, cfg.tent_over)
            if loss is not None:  # None: the pseudo-labels name a single class
                self._step(loss, f"base loss ({cfg.loss})", scaler)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw image embeddings (B x D, fp32) from the backbone itself, under its autocast; never
        through the cache, whose keys name the original weights."""
        model = self.ctx.model
        with model.autocast():
            return model._encode_images(pixels).float()

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        if self.config.projection == "linear":
            return features @ self._projector
        mean = self._text.mean
        return mean + (F.normalize(features, dim=-1) - mean) @ self._projector

    def _align(self, pixels: torch.Tensor, scaler) -> None:
        """The alignment step: update the running covariance with this batch and turn its principal
        subspace towards the text subspace."""
        cfg = self.config
        features = self._encode(pixels)
        if not torch.isfinite(features).all():  # keep the running covariance clean
            self._skip("alignment", "the image embeddings are not finite")
            return
        covariance = update_covariance(self._covariance, features, cfg.cov_momentum)
        self._covariance = covariance.detach()
        visual = principal_rows(covariance, int(cfg.remove_first_pc), self._text.rank)
        loss = alignment_loss(visual, self._text.basis, self._text.rank, cfg.cov_momentum)
        if cfg.zero_grad_before_align:
            self._optimizer.zero_grad()
        elif scaler is None:  # what the reference's GradScaler does to the gradient left in .grad
            for p in self._params:
                if p.grad is not None:
                    p.grad.div_(REFERENCE_GRAD_SCALE)
        self._step(loss, "alignment", scaler)

    def _step(self, loss: torch.Tensor, name: str, scaler) -> None:
        """backward + one optimizer step; a non-finite loss or gradient skips the step."""
        if not torch.isfinite(loss.detach()):
            return self._skip(name, "the loss is not finite")
        bad_grad = "the gradient is not finite"
        if name == "alignment":
            bad_grad += (
                " (a rank-deficient running covariance, B + C - 2 < D early in a stream, can have repeated singular "
                "values, for which the SVD's gradient is undefined)"
            )
        if scaler is not None:
            scaler.scale(loss).backward()
            before = scaler.get_scale()
            scaler.step(self._optimizer)
            scaler.update()
            if scaler.get_scale() < before:  # the scaler lowers its scale when it skips a step
                self._skip(name, bad_grad)
            return
        loss.backward()
        if not all(p.grad is None or torch.isfinite(p.grad).all() for p in self._params):
            return self._skip(name, bad_grad)
        self._optimizer.step()

    def _skip(self, name: str, why: str) -> None:
        """Count a skipped update (and warn about the first of each step)."""
        self._optimizer.zero_grad()
        self._skipped[name] = self._skipped.get(name, 0) + 1
        self._warn_once(
            name,
            f"SubTTA: {why} in the {name} step at batch {self._batches + 1}; that update was skipped "
            "(skips are counted in result.info['subtta_skipped_steps'])",
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
