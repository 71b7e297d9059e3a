"""The tensor view path: TPT's crop + flip and AugMix on batched tensors, on the GPU when there is one.

The PIL recipes of :mod:`vlm_tta.views` reproduce the reference code exactly but cost 1-5 ms of CPU
per view (64 AugMix views of one image: ~300 ms on 2 cores), which caps a GPU pipeline at a few
images per second. The recipes here make all the views of an image at once with torch ops on the
model's device and draw from the same distributions:

==================  ===========================================================================
``crop_flip_t``     ``crop_flip`` on tensors: RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3)),
                    bilinear with antialiasing, + horizontal flip (p = 0.5)
``augmix_t``        ``augmix`` on tensors: the crop + flip, then TPT's AugMix (9 ops at severity 1,
                    3 chains of 1-3 ops, Dirichlet(1,1,1) chain weights, Beta(1,1) blend)
``crop_flip_dmn_t`` ``crop_flip_dmn`` on tensors (crop scale (0.5, 1))
``augmix_dmn_t``    ``augmix_dmn`` on tensors
==================  ===========================================================================

Only the pixel arithmetic is new. Every random number comes from the view's own generators
(:class:`~vlm_tta.views.ViewRNG`) through the PIL path's samplers, in the same order
(:func:`~vlm_tta.views.sample_crop_params`, the flip draw, ``_sample_mixing`` and
:data:`~vlm_tta.views.AUGMIX_PARAMS`), so view ``i`` of ``augmix_t`` has the same crop box, flip,
chain weights, ops and op parameters as view ``i`` of ``augmix``; its pixels differ from Pillow's by
resampling details (a few grey levels, more at rotated/sheared borders). The original view (view 0)
is the exact PIL one. Normalisation uses the PIL path's lookup table, so equal uint8 pixels give
bit-identical inputs.

Views are a pure function of (recipe, seed, image, index) on a given device; their cache keys carry
the recipe name and :data:`TENSOR_VIEWS_VERSION`, so they never mix with the PIL path's. Crops are cut
one view at a time (each has its own box); the AugMix chains of all views run batched, one op type at
a time, with every chain kept as uint8 pixels between ops as in Pillow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import views as V
from .models.base import PreprocessConfig

__all__ = [
    "TENSOR_RECIPES",
    "TENSOR_VIEWS_VERSION",
    "AugMixPlan",
    "CropFlip",
    "augmix_tensors",
    "normalize_uint8",
    "resized_crops",
    "sample_augmix",
    "sample_crop_flip",
]

#: Part of the tensor recipes' cache keys: bump it when their pixels change for the same key.
TENSOR_VIEWS_VERSION = 1

_OP_NAMES = tuple(V.AUGMIX_OPS)


# ------------------------------------------------------------------------------------ sampling
@dataclass(frozen=True)
class CropFlip:
    """One view's random-resized crop ``(top, left, h, w)`` in the source image and its flip."""

    top: int
    left: int
    h: int
    w: int
    flip: bool


def sample_crop_flip(
    rng: V.ViewRNG,
    width: int,
    height: int,
    scale: tuple[float, float] = V.DEFAULT_SCALE,
    ratio: tuple[float, float] = V.DEFAULT_RATIO,
    flip_p: float = V.FLIP_P,
) -> CropFlip:
    """The crop box and flip of one view, with the draws of :func:`vlm_tta.views.random_resized_crop_flip`."""
    top, left, h, w = V.sample_crop_params(width, height, scale, ratio, rng.torch)
    flip = torch.rand(1, generator=rng.torch).item() < flip_p
    return CropFlip(top, left, h, w, bool(flip))


@dataclass(frozen=True)
class AugMixPlan:
    """One view's AugMix: chain weights ``weights`` (Dirichlet), blend ``m`` (Beta) and, per chain,
    the ops as ``(name, parameter)`` pairs (the parameter of :data:`vlm_tta.views.AUGMIX_PARAMS`)."""

    weights: np.ndarray
    m: np.float32
    chains: tuple[tuple[tuple[str, object], ...], ...]


