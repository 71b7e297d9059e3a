"""A persistent, content-addressed store of embeddings shared by every method, run and process.

    >>> cache = EmbeddingCache()                      # $VLM_TTA_CACHE_DIR or ~/.cache/vlm_tta
    >>> key = make_key("text", model.fingerprint, templates, classnames)
    >>> emb = cache.get_or_compute([key], lambda missing: model.class_embeddings(classnames, templates)[None])

Keys are content addresses: :func:`make_key` hashes a canonical JSON encoding of *what was
encoded* (model fingerprint, prompt set and class names, or image content hash and view recipe and
view index). Whoever asks for the same thing again, a second method, a resumed run, another
benchmark shard, gets the stored embedding and the encoder does not run.

Storage is one SQLite database (``embeddings.sqlite3``) in write-ahead-log mode:

* concurrent readers and writers in several processes are safe: SQLite serialises writers with
  file locks (each write waits up to :data:`BUSY_TIMEOUT_S` for the lock) and readers never block;
* every ``put``/``put_many`` is one transaction, so a process killed mid-write leaves all of it or
  none of it; a half-written WAL frame is discarded by SQLite's recovery on the next open;
* each row holds the raw little-endian bytes of the array beside its dtype, its shape and a
  CRC-32 checksum over all of them (and the key). A row that cannot be decoded for any reason
  (a failed check, a column of the wrong type) is never returned: it reads as a miss, is
  recomputed and is deleted. There is no pickle anywhere;
* :meth:`EmbeddingCache.clear` deletes rows in a write transaction and compacts the file with
  SQLite's own VACUUM and checkpoint; it never unlinks a database that other connections may be
  using, so no write another process makes is lost to it.

The cache never raises into the user's computation because of the environment: a directory that
cannot be created or written, a full disk, damaged rows or a file that is not a cache database
produce one ``RuntimeWarning`` per problem and location in a process (saying what happened and
what to do) and the cache degrades (to read-only, or to a no-op); the embeddings are then
computed as if there were no cache.

Floating arrays come back as ``float32``. ``storage_dtype="float16"`` halves the size on disk; see
:meth:`EmbeddingCache.get_or_compute` for how results stay identical between cold and warm runs.

Environment: ``VLM_TTA_CACHE_DIR`` (location), ``VLM_TTA_NO_CACHE=1`` (turn the cache off).
The ``vlm-tta cache info|clear|export|merge`` verbs are defined here (:func:`add_parser`, :func:`run`).
``export``/``merge`` copy a cache between machines: one cache per machine on local disk, since
SQLite's locking is not reliable on network filesystems (NFS).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import functools
import hashlib
import json
import math
import os
import re
import sqlite3
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "CACHE_DIR_ENV",
    "DB_FILENAME",
    "NO_CACHE_ENV",
    "EmbeddingCache",
    "add_parser",
    "as_cache",
    "cache_disabled_by_env",
    "default_cache_dir",
    "make_key",
    "run",
]

CACHE_DIR_ENV = "VLM_TTA_CACHE_DIR"
NO_CACHE_ENV = "VLM_TTA_NO_CACHE"
DB_FILENAME = "embeddings.sqlite3"
#: How long a writer waits for another process's write lock before giving up on one put.
BUSY_TIMEOUT_S = 60.0
#: How long clear() waits for other processes before it skips compacting the file.
_COMPACT_BUSY_TIMEOUT_S = 5.0
#: Keys per SELECT in get_many (well under SQLite's limit on bound parameters).
QUERY_CHUNK = 500

_SCHEMA_VERSION = 1
_PAGE_SIZE = 32768
_APPLICATION_ID = 0x766C7474  # "vltt": marks the database file as ours
_SIDE_SUFFIXES = ("-wal", "-shm", "-journal")
_STORAGE_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_ALLOWED_KINDS = set("biuf")  # bool, signed, unsigned, floating: raw bytes round-trip exactly
_KIND_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,32}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    key      TEXT PRIMARY KEY NOT NULL,
    kind     TEXT NOT NULL,
    dtype    TEXT NOT NULL,
    shape    TEXT NOT NULL,
    checksum BLOB NOT NULL,
    created  REAL NOT NULL,
    nbytes   INTEGER NOT NULL,
    data     BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS embeddings_kind ON embeddings(kind, nbytes);
"""

_TRUTHY = {"1", "true", "yes", "on"}


# ----------------------------------------------------------------------------------------------
# Location and keys
# ----------------------------------------------------------------------------------------------


def default_cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``path`` > ``$VLM_TTA_CACHE_DIR`` > ``$XDG_CACHE_HOME/vlm_tta`` >
    ``~/.cache/vlm_tta``. ``~`` and environment variables in ``path`` are expanded."""
    if path is not None and str(path) != "":
        return Path(os.path.expandvars(os.path.expanduser(os.fspath(path))))
    env = os.environ.get(CACHE_DIR_ENV, "").strip()
    if env:
        return Path(os.path.expandvars(os.path.expanduser(env)))
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg and os.path.isabs(os.path.expanduser(xdg)):
        return Path(os.path.expanduser(xdg)) / "vlm_tta"
    return Path.home() / ".cache" / "vlm_tta"


def cache_disabled_by_env() -> bool:
    """True when ``VLM_TTA_NO_CACHE`` is set to 1/true/yes/on."""
    return os.environ.get(NO_CACHE_ENV, "").strip().lower() in _TRUTHY


def _canonical(obj: Any) -> Any:
    """A JSON-able value that equal inputs map to equally (tuples as lists, numpy scalars as
    Python numbers, bytes and arrays by their SHA-256, dataclasses as tagged dicts)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, enum.Enum):
        return {"$enum": f"{type(obj).__qualname__}.{obj.name}"}
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"make_key: non-finite float {obj!r} in a cache key")
        return float(obj)
    if isinstance(obj, np.generic):
        return _canonical(obj.item())
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"$bytes": hashlib.sha256(bytes(obj)).hexdigest()}
    if isinstance(obj, np.ndarray):
        arr = np.asarray(obj, order="C")
        if arr.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"make_key: arrays of dtype {arr.dtype} cannot be part of a key")
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        return {"$ndarray": [arr.dtype.str, list(arr.shape), hashlib.sha256(arr.tobytes()).hexdigest()]}
    if isinstance(obj, (list, tuple)):
        return [_canonical(x) for x in obj]
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"make_key: dict keys must be strings, got {type(k).__name__} {k!r}")
            out[k] = _canonical(v)
        return out
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: _canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"$dataclass": type(obj).__qualname__, "fields": fields}
    if isinstance(obj, (set, frozenset)):
        items = [_canonical(x) for x in obj]
        return {"$set": sorted(items, key=lambda x: json.dumps(x, sort_keys=True))}
    raise TypeError(
        f"make_key: cannot build a cache key from a {type(obj).__name__}; use strings, numbers, "
        "lists, dicts, bytes, numpy arrays or dataclasses of those"
    )


