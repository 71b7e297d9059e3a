"""open_clip backend: any open_clip architecture with a pretrained tag, a local checkpoint, or a
custom model config.

The spec grammar is documented on :func:`vlm_tta.models.load_model`; this module does the open_clip
half of it (:func:`load_openclip`) and wraps models already in memory (:func:`from_open_clip`).

Decisions worth knowing:

* The tag's QuickGELU flag is honoured: ``ViT-B-16@openai`` builds ViT-B-16 with QuickGELU, as the
  OpenAI weights were trained (``open_clip.create_model("ViT-B-16", "openai")`` only warns).
* Weights are downloaded before the model is built, through ``open_clip.pretrained``, so that any
  failure becomes a :class:`~vlm_tta.errors.ModelSpecError` naming the file to fetch by hand.
* Checkpoints are read with safetensors or ``torch.load(weights_only=True)`` only.
* A custom config (dict / JSON) is built through open_clip's own ``local-dir:`` schema in a
  temporary directory, so open_clip's global model registry is left untouched.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image

from ..errors import FIX, ModelSpecError
from .base import PreprocessConfig, TorchBackbone

#: File suffixes treated as checkpoints when ``pretrained`` is a path.
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz")
_CONFIG_FILE = "open_clip_config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json", "sentencepiece.bpe.model")
_PREPROCESS_KEYS = ("size", "mean", "std", "interpolation", "resize_mode", "fill_color")


class _QuietOpenClip(logging.Filter):
    """Drops open_clip's root-logger warnings about random init / ignored args: we load weights ourselves."""

    PREFIXES = ("No pretrained weights loaded", "Local config loaded, but no CLIP weights", "Ignoring `pretrained=")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


@contextlib.contextmanager
def _quiet_open_clip():
    root = logging.getLogger()
    f = _QuietOpenClip()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


# --------------------------------------------------------------------------- preprocessing as data
def _pair(size) -> tuple[int, int]:
    if isinstance(size, (list, tuple)):
        return (int(size[0]), int(size[1])) if len(size) > 1 else (int(size[0]), int(size[0]))
    return int(size), int(size)


def _interp_name(mode) -> str:
    return getattr(mode, "value", mode) if mode is not None else "bicubic"


def _model_preprocess_dict(model: torch.nn.Module) -> dict:
    """The model's preprocessing cfg (open_clip stores it on ``model.visual``), filled with defaults."""
    from dataclasses import asdict

    import open_clip

    cfg = asdict(open_clip.transform.PreprocessCfg())
    visual = getattr(model, "visual", model)
    if getattr(visual, "image_size", None) is not None:
        cfg["size"] = visual.image_size
    cfg.update({k: v for k, v in (open_clip.get_model_preprocess_cfg(model) or {}).items() if v is not None})
    return cfg


def _config_from_dict(cfg: Mapping) -> PreprocessConfig:
    return PreprocessConfig(
        image_size=_pair(cfg["size"]),
        mean=tuple(float(x) for x in cfg["mean"]),
        std=tuple(float(x) for x in cfg["std"]),
        interpolation=str(_interp_name(cfg.get("interpolation", "bicubic"))),
        resize_mode=str(cfg.get("resize_mode", "shortest")),
        fill_color=int(cfg.get("fill_color", 0) or 0),
    )


