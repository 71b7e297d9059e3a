"""The one loop that feeds every method.

:func:`vlm_tta.classify`, :func:`vlm_tta.classify_features` and the benchmark runner all drive a
method through these two functions, so a method never learns which caller it serves and a fix to the
loop reaches every caller:

* :func:`run_on_images` — open each image (or take the caller's preprocessed views), cut the stream
  into chunks of :meth:`~vlm_tta.methods.Method.stream_batch_size` readable images (the caller's
  ``batch_size`` when the method has no batch of its own), then hand each chunk to the method:
  the view embeddings (through the shared cache) to feature-level methods, lazy
  :class:`~vlm_tta.features.Sample` objects to model-level ones;
* :func:`run_on_features` — the same chunking over embeddings the caller already has.

Unreadable images are skipped or raise (``on_error``); a chunk is filled with the next readable
images, so a method that learns from its batches sees the same batches as on the stream without the
bad file. The method's :meth:`~vlm_tta.methods.Method.finish` runs when the stream ends, also after
an error, so a method that changed the backbone always puts it back.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .errors import FeatureError
from .features import FeatureStore, Sample
from .methods import Method, MethodContext, Prediction

ON_ERROR = ("raise", "skip")


@dataclass
class StreamOutput:
    """What one pass over a stream produced: a prediction per processed item, in stream order."""

    predictions: list[Prediction] = field(default_factory=list)
    #: position in the input of each prediction (skipped inputs have none)
    positions: list[int] = field(default_factory=list)
    #: ``(position, name, reason)`` of every input that could not be read
    skipped: list[tuple[int, str, str]] = field(default_factory=list)


class SkippedImagesWarning(UserWarning):
    """Some images could not be read and were left out of the results."""


def _chunk_size(method: Method, batch_size: int) -> int:
    size = method.stream_batch_size()
    if size is None:
        return batch_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"method {method.name!r}: stream_batch_size() must be an integer >= 1; got {size!r}")
    return size


def _dispatch(method: Method, store: FeatureStore, items: list[tuple[int, Any]]) -> list[Prediction]:
    """Hand one chunk of ``(position, image source)`` to the method."""
    if method.needs_pixels:
        preds = method.predict_samples([Sample(pos, img, store) for pos, img in items])
    else:
        feats = store.view_features([img for _, img in items], method.view_set(), normalize=not method.raw_features)
        preds = method.predict_batch(feats)
    if len(preds) != len(items):
        raise RuntimeError(f"method {method.name!r} returned {len(preds)} predictions for {len(items)} images")
    return preds


def run_on_images(
    method: Method,
    ctx: MethodContext,
    store: FeatureStore,
    sources: Sequence[Any],
    names: Sequence[str],
    *,
    batch_size: int = 64,
    on_error: str = "raise",
    progress: bool = False,
) -> StreamOutput:
    """Run ``method`` (set up here with ``ctx``) over ``sources`` in order; see the module docstring."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}; got {on_error!r}")
    chunk = _chunk_size(method, batch_size)
    out = StreamOutput()
    bar = _progress_bar(len(sources), method.name) if progress else None
    pending: list[tuple[int, Any]] = []
    method.setup(ctx)
    try:
        for start in range(0, len(sources), chunk):
            part = sources[start : start + chunk]
            errors: list | None = [] if on_error == "skip" else None
            opened = store.open_images(part, names[start : start + chunk], errors=errors)
            for pos, name, reason in errors or ():
                out.skipped.append((start + pos, name, reason))
            pending.extend((start + i, img) for i, img in enumerate(opened) if img is not None)
            while len(pending) >= chunk:
                items, pending = pending[:chunk], pending[chunk:]
                out.predictions.extend(_dispatch(method, store, items))
                out.positions.extend(pos for pos, _ in items)
            if bar is not None:
                bar.update(len(part))
        if pending:
            out.predictions.extend(_dispatch(method, store, pending))
            out.positions.extend(pos for pos, _ in pending)
    finally:
        method.finish()
        if bar is not None:
            bar.close()
    if out.skipped:
        shown = ", ".join(name for _, name, _ in out.skipped[:5]) + (", ..." if len(out.skipped) > 5 else "")
        warnings.warn(
            f"skipped {len(out.skipped)} unreadable image(s): {shown} (result.info['skipped'] lists each with "
            "its reason)",
            SkippedImagesWarning,
            stacklevel=3,
        )
    return out


def run_on_features(method: Method, ctx: MethodContext, features: torch.Tensor, *, batch_size: int = 256) -> StreamOutput:
    """Run a feature-level ``method`` over ``N x V x D`` embeddings in order, in chunks."""
    if method.needs_pixels:
        raise FeatureError(f"method {method.name!r} needs the images, not only embeddings: use vlm_tta.classify()")
    chunk = _chunk_size(method, batch_size)
    out = StreamOutput()
    method.setup(ctx)
    try:
        for start in range(0, len(features), chunk):
            part = features[start : start + chunk]
            preds = method.predict_batch(part)
            if len(preds) != len(part):
                raise RuntimeError(f"method {method.name!r} returned {len(preds)} predictions for {len(part)} rows")
            out.predictions.extend(preds)
            out.positions.extend(range(start, start + len(part)))
    finally:
        method.finish()
    return out


def _progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img")


__all__ = ["ON_ERROR", "SkippedImagesWarning", "StreamOutput", "run_on_features", "run_on_images"]
