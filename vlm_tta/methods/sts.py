"""STS: test-time spectrum-aware latent steering (Dafnis & Metaxas, "Test-Time Spectrum-Aware Latent
Steering", NeurIPS 2025, arXiv 2511.09809).

STS adapts the *class prototypes*, not the encoders, one test image at a time. Once per class set it
takes the SVD of the L2-normalised prototype matrix Z (C x D) and keeps its top-k right singular
vectors as a semantic basis B (D x k), k chosen by the Gavish-Donoho optimal hard threshold. For each
image it embeds the original and 63 random crop+flip views once, keeps the 10% of views with the
lowest prediction entropy under the unshifted prototypes, and learns k coefficients gamma (zero at the
start, shared by every class) that shift every prototype to normalize(z_c + B gamma): one AdamW step
(lr 5e-3) on the entropy of the kept views' averaged prediction (+ lambda ||B gamma||). The image is
then classified on its original view with the shifted prototypes, and gamma and the optimizer are
reset for the next image. No gradient ever reaches an encoder, so STS runs on cached embeddings
(``classify_features``) as well as on images (``classify``).

The authors' code (github.com/kdafnis/STS) was not retrievable; the equations follow the paper as
summarised in the project's reference notes. Every choice the paper leaves open is an option, and the
default is stated with its reason:

* ``center=False``: the SVD is taken of Z as it is (one review says so explicitly; the leading singular
  vector is then the direction all CLIP prototypes share). ``center=True`` subtracts the class mean
  first; the shift is still added to the original prototypes.
* ``reg_weight=0.0`` (lambda_R), ``reg_norm="l2"`` (||B gamma||; ``"squared"`` for ||B gamma||^2): the
  paper's lambda_R is not published in any source we could read. It is inert at the paper's setting
  in any case: from gamma = 0 the gradient of ||B gamma||^2 is exactly zero, ||B gamma|| has the
  minimum-norm subgradient zero there (torch's convention), and AdamW's weight decay multiplies a zero
  parameter. So for ``steps=1`` every lambda gives the same predictions; 0 avoids inventing a value
  for multi-step runs.
* ``predict="original"`` (the TPT/TPS protocol STS follows); ``"kept_average"`` classifies with the
  averaged probability of the kept views instead (its logits are then log p_bar, not the model's scale).
* ``view_recipe="crop_flip"`` (random resized crop + flip, the summaries' description); ``"augmix"``
  gives TPT's fine-grained views.
* The rank rule: ``rank="gavish_donoho"`` (paper); ``"energy"`` (smallest k whose squared singular
  values hold ``energy`` of the total; the paper's appendix ablates such a rule, the 0.9 default is
  ours); ``"fixed"`` with ``k``. When a rule keeps no direction (Gavish-Donoho on two nearly orthogonal
  prototypes) the leading singular vector is kept so that STS still adapts. With a single class the
  softmax entropy is identically zero: STS returns the zero-shot logits (k = 0).

Exact speed-ups (tested to change no prediction): the basis is computed once per class set (``setup``)
and memoised in-process by a hash of Z; with cosines x.z_c computed once per view, the shifted cosine is
``(x.z_c + (x B) gamma) / sqrt(|z_c|^2 + 2 (z_c B) gamma + gamma^T B^T B gamma)``, so the optimisation
costs O(V C + C k) per image instead of O(V C D); and N images are adapted at once as independent
problems (gamma is N x k; AdamW is element-wise and the loss is the sum of per-image losses, so one
optimizer over the stacked parameter equals one optimizer per image).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from ..errors import FeatureError, MethodOptionError
from ..views import ViewSet
from .base import Method, MethodContext, Prediction, register_method
from .common import blockwise, confident_views, gather_views, marginal_entropy, n_confident

RANK_RULES = ("gavish_donoho", "energy", "fixed")
REG_NORMS = ("l2", "squared")
PREDICT_VIEWS = ("original", "kept_average")


@dataclass
class STSConfig:
    view_recipe: str = "crop_flip"  # paper (as summarised): random resized crop + horizontal flip
    n_views: int = 64  # paper: the original + 63 augmented views (the views ablation saturates at 64)
    view_seed: int = 0  # the views' seed (vlm_tta.views): the same views as every method reading this recipe
    selection_p: float = 0.1  # paper: keep the 10% lowest-entropy views (TPT's confidence selection)
    lr: float = 5e-3  # paper: AdamW, learning rate 5e-3
    steps: int = 1  # paper: one step (1-5 steps change accuracy by < 0.1%); 0 = zero-shot on the same views
    weight_decay: float = 0.01  # torch AdamW's default (the paper names AdamW, no value); inert from gamma = 0
    #: how k is chosen: "gavish_donoho" (paper), "energy" (share of sum s^2 >= ``energy``), "fixed" (``k``)
    rank: str = "gavish_donoho"
    energy: float = 0.9  # rank="energy" only; our default (the paper ablates an energy rule, value unpublished)
    k: int | None = None  # rank="fixed" only: the number of singular directions
    center: bool = False  # SVD of Z as is (one review states it); True subtracts the class mean first
    reg_weight: float = 0.0  # lambda_R: unpublished; inert for one step from gamma = 0 (module docstring)
    reg_norm: str = "l2"  # "l2" = ||B gamma|| as written in the summaries; "squared" = ||B gamma||^2
    predict: str = "original"  # "original" view (TPT/TPS protocol) or "kept_average" of the kept views

    def __post_init__(self) -> None:
        try:
            ViewSet(self.view_recipe, self.n_views, self.view_seed)
        except ValueError as exc:
            raise MethodOptionError(f"STS views (view_recipe, n_views, view_seed): {exc}") from None
        if not 0 < self.selection_p <= 1:
            raise MethodOptionError(f"selection_p must be in (0, 1]; got {self.selection_p}")
        n_confident(self.n_views, self.selection_p)  # a selection that keeps no view is an error
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise MethodOptionError(f"lr must be a finite number >= 0; got {self.lr}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise MethodOptionError(f"steps must be an integer >= 0; got {self.steps!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise MethodOptionError(f"weight_decay must be a finite number >= 0; got {self.weight_decay}")
        if self.rank not in RANK_RULES:
            raise MethodOptionError(f"rank must be one of {', '.join(RANK_RULES)}; got {self.rank!r}")
        if not 0 < self.energy <= 1:
            raise MethodOptionError(f"energy must be in (0, 1]; got {self.energy}")
        if self.rank == "fixed":
            if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
                raise MethodOptionError(f"rank='fixed' needs k, an integer >= 1; got k={self.k!r}")
        elif self.k is not None:
            raise MethodOptionError(f"k={self.k!r} is used only with rank='fixed'; pass rank='fixed' as well")
        if not isinstance(self.center, bool):
            raise MethodOptionError(f"center must be True or False; got {self.center!r}")
        if not (math.isfinite(self.reg_weight) and self.reg_weight >= 0):
            raise MethodOptionError(f"reg_weight must be a finite number >= 0; got {self.reg_weight}")
        if self.reg_norm not in REG_NORMS:
            raise MethodOptionError(f"reg_norm must be one of {', '.join(REG_NORMS)}; got {self.reg_norm!r}")
        if self.predict not in PREDICT_VIEWS:
            raise MethodOptionError(f"predict must be one of {', '.join(PREDICT_VIEWS)}; got {self.predict!r}")


# ---------------------------------------------------------------------- the spectral basis
def gavish_donoho_omega(beta: float) -> float:
    """omega(beta) of Gavish & Donoho ("The optimal hard threshold for singular values is 4/sqrt(3)",
    IEEE Trans. Inf. Theory 2014, eq. (5)) for unknown noise: the cubic approximation
    0.56 b^3 - 0.95 b^2 + 1.82 b + 1.43, beta = min/max aspect ratio of the matrix, in (0, 1]."""
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1]; got {beta}")
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def gavish_donoho_rank(singular_values: torch.Tensor, shape: tuple[int, int]) -> tuple[int, float]:
    """``(k, threshold)``: how many singular values of a ``shape`` matrix exceed
    ``omega(beta) * median(singular values)`` (the median of all min(shape) values, averaging the
    middle two when there is an even number)."""
    beta = min(shape) / max(shape)
    threshold = gavish_donoho_omega(beta) * float(torch.quantile(singular_values.double(), 0.5))
    return int((singular_values > threshold).sum()), threshold


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest k whose leading squared singular values hold at least ``energy`` of their sum."""
    power = singular_values.double() ** 2
    share = power.cumsum(0) / power.sum()
    return int((share < energy - 1e-12).sum()) + 1


