"""transformers backend: ``CLIPModel`` and ``SiglipModel`` from a hub id or a local directory.

The spec grammar is documented on :func:`vlm_tta.models.load_model`; this module does the
``hf:`` half of it (:func:`load_hf`) and wraps models already in memory (:func:`from_hf`).

Text is tokenised the way each model was trained:

* CLIP: ``padding=True, truncation=True, max_length=77`` (the causal mask hides the padding);
* SigLIP: ``padding="max_length", truncation=True, max_length=64`` (the text config's
  ``max_position_embeddings``), and only ``input_ids`` reach the model: SigLIP was trained without
  an attention mask and pools the last position, so passing the tokenizer's mask would change the
  embedding (big_vision and open_clip's SigLIP do the same).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image

from ..errors import ModelSpecError
from .base import PreprocessConfig, TorchBackbone

SUPPORTED_MODEL_TYPES = {"clip": "CLIPModel", "siglip": "SiglipModel"}
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_LOCAL_DIR_HINT = (
    "a local directory with config.json, model.safetensors and the processor files "
    "(preprocessor_config.json or processor_config.json, plus the tokenizer files, e.g. tokenizer.json / "
    "vocab.json+merges.txt for CLIP or "
    "spiece.model for SigLIP), as written by model.save_pretrained(DIR) and processor.save_pretrained(DIR) "
    "or `huggingface-cli download <id> --local-dir DIR`; then pass <fix>"
)
_LOCAL_DIR_FIX = {"model": "hf:/path/to/DIR"}


# --------------------------------------------------------------------------- helpers
def _size_get(size, key):
    if size is None:
        return None
    if isinstance(size, Mapping):
        return size.get(key)
    return getattr(size, key, None)


def _resample_name(resample) -> str:
    if resample is None:
        return "bicubic"
    name = getattr(resample, "name", None)
    if name:
        return name.lower()
    return _RESAMPLE_NAMES.get(int(resample), str(resample))


def preprocess_config_from_image_processor(ip) -> PreprocessConfig:
    """What a transformers image processor does, as a :class:`PreprocessConfig`.

    ``size={"shortest_edge": s}`` + centre crop -> ``"shortest"`` at the crop size (CLIP);
    ``size={"height": h, "width": w}`` without crop -> ``"squash"`` (SigLIP);
    ``{"longest_edge": s}`` -> ``"longest"``.
    """
    size = getattr(ip, "size", None)
    crop = getattr(ip, "crop_size", None) if getattr(ip, "do_center_crop", False) else None
    do_resize = getattr(ip, "do_resize", True)
    if _size_get(size, "shortest_edge") is not None:
        mode = "shortest"
        s = int(_size_get(size, "shortest_edge"))
        image_size = (s, s)
    elif _size_get(size, "longest_edge") is not None and _size_get(size, "height") is None:
        mode = "longest"
        s = int(_size_get(size, "longest_edge"))
        image_size = (s, s)
    elif _size_get(size, "height") is not None:
        mode = "squash"
        image_size = (int(_size_get(size, "height")), int(_size_get(size, "width")))
    else:
        mode, image_size = "shortest", (224, 224)
    if crop is not None and _size_get(crop, "height") is not None:
        image_size = (int(_size_get(crop, "height")), int(_size_get(crop, "width")))
    if not do_resize:
        mode = "none"
    if getattr(ip, "do_normalize", True):
        mean = tuple(float(x) for x in ip.image_mean)
        std = tuple(float(x) for x in ip.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return PreprocessConfig(
        image_size=image_size,
        mean=mean,
        std=std,
        interpolation=_resample_name(getattr(ip, "resample", None)),
        resize_mode=mode,
        fill_color=0,
    )


def _features(out) -> torch.Tensor:
    """``get_image_features``/``get_text_features`` return a tensor (transformers 4) or an output
    object whose ``pooler_output`` holds the projected embedding (transformers 5)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    if isinstance(out, (tuple, list)):
        return out[1] if len(out) > 1 and isinstance(out[1], torch.Tensor) else out[0]
    raise TypeError(f"cannot read embeddings out of {type(out).__name__}")


