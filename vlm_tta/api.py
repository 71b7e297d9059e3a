"""The public entry points: :func:`classify` on images, :func:`classify_features` on embeddings.

Both drive the method through :mod:`vlm_tta.engine`, the one loop every caller shares.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .cache import EmbeddingCache, as_cache
from .errors import FeatureError, OptionError
from .methods import MethodContext, Prediction, create_method
from .models.base import VisionLanguageModel, validate_classnames
from .templates import template_set_id

DEFAULT_MODEL = "ViT-B-16@openai"  # TPT's and most papers' backbone: CLIP ViT-B/16, OpenAI weights
#: classify()'s default ``prefetch``: images whose views are made ahead of the encoder (exact: views
#: are pure functions of their key, so any value gives the same predictions).
DEFAULT_PREFETCH = 2


@dataclass
class ClassificationResult:
    """What :func:`classify` and :func:`classify_features` return: one row per classified image, in
    stream order.

    ``probs`` is the softmax of ``logits`` over the classes; ``scores`` the method's per-image
    in-distribution score (higher = more confident the image is a clean image of one of the classes),
    or None when the method has none; ``noisy`` the method's own noisy/OOD decision per image (AdaND),
    or None for methods that do not decide. ``positions`` gives each row's position in the input
    (images that could not be read and were skipped have no row: see ``info["skipped"]``).
    """

    classnames: list[str]
    logits: np.ndarray  # N x C
    scores: np.ndarray | None = None  # N
    method: str = ""
    info: dict = field(default_factory=dict)
    noisy: np.ndarray | None = None  # N bools
    positions: np.ndarray | None = None  # N ints; None means 0..N-1

    def __post_init__(self) -> None:
        if self.positions is None:
            self.positions = np.arange(len(self.logits))

    @property
    def probs(self) -> np.ndarray:
        return torch.from_numpy(self.logits).double().softmax(-1).float().numpy()

    @property
    def indices(self) -> np.ndarray:
        return self.logits.argmax(-1) if len(self.logits) else np.zeros(0, dtype=np.int64)

    @property
    def labels(self) -> list[str]:
        return [self.classnames[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.logits)

    def to_rows(self, names: Sequence[str] | None = None, top_k: int = 3) -> list[dict]:
        """JSON-ready rows: image name, label, index, probability, score, noisy decision and the
        top-k classes. ``names`` are the names of the *inputs* (rows are matched by ``positions``)."""
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise OptionError(f"top_k must be an integer >= 1; got {top_k!r}")
        probs = self.probs
        rows = []
        for i in range(len(self)):
            pos = int(self.positions[i])
            order = np.argsort(-probs[i], kind="stable")[:top_k]
            row = {
                "image": names[pos] if names is not None else pos,
                "label": self.classnames[order[0]],
                "index": int(order[0]),
                "prob": float(probs[i, order[0]]),
                "top": [{"label": self.classnames[j], "prob": float(probs[i, j])} for j in order],
            }
            if self.scores is not None:
                row["score"] = float(self.scores[i])
            if self.noisy is not None:
                row["noisy"] = bool(self.noisy[i])
            rows.append(row)
        return rows

    def __repr__(self) -> str:
        return f"ClassificationResult(method={self.method!r}, images={len(self)}, classes={len(self.classnames)})"


def _collect(out, classnames: list[str], method_name: str, info: dict) -> ClassificationResult:
    """A :class:`ClassificationResult` from an :class:`~vlm_tta.engine.StreamOutput`."""
    predictions: list[Prediction] = out.predictions
    if predictions:
        logits = torch.stack([p.logits.detach().float().cpu() for p in predictions]).numpy()
    else:
        logits = np.zeros((0, len(classnames)), dtype=np.float32)
    has_score = bool(predictions) and all(p.score is not None for p in predictions)
    scores = np.array([p.score for p in predictions], dtype=np.float64) if has_score else None
    has_noisy = bool(predictions) and all(p.noisy is not None for p in predictions)
    noisy = np.array([bool(p.noisy) for p in predictions], dtype=bool) if has_noisy else None
    positions = np.asarray(out.positions, dtype=np.int64)
    return ClassificationResult(classnames, logits, scores, method_name, info, noisy, positions)


# --------------------------------------------------------------------------- inputs
def _is_dataset(images: Any) -> bool:
    return getattr(images, "paths", None) is not None and hasattr(images, "classnames")


def _as_image_list(images: Any) -> list:
    """The inputs as a list: dataset files in index order, one image, a batch, or preprocessed views
    (a 5-D ``N x V x 3 x H x W`` tensor or array becomes one :class:`~vlm_tta.features.GivenViews` per image)."""
    from .features import GivenViews

    if _is_dataset(images):
        return list(images.paths)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 5:
        return [GivenViews(images[i], name=f"views #{i}") for i in range(len(images))]
    if isinstance(images, (str, os.PathLike, GivenViews)) or not isinstance(images, Iterable):
        images = [images]
    elif isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype != object:
        images = [images]  # one image array, not a batch
    elif isinstance(images, torch.Tensor):
        images = [images] if images.ndim in (2, 3) else list(images)
    return list(images)


def _source_name(src: Any, i: int) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    return getattr(src, "name", None) or f"image #{i}"


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise OptionError(f"{name} must be an integer >= {minimum}; got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise OptionError(f"{name} must be an integer >= {minimum}; got {value}")
    return int(value)


def _check_bool(name: str, value: Any, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if not isinstance(value, (bool, np.bool_)):
        raise OptionError(f"{name} must be True or False; got {value!r} ({type(value).__name__})")
    return bool(value)


def resolve_model(
    model: str | VisionLanguageModel | None,
    device=None,
    pretrained="default",
    seed: int = 0,
    **load_options: Any,
) -> VisionLanguageModel:
    """A loaded model from a spec string (see :func:`vlm_tta.load_model`) or an instance.

    For an instance, ``device`` must agree with where it lives (a model is never moved behind the
    caller's back): a different device warns and is ignored, and loading options are an error.
    """
    if isinstance(model, VisionLanguageModel):
        if device is not None:
            from .models.base import resolve_device

            wanted = resolve_device(device)
            if wanted.type != model.device.type or (wanted.index is not None and wanted != model.device):
                warnings.warn(
                    f"device={str(device)!r} is ignored: the model is already loaded on {model.device}; load it "
                    f"with load_model(..., device={str(device)!r}) to run there",
                    UserWarning,
                    stacklevel=3,
                )
        if pretrained != "default" or load_options:
            given = (["pretrained"] if pretrained != "default" else []) + sorted(load_options)
            raise OptionError(
                f"{', '.join(given)} only apply when the model is loaded from a spec; this model is already loaded"
            )
        return model
    from .models import load_model

    return load_model(model or DEFAULT_MODEL, pretrained=pretrained, device=device, seed=seed, **load_options)


# --------------------------------------------------------------------------- classify
def classify(
    images: Any,
    classnames: Sequence[str],
    method: str = "zeroshot",
    model: str | VisionLanguageModel | None = None,
    templates: str | Sequence[str] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    cache: bool | EmbeddingCache = True,
    progress: bool | None = None,
    num_workers: int | None = None,
    allow_duplicate_classnames: bool = False,
    pretrained: str | os.PathLike | None = "default",
    seed: int = 0,
    on_error: str | None = None,
    exif_transpose: bool = True,
    prefetch: int | None = None,
    **method_options: Any,
) -> ClassificationResult:
    """Classify ``images`` into ``classnames`` with a test-time method.

    Args:
        images: PIL images, paths, numpy arrays (HxW, HxWxC, CxHxW; uint8, uint16 or float in
            [0, 1]) or tensors, or a list of them, or a :mod:`vlm_tta.data` dataset (its files in index
            order). A 5-D tensor ``N x V x 3 x H x W`` is taken as preprocessed views made by the caller
            (view 0 the original; every method then reads these views as given). The order is kept:
            online methods see the stream in this order.
        classnames: the class names (non-empty, unique).
        method: a registered method (``vlm_tta.list_methods()``); ``method_options`` go to its config.
        model: a spec string for :func:`vlm_tta.load_model` (default ``"ViT-B-16@openai"``) or a
            loaded :class:`~vlm_tta.models.VisionLanguageModel`.
        templates: a template set name (``"single"``, ``"clip80"``, ``"clip7"``, ...), a list of
            templates with ``{}``, or a path to a file with one template per line. Default: the
            method's own set where it has one (``sts_ensemble``: ``clip7``), else ``single``.
        device: where a model loaded from a spec runs (default CUDA when available).
        batch_size: images per chunk (and views per encoder batch). Methods with a batch of their
            own (AdaND, SubTTA) are fed their batch whatever this is.
        cache_dir / cache: where the embedding cache lives (default: ``$VLM_TTA_CACHE_DIR`` or the
            user's cache dir); ``cache=False`` disables it, or pass an :class:`EmbeddingCache`.
        progress: show a progress bar (default: when there are more than 256 images and stderr is a tty).
        num_workers: threads that make test-time views (default: the usable CPUs, at most 8;
            0 makes them in this thread). Views are identical for any value.
        allow_duplicate_classnames: accept a name used by two classes, or names whose prompts the
            tokenizer cannot tell apart (CLIP's ImageNet list has "missile" and "sunglasses" twice);
            by default either is an error.
        pretrained / seed: a model spec's weights (see :func:`vlm_tta.load_model`); ``pretrained=None``
            gives random weights drawn from ``seed``, so two runs agree and share cache entries.
        on_error: ``"raise"`` (default for lists of images) or ``"skip"`` (default for datasets) an
            image that cannot be read; skipped images are named in ``info["skipped"]`` with the reason
            and have no row in the result (``result.positions`` maps rows to inputs).
        exif_transpose: turn photos upright by their EXIF orientation (default, as transformers
            does); False reproduces reference pipelines that ignore it. Cached embeddings of the two
            choices never mix.
        prefetch: images decoded and made into views ahead of the image encoder, in background
            threads, so the two overlap (default :data:`DEFAULT_PREFETCH`; 0 turns it off). Results
            are bit-identical for every value.

    Returns:
        :class:`ClassificationResult` with ``.labels``, ``.indices``, ``.probs``, ``.scores``,
        ``.noisy`` and ``.info`` (model, templates, views, the cache's hits and misses, skipped
        inputs, seconds, and what the method reports).

    Example::

        >>> res = vlm_tta.classify(["cat.jpg", "dog.png"], ["cat", "dog"], method="zeroshot",
        ...                        model="ViT-B-16@openai", templates="clip80")
        >>> res.labels
        ['cat', 'dog']
    """
    from .engine import ON_ERROR, run_on_images
    from .features import FeatureStore

    t0 = time.perf_counter()
    method_obj = create_method(method, **method_options)  # validate options before loading anything
    names = validate_classnames(classnames, allow_duplicate_classnames)
    batch_size = _check_int("batch_size", batch_size, 1)
    if num_workers is not None:
        num_workers = _check_int("num_workers", num_workers, 0)
    prefetch = DEFAULT_PREFETCH if prefetch is None else _check_int("prefetch", prefetch, 0)
    progress = _check_bool("progress", progress, allow_none=True)
    allow_duplicate_classnames = _check_bool("allow_duplicate_classnames", allow_duplicate_classnames)
    exif_transpose = _check_bool("exif_transpose", exif_transpose)
    if on_error is None:
        on_error = "skip" if _is_dataset(images) else "raise"
    if on_error not in ON_ERROR:
        raise OptionError(f"on_error must be one of {', '.join(ON_ERROR)}; got {on_error!r}")
    sources = _as_image_list(images)
    source_names = [_source_name(src, i) for i, src in enumerate(sources)]
    vlm = resolve_model(model, device=device, pretrained=pretrained, seed=seed)
    if num_workers is None:
        from .views import default_num_workers

        num_workers = default_num_workers()
    store = FeatureStore(
        vlm,
        as_cache(cache_dir if cache is True else cache),
        encode_batch_size=batch_size,
        num_workers=num_workers,
        exif_transpose=exif_transpose,
        prefetch=prefetch,
    )
    if templates is None:
        templates = method_obj.default_templates
    class_features = store.class_features(names, templates, allow_duplicates=allow_duplicate_classnames)
    ctx = MethodContext(class_features, vlm.logit_scale, vlm.logit_bias, names, vlm, store)
    show = progress if progress is not None else (len(sources) > 256 and _stderr_is_tty())
    out = run_on_images(
        method_obj, ctx, store, sources, source_names, batch_size=batch_size, on_error=on_error, progress=show
    )
    info = {
        "model": vlm.name,
        "templates": template_set_id(templates),
        "view_set": repr(method_obj.view_set()),
        "images": len(out.predictions),
        "skipped": [{"position": p, "image": n, "error": e} for p, n, e in out.skipped],
        "cache": dict(store.stats),
        "seconds": time.perf_counter() - t0,
        **method_obj.run_info(),
    }
    return _collect(out, names, method_obj.name, info)


def classify_features(
    view_features: np.ndarray | torch.Tensor,
    class_features: np.ndarray | torch.Tensor,
    method: str = "zeroshot",
    logit_scale: float = 100.0,
    logit_bias: float | None = None,
    classnames: Sequence[str] | None = None,
    allow_duplicate_classnames: bool = False,
    batch_size: int = 256,
    noise_features: np.ndarray | torch.Tensor | None = None,
    injected_noise: np.ndarray | torch.Tensor | Sequence[bool] | None = None,
    support_features: np.ndarray | torch.Tensor | None = None,
    support_labels: np.ndarray | torch.Tensor | Sequence[int] | None = None,
    **method_options: Any,
) -> ClassificationResult:
    """Run a method on embeddings you already have.

    Args:
        view_features: N x D image embeddings, or N x V x D view embeddings with view 0 the original
            image (the methods that read several views need V at least their view count). Pass the
            encoder's raw outputs: they are L2-normalised here, except for methods that read raw
            embeddings (AdaND's detector), which get them as given.
        class_features: C x D class embeddings.
        logit_scale / logit_bias: the backbone's (100 and None for OpenAI CLIP; SigLIP has a bias).
        classnames: names for ``.labels`` (default ``"0"``, ``"1"``, ...).
        batch_size: rows per call of the method (methods with a batch of their own ignore it).
        noise_features / injected_noise: AdaND's noisy-TTA replay: M x D raw embeddings of injected
            noise images, or a boolean per row marking rows of the stream as injected noise.
        support_features / support_labels: labelled few-shot embeddings (K x D, or K x V x D views
            with view 0 the original, and K class indices) for methods with a static memory (DMN-TF).

    Rows are processed in order (online methods see that order). Methods that need pixels (TPT,
    TCA, ...) raise: use :func:`classify`.
    """
    from .engine import run_on_features

    method_obj = create_method(method, **method_options)
    if method_obj.needs_pixels:
        raise FeatureError(f"method {method_obj.name!r} needs the images, not only embeddings: use vlm_tta.classify()")
    batch_size = _check_int("batch_size", batch_size, 1)
    views = _as_float_tensor(view_features, "view_features")
    classes = _as_float_tensor(class_features, "class_features")
    if views.ndim == 2:
        views = views[:, None, :]
    if views.ndim != 3:
        raise FeatureError(f"view_features must be N x D or N x V x D; got shape {tuple(views.shape)}")
    if classes.ndim != 2 or len(classes) == 0:
        raise FeatureError(f"class_features must be C x D with C >= 1; got shape {tuple(classes.shape)}")
    if views.shape[-1] != classes.shape[-1]:
        raise FeatureError(
            f"embedding sizes differ: view_features have D={views.shape[-1]}, class_features D={classes.shape[-1]}"
        )
    needed = method_obj.view_set().n_views
    if views.shape[1] < needed:
        raise FeatureError(
            f"method {method_obj.name!r} reads {needed} views per image; view_features has {views.shape[1]}"
        )
    if not np.isfinite(logit_scale) or logit_scale <= 0:
        raise FeatureError(f"logit_scale must be a positive finite number; got {logit_scale}")
    names = validate_classnames(
        classnames if classnames is not None else [str(i) for i in range(len(classes))], allow_duplicate_classnames
    )
    if len(names) != len(classes):
        raise FeatureError(f"{len(names)} class names for {len(classes)} class embeddings")
    views = views[:, :needed]
    if not method_obj.raw_features:
        views = torch.nn.functional.normalize(views, dim=-1)
    classes = torch.nn.functional.normalize(classes, dim=-1)
    extras = _extras(
        len(views), classes.shape[-1], len(classes), noise_features, injected_noise, support_features, support_labels
    )
    ctx = MethodContext(classes, float(logit_scale), logit_bias, names, None, None, extras)
    out = run_on_features(method_obj, ctx, views, batch_size=batch_size)
    info = {"view_set": repr(method_obj.view_set()), "images": len(out.predictions), **method_obj.run_info()}
    return _collect(out, names, method_obj.name, info)


def _extras(n: int, dim: int, n_classes: int, noise_features, injected_noise, support_features, support_labels) -> dict:
    """Validated per-stream data inputs of :func:`classify_features` (see ``MethodContext.extras``)."""
    extras: dict = {}
    if noise_features is not None:
        noise = _as_float_tensor(noise_features, "noise_features")
        if noise.ndim != 2 or noise.shape[1] != dim:
            raise FeatureError(f"noise_features must be M x {dim}; got shape {tuple(noise.shape)}")
        extras["noise_features"] = noise
    if injected_noise is not None:
        mask = torch.as_tensor(np.asarray(injected_noise))
        if mask.dtype != torch.bool or mask.shape != (n,):
            raise FeatureError(
                f"injected_noise must be {n} booleans (one per row); got {tuple(mask.shape)} {mask.dtype}"
            )
        extras["injected_noise"] = mask
    if (support_features is None) != (support_labels is None):
        raise FeatureError("support_features and support_labels come together (K x D embeddings and K class indices)")
    if support_features is not None:
        feats = _as_float_tensor(support_features, "support_features")
        labels = torch.as_tensor(np.asarray(support_labels))
        if feats.ndim not in (2, 3) or feats.shape[-1] != dim:
            raise FeatureError(
                f"support_features must be K x {dim} (or K x V x {dim}: views, view 0 the original); "
                f"got shape {tuple(feats.shape)}"
            )
        if labels.shape != (len(feats),) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise FeatureError(f"support_labels must be {len(feats)} integer class indices")
        if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
            raise FeatureError(f"support_labels must lie in 0..{n_classes - 1}")
        extras["support_features"], extras["support_labels"] = feats, labels.long()
    return extras


def _as_float_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.asarray(x))
    if not isinstance(x, torch.Tensor):
        raise FeatureError(f"{what} must be a numpy array or torch tensor; got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise FeatureError(f"{what} must hold floating-point values; got dtype {x.dtype}")
    x = x.detach().float().cpu()
    # A finite sum means every value is finite (an inf or NaN would make it inf or NaN); only a sum
    # that is not finite (or overflowed) needs the element-wise check.
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise FeatureError(f"{what} contains {bad} NaN or infinite value(s); check the encoder outputs")
    if x.numel() and (x.norm(dim=-1) == 0).any():
        raise FeatureError(f"{what} contains an all-zero embedding, which has no direction")
    return x


def _stderr_is_tty() -> bool:
    import sys

    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