def _config_from_transform(transform: Callable, base: Mapping) -> PreprocessConfig:
    """Read resize / crop / normalisation back out of a torchvision ``Compose`` (as open_clip builds
    them); anything not found keeps the model's own cfg in ``base``."""
    import open_clip.transform as oct
    from torchvision import transforms as T

    cfg = dict(base)
    steps = list(getattr(transform, "transforms", [transform]))
    for step in steps:
        if isinstance(step, T.Normalize):
            cfg["mean"], cfg["std"] = tuple(step.mean), tuple(step.std)
        elif isinstance(step, T.Resize):
            size = step.size
            cfg["interpolation"] = _interp_name(step.interpolation)
            if isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1):
                cfg["resize_mode"] = "shortest"
                cfg["size"] = _pair(size)
            else:
                cfg["resize_mode"] = "squash"
                cfg["size"] = _pair(size)
        elif isinstance(step, oct.ResizeKeepRatio):
            cfg["interpolation"] = _interp_name(step.interpolation)
            cfg["resize_mode"] = "longest" if step.longest >= 0.5 else "shortest"
            cfg["size"] = _pair(step.size)
        elif isinstance(step, oct.CenterCropOrPad):
            cfg["size"] = _pair(step.size)
            cfg["fill_color"] = int(step.fill or 0)
        elif isinstance(step, T.CenterCrop):
            cfg["size"] = _pair(step.size)
    return _config_from_dict(cfg)


def _preprocess_overrides(preprocess_cfg: Mapping | None) -> dict:
    """User overrides in :class:`PreprocessConfig` terms (``image_size``) or open_clip's (``size``)."""
    if not preprocess_cfg:
        return {}
    out = {}
    for key, value in dict(preprocess_cfg).items():
        k = "size" if key == "image_size" else key
        if k not in _PREPROCESS_KEYS:
            raise ModelSpecError(
                f"unknown preprocessing key {key!r}; known keys: image_size, mean, std, interpolation, "
                "resize_mode, fill_color"
            )
        out[k] = tuple(value) if isinstance(value, list) else value
    return out