class SpectralBasis(NamedTuple):
    """The steering basis of one prototype matrix and how its size was chosen."""

    basis: torch.Tensor  # D x k, orthonormal columns (the top-k right singular vectors)
    singular_values: torch.Tensor  # all min(C, D) of them, descending (float64)
    k: int
    rule: str  # the rank rule, plus "+fallback" when it kept no direction and the leading one was kept
    threshold: float | None  # Gavish-Donoho's threshold on the singular values (None for other rules)


def spectral_basis(
    prototypes: torch.Tensor,
    rank: str = "gavish_donoho",
    energy: float = 0.9,
    k: int | None = None,
    center: bool = False,
) -> SpectralBasis:
    """STS's basis of the C x D prototype matrix (SVD in float64). See :class:`STSConfig` for the rules."""
    z = prototypes.detach().double().cpu()
    n_classes = z.shape[0]
    if n_classes == 1:  # one class: softmax entropy is 0 for any shift, nothing to steer
        return SpectralBasis(torch.zeros(z.shape[1], 0), torch.linalg.svdvals(z), 0, "single_class", None)
    if center:
        z = z - z.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(z, full_matrices=False)
    threshold = None
    rule = rank
    if rank == "gavish_donoho":
        chosen, threshold = gavish_donoho_rank(s, tuple(z.shape))
    elif rank == "energy":
        chosen = energy_rank(s, energy)
    else:
        available = min(z.shape) - (1 if center and n_classes <= z.shape[1] else 0)
        if k > available:
            raise MethodOptionError(
                f"k={k} exceeds the directions the class prototypes span ({available} for C={n_classes} "
                f"classes, D={z.shape[1]}{', centred' if center else ''}); use k <= {available}"
            )
        chosen = k
    if chosen == 0:
        chosen, rule = 1, f"{rank}+fallback"
    return SpectralBasis(vh[:chosen].T.float().contiguous(), s, chosen, rule, threshold)


