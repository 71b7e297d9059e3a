"""Test-time views: named, seeded view recipes.

A *view* is one model-ready image (a normalised ``3 x H x W`` float32 tensor at the backbone's input
size, with the backbone's mean/std) made from a test image. A *recipe* names how views are made;
a :class:`ViewSet` says which recipe, how many views and which seed. View ``i`` of an image is a
pure function of ``(recipe, seed, image content, i)``:

* view 0 is always the **original** view (the backbone's own resize + centre crop), shared by every
  recipe: its cache key is ``("original", VIEWS_VERSION)``;
* view ``i >= 1`` draws its randomness from generators seeded with
  ``sha256(f"{seed}|{image_hash}|{i}")`` (never from the global ``random``/``numpy``/``torch``
  RNGs), so it is the same whether 8 or 64 views are asked for, in any order, in any worker thread,
  on any machine with the same torch/torchvision/Pillow versions.

Recipes (see each function's docstring for the sources):

==================  ===========================================================================
``original``        the backbone's eval transform only (open_clip's ``image_transform``)
``crop_flip``       TPT's ImageNet views: RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3),
                    bilinear) to the model size + horizontal flip (p = 0.5), from the raw image
``augmix``          TPT's fine-grained views: ``crop_flip`` then AugMix (9 ops, severity 1, 3
                    chains of 1-3 ops, Dirichlet(1,1,1) chain weights, Beta(1,1) blend)
``crop_flip_dmn``   DMN's ImageNet views: RandomResizedCrop with scale (0.5, 1) + flip
``augmix_dmn``      DMN's fine-grained views: the (0.5, 1) crop + flip, then TPT's AugMix
``*_t``             the same four on batched tensors, on the model's device (the fast path, not
                    bit-identical to Pillow; own cache keys): :mod:`vlm_tta.tensor_views`
==================  ===========================================================================

Common random numbers: the crop/flip randomness of view ``i`` does not depend on the recipe's
name, so view ``i`` of ``augmix`` is view ``i`` of ``crop_flip`` with AugMix applied on top (and
``augmix_dmn`` is to ``crop_flip_dmn`` what ``augmix`` is to ``crop_flip``). Comparisons between
recipes therefore see the same crops; pick another ``seed`` for independent views.

Pixels go through Pillow exactly as in the reference code (TPT applies torchvision's transforms to
PIL images): crops are cut and resized with ``torchvision.transforms.functional`` on the PIL image
(bilinear with Pillow's antialiasing; a uint8-tensor path would be faster but differs from Pillow by
up to a few grey levels), AugMix ops are Pillow operations (integer translations as an exact array
shift), and ToTensor + Normalize is a per-channel lookup table computed with torchvision's own
float32 ops (bit-identical outputs). The per-view work is Pillow + numpy only: both release the
GIL, run single-threaded, and so scale over worker threads without fighting torch's OpenMP pool
for the cores (small OpenMP-parallel torch kernels were measured up to ~100x slower than
single-threaded numpy when the 2 cores are shared with other work).

Speed on 2 CPU cores (one 500x375 image, 64 views, 224 px): ``crop_flip`` ~60-90 ms serial,
~45-55 ms with 2 worker threads; ``augmix`` ~300 ms serial, ~200 ms with 2 threads. Threads beat
processes (which pay to pickle ~38 MB of float32 views per image back) at every setting measured.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode

from .errors import VlmTtaError
from .images import content_hash, load_image
from .models.base import PreprocessConfig

__all__ = [
    "AUGMIX_OPS",
    "UnknownViewRecipeError",
    "ViewRNG",
    "ViewSet",
    "augmix",
    "default_num_workers",
    "get_view_recipe",
    "list_view_recipes",
    "make_views",
    "original_view",
    "random_resized_crop_flip",
    "register_batch_view_recipe",
    "register_view_recipe",
    "sample_crop_params",
    "to_normalized_tensor",
]

RecipeFn = Callable[[Image.Image, PreprocessConfig, "ViewRNG"], torch.Tensor]
BatchRecipeFn = Callable[[Image.Image, PreprocessConfig, Sequence["ViewRNG"], torch.device], torch.Tensor]
OriginalFn = Callable[[Image.Image], torch.Tensor]

# torchvision's RandomResizedCrop defaults (used by TPT: ``transforms.RandomResizedCrop(224)``).
#: Part of every view's cache key: bump it when a recipe's output changes for the same seed and
#: image (a new sampler, another interpolation), so stale cached embeddings are never reused.
VIEWS_VERSION = 1

#: views per cache row: an image's 63 augmented views are read as 4 rows, not 63 (on a warm cache,
#: reading rows, not the methods, bounded the benchmark runner's speed)
VIEW_BLOCK = 16


def view_blocks(n_views: int) -> list[tuple[int, int]]:
    """``(start, count)`` of the cache rows that hold views ``0 .. n_views - 1``: the original alone
    (it is shared by every recipe and seed), then blocks of :data:`VIEW_BLOCK` views from view 1, the
    last one shorter. Blocks start at the same places whatever ``n_views`` is, so 32 and 64 views of
    one recipe share their full blocks."""
    blocks = [(0, 1)]
    start = 1
    while start < n_views:
        count = min(VIEW_BLOCK, n_views - start)
        blocks.append((start, count))
        start += count
    return blocks


DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# DMN (Zhang et al., CVPR 2024) crops with scale (0.5, 1).
DMN_SCALE = (0.5, 1.0)
#: torchvision's RandomHorizontalFlip default (TPT: ``transforms.RandomHorizontalFlip()``).
FLIP_P = 0.5
#: TPT's AugMix: severity 1, 3 chains of 1-3 ops (azshue/TPT ``augmix(..., severity=1)``).
AUGMIX_SEVERITY = 1.0
AUGMIX_WIDTH = 3
AUGMIX_MAX_DEPTH = 3


class UnknownViewRecipeError(VlmTtaError, ValueError):
    """A view recipe name is not registered."""


# --------------------------------------------------------------------------------------- registry
_RECIPES: dict[str, RecipeFn] = {}
_REGISTRY_LOCK = threading.Lock()


def register_view_recipe(name: str) -> Callable[[RecipeFn], RecipeFn]:
    """Decorator registering ``fn(image, cfg, rng) -> Tensor`` as the view recipe ``name``.

    ``image`` is an RGB PIL image, ``cfg`` the model's :class:`PreprocessConfig`, ``rng`` the
    view's :class:`ViewRNG`; the function returns a normalised float32 ``3 x H x W`` tensor at
    ``cfg.image_size``. It must draw randomness only from ``rng`` (that is what makes views
    reproducible). Registering a name twice raises ``ValueError``.
    """
    if not isinstance(name, str) or not name or "|" in name:
        raise ValueError(f"a view recipe name must be a non-empty string without '|'; got {name!r}")

    def decorator(fn: RecipeFn) -> RecipeFn:
        with _REGISTRY_LOCK:
            if name in _RECIPES and _RECIPES[name] is not fn:
                raise ValueError(f"view recipe {name!r} is already registered")
            _RECIPES[name] = fn
        return fn

    return decorator


_BATCH_RECIPES: dict[str, BatchRecipeFn] = {}
_KEY_EXTRA: dict[str, tuple] = {}


def register_batch_view_recipe(name: str, key_extra: tuple = ()) -> Callable[[BatchRecipeFn], BatchRecipeFn]:
    """Decorator registering ``fn(image, cfg, rngs, device) -> Tensor`` as the view recipe ``name``,
    made for all of an image's views at once: ``rngs`` holds one :class:`ViewRNG` per view (the
    view's randomness must come from its own, so view ``i`` stays a pure function of its key) and
    the result is ``len(rngs) x 3 x H x W`` float32 on ``device``. Used by the tensor path
    (:mod:`vlm_tta.tensor_views`); ``key_extra`` is appended to the views' cache keys."""

    def decorator(fn: BatchRecipeFn) -> BatchRecipeFn:
        def one(image: Image.Image, cfg: PreprocessConfig, rng: ViewRNG) -> torch.Tensor:
            return fn(image, cfg, [rng], torch.device("cpu"))[0]

        one.__doc__ = fn.__doc__
        register_view_recipe(name)(one)
        _BATCH_RECIPES[name] = fn
        _KEY_EXTRA[name] = tuple(key_extra)
        return fn

    return decorator