# --------------------------------------------------------------------------- the backbone
class OpenClipModel(TorchBackbone):
    """An open_clip ``CLIP`` / ``CustomTextCLIP`` behind :class:`VisionLanguageModel`.

    ``model`` is the raw open_clip module and ``tokenizer`` its tokenizer (texts -> LongTensor);
    ``transform`` is the eval-time image transform (open_clip's own, built from
    ``model.visual.preprocess_cfg`` unless one is passed).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
        *,
        name: str | None = None,
        device=None,
        precision: str | None = None,
    ):
        import open_clip

        if not (hasattr(model, "encode_image") and hasattr(model, "encode_text") and hasattr(model, "logit_scale")):
            raise ModelSpecError(
                f"{type(model).__name__} is not an open_clip CLIP model (it needs encode_image, encode_text "
                "and logit_scale); build it with open_clip.create_model or create_model_and_transforms"
            )
        if tokenizer is None:
            raise ModelSpecError("an open_clip model needs its tokenizer: pass open_clip.get_tokenizer(model_name)")
        self.name = name or f"open_clip:{type(model).__name__}"
        self.tokenizer = tokenizer
        if device is None:
            param = next(model.parameters(), None)
            device = param.device if param is not None else None
        self._setup_module(model, device, precision)
        base_cfg = _model_preprocess_dict(model)
        if preprocess is None:
            preprocess = open_clip.transform.image_transform_v2(
                open_clip.transform.PreprocessCfg(**{k: base_cfg[k] for k in _PREPROCESS_KEYS if k in base_cfg}),
                is_train=False,
            )
            self.preprocess_cfg = _config_from_dict(base_cfg)
        else:
            self.preprocess_cfg = _config_from_transform(preprocess, base_cfg)
        self.transform = preprocess
        self.kind = "siglip" if getattr(model, "logit_bias", None) is not None else "clip"
        self._embed_dim = self._infer_embed_dim()

    @classmethod
    def from_openai_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor] | str | os.PathLike,
        *,
        quick_gelu: bool = True,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        name: str | None = None,
        device=None,
        precision: str | None = None,
    ) -> "OpenClipModel":
        """A CLIP saved in OpenAI's state-dict format (what OpenAI's ``clip.load`` and TPT's code load:
        keys ``visual.*``, ``transformer.resblocks.*``, ``token_embedding.weight``, ``positional_embedding``,
        ``text_projection``, ``logit_scale``), built through open_clip's
        ``open_clip.model.build_model_from_openai_state_dict`` and wrapped like :func:`from_open_clip`.

        ``state_dict`` is the dict itself or a file: ``.safetensors``, a ``torch.save`` file (read with
        ``torch.load(weights_only=True)``), or OpenAI's TorchScript archive (``ViT-B-16.pt``, read with
        ``torch.jit.load`` and converted with ``.state_dict()``). The architecture (ViT or ResNet, widths,
        layers, image and context size) is read from the tensor shapes; ``quick_gelu=True`` as OpenAI
        trained. The weights are kept in fp32 exactly as given (open_clip's builder rounds them to fp16; they
        are loaded again in full precision afterwards). The tokenizer defaults to open_clip's
        ``SimpleTokenizer`` (OpenAI's BPE) at the model's context length; preprocessing is OpenAI's (bicubic
        resize of the shorter side, centre crop, CLIP mean/std) at the model's image size. Example::

            sd = torch.jit.load("ViT-B-16.pt", map_location="cpu").state_dict()
            model = OpenClipModel.from_openai_state_dict(sd)
        """
        from open_clip.model import build_model_from_openai_state_dict
        from open_clip.tokenizer import SimpleTokenizer

        if not isinstance(state_dict, Mapping):
            state_dict = _read_openai_state_dict(state_dict)
        sd = {k: v for k, v in state_dict.items()}
        missing = [k for k in ("text_projection", "positional_embedding", "token_embedding.weight") if k not in sd]
        if missing:
            raise ModelSpecError(
                f"not an OpenAI-format CLIP state dict (missing {', '.join(missing)}); open_clip checkpoints load "
                "with vlm_tta.load_model(name, pretrained=path)"
            )
        try:
            with _quiet_open_clip():
                model = build_model_from_openai_state_dict(dict(sd), quick_gelu=quick_gelu, cast_dtype=torch.float32)
            model.float()
            extra = {k for k in ("input_resolution", "context_length", "vocab_size") if k in sd}
            model.load_state_dict({k: v for k, v in sd.items() if k not in extra}, strict=True)
        except Exception as err:
            raise ModelSpecError(
                f"open_clip could not build a CLIP from this OpenAI-format state dict ({type(err).__name__}: {err})"
            ) from err
        if tokenizer is None:
            tokenizer = SimpleTokenizer(context_length=int(sd["positional_embedding"].shape[0]))
        name = name or "open_clip:openai-state-dict"
        return cls(model, tokenizer, None, name=name, device=device, precision=precision)

    # -- hooks for later model-level methods
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids (N x context_length) on ``device``."""
        return self.tokenizer(list(texts)).to(self.device)

    def prompt_tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        texts = list(texts)
        ids = self.tokenizer(texts)
        ctx = ids.shape[1]
        try:  # one position more than the model reads: a prompt was cut iff it reaches that position
            longer = self.tokenizer(texts, context_length=ctx + 1)
        except TypeError:  # a user's tokenizer without a context_length argument: cannot tell
            return ids, torch.zeros(len(texts), dtype=torch.bool)
        pad = getattr(getattr(self.tokenizer, "tokenizer", None), "pad_token_id", None)
        return ids, longer[:, ctx] != (0 if pad is None else pad)

    # -- VisionLanguageModel
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenize(texts))

    def _infer_embed_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor) and proj.ndim == 2:
            return int(proj.shape[1])
        if isinstance(proj, torch.nn.Linear):
            return int(proj.out_features)
        dim = getattr(getattr(self.model, "visual", None), "output_dim", None)
        if isinstance(dim, int):
            return dim
        return int(self.encode_texts(["a"], normalize=False).shape[1])


