"""The public entry points: :func:`classify` on images, :func:`classify_features` on embeddings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .cache import EmbeddingCache, as_cache
from .errors import FeatureError
from .methods import MethodContext, Prediction, create_method
from .models.base import VisionLanguageModel, validate_classnames
from .templates import template_set_id

DEFAULT_MODEL = "ViT-B-16@openai"  # TPT's and most papers' backbone: CLIP ViT-B/16, OpenAI weights


@dataclass
class ClassificationResult:
    """What :func:`classify` and :func:`classify_features` return, one row per image, in input order.

    ``probs`` is the softmax of ``logits`` over the classes; ``scores`` the method's per-image
    in-distribution score (higher = more confident the image belongs to one of the classes), or
    None when the method has none.
    """

    classnames: list[str]
    logits: np.ndarray  # N x C
    scores: np.ndarray | None = None  # N
    method: str = ""
    info: dict = field(default_factory=dict)

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
        """JSON-ready rows: image name, label, index, probability, score and the top-k classes."""
        probs = self.probs
        rows = []
        for i in range(len(self)):
            order = np.argsort(-probs[i])[:top_k]
            row = {
                "image": names[i] if names is not None else i,
                "label": self.classnames[order[0]],
                "index": int(order[0]),
                "prob": float(probs[i, order[0]]),
                "top": [{"label": self.classnames[j], "prob": float(probs[i, j])} for j in order],
            }
            if self.scores is not None:
                row["score"] = float(self.scores[i])
            rows.append(row)
        return rows

    def __repr__(self) -> str:
        return f"ClassificationResult(method={self.method!r}, images={len(self)}, classes={len(self.classnames)})"


def _collect(
    predictions: list[Prediction], classnames: list[str], method_name: str, info: dict
) -> ClassificationResult:
    if predictions:
        logits = torch.stack([p.logits.float() for p in predictions]).numpy()
    else:
        logits = np.zeros((0, len(classnames)), dtype=np.float32)
    has_score = bool(predictions) and all(p.score is not None for p in predictions)
    scores = np.array([p.score for p in predictions], dtype=np.float64) if has_score else None
    return ClassificationResult(classnames, logits, scores, method_name, info)


def _as_image_list(images: Any) -> list:
    paths = getattr(images, "paths", None)
    if paths is not None and hasattr(images, "classnames"):  # a vlm_tta.data Dataset: its files, in index order
        return list(paths)
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, Iterable):
        images = [images]
    elif isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype != object:
        images = [images]  # one image array, not a batch
    elif isinstance(images, torch.Tensor):
        images = [images] if images.ndim in (2, 3) else list(images)
    return list(images)


def _source_name(src: Any, i: int) -> str:
    return os.fspath(src) if isinstance(src, (str, os.PathLike)) else f"image #{i}"


def resolve_model(model: str | VisionLanguageModel | None, device=None, pretrained="default") -> VisionLanguageModel:
    """A loaded model from a spec string (see :func:`vlm_tta.load_model`) or an instance."""
    if isinstance(model, VisionLanguageModel):
        return model
    from .models import load_model

    return load_model(model or DEFAULT_MODEL, pretrained=pretrained, device=device)


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
    **method_options: Any,
) -> ClassificationResult:
    """Classify ``images`` into ``classnames`` with a test-time method.

    Args:
        images: PIL images, paths, numpy arrays (HxW, HxWxC, CxHxW; uint8, uint16 or float in
            [0, 1]) or tensors, or a list of them. The order is kept: online methods see the stream
            in this order.
        classnames: the class names (non-empty, unique).
        method: a registered method (``vlm_tta.list_methods()``); ``method_options`` go to its config.
        model: a spec string for :func:`vlm_tta.load_model` (default ``"ViT-B-16@openai"``) or a
            loaded :class:`~vlm_tta.models.VisionLanguageModel`.
        templates: a template set name (``"single"``, ``"clip80"``, ``"clip7"``, ...), a list of
            templates with ``{}``, or a path to a file with one template per line. Default ``single``.
        batch_size: images per chunk (and views per encoder batch).
        cache_dir / cache: where the embedding cache lives (default: ``$VLM_TTA_CACHE_DIR`` or the
            user's cache dir); ``cache=False`` disables it, or pass an :class:`EmbeddingCache`.
        progress: show a progress bar (default: when there are more than 256 images and stderr is a tty).
        num_workers: threads that make test-time views (default: the usable CPUs, at most 8;
            0 makes them in this thread). Views are identical for any value.
        allow_duplicate_classnames: accept a name used by two classes (CLIP's ImageNet list has
            "missile" and "sunglasses" twice); by default a duplicate is an error.

    Returns:
        :class:`ClassificationResult` with ``.labels``, ``.indices``, ``.probs``, ``.scores``.

    Example::

        >>> res = vlm_tta.classify(["cat.jpg", "dog.png"], ["cat", "dog"], method="zeroshot",
        ...                        model="ViT-B-16@openai", templates="clip80")
        >>> res.labels
        ['cat', 'dog']
    """
    from .features import FeatureStore, Sample

    method_obj = create_method(method, **method_options)  # validate options before loading anything
    names = validate_classnames(classnames, allow_duplicate_classnames)
    sources = _as_image_list(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    vlm = resolve_model(model, device=device)
    if num_workers is None:
        from .views import default_num_workers

        num_workers = default_num_workers()
    store = FeatureStore(
        vlm, as_cache(cache_dir if cache is True else cache), encode_batch_size=batch_size, num_workers=num_workers
    )
    class_features = store.class_features(names, templates, allow_duplicates=allow_duplicate_classnames)
    method_obj.setup(MethodContext(class_features, vlm.logit_scale, vlm.logit_bias, names, vlm))
    view_set = method_obj.view_set()
    predictions: list[Prediction] = []
    show = progress if progress is not None else (len(sources) > 256 and _stderr_is_tty())
    bar = _progress_bar(len(sources), method_obj.name) if show else None
    for start in range(0, len(sources), batch_size):
        chunk = sources[start : start + batch_size]
        images = store.open_images(chunk, [_source_name(src, i) for i, src in enumerate(chunk, start)])
        if method_obj.needs_pixels:  # model-level methods: one image at a time, with its pixels
            predictions.extend(method_obj.predict_sample(Sample(i, img, store)) for i, img in enumerate(images, start))
        else:
            predictions.extend(method_obj.predict_batch(store.view_features(images, view_set)))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    info = {"model": vlm.name, "templates": template_set_id(templates), "view_set": repr(view_set)}
    return _collect(predictions, names, method_obj.name, info)


def classify_features(
    view_features: np.ndarray | torch.Tensor,
    class_features: np.ndarray | torch.Tensor,
    method: str = "zeroshot",
    logit_scale: float = 100.0,
    logit_bias: float | None = None,
    classnames: Sequence[str] | None = None,
    allow_duplicate_classnames: bool = False,
    **method_options: Any,
) -> ClassificationResult:
    """Run a method on embeddings you already have.

    Args:
        view_features: N x D image embeddings, or N x V x D view embeddings with view 0 the original
            image (the methods that read several views need V at least their view count).
        class_features: C x D class embeddings.
        logit_scale / logit_bias: the backbone's (100 and None for OpenAI CLIP; SigLIP has a bias).
        classnames: names for ``.labels`` (default ``"0"``, ``"1"``, ...).

    Both inputs are L2-normalised here; rows are processed in order (online methods see that order).
    Methods that need pixels (TPT, TCA, ...) raise: use :func:`classify`.
    """
    method_obj = create_method(method, **method_options)
    if method_obj.needs_pixels:
        raise FeatureError(f"method {method_obj.name!r} needs the images, not only embeddings: use vlm_tta.classify()")
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
    views = torch.nn.functional.normalize(views[:, :needed], dim=-1)
    classes = torch.nn.functional.normalize(classes, dim=-1)
    method_obj.setup(MethodContext(classes, float(logit_scale), logit_bias, names, None))
    predictions = method_obj.predict_batch(views) if len(views) else []
    return _collect(predictions, names, method_obj.name, {"view_set": repr(method_obj.view_set())})


def _as_float_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.asarray(x))
    if not isinstance(x, torch.Tensor):
        raise FeatureError(f"{what} must be a numpy array or torch tensor; got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise FeatureError(f"{what} must hold floating-point values; got dtype {x.dtype}")
    x = x.detach().float().cpu()
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise FeatureError(f"{what} contains {bad} NaN or infinite value(s); check the encoder outputs")
    if x.numel() and (x.norm(dim=-1) == 0).any():
        raise FeatureError(f"{what} contains an all-zero embedding, which has no direction")
    return x


def _progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img")


def _stderr_is_tty() -> bool:
    import sys

    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