def list_view_recipes() -> list[str]:
    """Names of the registered view recipes, sorted."""
    return sorted(_RECIPES)


def get_view_recipe(name: str) -> RecipeFn:
    """The recipe function registered as ``name``; :class:`UnknownViewRecipeError` otherwise."""
    try:
        return _RECIPES[name]
    except (KeyError, TypeError):
        raise UnknownViewRecipeError(
            f"unknown view recipe {name!r}; known recipes: {', '.join(list_view_recipes())}"
        ) from None


# ------------------------------------------------------------------------------------ randomness
def _seed_int(label: str, key: str, nbytes: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{label}|{key}".encode()).digest()[:nbytes], "little")


class ViewRNG:
    """The private random generators of one view.

    ``key`` is ``f"{seed}|{image_hash}|{index}"``; two independent streams are derived from it:
    :attr:`torch` (a ``torch.Generator``, used for the crop and flip exactly as torchvision's
    ``RandomResizedCrop`` / ``RandomHorizontalFlip`` draw from torch's RNG) and :attr:`numpy`
    (a ``numpy.random.Generator``, used for AugMix as TPT draws from numpy's RNG). Both are created
    on first use. The global RNGs are never touched.
    """

    __slots__ = ("key", "_torch", "_numpy")

    def __init__(self, key: str):
        self.key = key
        self._torch: torch.Generator | None = None
        self._numpy: np.random.Generator | None = None

    @classmethod
    def for_view(cls, seed: int, image_hash: str, index: int) -> "ViewRNG":
        return cls(f"{int(seed)}|{image_hash}|{int(index)}")

    @property
    def torch(self) -> torch.Generator:
        if self._torch is None:
            g = torch.Generator(device="cpu")
            g.manual_seed(_seed_int("torch", self.key, 8))
            self._torch = g
        return self._torch

    @property
    def numpy(self) -> np.random.Generator:
        if self._numpy is None:
            self._numpy = np.random.default_rng(_seed_int("numpy", self.key, 16))
        return self._numpy


# ---------------------------------------------------------------------------- tensor conversion
def _hw(cfg: PreprocessConfig) -> tuple[int, int]:
    size = cfg.image_size
    if isinstance(size, int):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def _interpolation(name: str) -> InterpolationMode:
    # open_clip maps 'bilinear' -> BILINEAR and everything else ('bicubic', 'random') -> BICUBIC;
    # other Pillow filters are accepted for backends that declare them.
    name = (name or "bicubic").lower()
    if name in ("bicubic", "random"):
        return InterpolationMode.BICUBIC
    try:
        return InterpolationMode(name)
    except ValueError:
        raise ValueError(
            f"unknown interpolation {name!r} in PreprocessConfig; use bicubic, bilinear, nearest, "
            "lanczos, box or hamming"
        ) from None


_LUTS: dict[tuple, np.ndarray] = {}


def _lut(cfg: PreprocessConfig) -> np.ndarray:
    """3 x 256 float32 table: ``lut[c, v]`` = channel ``c`` of a uint8 value ``v`` after ToTensor +
    Normalize, computed with torchvision's own ops (``to(float32).div(255)``, ``sub_(mean)``,
    ``div_(std)``), so looking pixels up in it is bit-identical to running those ops per pixel."""
    key = (tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std))
    lut = _LUTS.get(key)
    if lut is None:
        if len(key[0]) != 3 or len(key[1]) != 3:
            raise ValueError(f"PreprocessConfig mean and std need 3 values (RGB); got {cfg.mean!r}, {cfg.std!r}")
        t = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255).repeat(3, 1)
        t = t.sub_(torch.tensor(key[0], dtype=torch.float32).view(3, 1)).div_(
            torch.tensor(key[1], dtype=torch.float32).view(3, 1)
        )
        lut = t.numpy()
        lut.setflags(write=False)
        _LUTS[key] = lut
    return lut