def _read_openai_state_dict(path: str | os.PathLike) -> dict:
    """An OpenAI-format state dict from a file (safetensors, torch.save with weights_only, or TorchScript)."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise ModelSpecError(f"state-dict file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        try:  # OpenAI's released .pt files are TorchScript archives
            return torch.jit.load(path, map_location="cpu").state_dict()
        except Exception:
            raise ModelSpecError(
                f"could not read {path} as a state dict (torch.load(weights_only=True): {type(err).__name__}) nor as "
                "a TorchScript archive; re-save it with torch.save(model.state_dict(), ...) or safetensors"
            ) from err
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelSpecError(f"{path} does not hold a state dict (got {type(data).__name__})")
    return data


def from_open_clip(
    model: torch.nn.Module,
    preprocess: Callable[[Image.Image], torch.Tensor] | None,
    tokenizer: Callable[[list[str]], torch.Tensor],
    name: str | None = None,
    device=None,
    precision: str | None = None,
) -> OpenClipModel:
    """Wrap an open_clip model already in memory (``open_clip.create_model_and_transforms``' output).

    ``preprocess`` is the eval transform (the third value ``create_model_and_transforms`` returns);
    ``None`` builds it from ``model.visual.preprocess_cfg``. Its resize, crop and normalisation are
    read back into ``preprocess_cfg`` (and hence the fingerprint). The model is switched to eval mode
    with gradients off and kept in fp32 on ``device`` (default: where its weights already are).
    """
    return OpenClipModel(model, tokenizer, preprocess, name=name, device=device, precision=precision)


# --------------------------------------------------------------------------- loading
def _suggest(name: str, choices: Sequence[str], n: int = 5) -> str:
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not close:
        lower = {c.lower(): c for c in choices}
        close = [lower[c] for c in difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.5)]
    return f" Did you mean: {', '.join(close)}?" if close else ""


def _looks_like_path(value: str) -> bool:
    return (
        os.sep in value
        or "/" in value
        or value.startswith(("~", "."))
        or value.lower().endswith(CHECKPOINT_SUFFIXES)
        or os.path.exists(value)
    )


def _checkpoint_path(value: str | os.PathLike, what: str) -> str:
    path = Path(os.path.expanduser(os.fspath(value)))
    if path.is_dir():
        import open_clip.factory as ocf

        found = ocf._find_checkpoint_in_dir(path)
        if found is None:
            raise ModelSpecError(
                f"no checkpoint in directory {path} (looked for *.safetensors, *.bin, *.pth); pass the "
                f"checkpoint file itself for {what}, e.g. {FIX}",
                fix={"pretrained": str(path / "open_clip_model.safetensors")},
            )
        return found
    if not path.is_file():
        raise ModelSpecError(
            f"checkpoint file not found: {path} (the pretrained weights of {what} must be an existing "
            ".safetensors/.bin/.pt file, a known pretrained tag, or none for random weights)"
        )
    return str(path)


def _hf_file_hint(tag_cfg: Mapping) -> tuple[str, str]:
    """(where to download, file name to pass) for a pretrained tag's config."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if tag_cfg.get("file"):
        return tag_cfg["file"], os.path.basename(tag_cfg["file"])
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)  # "org/repo/" -> ("org/repo", "")
        if not filename:
            base = f"https://huggingface.co/{repo}/resolve/main"
            return f"{base}/{HF_SAFE_WEIGHTS_NAME} (or {base}/{HF_WEIGHTS_NAME})", HF_SAFE_WEIGHTS_NAME
        return f"https://huggingface.co/{repo}/resolve/main/{filename}", filename
    url = tag_cfg.get("url", "")
    return url, os.path.basename(url) or HF_WEIGHTS_NAME