_MEMO: OrderedDict[tuple, SpectralBasis] = OrderedDict()
_MEMO_SIZE = 16


def cached_spectral_basis(prototypes: torch.Tensor, **rule) -> SpectralBasis:
    """:func:`spectral_basis`, memoised in-process by a hash of the prototypes' bytes and the rule, so
    repeated ``classify`` calls with the same model, prompts and classes do one SVD."""
    z = prototypes.detach().float().cpu().contiguous()
    digest = hashlib.blake2b(z.numpy().tobytes(), digest_size=16).hexdigest()
    key = (digest, tuple(z.shape), tuple(sorted(rule.items())))
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    out = _MEMO[key] = spectral_basis(z, **rule)
    if len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return out


# ---------------------------------------------------------------------- the per-image steering
class Steered(NamedTuple):
    logits: torch.Tensor  # N x C, the prediction
    gamma: torch.Tensor  # N x k, the learned coefficients
    kept: torch.Tensor  # N x K, the kept views (most confident first)


class _Prototypes(NamedTuple):
    """What the shifted cosines need of Z and B, computed once per class set."""

    z: torch.Tensor  # C x D
    basis: torch.Tensor  # D x k
    zb: torch.Tensor  # C x k, z_c . b_j
    zz: torch.Tensor  # C, |z_c|^2
    gram: torch.Tensor  # k x k, B^T B (the identity up to rounding)

    @classmethod
    def build(cls, z: torch.Tensor, basis: torch.Tensor) -> "_Prototypes":
        return cls(z, basis, z @ basis, (z * z).sum(-1), basis.T @ basis)

    def to(self, device: torch.device) -> "_Prototypes":
        return self if self.z.device == device else _Prototypes(*(t.to(device) for t in self))


def shifted_cosines(cos: torch.Tensor, proj: torch.Tensor, gamma: torch.Tensor, p: _Prototypes) -> torch.Tensor:
    """cos(x, normalize(z_c + B gamma)) for every view and class, from x.z_c (``N x K x C``), x.B
    (``N x K x k``) and gamma (``N x k``): the numerator gains x.B gamma (the same for every class), the
    norm is sqrt(|z_c|^2 + 2 z_c.B gamma + gamma^T B^T B gamma), floored like ``F.normalize``."""
    num = cos + (proj @ gamma.unsqueeze(-1))  # N x K x C  (+ N x K x 1)
    sq_norm = p.zz + 2 * gamma @ p.zb.T + ((gamma @ p.gram) * gamma).sum(-1, keepdim=True)  # N x C
    return num / sq_norm.clamp_min(1e-24).sqrt().unsqueeze(-2)