def _normalize_np(image: Image.Image, lut: np.ndarray) -> np.ndarray:
    """ToTensor + Normalize of one RGB PIL image as a 3 x H x W float32 numpy array. Pure numpy on
    purpose: single-threaded and GIL-free, so it neither fights torch's OpenMP pool for the
    two cores nor serialises worker threads."""
    arr = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    out = np.empty((3, arr.shape[0], arr.shape[1]), dtype=np.float32)
    for c in range(3):
        np.take(lut[c], arr[..., c], out=out[c])
    return out


def to_normalized_tensor(images: Image.Image | Sequence[Image.Image], cfg: PreprocessConfig) -> torch.Tensor:
    """ToTensor + Normalize(cfg.mean, cfg.std), bit-identical to torchvision's.

    One RGB image gives ``3 x H x W``; a sequence of same-size images gives ``N x 3 x H x W``.
    """
    lut = _lut(cfg)
    if isinstance(images, Image.Image):
        return torch.from_numpy(_normalize_np(images, lut))
    return torch.from_numpy(np.stack([_normalize_np(im, lut) for im in images]))


# ------------------------------------------------------------------------------- original view
def _center_crop_or_pad(img: Image.Image, out_hw: tuple[int, int], fill: int) -> Image.Image:
    """Centre crop to ``out_hw``, padding with ``fill`` first where the image is smaller
    (torchvision's CenterCrop / open_clip's CenterCropOrPad geometry)."""
    ch, cw = out_hw
    iw, ih = img.size
    if cw > iw or ch > ih:
        pad = [
            (cw - iw) // 2 if cw > iw else 0,
            (ch - ih) // 2 if ch > ih else 0,
            (cw - iw + 1) // 2 if cw > iw else 0,
            (ch - ih + 1) // 2 if ch > ih else 0,
        ]
        img = TF.pad(img, pad, fill=fill)
        iw, ih = img.size
        if (iw, ih) == (cw, ch):
            return img
    top = int(round((ih - ch) / 2.0))
    left = int(round((iw - cw) / 2.0))
    return TF.crop(img, top, left, ch, cw)


def _resize_keep_ratio(
    img: Image.Image, out_hw: tuple[int, int], longest: bool, interp: InterpolationMode
) -> Image.Image:
    """Scale so the shortest (or longest) side matches its target, keeping the aspect ratio
    (open_clip's ``ResizeKeepRatio`` without its random options; Python's round, sides >= 1)."""
    w, h = img.size
    th, tw = out_hw
    rh, rw = h / th, w / tw
    ratio = max(rh, rw) if longest else min(rh, rw)
    size = [max(1, round(h / ratio)), max(1, round(w / ratio))]
    return TF.resize(img, size, interp)


