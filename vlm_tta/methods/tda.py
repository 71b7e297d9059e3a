"""TDA, the Training-free Dynamic Adapter (Karmanov, Guan, Lu, El Saddik and Xing, "Efficient
Test-Time Adaptation of Vision-Language Models", CVPR 2024; code: kdiAAA/TDA).

An online, training-free method. Two per-class key-value caches are filled with pseudo-labelled
test features as the stream goes by: a **positive cache** keeps, for each predicted class, the
``pos_capacity`` (3) lowest-entropy features (value: the one-hot pseudo-label); a **negative cache**
keeps, for each predicted class, ``neg_capacity`` (2) features whose normalised entropy lies in a
window (0.2, 0.5) (value: the mask of classes with a small but non-zero probability, 0.03 < p < 1).
An image's logits are the zero-shot logits plus the positive cache's and minus the negative
cache's Tip-Adapter logits, ``alpha * sum_k exp(-beta (1 - f . k)) v_k``. Both caches are written
with the current image before it is scored (as the reference does).

With several views (ImageNet-A/V2/R/Sketch in the reference: the original + 63 ``augmix`` views) the
image is summarised by its ``int(0.1 V)`` lowest-entropy views: the feature is the mean of their unit
features, the logits the mean of their logits, the entropy that of their averaged probability.

Quirks of the reference that the defaults reproduce, and the options that change them:

* the entropy (in nats) is divided by ``log2(C)``, so the window (0.2, 0.5) lives in [0, ln 2]
  (``entropy_norm="log2"``); ``entropy_norm="ln"`` divides by ``ln C`` (a true [0, 1] scale);
* the multi-view feature is the mean of unit vectors, not re-normalised (``renormalize=False``);
  ``renormalize=True`` scales it back to unit length for the cache keys and affinities;
* the current image is written before it is scored (``order="write_first"``): it can match itself
  in the positive cache; ``order="predict_first"`` scores it with the caches of the images before it;
* the cache entropies kept for the replacement rule are the raw (nat) entropies; a full class slot
  is replaced only when the new entropy is strictly lower than the largest kept one;
* the reference keeps its caches in fp16 on the GPU; here all cache mathematics is fp32.

Per-dataset settings (``preset``, a :mod:`vlm_tta.data` name): the positive cache's (alpha, beta)
from the authors' ``configs/*.yaml``, and the views they use (1 view for ImageNet and the 10
cross-datasets; the original + 63 ``augmix`` views for ImageNet-A/V2/R/Sketch, issue #1 of the
repository). ``preset=None`` is ImageNet's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import MethodOptionError
from ..views import ViewSet
from .base import Method, Prediction, register_method
from .common import (
    KeyStore,
    affinity,
    blockwise,
    check_choice,
    check_int,
    check_number,
    check_view_features,
    confident_views,
    entropy,
    gather_views,
    marginal_entropy,
    n_confident,
    resolve_preset,
)

# Positive cache (alpha, beta) and views per dataset: kdiAAA/TDA ``configs/<dataset>.yaml`` and
# ``utils.build_test_data_loader`` (A/V/R/S: ``AugMixAugmenter(n_views=63, augmix=True)``).
_ONE_VIEW = ("original", 1)
_AUGMIX_64 = ("augmix", 64)
PRESETS: dict[str, dict] = {
    "imagenet": {"pos_alpha": 2.0, "pos_beta": 5.0, "views": _ONE_VIEW},
    "imagenet_a": {"pos_alpha": 2.0, "pos_beta": 5.0, "views": _AUGMIX_64},
    "imagenet_v2": {"pos_alpha": 1.0, "pos_beta": 8.0, "views": _AUGMIX_64},
    "imagenet_r": {"pos_alpha": 1.0, "pos_beta": 8.0, "views": _AUGMIX_64},
    "imagenet_sketch": {"pos_alpha": 2.363, "pos_beta": 7.45, "views": _AUGMIX_64},
    "caltech101": {"pos_alpha": 5.0, "pos_beta": 5.0, "views": _ONE_VIEW},
    "dtd": {"pos_alpha": 2.0, "pos_beta": 3.0, "views": _ONE_VIEW},
    "eurosat": {"pos_alpha": 4.0, "pos_beta": 8.0, "views": _ONE_VIEW},
    "fgvc_aircraft": {"pos_alpha": 2.0, "pos_beta": 2.0, "views": _ONE_VIEW},
    "food101": {"pos_alpha": 1.0, "pos_beta": 1.0, "views": _ONE_VIEW},
    "flowers102": {"pos_alpha": 1.0, "pos_beta": 5.0, "views": _ONE_VIEW},
    "oxford_pets": {"pos_alpha": 2.0, "pos_beta": 7.0, "views": _ONE_VIEW},
    "stanford_cars": {"pos_alpha": 1.0, "pos_beta": 7.0, "views": _ONE_VIEW},
    "sun397": {"pos_alpha": 2.0, "pos_beta": 3.0, "views": _ONE_VIEW},
    "ucf101": {"pos_alpha": 3.0, "pos_beta": 8.0, "views": _ONE_VIEW},
}
ENTROPY_NORMS = ("log2", "ln")
ORDERS = ("write_first", "predict_first")


@dataclass
class TDAConfig:
    #: dataset whose settings to use (a vlm_tta.data name or alias, e.g. "imagenet_a", "dtd");
    #: None = ImageNet's. Sets pos_alpha, pos_beta and the views unless those are given.
    preset: str | None = None
    pos_alpha: float | None = None  # None: the preset's (ImageNet 2.0); configs/*.yaml positive.alpha
    pos_beta: float | None = None  # None: the preset's (ImageNet 5.0); configs/*.yaml positive.beta
    pos_capacity: int = 3  # configs/*.yaml positive.shot_capacity (all datasets)
    neg_alpha: float = 0.117  # configs/*.yaml negative.alpha (all datasets)
    neg_beta: float = 1.0  # configs/*.yaml negative.beta
    neg_capacity: int = 2  # configs/*.yaml negative.shot_capacity
    neg_entropy_window: tuple[float, float] = (0.2, 0.5)  # configs/*.yaml negative.entropy_threshold (open)
    neg_mask: tuple[float, float] = (0.03, 1.0)  # configs/*.yaml negative.mask_threshold (open interval)
    positive: bool = True  # configs/*.yaml positive.enabled
    negative: bool = True  # configs/*.yaml negative.enabled
    #: "log2": entropy (nats) / log2(C), the reference's utils.get_entropy; "ln": / ln(C), in [0, 1]
    entropy_norm: str = "log2"
    selection_p: float = 0.1  # utils.get_clip_logits: int(0.1 V) lowest-entropy views
    n_views: int | None = None  # None: the preset's (1, or 64 for ImageNet-A/V2/R/Sketch)
    view_recipe: str | None = None  # None: "original" for 1 view, else "augmix" (TPT's AugMix)
    view_seed: int = 0  # seed of the random views
    renormalize: bool = False  # re-normalise the multi-view mean feature (reference: no)
    #: "write_first": caches are written with the image before it is scored (reference);
    #: "predict_first": scored with the caches of the earlier images, then written
    order: str = "write_first"

    def __post_init__(self) -> None:
        preset = resolve_preset(PRESETS, self.preset, "imagenet", "TDA")
        for name in ("pos_alpha", "pos_beta", "neg_alpha", "neg_beta"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name))
        check_int("pos_capacity", self.pos_capacity, 1)
        check_int("neg_capacity", self.neg_capacity, 1)
        for name in ("neg_entropy_window", "neg_mask"):
            lo, hi = getattr(self, name)
            if not lo < hi:
                raise MethodOptionError(f"{name} must be (lower, upper) with lower < upper; got {(lo, hi)}")
        check_choice("entropy_norm", self.entropy_norm, ENTROPY_NORMS)
        check_choice("order", self.order, ORDERS)
        if not 0 < self.selection_p <= 1:
            raise MethodOptionError(f"selection_p must be in (0, 1]; got {self.selection_p}")
        n_views = self.n_views if self.n_views is not None else preset["views"][1]
        check_int("n_views", n_views, 1)
        if n_views > 1:
            n_confident(n_views, self.selection_p)  # raises when the selection would be empty

    @property
    def settings(self) -> dict:
        """The resolved positive-cache (alpha, beta) and views: the options, else the preset's."""
        preset = resolve_preset(PRESETS, self.preset, "imagenet", "TDA")
        n_views = self.n_views if self.n_views is not None else preset["views"][1]
        recipe = self.view_recipe or ("original" if n_views == 1 else "augmix")
        return {
            "pos_alpha": preset["pos_alpha"] if self.pos_alpha is None else self.pos_alpha,
            "pos_beta": preset["pos_beta"] if self.pos_beta is None else self.pos_beta,
            "view_set": ViewSet(recipe, n_views, self.view_seed),
        }