def sample_augmix(
    rng: np.random.Generator,
    width_px: int,
    height_px: int,
    severity: float = V.AUGMIX_SEVERITY,
    width: int = V.AUGMIX_WIDTH,
    max_depth: int = V.AUGMIX_MAX_DEPTH,
) -> AugMixPlan:
    """The AugMix plan of one view, with the draws of :func:`vlm_tta.views.augmix` in its order."""
    w, m = V._sample_mixing(rng, width)
    chains = []
    for _ in range(width):
        ops = []
        for _ in range(int(rng.integers(1, max_depth + 1))):
            name = _OP_NAMES[int(rng.integers(len(_OP_NAMES)))]
            ops.append((name, V.AUGMIX_PARAMS[name](rng, severity, width_px, height_px)))
        chains.append(tuple(ops))
    return AugMixPlan(w, m, tuple(chains))


# ------------------------------------------------------------------------------------- pixels
def image_tensor(image: Image.Image, device: torch.device) -> torch.Tensor:
    """``3 x H x W`` uint8 tensor of an RGB PIL image on ``device``."""
    arr = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).to(device)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


def resized_crops(image: torch.Tensor, crops: Sequence[CropFlip], out_hw: tuple[int, int]) -> torch.Tensor:
    """``N x 3 x H x W`` uint8: each crop of the ``3 x h x w`` uint8 ``image`` resized to ``out_hw``
    (bilinear with antialiasing, as torchvision's ``resized_crop``), flipped where asked. On the
    CPU torch resizes uint8 directly (its port of Pillow's resampling); elsewhere in float32."""
    on_cpu = image.device.type == "cpu"
    x = image[None] if on_cpu else image[None].to(torch.float32)
    out = torch.empty((len(crops), 3, *out_hw), dtype=x.dtype, device=image.device)
    for k, c in enumerate(crops):
        part = x[:, :, c.top : c.top + c.h, c.left : c.left + c.w]
        out[k] = F.interpolate(part, size=out_hw, mode="bilinear", align_corners=False, antialias=True)[0]
    flips = [k for k, c in enumerate(crops) if c.flip]
    if flips:
        out[flips] = out[flips].flip(-1)
    return out if on_cpu else _to_uint8(out)


