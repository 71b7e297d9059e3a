"""DMN, Dual Memory Networks (Zhang, Zhu, Tang, Ma, Zhou and Zhang, "Dual Memory Networks: A
Versatile Adaptation Approach for Vision-Language Models", CVPR 2024; code: YBZh/DMN, ``dmn_main.py``
and ``clip/fix_clip.py``).

Every class owns a memory of image features that a test image *reads* with a sharpened-cosine
attention: the weights ``exp(-beta (1 - q . k))`` over the class's slots build a sample-adaptive
class prototype ``normalise(sum_j w_j v_j)``, and ``logit_scale * q . prototype`` is that class's
logit. The **dynamic memory** (DMN-ZS) holds up to ``memory_size`` (50) test features per class plus
the class's text embedding as an extra slot. Each test image is seen through 32 views; the mean
probability of its ``int(0.1 V)`` most confident views gives a pseudo-label and an entropy; the
*original* view's feature is written to the pseudo-label's memory (appended while there is room,
else it replaces the slot with the largest stored entropy if its own entropy is smaller, else it is
discarded), then the memory is read. The output sums **probabilities**: the text classifier's on the
original view + ``alpha2`` x the dynamic memory's (+ ``alpha3`` x the static memory's). With
labelled support images (few-shot, DMN-TF) a **static memory** of their features (and the text
embedding) is read the same way, and the support images' original views also join the dynamic
memory's fixed slots. The trained variant (DMN, ``train=True``) learns zero-initialised biases of
the query, keys, values, output and text embeddings on the support set (AdamW, cosine schedule).

Reference behaviour reproduced by default, with the options that change it:

* the current image is written before its memory is read (``order="write_first"``), so an admitted
  image matches itself with weight 1; ``order="predict_first"`` reads the memory of the earlier images;
* views are ranked by ``-sum p log(p + 1e-6)`` and the pseudo-label's entropy is
  ``-sum p log(p + 1e-8)`` of the mean probability of the kept views (probabilities, not logits);
* the fusion weights: the paper picks them *after the run* by searching a grid on the test labels
  (issue #2). Here ``alpha2`` (dynamic) and ``alpha3`` (static) are fixed options, 1.0 by default
  (as the fair re-implementations use); :func:`search_fusion_weights_on_test_labels` reproduces the
  search as an evaluation helper (it reads test labels: never a method's default). The authors'
  searched ``alpha2`` for zero-shot ViT-B/16 (``camera_ready_dmn_tf_*_0.txt``): ImageNet 1,
  Flowers 10, DTD 10, Pets 1, Cars 0.3, UCF101 0.3, Caltech101 0.3, Food101 0.3, SUN397 3,
  Aircraft 1, EuroSAT 0.3; ImageNet-A 3, -V2 1, -R 0.3, -Sketch 1;
* ``probs`` of the result are the fused probabilities divided by ``1 + alpha2 (+ alpha3)`` (the
  reference's sum, normalised; the argmax is the same); ``score`` is their maximum;
* views: ``crop_flip_dmn`` (RandomResizedCrop with scale (0.5, 1) + flip) for the ImageNet family,
  ``augmix_dmn`` (the same crop, then TPT's AugMix) for the fine-grained datasets (``preset``);
* the reference keeps the memory in the model's dtype on the GPU; here everything is fp32, and the
  read-out is computed exactly through each class's Gram matrix instead of forming the prototypes
  (``num / sqrt(w^T G w)``; the trained variant, whose keys and values differ, forms them).

Few-shot support (DMN-TF, DMN): on images, ``support`` names a :mod:`vlm_tta.data` dataset (with
``support_root`` and ``support_split``, default ``train``) or a folder with one sub-folder per class;
``shots`` images per class are drawn from it (:func:`vlm_tta.data.few_shot`, ``support_seed``) and
encoded through the shared cache: ``support_views`` views each (1 = the original only, the
reference's ``--n_augview 0``; more adds ``crop_flip_dmn`` views, its ``AugMemAugmenter``). On
embeddings, ``classify_features`` passes the support set through the context's extras:
``support_features`` (K x D or K x V x D, view 0 = original) and ``support_labels`` (K class indices).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import trange

from ..errors import MethodOptionError
from ..views import ViewSet
from .base import Method, MethodContext, Prediction, register_method
from .common import (
    KeyStore,
    affinity,
    blockwise,
    check_choice,
    check_int,
    check_number,
    check_view_features,
    gather_views,
    lowest,
    n_confident,
    prob_entropy,
    probs_to_logits,
    resolve_preset,
)

# Views per dataset: dmn_main.py builds AugMixAugmenter(..., augmix=len(set_id) > 1), i.e. crops and
# flips only for the ImageNet family (ids I/A/V/R/K) and AugMix on top for the fine-grained sets.
# Training (DMN with --ft): get_searched_param's learning rate and epochs ("lr_8", "epochs_8": from
# 8 shots on).
_IMAGENET = {"views": "crop_flip_dmn", "lr": 1e-5, "epochs": 100}
PRESETS: dict[str, dict] = {
    "imagenet": _IMAGENET,
    "imagenet_a": _IMAGENET,
    "imagenet_v2": _IMAGENET,
    "imagenet_r": _IMAGENET,
    "imagenet_sketch": _IMAGENET,
    "flowers102": {"views": "augmix_dmn", "lr": 1e-3, "epochs": 100},
    "dtd": {"views": "augmix_dmn", "lr": 1e-4, "epochs": 100},
    "oxford_pets": {"views": "augmix_dmn", "lr": 1e-4, "epochs": 20},
    "stanford_cars": {"views": "augmix_dmn", "lr": 1e-4, "epochs": 100},
    "ucf101": {"views": "augmix_dmn", "lr": 1e-4, "epochs": 100},
    "caltech101": {"views": "augmix_dmn", "lr": 1e-4, "epochs": 20},
    "food101": {"views": "augmix_dmn", "lr": 1e-4, "epochs": 20, "epochs_8": 100},
    "sun397": {"views": "augmix_dmn", "lr": 1e-4, "epochs": 20},
    "fgvc_aircraft": {"views": "augmix_dmn", "lr": 1e-4, "epochs": 100},
    "eurosat": {"views": "augmix_dmn", "lr": 1e-4, "epochs": 100, "lr_8": 1e-3},
}
ORDERS = ("write_first", "predict_first")
#: The reference's search grid for the fusion weights (``direct_inference``).
FUSION_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


@dataclass
class DMNConfig:
    #: dataset whose settings to use (a vlm_tta.data name or alias): the view recipe and, for
    #: train=True, the authors' searched learning rate and epochs. None = ImageNet's.
    preset: str | None = None
    n_views: int = 32  # scripts/run.sh: -b 32 (the original + 31 views)
    view_recipe: str | None = None  # None: the preset's ("crop_flip_dmn"; "augmix_dmn" for fine-grained sets)
    view_seed: int = 0  # seed of the random views
    selection_p: float = 0.1  # scripts/run.sh: --selection_p 0.1, int(0.1 V) most confident views
    memory_size: int = 50  # scripts/run.sh: --memory_size 50 slots per class
    beta: float = 5.5  # scripts/run.sh: --beta 5.5, sharpness of the read-out
    alpha2: float = 1.0  # weight of the dynamic memory (reference: searched on test labels; TTA-VLM: 1.0)
    alpha3: float = 1.0  # weight of the static memory, few-shot only (reference: searched on test labels)
    #: "write_first": the image is written to the memory before it is read (reference);
    #: "predict_first": read the memory of the earlier images, then write
    order: str = "write_first"
    shots: int = 0  # support images per class for the static memory (0: all of `support`; DMN-ZS without it)
    support: str | None = None  # a vlm_tta.data dataset name (with support_root) or a class-per-folder path
    support_root: str | None = None  # where the `support` dataset lives
    support_split: str = "train"  # dmn_main.py: build_dataset(..., mode='train', n_shot=...)
    support_seed: int = 0  # seed of the few-shot draw
    support_views: int = 1  # views per support image in the static memory (reference --n_augview 0: 1)
    train: bool = False  # learn the zero-initialised biases (DMN, --ft); False: training-free DMN-TF
    train_lr: float | None = None  # None: the preset's searched value (ImageNet 1e-5)
    train_epochs: int | None = None  # None: the preset's searched value (ImageNet 100)
    train_batch_size: int = 128  # dmn_main.py: min(128, number of support images)
    train_weight_decay: float = 1e-4  # dmn_main.py --wd
    train_eps: float = 1e-8  # dmn_main.py --eps (AdamW)
    #: random crop+flip views per support image that training cycles through, one per epoch (the
    #: reference draws a fresh crop every epoch)
    train_views: int = 16
    train_seed: int = 0  # seed of the training batches' order
    record_components: bool = False  # keep each image's text/dynamic/static probabilities (components())

    def __post_init__(self) -> None:
        resolve_preset(PRESETS, self.preset, "imagenet", "DMN")
        for name in ("n_views", "memory_size", "support_views", "train_batch_size", "train_views"):
            check_int(name, getattr(self, name), 1)
        check_int("shots", self.shots, 0)
        if not 0 < self.selection_p <= 1:
            raise MethodOptionError(f"selection_p must be in (0, 1]; got {self.selection_p}")
        n_confident(self.n_views, self.selection_p)  # raises when no view would be kept
        for name in ("beta", "alpha2", "alpha3", "train_weight_decay", "train_eps"):
            check_number(name, getattr(self, name))
        if self.train_lr is not None:
            check_number("train_lr", self.train_lr, 1e-12)
        if self.train_epochs is not None:
            check_int("train_epochs", self.train_epochs, 1)
        check_choice("order", self.order, ORDERS)
        self.views()  # validates the view recipe

    def views(self) -> ViewSet:
        recipe = self.view_recipe or resolve_preset(PRESETS, self.preset, "imagenet", "DMN")["views"]
        return ViewSet(recipe if self.n_views > 1 else "original", self.n_views, self.view_seed)

    def training_schedule(self, shots: int) -> tuple[float, int]:
        """(learning rate, epochs): the options, else the preset's searched values for ``shots``."""
        p = resolve_preset(PRESETS, self.preset, "imagenet", "DMN")
        lr = p.get("lr_8", p["lr"]) if shots >= 8 else p["lr"]
        epochs = p.get("epochs_8", p["epochs"]) if shots >= 8 else p["epochs"]
        return (self.train_lr or lr, self.train_epochs or epochs)


