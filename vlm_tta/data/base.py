"""The :class:`Dataset` every reader returns, seeded stream orders, and safe path handling.

A dataset is a list of ``(path, label)`` samples plus class names. Nothing is decoded up front:
an image is read from disk (and converted to RGB by :func:`vlm_tta.images.load_image`) only when
it is indexed or streamed, so a 50,000-image set costs a list of strings.

Stream orders are a pure function of ``(seed, dataset length)``: they come from a SplitMix64 hash
of the sample index, not from a library RNG, so the same seed gives the same order on every
platform and every numpy/torch version.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..errors import DatasetError, ImageError
from ..images import load_image

__all__ = [
    "Dataset",
    "Stream",
    "NOISY_LABEL",
    "IMAGE_EXTENSIONS",
    "DatasetWarning",
    "CorruptImageWarning",
    "permutation",
    "is_image_file",
]

logger = logging.getLogger("vlm_tta.data")

PathLike = Union[str, "os.PathLike[str]"]

#: Label of a noisy (out-of-distribution) sample in a noisy-TTA mix or an OOD set.
NOISY_LABEL = -1

#: File extensions read as images (compared case-insensitively; ImageNet uses ``.JPEG``).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
)


class DatasetWarning(UserWarning):
    """Something in a dataset is odd but usable (e.g. a split file's class name differs)."""


class CorruptImageWarning(DatasetWarning):
    """An image in a stream could not be decoded and was skipped."""


def is_image_file(name: str) -> bool:
    """True when ``name`` has an image extension and is not a hidden file."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------------------------
# Seeded orders
# --------------------------------------------------------------------------------------------

_U64 = np.uint64


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += _U64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
        x ^= x >> _U64(31)
    return x


def _check_seed(seed: Any) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return seed


def permutation(n: int, seed: int) -> np.ndarray:
    """A pseudo-random permutation of ``range(n)`` that depends only on ``(n, seed)``.

    Indices are sorted by a SplitMix64 hash of ``index ^ hash(seed)``; the result is the same on
    every platform and library version (unlike ``np.random``/``torch`` generators).
    """
    seed = _check_seed(seed)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    keys = _splitmix64(np.arange(n, dtype=np.uint64) ^ key)
    return np.argsort(keys, kind="stable").astype(np.int64)


# --------------------------------------------------------------------------------------------
# Path safety
# --------------------------------------------------------------------------------------------


class SafeJoiner:
    """Joins relative paths from split files / CSVs onto a base folder, refusing escapes.

    A path escapes when it is absolute, climbs out with ``..``, or resolves (following symlinks)
    outside the base folder's own resolved location. Directory resolutions are cached, so a
    50,000-entry split costs one ``lstat`` per file.
    """

    OK, MISSING, ESCAPE = "ok", "missing", "escape"

    def __init__(self, base: PathLike):
        self.base = os.path.abspath(os.fspath(base))
        self.base_real = os.path.realpath(self.base)
        self._dir_ok: dict[str, bool] = {}

    def _inside(self, real: str) -> bool:
        return real == self.base_real or real.startswith(self.base_real.rstrip(os.sep) + os.sep)

    def join(self, rel: Any) -> tuple[str, str]:
        """Return ``(absolute path, status)`` with status ``ok``, ``missing`` or ``escape``."""
        if not isinstance(rel, str) or not rel.strip() or "\x00" in rel:
            return str(rel), self.ESCAPE
        norm_input = rel.replace("\\", "/") if os.sep == "/" else rel
        if os.path.isabs(norm_input) or norm_input.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
            return rel, self.ESCAPE
        norm = os.path.normpath(norm_input)
        if norm == os.pardir or norm.startswith(os.pardir + os.sep) or norm == ".":
            return rel, self.ESCAPE
        full = os.path.join(self.base, norm)
        parent = os.path.dirname(full)
        ok = self._dir_ok.get(parent)
        if ok is None:
            ok = self._inside(os.path.realpath(parent))
            self._dir_ok[parent] = ok
        if not ok:
            return full, self.ESCAPE
        try:
            st = os.lstat(full)
        except OSError:
            return full, self.MISSING
        if stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(full)
            if not self._inside(real):
                return full, self.ESCAPE
            if not os.path.isfile(real):
                return full, self.MISSING
        elif not stat.S_ISREG(st.st_mode):
            return full, self.MISSING
        return full, self.OK


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class Dataset:
    """An indexed, lazily decoded list of ``(image path, label)`` samples with class names.

    ``dataset[i]`` returns ``(PIL RGB image, label)``; ``dataset.stream(seed)`` iterates in a
    seeded order, skipping (and counting) images that fail to decode. Labels index
    :attr:`classnames`; noisy/OOD samples carry :data:`NOISY_LABEL` (-1) and ``is_noisy`` True.

    Attributes:
        name: registry name (``"imagenet_a"``) or a user-given name.
        split: ``"test"``, ``"train"``, ``"val"``, ... (``None`` for user data).
        root: the folder sample paths are relative to (used for fingerprints and subset files).
        classnames: the class names in label order.
        meta: reader-specific facts, e.g. ``wnids`` and ``imagenet_indices`` for ImageNet-A/R.
    """

    def __init__(
        self,
        samples: Iterable[tuple[PathLike, int]],
        classnames: Sequence[str],
        *,
        name: str = "dataset",
        split: Optional[str] = None,
        root: Optional[PathLike] = None,
        meta: Optional[dict] = None,
        is_noisy: Optional[Sequence[bool]] = None,
    ):
        paths: list[str] = []
        labels: list[int] = []
        for path, label in samples:
            paths.append(os.fspath(path))
            labels.append(int(label))
        self._paths = paths
        self._labels = np.asarray(labels, dtype=np.int64)
        self.classnames: list[str] = [str(c) for c in classnames]
        self.name = name
        self.split = split
        self.root = os.path.abspath(os.fspath(root)) if root is not None else None
        self.meta: dict = dict(meta or {})
        if is_noisy is None:
            self._is_noisy = self._labels == NOISY_LABEL
        else:
            self._is_noisy = np.asarray(is_noisy, dtype=bool)
            if self._is_noisy.shape != self._labels.shape:
                raise ValueError("is_noisy must have one entry per sample")
        n_cls = len(self.classnames)
        bad = (self._labels != NOISY_LABEL) & ((self._labels < 0) | (self._labels >= n_cls))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DatasetError(
                f"{name}: sample {i} ({paths[i]}) has label {int(self._labels[i])}, outside "
                f"0..{len(self.classnames) - 1} for {len(self.classnames)} class names"
            )

    # -- basic access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._paths)

    def _index(self, i: Any) -> int:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"dataset indices must be integers, not {type(i).__name__}")
        n = len(self._paths)
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"index {int(i)} out of range for {self.name} with {n} samples")
        return j

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        """Decode sample ``i``: ``(RGB PIL image, label)``. Raises ImageError naming the file."""
        j = self._index(i)
        return self.load(j), int(self._labels[j])

    def load(self, i: int) -> Image.Image:
        """Decode image ``i`` into RGB (raises :class:`~vlm_tta.errors.ImageError` with its path)."""
        return load_image(self._paths[self._index(i)])

    def path(self, i: int) -> str:
        return self._paths[self._index(i)]

    def label(self, i: int) -> int:
        return int(self._labels[self._index(i)])

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    @property
    def labels(self) -> np.ndarray:
        """Labels as an int64 array (a copy)."""
        return self._labels.copy()

    @property
    def is_noisy(self) -> np.ndarray:
        """Boolean array: True for noisy/OOD samples (label :data:`NOISY_LABEL`)."""
        return self._is_noisy.copy()

    @property
    def samples(self) -> list[tuple[str, int]]:
        return list(zip(self._paths, self._labels.tolist()))

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def class_counts(self) -> np.ndarray:
        """Number of samples per class (noisy samples not counted)."""
        clean = self._labels[self._labels >= 0]
        return np.bincount(clean, minlength=len(self.classnames))

    def relpath(self, i: int) -> str:
        """Path of sample ``i`` relative to :attr:`root` (posix separators)."""
        return self._rel(self._paths[self._index(i)])

    def _rel(self, p: str) -> str:
        if self.root is not None:
            prefix = self.root.rstrip(os.sep) + os.sep
            if p.startswith(prefix):
                p = p[len(prefix) :]
            elif os.path.isabs(p):
                p = os.path.relpath(p, self.root)
        return p.replace(os.sep, "/")

    def fingerprint(self) -> str:
        """SHA-256 over the relative paths and labels, in order: identifies the exact sample list
        (moving the dataset folder elsewhere keeps it)."""
        cached = self.meta.get("_fingerprint")
        if cached is not None:
            return cached
        h = hashlib.sha256()
        for p, y in zip(self._paths, self._labels.tolist()):
            h.update(f"{self._rel(p)}\t{y}\n".encode("utf-8", "surrogateescape"))
        fp = h.hexdigest()
        self.meta["_fingerprint"] = fp
        return fp

    # -- derived datasets ---------------------------------------------------------------------
    def select(self, indices: Iterable[int], *, name: Optional[str] = None, meta: Optional[dict] = None) -> "Dataset":
        """A new dataset holding samples ``indices`` (in that order; repeats allowed)."""
        idx = [self._index(i) for i in indices]
        m = {k: v for k, v in self.meta.items() if not k.startswith("_")}
        m.update(meta or {})
        return Dataset(
            [(self._paths[i], int(self._labels[i])) for i in idx],
            self.classnames,
            name=name or self.name,
            split=self.split,
            root=self.root,
            meta=m,
            is_noisy=self._is_noisy[idx] if idx else np.zeros(0, dtype=bool),
        )

    # -- streams ------------------------------------------------------------------------------
    def order(self, seed: Optional[int] = 0) -> np.ndarray:
        """The index order of ``stream(seed)``; ``seed=None`` is the dataset's own order."""
        if seed is None:
            return np.arange(len(self), dtype=np.int64)
        return permutation(len(self), seed)

    def stream(
        self,
        seed: Optional[int] = 0,
        *,
        start: int = 0,
        with_index: bool = False,
        skip_corrupt: bool = True,
    ) -> "Stream":
        """Iterate ``(image, label)`` in the seeded order (see :class:`Stream`)."""
        return Stream(self, seed, start=start, with_index=with_index, skip_corrupt=skip_corrupt)

    def __iter__(self) -> Iterator[tuple[Image.Image, int]]:
        return iter(self.stream(seed=None))

    def __repr__(self) -> str:
        noisy = int(self._is_noisy.sum())
        extra = f", noisy={noisy}" if noisy else ""
        return (
            f"Dataset(name={self.name!r}, split={self.split!r}, samples={len(self)}, "
            f"classes={len(self.classnames)}{extra})"
        )


class Stream:
    """One pass over a dataset in a seeded order.

    Yields ``(image, label)`` (or ``(index, image, label)`` with ``with_index=True``, where index
    is the sample's position in the dataset). An image that fails to decode is reported with a
    :class:`CorruptImageWarning`, skipped, and recorded in :attr:`skipped`; it is never yielded
    with another sample's label. ``start`` resumes after ``start`` positions of the order.
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: Optional[int] = 0,
        *,
        start: int = 0,
        with_index: bool = False,
        skip_corrupt: bool = True,
    ):
        self.dataset = dataset
        self.seed = seed
        self.order = dataset.order(seed)
        if not 0 <= int(start) <= len(self.order):
            raise ValueError(f"start must be in 0..{len(self.order)}, got {start}")
        self.start = int(start)
        self.with_index = with_index
        self.skip_corrupt = skip_corrupt
        #: ``(index, path, reason)`` of every image skipped in the current pass.
        self.skipped: list[tuple[int, str, str]] = []
        self.yielded = 0

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.order) - self.start

    def __iter__(self) -> Iterator[Any]:
        ds = self.dataset
        labels = ds._labels
        self.skipped = []
        self.yielded = 0
        for pos in range(self.start, len(self.order)):
            i = int(self.order[pos])
            try:
                img = load_image(ds._paths[i])
            except ImageError as exc:
                if not self.skip_corrupt:
                    raise
                self.skipped.append((i, ds._paths[i], str(exc)))
                msg = f"{ds.name}: skipped unreadable image #{i} ({ds._paths[i]}): {exc}"
                logger.warning(msg)
                warnings.warn(msg, CorruptImageWarning, stacklevel=2)
                continue
            self.yielded += 1
            label = int(labels[i])
            yield (i, img, label) if self.with_index else (img, label)

    def __repr__(self) -> str:
        return f"Stream({self.dataset.name!r}, seed={self.seed}, len={len(self)}, skipped={self.n_skipped})"


def as_path(p: PathLike) -> Path:
    return Path(os.fspath(p)).expanduser()
