"""DiffTPT's view pool and view filters (Feng, Yu, Liu, Khan, Zuo, "Diverse Data Augmentation with
Diffusions for Effective Test-time Prompt Tuning", ICCV 2023).

DiffTPT is TPT (Shu et al., NeurIPS 2022) over a richer pool of views: for each test image, the
original, 64 conventional views (TPT's ``crop_flip`` for the ImageNet sets, ``augmix`` for the
fine-grained ones) and 63 Stable-Diffusion image variations of it (:mod:`vlm_tta.diffusion`), only
resized and centre-cropped with the backbone's own preprocessing: 128 views, in that order. A cosine
filter drops the views that disagree most with the original, then TPT's entropy selection keeps the
most confident of the rest, and TPT's marginal-entropy loss tunes the prompt (4 AdamW steps at 5e-3
in DiffTPT's scripts, the selection fixed after step 1). This module holds the pool and the filters as
pure, batched functions; the method (``method="difftpt"``, :class:`DiffTPT`) is TPT's
:class:`~vlm_tta.methods.tpt.PromptTuner` with this pool and this selection.

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
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..diffusion import (
    DEFAULT_MODEL,
    DEFAULT_REVISION,
    DiffusionWeightsError,
    GenerationsMissingError,
    ImageVariations,
    VariationSettings,
)
from ..errors import MethodOptionError, VlmTtaError
from ..features import LazyImage
from ..views import ViewSet
from .base import MethodContext, Prediction, register_method
from .common import check_int, confident_views, gather_views, n_confident
from .tpt import TPT, PromptTuningConfig

if TYPE_CHECKING:
    from ..features import Sample

__all__ = [
    "COSINE_FRACTION",
    "DiffTPT",
    "DiffTPTConfig",
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


# ------------------------------------------------------------------------------------ the method


@dataclass
class DiffTPTConfig(PromptTuningConfig):
    """DiffTPT's defaults (chunmeifeng/DiffTPT scripts: ``-b 64 --ctx_init a_photo_of_a --tpt --aug_mode
    difftpt --selection_cosine 0.8 --selection_selfentro 0.3 --lr 5e-3 --tta_steps 4``); TPT's shared
    options (:class:`~vlm_tta.methods.tpt.PromptTuningConfig`) otherwise."""

    tta_steps: int = 4  # DiffTPT scripts: --tta_steps 4 (the selection is fixed after step 1)
    n_conventional: int = N_CONVENTIONAL  # conventional views besides the original (-b 64)
    filter_mode: str = "code"  # "code" (cosine of logits, all views; the default) or "paper" (see the module doc)
    cosine_fraction: float = COSINE_FRACTION  # --selection_cosine 0.8
    entropy_fraction: float = ENTROPY_FRACTION  # --selection_selfentro 0.3
    # -- the image variations (vlm_tta.diffusion); they enter the generation cache key
    #: a hub id, a local diffusers folder, a StableDiffusionImageVariationPipeline or an ImageVariations
    diffusion: Any = DEFAULT_MODEL
    revision: str | None = DEFAULT_REVISION
    n_generated: int = N_GENERATED  # the loader reads batch_size - 1 = 63 generations per image
    diffusion_steps: int = 50  # diffusers' default num_inference_steps
    guidance_scale: float = 3.0  # the generator's pipe(images, guidance_scale=3)
    scheduler: str | None = None  # a diffusers scheduler class name; None: the checkpoint's own
    height: int = 512
    width: int = 512
    generation_seed: int = 0
    jpeg_quality: int | None = 75  # the reference saves .jpg and reads them back
    store_size: int | None = 224  # shorter side stored; None: as generated (see vlm_tta.diffusion)
    #: make the generations that are not in the cache (needs the pipeline's weights); False: cache only
    generate: bool = True
    generation_batch_size: int = 4

    def __post_init__(self) -> None:
        check_int("n_conventional", self.n_conventional, 1)
        check_int("n_generated", self.n_generated, 1)
        _check_mode(self.filter_mode)
        for name in ("cosine_fraction", "entropy_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise MethodOptionError(f"{name} must be in (0, 1]; got {value!r}")
        pool = 1 + self.n_conventional + self.n_generated
        n_confident(pool - 1, self.cosine_fraction)  # a selection that would keep nothing is refused here
        super().__post_init__()
        check_int("generation_batch_size", self.generation_batch_size, 1)
        self.conventional()  # validates the preset and the recipe
        if not isinstance(self.diffusion, ImageVariations):
            self.settings()  # validates the generation settings

    def conventional(self) -> ViewSet:
        return conventional_view_set(self.recipe("DiffTPT"), self.view_seed, self.n_conventional)

    def settings(self) -> VariationSettings:
        return VariationSettings(
            count=self.n_generated,
            steps=self.diffusion_steps,
            guidance_scale=self.guidance_scale,
            height=self.height,
            width=self.width,
            scheduler=self.scheduler,
            seed=self.generation_seed,
            jpeg_quality=self.jpeg_quality,
            store_size=self.store_size,
        )


@register_method("difftpt")
class DiffTPT(TPT):
    """DiffTPT (Feng et al., ICCV 2023): TPT over the original, 64 conventional views and 63 Stable
    Diffusion image variations, with a cosine filter before TPT's entropy selection.

    Per image (episodic): the pool's embeddings (conventional views through the shared cache; the
    generations read from the cache, made first when missing and weights are available); logits of all
    128 views with the current context; at step 1, :func:`select_views` (cosine filter, the original in
    front, the lowest-entropy ``entropy_fraction`` of those), kept for the later steps; TPT's
    marginal-entropy loss; ``tta_steps`` AdamW steps; the original view's logits with the tuned context.
    Caller-given view tensors (``N x 128 x 3 x H x W``: the original, the conventional views, then the
    generated ones, preprocessed) are used as given, so no generation is needed.
    """

    config_class = DiffTPTConfig

    def view_set(self) -> ViewSet:
        return self.config.conventional()

    def pool_set(self) -> ViewSet:
        """The whole pool as one view set: what caller-given view tensors must hold (128 views)."""
        conv = self.view_set()
        return ViewSet(conv.recipe, conv.n_views + self.n_generated, conv.seed)

    def setup(self, ctx: MethodContext) -> None:
        self.setup_learner(ctx)
        cfg = self.config
        if isinstance(cfg.diffusion, ImageVariations):
            self.variations = cfg.diffusion
        else:
            store = ctx.store
            self.variations = ImageVariations(
                cfg.diffusion,
                revision=cfg.revision,
                settings=cfg.settings(),
                cache=store.cache if store is not None else True,
                batch_size=cfg.generation_batch_size,
                exif_transpose=store.exif_transpose if store is not None else True,
            )
        self.n_generated = self.variations.settings.count
        if cfg.filter_mode == "paper":
            n_confident(self.n_generated, cfg.cosine_fraction)
        # Weights are needed only for generations that are not in the cache: note now whether they are
        # here, and fail at the first image whose generations are missing, before adapting anything.
        self._weights_error: DiffusionWeightsError | None = None
        if cfg.generate:
            try:
                self.variations.check_available()
            except DiffusionWeightsError as err:
                self._weights_error = err
        self.generated_images = 0

    # -- the pool
    def _ensure_generations(self, samples: Sequence[Sample]) -> None:
        with_pixels = [s for s in samples if s.has_image]
        missing = sorted({i for i, _ in self.variations.missing([s.image_hash for s in with_pixels])})
        if not missing:
            return
        if not self.config.generate or self._weights_error is not None:
            why = (
                "generate=False (cache only)" if self._weights_error is None else "the pipeline's weights are not here"
            )
            details = f" Details: {self._weights_error}" if self._weights_error is not None else ""
            raise GenerationsMissingError(
                f"DiffTPT: the image variations of {len(missing)} image(s) are not in the cache at "
                f"{self.variations.cache.directory} and {why}. Make them first with `vlm-tta generate` on these "
                "images (the same generation settings and cache directory), or give DiffTPT the pipeline: "
                f"diffusion=<local diffusers folder> (CLI: -o diffusion=DIR).{details}"
            )
        todo = [with_pixels[i] for i in missing]
        report = self.variations.generate([s.image for s in todo], image_hashes=[s.image_hash for s in todo])
        self.generated_images += report.images_generated

    def _pool_features(self, samples: Sequence[Sample]) -> torch.Tensor:
        """``B x (1 + C + G) x D`` L2-normalised pool embeddings, through the shared cache."""
        from ..features import batch_view_features

        given = [not s.has_image for s in samples]
        if all(given):
            return batch_view_features(samples, self.pool_set())
        if any(given):
            raise MethodOptionError(
                "DiffTPT got images and preprocessed view tensors in one batch: give one kind per call"
            )
        self._ensure_generations(samples)
        conventional = batch_view_features(samples, self.view_set())
        generated = generated_view_features(
            samples[0].store, self.variations, [s.image_hash for s in samples], normalize=True
        )
        return assemble_pool(conventional, generated)

    def _selector(self, features: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        cfg = self.config

        def select(logits: torch.Tensor) -> torch.Tensor:
            return select_views(
                logits,
                cfg.cosine_fraction,
                cfg.entropy_fraction,
                cfg.filter_mode,
                features=features.to(logits.device) if cfg.filter_mode == "paper" else None,
                n_generated=self.n_generated,
            ).selected

        return select

    def predict_samples(self, samples: Sequence[Sample]) -> list[Prediction]:
        out: list[Prediction] = []
        step = 1 if self.config.reference_compute else self.image_batch()
        for start in range(0, len(samples), step):
            chunk = samples[start : start + step]
            feats = self._pool_features(chunk)
            tuner = self.make_tuner(select=self._selector(feats))
            inputs = self._reference_pool(chunk[0]) if self.config.reference_compute else feats
            out.extend(self._predict(tuner.tune(inputs)))
        return out

    def _predict(self, result) -> list[Prediction]:
        self.last_selected = result.selected  # B x k pool indices of the loss's views (for comparisons)
        return super()._predict(result)

    def _reference_pool(self, sample: Sample) -> Callable[[bool], torch.Tensor]:
        """The reference's image path: every call runs the image encoder on the pool's pixels."""
        model = self.ctx.model
        if sample.has_image:
            gens = self.variations.load([sample.image_hash])[0]
            pixels = torch.cat([sample.views(self.view_set()), generated_views(model, gens)])
        else:
            pixels = sample.views(self.pool_set())

        def encode(original_only: bool) -> torch.Tensor:
            return model.encode_images(pixels[:1] if original_only else pixels, normalize=True).unsqueeze(0)

        return encode

    def run_info(self) -> dict:
        return {
            "difftpt": {
                "images": getattr(self, "images_tuned", 0),
                "generated_images": getattr(self, "generated_images", 0),
                "filter_mode": self.config.filter_mode,
                "reference_compute": self.config.reference_compute,
            }
        }
