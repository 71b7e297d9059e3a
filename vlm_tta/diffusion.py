"""Stable Diffusion image variations for DiffTPT, generated once and kept in the shared cache.

DiffTPT (Feng, Yu, Liu, Khan, Zuo, "Diverse Data Augmentation with Diffusions for Effective
Test-time Prompt Tuning", ICCV 2023) adds to TPT's views images generated from the test image by
Stable Diffusion *image variations*: Stable Diffusion v1-4 fine-tuned by Lambda Labs to condition
on the CLIP ViT-L/14 image embedding of a picture instead of a caption. This module makes those
images with diffusers' ``StableDiffusionImageVariationPipeline``:

    >>> gen = ImageVariations()                        # lambdalabs/sd-image-variations-diffusers @ v2.0
    >>> report = gen.generate(images)                  # only the generations not in the cache yet
    >>> arrays = gen.load([content_hash(im) for im in images])   # count x H x W x 3 uint8 each

What the reference generator does (chunmeifeng/DiffTPT, ``image_generator_R.py``) and the defaults
here (:class:`VariationSettings`):

* checkpoint ``lambdalabs/sd-image-variations-diffusers``, revision ``v2.0``; ``guidance_scale=3``;
  everything else at the pipeline's defaults: 50 steps of the checkpoint's own scheduler (PNDM),
  512 x 512 output; the safety checker is switched off;
* the conditioning input is the test image as a tensor, resized to 224 x 224 (bicubic,
  ``antialias=False``, aspect ratio not kept) and CLIP-normalised (``conditioning="reference"``,
  which is also what the checkpoint's model card prescribes); ``conditioning="feature_extractor"``
  hands the PIL image to the pipeline's own ``CLIPImageProcessor`` instead (shorter side to 224
  with antialiasing, centre crop);
* the generated images are saved as files with the test image's extension (``.jpg`` for
  ImageNet-R, so JPEG at Pillow's default quality 75) and read back from those files: the
  default ``jpeg_quality=75`` passes each generation through the same JPEG round trip;
  ``jpeg_quality=None`` keeps the generated pixels losslessly;
* DiffTPT's loader reads 63 generations per test image (``count=63``; the generator makes 65).

Differences on purpose: the reference draws the noise from the global RNG (so its generations are not
reproducible); here generation ``i`` of an image starts from a ``torch.Generator`` seeded from
``(seed, image content hash, i)``, on the CPU, so a generation is a pure function of its key,
whatever the batch it is made in or the device (up to the device's floating-point differences).
Generations are stored, as ``H x W x 3`` uint8 arrays, in the shared
:class:`~vlm_tta.cache.EmbeddingCache` under a content address: ``("diffusion", version, pipeline
identity, settings, image content hash, index)``, where the pipeline identity is the hub id and
revision, or a SHA-256 of the weights for a local folder or a pipeline object. The number of
generations is not part of the key, so asking for 65 after 63 makes two more. The key names the
recipe, not the hardware: fp16 (CUDA) and fp32 (CPU) runs of one key differ in the last bits and
whichever ran first is the one everybody reads.

Stored size (``store_size=224``): the shorter side is resized to 224 px (bicubic, as CLIP's own
``Resize(224)`` does) before storing. For the backbones DiffTPT reports (CLIP RN50 and ViT-B/16:
224 px, bicubic shorter-side resize, centre crop) the views made from the stored image are
bit-identical to those made from the 512 px original (resizing a 224 px side to 224 px is the
identity), at 150,528 bytes per generation instead of 786,432. Backbones with a larger input
(336 px, SigLIP 384 px) need ``store_size=None`` (keep the generated size) or a larger value;
:func:`vlm_tta.methods.difftpt.generated_views` refuses stored images smaller than the backbone's input.

Weights are loaded with ``from_pretrained`` from a hub id or a local folder (safetensors when the
folder has them; PyTorch ``.bin`` files are read by diffusers/transformers with
``torch.load(weights_only=True)``; no remote code), in fp16 on CUDA and fp32 on CPU. Without
weights (offline, not in the Hugging Face cache) :class:`DiffusionWeightsError` says what to
download and what to pass; generations already in the cache are read without any weights.
The ``vlm-tta generate`` verb (:func:`add_parser`) pre-generates a dataset or a folder.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
from PIL import Image

from .cache import EmbeddingCache, as_cache, make_key
from .errors import FIX, ImageError, VlmTtaError
from .images import content_hash, load_image

if TYPE_CHECKING:
    import torch

# torch, torchvision, models.base and views are imported where they are used: building the
# `vlm-tta` parser imports this module for `add_parser`, and the light verbs (cache, datasets,
# templates) must not pay for torch.

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CONDITIONINGS",
    "DEFAULT_MODEL",
    "DEFAULT_REVISION",
    "DiffusionOptionError",
    "DiffusionWeightsError",
    "GenerationReport",
    "GenerationsMissingError",
    "ImageVariations",
    "VariationSettings",
    "add_parser",
    "check_available",
    "conditioning_pixels",
    "load_pipeline",
    "pipeline_identity",
    "run",
]

DEFAULT_MODEL = "lambdalabs/sd-image-variations-diffusers"
DEFAULT_REVISION = "v2.0"
#: Part of every generation's cache key: bump it when the output for the same key changes.
GENERATION_VERSION = 1
#: OpenAI CLIP's normalisation, which the reference applies to the conditioning image.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONDITIONINGS = ("reference", "feature_extractor")
#: Pipeline folders that are read (the safety checker is never loaded).
_COMPONENTS = ("unet", "vae", "image_encoder", "scheduler", "feature_extractor")


class DiffusionWeightsError(VlmTtaError, FileNotFoundError):
    """The image-variation pipeline's weights are not available (offline and not cached, or a
    folder that is not a diffusers pipeline)."""


class GenerationsMissingError(VlmTtaError, LookupError):
    """Generations asked for from the cache only are not there."""


class DiffusionOptionError(VlmTtaError, ValueError):
    """A generation setting has an invalid value."""


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        extra = " or None" if allow_none else ""
        raise DiffusionOptionError(f"{name} must be a positive integer{extra}; got {value!r}")


@dataclass(frozen=True)
class VariationSettings:
    """How the variations of an image are made (all but ``count`` enter the cache key)."""

    count: int = 63  # DiffTPT code: the loader reads batch_size - 1 = 63 generations per image
    steps: int = 50  # diffusers' default num_inference_steps (the reference passes none)
    guidance_scale: float = 3.0  # DiffTPT generator, ``pipe(images, guidance_scale=3)``
    height: int = 512  # the pipeline's default for this checkpoint (UNet sample size 64 x VAE factor 8)
    width: int = 512
    scheduler: str | None = None  # a diffusers scheduler class name; None: the checkpoint's own (PNDM)
    conditioning: str = "reference"  # DiffTPT generator: tensor resized 224 bicubic antialias=False
    seed: int = 0
    jpeg_quality: int | None = 75  # DiffTPT generator: saved as .jpg (Pillow's default quality), read back
    store_size: int | None = 224  # shorter side stored (see the module docstring); None: as generated

    def __post_init__(self) -> None:
        for name in ("count", "steps", "height", "width"):
            _positive_int(name, getattr(self, name))
        _positive_int("store_size", self.store_size, allow_none=True)
        if self.height % 8 or self.width % 8:
            raise DiffusionOptionError(f"height and width must be multiples of 8; got {self.height} x {self.width}")
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not np.isfinite(g) or g < 0:
            raise DiffusionOptionError(f"guidance_scale must be a finite number >= 0; got {g!r}")
        if self.conditioning not in CONDITIONINGS:
            raise DiffusionOptionError(
                f"conditioning must be one of {', '.join(CONDITIONINGS)}; got {self.conditioning!r}"
            )
        if self.jpeg_quality is not None and (
            isinstance(self.jpeg_quality, bool)
            or not isinstance(self.jpeg_quality, int)
            or not 1 <= self.jpeg_quality <= 100
        ):
            raise DiffusionOptionError(f"jpeg_quality must be an integer in 1..100 or None; got {self.jpeg_quality!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise DiffusionOptionError(f"seed must be an integer; got {self.seed!r}")
        if self.scheduler is not None and (not isinstance(self.scheduler, str) or not self.scheduler.strip()):
            raise DiffusionOptionError(
                f"scheduler must be a diffusers scheduler class name or None; got {self.scheduler!r}"
            )
        object.__setattr__(self, "guidance_scale", float(g))

    def key_dict(self) -> dict:
        """The settings that change a generation (everything but ``count``)."""
        d = dataclasses.asdict(self)
        d.pop("count")
        return d


# ----------------------------------------------------------------------------------------------
# Pipelines: identity, availability, loading
# ----------------------------------------------------------------------------------------------


def _local_path(spec: str | os.PathLike) -> Path | None:
    """The folder ``spec`` names, or None when it is a hub id (``owner/name``). A string that looks
    like a path (absolute, ``./``, ``~``, or more than one ``/``) is a folder even if it is missing."""
    text = os.fspath(spec)
    path = Path(os.path.expanduser(text))
    if path.is_dir() or isinstance(spec, Path) or text.startswith((".", "/", "~")) or text.count("/") != 1:
        return path
    return None


def _weights_error(
    message: str, spec: str = DEFAULT_MODEL, revision: str | None = DEFAULT_REVISION
) -> DiffusionWeightsError:
    """The error for weights that are not here: what to download, and the option that takes the folder
    (``--diffusion DIR`` on the command line, ``diffusion=DIR`` in Python)."""
    rev = f" --revision {revision}" if revision else ""
    return DiffusionWeightsError(
        f"{message} On a machine with internet, download it with `hf download {spec}{rev} --local-dir "
        "/path/to/sd-variations --exclude 'safety_checker/*'` (huggingface_hub's CLI; the safety checker is not "
        f"needed), copy that folder here and pass it: {FIX}. Or generate the views on that machine with "
        "`vlm-tta generate` and copy its cache directory (VLM_TTA_CACHE_DIR): cached generations need no weights.",
        fix={"diffusion": "/path/to/sd-variations"},
    )


def _offline(local_files_only: bool | None) -> bool:
    if local_files_only is not None:
        return bool(local_files_only)
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - a dependency of diffusers
        return False


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise _weights_error(f"image-variation pipeline folder not found: {path}.")
    if not (path / "model_index.json").is_file():
        raise DiffusionWeightsError(
            f"{path} is not a diffusers pipeline folder (no model_index.json). Pass the folder that "
            f"`save_pretrained` or `hf download {DEFAULT_MODEL} --revision {DEFAULT_REVISION}` wrote."
        )


def check_available(
    pipeline: Any = DEFAULT_MODEL, revision: str | None = DEFAULT_REVISION, local_files_only: bool | None = None
) -> None:
    """Raise :class:`DiffusionWeightsError` when ``pipeline`` (hub id or folder) cannot be loaded
    here: a missing folder, or a hub id that is not in the local Hugging Face cache while offline
    (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``). Cheap: reads no weights. Online, a hub id
    that is not cached passes (``from_pretrained`` downloads it)."""
    if not isinstance(pipeline, (str, os.PathLike)):
        return  # a pipeline object in memory
    path = _local_path(pipeline)
    if path is not None:
        _check_folder(path)
        return
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(str(pipeline), "model_index.json", revision=revision)
    if isinstance(found, str):
        return
    if _offline(local_files_only):
        raise _weights_error(
            f"the image-variation weights {pipeline!r} (revision {revision}) are not in the local Hugging Face "
            "cache and downloads are off (offline).",
            str(pipeline),
            revision,
        )


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(
    pipeline: str | os.PathLike = DEFAULT_MODEL,
    revision: str | None = DEFAULT_REVISION,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    local_files_only: bool | None = None,
    use_safetensors: bool | None = None,
):
    """``StableDiffusionImageVariationPipeline.from_pretrained`` from a hub id (at ``revision``) or
    a local folder, without the safety checker, on ``device`` (default CUDA when available) in
    ``dtype`` (default fp16 on CUDA, fp32 elsewhere). ``use_safetensors=None`` takes safetensors
    when present and ``.bin`` files (read with ``weights_only=True``) otherwise; no remote code.
    Raises :class:`DiffusionWeightsError` with what to download when the weights are not here."""
    import torch

    check_available(pipeline, revision, local_files_only)
    device = torch.device(device or default_device())
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    from diffusers import StableDiffusionImageVariationPipeline

    path = _local_path(pipeline)
    kwargs: dict[str, Any] = dict(
        safety_checker=None, requires_safety_checker=False, torch_dtype=dtype, use_safetensors=use_safetensors
    )
    if path is None:
        kwargs.update(revision=revision, local_files_only=_offline(local_files_only))
    source = os.fspath(path) if path is not None else str(pipeline)
    try:
        pipe = StableDiffusionImageVariationPipeline.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub, network and file errors come in many classes
        hub = path is None
        raise _weights_error(
            f"could not load the image-variation pipeline {source!r}"
            + (f" (revision {revision})" if hub else "")
            + f": {type(exc).__name__}: {exc}.",
            str(pipeline) if hub else DEFAULT_MODEL,
            revision if hub else DEFAULT_REVISION,
        ) from exc
    return pipe.to(device)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _folder_digest(path: Path) -> str:
    """SHA-256 over ``model_index.json`` and every file of the components that are loaded (names
    and contents; hidden files and the safety checker left out)."""
    h = hashlib.sha256()
    files = [path / "model_index.json"]
    for comp in _COMPONENTS:
        folder = path / comp
        if folder.is_dir():
            files += sorted(
                p
                for p in folder.rglob("*")
                if p.is_file() and not any(s.startswith(".") for s in p.parts[len(path.parts) :])
            )
    for p in files:
        h.update(f"{p.relative_to(path).as_posix()}:{_file_sha256(p)};".encode())
    return h.hexdigest()


def _config_dict(obj: Any) -> Any:
    if obj is None:
        return None
    if hasattr(obj, "to_dict"):  # transformers processors
        d = obj.to_dict()
    else:  # diffusers ConfigMixin
        d = dict(getattr(obj, "config", {}))
    return {str(k): v for k, v in d.items() if not str(k).startswith("_")}


def _object_digest(pipe: Any) -> str:
    """SHA-256 over the weights of the UNet, VAE and image encoder and the scheduler's and feature
    extractor's configurations."""
    from .models.base import state_dict_digest

    h = hashlib.sha256()
    for name in ("unet", "vae", "image_encoder"):
        h.update(f"{name}:{state_dict_digest(getattr(pipe, name))};".encode())
    for name in ("scheduler", "feature_extractor"):
        comp = getattr(pipe, name, None)
        desc = {"class": type(comp).__name__, "config": _config_dict(comp)}
        h.update(f"{name}:{json.dumps(desc, sort_keys=True, default=str)};".encode())
    return h.hexdigest()