def _download(name: str, tag: str, tag_cfg: Mapping, cache_dir, tokenizer_name: str | None = None) -> str:
    import open_clip.pretrained as ocp

    where, filename = _hf_file_hint(tag_cfg)
    fix = {"model": f"{name}@{tag}", "pretrained": f"/path/to/{filename}"}
    hint = f"On a machine with internet access download {where} and pass the file: {FIX}"
    if tokenizer_name:
        hint += (
            f". Its tokenizer comes from the Hugging Face repo {tokenizer_name!r} too: save it "
            f"(huggingface-cli download {tokenizer_name} --local-dir TOKDIR) and pass it as well"
        )
        fix["tokenizer"] = "/path/to/TOKDIR"
    try:
        path = ocp.download_pretrained(dict(tag_cfg), cache_dir=cache_dir)
    except Exception as err:  # any network / hub / offline error
        raise ModelSpecError(
            f"the weights of open_clip model {name!r} (pretrained tag {tag!r}) are not available offline and "
            f"could not be downloaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). " + hint,
            fix=fix,
        ) from err
    if not path or not os.path.isfile(path):
        raise ModelSpecError(f"open_clip returned no weights file for {name!r}/{tag!r}. " + hint, fix=fix)
    return path


def _load_checkpoint(model: torch.nn.Module, path: str, what: str) -> None:
    import open_clip

    try:
        open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
    except Exception as err:
        text = str(err)
        if "weights_only" in text or "Unpickl" in type(err).__name__ or "TorchScript" in text:
            raise ModelSpecError(
                f"refusing to unpickle {path}: it holds Python objects beyond tensors and is only read with "
                "torch.load(weights_only=True). Re-save its state dict with safetensors "
                "(safetensors.torch.save_file(model.state_dict(), 'model.safetensors')) or "
                f"torch.save(model.state_dict(), ...). ({type(err).__name__}: {text.splitlines()[0] if text else ''})"
            ) from err
        raise ModelSpecError(
            f"checkpoint {path} does not fit {what} ({type(err).__name__}: {text.splitlines()[0] if text else ''}); "
            "check that the architecture name matches the checkpoint"
        ) from err


def _build_tokenizer(
    tokenizer,
    text_cfg: Mapping,
    context_length: int,
    *,
    builtin_name: str | None,
    local_dir: Path | None,
    cache_dir,
    what: str,
):
    """The tokenizer: the user's object or directory, open_clip's for a built-in name, or the one a
    custom config asks for (``text_cfg.hf_tokenizer_name``, else open_clip's SimpleTokenizer)."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}) or {})
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is not None:
        source = Path(os.path.expanduser(os.fspath(tokenizer)))
        if not source.is_dir():
            raise ModelSpecError(f"tokenizer directory not found: {source}")
        try:
            return HFTokenizer(
                str(source), context_length=context_length, tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs
            )
        except Exception as err:
            raise ModelSpecError(
                f"could not read a Hugging Face tokenizer from {source} ({type(err).__name__}: {err}); the directory "
                "needs the files AutoTokenizer.save_pretrained writes (tokenizer.json, tokenizer_config.json, ...)"
            ) from err
    hf_name = text_cfg.get("hf_tokenizer_name", "")
    try:
        if builtin_name is not None:
            return open_clip.get_tokenizer(builtin_name, context_length=context_length, cache_dir=cache_dir)
        if hf_name:
            source = hf_name
            if local_dir is not None and any((local_dir / f).is_file() for f in _TOKENIZER_FILES):
                source = str(local_dir)
            return HFTokenizer(
                source,
                context_length=context_length,
                cache_dir=cache_dir,
                tokenizer_mode=text_cfg.get("tokenizer_mode"),
                **kwargs,
            )
        return SimpleTokenizer(context_length=context_length, **kwargs)
    except Exception as err:
        raise ModelSpecError(
            f"the tokenizer of {what} (Hugging Face tokenizer {hf_name!r}) is not available offline and could not "
            f"be downloaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). On a machine "
            f"with internet access save it (huggingface-cli download {hf_name} --local-dir DIR, or "
            f"AutoTokenizer.from_pretrained(...).save_pretrained(DIR)) and pass {FIX}",
            fix={"tokenizer": "/path/to/DIR"},
        ) from err


def _split_custom_config(cfg: Mapping) -> tuple[dict, dict, str | None]:
    """(model cfg, preprocess cfg, name) from a raw model config or an ``open_clip_config.json``."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    preprocess = dict(cfg.pop("preprocess_cfg", {}) or {})
    if "model_cfg" in cfg:
        model_cfg = dict(cfg["model_cfg"])
        name = name or model_cfg.pop("name", None)
    else:
        model_cfg = cfg
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise ModelSpecError(
            f"an open_clip model config needs the keys embed_dim, vision_cfg and text_cfg; missing: "
            f"{', '.join(missing)} (see open_clip/model_configs/*.json for examples)"
        )
    return model_cfg, preprocess, name


