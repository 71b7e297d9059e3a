"""Decoding images of any kind into 8-bit RGB PIL images, and hashing their content.

One place knows how every PIL mode becomes RGB, so datasets, ``classify`` and the views agree:

* ``L``/``LA``/``P``/``PA``/``RGBA``/``CMYK``/``YCbCr``... are converted by PIL; modes with alpha are
  composited onto white first (a transparent pixel becomes white, not whatever colour hides under
  alpha 0);
* 16- and 32-bit integer modes (``I;16``, ``I;16B``, ``I``) are scaled from their bit depth to 0..255
  (PIL's own ``convert("RGB")`` clips them to 255, which turns most 16-bit images white);
* float mode ``F`` is taken as 0..1 when its maximum is at most 1, else as 0..255.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, "torch.Tensor"]  # noqa: F821

# Decompression-bomb guard: PIL's default limit (~89 MP) warns, twice that raises. Real benchmark
# images are far smaller; we raise our own clear error above this many pixels.
MAX_PIXELS = 16384 * 16384


def _integer_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        scale = 65535.0
    else:  # mode "I": 32-bit signed; 16-bit PNGs are often decoded as "I" too
        scale = 65535.0 if arr.max(initial=0) <= 65535 and arr.min(initial=0) >= 0 else float(arr.max() or 1)
    arr8 = np.clip(np.round(arr.astype(np.float64) * (255.0 / scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr8, mode="L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` as an 8-bit RGB image, converting every PIL mode correctly (see module doc)."""
    if img.width < 1 or img.height < 1:
        raise ImageError(f"image has size {img.width}x{img.height}; it must be at least 1x1 pixels")
    if img.width * img.height > MAX_PIXELS:
        raise ImageError(
            f"image has {img.width}x{img.height} pixels, more than the {MAX_PIXELS:,} vlm_tta accepts; "
            "downscale it first"
        )
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        return _integer_to_rgb(img)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ImageError("float image contains NaN or infinite pixel values")
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        arr8 = np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def _array_to_rgb(arr: np.ndarray) -> Image.Image:
    """HWC/HW uint8 or float arrays, and CHW tensors' numpy view, to RGB."""
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ImageError(f"an image array must be HxW, HxWx3, HxWx4 or 3xHxW; got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ImageError(f"image array is empty (shape {tuple(arr.shape)})")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError("image array contains NaN or infinite values")
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise ImageError(
                "float image arrays must hold values in [0, 1] "
                f"(got min {arr.min():.3g}, max {arr.max():.3g}); pass uint8 for 0..255"
            )
        arr = np.round(arr * 255.0).astype(np.uint8)
    elif arr.dtype == np.uint16:
        arr = np.round(arr.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    elif arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise ImageError(f"integer image arrays must hold 0..255 (dtype {arr.dtype})")
        arr = arr.astype(np.uint8)
    mode = "L" if arr.ndim == 2 else ("RGB" if arr.shape[-1] == 3 else "RGBA")
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr), mode=mode))


def _oriented(img: Image.Image) -> Image.Image:
    """``img`` turned upright by its EXIF orientation tag (a phone photo taken upright is stored on its
    side with tag 6 or 8); unchanged when it has no tag."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block is ignored, as browsers do
        return img
    return ImageOps.exif_transpose(img) if orientation not in (None, 1) else img


def load_image(src: ImageLike, exif_transpose: bool = True) -> Image.Image:
    """Decode ``src`` (a path, PIL image, numpy array or torch tensor) into an RGB PIL image.

    Arrays/tensors are ``HxW``, ``HxWxC`` or ``CxHxW`` (C in 1, 3, 4), uint8 in 0..255, uint16, or
    float in [0, 1]. Raises :class:`~vlm_tta.errors.ImageError` with the reason on anything else.

    ``exif_transpose`` (default True) applies the EXIF orientation of files and PIL images, as
    transformers' image loading does; pass False to reproduce reference pipelines that ignore it
    (``PIL.Image.open(...).convert("RGB")``, as TPT and most TTA code bases do).
    """
    if isinstance(src, Image.Image):
        try:
            src.load()
        except OSError as exc:
            raise ImageError(f"could not decode the PIL image: {exc}") from exc
        return to_rgb(_oriented(src) if exif_transpose else src)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        try:
            with Image.open(path) as img:
                img.load()
                if exif_transpose:
                    upright = _oriented(img)
                    if upright is not img:
                        return to_rgb(upright)
                return to_rgb(img) if img.mode != "RGB" else img.copy()
        except ImageError as exc:
            raise ImageError(f"{path}: {exc}") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageError(f"could not read image {path}: {exc}; is it a valid image file?") from exc
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        torch = None
    if torch is not None and isinstance(src, torch.Tensor):
        return _array_to_rgb(src.detach().cpu().numpy())
    raise ImageError(
        f"cannot use an object of type {type(src).__name__} as an image; pass a path, a PIL image, "
        "a numpy array or a torch tensor"
    )


def content_hash(img: Image.Image) -> str:
    """SHA-256 of an RGB image's decoded pixels and size: the same picture hashes the same whether
    it came from a path, a PIL image or an array."""
    rgb = to_rgb(img)
    h = hashlib.sha256()
    h.update(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()
