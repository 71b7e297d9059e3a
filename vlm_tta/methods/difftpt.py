"""DiffTPT's view pool and view filters (Feng, Yu, Liu, Khan, Zuo, "Diverse Data Augmentation with
Diffusions for Effective Test-time Prompt Tuning", ICCV 2023).

DiffTPT is TPT (Shu et al., NeurIPS 2022) over a richer pool of views: for each test image, the
original, 64 conventional views (TPT's ``crop_flip`` for the ImageNet sets, ``augmix`` for the
fine-grained ones) and 63 Stable-Diffusion image variations of it (:mod:`vlm_tta.diffusion`), only
resized and centre-cropped with the backbone's own preprocessing: 128 views, in that order. A cosine
filter drops the views that disagree most with the original, then TPT's entropy selection keeps the
most confident of the rest, and TPT's marginal-entropy loss tunes the prompt (4 AdamW steps at 5e-3
in DiffTPT's scripts, the selection fixed after step 1). This module holds the pool and the filters as
pure, batched functions; the method class is assembled on top of TPT.

The filters, in two named modes:

* ``"code"`` (the default; chunmeifeng/DiffTPT ``select_confident_samples_cosine``): the cosine
  similarity between the *logit vector* of the original view and that of every other view (all
  127, conventional and generated alike, with the current prompt); the top ``int(127 * 0.8) = 101``
  are kept (``--selection_cosine 0.8``), the original is put in front (102), and the
  ``int(102 * 0.3) = 30`` lowest-entropy views of those are selected (``--selection_selfentro 0.3``;
  the original competes).
* ``"paper"`` (the paper, §3.4 and §4.3, as read in the authors' issue #10): the cosine filter is for
  the generated images only and compares images, not predictions: here the cosine between the
  *image embedding* of the original view and of each generated view (prompt-independent); the top
  ``int(63 * 0.8) = 50`` generated views are kept. Conventional views skip the cosine filter (the
  paper selects them by entropy alone). The original, the 64 conventional views and the 50 kept
  generated views (115) then go through one entropy selection with the same fraction
  (``int(115 * 0.3) = 34``): the paper gives one confidence-selection ratio, not one per kind.

Reference quirks kept or noted: ``torch.argsort`` in the reference is not stable, so ties (equal
cosines or entropies) may fall either way there; here ties keep the lower view index (a stable
sort). The reference draws its generated images from the global RNG; see :mod:`vlm_tta.diffusion`
for the per-image seeding and the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import MethodOptionError, VlmTtaError
from ..features import LazyImage
from ..views import ViewSet
from .common import confident_views, gather_views, n_confident

__all__ = [
    "COSINE_FRACTION",
    "ENTROPY_FRACTION",
    "FILTER_MODES",
    "N_CONVENTIONAL",
    "N_GENERATED",
    "PoolSelection",
    "assemble_pool",
    "conventional_view_set",
    "cosine_filter",
    "cosine_to_original",
    "generated_view_features",
    "generated_views",
    "select_views",
]

N_CONVENTIONAL = 64  # DiffTPT code: AugMixAugmenter(n_views=batch_size) with -b 64 in aug_mode difftpt
N_GENERATED = 63  # DiffTPT code: diffuData(view_num=batch_size - 1)
COSINE_FRACTION = 0.8  # DiffTPT code, --selection_cosine
ENTROPY_FRACTION = 0.3  # DiffTPT code, --selection_selfentro
FILTER_MODES = ("code", "paper")


# ------------------------------------------------------------------------------------ the pool


def conventional_view_set(recipe: str, seed: int = 0, n_conventional: int = N_CONVENTIONAL) -> ViewSet:
    """The original and the conventional views: ``ViewSet(recipe, 1 + n_conventional, seed)``
    (DiffTPT: ``crop_flip`` for the ImageNet sets, ``augmix`` for the fine-grained ones; 65 views)."""
    return ViewSet(recipe, 1 + n_conventional, seed)


def assemble_pool(conventional: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """DiffTPT's pool ``N x (1 + C + G) x ...`` in the reference's order: the original and the
    ``C`` conventional views (``N x (1 + C) x ...``, view 0 the original), then the ``G`` generated
    views (``N x G x ...``). Works on pixels and on embeddings alike."""
    if (
        conventional.ndim < 2
        or conventional.shape[0] != generated.shape[0]
        or conventional.shape[2:] != generated.shape[2:]
    ):
        raise ValueError(
            f"conventional views {tuple(conventional.shape)} and generated views {tuple(generated.shape)} must be "
            "N x V x ... with the same N and the same trailing shape"
        )
    return torch.cat([conventional, generated.to(conventional.dtype)], dim=1)


def _check_stored_size(hw: tuple[int, int], model: Any) -> None:
    size = model.preprocess_cfg.image_size
    need = max(size) if isinstance(size, (tuple, list)) else int(size)
    if min(hw) < need:
        raise VlmTtaError(
            f"the stored image variations are {hw[1]} x {hw[0]} px, smaller than the {need} px input of "
            f"{getattr(model, 'name', 'the model')}: they would be enlarged. Generate them again at a larger stored "
            "size (`vlm-tta generate --store-size 0` keeps the generated 512 px, or --store-size N)."
        )


def generated_views(model: Any, generations: np.ndarray) -> torch.Tensor:
    """Model-ready pixels (``G x 3 x H x W``) of stored generations (``G x h x w x 3`` uint8): only
    the backbone's own preprocessing (resize + centre crop + normalise), as DiffTPT reads them."""
    gens = np.asarray(generations)
    if gens.ndim != 4 or gens.shape[-1] != 3 or gens.dtype != np.uint8:
        raise ValueError(f"generations must be a G x H x W x 3 uint8 array; got {gens.dtype} {gens.shape}")
    _check_stored_size(gens.shape[1:3], model)
    pil = [Image.fromarray(g) for g in gens]
    return ViewSet("original", 1).make_batch(pil, model.preprocess_cfg, original=model.preprocess)[:, 0]