def pipeline_identity(pipeline: Any = DEFAULT_MODEL, revision: str | None = DEFAULT_REVISION) -> str:
    """What names a pipeline in the cache keys: ``hub:<id>@<revision>`` for a hub id, or
    ``sha256:<digest>`` of the weights for a local folder (files) or a pipeline object (tensors)."""
    if isinstance(pipeline, (str, os.PathLike)):
        path = _local_path(pipeline)
        if path is None:
            return f"hub:{pipeline}@{revision}"
        _check_folder(path)
        return "folder-sha256:" + _folder_digest(path)
    return "object-sha256:" + _object_digest(pipeline)


# ----------------------------------------------------------------------------------------------
# Conditioning and post-processing
# ----------------------------------------------------------------------------------------------


def conditioning_pixels(images: Sequence[Image.Image], mode: str, pipe: Any) -> torch.Tensor:
    """``B x 3 x S x S`` float32 input of the pipeline's image encoder (S its input size, 224 for
    CLIP ViT-L/14). ``"reference"``: ToTensor, Resize((S, S), bicubic, antialias=False), CLIP
    normalisation (DiffTPT's generator and the checkpoint's model card); ``"feature_extractor"``:
    the pipeline's own ``CLIPImageProcessor``."""
    if mode == "feature_extractor":
        return pipe.feature_extractor(images=list(images), return_tensors="pt").pixel_values.float()
    import torch
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    size = int(pipe.image_encoder.config.image_size)
    out = []
    for img in images:
        t = TF.resize(TF.to_tensor(img), [size, size], InterpolationMode.BICUBIC, antialias=False)
        out.append(TF.normalize(t, CLIP_MEAN, CLIP_STD))
    return torch.stack(out)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """diffusers' own float -> 8-bit conversion (``numpy_to_pil``): round(x * 255)."""
    return (images * 255).round().astype(np.uint8)