def make_key(*parts: Any) -> str:
    """Content address of ``parts``: ``"<kind>:<sha256 hex>"``.

    The SHA-256 is over a canonical JSON encoding of all the parts (dicts with sorted keys,
    tuples as lists, floats as their shortest round-trip repr, so ``1`` and ``1.0`` differ).
    ``kind`` is the first part when it is a short name such as ``"text"`` or ``"view"``; it is
    stored beside the entry so ``info()`` and ``clear(kind=...)`` can tell kinds apart. Keys
    whose first part is not such a name are the bare hex digest (kind ``""``).

    >>> make_key("view", fingerprint, image_hash, "augmix", 0, 3)   # doctest: +SKIP
    'view:5f1c...'
    """
    if not parts:
        raise ValueError("make_key needs at least one part")
    return _finish_key(parts[0], _json_list(parts))


def make_keys(prefix: Sequence[Any], suffixes: Sequence[Sequence[Any]]) -> list[str]:
    """``[make_key(*prefix, *suffix) for suffix in suffixes]``, with the prefix encoded once (the
    keys of an image's views share everything but the view's own parts)."""
    if not prefix:
        return [make_key(*suffix) for suffix in suffixes]
    head = _json_list(prefix)[:-1]  # "[p1,p2" : the prefix's elements, each encoded on its own
    return [_finish_key(prefix[0], head + _tail(suffix)) for suffix in suffixes]


def _tail(suffix: Sequence[Any]) -> str:
    """``",s1,s2]"`` : the end of a key's JSON text after a prefix. The views of every image share a
    few suffixes, so plain ones (strings and ints) are encoded once."""
    if all(type(p) is str or type(p) is int for p in suffix):  # (not bools or floats: True == 1 == 1.0)
        return _plain_tail(tuple(suffix))
    return "," + _json_list(suffix)[1:] if len(suffix) else "]"


@functools.lru_cache(maxsize=4096)
def _plain_tail(suffix: tuple) -> str:
    return "," + _json_list(suffix)[1:] if suffix else "]"


#: JSON's own string encoder (``json.dumps(..., ensure_ascii=False)`` uses it for every string).
_json_str = json.encoder.encode_basestring