class ClassCache:
    """TDA's per-class cache: for each class at most ``capacity`` (feature, entropy[, value]) items,
    kept sorted by entropy. A new item is appended while the class has room; a full class replaces
    its highest-entropy item when the new entropy is strictly lower, else the item is dropped
    (the reference's ``update_cache``). Keys live in a :class:`KeyStore` (one row per item)."""

    def __init__(self, dim: int, capacity: int, value_dim: int = 0) -> None:
        self.capacity = capacity
        self.store = KeyStore(dim, value_dim)
        self.items: dict[int, list[tuple[float, int]]] = {}  # class -> [(entropy, row)], sorted

    def __len__(self) -> int:
        return self.store.n

    def update(self, cls: int, key: torch.Tensor, ent: float, value: torch.Tensor | None = None) -> bool:
        """Offer an item to class ``cls``; returns whether it was stored."""
        items = self.items.setdefault(cls, [])
        if len(items) < self.capacity:
            items.append((ent, self.store.add(key, cls, value)))
        elif ent < items[-1][0]:
            row = items[-1][1]
            self.store.set(row, key, value)
            items[-1] = (ent, row)
        else:
            return False
        items.sort(key=lambda item: item[0])  # stable, like the reference's sorted()
        return True


@register_method("tda")
class TDA(Method):
    """Training-free Dynamic Adapter: positive and negative per-class caches of test features."""

    config_class = TDAConfig
    episodic = False

    def view_set(self) -> ViewSet:
        return self.config.settings["view_set"]

    def reset(self) -> None:
        c, d = self.ctx.class_features.shape
        self.settings = self.config.settings
        self.pos_cache = ClassCache(d, self.config.pos_capacity)
        self.neg_cache = ClassCache(d, self.config.neg_capacity, value_dim=c)

    def summarize_views(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """What TDA keeps of each image (N x V x D -> per image): the feature, logits, entropy (nats),
        probability map and pseudo-label (``utils.get_clip_logits``); vectorised over images."""
        logits = self.ctx.logits(features)  # N x V x C
        s = blockwise(self.summarize_block, features, logits, per_image=logits.shape[1] * logits.shape[2])
        if self.config.renormalize:
            s["feature"] = torch.nn.functional.normalize(s["feature"], dim=-1)
        s["label"] = s["logits"].argmax(-1)
        return s

    def summarize_block(self, features: torch.Tensor, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`summarize_views` of a block of images, given their views' logits (exact per image)."""
        if features.shape[1] == 1:
            feat, out = features[:, 0], logits[:, 0]
            ent, prob = entropy(out), out.softmax(-1)
        else:
            keep = confident_views(logits, self.config.selection_p)  # N x k, lowest entropy first
            kept = gather_views(logits, keep)
            feat, out = gather_views(features, keep).mean(1), kept.mean(1)
            ent, prob = marginal_entropy(kept), kept.softmax(-1).mean(1)
        return {"feature": feat, "logits": out, "entropy": ent, "prob": prob}

    def normalized_entropy(self, ent: torch.Tensor) -> torch.Tensor:
        c = self.ctx.class_features.shape[0]
        return ent / (math.log2(c) if self.config.entropy_norm == "log2" else math.log(c))

    def write(self, feature: torch.Tensor, label: int, ent: float, norm_ent: float, prob: torch.Tensor) -> None:
        """Offer one image to both caches (``run_test_tda``'s two ``update_cache`` calls)."""
        cfg = self.config
        if cfg.positive:
            self.pos_cache.update(label, feature, ent)
        lo, hi = cfg.neg_entropy_window
        if cfg.negative and lo < norm_ent < hi:
            mask = ((prob > cfg.neg_mask[0]) & (prob < cfg.neg_mask[1])).float()
            self.neg_cache.update(label, feature, ent, mask)

    def cache_logits(self, inclusive: bool) -> torch.Tensor:
        """Positive minus negative cache logits (N x C) of the batch whose writes were just made: image
        ``i`` reads the caches as they were after the writes of images ``<= i`` (``inclusive``) or
        ``< i``. The writes never depend on these logits, so the caches are written first and read
        once for the whole batch (:meth:`KeyStore.versions`)."""
        cfg, settings = self.config, self.settings
        n = len(self.pos_cache.store._queries)
        out = torch.zeros(n, self.ctx.class_features.shape[0])
        if cfg.positive and len(self.pos_cache):
            store = self.pos_cache.store
            sims, rows, visible, _ = store.versions(inclusive)
            w = torch.where(visible, affinity(sims, settings["pos_beta"]), 0.0)
            out.scatter_add_(1, store.tags[rows].expand(n, -1), settings["pos_alpha"] * w)
        if cfg.negative and len(self.neg_cache):
            sims, _, visible, values = self.neg_cache.store.versions(inclusive)
            w = torch.where(visible, affinity(sims, cfg.neg_beta), 0.0)
            out -= cfg.neg_alpha * (w @ values)
        return out

    def predict_batch(self, features: torch.Tensor) -> list[Prediction]:
        features = check_view_features(features, self.view_set().n_views, self.name)
        s = self.summarize_views(features)
        norm_ent = self.normalized_entropy(s["entropy"])
        stores = (self.pos_cache.store, self.neg_cache.store)
        for store in stores:
            store.begin(s["feature"], versions=True)
        labels, ents, norm_ents = s["label"].tolist(), s["entropy"].tolist(), norm_ent.tolist()
        for i in range(len(features)):  # the writes, in stream order (they read nothing)
            for store in stores:
                store.clock = i
            self.write(s["feature"][i], labels[i], ents[i], norm_ents[i], s["prob"][i])
        out = s["logits"] + self.cache_logits(inclusive=self.config.order == "write_first")
        scores = out.softmax(-1).max(-1).values.tolist()
        return [Prediction(out[i], scores[i]) for i in range(len(out))]

    def predict_features(self, features: torch.Tensor) -> Prediction:
        return self.predict_batch(features.unsqueeze(0))[0]

    def run_info(self) -> dict:
        return {"tda_cache_entries": {"positive": len(self.pos_cache), "negative": len(self.neg_cache)}}