def steer(
    views: torch.Tensor,
    p: _Prototypes,
    logit_scale: float,
    logit_bias: float | None,
    config: STSConfig,
) -> Steered:
    """STS on N images at once (``views``: N x V x D, L2-normalised, view 0 the original)."""
    scale, bias = logit_scale, (logit_bias if logit_bias is not None else 0.0)
    cos = views @ p.z.T  # N x V x C, the only product with all views, classes and dimensions
    # judged with the unshifted prototypes; per image, so in cache-sized blocks of images (exact)
    kept = blockwise(lambda c: confident_views(scale * c + bias, config.selection_p), cos, per_image=cos[0].numel())
    kept_cos = gather_views(cos, kept)
    kept_proj = gather_views(views, kept) @ p.basis  # N x K x k

    gamma = torch.zeros(len(views), p.basis.shape[1], device=views.device, requires_grad=True)
    if config.steps and gamma.numel():
        optimizer = torch.optim.AdamW([gamma], lr=config.lr, weight_decay=config.weight_decay)
        for _ in range(config.steps):
            loss = marginal_entropy(scale * shifted_cosines(kept_cos, kept_proj, gamma, p) + bias)
            if config.reg_weight:
                shift_norm = torch.linalg.vector_norm(gamma @ p.basis.T, dim=-1)  # ||B gamma||, subgradient 0 at 0
                loss = loss + config.reg_weight * (shift_norm if config.reg_norm == "l2" else shift_norm**2)
            optimizer.zero_grad()
            loss.sum().backward()  # the sum: each image's gradient is its own loss's gradient
            optimizer.step()
    gamma = gamma.detach()

    with torch.no_grad():
        if config.predict == "original":
            proj0 = views[:, :1] @ p.basis
            logits = scale * shifted_cosines(cos[:, :1], proj0, gamma, p)[:, 0] + bias
        else:  # log of the kept views' averaged probability, so that softmax(logits) = p_bar
            kept_logits = scale * shifted_cosines(kept_cos, kept_proj, gamma, p) + bias
            logits = kept_logits.log_softmax(-1).logsumexp(-2) - math.log(kept.shape[-1])
    if not torch.isfinite(logits).all():
        bad = torch.nonzero(~torch.isfinite(logits).all(-1)).flatten().tolist()
        raise FloatingPointError(
            f"STS produced non-finite logits for image(s) {bad[:10]} of this batch (lr={config.lr}, "
            f"steps={config.steps}); lower lr or steps"
        )
    return Steered(logits, gamma, kept)


@register_method("sts")
class STS(Method):
    """Spectrum-aware latent steering of the class prototypes, one image at a time (episodic)."""

    config_class = STSConfig
    episodic = True
    #: images per internal chunk: N x V x C cosines of about this many floats (16 MiB, 64 images at 1,000
    #: classes) stay in a server CPU's L3 cache for the entropy passes, with few parallel regions per image
    #: (on a busy 2-core machine: 1.2x faster than 64 MiB chunks on one thread, 1.7x faster than 4 MiB chunks
    #: on two). Results do not depend on it.
    chunk_elements: ClassVar[int] = 1 << 22

    def view_set(self) -> ViewSet:
        return ViewSet(self.config.view_recipe, self.config.n_views, self.config.view_seed)

    def setup(self, ctx: MethodContext) -> None:
        rule = dict(rank=self.config.rank, energy=self.config.energy, k=self.config.k, center=self.config.center)
        self.spectrum = cached_spectral_basis(ctx.class_features, **rule)
        self._prototypes = _Prototypes.build(ctx.class_features.float(), self.spectrum.basis)
        super().setup(ctx)

    def run_info(self) -> dict:
        s = self.spectrum
        return {"sts_k": s.k, "sts_rank_rule": s.rule, "sts_threshold": s.threshold, "sts_centered": self.config.center}

    def predict_batch(self, features: torch.Tensor) -> list[Prediction]:
        features = features.float()
        if features.ndim != 3 or features.shape[1] < self.config.n_views:
            raise FeatureError(
                f"STS reads {self.config.n_views} views per image (N x V x D); got shape {tuple(features.shape)}"
            )
        if not torch.isfinite(features.sum()):  # one reduction: NaN and inf propagate into the sum
            raise FeatureError("STS got NaN or infinite view embeddings; check the encoder outputs")
        features = features[:, : self.config.n_views]
        p = self._prototypes.to(features.device)
        chunk = max(1, self.chunk_elements // (features.shape[1] * len(p.z)))
        logits = torch.cat(
            [
                steer(features[i : i + chunk], p, self.ctx.logit_scale, self.ctx.logit_bias, self.config).logits
                for i in range(0, len(features), chunk)
            ]
        ).cpu()
        scores = logits.softmax(-1).max(-1).values  # max softmax probability, as zero-shot's default score
        return [Prediction(logits[i], float(scores[i])) for i in range(len(logits))]

    def predict_features(self, features: torch.Tensor) -> Prediction:
        return self.predict_batch(features.unsqueeze(0))[0]


@register_method("sts_ensemble", "sts-ensemble")
class STSEnsemble(STS):
    """STS_Ensemble: STS on prototypes averaged over CLIP's 7 templates (``templates="clip7"``)."""

    default_templates: ClassVar[str | None] = "clip7"