def _json_list(parts: Sequence[Any]) -> str:
    """The canonical JSON text of a list of key parts (see :func:`make_key`)."""
    if all(type(p) is str or type(p) is int for p in parts):  # the common case: what json.dumps writes
        return "[" + ",".join(_json_str(p) if type(p) is str else str(p) for p in parts) + "]"
    canon = _canonical(list(parts))
    return json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _finish_key(first: Any, text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if isinstance(first, str) and _KIND_RE.match(first):
        return f"{first}:{digest}"
    return digest


def _kind_of(key: str) -> str:
    head, sep, _ = key.partition(":")
    return head if sep and _KIND_RE.match(head) else ""


# ----------------------------------------------------------------------------------------------
# Array encoding
# ----------------------------------------------------------------------------------------------


def _to_numpy(value: Any) -> np.ndarray:
    """ndarray from an array-like or a torch tensor (any device/dtype) without importing torch."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        t = value.detach().cpu()
        try:
            return np.asarray(t.numpy())
        except (TypeError, RuntimeError):  # bfloat16 and friends have no numpy dtype
            return np.asarray(t.float().numpy())
    return np.asarray(value)


def _checksum(key: str, dtype: str, shape: str, data: bytes) -> bytes:
    """CRC-32 over the key, the dtype, the shape and the data (4 bytes). It guards against damage,
    not against an adversary; it is several times faster than a cryptographic hash, and on a warm
    cache checksumming the rows read was the largest cost of a benchmark run."""
    parts = (key.encode("utf-8"), dtype.encode(), shape.encode())
    header = b"".join(len(part).to_bytes(4, "little") + part for part in parts)  # each part length-prefixed
    return zlib.crc32(data, zlib.crc32(header)).to_bytes(4, "little")


def _blake2b_checksum(key: str, dtype: str, shape: str, data: bytes) -> bytes:
    """The 16-byte BLAKE2b checksum of rows written by earlier vlm_tta versions (still verified when read)."""
    h = hashlib.blake2b(digest_size=16)
    for part in (key.encode("utf-8"), dtype.encode(), shape.encode()):
        h.update(len(part).to_bytes(4, "little"))
        h.update(part)
    h.update(data)
    return h.digest()


def _encode(key: str, value: Any, storage: np.dtype) -> tuple[str, str, str, bytes, bytes]:
    """(kind, dtype, shape, checksum, data) of one entry. Floating arrays are stored in
    ``storage``; bool/int arrays keep their own dtype. Always little-endian, C order."""
    if not isinstance(key, str) or not key:
        raise TypeError(f"cache keys are non-empty strings (see make_key), got {key!r}")
    arr = _to_numpy(value)
    if arr.dtype.kind not in _ALLOWED_KINDS:
        raise TypeError(f"the embedding cache stores bool, int and float arrays, not {arr.dtype}")
    target = storage if arr.dtype.kind == "f" else arr.dtype.newbyteorder("<")
    arr = np.asarray(arr, dtype=target, order="C")  # (keeps 0-d arrays 0-d)
    dtype = arr.dtype.str
    shape = json.dumps([int(s) for s in arr.shape], separators=(",", ":"))
    data = arr.tobytes(order="C")
    return _kind_of(key), dtype, shape, _checksum(key, dtype, shape, data), data


@functools.lru_cache(maxsize=256)
def _layout(dtype: str, shape: str) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, dims, byte size) of a row's ``dtype`` and ``shape`` texts, or None when they cannot
    describe a stored array. Rows of one cache share a few layouts, so this is parsed once each."""
    try:
        dt = np.dtype(dtype)
        if dt.kind not in _ALLOWED_KINDS or dt.byteorder == ">" or dt.hasobject:
            return None
        dims = json.loads(shape)
        if not isinstance(dims, list) or not all(type(d) is int and d >= 0 for d in dims):
            return None
        return dt, tuple(dims), math.prod(dims) * dt.itemsize
    except Exception:  # whatever the damage (bad JSON, absurd nesting, odd dtype strings): not usable
        return None


def _decode(
    key: Any, dtype: Any, shape: Any, checksum: Any, data: Any, storage: np.dtype
) -> tuple[np.ndarray | None, str]:
    """(array, "ok") for a sound row; (None, "damaged") for a row that cannot be decoded for any
    reason (a column of the wrong type, a bad dtype or shape, a size or checksum mismatch); (None,
    "coarse") for a float16 row read by a float32 cache (recomputing it keeps results exact)."""
    if not (isinstance(key, str) and isinstance(dtype, str) and isinstance(shape, str)):
        return None, "damaged"  # e.g. a TEXT column that comes back as a BLOB
    if not (isinstance(checksum, bytes) and isinstance(data, bytes)):
        return None, "damaged"
    layout = _layout(dtype, shape)
    if layout is None or len(data) != layout[2]:
        return None, "damaged"
    dt, dims, _ = layout
    expected = _blake2b_checksum if len(checksum) == 16 else _checksum
    if checksum != expected(key, dtype, shape, data):
        return None, "damaged"
    arr = np.frombuffer(data, dtype=dt).reshape(dims)
    if dt.kind != "f":
        return arr.astype(dt.newbyteorder("="), copy=True), "ok"
    if dt.itemsize < storage.itemsize:
        return None, "coarse"
    if dt != storage:
        arr = arr.astype(storage)
    return arr.astype(np.float32, copy=True), "ok"


# ----------------------------------------------------------------------------------------------
# SQLite plumbing
# ----------------------------------------------------------------------------------------------


def _text(raw: bytes) -> str | bytes:
    """TEXT values as str; one that is not UTF-8 (a flipped byte) stays bytes, so its row reads
    as damaged instead of failing the whole query."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _connect(db_path: Path, readonly: bool = False, immutable: bool = False) -> sqlite3.Connection:
    """Open ``db_path`` (tests replace this to simulate failures). Autocommit mode: transactions
    are begun explicitly with BEGIN IMMEDIATE so a writer takes the lock before it reads."""
    if readonly:
        uri = Path(db_path).absolute().as_uri() + ("?mode=ro&immutable=1" if immutable else "?mode=ro")
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(
            os.fspath(db_path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
    conn.text_factory = _text
    return conn


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection):
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (the write lock is taken first)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def _select(conn: sqlite3.Connection, columns: str, keys: Sequence[str | bytes]) -> Iterable[tuple]:
    """``SELECT columns`` of the rows with these keys, one query per :data:`QUERY_CHUNK` keys."""
    for start in range(0, len(keys), QUERY_CHUNK):
        chunk = keys[start : start + QUERY_CHUNK]
        yield from conn.execute(f"SELECT {columns} FROM embeddings WHERE key IN ({','.join('?' * len(chunk))})", chunk)


def _error_class(exc: BaseException) -> str:
    """'corrupt' | 'unwritable' | 'busy' | 'other' for a sqlite3/OS error."""
    msg = str(exc).lower()
    if isinstance(exc, sqlite3.DatabaseError) and any(
        s in msg for s in ("not a database", "malformed", "encrypted", "not a vlm_tta")
    ):
        return "corrupt"
    if any(s in msg for s in ("locked", "busy")):
        return "busy"
    if any(
        s in msg
        for s in ("full", "readonly", "read-only", "unable to open", "permission", "disk i/o", "no space", "quota")
    ):
        return "unwritable"
    if isinstance(exc, OSError):
        return "unwritable"
    return "other"


class _ForeignDatabase(sqlite3.DatabaseError):
    pass


# Problems already reported, per database file, for the life of the process: one cache, one
# problem, one warning, however many EmbeddingCache objects (one per classify() call) meet it.
# "file": what is in the database is damaged; "storage": the location cannot be written or read;
# "shapes": cached rows do not fit the computed ones. A successful clear() forgets them.
_REPORTED: dict[str, set[str]] = {}
_REPORTED_LOCK = threading.Lock()

# Connections inherited over fork() must not be used nor closed in the child (closing would run
# SQLite's WAL cleanup against the parent's locks); they are parked here for the child's lifetime.
_ABANDONED: list[sqlite3.Connection] = []


def _file_size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


# ----------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------


class EmbeddingCache:
    """Persistent embedding store keyed by :func:`make_key` content addresses.

    Args:
        path: cache *directory* (``embeddings.sqlite3`` lives inside); default
            :func:`default_cache_dir`.
        storage_dtype: ``"float32"`` (exact) or ``"float16"`` (half the disk; values are rounded
            to float16 on write and returned as float32).
        enabled: ``False`` makes every get miss and every put a no-op. ``VLM_TTA_NO_CACHE=1`` in
            the environment does the same whatever ``enabled`` says.
        readonly: read existing entries but never write (no warning for dropped puts).

    Safe to share between threads; after ``fork()`` the child opens its own connection. Nothing
    touches the disk until the first get/put; a get on a cache that does not exist yet creates
    nothing.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        storage_dtype: str = "float32",
        enabled: bool = True,
        readonly: bool = False,
    ) -> None:
        if str(storage_dtype) not in _STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be 'float32' or 'float16', not {storage_dtype!r}")
        self.directory = default_cache_dir(path)
        self.db_path = self.directory / DB_FILENAME
        self.storage_dtype = str(storage_dtype)
        self._storage = _STORAGE_DTYPES[self.storage_dtype]
        self.enabled = bool(enabled) and not cache_disabled_by_env()
        self.readonly = bool(readonly)
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._conn: sqlite3.Connection | None = None
        self._conn_writable = False
        self._can_write = not self.readonly
        self._broken = False  # the database file is unusable: behave as disabled

    # -- state --------------------------------------------------------------------------------

    def __repr__(self) -> str:
        state = "disabled" if not self.enabled else ("read-only" if not self._can_write else "read-write")
        return f"EmbeddingCache({str(self.directory)!r}, storage_dtype={self.storage_dtype!r}, {state})"

    @property
    def writable(self) -> bool:
        """Whether puts are currently stored (False when disabled, read-only, or after a write failure)."""
        return self.enabled and self._can_write and not self._broken

    def __enter__(self) -> "EmbeddingCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close this process's connection (the cache reopens on next use)."""
        self._check_fork()
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error:  # pragma: no cover
                    pass

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if self._conn is not None:
                if self._pid == os.getpid():
                    self._conn.close()
                else:  # inherited over fork(): keep it away from the garbage collector
                    _ABANDONED.append(self._conn)
        except Exception:
            pass

    def __getstate__(self) -> dict[str, Any]:
        # Picklable (spawned workers, benchmark shards): the copy opens its own connection.
        state = self.__dict__.copy()
        state.update(_lock=None, _conn=None, _conn_writable=False, _pid=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._pid = os.getpid()

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            # Inherited lock and connection belong to the parent; start afresh in this process.
            self._lock = threading.RLock()
            if self._conn is not None:
                _ABANDONED.append(self._conn)
            self._conn = None
            self._pid = os.getpid()

    def _warn(self, problem: str, message: str) -> None:
        """Warn once per process and database file for each ``problem`` (see ``_REPORTED``)."""
        with _REPORTED_LOCK:
            reported = _REPORTED.setdefault(str(self.db_path), set())
            if problem in reported:
                return
            reported.add(problem)
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _clear_hint(self) -> str:
        return f"`vlm-tta cache clear --yes --cache-dir {self.directory}` starts a new cache"

    def _fix_hint(self) -> str:
        return (
            f"Point the cache at a writable directory with {CACHE_DIR_ENV}=/path (or cache_dir=... / "
            f"EmbeddingCache(path)), free disk space, or set {NO_CACHE_ENV}=1 to turn the cache off."
        )

    def _on_error(self, exc: BaseException, during: str) -> None:
        """Degrade after a failure: corrupt -> disabled, unwritable -> read-only, else drop one op."""
        cls = _error_class(exc)
        if cls == "corrupt":
            self._broken = True
            self.close()
            if isinstance(exc, _ForeignDatabase):  # someone else's file: clear() leaves it alone too
                fix = f"Move that file away, or point the cache elsewhere with {CACHE_DIR_ENV}=/path."
            else:
                fix = f"{self._clear_hint()}."
            self._warn(
                "file",
                f"vlm_tta embedding cache: {self.db_path} is not a usable cache database ({exc}); the "
                f"cache is off for this process and embeddings are computed without it. {fix}",
            )
        elif during == "write" and cls == "unwritable":
            self._can_write = False
            self._warn(
                "storage",
                f"vlm_tta embedding cache at {self.directory} cannot be written ({exc}); new embeddings "
                f"are computed but not cached for the rest of this process (existing entries are still "
                f"read). {self._fix_hint()}",
            )
        elif during == "write":
            self._warn(
                "storage",
                f"vlm_tta embedding cache at {self.directory}: a write failed ({exc}); those embeddings "
                f"were not cached. {self._fix_hint()}",
            )
        else:
            self._warn(
                "file",
                f"vlm_tta embedding cache at {self.directory}: a read failed ({exc}); the embeddings "
                f"are computed instead. If this keeps happening, {self._clear_hint()}.",
            )

    # -- connection ---------------------------------------------------------------------------

    def _open(self, for_write: bool) -> sqlite3.Connection | None:
        """This process's connection, opened on demand; None when there is nothing to read from
        (for reads) or the cache cannot be used. Call with the lock held."""
        self._check_fork()
        if not self.enabled or self._broken:
            return None
        if for_write and not self._can_write:
            return None
        if self._conn is not None and (self._conn_writable or not for_write):
            return self._conn
        if self._conn is not None:  # read-only connection but now we want to write
            return None
        exists = self.db_path.exists()
        if not exists and not for_write:
            return None
        if self._can_write:
            conn = self._open_writable()
            if conn is not None:
                self._conn, self._conn_writable = conn, True
                return conn
            if self._broken:
                return None
            exists = self.db_path.exists()
        if for_write or not exists:
            return None
        conn = self._open_readonly()
        if conn is not None:
            self._conn, self._conn_writable = conn, False
        return None if for_write else conn

    def _open_writable(self) -> sqlite3.Connection | None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._on_error(OSError(f"cannot create directory {self.directory}: {exc}"), "write")
            self._can_write = False
            return None
        conn = None
        try:
            conn = _connect(self.db_path)
            conn.execute("PRAGMA busy_timeout = %d" % int(BUSY_TIMEOUT_S * 1000))
            # Only takes effect when the file is new. Rows of 1-4 KiB (512-1024-d embeddings)
            # waste up to half of a 4 KiB page each; 32 KiB pages keep the file within ~1.1-1.3x
            # of the payload (measured), and rows are read whole anyway.
            conn.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
            # Where WAL is impossible (no shared memory, e.g. some network filesystems) SQLite keeps
            # its rollback journal: slower with many writers, equally safe.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint = %d" % ((8 << 20) // _PAGE_SIZE))  # ~8 MiB of WAL
            conn.execute("PRAGMA journal_size_limit = %d" % (32 << 20))
            self._init_schema(conn)
            return conn
        except sqlite3.Error as exc:
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error:  # pragma: no cover
                    pass
            self._can_write = False
            self._on_error(exc, "write")
            return None

    def _open_readonly(self) -> sqlite3.Connection | None:
        last: BaseException | None = None
        # A WAL database needs its -shm file; when the directory is read-only and the file is not
        # there (the last writer closed cleanly, so the WAL is empty) read it as immutable.
        attempts = [False] + ([True] if not Path(str(self.db_path) + "-wal").exists() else [])
        for immutable in attempts:
            conn = None
            try:
                conn = _connect(self.db_path, readonly=True, immutable=immutable)
                if self._check_schema(conn):
                    return conn
                conn.close()  # a new file whose creator has not made the table (yet): nothing to read
                return None
            except sqlite3.Error as exc:
                last = exc
                if conn is not None:
                    try:
                        conn.close()
                    except sqlite3.Error:  # pragma: no cover
                        pass
                if _error_class(exc) == "corrupt":
                    break
        if last is not None:
            if _error_class(last) == "corrupt":
                self._on_error(last, "read")
            else:
                self._broken = True  # neither writable nor readable: behave as disabled
                self._warn(
                    "storage",
                    f"vlm_tta embedding cache: cannot read {self.db_path} ({last}); embeddings are "
                    f"computed without the cache. {self._fix_hint()}",
                )
        return None

    @staticmethod
    def _check_schema(conn: sqlite3.Connection) -> bool:
        """True if the database is ours (or empty); raises _ForeignDatabase otherwise."""
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if app_id == _APPLICATION_ID:
            if version > _SCHEMA_VERSION:
                raise _ForeignDatabase(
                    f"not a vlm_tta cache of a version this code can read (schema {version} > {_SCHEMA_VERSION}); "
                    "upgrade vlm_tta or use another cache directory"
                )
            return True
        if app_id == 0 and not tables:
            return False  # empty file: ours to initialise
        raise _ForeignDatabase("not a vlm_tta cache database (another application's SQLite file)")

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        if self._check_schema(conn):
            return
        with _transaction(conn):  # serialise first-time creation between processes
            if not self._check_schema(conn):
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    # -- reads --------------------------------------------------------------------------------

    def get(self, key: str) -> np.ndarray | None:
        """The stored array for ``key`` (float arrays as float32 copies), or None on a miss."""
        return self.get_many([key]).get(key)

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """``{key: array}`` for the keys that are stored (misses are absent). One query per
        :data:`QUERY_CHUNK` keys."""
        wanted = list(dict.fromkeys(keys))
        out: dict[str, np.ndarray] = {}
        if not wanted or not self.enabled:
            return out
        self._check_fork()
        damaged: list[tuple[Any, Any]] = []  # (key, checksum) as read, to delete exactly those rows
        with self._lock:
            conn = self._open(for_write=False)
            if conn is None:
                return out
            try:
                for key, dtype, shape, checksum, data in _select(conn, "key, dtype, shape, checksum, data", wanted):
                    arr, status = _decode(key, dtype, shape, checksum, data, self._storage)
                    if arr is not None:
                        out[key] = arr
                    elif status == "damaged":
                        damaged.append((key, checksum))
                # A key whose column turned into a BLOB never matches the text keys above: look for
                # such rows among the misses (they are about to be computed anyway).
                damaged += _select(conn, "key, checksum", [k.encode("utf-8") for k in wanted if k not in out])
            except sqlite3.Error as exc:
                self._on_error(exc, "read")
                return out
            if damaged:
                self._drop_damaged(conn, damaged)
        return out

    def present(self, keys: Sequence[str]) -> set[str]:
        """The subset of ``keys`` that has a stored row, without reading the rows (one query per
        :data:`QUERY_CHUNK` keys): what a resumable job asks before it computes the rest. A row
        found here can still fail its checksum when it is read (it then reads as a miss)."""
        wanted = list(dict.fromkeys(keys))
        found: set[str] = set()
        if not wanted or not self.enabled:
            return found
        self._check_fork()
        with self._lock:
            conn = self._open(for_write=False)
            if conn is None:
                return found
            try:
                found.update(row[0] for row in _select(conn, "key", wanted))
            except sqlite3.Error as exc:
                self._on_error(exc, "read")
        return found

    def _drop_damaged(self, conn: sqlite3.Connection, damaged: list[tuple[Any, Any]]) -> None:
        removed = self._conn_writable and self._can_write
        self._warn(
            "file",
            f"vlm_tta embedding cache at {self.directory}: {len(damaged)} damaged entr"
            f"{'y' if len(damaged) == 1 else 'ies'} ignored (they could not be decoded, or failed their "
            f"size or checksum check); they are recomputed{' and the damaged rows removed' if removed else ''}. "
            f"Damage means the file was changed behind SQLite's back (a disk or copy error); if it "
            f"keeps happening, {self._clear_hint()}.",
        )
        if not removed:
            return
        try:
            with _transaction(conn):
                # Match the key and checksum as read, so a sound value another process just wrote survives.
                conn.executemany("DELETE FROM embeddings WHERE key = ? AND checksum IS ?", damaged)
        except sqlite3.Error as exc:
            self._on_error(exc, "write")

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __len__(self) -> int:
        if not self.enabled:
            return 0
        self._check_fork()
        with self._lock:
            conn = self._open(for_write=False)
            if conn is None:
                return 0
            try:
                return int(conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0])
            except sqlite3.Error as exc:
                self._on_error(exc, "read")
                return 0

    # -- writes -------------------------------------------------------------------------------

    def put(self, key: str, value: Any) -> bool:
        """Store ``value`` (numpy array, array-like or torch tensor) under ``key``; True if stored."""
        return self.put_many([(key, value)]) == 1

    def put_many(self, items: Iterable[tuple[str, Any]]) -> int:
        """Store all ``(key, value)`` pairs in one transaction (all or none of them survive a
        crash); returns how many were stored (0 when the cache is off or the write failed)."""
        if not self.writable:
            return 0
        now = time.time()
        rows = []
        for key, value in items:
            kind, dtype, shape, checksum, data = _encode(key, value, self._storage)
            rows.append((key, kind, dtype, shape, checksum, now, len(data), data))
        if not rows:
            return 0
        self._check_fork()
        with self._lock:
            conn = self._open(for_write=True)
            if conn is None:
                return 0
            try:
                with _transaction(conn):
                    conn.executemany(
                        "INSERT OR REPLACE INTO embeddings "
                        "(key, kind, dtype, shape, checksum, created, nbytes, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        rows,
                    )
            except sqlite3.Error as exc:
                self._on_error(exc, "write")
                return 0
        return len(rows)

    def get_or_compute(self, keys: Sequence[str], compute: Callable[[list[int]], Any]) -> np.ndarray:
        """Rows for ``keys`` stacked in order, running ``compute`` once, for the misses only.

        ``compute(missing)`` gets the indices into ``keys`` of the missing entries (the first
        occurrence of a repeated key) and returns one row per index, as a numpy array or torch
        tensor. Its rows are stored and returned. It is not called when everything is cached.

        Results are exactly the same whether a row was computed now or read back: computed float
        rows are passed through the storage dtype before they are returned, so with
        ``storage_dtype="float16"`` a cold run returns the same float16-rounded values (as
        float32) as a warm one. A float32 cache ignores rows stored as float16 by a float16 cache
        (it recomputes and replaces them), so its results never depend on what another run did.
        With the cache off or unwritable the results are the same again.
        """
        keys = list(keys)
        if not keys:
            return np.zeros((0,), dtype=np.float32)
        found = self.get_many(keys)
        missing: list[int] = []
        seen: set[str] = set()
        for i, key in enumerate(keys):
            if key not in found and key not in seen:
                seen.add(key)
                missing.append(i)
        computed = self._compute_rows(keys, missing, compute) if missing else {}
        rows = [found[k] if k in found else computed[k] for k in keys]
        if len({(r.shape, r.dtype) for r in rows}) > 1:
            # Stored rows disagree with fresh ones (keys reused for different content):
            # recompute everything once and replace the stale entries.
            self._warn(
                "shapes",
                f"vlm_tta embedding cache at {self.directory}: cached rows do not match the computed "
                "ones in shape or dtype; recomputing them (the cache keys should include everything "
                "that changes the output).",
            )
            firsts = list({k: i for i, k in reversed(list(enumerate(keys)))}.values())
            computed = self._compute_rows(keys, sorted(firsts), compute)
            rows = [computed[k] for k in keys]
        return np.stack(rows)

    def _compute_rows(self, keys: list[str], indices: list[int], compute: Callable) -> dict[str, np.ndarray]:
        arr = _to_numpy(compute(list(indices)))
        if arr.ndim == 0 or arr.shape[0] != len(indices):
            raise ValueError(
                f"get_or_compute: compute() must return one row per missing index: asked for "
                f"{len(indices)}, got an array of shape {tuple(arr.shape)}"
            )
        if arr.dtype.kind == "f":
            stored = np.asarray(arr, dtype=self._storage, order="C")
            returned = stored.astype(np.float32)
        else:
            stored = returned = np.array(arr, copy=True)
        self.put_many((keys[i], stored[j]) for j, i in enumerate(indices))
        return {keys[i]: returned[j] for j, i in enumerate(indices)}

    # -- maintenance --------------------------------------------------------------------------

    def _side_files(self) -> list[Path]:
        return [Path(str(self.db_path) + s) for s in _SIDE_SUFFIXES]

    def info(self) -> dict[str, Any]:
        """Location, size on disk (database + WAL + shared memory), entries (total and per
        kind), payload bytes, and state. Works on a disabled cache too; creates nothing."""
        files = [self.db_path] + self._side_files()
        d: dict[str, Any] = {
            "location": str(self.directory),
            "path": str(self.db_path),
            "exists": self.db_path.exists(),
            "bytes": sum(_file_size(p) for p in files),
            "payload_bytes": 0,
            "entries": 0,
            "kinds": {},
            "storage_dtype": self.storage_dtype,
            "enabled": self.enabled,
            "writable": self.writable,
            "error": None,
        }
        if not d["exists"]:
            return d
        self._check_fork()
        with self._lock:
            conn = None
            try:
                try:
                    # A read-write connection when we may: closing it tidies the -wal/-shm files
                    # away (a read-only one leaves them); it writes nothing itself.
                    conn = _connect(self.db_path, readonly=not os.access(self.directory, os.W_OK))
                    conn.execute("PRAGMA busy_timeout = %d" % int(BUSY_TIMEOUT_S * 1000))
                    has_table = self._check_schema(conn)  # False: a new file, its table not made yet
                except sqlite3.Error as exc:
                    if conn is not None:
                        conn.close()
                        conn = None
                    if _error_class(exc) == "corrupt" or Path(str(self.db_path) + "-wal").exists():
                        raise
                    conn = _connect(self.db_path, readonly=True, immutable=True)
                    has_table = self._check_schema(conn)
                # Both from the small (kind, nbytes) index: no need to read the rows themselves.
                sql = "SELECT kind, COUNT(*), SUM(nbytes) FROM embeddings GROUP BY kind ORDER BY kind"
                stats = [(str(k), int(n), int(b or 0)) for k, n, b in conn.execute(sql)] if has_table else []
                d["kinds"] = {k: n for k, n, _ in stats}
                d["entries"] = sum(n for _, n, _ in stats)
                d["payload_bytes"] = sum(b for _, _, b in stats)
            except sqlite3.Error as exc:
                d["error"] = str(exc)
            finally:
                if conn is not None:
                    conn.close()
        d["bytes"] = sum(_file_size(p) for p in files)
        return d

    def clear(self, kind: str | None = None) -> int:
        """Delete every entry (or those of one ``kind``); returns how many were deleted.

        Safe while other processes read and write the cache: the rows are deleted in one write
        transaction, so every write is either before it (deleted) or after it (kept), and every
        open connection goes on using the same, live database file (files are never unlinked
        under them). Then, when everything went, ``VACUUM`` and a WAL checkpoint give the space
        back to the file system (best effort: a checkpoint that would wait for another
        process's long read is left to SQLite's next automatic one). Deleting one ``kind`` keeps
        the file's size; the freed pages are reused by later writes.

        A file that is not an SQLite database at all is deleted (nothing can use it). Raises
        ``OSError`` when the cache cannot be written, or when the file is another application's
        database or a newer vlm_tta's cache (left alone). This is a maintenance call, not part
        of a computation.
        """
        self._check_fork()
        with self._lock:
            self.close()
            n = 0
            if self.db_path.exists():
                n = self._delete_rows(kind)
            self._broken = False
            self._can_write = not self.readonly
            with _REPORTED_LOCK:
                _REPORTED.pop(str(self.db_path), None)  # a new problem deserves a new warning
            return n

    def export(self, path: str | os.PathLike) -> int:
        """Write a consistent copy of the whole cache to the file ``path`` (SQLite's online backup:
        safe while other processes read and write the cache), to seed or merge into the cache of
        another machine (:meth:`merge`). Returns the entries copied. Raises ``OSError``."""
        dest = Path(os.path.expanduser(os.fspath(path)))
        if not self.db_path.exists():
            raise OSError(f"there is no cache database at {self.db_path} to export")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        self._check_fork()
        src = dst = None
        try:
            src = _connect(self.db_path, readonly=not os.access(self.directory, os.W_OK))
            src.execute("PRAGMA busy_timeout = %d" % int(BUSY_TIMEOUT_S * 1000))
            self._check_schema(src)
            dst = sqlite3.connect(os.fspath(tmp), isolation_level=None)
            src.backup(dst)  # in one step: a snapshot of one moment
            dst.execute("PRAGMA journal_mode = DELETE")  # one self-contained file (no -wal beside it)
            n = int(dst.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0])
            dst.close()
            dst = None
            os.replace(tmp, dest)
            return n
        except sqlite3.Error as exc:
            raise OSError(f"cannot export the cache {self.db_path} to {dest}: {exc}") from exc
        finally:
            for conn in (src, dst):
                if conn is not None:
                    conn.close()
            tmp.unlink(missing_ok=True)

    def merge(self, path: str | os.PathLike) -> int:
        """Add the entries of another cache database (a file written by :meth:`export`, or another
        cache's ``embeddings.sqlite3`` that no process is writing) that this cache lacks, in one
        transaction; returns how many were added. Entries keep their checksums, so a damaged one is
        still never returned. Raises ``OSError`` (this is a maintenance call)."""
        src = Path(os.path.expanduser(os.fspath(path)))
        if src.is_dir():
            src = src / DB_FILENAME
        if not src.is_file():
            raise OSError(f"no cache database at {src}")
        self._check_fork()
        with self._lock:
            if self._open(for_write=True) is None:  # creates and initialises this cache if needed
                raise OSError(f"the cache at {self.db_path} cannot be written")
            conn = None
            try:
                conn = _connect(self.db_path)
                conn.execute("PRAGMA busy_timeout = %d" % int(BUSY_TIMEOUT_S * 1000))
                conn.execute("ATTACH DATABASE ? AS src", (os.fspath(src),))
                app_id = conn.execute("PRAGMA src.application_id").fetchone()[0]
                version = conn.execute("PRAGMA src.user_version").fetchone()[0]
                if app_id != _APPLICATION_ID or version > _SCHEMA_VERSION:
                    raise OSError(f"{src} is not a vlm_tta cache database this version can read")
                with _transaction(conn):
                    conn.execute(
                        "INSERT OR IGNORE INTO main.embeddings (key, kind, dtype, shape, checksum, created, nbytes, "
                        "data) SELECT key, kind, dtype, shape, checksum, created, nbytes, data FROM src.embeddings"
                    )
                    return int(conn.execute("SELECT changes()").fetchone()[0])
            except sqlite3.Error as exc:
                raise OSError(f"cannot merge {src} into the cache {self.db_path}: {exc}") from exc
            finally:
                if conn is not None:
                    conn.close()

    def _delete_rows(self, kind: str | None) -> int:
        conn = None
        try:
            conn = _connect(self.db_path)
            conn.execute("PRAGMA busy_timeout = %d" % int(BUSY_TIMEOUT_S * 1000))
            if not self._check_schema(conn):  # a new file whose creator has not made the table yet
                return 0
            with _transaction(conn):
                where, params = ("WHERE kind = ?", (kind,)) if kind is not None else ("", ())
                n = int(conn.execute(f"SELECT COUNT(*) FROM embeddings {where}", params).fetchone()[0])
                conn.execute(f"DELETE FROM embeddings {where}", params)
            # VACUUM rewrites the live rows, cheap when (nearly) none are left; the checkpoint then
            # copies the shrunk database out of the WAL and truncates both files. Both take SQLite's
            # locks: concurrent writers wait for them (a few seconds at most), nothing is lost.
            conn.execute("PRAGMA busy_timeout = %d" % int(_COMPACT_BUSY_TIMEOUT_S * 1000))
            for stmt in (["VACUUM"] if kind is None else []) + ["PRAGMA wal_checkpoint(TRUNCATE)"]:
                try:
                    conn.execute(stmt)
                except sqlite3.Error:
                    pass
            return n
        except sqlite3.Error as exc:
            if conn is not None:
                _rollback(conn)
                conn.close()
                conn = None
            if isinstance(exc, _ForeignDatabase):
                raise OSError(f"not clearing {self.db_path}: {exc}; move it away yourself") from exc
            if _error_class(exc) != "corrupt":
                raise OSError(f"cannot clear the embedding cache {self.db_path}: {exc}") from exc
            self._remove_files()  # not a database (any more): nothing can use it; start afresh
            return 0
        finally:
            if conn is not None:
                conn.close()

    def _remove_files(self) -> None:
        # The companions first: a process starting now finds no stale -wal beside a new database.
        for p in self._side_files() + [self.db_path]:
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise OSError(f"cannot remove {p}: {exc}") from exc