def normalize_uint8(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """ToTensor + Normalize of ``... x 3 x H x W`` pixels in [0, 255] (uint8 or float): torchvision's
    float32 ops (``div(255)``, ``sub(mean)``, ``div(std)``), so uint8 pixels give exactly what
    :func:`vlm_tta.views.to_normalized_tensor` gives for the same pixels."""
    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return x.to(torch.float32).div(255).sub_(mean).div_(std)


# ---------------------------------------------------------------------- AugMix ops on batches
def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Pillow's ``ImageOps.autocontrast`` (cutoff 0) per image and channel: ``int((v - lo) * 255 / (hi - lo))``."""
    lo = x.amin(dim=(2, 3), keepdim=True).float()
    hi = x.amax(dim=(2, 3), keepdim=True).float()
    scale = 255.0 / (hi - lo).clamp_min(1.0)
    out = ((x.float() - lo) * scale).floor_().clamp_(0, 255).to(torch.uint8)
    return torch.where(hi > lo, out, x)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Pillow's ``ImageOps.equalize`` per image and channel: ``lut[i] = (step // 2 + #pixels below i) // step``
    with ``step = (#pixels - count of the highest level present) // 255`` (identity when step is 0)."""
    b, c = x.shape[:2]
    flat = x.reshape(b * c, -1).long()
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    levels = torch.arange(256, device=x.device)
    last = torch.where(hist > 0, levels, -1).amax(dim=1, keepdim=True)
    step = (flat.shape[1] - hist.gather(1, last)) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp_(0, 255)
    lut = torch.where(step > 0, lut, levels)
    return lut.gather(1, flat).to(torch.uint8).reshape(x.shape)


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    mask = ((0xFF << (8 - bits)) & 0xFF).to(torch.uint8).view(-1, 1, 1, 1)
    return x & mask


def _solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= threshold.view(-1, 1, 1, 1).to(torch.int16), 255 - x, x)


def _affine_matrix(name: str, param, w: int, h: int) -> list[list[float]]:
    """Pillow's inverse map (output -> input, pixel-edge coordinates) of a geometric op."""
    if name == "rotate":  # Image.rotate: about the centre, counter-clockwise
        t = -math.radians(param)
        a, b, d, e = math.cos(t), math.sin(t), -math.sin(t), math.cos(t)
        cx, cy = w / 2.0, h / 2.0
        return [[a, b, a * -cx + b * -cy + cx], [d, e, d * -cx + e * -cy + cy]]
    if name == "shear_x":
        return [[1.0, param, 0.0], [0.0, 1.0, 0.0]]
    if name == "shear_y":
        return [[1.0, 0.0, 0.0], [param, 1.0, 0.0]]
    if name == "translate_x":
        return [[1.0, 0.0, float(param)], [0.0, 1.0, 0.0]]
    if name == "translate_y":
        return [[1.0, 0.0, 0.0], [0.0, 1.0, float(param)]]
    raise ValueError(f"not a geometric AugMix op: {name!r}")


def _affine(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Bilinear affine warps with black outside (Pillow's ``Image.transform(AFFINE, BILINEAR)``),
    ``matrices``: ``N x 2 x 3`` inverse maps in pixel-edge coordinates."""
    n, _, h, w = x.shape
    m = matrices.to(device=x.device, dtype=torch.float32).view(n, 2, 3, 1, 1)
    xs = torch.arange(w, device=x.device, dtype=torch.float32).add_(0.5).view(1, 1, w)
    ys = torch.arange(h, device=x.device, dtype=torch.float32).add_(0.5).view(1, h, 1)
    u = m[:, 0, 0] * xs + m[:, 0, 1] * ys + m[:, 0, 2]  # N x H x W source points, pixel-edge coordinates
    v = m[:, 1, 0] * xs + m[:, 1, 1] * ys + m[:, 1, 2]
    grid = torch.stack([u * (2.0 / w) - 1.0, v * (2.0 / h) - 1.0], dim=-1)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    # Pillow fills an output pixel whose sample point lies outside the image, clamps the bilinear
    # neighbours at the edges ("border" padding) and truncates to uint8. The tolerances keep
    # float32 rounding from moving points on an edge or values on an integer.
    outside = (u < -1e-3) | (u >= w - 1e-3) | (v < -1e-3) | (v >= h - 1e-3)
    out = out.add_(1e-3).floor_().clamp_(0, 255).to(torch.uint8)
    return out.masked_fill_(outside[:, None], 0)


def _shift(x: torch.Tensor, offsets: Sequence[int], axis: int) -> torch.Tensor:
    """Integer translations, exact (``translate_x``/``_y``: output pixel ``p`` takes input ``p + offset``,
    black from outside), as array copies rather than resampling."""
    out = torch.zeros_like(x)
    size = x.shape[3 - axis]
    for k, off in enumerate(offsets):
        off = int(off)
        if abs(off) >= size:
            continue
        src = x[k].narrow(2 - axis, max(off, 0), size - abs(off))
        out[k].narrow(2 - axis, max(-off, 0), size - abs(off)).copy_(src)
    return out


def augmix_tensors(crops: torch.Tensor, plans: Sequence[AugMixPlan], cfg: PreprocessConfig) -> torch.Tensor:
    """TPT's AugMix of ``N x 3 x H x W`` uint8 crops, one :class:`AugMixPlan` per crop, as normalised
    float32 views: ``m * norm(crop) + (1 - m) * sum_i w_i * norm(chain_i)`` (see :func:`vlm_tta.views.augmix`).
    All chains advance together: at each depth, each op type runs once on the chains that apply it."""
    n, _, h, w = crops.shape
    width = len(plans[0].chains) if plans else 0
    chains = crops.repeat_interleave(width, dim=0)  # chain j of view v at row v * width + j
    ops = [op for plan in plans for op in plan.chains]
    for depth in range(max((len(c) for c in ops), default=0)):
        todo: dict[str, list[tuple[int, object]]] = {}
        for row, chain in enumerate(ops):
            if depth < len(chain):
                name, param = chain[depth]
                kind = "geometric" if name in ("rotate", "shear_x", "shear_y") else name
                todo.setdefault(kind, []).append((row, (name, param)))
        for kind, items in todo.items():
            rows = torch.tensor([r for r, _ in items], device=chains.device)
            x = chains[rows]
            if kind == "autocontrast":
                x = _autocontrast(x)
            elif kind == "equalize":
                x = _equalize(x)
            elif kind == "posterize":
                x = _posterize(x, torch.tensor([p for _, (_, p) in items], device=x.device))
            elif kind == "solarize":
                x = _solarize(x, torch.tensor([p for _, (_, p) in items], device=x.device))
            elif kind in ("translate_x", "translate_y"):
                x = _shift(x, [p for _, (_, p) in items], 0 if kind == "translate_x" else 1)
            else:
                mats = torch.tensor([_affine_matrix(name, p, w, h) for _, (name, p) in items], dtype=torch.float64)
                x = _affine(x, mats)
            chains[rows] = x
    # Normalisation is affine per channel and the weights sum to one, so mixing the pixels and
    # normalising once equals TPT's mix of normalised tensors (up to float rounding).
    weights = torch.from_numpy(np.stack([p.weights for p in plans])).to(crops.device)
    m = torch.from_numpy(np.array([p.m for p in plans], dtype=np.float32)).to(crops.device).view(n, 1, 1, 1)
    chains = chains.view(n, width, 3, h, w)
    mix = torch.zeros((n, 3, h, w), dtype=torch.float32, device=crops.device)
    for i in range(width):
        mix.add_(chains[:, i].to(torch.float32).mul_(weights[:, i].view(n, 1, 1, 1)))
    return normalize_uint8(crops.to(torch.float32).mul_(m).add_(mix.mul_(1.0 - m)), cfg)


# ------------------------------------------------------------------------------------- recipes
def _crop_views(image, cfg, rngs, device, scale):
    hw = V._hw(cfg)
    crops = [sample_crop_flip(r, image.width, image.height, scale) for r in rngs]
    return resized_crops(image_tensor(image, device), crops, hw)


def _augmix_views(image, cfg, rngs, device, scale):
    crops = _crop_views(image, cfg, rngs, device, scale)
    h, w = V._hw(cfg)
    plans = [sample_augmix(r.numpy, w, h) for r in rngs]
    return augmix_tensors(crops, plans, cfg)


_KEY = ("tensor", TENSOR_VIEWS_VERSION)


@V.register_batch_view_recipe("crop_flip_t", key_extra=_KEY)
def _recipe_crop_flip_t(image: Image.Image, cfg: PreprocessConfig, rngs, device) -> torch.Tensor:
    """``crop_flip`` (TPT's ImageNet views) on tensors: same crops and flips, torch resampling."""
    return normalize_uint8(_crop_views(image, cfg, rngs, device, V.DEFAULT_SCALE), cfg)


@V.register_batch_view_recipe("augmix_t", key_extra=_KEY)
def _recipe_augmix_t(image: Image.Image, cfg: PreprocessConfig, rngs, device) -> torch.Tensor:
    """``augmix`` (TPT's fine-grained views) on tensors: same crops, flips, ops and mixing weights."""
    return _augmix_views(image, cfg, rngs, device, V.DEFAULT_SCALE)


@V.register_batch_view_recipe("crop_flip_dmn_t", key_extra=_KEY)
def _recipe_crop_flip_dmn_t(image: Image.Image, cfg: PreprocessConfig, rngs, device) -> torch.Tensor:
    """``crop_flip_dmn`` (DMN's crops, scale (0.5, 1)) on tensors."""
    return normalize_uint8(_crop_views(image, cfg, rngs, device, V.DMN_SCALE), cfg)


@V.register_batch_view_recipe("augmix_dmn_t", key_extra=_KEY)
def _recipe_augmix_dmn_t(image: Image.Image, cfg: PreprocessConfig, rngs, device) -> torch.Tensor:
    """``augmix_dmn`` on tensors."""
    return _augmix_views(image, cfg, rngs, device, V.DMN_SCALE)


#: The tensor-path recipe of each PIL recipe.
TENSOR_RECIPES = {
    "crop_flip": "crop_flip_t",
    "augmix": "augmix_t",
    "crop_flip_dmn": "crop_flip_dmn_t",
    "augmix_dmn": "augmix_dmn_t",
}
