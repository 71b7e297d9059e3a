"""One interface over many backbones: :class:`VisionLanguageModel`, built by :func:`load_model`.

open_clip and transformers are imported only when a backbone of theirs is loaded.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from .base import (
    PRECISIONS,
    PreprocessConfig,
    TorchBackbone,
    VisionLanguageModel,
    state_dict_digest,
    validate_classnames,
    validate_templates,
)


def load_model(
    spec: str | Mapping | os.PathLike,
    pretrained: str | os.PathLike | None = "default",
    device=None,
    precision: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
    tokenizer: Any = None,
    preprocess_cfg: Mapping | None = None,
    seed: int = 0,
) -> VisionLanguageModel:
    """Load a frozen CLIP/SigLIP backbone from a spec.

    Spec grammar (``spec``)::

        hf:<hub id>                  transformers CLIPModel / SiglipModel, e.g. hf:google/siglip-base-patch16-224
        hf:<local dir>               the same from a directory (config.json + model.safetensors + processor
                                     files, as save_pretrained writes them), e.g. hf:/models/siglip
        [open_clip:]<name>[@<tag>]   an open_clip architecture (open_clip.list_models()) with a pretrained
                                     tag, e.g. ViT-B-16@openai, ViT-B-16-SigLIP@webli; "ViT-B/16" == "ViT-B-16"
        [open_clip:]hf-hub:<org/repo> an open_clip repository on the Hugging Face Hub
        [open_clip:]local-dir:<dir>  a directory in open_clip's layout: open_clip_config.json + checkpoint
                                     (+ tokenizer files); a bare existing directory path works too
        <file>.json                  an open_clip model config file (see below)
        {dict}                       an open_clip model config: {"embed_dim": ..., "vision_cfg": {...},
                                     "text_cfg": {...}} (the format of open_clip/model_configs/*.json),
                                     optionally with "name" and "preprocess_cfg"; or an
                                     open_clip_config.json-style {"model_cfg": ..., "preprocess_cfg": ...}

    ``pretrained``:

    * ``"default"``: open_clip names: the ``@tag`` if given, else ``openai`` when the name has it, else
      the first of ``open_clip.list_pretrained_tags_by_model(name)``; ``hf:`` / ``hf-hub:`` /
      directories: their own weights; config dicts and JSON files have none (pass a checkpoint or None);
    * ``None``: random weights drawn from ``seed`` (tests, speed measurements): the same seed gives the
      same weights, hence the same predictions and the same cache entries; with ``name@tag`` the tag
      still sets the preprocessing and QuickGELU;
    * an open_clip tag (``"laion2b_s34b_b79k"``) or a local checkpoint path (``.safetensors``, or
      ``.bin``/``.pt``/``.pth`` read with ``torch.load(weights_only=True)``) for open_clip specs. With a
      path, preprocessing comes from the ``@tag`` if one is given, else the name's default tag.

    Offline with the weights missing, the :class:`~vlm_tta.errors.ModelSpecError` says which file to
    download and what to pass instead (``pretrained="/path/to/open_clip_model.safetensors"`` or
    ``"hf:/path/to/dir"``). Nothing is ever unpickled beyond tensors, and transformers remote code runs
    only with ``trust_remote_code=True``.

    Args:
        device: default ``"cuda"`` when available, else ``"cpu"``.
        precision: ``"fp32"``, ``"amp"`` (fp32 weights, fp16 autocast on CUDA) or ``"amp_bf16"``
            (bf16 autocast on CUDA and, opt-in, on the CPU); default ``"amp"`` on CUDA, ``"fp32"`` on CPU.
        trust_remote_code: passed to transformers (config/processor/model); off by default.
        cache_dir: download cache for open_clip / transformers (default: their own).
        tokenizer: open_clip only: a tokenizer object, or a local directory with Hugging Face tokenizer
            files for models whose tokenizer would otherwise be downloaded (SigLIP, ...).
        preprocess_cfg: overrides of the backbone's preprocessing (keys ``image_size``, ``mean``,
            ``std``, ``interpolation``, ``resize_mode``, ``fill_color``; transformers: mean, std,
            interpolation). They change the fingerprint.
        seed: the seed of random weights (``pretrained=None`` only); the caller's RNG state is untouched.

    Returns:
        A :class:`VisionLanguageModel` in eval mode with gradients off; ``.model`` is the raw module.

    Raises:
        ModelSpecError: unknown name/tag/architecture (with close matches), missing file, weights
            unavailable offline, or a checkpoint that does not fit the architecture.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        from ..errors import OptionError

        raise OptionError(f"seed must be an integer; got {seed!r}")
    if pretrained is None:
        import torch

        # Random weights from a private seed: repeatable, and the caller's RNG state is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _load(spec, None, device, precision, trust_remote_code, cache_dir, tokenizer, preprocess_cfg)
    return _load(spec, pretrained, device, precision, trust_remote_code, cache_dir, tokenizer, preprocess_cfg)


def _load(spec, pretrained, device, precision, trust_remote_code, cache_dir, tokenizer, preprocess_cfg):
    backend, target = _route(spec)
    if backend == "hf":
        if tokenizer is not None:
            from ..errors import ModelSpecError

            raise ModelSpecError(
                "a separate tokenizer is only used by open_clip models; a transformers model uses its processor's"
            )
        from .huggingface import load_hf

        return load_hf(
            target,
            pretrained,
            device=device,
            precision=precision,
            trust_remote_code=trust_remote_code,
            cache_dir=cache_dir,
            preprocess_cfg=preprocess_cfg,
        )
    from .openclip import load_openclip

    return load_openclip(
        target,
        pretrained,
        device=device,
        precision=precision,
        cache_dir=cache_dir,
        tokenizer=tokenizer,
        preprocess_cfg=preprocess_cfg,
    )


def _route(spec: str | Mapping | os.PathLike) -> tuple[str, Any]:
    """Which backend loads ``spec`` (``"hf"`` or ``"open_clip"``) and what it is given."""
    from ..errors import ModelSpecError

    if isinstance(spec, Mapping):
        return "open_clip", spec
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelSpecError(
            f"a model spec is a string, a path or an open_clip config dict, not {type(spec).__name__}; "
            "wrap models already in memory with vlm_tta.models.from_open_clip / from_hf"
        )
    text = os.fspath(spec)
    if not text.strip():
        raise ModelSpecError("empty model spec; e.g. 'ViT-B-16@openai' or 'hf:google/siglip-base-patch16-224'")
    if text.startswith("hf:"):
        return "hf", text
    path = os.path.expanduser(text)
    if (
        not text.startswith(("open_clip:", "hf-hub:", "local-dir:"))
        and os.path.isdir(path)
        and os.path.isfile(os.path.join(path, "config.json"))
        and not os.path.isfile(os.path.join(path, "open_clip_config.json"))
    ):
        return "hf", path  # a transformers directory given without the hf: prefix
    return "open_clip", spec


def from_open_clip(model, preprocess, tokenizer, name: str | None = None, device=None, precision: str | None = None):
    """Wrap an open_clip model in memory; see :func:`vlm_tta.models.openclip.from_open_clip`."""
    from .openclip import from_open_clip as _wrap

    return _wrap(model, preprocess, tokenizer, name=name, device=device, precision=precision)


def from_hf(model, processor, name: str | None = None, device=None, precision: str | None = None):
    """Wrap a transformers CLIPModel/SiglipModel in memory; see :func:`vlm_tta.models.huggingface.from_hf`."""
    from .huggingface import from_hf as _wrap

    return _wrap(model, processor, name=name, device=device, precision=precision)


def __getattr__(name: str):  # lazy access to the backend classes without importing open_clip/transformers
    if name == "OpenClipModel":
        from .openclip import OpenClipModel

        return OpenClipModel
    if name == "HFModel":
        from .huggingface import HFModel

        return HFModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PRECISIONS",
    "HFModel",
    "OpenClipModel",
    "PreprocessConfig",
    "TorchBackbone",
    "VisionLanguageModel",
    "from_hf",
    "from_open_clip",
    "load_model",
    "state_dict_digest",
    "validate_classnames",
    "validate_templates",
]