def as_cache(cache: "EmbeddingCache | bool | str | os.PathLike | None" = None, **kwargs: Any) -> EmbeddingCache:
    """An :class:`EmbeddingCache` from what users pass as ``cache=``: an instance (returned as
    is), ``True``/``None`` (the default location), ``False`` (disabled), or a directory."""
    if isinstance(cache, EmbeddingCache):
        return cache
    if cache is None or cache is True:
        return EmbeddingCache(**kwargs)
    if cache is False:
        return EmbeddingCache(enabled=False, **kwargs)
    if isinstance(cache, (str, os.PathLike)):
        return EmbeddingCache(cache, **kwargs)
    raise TypeError(f"cache must be an EmbeddingCache, a bool or a directory, not {type(cache).__name__}")


# ----------------------------------------------------------------------------------------------
# Command line: vlm-tta cache info|clear|export|merge
# ----------------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``cache`` verb (``info``, ``clear``) to an argparse subparsers object."""
    desc = (
        "Inspect or clear the shared embedding cache. Location: --cache-dir, else "
        f"${CACHE_DIR_ENV}, else $XDG_CACHE_HOME/vlm_tta, else ~/.cache/vlm_tta."
    )
    p = subparsers.add_parser("cache", help="inspect, clear, export or merge the embedding cache", description=desc)
    # SUPPRESS: never overwrite a --cache-dir given at another level of the command line.
    p.add_argument("--cache-dir", default=argparse.SUPPRESS, help="cache directory")
    sub = p.add_subparsers(dest="cache_command", metavar="{info,clear,export,merge}")
    pi = sub.add_parser("info", help="location, size and entries of the cache", description=desc)
    pi.add_argument("--cache-dir", default=argparse.SUPPRESS, help="cache directory")
    pi.add_argument("--json", action="store_true", help="print JSON")
    pc = sub.add_parser("clear", help="delete the cached embeddings", description=desc)
    pc.add_argument("--cache-dir", default=argparse.SUPPRESS, help="cache directory")
    pc.add_argument("--yes", "-y", action="store_true", help="delete without asking")
    pc.add_argument("--kind", default=None, help="delete only entries of this kind (e.g. view, text)")
    pe = sub.add_parser("export", help="a consistent copy of the cache in one file (to seed another machine)")
    pe.add_argument("file", help="the file to write (e.g. /shared/cache-node0.sqlite3)")
    pe.add_argument("--cache-dir", default=argparse.SUPPRESS, help="cache directory")
    pm = sub.add_parser("merge", help="add the entries of exported caches that this cache lacks")
    pm.add_argument("files", nargs="+", help="files written by `vlm-tta cache export` (or cache directories)")
    pm.add_argument("--cache-dir", default=argparse.SUPPRESS, help="cache directory")
    p.set_defaults(func=run)
    return p