def _apply_preprocess_overrides(ip, overrides: Mapping | None) -> None:
    if not overrides:
        return
    from PIL.Image import Resampling

    for key, value in dict(overrides).items():
        if key == "mean":
            ip.image_mean = [float(x) for x in value]
        elif key == "std":
            ip.image_std = [float(x) for x in value]
        elif key == "interpolation":
            try:
                ip.resample = Resampling[str(value).upper()]
            except KeyError as err:
                raise ModelSpecError(f"unknown interpolation {value!r}; use bicubic, bilinear, nearest, ...") from err
        else:
            raise ModelSpecError(
                f"preprocessing key {key!r} cannot be overridden for a transformers model (mean, std and "
                "interpolation can); change processor.image_processor yourself and wrap it with "
                "vlm_tta.models.from_hf(model, processor)"
            )


# --------------------------------------------------------------------------- the backbone
class HFModel(TorchBackbone):
    """A transformers ``CLIPModel`` / ``SiglipModel`` behind :class:`VisionLanguageModel`.

    ``model`` is the raw transformers module, ``processor`` its processor (``image_processor`` and
    ``tokenizer`` are its two halves).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        *,
        name: str | None = None,
        device=None,
        precision: str | None = None,
    ):
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelSpecError(
                f"transformers model type {model_type!r} ({type(model).__name__}) is not supported; supported: "
                + ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
            )
        image_processor = getattr(processor, "image_processor", None)
        tokenizer = getattr(processor, "tokenizer", None)
        if image_processor is None or tokenizer is None:
            raise ModelSpecError(
                f"{type(processor).__name__} is not a full processor: it needs .image_processor and .tokenizer "
                "(pass e.g. CLIPProcessor / SiglipProcessor, or AutoProcessor.from_pretrained(...))"
            )
        self.name = name or f"hf:{getattr(config, 'name_or_path', '') or type(model).__name__}"
        self.processor = processor
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.kind = "siglip" if model_type == "siglip" else "clip"
        max_pos = int(getattr(config.text_config, "max_position_embeddings", 77))
        self.max_length = max_pos if self.kind == "siglip" else min(77, max_pos)
        if device is None:
            param = next(model.parameters(), None)
            device = param.device if param is not None else None
        self._setup_module(model, device, precision)
        self.preprocess_cfg = preprocess_config_from_image_processor(image_processor)
        if self.kind == "siglip":
            self._embed_dim = int(config.vision_config.hidden_size)
        else:
            self._embed_dim = int(config.projection_dim)

    # -- hooks for later model-level methods
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model's text inputs (``input_ids`` and, for CLIP, ``attention_mask``) on ``device``."""
        texts = list(texts)
        if self.kind == "siglip":
            enc = self.tokenizer(
                texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            return {"input_ids": enc["input_ids"].to(self.device)}
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        out = {"input_ids": enc["input_ids"].to(self.device)}
        if "attention_mask" in enc:
            out["attention_mask"] = enc["attention_mask"].to(self.device)
        return out

    def prompt_tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        texts = list(texts)
        ids = self.tokenize(texts)["input_ids"].cpu()
        full = self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        return ids, torch.tensor([len(x) > self.max_length for x in full], dtype=torch.bool)

    # -- VisionLanguageModel
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        return _features(self.model.get_text_features(**self.tokenize(texts)))


def from_hf(
    model: torch.nn.Module, processor: Any, name: str | None = None, device=None, precision: str | None = None
) -> HFModel:
    """Wrap a transformers ``CLIPModel``/``SiglipModel`` and its processor already in memory.

    The model is switched to eval mode with gradients off and kept in fp32 on ``device`` (default:
    where its weights already are); preprocessing is the processor's own image processor.
    """
    return HFModel(model, processor, name=name, device=device, precision=precision)


# --------------------------------------------------------------------------- loading
def _is_path(source: str) -> bool:
    return (
        os.path.isabs(source)
        or source.startswith(("~", "./", "../", ".\\", "..\\"))
        or source in (".", "..")
        or (os.sep != "/" and os.sep in source)
        or os.path.isdir(os.path.expanduser(source))
    )


def _short(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def load_hf(
    source: str | os.PathLike,
    pretrained: str | None = "default",
    device=None,
    precision: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
    preprocess_cfg: Mapping | None = None,
) -> HFModel:
    """Load a transformers CLIP/SigLIP from a hub id or a local directory (``hf:`` specs)."""
    import transformers

    source = os.fspath(source)
    if source.startswith("hf:"):
        source = source[3:]
    source = source.strip()
    if not source:
        raise ModelSpecError("empty transformers spec: write 'hf:<hub id>' or 'hf:/path/to/dir'")
    local = _is_path(source)
    if local:
        path = Path(os.path.expanduser(source))
        if not path.is_dir():
            raise ModelSpecError(
                f"transformers model directory not found: {path}. Pass {_LOCAL_DIR_HINT}", fix=_LOCAL_DIR_FIX
            )
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"{path} has no config.json. Pass {_LOCAL_DIR_HINT}", fix=_LOCAL_DIR_FIX)
        source = str(path)
    if pretrained not in ("default", None):
        raise ModelSpecError(
            f"pretrained weights {pretrained!r} are not understood for a transformers model: use the default (the "
            "weights of the hub id / directory) or none (random weights from its config); for other weights pass "
            + _LOCAL_DIR_HINT,
            fix=_LOCAL_DIR_FIX,
        )
    what = f"transformers model {source!r}"
    offline = f"could not load {what}"
    common = dict(cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    try:
        config = transformers.AutoConfig.from_pretrained(source, **common)
    except Exception as err:
        raise ModelSpecError(
            f"{offline} (config: {_short(err)}). If it is not available offline, pass instead {_LOCAL_DIR_HINT}",
            fix=_LOCAL_DIR_FIX,
        ) from err
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelSpecError(
            f"{what} has model_type {model_type!r}; supported transformers architectures: "
            + ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
            + ". open_clip models are loaded by name ('ViT-B-16@openai') or as 'hf-hub:org/repo'"
        )
    model_cls = getattr(transformers, SUPPORTED_MODEL_TYPES[model_type])
    try:
        processor = transformers.AutoProcessor.from_pretrained(source, **common)
    except Exception as err:
        raise ModelSpecError(
            f"{offline} (processor/tokenizer: {_short(err)}). "
            f"If it is not available offline, pass instead {_LOCAL_DIR_HINT}",
            fix=_LOCAL_DIR_FIX,
        ) from err
    _apply_preprocess_overrides(getattr(processor, "image_processor", processor), preprocess_cfg)
    if pretrained is None:
        model = model_cls(config)
        label = f"hf:{source}@random"
    else:
        use_safetensors = None
        if local:
            has_st = any(Path(source).glob("*.safetensors"))
            has_bin = any(Path(source).glob("*.bin"))
            if not has_st and not has_bin:
                raise ModelSpecError(
                    f"{source} has no weights (model.safetensors). Pass {_LOCAL_DIR_HINT}", fix=_LOCAL_DIR_FIX
                )
            use_safetensors = True if has_st else None
        try:
            model = model_cls.from_pretrained(
                source, config=config, use_safetensors=use_safetensors, weights_only=True, dtype=torch.float32, **common
            )
        except Exception as err:
            raise ModelSpecError(
                f"{offline} (weights: {_short(err)}). If it is not available offline, pass instead {_LOCAL_DIR_HINT}",
                fix=_LOCAL_DIR_FIX,
            ) from err
        label = f"hf:{source}"
    return HFModel(model, processor, name=label, device=device, precision=precision)
