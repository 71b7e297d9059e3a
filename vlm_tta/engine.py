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

With the store's ``prefetch`` on, the next chunk of files is opened in a background thread while
the current one is encoded, and views are made ahead of their use (see
:class:`~vlm_tta.features.FeatureStore`); the results are the same.

Unreadable images are skipped or raise (``on_error``); a chunk is filled with the next readable
images, so a method that learns from its batches sees the same batches as on the stream without the
bad file. The method's :meth:`~vlm_tta.methods.Method.finish` runs when the stream ends, also after
an error, so a method that changed the backbone always puts it back.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .errors import FeatureError
from .features import FeatureStore, Sample, prefetched
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
    #: seconds spent inside the method's own calls, and in the pass's shared work (opening images,
    #: making and encoding views or reading them from the cache), which several methods may share
    method_seconds: float = 0.0
    shared_seconds: float = 0.0


class SkippedImagesWarning(UserWarning):
    """Some images could not be read and were left out of the results."""


def _chunk_size(method: Method, batch_size: int) -> int:
    size = method.stream_batch_size()
    if size is None:
        return batch_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"method {method.name!r}: stream_batch_size() must be an integer >= 1; got {size!r}")
    return size


class _Feeder:
    """One method's side of a pass: its own chunk buffer and its output."""

    def __init__(self, method: Method, ctx: MethodContext, chunk: int) -> None:
        self.method, self.ctx, self.chunk = method, ctx, chunk
        self.pending: list[tuple[int, Any]] = []  # (position, image source or V x D features)
        self.out = StreamOutput()

    def add(self, items: list[tuple[int, Any]], store: FeatureStore, final: bool = False) -> None:
        self.pending.extend(items)
        while len(self.pending) >= self.chunk or (final and self.pending):
            part, self.pending = self.pending[: self.chunk], self.pending[self.chunk :]
            t0 = time.perf_counter()
            if self.method.needs_pixels:
                samples = [Sample(pos, img, store) for pos, img in part]
                Sample.link(samples)  # with store.prefetch, each sample starts the next ones' views
                preds = self.method.predict_samples(samples)
            else:
                feats = torch.stack([f for _, f in part])
                preds = self.method.predict_batch(feats)
            if len(preds) != len(part):
                raise RuntimeError(
                    f"method {self.method.name!r} returned {len(preds)} predictions for {len(part)} images"
                )
            self.out.predictions.extend(preds)
            self.out.positions.extend(pos for pos, _ in part)
            self.out.method_seconds += time.perf_counter() - t0


def _view_features(store: FeatureStore, feeders: list[_Feeder], images: list) -> dict:
    """The chunk's view embeddings for every feature-level method, each view encoded (or read from
    the cache) once: methods reading the same recipe and seed share the longest view set (view ``i``
    does not depend on how many views are asked for)."""
    longest: dict[tuple, Any] = {}
    for f in feeders:
        if not f.method.needs_pixels:
            vs = f.method.view_set()
            key = (vs.recipe, vs.seed)
            if key not in longest or vs.n_views > longest[key].n_views:
                longest[key] = vs
    return {key: store.view_features(images, vs, normalize=False) for key, vs in longest.items()}


def run_stream(
    methods: Sequence[tuple[Method, MethodContext]],
    store: FeatureStore,
    sources: Sequence[Any],
    names: Sequence[str],
    *,
    batch_size: int = 64,
    on_error: str = "raise",
    progress: bool = False,
) -> list[StreamOutput]:
    """One pass over ``sources`` feeding several methods at once (each set up with its context);
    see the module docstring. Returns one :class:`StreamOutput` per method. The benchmark runner
    uses it to run every feature-level method of a suite on one read of the embeddings."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}; got {on_error!r}")
    feeders = [_Feeder(m, ctx, _chunk_size(m, batch_size)) for m, ctx in methods]
    skipped: list[tuple[int, str, str]] = []
    bar = _progress_bar(len(sources), "+".join(m.name for m, _ in methods)) if progress else None
    for f in feeders:
        f.method.setup(f.ctx)
    shared = 0.0

    def open_chunk(start: int) -> tuple[list, list | None]:
        errors: list | None = [] if on_error == "skip" else None
        return store.open_images(sources[start : start + batch_size], names[start : start + batch_size], errors), errors

    starts = [(start,) for start in range(0, len(sources), batch_size)]
    # With prefetch on, the next chunk is opened (read, hashed, decoded) while this one is encoded.
    chunks = prefetched(open_chunk, starts, 1 if store.prefetch else 0, stage="chunks")
    try:
        for (start,) in starts:
            t0 = time.perf_counter()
            part = sources[start : start + batch_size]
            opened, errors = next(chunks)
            skipped.extend((start + pos, name, reason) for pos, name, reason in errors or ())
            items = [(start + i, img) for i, img in enumerate(opened) if img is not None]
            if items:
                feats = _view_features(store, feeders, [img for _, img in items])
                shared += time.perf_counter() - t0
                for f in feeders:
                    if f.method.needs_pixels:
                        f.add(items, store)
                    else:
                        vs = f.method.view_set()
                        rows = feats[(vs.recipe, vs.seed)][:, : vs.n_views]
                        if not f.method.raw_features:
                            rows = torch.nn.functional.normalize(rows, dim=-1)
                        f.add([(pos, rows[k]) for k, (pos, _) in enumerate(items)], store)
            if bar is not None:
                bar.update(len(part))
        for f in feeders:
            f.add([], store, final=True)
    finally:
        chunks.close()
        for f in feeders:
            f.method.finish()
        if bar is not None:
            bar.close()
    if skipped:
        shown = ", ".join(name for _, name, _ in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(
            f"skipped {len(skipped)} unreadable image(s): {shown} (result.info['skipped'] lists each with its reason)",
            SkippedImagesWarning,
            stacklevel=3,
        )
    for f in feeders:
        f.out.skipped = list(skipped)
        f.out.shared_seconds = shared
    return [f.out for f in feeders]


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
    return run_stream(
        [(method, ctx)], store, sources, names, batch_size=batch_size, on_error=on_error, progress=progress
    )[0]


def run_on_features(
    method: Method, ctx: MethodContext, features: torch.Tensor, *, batch_size: int = 256
) -> StreamOutput:
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
