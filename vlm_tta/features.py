"""Embeddings of class prompts and of test-time views, computed once and read from the cache after.

This is the only place that runs the encoders for the methods. Keys (see :mod:`vlm_tta.cache`):

* class embeddings: ``("text", model fingerprint, templates, classnames)`` -> C x D;
* view embeddings: ``("view", model fingerprint, image content hash, *ViewSet.key_parts(i))`` -> D.
  View 0 (the original) has the same key under every recipe, so zero-shot, TPT and every other
  method share it.

The cache stores raw (un-normalised) image embeddings, as SubTTA needs them; callers get them
L2-normalised unless they ask otherwise.

Images are addressed by the hash of their decoded pixels. To find that hash without decoding a file
again, the cache also remembers ``("file", SHA-256 of the file's bytes)`` -> pixel hash: on a warm
run an image file is read and hashed (about a tenth of a millisecond for a JPEG) but decoded only if
some of its views are not cached.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .cache import EmbeddingCache, make_key
from .errors import ImageError
from .images import content_hash, load_image
from .models.base import VisionLanguageModel, validate_classnames
from .templates import get_templates
from .views import ViewSet


class LazyImage:
    """An image decoded on first use (``.get()``), with its content hash known up front."""

    def __init__(self, load: Callable[[], Image.Image], content_hash: str) -> None:
        self._load = load
        self._image: Image.Image | None = None
        self.content_hash = content_hash

    def get(self) -> Image.Image:
        if self._image is None:
            self._image = self._load()
        return self._image


def _pixels(image: Image.Image | LazyImage) -> Image.Image:
    return image.get() if isinstance(image, LazyImage) else image


def _load(src: Any, name: str) -> Image.Image:
    try:
        return load_image(src)
    except ImageError as exc:
        raise ImageError(f"{name}: {exc}") from exc


def _file_key(src: Any) -> str | None:
    """The cache key of an image file's bytes (SHA-256), or None when ``src`` is not a readable file."""
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
    return make_key("file", digest)


class FeatureStore:
    """Class and view embeddings of one model, through a (possibly disabled) :class:`EmbeddingCache`.

    ``encode_batch_size`` bounds how many views go through the image encoder at once.
    """

    def __init__(
        self,
        model: VisionLanguageModel,
        cache: EmbeddingCache | None = None,
        encode_batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        self.model = model
        self.cache = cache if cache is not None else EmbeddingCache(enabled=False)
        self.encode_batch_size = encode_batch_size
        self.num_workers = num_workers

    def class_features(self, classnames: Sequence[str], templates=None, allow_duplicates: bool = False) -> torch.Tensor:
        """C x D L2-normalised class embeddings (templates ensembled as in CLIP)."""
        names = validate_classnames(classnames, allow_duplicates)
        temps = get_templates(templates)
        key = make_key("text", self.model.fingerprint, temps, names)
        arr = self.cache.get_or_compute(
            [key], lambda _missing: self.model.class_embeddings(names, temps, allow_duplicates)[None]
        )
        return torch.from_numpy(np.ascontiguousarray(arr[0]))

    def open_images(self, sources: Sequence[Any], names: Sequence[str] | None = None) -> list[LazyImage]:
        """Lazy images with their content hashes, for paths, PIL images, arrays or tensors.

        Files whose identity the cache has seen are not decoded here (their hash is read back);
        everything else is decoded once, hashed and kept decoded. Decoding errors are
        :class:`~vlm_tta.errors.ImageError` prefixed with the source's name (``names[i]``).
        """
        names = list(names) if names is not None else [f"image #{i}" for i in range(len(sources))]
        file_keys = [_file_key(src) for src in sources]
        known = self.cache.get_many([k for k in file_keys if k is not None])
        out: list[LazyImage] = []
        new_files: list[tuple[str, np.ndarray]] = []
        for src, name, fkey in zip(sources, names, file_keys):
            if fkey is not None and fkey in known:
                out.append(LazyImage(lambda src=src, name=name: _load(src, name), known[fkey].tobytes().hex()))
                continue
            image = _load(src, name)
            lazy = LazyImage(lambda image=image: image, content_hash(image))
            lazy.get()
            out.append(lazy)
            if fkey is not None:
                new_files.append((fkey, np.frombuffer(bytes.fromhex(lazy.content_hash), dtype=np.uint8)))
        if new_files:
            self.cache.put_many(new_files)
        return out

    def view_features(
        self,
        images: Sequence[Image.Image | LazyImage],
        view_set: ViewSet,
        normalize: bool = True,
        hashes: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """N x V x D embeddings of the views of RGB ``images`` (PIL or :class:`LazyImage`;
        V = ``view_set.n_views``).

        Only views missing from the cache are generated and encoded, in batches of
        ``encode_batch_size``; a lazy image is decoded only if some of its views are missing.
        """
        n, v = len(images), view_set.n_views
        if hashes is None:
            hashes = [img.content_hash if isinstance(img, LazyImage) else content_hash(img) for img in images]
        fp = self.model.fingerprint
        keys = [make_key("view", fp, h, *view_set.key_parts(j)) for h in hashes for j in range(v)]

        def compute(missing: list[int]) -> np.ndarray:
            # Group the missing (image, view) pairs by image so each image's views are made once.
            by_image: dict[int, list[int]] = {}
            for flat in missing:
                by_image.setdefault(flat // v, []).append(flat % v)
            out = np.empty((len(missing), self.model.embed_dim), dtype=np.float32)
            row_of = {flat: r for r, flat in enumerate(missing)}
            pending_rows: list[int] = []
            pending_pixels: list[torch.Tensor] = []

            def flush() -> None:
                if pending_pixels:
                    emb = self.model.encode_images(torch.cat(pending_pixels), normalize=False)
                    out[pending_rows] = emb.numpy()
                    pending_rows.clear()
                    pending_pixels.clear()

            for i, view_ids in by_image.items():
                pixels = view_set.make(
                    _pixels(images[i]),
                    self.model.preprocess_cfg,
                    indices=view_ids,
                    original=self.model.preprocess,
                    image_hash=hashes[i],
                    num_workers=self.num_workers,
                )
                pending_pixels.append(pixels)
                pending_rows.extend(row_of[i * v + j] for j in view_ids)
                if len(pending_rows) >= self.encode_batch_size:
                    flush()
            flush()
            return out

        arr = self.cache.get_or_compute(keys, compute) if keys else np.empty((0, self.model.embed_dim), np.float32)
        feats = torch.from_numpy(np.ascontiguousarray(arr)).view(n, v, -1)
        return torch.nn.functional.normalize(feats, dim=-1) if normalize else feats


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
    each made on first access (embeddings through the store's cache)."""

    def __init__(self, index: int, image: Image.Image | LazyImage, store: FeatureStore) -> None:
        self.index = index
        self._image = image
        self.store = store
        self.image_hash = image.content_hash if isinstance(image, LazyImage) else content_hash(image)

    @property
    def image(self) -> Image.Image:
        """The RGB pixels (decoded on first access)."""
        return _pixels(self._image)

    def views(self, view_set: ViewSet, indices: Sequence[int] | None = None) -> torch.Tensor:
        """Model-ready pixels of the views (len(indices) x 3 x H x W; all views by default)."""
        model = self.store.model
        return view_set.make(
            self.image,
            model.preprocess_cfg,
            indices=indices,
            original=model.preprocess,
            image_hash=self.image_hash,
            num_workers=self.store.num_workers,
        )

    def view_features(self, view_set: ViewSet, normalize: bool = True) -> torch.Tensor:
        """V x D embeddings of the views (read from the cache when present)."""
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