def finish_generation(pixels: np.ndarray, settings: VariationSettings) -> np.ndarray:
    """One generated ``H x W x 3`` uint8 image as it is stored: the JPEG round trip of the reference
    (when ``jpeg_quality``), then the shorter side resized to ``store_size`` (bicubic; never enlarged)."""
    img = Image.fromarray(pixels, mode="RGB")
    if settings.jpeg_quality is not None:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=settings.jpeg_quality)
        buf.seek(0)
        with Image.open(buf) as decoded:
            img = decoded.convert("RGB")
    if settings.store_size is not None and min(img.size) > settings.store_size:
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        img = TF.resize(img, settings.store_size, InterpolationMode.BICUBIC)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


# ----------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------


@dataclass
class GenerationReport:
    """What one :meth:`ImageVariations.generate` call did."""

    images: int  # source images asked for
    generated: int  # generations computed now
    cached: int  # generations already in the cache (identical images counted once)
    images_generated: int  # distinct source images that needed at least one generation
    seconds: float  # wall time of the generation (pipeline + storing)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.images_generated if self.images_generated else 0.0

    @property
    def seconds_per_generation(self) -> float:
        return self.seconds / self.generated if self.generated else 0.0

    def as_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "seconds_per_image": self.seconds_per_image,
            "seconds_per_generation": self.seconds_per_generation,
        }