def generated_view_features(
    store: Any, variations: Any, image_hashes: Sequence[str], normalize: bool = True
) -> torch.Tensor:
    """``N x G x D`` embeddings of the generated views of ``N`` images (by content hash), through the
    shared cache: a generated view is addressed by its generation's cache key, so a warm run reads
    neither the generations nor the encoder. ``variations`` is a
    :class:`~vlm_tta.diffusion.ImageVariations`; its generations must be in the cache
    (:meth:`~vlm_tta.diffusion.ImageVariations.generate` makes the missing ones when it has weights;
    otherwise :class:`~vlm_tta.diffusion.GenerationsMissingError` says what to run)."""
    hashes = list(image_hashes)
    keys = [variations.keys(h) for h in hashes]
    count = variations.settings.count

    @lru_cache(maxsize=1)  # the generations of one image are read once, when one of them is missing
    def generations_of(i: int) -> np.ndarray:
        gens = variations.load([hashes[i]])[0]
        _check_stored_size(gens.shape[1:3], store.model)
        return gens

    def loader(i: int, j: int):
        return lambda: Image.fromarray(generations_of(i)[j])

    lazy = [LazyImage(loader(i, j), content_hash=k) for i, ks in enumerate(keys) for j, k in enumerate(ks)]
    if not lazy:
        return torch.zeros((0, count, store.model.embed_dim))
    feats = store.view_features(lazy, ViewSet("original", 1), normalize=normalize)
    return feats.view(len(hashes), count, -1)


# ------------------------------------------------------------------------------------ the filters


@dataclass
class PoolSelection:
    """Which views of the pool each stage keeps (pool indices, ``N x k`` each)."""

    cosine: torch.Tensor  # views that pass the cosine filter (the original not among them)
    kept: torch.Tensor  # the original (index 0), then ``cosine``: the entropy selection's candidates
    selected: torch.Tensor  # the lowest-entropy ``kept`` views, most confident first: the loss's views


def cosine_to_original(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between view 0 and every other view: ``... x V x F -> ... x (V - 1)``
    (``torch.nn.CosineSimilarity`` as the reference computes it)."""
    return F.cosine_similarity(x[..., :1, :], x[..., 1:, :], dim=-1)


def _check_mode(mode: str) -> None:
    if mode not in FILTER_MODES:
        raise MethodOptionError(f"filter mode must be one of {', '.join(FILTER_MODES)}; got {mode!r}")


def cosine_filter(
    logits: torch.Tensor,
    fraction: float = COSINE_FRACTION,
    mode: str = "code",
    features: torch.Tensor | None = None,
    n_generated: int = N_GENERATED,
) -> torch.Tensor:
    """Pool indices (``N x k``) of the views that pass DiffTPT's cosine filter.

    ``"code"``: the ``int((V - 1) * fraction)`` views whose logits (``N x V x C``) are most similar
    to the original's, most similar first. ``"paper"``: every conventional view (in order), then the
    ``int(n_generated * fraction)`` generated views (the last ``n_generated`` of the pool) whose image
    embeddings (``features``, ``N x V x D``) are most similar to the original's, most similar first.
    """
    _check_mode(mode)
    v = logits.shape[-2]
    if mode == "code":
        k = n_confident(v - 1, fraction)
        return torch.argsort(cosine_to_original(logits), dim=-1, descending=True, stable=True)[..., :k] + 1
    if features is None:
        raise MethodOptionError("the 'paper' filter compares image embeddings: pass features (N x V x D)")
    if features.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"features {tuple(features.shape)} and logits {tuple(logits.shape)} must have the same N x V")
    if not 0 < n_generated < v:
        raise ValueError(f"n_generated must be in 1..{v - 1} for a pool of {v} views; got {n_generated}")
    start = v - n_generated
    k = n_confident(n_generated, fraction)
    scores = F.cosine_similarity(features[..., :1, :], features[..., start:, :], dim=-1)
    generated = torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :k] + start
    conventional = torch.arange(1, start, device=generated.device).expand(*generated.shape[:-1], start - 1)
    return torch.cat([conventional, generated], dim=-1)


def select_views(
    logits: torch.Tensor,
    cosine_fraction: float = COSINE_FRACTION,
    entropy_fraction: float = ENTROPY_FRACTION,
    mode: str = "code",
    features: torch.Tensor | None = None,
    n_generated: int = N_GENERATED,
) -> PoolSelection:
    """DiffTPT's two-stage view selection on ``N x V x C`` logits (view 0 the original): the cosine
    filter (:func:`cosine_filter`), the original put in front, then the ``int(len(kept) *
    entropy_fraction)`` lowest-entropy views (:func:`~vlm_tta.methods.common.confident_views`).
    ``gather_views(logits, selection.selected)`` are the views of the loss; with several tuning
    steps the reference keeps the step-1 selection."""
    passed = cosine_filter(logits, cosine_fraction, mode, features, n_generated)
    original = torch.zeros((*passed.shape[:-1], 1), dtype=passed.dtype, device=passed.device)
    kept = torch.cat([original, passed], dim=-1)
    order = confident_views(gather_views(logits, kept), entropy_fraction)
    return PoolSelection(cosine=passed, kept=kept, selected=torch.gather(kept, -1, order))
