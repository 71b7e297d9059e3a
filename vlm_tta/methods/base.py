"""Methods, their predictions, and the registry that makes each one a decorator away.

A method answers one question: given the class embeddings and a test image (through its view
embeddings, or its pixels for model-level methods), which class is it? Each method is a class with
a config dataclass of its paper's defaults::

    @dataclass
    class MyConfig:
        selection_p: float = 0.1  # TPT (Shu et al., 2022), section 3.2

    @register_method("mine")
    class Mine(Method):
        config_class = MyConfig
        def predict_features(self, features): ...

Feature-level methods implement :meth:`Method.predict_features` on L2-normalised view embeddings
(V x D, view 0 = the original image); episodic ones may vectorise :meth:`Method.predict_batch`.
Model-level methods (``needs_pixels = True``) implement :meth:`Method.predict_sample`, which gets a
:class:`~vlm_tta.features.Sample` (lazy pixels, views and view embeddings) and the backbone as
``self.ctx.model``.
Online methods (``episodic = False``) keep state along the stream and are fed in stream order.

How the stream reaches a method (one loop, :mod:`vlm_tta.engine`, feeds ``classify``,
``classify_features`` and the benchmark runner alike):

* the stream is cut into chunks of :meth:`Method.stream_batch_size` items (default: the caller's
  ``batch_size``); a method whose results depend on its own batch (AdaND, SubTTA) returns its batch
  size there, so its output never depends on how the caller chunks;
* feature-level methods get each chunk as one ``N x V x D`` tensor in :meth:`Method.predict_batch`
  (L2-normalised, or the encoder's raw output when ``raw_features = True``);
* model-level methods get a list of :class:`~vlm_tta.features.Sample` in
  :meth:`Method.predict_samples` (default: :meth:`Method.predict_sample` one by one);
* when the stream ends (also on an error) :meth:`Method.finish` undoes any change to the backbone,
  then :meth:`Method.run_info` is merged into the result's ``info``.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch

from ..errors import MethodOptionError, UnknownMethodError
from ..views import ViewSet

if TYPE_CHECKING:
    from ..features import Sample


@dataclass
class Prediction:
    """One image's answer: logits over the classes and, where the method has one, a score.

    ``score`` is an in-distribution / clean-sample confidence: higher means more likely a clean
    image of one of the classes (OOD and noisy-sample detection threshold it).
    """

    logits: torch.Tensor
    score: float | None = None
    #: the method's own clean/noisy decision (AdaND, noisy TTA); None for methods that do not decide.
    noisy: bool | None = None

    @property
    def index(self) -> int:
        return int(self.logits.argmax())


@dataclass
class MethodContext:
    """What a method is set up with before it sees the stream."""

    class_features: torch.Tensor  # C x D, L2-normalised
    logit_scale: float
    logit_bias: float | None = None
    classnames: Sequence[str] | None = None
    model: Any = None  # the VisionLanguageModel, for model-level methods; None on features
    #: the :class:`~vlm_tta.features.FeatureStore` that encodes through the shared cache (None when the
    #: method runs on embeddings the caller passed in, as in ``classify_features``)
    store: Any = None
    #: per-stream inputs that are data, not hyper-parameters (e.g. AdaND's ``noise_features`` and
    #: ``injected_noise`` rows passed to ``classify_features``); empty by default
    extras: dict = dataclasses.field(default_factory=dict)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """The backbone's logits for L2-normalised image features (... x D) against the classes."""
        out = self.logit_scale * image_features @ self.class_features.T
        return out + self.logit_bias if self.logit_bias is not None else out