class ImageVariations:
    """The image variations of test images, made once and read from the shared cache after.

    Args:
        diffusion: a hub id (default ``lambdalabs/sd-image-variations-diffusers``), a local folder
            written by ``save_pretrained`` / ``hf download``, or a ``StableDiffusionImageVariationPipeline``
            object (used where it is, as it is; its scheduler and safety checker are set for each
            call and restored after).
        revision: the hub revision (default ``v2.0``); ignored for folders and objects.
        settings: a :class:`VariationSettings`; or give its fields as keyword ``options``.
        cache: an :class:`~vlm_tta.cache.EmbeddingCache`, a directory, True (the default location)
            or False (no cache: everything is generated and only returned).
        device: where a loaded pipeline runs (default CUDA when available); fp16 on CUDA, fp32 on CPU.
        batch_size: generations per pipeline call (any mix of images and generation indices;
            results do not depend on it, up to the float rounding of batched kernels: a few pixel
            values in 10^5 differ by one grey level on CPU). Each batch is committed to the cache at once.
        local_files_only: never download (default: ``HF_HUB_OFFLINE``).
        use_safetensors: passed to ``from_pretrained`` (None: safetensors when present).
        exif_transpose: apply image files' EXIF orientation when decoding them (the library's
            default, see :func:`~vlm_tta.images.load_image`); pass the same choice as to ``classify``,
            since it changes the image's content hash. The reference ignores EXIF (False).

    Nothing is loaded until a generation is missing: :meth:`load` and cache hits need no weights.
    """

    def __init__(
        self,
        diffusion: Any = DEFAULT_MODEL,
        *,
        revision: str | None = DEFAULT_REVISION,
        settings: VariationSettings | None = None,
        cache: EmbeddingCache | bool | str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 4,
        local_files_only: bool | None = None,
        use_safetensors: bool | None = None,
        exif_transpose: bool = True,
        **options: Any,
    ) -> None:
        if settings is None:
            settings = VariationSettings(**options)
        elif options:
            settings = dataclasses.replace(settings, **options)
        _positive_int("batch_size", batch_size)
        self.settings = settings
        self.cache = as_cache(cache)
        self.revision = revision
        self.device = device
        self.batch_size = int(batch_size)
        self.local_files_only = local_files_only
        self.use_safetensors = use_safetensors
        self.exif_transpose = bool(exif_transpose)
        self._spec = diffusion if isinstance(diffusion, (str, os.PathLike)) else None
        self._pipe = None if self._spec is not None else diffusion
        self._identity: str | None = None
        if self._spec is not None and _local_path(self._spec) is not None:
            _check_folder(_local_path(self._spec))  # a wrong folder is reported at once
        self.calls = 0  # pipeline calls made (tests and benchmarks read it)

    def __repr__(self) -> str:
        what = repr(os.fspath(self._spec)) if self._spec is not None else type(self._pipe).__name__
        return f"ImageVariations({what}, {self.settings})"

    # -- identity and keys ------------------------------------------------------------------------

    @property
    def identity(self) -> str:
        """The pipeline part of the cache keys (see :func:`pipeline_identity`)."""
        if self._identity is None:
            self._identity = pipeline_identity(self._spec if self._spec is not None else self._pipe, self.revision)
        return self._identity

    def keys(self, image_hash: str, indices: Sequence[int] | None = None) -> list[str]:
        """Cache keys of generations ``indices`` (default ``0 .. count-1``) of the image whose
        :func:`~vlm_tta.images.content_hash` is ``image_hash``."""
        idx = range(self.settings.count) if indices is None else indices
        settings = self.settings.key_dict()
        return [make_key("diffusion", GENERATION_VERSION, self.identity, settings, image_hash, int(i)) for i in idx]

    def missing(self, image_hashes: Sequence[str]) -> list[tuple[int, int]]:
        """``(image position, generation index)`` of the generations not in the cache."""
        keys = [self.keys(h) for h in image_hashes]
        present = self.cache.present([k for ks in keys for k in ks])
        return [(i, j) for i, ks in enumerate(keys) for j, k in enumerate(ks) if k not in present]

    # -- the pipeline -------------------------------------------------------------------------------

    def check_available(self) -> None:
        """Raise :class:`DiffusionWeightsError` now when generating would need weights that are not here."""
        if self._pipe is None:
            check_available(self._spec, self.revision, self.local_files_only)

    @property
    def pipeline(self):
        """The diffusers pipeline (loaded on first use)."""
        if self._pipe is None:
            self._pipe = load_pipeline(
                self._spec,
                self.revision,
                device=self.device,
                local_files_only=self.local_files_only,
                use_safetensors=self.use_safetensors,
            )
        return self._pipe

    @contextlib.contextmanager
    def _prepared(self) -> Iterator[Any]:
        """The pipeline with the settings' scheduler, no safety checker and no inner progress bar;
        whatever was set before is put back afterwards (the user's pipeline object is left as it was)."""
        pipe = self.pipeline
        saved = {name: getattr(pipe, name, None) for name in ("scheduler", "safety_checker")}
        saved_bar = getattr(pipe, "_progress_bar_config", None)
        try:
            if self.settings.scheduler is not None:
                pipe.scheduler = _make_scheduler(self.settings.scheduler, pipe.scheduler)
            pipe.safety_checker = None
            pipe.set_progress_bar_config(disable=True)
            yield pipe
        finally:
            for name, value in saved.items():
                setattr(pipe, name, value)
            if saved_bar is None:
                pipe.__dict__.pop("_progress_bar_config", None)
            else:
                pipe._progress_bar_config = saved_bar

    def _decode(self, src: Any) -> Image.Image:
        return load_image(src, exif_transpose=self.exif_transpose)

    def _generator(self, image_hash: str, index: int) -> torch.Generator:
        from .views import ViewRNG

        return ViewRNG(f"diffusion|{self.settings.seed}|{image_hash}|{int(index)}").torch

    def _run_batch(self, pipe: Any, cond: torch.Tensor, gens: list[torch.Generator]) -> list[np.ndarray]:
        s = self.settings
        out = pipe(
            image=cond,
            height=s.height,
            width=s.width,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance_scale,
            generator=gens,
            output_type="np",
        ).images
        self.calls += 1
        return [finish_generation(x, s) for x in _to_uint8(np.asarray(out))]

    # -- generation ---------------------------------------------------------------------------------

    def generate(
        self,
        images: Sequence[Any],
        *,
        image_hashes: Sequence[str] | None = None,
        progress: bool | None = None,
        _keep: dict | None = None,
    ) -> GenerationReport:
        """Make the generations of ``images`` (paths, PIL images, arrays) that are not in the cache.

        Missing generations are made ``batch_size`` at a time, in one pipeline call per batch, and
        each batch is committed to the cache in one transaction, so an interrupted run loses at most
        one batch and the next run makes only what is still missing. ``progress``: a bar over the
        generations (default: when stderr is a terminal).
        """
        start = time.perf_counter()
        if image_hashes is None:  # decoded again below only if some of its generations are missing
            hashes = [content_hash(self._decode(src)) for src in images]
        else:
            hashes = list(image_hashes)
            if len(hashes) != len(images):
                raise ValueError(f"got {len(hashes)} image hashes for {len(images)} images")
        first = {}  # identical images share their generations: each distinct one is made once
        for i, h in enumerate(hashes):
            first.setdefault(h, i)
        unique = list(first)
        jobs = self.missing(unique)
        if jobs:
            self._generate_jobs([images[first[h]] for h in unique], unique, jobs, progress, _keep)
        return GenerationReport(
            images=len(hashes),
            generated=len(jobs),
            cached=len(unique) * self.settings.count - len(jobs),
            images_generated=len({i for i, _ in jobs}),
            seconds=time.perf_counter() - start if jobs else 0.0,
        )

    def _generate_jobs(self, images, hashes, jobs, progress, keep) -> None:
        import torch

        bar = None
        show = progress if progress is not None else (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc="generating", unit="gen")
        conds: dict[int, torch.Tensor] = {}
        try:
            with self._prepared() as pipe:
                for start in range(0, len(jobs), self.batch_size):
                    batch = jobs[start : start + self.batch_size]
                    need = sorted({i for i, _ in batch if i not in conds})
                    if need:
                        pixels = conditioning_pixels(
                            [self._decode(images[i]) for i in need], self.settings.conditioning, pipe
                        )
                        conds.update(zip(need, pixels))
                    cond = torch.stack([conds[i] for i, _ in batch])
                    arrays = self._run_batch(pipe, cond, [self._generator(hashes[i], j) for i, j in batch])
                    items = [(self.keys(hashes[i], [j])[0], a) for (i, j), a in zip(batch, arrays)]
                    self.cache.put_many(items)
                    if keep is not None:
                        keep.update(items)
                    # the conditioning of an image whose generations are all made is dropped
                    done = {i for i, _ in batch} - {i for i, _ in jobs[start + self.batch_size :]}
                    for i in done:
                        conds.pop(i, None)
                    if bar is not None:
                        bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()

    # -- reading ------------------------------------------------------------------------------------

    def load(self, image_hashes: Sequence[str]) -> list[np.ndarray]:
        """The stored generations of each image (``count x H x W x 3`` uint8), from the cache only:
        no weights are needed. Raises :class:`GenerationsMissingError` naming what is missing."""
        keys = [self.keys(h) for h in image_hashes]
        found = self.cache.get_many([k for ks in keys for k in ks])
        return self._stack(image_hashes, keys, found)

    def _stack(self, image_hashes: Sequence[str], keys: list[list[str]], found: dict) -> list[np.ndarray]:
        missing = [(h, j) for h, ks in zip(image_hashes, keys) for j, k in enumerate(ks) if k not in found]
        if missing:
            n_images = len({h for h, _ in missing})
            raise GenerationsMissingError(
                f"{len(missing)} of {sum(len(ks) for ks in keys)} image variations ({n_images} image(s), e.g. "
                f"generation {missing[0][1]} of image {missing[0][0][:12]}...) are not in the cache at "
                f"{self.cache.directory} for {self.identity} with {self.settings}. Make them with "
                "`vlm-tta generate` (same --diffusion and settings), or give DiffTPT the pipeline's weights."
            )
        out = []
        for ks in keys:
            arrays = [found[k] for k in ks]
            if len({a.shape for a in arrays}) > 1:
                raise GenerationsMissingError(
                    f"stored generations of one image differ in size: {[a.shape for a in arrays]}"
                )
            out.append(np.stack(arrays) if arrays else np.zeros((0, 0, 0, 3), np.uint8))
        return out

    def __call__(
        self, images: Sequence[Any], *, image_hashes: Sequence[str] | None = None, progress: bool | None = False
    ) -> list[np.ndarray]:
        """The generations of ``images`` (``count x H x W x 3`` uint8 each): read from the cache,
        the missing ones generated first. Works with the cache off too (then nothing is kept)."""
        if image_hashes is None:
            images = [self._decode(src) for src in images]
            image_hashes = [content_hash(im) for im in images]
        made: dict[str, np.ndarray] = {}
        self.generate(images, image_hashes=image_hashes, progress=progress, _keep=made)
        keys = [self.keys(h) for h in image_hashes]
        found = self.cache.get_many([k for ks in keys for k in ks if k not in made])
        found.update(made)
        return self._stack(image_hashes, keys, found)