def resize_for_model(image: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """The geometric part of the backbone's eval transform, as open_clip builds it
    (``open_clip.transform.image_transform(..., is_train=False)``):

    * ``shortest`` (CLIP): square target -> ``Resize(size)`` of the shorter side with
      ``cfg.interpolation`` then ``CenterCrop``; non-square target -> open_clip's
      ``ResizeKeepRatio`` (which always uses bicubic, whatever ``cfg.interpolation`` says) then
      ``CenterCrop``;
    * ``squash`` (SigLIP): ``Resize((H, W))``, no crop;
    * ``longest``: resize the longer side to fit, then centre-pad with ``cfg.fill_color``.
    """
    hw = _hw(cfg)
    interp = _interpolation(cfg.interpolation)
    mode = cfg.resize_mode
    if mode == "squash":
        return TF.resize(image, list(hw), interp)
    if mode == "longest":
        return _center_crop_or_pad(_resize_keep_ratio(image, hw, True, interp), hw, cfg.fill_color)
    if mode == "shortest":
        if hw[0] == hw[1]:
            resized = TF.resize(image, hw[0], interp)
        else:
            resized = _resize_keep_ratio(image, hw, False, InterpolationMode.BICUBIC)
        return _center_crop_or_pad(resized, hw, 0)
    raise ValueError(f"unknown resize_mode {mode!r} in PreprocessConfig; use 'shortest', 'squash' or 'longest'")


def original_view(image: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """The original (un-augmented) view: the backbone's eval transform built from ``cfg``
    (:func:`resize_for_model`, then ToTensor + Normalize). Equals open_clip's
    ``image_transform_v2(PreprocessCfg(...), is_train=False)`` exactly."""
    return to_normalized_tensor(resize_for_model(image, cfg), cfg)


# ----------------------------------------------------------------------------- crop + flip
def sample_crop_params(
    width: int,
    height: int,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random-resized crop, drawn from ``generator``.

    torchvision's ``RandomResizedCrop.get_params`` algorithm with the same draws in the same
    order and the same float32 arithmetic (so a generator in the same state gives the same crop):
    up to 10 attempts of area ~ U(scale) * image area and log-aspect ~ U(log ratio); the first
    crop that fits is placed uniformly; otherwise a centre crop with the aspect ratio clamped to
    ``ratio``. Every crop is at least 1 x 1, also for a 1 x 1 image.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    lo_r, hi_r = float(log_ratio[0]), float(log_ratio[1])
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(lo_r, hi_r, generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    h, w = max(1, min(h, height)), max(1, min(w, width))
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_flip(
    image: Image.Image,
    cfg: PreprocessConfig,
    generator: torch.Generator,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    flip_p: float = FLIP_P,
) -> Image.Image:
    """``RandomResizedCrop(cfg.image_size, scale, ratio)`` (bilinear, torchvision's default; Pillow
    antialiases) followed by ``RandomHorizontalFlip(flip_p)``, on the raw PIL image, with the draws
    of torchvision's two transforms taken from ``generator`` in the same order."""
    top, left, h, w = sample_crop_params(image.width, image.height, scale, ratio, generator)
    crop = TF.resized_crop(image, top, left, h, w, list(_hw(cfg)), InterpolationMode.BILINEAR, antialias=True)
    if torch.rand(1, generator=generator).item() < flip_p:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return crop


# --------------------------------------------------------------------------------------- AugMix
# Op definitions of AugMix (Hendrycks et al., ICLR 2020) as used by TPT (azshue/TPT,
# data/augmix_ops.py): a level is drawn uniformly in [0.1, severity] per op call and scaled to the
# op's range with level/10 (PARAMETER_MAX = 10); geometric ops flip the sign with p = 0.5 and
# resample bilinearly, filling uncovered pixels with black. TPT draws all of this from numpy's
# global RNG; here it comes from the view's own numpy Generator. Translation is a third of the
# side at level 10 (TPT hard-codes IMAGE_SIZE = 224; we use the crop's own width/height, which is
# the same at 224 px). At severity 1 the ranges are: posterize to 4 bits, rotate by 0-2 degrees,
# solarize above 231-254, shear 0.003-0.03, translate 0-7 px at 224.


def _level(rng: np.random.Generator, severity: float) -> float:
    return rng.uniform(0.1, severity)


def _int_param(level: float, maxval: float) -> int:
    return int(level * maxval / 10)


def _float_param(level: float, maxval: float) -> float:
    return float(level) * maxval / 10.0


def _signed(value, rng: np.random.Generator):
    return -value if rng.uniform() > 0.5 else value


def _affine(img: Image.Image, coeffs: tuple) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)


# The ops' random parameters, drawn in TPT's order (a level, then a sign for the geometric ops); the
# PIL ops below and the tensor path (vlm_tta.tensor_views) both draw through these.
def _posterize_bits(rng: np.random.Generator, severity: float) -> int:
    return 4 - _int_param(_level(rng, severity), 4)


def _rotate_degrees(rng: np.random.Generator, severity: float) -> int:
    return _signed(_int_param(_level(rng, severity), 30), rng)


def _solarize_threshold(rng: np.random.Generator, severity: float) -> int:
    return 256 - _int_param(_level(rng, severity), 256)


def _shear(rng: np.random.Generator, severity: float) -> float:
    return _signed(_float_param(_level(rng, severity), 0.3), rng)


def _translate_px(rng: np.random.Generator, severity: float, side: int) -> int:
    return _signed(_int_param(_level(rng, severity), side / 3), rng)


def _autocontrast(img: Image.Image, severity: float, rng: np.random.Generator) -> Image.Image:
    return ImageOps.autocontrast(img)


def _equalize(img: Image.Image, severity: float, rng: np.random.Generator) -> Image.Image:
    return ImageOps.equalize(img)


def _posterize(img: Image.Image, severity: float, rng: np.random.Generator) -> Image.Image:
    return ImageOps.posterize(img, _posterize_bits(rng, severity))


def _rotate(img: Image.Image, severity: float, rng: np.random.Generator) -> Image.Image:
    degrees = _rotate_degrees(rng, severity)
    return img.rotate(degrees, resample=Image.Resampling.BILINEAR)


def _solarize(img: Image.Image, severity: float, rng: np.random.Generator) -> Image.Image:
    return ImageOps.solarize(img, _solarize_threshold(rng, severity))


def _shear_x(img: Image.Image, severity: float, rng: np.random.Generator) -> Image.Image:
    return _affine(img, (1, _shear(rng, severity), 0, 0, 1, 0))


def _shear_y(img: Image.Image, severity: float, rng: np.random.Generator) -> Image.Image:
    return _affine(img, (1, 0, 0, _shear(rng, severity), 1, 0))


def _shift(img: Image.Image, offset: int, axis: int) -> Image.Image:
    """``img.transform(size, AFFINE, translation by offset, BILINEAR)`` for an integer ``offset``,
    done as an array copy: output pixel ``x`` takes input pixel ``x + offset`` and pixels from
    outside the image are black. With an integer offset Pillow's bilinear sampling lands exactly
    on pixel centres, so the result is identical (a test checks this) and ~15x faster."""
    arr = np.asarray(img)
    out = np.zeros_like(arr)
    n = arr.shape[1 - axis]  # axis 0 = x (columns), axis 1 = y (rows)
    if abs(offset) < n:
        src = [slice(None), slice(None)]
        dst = [slice(None), slice(None)]
        if offset >= 0:
            src[1 - axis], dst[1 - axis] = slice(offset, n), slice(0, n - offset)
        else:
            src[1 - axis], dst[1 - axis] = slice(0, n + offset), slice(-offset, n)
        out[tuple(dst)] = arr[tuple(src)]
    return Image.fromarray(out, mode=img.mode)


def _translate_x(img: Image.Image, severity: float, rng: np.random.Generator) -> Image.Image:
    return _shift(img, _translate_px(rng, severity, img.width), 0)


def _translate_y(img: Image.Image, severity: float, rng: np.random.Generator) -> Image.Image:
    return _shift(img, _translate_px(rng, severity, img.height), 1)


#: The 9 AugMix ops TPT uses (``augmentations`` in TPT's augmix_ops; the colour, contrast,
#: brightness and sharpness ops are left out because they overlap ImageNet-C). Order matters: an op
#: is picked by its index in this mapping.
AUGMIX_OPS: dict[str, Callable[[Image.Image, float, np.random.Generator], Image.Image]] = {
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "posterize": _posterize,
    "rotate": _rotate,
    "solarize": _solarize,
    "shear_x": _shear_x,
    "shear_y": _shear_y,
    "translate_x": _translate_x,
    "translate_y": _translate_y,
}


#: Each op's random parameter as ``fn(rng, severity, width, height)`` (None for the ops without one),
#: with the same draws as the op in :data:`AUGMIX_OPS`: what the tensor path samples per view.
AUGMIX_PARAMS: dict[str, Callable[[np.random.Generator, float, int, int], object]] = {
    "autocontrast": lambda rng, severity, w, h: None,
    "equalize": lambda rng, severity, w, h: None,
    "posterize": lambda rng, severity, w, h: _posterize_bits(rng, severity),
    "rotate": lambda rng, severity, w, h: _rotate_degrees(rng, severity),
    "solarize": lambda rng, severity, w, h: _solarize_threshold(rng, severity),
    "shear_x": lambda rng, severity, w, h: _shear(rng, severity),
    "shear_y": lambda rng, severity, w, h: _shear(rng, severity),
    "translate_x": lambda rng, severity, w, h: _translate_px(rng, severity, w),
    "translate_y": lambda rng, severity, w, h: _translate_px(rng, severity, h),
}


def _sample_mixing(rng: np.random.Generator, width: int) -> tuple[np.ndarray, np.float32]:
    """Chain weights w ~ Dirichlet(1, ..., 1) and blend m ~ Beta(1, 1), float32 (TPT's order)."""
    w = np.float32(rng.dirichlet([1.0] * width))
    m = np.float32(rng.beta(1.0, 1.0))
    return w, m


def augmix(
    crop: Image.Image,
    cfg: PreprocessConfig,
    rng: np.random.Generator,
    severity: float = AUGMIX_SEVERITY,
    width: int = AUGMIX_WIDTH,
    max_depth: int = AUGMIX_MAX_DEPTH,
) -> torch.Tensor:
    """TPT's AugMix on an already cropped/flipped PIL image (Shu et al., NeurIPS 2022, after
    Hendrycks et al., ICLR 2020), mixed on normalised tensors:

    ``w ~ Dirichlet(1,1,1)``, ``m ~ Beta(1,1)``; each of ``width`` = 3 chains applies
    ``depth ~ U{1, .., max_depth}`` ops drawn uniformly (with replacement) from :data:`AUGMIX_OPS`
    at ``severity`` to a copy of ``crop``; ``mix = sum_i w_i * norm(chain_i)``; the view is
    ``m * norm(crop) + (1 - m) * mix`` where ``norm`` is ToTensor + Normalize(cfg.mean, cfg.std).
    """
    w, m = _sample_mixing(rng, width)
    ops = list(AUGMIX_OPS.values())
    chains = []
    for _ in range(width):
        img = crop
        for _ in range(int(rng.integers(1, max_depth + 1))):
            img = ops[int(rng.integers(len(ops)))](img, severity, rng)
        chains.append(img)
    lut = _lut(cfg)
    x_orig = _normalize_np(crop, lut)
    mix = np.zeros_like(x_orig)
    for i in range(width):
        mix += w[i] * _normalize_np(chains[i], lut)
    return torch.from_numpy(m * x_orig + (np.float32(1.0) - m) * mix)


# -------------------------------------------------------------------------------------- recipes
@register_view_recipe("original")
def _recipe_original(image: Image.Image, cfg: PreprocessConfig, rng: ViewRNG) -> torch.Tensor:
    """The backbone's eval transform (no randomness)."""
    return original_view(image, cfg)


@register_view_recipe("crop_flip")
def _recipe_crop_flip(image: Image.Image, cfg: PreprocessConfig, rng: ViewRNG) -> torch.Tensor:
    """TPT's views for ImageNet and its variants (Shu et al., NeurIPS 2022; azshue/TPT
    ``AugMixAugmenter`` with ``augmix=False``): ``RandomResizedCrop(size)`` with torchvision's
    defaults (scale (0.08, 1), ratio (3/4, 4/3), bilinear) + ``RandomHorizontalFlip()`` on the raw
    image, then ToTensor + Normalize. Also the views of ZERO, MTA and BoostAdapter."""
    return to_normalized_tensor(random_resized_crop_flip(image, cfg, rng.torch), cfg)


@register_view_recipe("augmix")
def _recipe_augmix(image: Image.Image, cfg: PreprocessConfig, rng: ViewRNG) -> torch.Tensor:
    """TPT's views for the 10 fine-grained datasets (Shu et al., NeurIPS 2022; azshue/TPT
    ``augmix()`` with the 9 ops): the ``crop_flip`` pre-augmentation at the model size, then
    :func:`augmix` (severity 1, 3 chains of 1-3 ops, Dirichlet(1,1,1) weights, Beta(1,1) blend,
    mixed on normalised tensors). TDA and DPE use these views for the ImageNet variants too."""
    return augmix(random_resized_crop_flip(image, cfg, rng.torch), cfg, rng.numpy)


@register_view_recipe("crop_flip_dmn")
def _recipe_crop_flip_dmn(image: Image.Image, cfg: PreprocessConfig, rng: ViewRNG) -> torch.Tensor:
    """DMN's views for ImageNet and its variants (Zhang et al., CVPR 2024): RandomResizedCrop with
    scale (0.5, 1) (other arguments torchvision's defaults) + horizontal flip. DMN uses 31 of them
    plus the original (``ViewSet("crop_flip_dmn", 32)``)."""
    return to_normalized_tensor(random_resized_crop_flip(image, cfg, rng.torch, scale=DMN_SCALE), cfg)


@register_view_recipe("augmix_dmn")
def _recipe_augmix_dmn(image: Image.Image, cfg: PreprocessConfig, rng: ViewRNG) -> torch.Tensor:
    """DMN's views for the fine-grained datasets: the (0.5, 1) crop + flip of ``crop_flip_dmn``,
    then TPT's AugMix (:func:`augmix`)."""
    return augmix(random_resized_crop_flip(image, cfg, rng.torch, scale=DMN_SCALE), cfg, rng.numpy)


# ------------------------------------------------------------------------------------- workers
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(num_workers: int) -> ThreadPoolExecutor:
    key = (os.getpid(), num_workers)  # a forked child has none of its parent's threads: new pools
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="vlm_tta-views")
            _POOLS[key] = pool
        return pool


def _as_numpy(view) -> np.ndarray:
    if isinstance(view, torch.Tensor):
        return view.detach().to("cpu", torch.float32).numpy()
    return np.asarray(view, dtype=np.float32)


def _as_rgb(image) -> Image.Image:
    if isinstance(image, Image.Image) and image.mode == "RGB":
        return image
    return load_image(image)


# ------------------------------------------------------------------------------------- ViewSet
@dataclass(frozen=True)
class ViewSet:
    """How many views of which recipe, with which seed.

    ``n_views`` counts every view including the original: view 0 is always the original view and
    views ``1 .. n_views - 1`` come from ``recipe`` (TPT: ``ViewSet("augmix", 64)`` = 63 + the
    original; DMN: ``ViewSet("crop_flip_dmn", 32)``). ``ViewSet("original", 1)`` is the plain
    single view.
    """

    recipe: str
    n_views: int = 64
    seed: int = 0

    def __post_init__(self):
        get_view_recipe(self.recipe)  # raises UnknownViewRecipeError with the known names
        if isinstance(self.n_views, bool) or not isinstance(self.n_views, (int, np.integer)) or self.n_views < 1:
            raise ValueError(f"n_views must be an integer >= 1 (views including the original); got {self.n_views!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer; got {self.seed!r}")
        if self.recipe == "original" and self.n_views != 1:
            raise ValueError(
                "the 'original' recipe has a single view; use ViewSet('original', 1) or a random recipe "
                f"({', '.join(r for r in list_view_recipes() if r != 'original')}) for more views"
            )
        object.__setattr__(self, "n_views", int(self.n_views))
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def indices(self) -> range:
        return range(self.n_views)

    def key_parts(self, index: int) -> tuple:
        """What identifies view ``index`` besides the model and the image: ``("original", v)`` for
        view 0 (shared by every recipe and seed), ``(recipe, seed, index, v)`` otherwise, where
        ``v`` is :data:`VIEWS_VERSION` (tensor-path recipes append their own version)."""
        index = self._check_index(index)
        if index == 0:
            return ("original", VIEWS_VERSION)
        return (self.recipe, self.seed, index, VIEWS_VERSION) + _KEY_EXTRA.get(self.recipe, ())

    def block_key_parts(self, start: int, count: int) -> tuple:
        """What identifies the block of views ``start .. start + count - 1`` (one cache row, see
        :func:`view_blocks`): the original's own key for view 0 alone, else ``(recipe, seed,
        "block", start, count, v)`` (tensor-path recipes append their own version)."""
        self._check_index(start)
        self._check_index(start + count - 1)
        if start == 0:
            if count != 1:
                raise ValueError("the original view (index 0) is a block of its own")
            return self.key_parts(0)
        return (self.recipe, self.seed, "block", start, count, VIEWS_VERSION) + _KEY_EXTRA.get(self.recipe, ())

    def _check_index(self, index) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise ValueError(f"view index must be an integer; got {index!r}")
        if not 0 <= index < self.n_views:
            raise ValueError(f"view index {index} is out of range for {self} (0 .. {self.n_views - 1})")
        return int(index)

    def _indices(self, indices: Iterable[int] | None) -> list[int]:
        if indices is None:
            return list(self.indices)
        return [self._check_index(i) for i in indices]

    def view(
        self,
        image: Image.Image,
        cfg: PreprocessConfig,
        index: int,
        original: OriginalFn | None = None,
        image_hash: str | None = None,
    ) -> torch.Tensor:
        """One view (``3 x H x W``) of an RGB image."""
        index = self._check_index(index)
        if index == 0:
            return _original(image, cfg, original)
        if image_hash is None:
            image_hash = content_hash(image)
        return get_view_recipe(self.recipe)(image, cfg, ViewRNG.for_view(self.seed, image_hash, index))

    def make(
        self,
        image,
        cfg: PreprocessConfig,
        indices: Iterable[int] | None = None,
        original: OriginalFn | None = None,
        *,
        image_hash: str | None = None,
        num_workers: int = 0,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Views ``indices`` (default: all) of one image as a ``len(indices) x 3 x H x W`` tensor.

        ``image`` is an RGB PIL image (anything :func:`~vlm_tta.images.load_image` reads is
        converted). ``original`` replaces the original view's transform with the backbone's own
        ``preprocess`` (it must return ``3 x H x W`` at ``cfg.image_size``). ``image_hash``
        (:func:`~vlm_tta.images.content_hash` of the image) saves hashing again when the caller
        has it. ``num_workers > 0`` spreads the views over that many threads. ``device`` is where
        tensor-path recipes make their views (PIL recipes ignore it and return CPU tensors).
        """
        return make_views(
            self,
            [image],
            cfg,
            indices,
            original,
            image_hashes=None if image_hash is None else [image_hash],
            num_workers=num_workers,
            device=device,
        )[0]

    def make_batch(
        self,
        images: Sequence,
        cfg: PreprocessConfig,
        indices: Iterable[int] | None = None,
        original: OriginalFn | None = None,
        *,
        image_hashes: Sequence[str] | None = None,
        num_workers: int = 0,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Views of many images: ``len(images) x len(indices) x 3 x H x W``."""
        return make_views(
            self, images, cfg, indices, original, image_hashes=image_hashes, num_workers=num_workers, device=device
        )


def _original(image: Image.Image, cfg: PreprocessConfig, original: OriginalFn | None) -> torch.Tensor:
    if original is None:
        return original_view(image, cfg)
    out = original(image)
    out = torch.as_tensor(out)
    if out.ndim == 4 and out.shape[0] == 1:
        out = out[0]
    h, w = _hw(cfg)
    if tuple(out.shape) != (3, h, w):
        raise ValueError(
            f"the original-view transform returned shape {tuple(out.shape)}, but the views are (3, {h}, {w}) "
            "(PreprocessConfig.image_size); the model's preprocess and its preprocess_cfg disagree"
        )
    return out.to(torch.float32)


def make_views(
    view_set: ViewSet,
    images: Sequence,
    cfg: PreprocessConfig,
    indices: Iterable[int] | None = None,
    original: OriginalFn | None = None,
    *,
    image_hashes: Sequence[str] | None = None,
    num_workers: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Views ``indices`` of every image: ``len(images) x len(indices) x 3 x H x W`` float32.

    A tensor-path recipe (:func:`register_batch_view_recipe`) makes each image's random views in one
    batched call on ``device`` (default CPU) and returns a tensor there; view 0 (the original) always
    comes from the exact PIL path.

    With ``num_workers > 0`` the work (one task per image, or per chunk of views when there are
    fewer images than workers) runs in a shared pool of threads: Pillow and numpy release the GIL
    in their pixel loops, and views are pure functions of their key, so the result is identical to
    ``num_workers=0``. Hashing the images (when ``image_hashes`` is not given) happens first, in
    the calling thread.
    """
    idx = view_set._indices(indices)
    rgb = [_as_rgb(im) for im in images]
    if image_hashes is None:
        need_hash = any(i != 0 for i in idx) and view_set.recipe != "original"
        hashes = [content_hash(im) if need_hash else "" for im in rgb]
    else:
        hashes = list(image_hashes)
        if len(hashes) != len(rgb):
            raise ValueError(f"got {len(hashes)} image hashes for {len(rgb)} images")
    h, w = _hw(cfg)
    if view_set.recipe in _BATCH_RECIPES:
        return _make_batched(view_set, rgb, hashes, cfg, idx, original, torch.device(device or "cpu"), num_workers)
    # Filled with numpy copies (no torch kernels, so no OpenMP threads, in the per-view path).
    out = np.empty((len(rgb), len(idx), 3, h, w), dtype=np.float32)
    if not rgb or not idx:
        return torch.from_numpy(out)

    def work(b: int, positions: Sequence[int]) -> None:
        for p in positions:
            out[b, p] = _as_numpy(view_set.view(rgb[b], cfg, idx[p], original, hashes[b]))

    positions = list(range(len(idx)))
    num_workers = int(num_workers or 0)
    if num_workers <= 0:
        for b in range(len(rgb)):
            work(b, positions)
        return torch.from_numpy(out)
    if len(rgb) >= num_workers:
        tasks = [(b, positions) for b in range(len(rgb))]
    else:  # few images, many views: split each image's views into interleaved chunks
        n_chunks = max(1, min(len(idx), -(-num_workers // len(rgb))))
        tasks = [(b, positions[k::n_chunks]) for b in range(len(rgb)) for k in range(n_chunks)]
    pool = _pool(num_workers)
    for fut in [pool.submit(work, b, pos) for b, pos in tasks]:
        fut.result()
    return torch.from_numpy(out)


def _make_batched(
    view_set: ViewSet,
    rgb: list[Image.Image],
    hashes: list[str],
    cfg: PreprocessConfig,
    idx: list[int],
    original: OriginalFn | None,
    device: torch.device,
    num_workers: int = 0,
) -> torch.Tensor:
    """Views of a tensor-path recipe: each image's random views in one call of the recipe on
    ``device``; on the CPU with ``num_workers > 1`` in that many slices on the worker threads (torch
    releases the GIL; each view depends only on its own generators, so the slicing changes nothing)."""
    h, w = _hw(cfg)
    fn = _BATCH_RECIPES[view_set.recipe]
    out = torch.empty((len(rgb), len(idx), 3, h, w), dtype=torch.float32, device=device)
    rand = [p for p, i in enumerate(idx) if i != 0]
    n_slices = max(1, min(int(num_workers or 0), len(rand))) if device.type == "cpu" else 1
    for b, image in enumerate(rgb):
        if len(rand) < len(idx):
            out[b, [p for p, i in enumerate(idx) if i == 0]] = _original(image, cfg, original).to(device)
        if not rand:
            continue
        rngs = {p: ViewRNG.for_view(view_set.seed, hashes[b], idx[p]) for p in rand}

        def work(positions: list[int], image=image, b=b, rngs=rngs) -> None:
            out[b, positions] = fn(image, cfg, [rngs[p] for p in positions], device)

        if n_slices == 1:
            work(rand)
        else:
            for fut in [_pool(n_slices).submit(work, rand[k::n_slices]) for k in range(n_slices)]:
                fut.result()
    return out


def default_num_workers() -> int:
    """A sensible thread count for view making: the CPUs this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


# The tensor-path recipes (crop_flip_t, augmix_t, ...) register themselves on import.
from . import tensor_views as _tensor_views  # noqa: E402, F401
