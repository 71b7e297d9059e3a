"""Embeddings of class prompts and of test-time views, computed once and read from the cache after.

This is the only place that runs the encoders for the methods. Keys (see :mod:`vlm_tta.cache`):

* class embeddings: ``("text", model fingerprint, templates, classnames)`` -> C x D;
* view embeddings, one row per block of views (:func:`~vlm_tta.views.view_blocks`):
  ``("view", model fingerprint, image content hash, *ViewSet.block_key_parts(start, count))`` ->
  count x D (the original alone: -> D). View 0 (the original) has the same key under every recipe,
  so zero-shot, TPT and every other method share it.

The cache stores raw (un-normalised) image embeddings, as SubTTA needs them; callers get them
L2-normalised unless they ask otherwise.

Images are addressed by the hash of their decoded pixels. To find that hash without decoding a file
again, the cache also remembers ``("file", SHA-256 of the file's bytes, EXIF choice)`` -> pixel hash:
on a warm run an image file is read and hashed (about a tenth of a millisecond for a JPEG) but decoded
only if some of its views are not cached. The EXIF choice (apply the orientation tag or not) is part
of that key because the same bytes decode to different pixels under the two choices.

Callers may also hand over views they made themselves (:class:`GivenViews`: a ``V x 3 x H x W``
tensor of preprocessed views, view 0 the original); they are addressed by the hash of the tensor and
used as given by every method, whatever recipe it would otherwise ask for.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .cache import EmbeddingCache, make_key, make_keys
from .errors import ImageError
from .images import content_hash, load_image
from .models.base import VisionLanguageModel, validate_classnames
from .templates import get_templates
from .views import ViewSet, view_blocks


class LazyImage:
    """An image decoded on first use (``.get()``), with its content hash known up front."""

    def __init__(self, load: Callable[[], Image.Image], content_hash: str) -> None:
        self._load = load
        self._image: Image.Image | None = None
        self.content_hash = content_hash
        #: views being made ahead of use (see :meth:`make_views_ahead`): view set -> Future of (ids, pixels)
        self._ahead: dict[ViewSet, Future] = {}

    def get(self) -> Image.Image:
        if self._image is None:
            self._image = self._load()
        return self._image

    def key_parts(self, view_set: ViewSet, start: int, count: int) -> tuple:
        """The cache identity of views ``start .. start + count - 1`` besides the model and the image."""
        return view_set.block_key_parts(start, count)

    def make_views(
        self, view_set: ViewSet, model: VisionLanguageModel, indices: Sequence[int] | None, num_workers: int = 0
    ) -> torch.Tensor:
        """Model-ready pixels of views ``indices`` of this image (``len(indices) x 3 x H x W``; on the
        model's device for the tensor-path recipes, which make them there). Views made ahead by
        :meth:`make_views_ahead` are used when they cover ``indices`` (the same pixels either way)."""
        ahead = self._ahead.pop(view_set, None) if self._ahead else None
        if ahead is not None:
            made, pixels = ahead.result()  # an error (an unreadable file) is raised here, as it would be below
            want = list(range(view_set.n_views)) if indices is None else [int(i) for i in indices]
            where = {j: p for p, j in enumerate(made)}
            if pixels is not None and all(j in where for j in want):
                return pixels if want == made else pixels[[where[j] for j in want]]
        return self._make(view_set, model, indices, num_workers)

    def make_views_ahead(
        self,
        view_set: ViewSet,
        which: Callable[[], list[int]],
        model: VisionLanguageModel,
        num_workers: int,
        depth: int,
    ) -> None:
        """Start making views ``which()`` of ``view_set`` in a background thread, for a later
        :meth:`make_views` (at most one pending set per view set)."""
        if view_set in self._ahead:
            return

        def work() -> tuple[list[int], torch.Tensor | None]:
            ids = which()
            return ids, self._make(view_set, model, ids, num_workers) if ids else None

        self._ahead[view_set] = prefetch_pool(depth, "samples").submit(work)

    def _make(
        self, view_set: ViewSet, model: VisionLanguageModel, indices: Sequence[int] | None, num_workers: int
    ) -> torch.Tensor:
        return view_set.make(
            self.get(),
            model.preprocess_cfg,
            indices=indices,
            original=model.preprocess,
            image_hash=self.content_hash,
            num_workers=num_workers,
            device=model.device,
        )


class GivenViews:
    """Views a caller made: a ``V x 3 x H x W`` float tensor, preprocessed for the model (its size,
    mean and std), view 0 the original image. Every method reads them as given: view ``i`` is
    ``pixels[i]`` whatever recipe the method would otherwise use, so the caller's own augmentations,
    or another implementation's exact view tensors, can be fed to any method."""

    def __init__(self, pixels: torch.Tensor | np.ndarray, name: str = "views") -> None:
        t = torch.as_tensor(pixels)
        if t.ndim != 4 or t.shape[1] != 3:
            raise ImageError(f"{name}: preprocessed views must be V x 3 x H x W; got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ImageError(f"{name}: preprocessed views must be floating point (normalised pixels); got {t.dtype}")
        t = t.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(t).all():
            raise ImageError(f"{name}: preprocessed views contain NaN or infinite values")
        self.pixels = t
        self.name = name
        h = hashlib.sha256(f"given-views:{tuple(t.shape)}:".encode())
        h.update(t.numpy().tobytes())
        self.content_hash = h.hexdigest()

    def get(self) -> Image.Image:
        raise ImageError(
            f"{self.name}: this method needs the image itself, but only preprocessed views were given; "
            "pass the images (paths, PIL images or arrays) instead"
        )

    def key_parts(self, view_set: ViewSet, start: int, count: int) -> tuple:
        return ("given", int(start)) if count == 1 else ("given", int(start), int(count))

    def make_views(
        self, view_set: ViewSet, model: VisionLanguageModel, indices: Sequence[int] | None, num_workers: int = 0
    ) -> torch.Tensor:
        v = len(self.pixels)
        if v < view_set.n_views:
            raise ImageError(
                f"{self.name}: the method reads {view_set.n_views} views per image but {v} were given; pass "
                f"at least {view_set.n_views} views (view 0 the original) or lower the method's view count"
            )
        h, w = model.preprocess_cfg.image_size
        if tuple(self.pixels.shape[2:]) != (h, w):
            raise ImageError(
                f"{self.name}: views are {tuple(self.pixels.shape[2:])} pixels but the model takes {(h, w)}; "
                "preprocess them to the model's input size"
            )
        return self.pixels if indices is None else self.pixels[list(indices)]


ImageSource = Union[LazyImage, GivenViews]


def _as_source(image: Any, image_hash: str | None = None) -> ImageSource:
    if isinstance(image, (LazyImage, GivenViews)):
        return image
    if isinstance(image, Image.Image):
        return LazyImage(lambda image=image: image, image_hash or content_hash(image))
    raise TypeError(f"expected a PIL image, LazyImage or GivenViews; got {type(image).__name__}")


def _load(src: Any, name: str, exif_transpose: bool = True) -> Image.Image:
    try:
        return load_image(src, exif_transpose=exif_transpose)
    except ImageError as exc:
        raise ImageError(f"{name}: {exc}") from exc


def _file_key(src: Any, exif_transpose: bool = True) -> str | None:
    """The cache key of an image file's bytes (SHA-256) and the EXIF choice, or None when ``src`` is
    not a readable file."""
    if not isinstance(src, (str, os.PathLike)):
        return None
    try:
        with open(src, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest() if hasattr(hashlib, "file_digest") else None
            if digest is None:  # Python 3.10
                f.seek(0)
                digest = hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None
    # Entries written before EXIF orientation was applied used the bare digest: that is the
    # "ignore EXIF" choice, so it keeps the bare key and applying the orientation gets its own.
    return make_key("file", digest, "exif-applied") if exif_transpose else make_key("file", digest)


_PREFETCH_POOLS: dict[tuple[int, str, int], ThreadPoolExecutor] = {}
_PREFETCH_LOCK = threading.Lock()


def prefetch_pool(depth: int, stage: str = "views") -> ThreadPoolExecutor:
    """The shared pool of ``depth`` threads that run ``stage`` ahead of the encoder ("views": decode
    and make views; "chunks": open the next chunk of images). Each stage has its own pools, apart
    from the view workers' pool that their tasks use, so no task waits on its own pool."""
    key = (os.getpid(), stage, depth)  # a forked child has none of its parent's threads: new pools
    with _PREFETCH_LOCK:
        pool = _PREFETCH_POOLS.get(key)
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix=f"vlm_tta-prefetch-{stage}")
            _PREFETCH_POOLS[key] = pool
        return pool


def prefetched(fn: Callable[..., Any], items: Sequence[tuple], depth: int, stage: str = "views") -> Iterator[Any]:
    """``fn(*item)`` for each item, in order, with up to ``depth`` items computed ahead in
    :func:`prefetch_pool` threads while the caller works on the current one (``depth=0``: in this
    thread, one at a time). An exception is raised when the caller reaches its item, as it would be
    without prefetching; work not yet started is cancelled when the caller closes the generator."""
    if depth <= 0:
        for item in items:
            yield fn(*item)
        return
    pool = prefetch_pool(depth, stage)
    queue: collections.deque[Future] = collections.deque()
    nxt = 0
    try:
        while nxt < len(items) or queue:
            while nxt < len(items) and len(queue) <= depth:
                queue.append(pool.submit(fn, *items[nxt]))
                nxt += 1
            yield queue.popleft().result()
    finally:
        for fut in queue:
            fut.cancel()
        for fut in queue:  # let running ones end before the caller moves on (they read its inputs)
            if not fut.cancelled():
                try:
                    fut.result()
                except BaseException:  # noqa: BLE001 - an error after the caller stopped is not its error
                    pass


class FeatureStore:
    """Class and view embeddings of one model, through a (possibly disabled) :class:`EmbeddingCache`.

    ``encode_batch_size`` bounds how many views go through the image encoder at once;
    ``num_workers`` threads make the views; ``exif_transpose`` applies image files' EXIF orientation
    (as transformers' image loading does) before anything else. ``stats`` counts cache hits and
    misses of class and view embeddings (what ``classify`` reports in ``info["cache"]``).

    ``prefetch`` (default 0: off) is how many images are decoded and have their views made ahead of
    the image encoder, in background threads, so view making and encoding overlap (it also lets
    :func:`vlm_tta.engine.run_stream` open the next chunk of images while the current one is being
    encoded). Views are pure functions of (recipe, seed, image) and encoder batches are cut exactly
    as without prefetching, so embeddings and predictions are bit-identical for every value. Memory
    grows by about ``prefetch`` images' views (64 views at 224 px: 38 MB each).
    """

    def __init__(
        self,
        model: VisionLanguageModel,
        cache: EmbeddingCache | None = None,
        encode_batch_size: int = 64,
        num_workers: int = 0,
        exif_transpose: bool = True,
        prefetch: int = 0,
    ) -> None:
        if isinstance(prefetch, bool) or not isinstance(prefetch, (int, np.integer)) or prefetch < 0:
            raise ValueError(f"prefetch must be an integer >= 0 (images made ahead of the encoder); got {prefetch!r}")
        self.model = model
        self.cache = cache if cache is not None else EmbeddingCache(enabled=False)
        self.encode_batch_size = encode_batch_size
        self.num_workers = num_workers
        self.exif_transpose = exif_transpose
        self.prefetch = int(prefetch)
        self.stats = {"class_hits": 0, "class_misses": 0, "view_hits": 0, "view_misses": 0}

    def class_features(self, classnames: Sequence[str], templates=None, allow_duplicates: bool = False) -> torch.Tensor:
        """C x D L2-normalised class embeddings (templates ensembled as in CLIP)."""
        names = validate_classnames(classnames, allow_duplicates)
        temps = get_templates(templates)
        key = make_key("text", self.model.fingerprint, temps, names)
        computed = []

        def compute(_missing):
            computed.append(1)
            return self.model.class_embeddings(names, temps, allow_duplicates)[None]

        arr = self.cache.get_or_compute([key], compute)
        self.stats["class_misses" if computed else "class_hits"] += 1
        return torch.from_numpy(np.ascontiguousarray(arr[0]))

    def open_images(
        self, sources: Sequence[Any], names: Sequence[str] | None = None, errors: list | None = None
    ) -> list[ImageSource | None]:
        """Image sources with their content hashes, for paths, PIL images, arrays, tensors or
        :class:`GivenViews`.

        Files whose identity the cache has seen are not decoded here (their hash is read back);
        everything else is decoded once, hashed and kept decoded. A source that cannot be read raises
        :class:`~vlm_tta.errors.ImageError` prefixed with its name (``names[i]``) — or, when an
        ``errors`` list is given, is appended to it as ``(position, name, message)`` and returned as None.
        """
        names = list(names) if names is not None else [f"image #{i}" for i in range(len(sources))]
        file_keys = [_file_key(src, self.exif_transpose) for src in sources]
        known = self.cache.get_many([k for k in file_keys if k is not None])
        out: list[ImageSource | None] = []
        new_files: list[tuple[str, np.ndarray]] = []
        for pos, (src, name, fkey) in enumerate(zip(sources, names, file_keys)):
            if isinstance(src, GivenViews):
                out.append(src)
                continue
            if fkey is not None and fkey in known:
                out.append(
                    LazyImage(
                        lambda src=src, name=name: _load(src, name, self.exif_transpose), known[fkey].tobytes().hex()
                    )
                )
                continue
            try:
                image = _load(src, name, self.exif_transpose)
            except ImageError as exc:
                if errors is None:
                    raise
                errors.append((pos, name, str(exc)))
                out.append(None)
                continue
            lazy = LazyImage(lambda image=image: image, content_hash(image))
            lazy.get()
            out.append(lazy)
            if fkey is not None:
                new_files.append((fkey, np.frombuffer(bytes.fromhex(lazy.content_hash), dtype=np.uint8)))
        if new_files:
            self.cache.put_many(new_files)
        return out

    def missing_views(self, source: ImageSource, view_set: ViewSet) -> list[int]:
        """Indices of the views of ``source`` whose embeddings the cache does not hold."""
        blocks = view_blocks(view_set.n_views)
        parts = [source.key_parts(view_set, *b) for b in blocks]
        keys = make_keys(("view", self.model.fingerprint, source.content_hash), parts)
        present = self.cache.present(keys)
        missing = [(start, count) for (start, count), key in zip(blocks, keys) if key not in present]
        return [j for start, count in missing for j in range(start, start + count)]

    def view_features(
        self,
        images: Sequence[Image.Image | ImageSource],
        view_set: ViewSet,
        normalize: bool = True,
        hashes: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """N x V x D embeddings of the views of ``images`` (RGB PIL images, :class:`LazyImage` or
        :class:`GivenViews`; V = ``view_set.n_views``).

        Only views missing from the cache are made and encoded, in batches of ``encode_batch_size``;
        a lazy image is decoded only if some of its views are missing.
        """
        if hashes is not None and len(hashes) != len(images):
            raise ValueError(f"got {len(hashes)} image hashes for {len(images)} images")
        sources = [_as_source(img, None if hashes is None else hashes[i]) for i, img in enumerate(images)]
        n, v = len(sources), view_set.n_views
        if hashes is None:
            hashes = [src.content_hash for src in sources]
        dim = self.model.embed_dim
        out = np.empty((n, v, dim), dtype=np.float32)
        if n == 0:
            return torch.from_numpy(out)
        # One cache row per block of views (see view_blocks); rows of one shape are read together.
        blocks = view_blocks(v)
        groups: dict[tuple[int, int], tuple[list[str], list[int]]] = {}  # shape -> (keys, image of each key)
        fingerprint = self.model.fingerprint
        # a source's key parts depend on its kind (file/pixels or given views) and the view set only
        parts_of: dict[type, list[tuple]] = {}
        for i, (src, h) in enumerate(zip(sources, hashes)):
            parts = parts_of.get(type(src))
            if parts is None:
                parts = parts_of[type(src)] = [src.key_parts(view_set, *b) for b in blocks]
            keys = make_keys(("view", fingerprint, h), parts)
            for (start, count), key in zip(blocks, keys):
                group = groups.setdefault((start == 0, count), ([], []))
                group[0].append(key)
                group[1].append(i)
        for (is_original, count), (keys, images_of) in groups.items():
            starts = [0] if is_original else [s for s, c in blocks if c == count and s > 0]

            def compute(missing: list[int], count=count, starts=starts, images_of=images_of, is_original=is_original):
                # the missing (image, view) pairs grouped by image, so each image's views are made once
                wanted: dict[int, list[int]] = {}
                for m in missing:
                    start = starts[m % len(starts)]
                    wanted.setdefault(images_of[m], []).extend(range(start, start + count))
                self.stats["view_misses"] += len(missing) * count
                emb = self._encode_views(sources, view_set, wanted)
                rows = [emb[(images_of[m], starts[m % len(starts)] + j)] for m in missing for j in range(count)]
                block = np.stack(rows).reshape(len(missing), count, dim)
                return block[:, 0] if is_original else block

            misses = self.stats["view_misses"]
            arr = self.cache.get_or_compute(keys, compute)
            self.stats["view_hits"] += len(keys) * count - (self.stats["view_misses"] - misses)
            arr = arr.reshape(n, len(starts), count, dim)
            for b, start in enumerate(starts):
                out[:, start : start + count] = arr[:, b]
        feats = torch.from_numpy(out)
        return torch.nn.functional.normalize(feats, dim=-1) if normalize else feats

    def _encode_views(
        self, sources: Sequence[ImageSource], view_set: ViewSet, wanted: dict[int, list[int]]
    ) -> dict[tuple[int, int], np.ndarray]:
        """Raw embeddings ``{(image, view): D}`` of the ``wanted`` views of each image, made image by
        image and encoded in batches of ``encode_batch_size``."""
        out: dict[tuple[int, int], np.ndarray] = {}
        pending_ids: list[tuple[int, int]] = []
        pending_pixels: list[torch.Tensor] = []

        def flush() -> None:
            if pending_pixels:
                pixels = torch.cat([p.to(self.model.device) for p in pending_pixels])
                emb = self.model.encode_images(pixels, normalize=False).numpy()
                out.update(zip(pending_ids, emb))
                pending_ids.clear()
                pending_pixels.clear()

        def make(i: int, view_ids: list[int]) -> torch.Tensor:
            return sources[i].make_views(view_set, self.model, view_ids, self.num_workers)

        items = list(wanted.items())
        with contextlib.closing(prefetched(make, items, self.prefetch)) as made:
            for (i, view_ids), pixels in zip(items, made):
                pending_pixels.append(pixels)
                pending_ids.extend((i, j) for j in view_ids)
                if len(pending_ids) >= self.encode_batch_size:
                    flush()
        flush()
        return out


def encoder_call_counter(model: VisionLanguageModel) -> Callable[[], dict[str, int]]:
    """Wrap ``model``'s encoders to count calls (used by tests and benchmarks); returns a getter."""
    counts = {"images": 0, "texts": 0}
    enc_i, enc_t = model._encode_images, model._encode_texts

    def images(pixels):
        counts["images"] += 1
        return enc_i(pixels)

    def texts(texts_):
        counts["texts"] += 1
        return enc_t(texts_)

    model._encode_images = images  # type: ignore[method-assign]
    model._encode_texts = texts  # type: ignore[method-assign]
    return lambda: dict(counts)


class Sample:
    """One test image as a model-level method sees it: its pixels, its views and their embeddings,
    each made on first access (embeddings through the store's cache). When the caller gave
    preprocessed views (:class:`GivenViews`), ``views`` returns those and ``image`` raises."""

    def __init__(self, index: int, image: Image.Image | ImageSource, store: FeatureStore) -> None:
        self.index = index
        self._image = _as_source(image)
        self.store = store
        self.image_hash = self._image.content_hash
        self._chunk: Sequence[Sample] = ()
        self._position = 0

    @staticmethod
    def link(samples: Sequence["Sample"]) -> None:
        """Let each of a chunk's samples, when its views (or their embeddings) are first asked for,
        start making the same views of the next ``store.prefetch`` samples in background threads
        (the engine links the chunks it hands to model-level methods). Exact: views are pure
        functions of their key; only views missing from the cache are made for embeddings."""
        for k, sample in enumerate(samples):
            sample._chunk, sample._position = samples, k

    def _look_ahead(self, view_set: ViewSet, indices: Sequence[int] | None, features: bool) -> None:
        depth = self.store.prefetch
        if not depth or not self._chunk:
            return
        store = self.store
        for other in self._chunk[self._position + 1 : self._position + 1 + depth]:
            src = other._image
            if not isinstance(src, LazyImage):
                continue
            if features:
                which = lambda src=src: store.missing_views(src, view_set)  # noqa: E731
            else:
                ids = list(range(view_set.n_views)) if indices is None else [int(i) for i in indices]
                which = lambda ids=ids: ids  # noqa: E731
            src.make_views_ahead(view_set, which, store.model, store.num_workers, depth)

    @property
    def image(self) -> Image.Image:
        """The RGB pixels (decoded on first access)."""
        return self._image.get()

    @property
    def has_image(self) -> bool:
        """False when only preprocessed views were given (no raw pixels to make other views from)."""
        return not isinstance(self._image, GivenViews)

    def views(self, view_set: ViewSet, indices: Sequence[int] | None = None) -> torch.Tensor:
        """Model-ready pixels of the views (len(indices) x 3 x H x W; all views by default)."""
        self._look_ahead(view_set, indices, features=False)
        return self._image.make_views(view_set, self.store.model, indices, self.store.num_workers)

    def view_features(self, view_set: ViewSet, normalize: bool = True) -> torch.Tensor:
        """V x D embeddings of the views (read from the cache when present)."""
        self._look_ahead(view_set, None, features=True)
        return self.store.view_features([self._image], view_set, normalize=normalize, hashes=[self.image_hash])[0]


def batch_view_features(samples: Sequence[Sample], view_set: ViewSet, normalize: bool = True) -> torch.Tensor:
    """N x V x D embeddings of the views of several samples in one batched pass through the shared
    cache (what a model-level method that adapts many images at once reads)."""
    if not samples:
        raise ValueError("batch_view_features needs at least one sample")
    store = samples[0].store
    return store.view_features(
        [s._image for s in samples], view_set, normalize=normalize, hashes=[s.image_hash for s in samples]
    )