# ------------------------------------------------------------------------------ memory read-out
def gram_readout(sims: torch.Tensor, gram: torch.Tensor, beta: float, scale: float) -> torch.Tensor:
    """Memory read-out logits from similarities, exactly (training-free keys = values).

    ``sims``: ``... x C x S`` dot products of the (unit) query with each class's slots (0 for an
    empty slot); ``gram``: ``C x S x S`` dot products between each class's slots (0 rows/columns for
    empty slots). With ``w = exp(-beta (1 - s))`` the prototype ``P = sum_j w_j v_j`` has
    ``q . P = sum_j w_j s_j`` and ``|P|^2 = w^T G w``, so the logit ``scale * q . P / |P|`` needs no
    D-dimensional prototype. Empty slots add nothing (their ``s`` and Gram entries are 0).
    """
    w = affinity(sims, beta)
    num = (w * sims).sum(-1)
    if sims.ndim == 2:
        den2 = (torch.bmm(w.unsqueeze(1), gram).squeeze(1) * w).sum(-1)
    else:
        den2 = torch.einsum("...cs,cst,...ct->...c", w, gram, w)
    return scale * num / den2.clamp(min=0).sqrt()


class DMNBiases(torch.nn.Module):
    """The trained DMN's zero-initialised biases (``DualMem`` with ``--mapping bias --position all``):
    per class, added to the query (their mean over classes), the keys, the values, the read-out's
    output and the text embedding."""

    def __init__(self, n_classes: int, dim: int) -> None:
        super().__init__()
        for name in ("query", "key", "value", "output", "text"):
            self.register_parameter(name, torch.nn.Parameter(torch.zeros(n_classes, dim)))

    def text_features(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(text + self.text, dim=-1)


def direct_readout(
    query: torch.Tensor,
    slots: torch.Tensor,
    filled: torch.Tensor,
    beta: float,
    scale: float,
    biases: DMNBiases | None = None,
) -> torch.Tensor:
    """Memory read-out logits (B x C) of unit queries (B x D) against ``slots`` (C x S x D; ``filled``
    C x S marks the slots in use), forming each class's prototype as the reference does
    (``DualMem.get_image_pred``): keys and values are the slots plus the class's key/value bias,
    normalised (empty slots zeroed); the query plus the mean query bias, normalised; the prototype
    ``normalise(sum_j exp(-beta (1 - q' . k_j)) v_j)``, plus the output bias, normalised again; the
    logit is ``scale`` times its dot product with the *original* query. Differentiable."""
    keys = values = slots
    mapped = query
    if biases is not None:
        mapped = query + biases.query.mean(0, keepdim=True)
        keys = slots + biases.key.unsqueeze(1)
        values = slots + biases.value.unsqueeze(1)
    mask = filled.unsqueeze(-1).to(slots.dtype)
    keys, values = F.normalize(keys, dim=-1) * mask, F.normalize(values, dim=-1) * mask
    sims = torch.einsum("bd,csd->bcs", F.normalize(mapped, dim=-1), keys)
    proto = F.normalize(torch.einsum("bcs,csd->bcd", affinity(sims, beta), values), dim=-1)
    if biases is not None:
        proto = F.normalize(proto + biases.output.unsqueeze(0), dim=-1)
    return scale * torch.einsum("bcd,bd->bc", proto, query)


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def class_slots(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group rows of ``features`` (K x D) by ``labels`` into ``C x k_max x D`` slots in input order,
    padded with zeros; returns the slots and the C x k_max mask of filled ones."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=n_classes)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(labels)) - start[labels[order]]
    k = int(counts.max()) if len(labels) else 0
    slots = features.new_zeros(n_classes, k, features.shape[-1])
    filled = torch.zeros(n_classes, k, dtype=torch.bool)
    slots[labels[order], rank] = features[order]
    filled[labels[order], rank] = True
    return slots, filled


def gram(slots: torch.Tensor) -> torch.Tensor:
    """``C x S x S`` dot products between each class's slots."""
    return torch.bmm(slots, slots.transpose(1, 2))


@register_method("dmn", "dmn-zs", "dmn-tf")
class DMN(Method):
    """Dual Memory Networks: a dynamic memory of test features (+ a static one of labelled shots)."""

    config_class = DMNConfig
    episodic = False

    def view_set(self) -> ViewSet:
        return self.config.views()

    # ------------------------------------------------------------------ set-up (data, not state)
    def setup(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        cfg = self.config
        support = self.load_support()
        self.biases: DMNBiases | None = None
        text = ctx.class_features.float()
        c = len(text)
        self.text = text
        if support is None:
            self.fixed, self.fixed_filled = text.unsqueeze(1), torch.ones(c, 1, dtype=torch.bool)
            self.static = None
        else:
            feats, labels = support
            vanilla, vanilla_filled = class_slots(feats[:, 0], labels, c)
            # static memory: [text, every view of every support image]; dynamic fixed slots: [text, originals]
            views = feats[:, : cfg.support_views].reshape(-1, feats.shape[-1])
            shots, shots_filled = class_slots(views, labels.repeat_interleave(cfg.support_views), c)
            ones = torch.ones(c, 1, dtype=torch.bool)
            self.fixed = torch.cat([text.unsqueeze(1), vanilla], 1)
            self.fixed_filled = torch.cat([ones, vanilla_filled], 1)
            self.static = torch.cat([text.unsqueeze(1), shots], 1)
            self.static_filled = torch.cat([ones, shots_filled], 1)
            self.static_gram = gram(self.static)
            if cfg.train:
                self.biases = self.train_biases(feats, labels)
        self.text_classifier = text if self.biases is None else self.biases.text_features(text).detach()
        self.reset()

    def load_support(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The labelled support set (features K x V x D normalised, labels K), or None (DMN-ZS)."""
        cfg, ctx = self.config, self.ctx
        extras = ctx.extras or {}
        c = ctx.class_features.shape[0]
        if extras.get("support_features") is not None:
            feats = _as_tensor(extras["support_features"]).float()
            labels = _as_tensor(extras.get("support_labels", [])).long().reshape(-1)
            if feats.ndim == 2:
                feats = feats.unsqueeze(1)
            if feats.ndim != 3 or len(feats) != len(labels) or len(feats) == 0:
                raise MethodOptionError(
                    f"support_features must be K x D or K x V x D with K = len(support_labels) > 0; got features "
                    f"of shape {tuple(feats.shape)} and {len(labels)} labels"
                )
        elif cfg.support is not None:
            feats, labels = self.encode_support()
        else:
            if cfg.shots or cfg.train:
                raise MethodOptionError(
                    "few-shot DMN needs a support set: support=<dataset name or folder> on images, or "
                    "support_features= and support_labels= with classify_features"
                )
            return None
        if not torch.isfinite(feats).all():
            raise MethodOptionError("support_features contain NaN or infinite values")
        if labels.min() < 0 or labels.max() >= c:
            raise MethodOptionError(f"support_labels must be class indices in 0..{c - 1}")
        if feats.shape[1] < cfg.support_views:
            raise MethodOptionError(
                f"support_views={cfg.support_views} but the support features have {feats.shape[1]} view(s)"
            )
        return F.normalize(feats, dim=-1), labels

    def encode_support(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``shots`` support images per class and encode their views through the shared cache."""
        from ..data import ImageFolderDataset, few_shot, get_dataset

        cfg, ctx = self.config, self.ctx
        if ctx.store is None:
            raise MethodOptionError(
                "support= needs the images' encoder (classify); on embeddings pass support_features= and "
                "support_labels= to classify_features"
            )
        if cfg.support_root is None and os.path.isdir(cfg.support):
            dataset = ImageFolderDataset(cfg.support)
        elif cfg.support_root is None:
            raise MethodOptionError(
                f"support={cfg.support!r} is not a folder; for a built-in dataset also give support_root="
            )
        else:
            dataset = get_dataset(cfg.support, cfg.support_root, split=cfg.support_split)
        if cfg.shots:
            dataset = few_shot(dataset, cfg.shots, cfg.support_seed)
        c = ctx.class_features.shape[0]
        if len(dataset.classnames) != c:
            raise MethodOptionError(f"the support set has {len(dataset.classnames)} classes but there are {c} classes")
        if ctx.classnames is not None:
            norm = [str(n).lower().replace("_", " ") for n in ctx.classnames]
            diff = [(a, b) for a, b in zip(dataset.classnames, norm) if a.lower().replace("_", " ") != b]
            if diff:
                warnings.warn(
                    f"support class names differ from the classes, e.g. {diff[0]}; labels are matched by index",
                    stacklevel=2,
                )
        n_views = max(cfg.support_views, 1 + cfg.train_views if cfg.train else 1)
        view_set = ViewSet("crop_flip_dmn" if n_views > 1 else "original", n_views, cfg.view_seed)
        images = ctx.store.open_images(dataset.paths)
        return ctx.store.view_features(images, view_set), torch.as_tensor(dataset.labels).long()

    def train_biases(self, feats: torch.Tensor, labels: torch.Tensor) -> DMNBiases:
        """Learn the zero-initialised biases on the support set (``direct_inference`` with ``--ft``):
        AdamW, cosine schedule to 1e-7 over all steps, cross-entropy of the static memory's logits
        plus that of the text classifier's, in shuffled batches; epoch ``e`` reads each image's
        crop ``1 + e mod train_views`` (the original view when there are no crops)."""
        cfg = self.config
        c, d = self.text.shape
        shots = int(torch.bincount(labels, minlength=c).max())
        lr, epochs = cfg.training_schedule(shots)
        biases = DMNBiases(c, d)
        opt = torch.optim.AdamW(biases.parameters(), lr=lr, eps=cfg.train_eps, weight_decay=cfg.train_weight_decay)
        batch = min(cfg.train_batch_size, len(labels))
        steps = math.ceil(len(labels) / batch)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps, eta_min=1e-7)
        gen = torch.Generator().manual_seed(cfg.train_seed)
        n_crops = min(feats.shape[1] - 1, cfg.train_views)
        scale = self.ctx.logit_scale
        with torch.enable_grad():
            for epoch in trange(epochs, desc="DMN training", unit="epoch", disable=len(labels) * epochs < 100_000):
                view = feats[:, 1 + epoch % n_crops] if n_crops > 0 else feats[:, 0]
                order = torch.randperm(len(labels), generator=gen)
                for step in range(steps):
                    idx = order[step * batch : (step + 1) * batch]
                    q, y = view[idx], labels[idx]
                    static = direct_readout(q, self.static, self.static_filled, cfg.beta, scale, biases)
                    text = scale * q @ biases.text_features(self.text).T
                    loss = F.cross_entropy(static, y) + F.cross_entropy(text, y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
        for p in biases.parameters():
            p.requires_grad_(False)
        return biases

    # ------------------------------------------------------------------ stream state
    def reset(self) -> None:
        c, d = self.text.shape
        f = self.fixed.shape[1]
        self.n_slots = f + self.config.memory_size  # per class: fixed slots, then the dynamic memory
        self.store = KeyStore(d, capacity=c * (f + 4))
        self.slot_row = torch.full((c, self.n_slots), -1, dtype=torch.long)
        cls, slot = self.fixed_filled.nonzero(as_tuple=True)
        self.slot_row[cls, slot] = self.store.extend(self.fixed[cls, slot], cls * self.n_slots + slot)
        # Gram matrices of each class's slots, only as wide as the fullest class (slots are filled in
        # order, so every class's filled slots lie in it): contiguous, which bmm reads ~3x faster.
        self.gram = gram(self.fixed)
        self.count = torch.zeros(c, dtype=torch.long)
        self.entropy = torch.zeros(c, self.config.memory_size)
        self.dense = self.fixed.new_zeros(c, self.n_slots, d) if self.biases is not None else None
        if self.dense is not None:
            self.dense[:, :f] = self.fixed
        self._components: dict[str, list[torch.Tensor]] = {"text": [], "dynamic": [], "static": []}

    # ------------------------------------------------------------------ prediction
    def pseudo_labels(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per image (vectorised): the text probabilities of every view, and the pseudo-label and
        entropy of the mean probability of the most confident views."""
        logits = self.ctx.logit_scale * features @ self.text_classifier.T  # N x V x C
        return blockwise(self.pseudo_label_block, logits, per_image=logits.shape[1] * logits.shape[2])

    def pseudo_label_block(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`pseudo_labels` of a block of images, given their views' logits (exact per image)."""
        probs = logits.softmax(-1)
        keep = lowest(prob_entropy(probs, 1e-6), self.config.selection_p)
        mean = gather_views(probs, keep).mean(1)
        return {"text": probs[:, 0], "label": mean.argmax(-1), "entropy": prob_entropy(mean, 1e-8)}

    def write(self, query: torch.Tensor, cls: int, ent: float, before: list | None = None) -> bool:
        """Offer the original view's feature to class ``cls``'s dynamic memory (``update_memory_bank``);
        returns whether it was stored. ``before``: where to append the class's memory as it was before
        this write, ``(keys m x D, gram m x m)``, when it changes."""
        f, n = self.fixed.shape[1], int(self.count[cls])
        if n >= self.config.memory_size:
            stored = self.entropy[cls]
            if not bool((ent < stored).any()):
                return False  # more uncertain than everything stored: discarded
        if before is not None:
            before.append(self.class_memory(cls))
        if n < self.config.memory_size:
            slot = n
            self.count[cls] += 1
            self.slot_row[cls, f + slot] = self.store.add(query, cls * self.n_slots + f + slot)
        else:
            slot = int(torch.sort(stored, stable=True).indices[-1])  # the largest stored entropy
            self.store.set(int(self.slot_row[cls, f + slot]), query)
        self.entropy[cls, slot] = ent
        m = f + int(self.count.max())
        if m > self.gram.shape[1]:
            self.gram = F.pad(self.gram, (0, m - self.gram.shape[1], 0, m - self.gram.shape[1]))
        rows = self.slot_row[cls, :m]
        filled = rows >= 0
        g = torch.zeros(m)
        g[filled] = self.store.keys[rows[filled]] @ query
        self.gram[cls, f + slot, :] = g
        self.gram[cls, :, f + slot] = g
        if self.dense is not None:
            self.dense[cls, f + slot] = query
        return True

    def class_memory(self, cls: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Class ``cls``'s slots as they are now: keys (m x D, zero rows for empty slots) and Gram (m x m)."""
        rows = self.slot_row[cls, : self.gram.shape[1]]
        keys = self.store.keys.index_select(0, rows.clamp(min=0)).mul_((rows >= 0).unsqueeze(1))  # keys finite
        return keys, self.gram[cls].clone()

    def write_and_read(self, queries: torch.Tensor, labels: list[int], ents: list[float]) -> torch.Tensor:
        """The dynamic memory's logits (N x C) of a batch: image ``i`` reads the memory after the writes
        of images ``<= i`` (``write_first``) or ``< i``, exactly as a loop over the images would.

        The writes depend only on the pseudo-labels, never on what is read, so they are all made first;
        each class's memory as it was before each write is kept (a *version*: its keys, Gram matrix and
        the images that see it). Then one batched read-out against the final memory, one against the
        replaced versions, and each image takes its own version of each written class.
        """
        inclusive = self.config.order == "write_first"
        beta, scale = self.config.beta, self.ctx.logit_scale
        old: list[tuple[torch.Tensor, torch.Tensor]] = []
        old_cls, old_from, old_until = [], [], []
        written: dict[int, int] = {}  # class -> index of the image that wrote its current version
        shift = 0 if inclusive else 1
        for i, q in enumerate(queries):
            cls, n_old = labels[i], len(old)
            since = written.get(cls, -1)
            # keep the memory before this write only if some image reads it (i.e. not for the batch's
            # first image when it writes before it reads)
            if self.write(q, cls, ents[i], before=old if i + shift > max(0, since + shift) else None):
                if len(old) > n_old:
                    old_cls.append(cls)
                    old_from.append(since)
                    old_until.append(i)
                written[cls] = i
        # the final memory, for every image and class
        n, (c, m) = self.store.n, self.gram.shape[:2]
        tags = self.store.tags[:n]
        cls, slot = tags // self.n_slots, tags % self.n_slots
        sims = queries.new_zeros(len(queries), c * m)
        sims.index_copy_(1, cls * m + slot, queries @ self.store.keys[:n].T)
        logits = gram_readout(sims.view(-1, c, m), self.gram, beta, scale)
        if old:
            width = max(k.shape[0] for k, _ in old)
            keys = torch.stack([F.pad(k, (0, 0, 0, width - len(k))) for k, _ in old])  # E x w x D
            grams = torch.stack([F.pad(g, (0, width - len(g), 0, width - len(g))) for _, g in old])
            old_logits = gram_readout(torch.einsum("nd,esd->nes", queries, keys), grams, beta, scale)  # N x E
            i = torch.arange(len(queries)).unsqueeze(1)
            visible = (i >= torch.tensor(old_from) + shift) & (i < torch.tensor(old_until) + shift)
            ii, ee = visible.nonzero(as_tuple=True)
            logits[ii, torch.tensor(old_cls)[ee]] = old_logits[ii, ee]
        return logits

    def read_dynamic(self, i: int, query: torch.Tensor) -> torch.Tensor:
        """The dynamic memory's logits for image ``i`` of the batch being read."""
        beta, scale = self.config.beta, self.ctx.logit_scale
        m = self.gram.shape[1]  # slots beyond m are empty in every class
        if self.biases is not None:
            filled = self.slot_row[:, :m] >= 0
            return direct_readout(query[None], self.dense[:, :m], filled, beta, scale, self.biases)[0]
        c = self.text.shape[0]
        sims = torch.zeros(c * self.n_slots)
        sims[self.store.tags[: self.store.n]] = self.store.similarities(i)
        sims = sims.view(c, self.n_slots)[:, :m]
        return gram_readout(sims, self.gram, beta, scale)

    def read_static(self, queries: torch.Tensor) -> torch.Tensor:
        """The static memory's probabilities for a batch of queries (N x C)."""
        cfg, scale = self.config, self.ctx.logit_scale
        out = []
        for chunk in queries.split(16):
            if self.biases is not None:
                logits = direct_readout(chunk, self.static, self.static_filled, cfg.beta, scale, self.biases)
            else:
                sims = torch.einsum("nd,csd->ncs", chunk, self.static)
                logits = gram_readout(sims, self.static_gram, cfg.beta, scale)
            out.append(logits.softmax(-1))
        return torch.cat(out)

    def predict_batch(self, features: torch.Tensor) -> list[Prediction]:
        cfg = self.config
        features = check_view_features(features, cfg.n_views, self.name)
        queries = features[:, 0]
        pl = self.pseudo_labels(features)
        static = self.read_static(queries) if self.static is not None else None
        labels, ents = pl["label"].tolist(), pl["entropy"].tolist()
        if self.biases is None:  # training-free: write the batch, then read it at once
            dynamic = self.write_and_read(queries, labels, ents).softmax(-1)
        else:  # trained biases: keys and values differ, the prototypes are formed one image at a time
            self.store.begin(queries)
            rows = []
            for i, q in enumerate(queries):
                if cfg.order == "write_first":
                    self.write(q, labels[i], ents[i])
                rows.append(self.read_dynamic(i, q).softmax(-1))
                if cfg.order == "predict_first":
                    self.write(q, labels[i], ents[i])
            dynamic = torch.stack(rows)
        fused = pl["text"] + cfg.alpha2 * dynamic
        if static is not None:
            fused = fused + cfg.alpha3 * static
        if cfg.record_components:
            self._components["text"].extend(pl["text"])
            self._components["dynamic"].extend(dynamic)
            if static is not None:
                self._components["static"].extend(static)
        logits, scores = probs_to_logits(fused), (fused.max(-1).values / fused.sum(-1)).tolist()
        return [Prediction(logits[i], scores[i]) for i in range(len(fused))]

    def predict_features(self, features: torch.Tensor) -> Prediction:
        return self.predict_batch(features.unsqueeze(0))[0]

    def run_info(self) -> dict:
        return {"dmn_memory_entries": int(self.count.sum())}

    def components(self) -> dict[str, np.ndarray]:
        """Each image's probabilities so far (``record_components=True``): ``text`` (the original view's
        text classifier), ``dynamic`` and, with a support set, ``static``; N x C arrays in stream order."""
        if not self.config.record_components:
            raise MethodOptionError("create the method with record_components=True to keep the components")
        return {k: torch.stack(v).numpy() for k, v in self._components.items() if v}


def search_fusion_weights_on_test_labels(
    components: dict[str, np.ndarray],
    labels: Sequence[int] | np.ndarray,
    grid: Sequence[float] = FUSION_GRID,
) -> dict[str, float]:
    """The DMN paper's fusion-weight search, an **evaluation helper that reads the test labels**:
    for every ``alpha2`` (and ``alpha3`` when there is a static memory) in ``grid``, the accuracy of
    ``argmax(text + alpha2 dynamic + alpha3 static)``; returns the first best ``alpha2``, ``alpha3``
    (0.0 without a static memory) and its accuracy (a fraction). ``components`` comes from
    :meth:`DMN.components`. A result obtained this way is tuned on the test set: report it as such.
    """
    text = torch.as_tensor(components["text"]).double()
    dynamic = torch.as_tensor(components["dynamic"]).double()
    static = torch.as_tensor(components["static"]).double() if "static" in components else None
    y = torch.as_tensor(np.asarray(labels)).long()
    if len(y) != len(text):
        raise ValueError(f"{len(y)} labels for {len(text)} images")
    best = {"alpha2": 0.0, "alpha3": 0.0, "accuracy": -1.0}
    for a2 in grid:
        for a3 in grid if static is not None else (0.0,):
            fused = text + a2 * dynamic + (a3 * static if static is not None else 0.0)
            acc = float((fused.argmax(-1) == y).double().mean())
            if acc > best["accuracy"]:
                best = {"alpha2": float(a2), "alpha3": float(a3), "accuracy": acc}
    return best