def _load_custom(
    cfg: Mapping,
    *,
    pretrained,
    default_checkpoint: str | None,
    local_dir: Path | None,
    source: str,
    device,
    precision,
    cache_dir,
    tokenizer,
    preprocess_cfg,
) -> OpenClipModel:
    import open_clip

    model_cfg, file_preprocess, cfg_name = _split_custom_config(cfg)
    name = (
        cfg_name
        or f"custom-{hashlib.sha256(json.dumps(model_cfg, sort_keys=True, default=str).encode()).hexdigest()[:8]}"
    )
    what = f"open_clip config {name!r} ({source})"
    if pretrained == "default":
        if default_checkpoint is None:
            raise ModelSpecError(
                f"{what} comes without weights: pass {FIX} (or a .bin/.pt file), or none for random weights",
                fix={"pretrained": "/path/to/checkpoint.safetensors"},
            )
        checkpoint = default_checkpoint
    elif pretrained is None:
        checkpoint = None
    else:
        checkpoint = _checkpoint_path(pretrained, what)
    text_cfg = model_cfg.get("text_cfg", {}) or {}
    tok = _build_tokenizer(
        tokenizer,
        text_cfg,
        int(text_cfg.get("context_length", 77)),
        builtin_name=None,
        local_dir=local_dir,
        cache_dir=cache_dir,
        what=what,
    )
    with tempfile.TemporaryDirectory(prefix="vlm_tta_openclip_") as tmp:
        with open(os.path.join(tmp, _CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump({"model_cfg": model_cfg, "preprocess_cfg": file_preprocess}, f)
        try:
            with _quiet_open_clip():
                model = open_clip.create_model(
                    f"local-dir:{tmp}",
                    device="cpu",
                    precision="fp32",
                    pretrained_image=False,
                    pretrained_text=False,
                    force_preprocess_cfg=_preprocess_overrides(preprocess_cfg),
                    cache_dir=cache_dir,
                    weights_only=True,
                )
        except ModelSpecError:
            raise
        except Exception as err:
            raise ModelSpecError(f"open_clip could not build {what}: {type(err).__name__}: {err}") from err
    if checkpoint is not None:
        _load_checkpoint(model, checkpoint, what)
    return OpenClipModel(model, tok, None, name=f"open_clip:{name}", device=device, precision=precision)


def _load_hf_hub(repo: str, *, pretrained, cache_dir, **kw) -> OpenClipModel:
    """``hf-hub:org/repo``: an open_clip repository on the Hugging Face Hub (config + weights)."""
    import open_clip.pretrained as ocp
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    hint = (
        f"On a machine with internet access download {_CONFIG_FILE} and {HF_SAFE_WEIGHTS_NAME} (or {HF_WEIGHTS_NAME}) "
        f"plus the tokenizer files from https://huggingface.co/{repo} into one directory "
        f"(huggingface-cli download {repo} --local-dir DIR) and pass {FIX}"
    )
    fix = {"model": "/path/to/DIR"}
    try:
        config_path = ocp.download_pretrained_from_hf(repo, filename=_CONFIG_FILE, cache_dir=cache_dir)
        with open(config_path, encoding="utf-8-sig") as f:
            cfg = json.load(f)
        checkpoint = None
        if pretrained == "default":
            checkpoint = ocp.download_pretrained_from_hf(repo, cache_dir=cache_dir)
    except Exception as err:
        raise ModelSpecError(
            f"open_clip model hf-hub:{repo} is not available offline and could not be downloaded "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). " + hint,
            fix=fix,
        ) from err
    cfg = dict(cfg)
    cfg.setdefault("name", f"hf-hub:{repo}")
    return _load_custom(
        cfg,
        pretrained=checkpoint if pretrained == "default" else pretrained,
        default_checkpoint=None,
        local_dir=None,
        source=f"hf-hub:{repo}",
        cache_dir=cache_dir,
        **kw,
    )


def _load_dir(path: Path, *, pretrained, **kw) -> OpenClipModel:
    """A directory in open_clip's layout: open_clip_config.json + a checkpoint (+ tokenizer files)."""
    config_file = path / _CONFIG_FILE
    if not config_file.is_file():
        raise ModelSpecError(f"{path} has no {_CONFIG_FILE}; an open_clip model directory needs one")
    import open_clip.factory as ocf

    with open(config_file, encoding="utf-8-sig") as f:
        cfg = json.load(f)
    return _load_custom(
        cfg,
        pretrained=pretrained,
        default_checkpoint=ocf._find_checkpoint_in_dir(path),
        local_dir=path,
        source=str(path),
        **kw,
    )


def load_openclip(
    spec: str | Mapping | os.PathLike,
    pretrained: str | os.PathLike | None = "default",
    device=None,
    precision: str | None = None,
    cache_dir: str | None = None,
    tokenizer: Any = None,
    preprocess_cfg: Mapping | None = None,
) -> OpenClipModel:
    """Load an open_clip backbone; see :func:`vlm_tta.models.load_model` for the spec grammar."""
    import open_clip

    kw = dict(
        device=device, precision=precision, cache_dir=cache_dir, tokenizer=tokenizer, preprocess_cfg=preprocess_cfg
    )
    if isinstance(spec, Mapping):
        return _load_custom(
            spec, pretrained=pretrained, default_checkpoint=None, local_dir=None, source="config dict", **kw
        )
    spec = os.fspath(spec)
    if spec.startswith("open_clip:"):
        spec = spec[len("open_clip:") :]
    if spec.startswith("hf-hub:"):
        return _load_hf_hub(spec[len("hf-hub:") :], pretrained=pretrained, **kw)
    if spec.startswith("local-dir:"):
        return _load_dir(Path(os.path.expanduser(spec[len("local-dir:") :])), pretrained=pretrained, **kw)
    if spec.lower().endswith(".json"):
        path = Path(os.path.expanduser(spec))
        if not path.is_file():
            raise ModelSpecError(f"open_clip model config file not found: {path}")
        try:
            with open(path, encoding="utf-8-sig") as f:
                cfg = json.load(f)
        except (OSError, ValueError) as err:
            raise ModelSpecError(f"could not read open_clip model config {path}: {err}") from err
        cfg = dict(cfg)
        cfg.setdefault("name", path.stem)
        return _load_custom(
            cfg, pretrained=pretrained, default_checkpoint=None, local_dir=path.parent, source=str(path), **kw
        )

    name, _, at_tag = spec.partition("@")
    name = name.strip().replace("/", "-")
    at_tag = at_tag.strip() or None
    models = open_clip.list_models()
    if name not in models:
        path = Path(os.path.expanduser(spec))
        if path.is_dir():
            return _load_dir(path, pretrained=pretrained, **kw)
        hint = ""
        if "/" in spec and not os.path.isabs(spec):
            hint = f" For a transformers model write 'hf:{spec}'; for an open_clip Hub repo 'hf-hub:{spec}'."
        raise ModelSpecError(
            f"unknown model {spec!r}: not an open_clip architecture (open_clip.list_models()), a config file or "
            f"a model directory.{_suggest(name, models)}{hint}"
        )
    return _load_named(name, at_tag, pretrained=pretrained, **kw)


def _load_named(
    name: str, at_tag: str | None, *, pretrained, device, precision, cache_dir, tokenizer, preprocess_cfg
) -> OpenClipModel:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    tag_list = ", ".join(tags) if tags else "(none)"
    if at_tag is not None and not open_clip.get_pretrained_cfg(name, at_tag):
        raise ModelSpecError(
            f"unknown pretrained tag {at_tag!r} for open_clip model {name!r}; known tags: {tag_list}."
            f"{_suggest(at_tag, tags)}"
        )
    tag = at_tag
    checkpoint = None
    download = False
    if pretrained == "default":
        if tag is None:
            tag = "openai" if "openai" in tags else (tags[0] if tags else None)
        if tag is None:
            raise ModelSpecError(
                f"open_clip knows no pretrained weights for {name!r}: pass {FIX}, or none for random weights",
                fix={"pretrained": "/path/to/checkpoint.safetensors"},
            )
        download = True
    elif pretrained is not None:
        value = os.fspath(pretrained)
        if not isinstance(pretrained, os.PathLike) and open_clip.get_pretrained_cfg(name, value):
            if at_tag is not None and value != at_tag:
                raise ModelSpecError(
                    f"two different tags for {name!r}: {at_tag!r} in the spec and pretrained={value!r}; give one"
                )
            tag, download = value, True
        elif isinstance(pretrained, os.PathLike) or _looks_like_path(value):
            checkpoint = _checkpoint_path(value, f"open_clip model {name!r}")
        else:
            raise ModelSpecError(
                f"pretrained={value!r} is neither a known tag of open_clip model {name!r} ({tag_list}) nor a "
                f"checkpoint path.{_suggest(value, tags)} Pass a tag, a path to a .safetensors/.bin/.pt file, "
                "or None for random weights"
            )
    # The tag (given, or the default one when only a file is given) supplies preprocessing and QuickGELU.
    cfg_tag = tag or ("openai" if "openai" in tags else (tags[0] if tags else None))
    tag_cfg = dict(open_clip.get_pretrained_cfg(name, cfg_tag) or {}) if cfg_tag else {}
    text_cfg = (open_clip.get_model_config(name) or {}).get("text_cfg", {}) or {}
    if download:
        checkpoint = _download(
            name,
            tag,
            tag_cfg,
            cache_dir,
            tokenizer_name=None if tokenizer is not None else text_cfg.get("hf_tokenizer_name"),
        )
    tok = _build_tokenizer(
        tokenizer,
        text_cfg,
        int(text_cfg.get("context_length", 77)),
        builtin_name=name,
        local_dir=None,
        cache_dir=cache_dir,
        what=f"open_clip model {name!r}",
    )
    overlay = {k: v for k, v in tag_cfg.items() if k in _PREPROCESS_KEYS and k != "size" and v is not None}
    overlay.update(_preprocess_overrides(preprocess_cfg))
    quick_gelu = bool(tag_cfg.get("quick_gelu", False)) and (tag is not None)
    try:
        with _quiet_open_clip():
            model = open_clip.create_model(
                name,
                pretrained=None,
                device="cpu",
                precision="fp32",
                force_quick_gelu=quick_gelu,
                force_preprocess_cfg=overlay,
                pretrained_image=False,
                pretrained_text=False,
                cache_dir=cache_dir,
                weights_only=True,
            )
    except Exception as err:
        raise ModelSpecError(f"open_clip could not build {name!r}: {type(err).__name__}: {err}") from err
    label = f"open_clip:{name}"
    if checkpoint is not None:
        _load_checkpoint(model, checkpoint, f"open_clip model {name!r}")
        label += f"@{tag}" if download else f"@{os.path.basename(checkpoint)}"
    else:
        label += "@random"
    return OpenClipModel(model, tok, None, name=label, device=device, precision=precision)