def _format_info(d: Mapping[str, Any]) -> str:
    lines = [f"location:  {d['location']}", f"database:  {d['path']}"]
    if not d["exists"]:
        lines.append("size:      0 B (no cache database yet)")
    else:
        lines.append(f"size:      {_human_bytes(d['bytes'])} on disk, {_human_bytes(d['payload_bytes'])} of embeddings")
        lines.append(f"entries:   {d['entries']}")
        for kind, n in d["kinds"].items():
            lines.append(f"  {kind or '(other)'}: {n}")
    if d.get("error"):
        lines.append(f"error:     {d['error']} (`vlm-tta cache clear --yes` starts a new cache)")
    if not d["enabled"]:
        lines.append(f"state:     disabled ({NO_CACHE_ENV} is set)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Carry out ``vlm-tta cache ...``; returns the exit status."""
    cache = EmbeddingCache(getattr(args, "cache_dir", None))
    command = getattr(args, "cache_command", None) or "info"
    if cache.directory.exists() and not cache.directory.is_dir():
        print(
            f"vlm-tta: error: the cache location {cache.directory} is a file, not a directory; pass a directory "
            "with --cache-dir (or set VLM_TTA_CACHE_DIR)",
            file=sys.stderr,
        )
        return 2
    d = cache.info()
    if command == "info":
        print(json.dumps(d, indent=2, sort_keys=True) if getattr(args, "json", False) else _format_info(d))
        return 0
    if command == "clear":
        kind = getattr(args, "kind", None)
        what = (
            f"{d['kinds'].get(kind, 0)} '{kind}' entries"
            if kind is not None
            else f"{d['entries']} entries ({_human_bytes(d['bytes'])})"
        )
        if not d["exists"]:
            print(f"nothing to clear: no cache database at {d['path']}")
            return 0
        if not getattr(args, "yes", False):
            if sys.stdin is not None and sys.stdin.isatty():
                answer = input(f"delete {what} from {d['path']}? [y/N] ").strip().lower()
                if answer not in ("y", "yes"):
                    print("nothing deleted")
                    return 1
            else:
                print(f"would delete {what} from {d['path']}; pass --yes to delete")
                return 1
        try:
            n = cache.clear(kind)
        except OSError as exc:
            print(f"vlm-tta: error: {exc}", file=sys.stderr)
            return 1
        size = cache.info()["bytes"]
        print(f"deleted {n} entries from {d['path']} ({_human_bytes(size)} on disk now)")
        return 0
    if command in ("export", "merge"):
        try:
            if command == "export":
                print(f"exported {cache.export(args.file)} entries from {d['path']} to {args.file}")
            for src in getattr(args, "files", ()):
                print(f"merged {cache.merge(src)} new entries from {src} into {cache.db_path}")
        except OSError as exc:
            print(f"vlm-tta: error: {exc}", file=sys.stderr)
            return 1
        return 0
    print(f"unknown cache command {command!r}; use info, clear, export or merge", file=sys.stderr)  # pragma: no cover
    return 2
