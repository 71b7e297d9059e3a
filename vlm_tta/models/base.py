"""The one interface every backbone offers: :class:`VisionLanguageModel`.

A backend (open_clip, transformers) implements four things: its own image preprocessing, the
image encoder, the text encoder, and a fingerprint of its weights. Everything built on top of
them (ensembled class embeddings, logits with the model's scale and bias) lives here once.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from PIL import Image

from ..errors import FIX, ClassNamesError, ModelSpecError
from ..validation import validate_classnames, validate_templates  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class PreprocessConfig:
    """What the backbone's own preprocessing does, as data (view recipes read it).

    ``resize_mode`` follows open_clip: ``"shortest"`` resizes the shorter side to ``image_size``
    then centre-crops (CLIP), ``"squash"`` resizes both sides to ``image_size`` without cropping
    (SigLIP in transformers), ``"longest"`` resizes the longer side and pads with ``fill_color``.
    """

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


#: Precisions a backbone runs at. Weights always stay fp32; "amp" autocasts to fp16 on CUDA (fp32 on
#: the CPU) and "amp_bf16" to bfloat16 on CUDA and on the CPU (opt-in there: the CPU default is fp32).
PRECISIONS = ("fp32", "amp", "amp_bf16")

#: The context the encoders run in when no gradients are needed: inference mode (no autograd
#: bookkeeping at all, not even version counters); results are returned as normal tensors.
_INFERENCE = torch.inference_mode


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def state_dict_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, shapes and bytes).

    Costs one pass over the weights (about 0.3 s for ViT-B/16 on CPU); backends compute it once at
    load time and again only when :meth:`VisionLanguageModel.refresh_fingerprint` is called.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            t = t.to("cpu").contiguous().reshape(-1)  # reshape: 0-dim tensors (logit_scale) cannot be viewed as bytes
            h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


class VisionLanguageModel(ABC):
    """A frozen image/text dual encoder (CLIP or SigLIP) behind one interface.

    Attributes set by every backend:
      ``name``          human-readable spec (``"open_clip:ViT-B-16/openai"``, ``"hf:google/siglip-..."``)
      ``preprocess_cfg`` a :class:`PreprocessConfig`
      ``device``        where the weights live
      ``precision``     ``"fp32"``, ``"amp"`` or ``"amp_bf16"`` (fp32 weights, autocast; see :data:`PRECISIONS`)
      ``kind``          ``"clip"`` or ``"siglip"``
    """

    name: str
    preprocess_cfg: PreprocessConfig
    device: torch.device
    precision: str
    kind: str

    # ----------------------------------------------------------------- backend hooks
    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The backbone's own preprocessing of one RGB PIL image: a normalised 3xHxW float tensor."""

    @abstractmethod
    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Un-normalised image embeddings (B x D) of preprocessed pixels already on ``device``."""

    @abstractmethod
    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Un-normalised text embeddings (N x D)."""

    @property
    @abstractmethod
    def logit_scale(self) -> float:
        """exp of the learned temperature parameter (100 for OpenAI CLIP)."""

    @property
    def logit_bias(self) -> float | None:
        """SigLIP's learned bias; None for CLIP."""
        return None

    @property
    @abstractmethod
    def weights_digest(self) -> str:
        """A digest of the weights (see :func:`state_dict_digest`)."""

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """Dimension D of the joint embedding space."""

    # ----------------------------------------------------------------- shared behaviour
    @property
    def fingerprint(self) -> str:
        """Changes whenever weights, preprocessing or precision change: the cache key's model part."""
        return _digest(
            {
                "backend": type(self).__name__,
                "kind": self.kind,
                "weights": self.weights_digest,
                "preprocess": self.preprocess_cfg.as_dict(),
                "precision": self._precision_key(),
            }
        )[:32]

    def refresh_fingerprint(self) -> str:
        """Recompute the weights digest after the weights were changed in place; returns the new
        fingerprint. Backends cache the digest at load time, so call this after editing weights."""
        return self.fingerprint

    def _precision_key(self) -> str:
        # bf16 autocast on the CPU computes differently from the fp32 that "amp_bf16" meant there
        # before it was supported, so its embeddings get their own fingerprint.
        if self.precision == "amp_bf16" and self.device.type == "cpu":
            return "amp_bf16:cpu-autocast"
        return self.precision

    def autocast(self):
        """fp32 weights with autocast on CUDA (TPT's recipe: fp16 for "amp", bf16 for "amp_bf16"), bf16
        autocast on the CPU for "amp_bf16" (opt-in); plain fp32 otherwise."""
        if self.device.type == "cuda" and self.precision in ("amp", "amp_bf16"):
            return torch.autocast("cuda", dtype=torch.bfloat16 if self.precision == "amp_bf16" else torch.float16)
        if self.device.type == "cpu" and self.precision == "amp_bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def compile(self, **options) -> "VisionLanguageModel":
        """Compile the image encoder with ``torch.compile(**options)`` (e.g. ``mode="max-autotune"``)
        and return the model. Optional and not bit-exact (fused kernels round differently); the first
        batch of each shape pays the compilation. The fingerprint does not change (same weights)."""
        self._encode_images = torch.compile(self._encode_images, **options)  # type: ignore[method-assign]
        return self

    def encode_images(self, pixels: torch.Tensor, normalize: bool = True, batch_size: int = 256) -> torch.Tensor:
        """Embeddings (B x D, float32, on CPU) of preprocessed pixels (B x 3 x H x W), computed in
        inference mode under :meth:`autocast`."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be B x 3 x H x W; got shape {tuple(pixels.shape)}")
        outs = []
        with _INFERENCE():
            for start in range(0, len(pixels), batch_size):
                chunk = pixels[start : start + batch_size].to(self.device, non_blocking=True)
                with self.autocast():
                    outs.append(self._encode_images(chunk).float().cpu())
            emb = torch.cat(outs) if outs else torch.empty(0, self.embed_dim)
            emb = torch.nn.functional.normalize(emb, dim=-1) if normalize else emb
        return emb.clone()  # a normal tensor: callers may use it in autograd (TPT's loss)

    def encode_texts(self, texts: Sequence[str], normalize: bool = True, batch_size: int = 1000) -> torch.Tensor:
        """Embeddings (N x D, float32, on CPU) of ``texts``, computed in inference mode."""
        texts = list(texts)
        outs = []
        with _INFERENCE():
            for start in range(0, len(texts), batch_size):
                with self.autocast():
                    outs.append(self._encode_texts(texts[start : start + batch_size]).float().cpu())
            emb = torch.cat(outs) if outs else torch.empty(0, self.embed_dim)
            emb = torch.nn.functional.normalize(emb, dim=-1) if normalize else emb
        return emb.clone()

    def class_embeddings(
        self,
        classnames: Sequence[str],
        templates: Sequence[str] = ("a photo of a {}.",),
        allow_duplicates: bool = False,
    ) -> torch.Tensor:
        """C x D class embeddings: each template's text embedding is L2-normalised, the templates are
        averaged per class, and the mean is re-normalised (CLIP's prompt ensembling, Radford et al. 2021)."""
        names = validate_classnames(classnames, allow_duplicates)
        temps = validate_templates(templates)
        texts = [t.format(name) for name in names for t in temps]
        self.check_prompts(names, temps, allow_duplicates)
        emb = self.encode_texts(texts, normalize=True).view(len(names), len(temps), -1)
        return torch.nn.functional.normalize(emb.mean(dim=1), dim=-1)

    def prompt_tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(token ids exactly as the text encoder sees them (N x L), cut (N,) bool)``, where ``cut``
        marks texts longer than the context length; None when the backend cannot tell."""
        return None

    def check_prompts(
        self, classnames: Sequence[str], templates: Sequence[str], allow_duplicates: bool = False
    ) -> None:
        """Refuse class names whose prompts the tokenizer cannot tell apart (CLIP lowercases: "Cat"
        and "cat"; two long names that differ only after the context length), which would give
        identical embeddings and a meaningless tie; warn when a prompt is cut at the context length."""
        texts = [t.format(name) for name in classnames for t in templates]
        tokens = self.prompt_tokens(texts)
        if tokens is None:
            return
        ids, cut = tokens
        n_t = len(templates)
        per_class = ids.reshape(len(classnames), n_t * ids.shape[1]).cpu().numpy()
        if not allow_duplicates:
            groups: dict[bytes, list[int]] = {}
            for c, row in enumerate(per_class):
                groups.setdefault(row.tobytes(), []).append(c)
            clashes = [g for g in groups.values() if len(g) > 1]
            if clashes:
                shown = "; ".join(" = ".join(f"{classnames[c]!r} (#{c})" for c in g) for g in clashes[:5])
                more = f" and {len(clashes) - 5} more group(s)" if len(clashes) > 5 else ""
                raise ClassNamesError(
                    f"these classes give identical prompts after tokenization, so the model cannot tell them apart: "
                    f"{shown}{more}. This tokenizer lowercases, strips accents/extra spaces or cuts prompts at its "
                    f"context length; rename them, or pass {FIX} to accept the tie",
                    fix={"allow_duplicate_classnames": True},
                )
        cut_classes = sorted({i // n_t for i in torch.nonzero(cut).flatten().tolist()})
        if cut_classes:
            import warnings

            shown = ", ".join(repr(_abbrev(classnames[c])) for c in cut_classes[:10])
            more = f" and {len(cut_classes) - 10} more" if len(cut_classes) > 10 else ""
            warnings.warn(
                f"the prompts of {len(cut_classes)} class(es) are longer than the text encoder's context length "
                f"({ids.shape[1]} tokens) and were cut: {shown}{more}; shorten these class names",
                PromptTruncatedWarning,
                stacklevel=3,
            )

    def logits(self, image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        """``logit_scale * cos(image, class) (+ logit_bias)`` for L2-normalised inputs (... x D, C x D)."""
        out = self.logit_scale * image_emb @ class_emb.T
        if self.logit_bias is not None:
            out = out + self.logit_bias
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, device={self.device}, precision={self.precision})"


def _abbrev(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PromptTruncatedWarning(UserWarning):
    """A class prompt is longer than the text encoder's context length and was cut."""


def resolve_device(device=None) -> torch.device:
    """``device`` as a :class:`torch.device`; None means CUDA when available, else CPU. A device that
    does not exist or is not available here is a :class:`~vlm_tta.errors.ModelSpecError`."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ModelSpecError(
            f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N' (or 'mps' on Apple silicon)",
            fix={"device": "cpu"},
        ) from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelSpecError(
                f"device {device!r} was asked for but CUDA is not available on this machine "
                f"(torch.cuda.is_available() is False); use {FIX}",
                fix={"device": "cpu"},
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelSpecError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelSpecError(
            f"device {device!r}: MPS is not available on this machine; use {FIX}", fix={"device": "cpu"}
        )
    return dev


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """``precision`` checked against :data:`PRECISIONS`; None means "amp" on CUDA, "fp32" elsewhere."""
    if precision is None:
        return "amp" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ModelSpecError(
            f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r} (weights always stay fp32, "
            "'amp' autocasts to fp16 on CUDA, 'amp_bf16' to bfloat16 on CUDA and the CPU)"
        )
    return precision


class TorchBackbone(VisionLanguageModel):
    """Shared plumbing of backends that wrap one ``torch.nn.Module`` (kept as ``self.model``).

    The module is put in eval mode with ``requires_grad=False`` on every parameter, kept in fp32 on
    ``device``; its weights digest is computed once here and again on :meth:`refresh_fingerprint`.
    The digest covers the state dict and the module tree (paths and class names), so two models whose
    weights agree but whose activations differ (GELU vs QuickGELU) do not share a fingerprint.
    """

    model: torch.nn.Module

    def _setup_module(self, module: torch.nn.Module, device, precision: str | None) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        module.eval()
        module.requires_grad_(False)
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in module.parameters()):
            module.float()  # fp32 weights; half precision comes from autocast
        module.to(self.device)
        self.model = module
        self._weights_digest = self._compute_weights_digest()

    def _compute_weights_digest(self) -> str:
        # Structure as module paths and class names (not repr(), whose formatting changes between torch versions).
        arch = hashlib.sha256(
            "|".join(f"{name}:{type(mod).__qualname__}" for name, mod in self.model.named_modules()).encode()
        ).hexdigest()
        return hashlib.sha256(f"{state_dict_digest(self.model)}:{arch}".encode()).hexdigest()

    @property
    def weights_digest(self) -> str:
        return self._weights_digest

    def refresh_fingerprint(self) -> str:
        self._weights_digest = self._compute_weights_digest()
        return self.fingerprint

    # open_clip and transformers both keep the temperature as log(scale) in ``logit_scale`` and
    # SigLIP's bias in ``logit_bias``.
    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp().reshape(-1)[0])

    @property
    def logit_bias(self) -> float | None:
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach().float().reshape(-1)[0])

    @property
    def embed_dim(self) -> int:
        return self._embed_dim