def _make_scheduler(name: str, current: Any) -> Any:
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not isinstance(cls, type) or not hasattr(cls, "from_config") or not name.endswith("Scheduler"):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("_"))
        raise DiffusionOptionError(f"unknown diffusers scheduler {name!r}; known: {', '.join(known)}")
    return cls.from_config(current.config)


# ----------------------------------------------------------------------------------------------
# Command line: vlm-tta generate
# ----------------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``generate`` verb to an argparse subparsers object."""
    d = VariationSettings()
    p = subparsers.add_parser(
        "generate",
        help="pre-generate DiffTPT's diffusion views into the cache",
        description=(
            "Generate Stable Diffusion image variations (DiffTPT's views) for a dataset or for image files/folders, "
            "and store them in the shared cache. Only generations that are not cached yet are made, so an interrupted "
            "run resumes where it stopped."
        ),
    )
    p.add_argument("inputs", nargs="*", help="image files or folders (searched recursively)")
    p.add_argument("--dataset", help="a built-in dataset name (see `vlm-tta datasets`)")
    p.add_argument("--data-root", help="the dataset's folder (with --dataset)")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument(
        "--subset", type=int, default=None, metavar="N", help="a seeded random subset of N images (DiffTPT: 1000)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --subset (default 0)")
    p.add_argument("--subset-file", default=None, help="save the subset to / read it from this JSON file")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N images")
    p.add_argument(
        "--diffusion", default=DEFAULT_MODEL, help=f"hub id or local pipeline folder (default {DEFAULT_MODEL})"
    )
    p.add_argument("--revision", default=DEFAULT_REVISION, help=f"hub revision (default {DEFAULT_REVISION})")
    p.add_argument("--count", type=int, default=d.count, help=f"generations per image (default {d.count})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"denoising steps (default {d.steps})")
    p.add_argument(
        "--guidance", type=float, default=d.guidance_scale, help=f"guidance scale (default {d.guidance_scale:g})"
    )
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--scheduler", default=None, help="diffusers scheduler class (default: the checkpoint's own)")
    p.add_argument("--conditioning", choices=CONDITIONINGS, default=d.conditioning)
    p.add_argument("--generation-seed", type=int, default=d.seed, help="seed of the generations (default 0)")
    p.add_argument(
        "--jpeg-quality", type=int, default=d.jpeg_quality, help="JPEG round trip quality; 0: lossless (default 75)"
    )
    p.add_argument(
        "--store-size", type=int, default=d.store_size, help="stored shorter side; 0: as generated (default 224)"
    )
    p.add_argument("--batch-size", type=int, default=4, help="generations per pipeline call (default 4)")
    p.add_argument(
        "--ignore-exif", action="store_true", help="ignore EXIF orientation (as the reference; use what classify uses)"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def _image_files(inputs: Sequence[str]) -> list[str]:
    from .data.base import is_image_file

    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(str(p) for p in path.rglob("*") if p.is_file() and is_image_file(p.name))
        elif path.is_file():
            files.append(str(path))
        else:
            raise VlmTtaError(f"no such image file or folder: {item}")
    return files


def _sources(args: argparse.Namespace) -> list[Any]:
    if args.dataset:
        if args.inputs:
            raise VlmTtaError("give either --dataset or image files/folders, not both")
        if not args.data_root:
            raise VlmTtaError("--dataset needs --data-root DIR (the folder that holds the dataset)")
        from .data import get_dataset, subset

        ds = get_dataset(args.dataset, args.data_root, split=args.split)
        if args.subset is not None:
            ds = subset(ds, args.subset, seed=args.seed, path=args.subset_file)
        sources = ds.paths
    else:
        if not args.inputs:
            raise VlmTtaError("give image files/folders, or --dataset NAME --data-root DIR")
        sources = _image_files(args.inputs)
    if args.limit is not None:
        sources = sources[: max(0, args.limit)]
    if not sources:
        raise VlmTtaError("no images to generate for")
    return list(sources)


def run(args: argparse.Namespace) -> int:
    """Carry out ``vlm-tta generate``; returns the exit status. Under torchrun each rank makes the
    generations of every n-th image on its own GPU, into its node's cache (see the README)."""
    from .distributed import torchrun_world

    with torchrun_world(args.device) as world:
        return _generate(args, world)


def _generate(args: argparse.Namespace, world) -> int:
    gen = ImageVariations(
        args.diffusion,
        revision=args.revision,
        cache=EmbeddingCache(args.cache_dir),
        device=world.device if world.distributed else args.device,
        batch_size=args.batch_size,
        exif_transpose=not args.ignore_exif,
        count=args.count,
        steps=args.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        scheduler=args.scheduler,
        conditioning=args.conditioning,
        seed=args.generation_seed,
        jpeg_quality=args.jpeg_quality or None,
        store_size=args.store_size or None,
    )
    if not gen.cache.writable:
        raise VlmTtaError(f"the cache at {gen.cache.directory} cannot be written; generated views would be lost")
    sources, hashes, skipped = [], [], []
    mine = _sources(args)[world.rank :: world.size]  # the whole list in a single process
    prefix = f"[{world.label}] " if world.distributed else ""
    for src in mine:
        try:
            hashes.append(content_hash(gen._decode(src)))
            sources.append(src)
        except ImageError as exc:  # as dataset streams do: report and go on
            skipped.append(src)
            print(f"{prefix}vlm-tta: skipping an unreadable image: {exc}", file=sys.stderr)
    if not sources and not world.distributed:  # (a rank's share may be empty or unreadable)
        raise VlmTtaError("none of the images could be read")
    if gen.missing(hashes):
        gen.check_available()  # before any generation: a clear error when the weights are not here
    quiet = args.no_progress or args.json or world.rank > 0  # one progress bar: rank 0's
    report = gen.generate(sources, image_hashes=hashes, progress=False if quiet else None)
    summary = {**report.as_dict(), "skipped": len(skipped), "pipeline": gen.identity, "cache": str(gen.cache.directory)}
    if world.distributed:
        summary.update(rank=world.rank, world_size=world.size)
    if args.json:
        print(json.dumps(summary, indent=None if world.distributed else 2))  # one line per rank
    else:
        print(
            f"{prefix}{report.images} images x {gen.settings.count} generations: {report.generated} generated, "
            f"{report.cached} already cached"
            + (
                f"; {report.seconds:.1f} s, {report.seconds_per_image:.2f} s per image "
                f"({report.seconds_per_generation:.3f} s per generation)"
                if report.generated
                else ""
            )
            + (f"; {len(skipped)} unreadable image(s) skipped" if skipped else "")
            + f"\ncache: {gen.cache.directory}"
        )
    return 0