class Method:
    """Base class of every test-time method. Subclasses set ``config_class`` and implement
    :meth:`predict_features` (feature-level) or :meth:`predict_sample` (model-level)."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = type(None)
    #: episodic methods forget everything after each image; online ones carry state.
    episodic: ClassVar[bool] = True
    #: model-level methods (TPT, TCA, ...) need the backbone and the pixels.
    needs_pixels: ClassVar[bool] = False
    #: feature-level methods that read the encoder's raw (un-normalised) image embeddings (AdaND's
    #: detector); all others get L2-normalised ones.
    raw_features: ClassVar[bool] = False
    #: the prompt template set the method uses when the caller names none (``sts_ensemble``: ``clip7``);
    #: None means the toolkit's default (``single``).
    default_templates: ClassVar[str | None] = None
    #: the option a benchmark suite's per-dataset ``views`` sets (TPT and DiffTPT: ``view_recipe``, as
    #: their reference picks crops+flips or AugMix by dataset); None: the method keeps its own views
    #: (DMN, TDA, ZERO, STS follow their own references whatever the suite says)
    suite_view_option: ClassVar[str | None] = None

    def __init__(self, config: Any = None, **options: Any) -> None:
        if config is None:
            config = make_config(self.config_class, options, self.name)
        elif options:
            config = dataclasses.replace(config, **options)
        self.config = config
        self.ctx: MethodContext | None = None

    # ------------------------------------------------------------------ what the method needs
    def view_set(self) -> ViewSet:
        """The views this method reads. Default: the original image only."""
        return ViewSet("original", 1)

    # ------------------------------------------------------------------ life cycle
    def setup(self, ctx: MethodContext) -> None:
        """Receive the class embeddings (and the model); called once before the stream."""
        self.ctx = ctx
        self.reset()

    def reset(self) -> None:
        """Forget the stream (online methods clear their memory here)."""

    def stream_batch_size(self) -> int | None:
        """How many stream items the method takes per call of :meth:`predict_batch` /
        :meth:`predict_samples`; None lets the caller's ``batch_size`` decide. Methods whose output
        depends on their batch (AdaND, SubTTA) return their own batch size option."""
        return None

    def finish(self) -> None:
        """Called once when the stream ends, also after an error: undo every change the method made
        outside itself (SubTTA's LayerNorm weights, hooks on the backbone), so the user's model and its
        fingerprint are exactly as before. Default: nothing to undo."""

    def run_info(self) -> dict:
        """What the method reports about the run once the stream is done (merged into
        ``ClassificationResult.info``; e.g. TCA's mean GMACs per image). Default: nothing."""
        return {}

    # ------------------------------------------------------------------ prediction
    def predict_features(self, features: torch.Tensor) -> Prediction:
        """Predict one image from its L2-normalised view embeddings (V x D, view 0 = original)."""
        raise NotImplementedError(f"method {self.name!r} does not run on embeddings; use classify() on images")

    def predict_sample(self, sample: "Sample") -> Prediction:
        """Predict one image given lazy access to its pixels, views and view embeddings
        (:class:`vlm_tta.features.Sample`). Model-level methods override this; the default reads
        the embeddings of :meth:`view_set` and calls :meth:`predict_features`."""
        return self.predict_features(sample.view_features(self.view_set()))

    def predict_samples(self, samples: "Sequence[Sample]") -> list[Prediction]:
        """Predict a chunk of images, in stream order. The default calls :meth:`predict_sample` one by
        one; model-level methods that adapt several images at once (batched TPT) or learn from a batch
        (SubTTA) override it."""
        return [self.predict_sample(s) for s in samples]

    def predict_batch(self, features: torch.Tensor) -> list[Prediction]:
        """Predict N images (N x V x D) in stream order. The default feeds them one by one, which
        is what online methods need; episodic methods override it with a vectorised version."""
        return [self.predict_features(f) for f in features]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def make_config(config_class: type, options: dict, method_name: str = ""):
    """Build ``config_class(**options)``, rejecting unknown options with the list of valid ones."""
    if config_class is type(None):
        if options:
            raise MethodOptionError(f"method {method_name!r} takes no options; got {sorted(options)}")
        return None
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(options) - fields)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(fields), n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise MethodOptionError(
            f"unknown option(s) for method {method_name!r}: {', '.join(hints)}. "
            f"Valid options: {', '.join(sorted(fields)) or 'none'}"
        )
    return config_class(**options)


def _type_name(tp: Any) -> str:
    import typing

    origin = typing.get_origin(tp)
    if origin is None:
        return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))
    args = typing.get_args(tp)
    if origin in (tuple, list):
        inner = _type_name(args[0]) if args else "value"
        return f"a comma-separated list of {inner}"
    return " or ".join(_type_name(a) for a in args)


def _coerce(text: str, tp: Any) -> Any:
    """``text`` converted to the annotation ``tp``; ValueError when it does not fit."""
    import json
    import types
    import typing

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(text, arg)
            except ValueError:
                continue
        raise ValueError(text)
    if origin is typing.Literal:
        for value in typing.get_args(tp):
            if str(value) == text:
                return value
        raise ValueError(text)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        stripped = text.strip()
        parts = json.loads(stripped) if stripped.startswith("[") else [p for p in stripped.split(",") if p.strip()]
        if not isinstance(parts, list):
            raise ValueError(text)
        if len(args) > 1 and len(parts) != len(args):
            raise ValueError(text)
        items = [
            _coerce(str(p).strip(), args[i] if len(args) > 1 else (args[0] if args else str))
            for i, p in enumerate(parts)
        ]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        low = text.strip().lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
        raise ValueError(text)
    if tp is int:
        return int(text.strip())
    if tp is float:
        value = float(text.strip())
        return value
    if tp is str or tp is Any:
        return text
    return json.loads(text)  # anything else: a JSON literal


def parse_option_text(method: str, key: str, text: str) -> Any:
    """A method option given as text (``vlm-tta ... -o key=value``) converted to the type its config
    declares; a clear :class:`MethodOptionError` naming the option and the type when it does not fit.
    Unknown keys come back unchanged (the config reports them with the valid names)."""
    import typing

    config_class = get_method_class(method).config_class
    if not dataclasses.is_dataclass(config_class):
        return text
    hints = typing.get_type_hints(config_class)
    if key not in hints:
        return text
    try:
        return _coerce(text, hints[key])
    except (ValueError, TypeError):
        raise MethodOptionError(
            f"option {key!r} of method {get_method_class(method).name!r} expects {_type_name(hints[key])}; got {text!r}"
        ) from None


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Method]] = {}
_ALIASES: dict[str, str] = {}


def register_method(name: str, *aliases: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator adding a :class:`Method` subclass to the registry under ``name``."""

    def decorator(cls: type[Method]) -> type[Method]:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"a method named {name!r} is already registered ({_REGISTRY[key].__name__})")
        cls.name = key
        _REGISTRY[key] = cls
        for alias in aliases:
            _ALIASES[alias.lower()] = key
        return cls

    return decorator


def list_methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    """The registered class for ``name`` (case-insensitive); a clear error for unknown names."""
    if not isinstance(name, str):
        raise UnknownMethodError(f"method must be a name (str), got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY) + list(_ALIASES), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownMethodError(f"unknown method {name!r}.{hint} Available methods: {', '.join(list_methods())}")
    return _REGISTRY[key]


def create_method(name: str | Method, **options: Any) -> Method:
    """A configured method instance: ``create_method("zeroshot")``; an instance passes through."""
    if isinstance(name, Method):
        if options:
            raise MethodOptionError("pass options either to the method instance or here, not both")
        return name
    return get_method_class(name)(**options)
