"""Tests of the shared embedding cache (vlm_tta/cache.py): round trips, exact reuse, persistence,
several processes at once, a writer killed mid-write, damaged rows, unwritable or full storage,
environment variables, info/clear and the `vlm-tta cache` verb."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from vlm_tta import cache as cache_mod
from vlm_tta.cache import (
    DB_FILENAME,
    EmbeddingCache,
    add_parser,
    as_cache,
    default_cache_dir,
    make_key,
    make_keys,
    run,
)

WORKER = Path(__file__).with_name("cache_worker.py")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("VLM_TTA_CACHE_DIR", "VLM_TTA_NO_CACHE"):
        monkeypatch.delenv(name, raising=False)


def rows(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


class Counter:
    """A compute() for get_or_compute that records every call and returns row ``values[i]``."""

    def __init__(self, values):
        self.values = values
        self.calls: list[list[int]] = []

    def __call__(self, missing):
        self.calls.append(list(missing))
        return self.values[missing]


# ----------------------------------------------------------------------------------------------
# keys and location
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    name: str
    n_views: int


def test_make_key_is_canonical():
    a = make_key("view", "fp", "img", {"b": 1, "a": [1, 2]}, 3)
    assert a == make_key("view", "fp", "img", {"a": (1, 2), "b": 1}, 3)  # dict order, tuple = list
    assert a == make_key("view", "fp", "img", {"a": [np.int64(1), 2], "b": np.int32(1)}, np.int16(3))
    assert a.startswith("view:") and len(a) == len("view:") + 64
    assert a != make_key("view", "fp", "img", {"b": 1, "a": [1, 2]}, 4)
    assert make_key("x", 1) != make_key("x", 1.0)  # different values, different keys
    assert make_key("x", 0.1) == make_key("x", float("0.1"))
    assert make_key("text", ["a photo of a {}."], ["cat"]) != make_key("text", ["a photo of a {}."], ["cat", "dog"])
    # parts are not concatenated: no ambiguity between ("ab", "c") and ("a", "bc")
    assert make_key("k", "ab", "c") != make_key("k", "a", "bc")
    assert make_key("k", Recipe("augmix", 63)) == make_key("k", Recipe("augmix", 63))
    assert make_key("k", Recipe("augmix", 63)) != make_key("k", Recipe("augmix", 64))
    assert make_key("k", b"\x00\x01") == make_key("k", bytearray(b"\x00\x01"))
    assert make_key("k", np.arange(3)) != make_key("k", np.arange(4))
    assert ":" not in make_key(42, "no kind")  # no short name first: bare digest
    with pytest.raises(TypeError):
        make_key("k", object())
    with pytest.raises(ValueError):
        make_key("k", float("nan"))


def test_default_location(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "vlm_tta"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "vlm_tta"
    monkeypatch.setenv("VLM_TTA_CACHE_DIR", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    assert EmbeddingCache().db_path == tmp_path / "env" / DB_FILENAME
    assert default_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert EmbeddingCache(tmp_path / "arg").directory == tmp_path / "arg"


def test_env_dir_is_used_for_storage(monkeypatch, tmp_path):
    monkeypatch.setenv("VLM_TTA_CACHE_DIR", str(tmp_path / "envcache"))
    with EmbeddingCache() as c:
        assert c.put("k:1", np.ones(3))
    assert (tmp_path / "envcache" / DB_FILENAME).exists()
    assert np.array_equal(EmbeddingCache(tmp_path / "envcache").get("k:1"), np.ones(3, np.float32))


def test_no_cache_env_and_disabled(monkeypatch, tmp_path):
    values = rows(4)
    for make in (
        lambda: EmbeddingCache(tmp_path / "off", enabled=False),
        lambda: (monkeypatch.setenv("VLM_TTA_NO_CACHE", "1"), EmbeddingCache(tmp_path / "off", enabled=True))[1],
    ):
        c = make()
        assert not c.enabled and not c.writable
        assert c.put("k", np.ones(2)) is False and c.get("k") is None and "k" not in c and len(c) == 0
        keys = [f"k:{i}" for i in range(4)]
        compute = Counter(values)
        for _ in range(2):
            assert np.array_equal(c.get_or_compute(keys, compute), values)
        assert compute.calls == [[0, 1, 2, 3], [0, 1, 2, 3]]
        assert not (tmp_path / "off").exists()
    monkeypatch.setenv("VLM_TTA_NO_CACHE", "0")
    assert EmbeddingCache(tmp_path / "on").enabled


def test_as_cache(tmp_path):
    c = EmbeddingCache(tmp_path)
    assert as_cache(c) is c
    assert as_cache(False).enabled is False
    assert as_cache(str(tmp_path / "d")).directory == tmp_path / "d"
    assert as_cache(True).directory == default_cache_dir()


# ----------------------------------------------------------------------------------------------
# round trips and exact reuse
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 5), (2, 3, 4)])
def test_roundtrip_shapes_and_dtypes(tmp_path, shape):
    c = EmbeddingCache(tmp_path)
    rng = np.random.default_rng(1)
    f32 = rng.standard_normal(shape).astype(np.float32)
    f64 = rng.standard_normal(shape)
    f16 = rng.standard_normal(shape).astype(np.float16)
    i64 = rng.integers(-(2**40), 2**40, size=shape)
    u8 = rng.integers(0, 255, size=shape).astype(np.uint8)
    b = rng.integers(0, 2, size=shape).astype(bool)
    big_endian = f32.astype(">f4")
    c.put_many([("f32", f32), ("f64", f64), ("f16", f16), ("i64", i64), ("u8", u8), ("b", b), ("be", big_endian)])
    for key, want in [("f32", f32), ("f64", f64.astype(np.float32)), ("f16", f16.astype(np.float32)), ("be", f32)]:
        got = c.get(key)
        assert got.dtype == np.float32 and got.shape == shape and np.array_equal(got, want), key
    for key, want in [("i64", i64), ("u8", u8), ("b", b)]:
        got = c.get(key)
        assert got.dtype == want.dtype and got.shape == shape and np.array_equal(got, want), key
    got = c.get("f32")
    got[...] = 123  # a writable copy: changing it changes nothing stored
    assert np.array_equal(c.get("f32"), f32)
    with pytest.raises(TypeError):
        c.put("obj", np.array([object()]))
    with pytest.raises(TypeError):
        c.put("", np.ones(2))


def test_float16_storage(tmp_path):
    x = rows(3, 16)
    c16 = EmbeddingCache(tmp_path, storage_dtype="float16")
    c16.put("k", x)
    got = c16.get("k")
    assert got.dtype == np.float32 and np.array_equal(got, x.astype(np.float16).astype(np.float32))
    assert c16.info()["payload_bytes"] == x.size * 2
    # A float32 cache never returns float16-rounded rows: it treats them as misses...
    c32 = EmbeddingCache(tmp_path)
    assert c32.get("k") is None
    compute = Counter(x[None])
    assert np.array_equal(c32.get_or_compute(["k"], compute)[0], x) and compute.calls == [[0]]
    # ...and a float16 cache rounds float32 rows it reads.
    assert np.array_equal(c16.get("k"), x.astype(np.float16).astype(np.float32))
    with pytest.raises(ValueError):
        EmbeddingCache(tmp_path, storage_dtype="bfloat16")


def test_torch_tensor_input(tmp_path):
    torch = pytest.importorskip("torch")
    c = EmbeddingCache(tmp_path)
    t = torch.randn(4, 8, requires_grad=True)
    c.put("t", t * 2)
    assert np.array_equal(c.get("t"), (t * 2).detach().numpy())
    c.put("bf16", t.detach().to(torch.bfloat16))
    assert np.array_equal(c.get("bf16"), t.detach().to(torch.bfloat16).float().numpy())
    out = c.get_or_compute(["a", "b"], lambda missing: torch.ones(len(missing), 3, dtype=torch.float64))
    assert out.dtype == np.float32 and out.shape == (2, 3)


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_get_or_compute_only_misses(tmp_path, storage):
    values = rows(10, 32, seed=3).astype(np.float64) / 3  # float64: must come back float32 either way
    keys = [make_key("view", "fp", "img", "recipe", 0, i) for i in range(10)]
    c = EmbeddingCache(tmp_path, storage_dtype=storage)
    c.put_many((keys[i], values[i]) for i in (1, 4))
    compute = Counter(values)
    cold = c.get_or_compute(keys, compute)
    assert compute.calls == [[0, 2, 3, 5, 6, 7, 8, 9]]
    warm = c.get_or_compute(keys, compute)
    assert len(compute.calls) == 1  # nothing computed the second time
    assert cold.dtype == warm.dtype == np.float32 and cold.shape == (10, 32)
    assert np.array_equal(cold, warm)  # exact: cold and warm runs agree bit for bit
    want = values.astype(np.float16 if storage == "float16" else np.float32).astype(np.float32)
    assert np.array_equal(cold, want)
    # a second instance (another method, another run) reuses all of it
    other = Counter(values)
    assert np.array_equal(EmbeddingCache(tmp_path, storage_dtype=storage).get_or_compute(keys, other), cold)
    assert other.calls == []
    # even when the cache is off, results are the same
    assert np.array_equal(
        EmbeddingCache(tmp_path, storage_dtype=storage, enabled=False).get_or_compute(keys, Counter(values)), cold
    )


def test_get_or_compute_duplicates_and_errors(tmp_path):
    c = EmbeddingCache(tmp_path)
    values = rows(5)
    keys = ["a", "b", "a", "c", "b"]
    compute = Counter(values)
    out = c.get_or_compute(keys, compute)
    assert compute.calls == [[0, 1, 3]]  # first occurrence of each missing key
    assert np.array_equal(out[2], out[0]) and np.array_equal(out[4], out[1])
    assert c.get_or_compute([], compute).shape == (0,)
    with pytest.raises(ValueError, match="one row per missing index"):
        c.get_or_compute(["x", "y"], lambda missing: np.ones((1, 8)))
    assert "x" not in c  # nothing stored from a failed compute
    with pytest.raises(RuntimeError, match="boom"):
        c.get_or_compute(["z"], lambda missing: (_ for _ in ()).throw(RuntimeError("boom")))


def test_get_or_compute_shape_mismatch_recomputes(tmp_path):
    c = EmbeddingCache(tmp_path)
    c.put("a", np.ones(4))  # a stale entry of another shape under a reused key
    compute = Counter(rows(2, 8))
    with pytest.warns(RuntimeWarning, match="do not match"):
        out = c.get_or_compute(["a", "b"], compute)
    assert out.shape == (2, 8) and compute.calls == [[1], [0, 1]]
    assert np.array_equal(c.get("a"), compute.values[0])


def test_text_kind_matrix_row(tmp_path):
    """Class embeddings are one C x D entry; get_or_compute returns 1 x C x D."""
    c = EmbeddingCache(tmp_path)
    emb = rows(5, 16)
    key = make_key("text", "fp", ["a photo of a {}."], ["a", "b", "c", "d", "e"])
    calls = []
    for _ in range(2):
        out = c.get_or_compute([key], lambda missing: (calls.append(missing), emb[None])[1])
        assert out.shape == (1, 5, 16) and np.array_equal(out[0], emb)
    assert calls == [[0]]


def test_get_many_chunks_and_persistence(tmp_path):
    n = 1234  # more than one query chunk
    values = rows(n, 4)
    keys = [make_key("view", "fp", i) for i in range(n)]
    with EmbeddingCache(tmp_path) as c:
        assert c.put_many(zip(keys, values)) == n
        assert len(c) == n
    c2 = EmbeddingCache(tmp_path)
    got = c2.get_many(keys + ["absent"])
    assert len(got) == n and "absent" not in got
    assert all(np.array_equal(got[k], v) for k, v in zip(keys, values))
    assert keys[0] in c2 and "absent" not in c2
    c2.put(keys[0], np.zeros(4))  # replace
    assert np.array_equal(EmbeddingCache(tmp_path).get(keys[0]), np.zeros(4, np.float32))


def test_present_lists_stored_keys_without_reading_rows(tmp_path):
    n = 1234  # more than one query chunk
    keys = [make_key("view", "fp", i) for i in range(n)]
    c = EmbeddingCache(tmp_path)
    assert c.present(keys) == set() and not (tmp_path / "embeddings.sqlite3").exists()
    c.put_many((k, np.full(3, i % 256, np.uint8)) for i, k in enumerate(keys) if i % 3 == 0)
    assert c.present(keys + ["absent", keys[0]]) == {k for i, k in enumerate(keys) if i % 3 == 0}
    assert EmbeddingCache(tmp_path, enabled=False).present(keys) == set()


def test_get_on_missing_cache_creates_nothing(tmp_path):
    c = EmbeddingCache(tmp_path / "new")
    assert c.get("k") is None and len(c) == 0 and c.info()["entries"] == 0
    assert not (tmp_path / "new").exists()


def test_threads_share_one_instance(tmp_path):
    c = EmbeddingCache(tmp_path)
    values = rows(200, 16)
    keys = [f"t:{i}" for i in range(200)]
    errors = []

    def work(offset):
        try:
            for start in range(offset, 200, 20):
                idx = list(range(start, min(start + 30, 200)))
                out = c.get_or_compute([keys[i] for i in idx], lambda m, idx=idx: values[[idx[j] for j in m]])
                assert np.array_equal(out, values[idx])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k * 5,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(c) == 200


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_child_opens_its_own_connection(tmp_path):
    c = EmbeddingCache(tmp_path)
    c.put("parent", np.ones(3))
    pid = os.fork()
    if pid == 0:  # child: use the inherited instance
        code = 1
        try:
            ok = np.array_equal(c.get("parent"), np.ones(3)) and c.put("child", np.full(3, 2.0))
            code = 0 if ok else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert np.array_equal(c.get("child"), np.full(3, 2.0, np.float32))
    c.put("parent2", np.ones(1))  # the parent's connection still works
    assert len(c) == 3


# ----------------------------------------------------------------------------------------------
# several processes; a killed writer
# ----------------------------------------------------------------------------------------------


def _worker(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _expected(i: int, dim: int, fp16: bool = False) -> np.ndarray:
    v = np.random.default_rng(i).standard_normal(dim).astype(np.float32)
    return v.astype(np.float16).astype(np.float32) if fp16 else v


def _worker_key(i: int) -> str:
    return make_key("test", "worker-fingerprint", i)


def test_concurrent_writer_processes(tmp_path):
    n_workers, count, stride, dim = 4, 300, 150, 64  # worker w writes keys [150w, 150w + 300)
    hi = stride * (n_workers - 1) + count
    procs = [
        _worker(
            "write",
            str(tmp_path),
            "--worker",
            str(w),
            "--start",
            str(w * stride),
            "--count",
            str(count),
            "--lo",
            "0",
            "--hi",
            str(hi),
            "--dim",
            str(dim),
        )
        for w in range(n_workers)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["written"] == count
    c = EmbeddingCache(tmp_path)
    keys = [_worker_key(i) for i in range(hi)]
    got = c.get_many(keys)
    assert len(got) == hi == len(c)
    for i, k in enumerate(keys):
        assert np.array_equal(got[k], _expected(i, dim)), i
    with sqlite3.connect(tmp_path / DB_FILENAME) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("fp16", [False, True])
def test_writer_killed_mid_write(tmp_path, fp16):
    batch, dim = 40, 256
    rng = np.random.default_rng(7)
    for round_ in range(3):
        args = ["loop", str(tmp_path), "--batch", str(batch), "--dim", str(dim)] + (["--fp16"] if fp16 else [])
        p = _worker(*args)
        first = p.stdout.readline()  # one transaction committed: the loop is running
        assert first.startswith("committed"), p.stderr.read()
        time.sleep(float(rng.uniform(0.02, 0.25)))
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        p.stdout.close()
        p.stderr.close()
        assert p.returncode == -signal.SIGKILL
        c = EmbeddingCache(tmp_path, storage_dtype="float16" if fp16 else "float32")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            n = c.info()["kinds"]["test"]
            assert n > 0 and n % batch == 0  # whole transactions only
            got = c.get_many([_worker_key(i) for i in range(n + batch)])
        assert len(got) == n
        for i in range(n):
            assert np.array_equal(got[_worker_key(i)], _expected(i, dim, fp16)), (round_, i)
        assert c.put("after-kill", np.ones(2))  # no stale lock left behind
        c.close()
    with sqlite3.connect(tmp_path / DB_FILENAME) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_clear_never_loses_a_concurrent_write(tmp_path):
    """`vlm-tta cache clear --yes` in a loop while another process writes through fresh and
    long-lived cache objects. Every batch whose put_many started after a clear returned must be
    readable by a new connection until the next clear (the clearing process checks this before
    each clear), and after the last clear it must be there for a process that opens the cache.
    (A race: before the fix this failed in about two runs out of three;
    test_clear_while_a_writer_is_opening_the_file is the deterministic version.)"""
    d, stop, log, dim = tmp_path / "cache", tmp_path / "stop", tmp_path / "writer.log", 16
    writer = _worker("churn", str(d), "--batch", "5", "--dim", str(dim), "--stop", str(stop), "--log", str(log))
    clearer = _worker("clear", str(d), "--seconds", "2.5", "--dim", str(dim), "--log", str(log))
    c_out, c_err = clearer.communicate(timeout=120)
    time.sleep(0.3)  # the writer carries on after the last clear
    stop.touch()
    w_out, w_err = writer.communicate(timeout=120)
    assert clearer.returncode == 0, c_err
    assert writer.returncode == 0, w_err
    cleared = json.loads(c_out.strip().splitlines()[-1])
    assert cleared["clears"] >= 5 and cleared["checked"] > 0
    assert not cleared["lost"], f"{len(cleared['lost'])} of {cleared['checked']} rows written between clears vanished"
    batches = [json.loads(line) for line in log.read_text().splitlines()]
    ids = [i for b in batches if b["start"] > cleared["last_end"] for i in range(*b["ids"])]
    assert len(ids) >= 3 * 5  # at least the last batch of each kind of cache object
    got = EmbeddingCache(d).get_many([_worker_key(i) for i in ids])
    lost = [i for i in ids if _worker_key(i) not in got]
    assert not lost, f"{len(lost)} of {len(ids)} rows written after the last clear are gone"
    for i in ids:
        assert np.array_equal(got[_worker_key(i)], _expected(i, dim)), i
    with sqlite3.connect(d / DB_FILENAME) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.parametrize("empty_file", [False, True])
def test_clear_while_a_writer_is_opening_the_file(tmp_path, monkeypatch, capsys, empty_file):
    """A writer has opened the database file but not yet used it when `vlm-tta cache clear --yes`
    runs (the moment a race hits). Its writes must land in the database everyone else reads, for
    this and every later put of that (long-lived) cache object. ``empty_file``: the writer is the
    one creating the database (a new, still empty file)."""
    if empty_file:
        (tmp_path / DB_FILENAME).touch()
    else:
        _fill(tmp_path)
    real = cache_mod._connect
    opened, cleared = threading.Event(), threading.Event()

    def connect(*args, **kwargs):
        conn = real(*args, **kwargs)
        if threading.current_thread().name == "writer":
            opened.set()
            assert cleared.wait(30)
        return conn

    monkeypatch.setattr(cache_mod, "_connect", connect)
    writer = EmbeddingCache(tmp_path)
    results = []
    thread = threading.Thread(
        target=lambda: results.append(writer.put_many([("w:1", np.ones(4)), ("w:2", np.ones(4))])), name="writer"
    )
    thread.start()
    assert opened.wait(30)
    try:
        assert run(_parse("cache", "clear", "--yes", "--cache-dir", str(tmp_path))) == 0
    finally:
        cleared.set()
        thread.join(30)
    capsys.readouterr()
    assert results == [2]
    assert writer.put("w:3", np.ones(4))  # the same connection, later
    monkeypatch.setattr(cache_mod, "_connect", real)
    fresh = EmbeddingCache(tmp_path)
    assert sorted(fresh.get_many(["w:1", "w:2", "w:3"])) == ["w:1", "w:2", "w:3"]
    assert len(fresh) == 3


# ----------------------------------------------------------------------------------------------
# damaged data, unusable locations, full disk
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tamper",
    [
        "UPDATE embeddings SET data = ? WHERE key = 'k'",  # flipped byte, same length
        "UPDATE embeddings SET data = substr(data, 1, 10) WHERE key = 'k' AND ? IS NOT NULL",  # truncated
        "UPDATE embeddings SET shape = '[4, 2]' WHERE key = 'k' AND ? IS NOT NULL",  # same size, other shape
        "UPDATE embeddings SET dtype = '<i4' WHERE key = 'k' AND ? IS NOT NULL",  # same size, other dtype
        "UPDATE embeddings SET dtype = '|O' WHERE key = 'k' AND ? IS NOT NULL",  # never unpickle anything
        "UPDATE embeddings SET shape = 'garbage' WHERE key = 'k' AND ? IS NOT NULL",
        "UPDATE embeddings SET checksum = x'00' WHERE key = 'k' AND ? IS NOT NULL",
        # columns of the wrong type, or text that is not UTF-8: undecodable, so damaged too
        "UPDATE embeddings SET dtype = CAST(dtype AS BLOB) WHERE key = 'k' AND ? IS NOT NULL",
        "UPDATE embeddings SET shape = CAST(shape AS BLOB) WHERE key = 'k' AND ? IS NOT NULL",
        "UPDATE embeddings SET key = CAST(key AS BLOB) WHERE key = 'k' AND ? IS NOT NULL",
        "UPDATE embeddings SET dtype = CAST(x'3cff34' AS TEXT) WHERE key = 'k' AND ? IS NOT NULL",
        "UPDATE embeddings SET shape = 7 WHERE key = 'k' AND ? IS NOT NULL",
        "UPDATE embeddings SET data = 'text' WHERE key = 'k' AND ? IS NOT NULL",
        "UPDATE embeddings SET shape = replace(hex(zeroblob(50000)), '00', '[') WHERE key = 'k' AND ? IS NOT NULL",
    ],
)
def test_damaged_row_reads_as_miss(tmp_path, tamper):
    """A damaged row is never returned, is dropped and recomputed, with one warning."""
    x = rows(2, 4)
    c = EmbeddingCache(tmp_path)
    c.put_many([("k", x), ("other", x)])
    data = bytearray(x.tobytes())
    data[5] ^= 0x40
    with sqlite3.connect(tmp_path / DB_FILENAME) as db:
        db.execute(tamper, (bytes(data),))
    with pytest.warns(RuntimeWarning, match="damaged") as rec:
        assert c.get("k") is None
        assert np.array_equal(c.get("other"), x)  # the rest is fine
        assert len(c) == 1  # the damaged row was removed
        compute = Counter(x[None])
        assert np.array_equal(c.get_or_compute(["k", "other"], compute)[0], x) and compute.calls == [[0]]
        assert np.array_equal(EmbeddingCache(tmp_path).get_many(["k", "other"])["k"], x)  # another process
    assert len(rec) == 1 and "cache clear" in str(rec[0].message)


def test_flipped_bytes_in_the_file_warn_once(tmp_path):
    """Bytes flipped on disk in one row's data (a checksum mismatch) and in the page header of
    another row's page (SQLite: "database disk image is malformed"): one cache, one problem, one
    warning, whatever each read runs into, and the right values all the same."""
    keys = [make_key("view", i) for i in range(300)]
    values = rows(300, 512)  # 2 KiB rows: about 15 per 32 KiB page
    with EmbeddingCache(tmp_path) as c:
        c.put_many(zip(keys, values))
    path = tmp_path / DB_FILENAME
    raw = bytearray(path.read_bytes())
    page = 32768
    flipped = raw.find(values[10].tobytes())
    raw[flipped + 100] ^= 0x08  # row 10's data
    header = raw.find(values[200].tobytes()) // page * page
    assert header // page != flipped // page
    raw[header] = 0x55  # not a b-tree page type any more
    path.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning) as rec:
        for _ in range(2):
            c = EmbeddingCache(tmp_path)
            assert c.get(keys[10]) is None  # the damaged row first, then the damaged page
            assert np.array_equal(c.get_or_compute(keys, Counter(values)), values)
            c.put("new", np.ones(3))
            c.info()
    assert len(rec) == 1, [str(w.message) for w in rec]
    assert "cache clear --yes" in str(rec[0].message)


def test_fresh_cache_on_a_full_disk_warns_once(tmp_path, monkeypatch):
    """The disk fills up while a new cache creates its table: one warning ('database or disk is
    full', and what to do), not a second one about the missing table when reading next."""
    real = cache_mod._connect

    def connect(path, readonly=False, immutable=False):
        conn = real(path, readonly, immutable)
        if not readonly:
            conn.execute("PRAGMA max_page_count = 1")  # a real SQLITE_FULL after the first page
        return conn

    monkeypatch.setattr(cache_mod, "_connect", connect)
    values = rows(3)
    with pytest.warns(RuntimeWarning) as rec:
        for _ in range(2):  # two classify() calls make two cache objects on the same location
            c = EmbeddingCache(tmp_path)
            for _ in range(2):
                compute = Counter(values)
                assert np.array_equal(c.get_or_compute(["a", "b", "c"], compute), values)
                assert compute.calls == [[0, 1, 2]]
            assert len(c) == 0 and c.info()["error"] is None
    assert len(rec) == 1, [str(w.message) for w in rec]
    assert "database or disk is full" in str(rec[0].message) and "free disk space" in str(rec[0].message)


def test_not_a_database_file(tmp_path):
    db = tmp_path / DB_FILENAME
    junk = b"this is not an sqlite database" * 100
    db.write_bytes(junk)
    c = EmbeddingCache(tmp_path)
    values = rows(3)
    compute = Counter(values)
    with pytest.warns(RuntimeWarning, match="not a usable cache database") as rec:
        out = c.get_or_compute(["a", "b", "c"], compute)
        out2 = c.get_or_compute(["a", "b", "c"], compute)
    assert len(rec) == 1 and str(db) in str(rec[0].message)
    assert np.array_equal(out, values) and np.array_equal(out2, values) and len(compute.calls) == 2
    assert db.read_bytes() == junk  # the user's file is left alone
    assert c.info()["error"]
    assert c.clear() == 0 and not db.exists()  # an explicit clear starts afresh
    assert c.put("a", values[0]) and np.array_equal(c.get("a"), values[0])


def test_foreign_sqlite_database_is_left_alone(tmp_path):
    with sqlite3.connect(tmp_path / DB_FILENAME) as db:
        db.execute("CREATE TABLE notes (x TEXT)")
    c = EmbeddingCache(tmp_path)
    with pytest.warns(RuntimeWarning, match="not a vlm_tta cache"):
        assert c.put("a", np.ones(2)) is False
    with sqlite3.connect(tmp_path / DB_FILENAME) as db:
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["notes"]


def test_unwritable_location_falls_back_to_computing(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for location in (blocker / "cache", Path("/proc/vlm_tta_cache_test")):
        c = EmbeddingCache(location)
        values = rows(3)
        compute = Counter(values)
        with pytest.warns(RuntimeWarning, match="VLM_TTA_CACHE_DIR") as rec:
            a = c.get_or_compute(["a", "b", "c"], compute)
            b = c.get_or_compute(["a", "b", "c"], compute)
            assert c.put("d", np.ones(1)) is False
        assert len(rec) == 1
        assert np.array_equal(a, values) and np.array_equal(b, values) and len(compute.calls) == 2
        assert not c.writable


def _permissions_enforced(tmp_path) -> bool:
    """False for root with CAP_DAC_OVERRIDE (the usual container), where chmod stops nothing."""
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "x").write_text("x")
        return False
    except OSError:
        return True
    finally:
        probe.chmod(0o755)


def test_read_only_directory_still_serves_reads(tmp_path):
    """A real read-only directory (run as root without CAP_DAC_OVERRIDE, or as a user, to see it:
    `setpriv --bounding-set=-dac_override,-dac_read_search --inh-caps=-dac_override,-dac_read_search`)."""
    if not _permissions_enforced(tmp_path):
        pytest.skip("directory permissions are not enforced for this user (root)")
    d = tmp_path / "ro"
    with EmbeddingCache(d) as c:
        c.put("a", np.ones(3))
    assert not (d / (DB_FILENAME + "-shm")).exists()
    d.chmod(0o555)
    try:
        c = EmbeddingCache(d)
        with pytest.warns(RuntimeWarning) as rec:
            assert np.array_equal(c.get("a"), np.ones(3))
            assert c.put("b", np.ones(3)) is False
            assert c.get("b") is None
        assert len(rec) == 1
    finally:
        d.chmod(0o755)


def test_read_only_database_still_serves_reads(tmp_path, monkeypatch):
    """The database opens but every write is refused ('attempt to write a readonly database')."""
    with EmbeddingCache(tmp_path) as c:
        c.put("a", np.ones(3))
    real = cache_mod._connect
    monkeypatch.setattr(
        cache_mod, "_connect", lambda path, readonly=False, immutable=False: real(path, True, immutable)
    )
    c = EmbeddingCache(tmp_path)
    values = rows(3, 3)
    compute = Counter(values)
    with pytest.warns(RuntimeWarning, match="cannot be written") as rec:
        assert np.array_equal(c.get("a"), np.ones(3))
        out = c.get_or_compute(["a", "b"], compute)
        out = c.get_or_compute(["a", "b", "c"], compute)
    assert len(rec) == 1
    assert np.array_equal(out[0], np.ones(3)) and np.array_equal(out[1:], values[1:])
    assert compute.calls == [[1], [1, 2]]


def test_readonly_flag(tmp_path):
    with EmbeddingCache(tmp_path) as c:
        c.put("a", np.ones(3))
    ro = EmbeddingCache(tmp_path, readonly=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(ro.get("a"), np.ones(3))
        assert ro.put("b", np.ones(3)) is False  # dropped quietly: that is what readonly means
    assert "b" not in EmbeddingCache(tmp_path)
    assert EmbeddingCache(tmp_path / "none", readonly=True).get("a") is None


def test_disk_full_warns_once_and_computation_continues(tmp_path):
    c = EmbeddingCache(tmp_path)
    c.put("seed", np.ones(4))
    pages = c._conn.execute("PRAGMA page_count").fetchone()[0]
    c._conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # a real SQLITE_FULL on the next writes
    values = rows(50, 2048)
    keys = [f"full:{i}" for i in range(50)]
    compute = Counter(values)
    with pytest.warns(RuntimeWarning, match="full") as rec:
        first = c.get_or_compute(keys, compute)
        second = c.get_or_compute(keys, compute)
        c.put("more", np.ones(4))
    assert len(rec) == 1 and "VLM_TTA_CACHE_DIR" in str(rec[0].message)
    assert np.array_equal(first, values) and np.array_equal(second, values) and len(compute.calls) == 2
    assert np.array_equal(c.get("seed"), np.ones(4))  # reads still work
    c.close()
    fresh = EmbeddingCache(tmp_path)
    assert len(fresh) == 1 and fresh.get(keys[0]) is None  # the failed transaction left nothing


def test_disk_full_from_sqlite_error_message(tmp_path, monkeypatch):
    """Same through a connection whose writes raise the exact error SQLite gives."""

    class FullConnection:
        def __init__(self, conn):
            self._conn = conn

        def __getattr__(self, name):
            return getattr(self._conn, name)

        def executemany(self, sql, params):
            raise sqlite3.OperationalError("database or disk is full")

    real = cache_mod._connect
    monkeypatch.setattr(cache_mod, "_connect", lambda *a, **k: FullConnection(real(*a, **k)))
    c = EmbeddingCache(tmp_path)
    values = rows(3)
    with pytest.warns(RuntimeWarning, match="database or disk is full") as rec:
        for _ in range(3):
            assert np.array_equal(c.get_or_compute(["a", "b", "c"], Counter(values)), values)
    assert len(rec) == 1


# ----------------------------------------------------------------------------------------------
# info, clear, command line
# ----------------------------------------------------------------------------------------------


def _fill(path, n_view=5, n_text=2):
    with EmbeddingCache(path) as c:
        c.put_many((make_key("view", "fp", i), np.ones(8)) for i in range(n_view))
        c.put_many((make_key("text", "fp", i), np.ones((3, 8))) for i in range(n_text))


def test_info_and_clear(tmp_path):
    _fill(tmp_path)
    c = EmbeddingCache(tmp_path)
    d = c.info()
    assert d["location"] == str(tmp_path) and d["exists"]
    assert d["entries"] == 7 and d["kinds"] == {"text": 2, "view": 5}
    assert d["payload_bytes"] == 5 * 8 * 4 + 2 * 24 * 4
    assert d["bytes"] >= (tmp_path / DB_FILENAME).stat().st_size > 0
    assert c.clear(kind="text") == 2 and c.info()["kinds"] == {"view": 5}
    assert c.clear() == 5 and len(c) == 0 and (tmp_path / DB_FILENAME).exists()
    assert c.put("a:2", np.ones(2)) and len(c) == 1  # usable again
    assert EmbeddingCache(tmp_path / "none").clear() == 0 and not (tmp_path / "none").exists()


def test_clear_gives_the_space_back(tmp_path):
    with EmbeddingCache(tmp_path) as c:
        c.put_many((make_key("view", i), np.ones(1024)) for i in range(400))  # 1.6 MB of rows
    full = c.info()["bytes"]
    assert full > 1_600_000
    other = EmbeddingCache(tmp_path)
    assert other.get(make_key("view", 0)) is not None  # another connection is open meanwhile
    assert c.clear() == 400
    assert c.info()["bytes"] < 200_000  # the database file shrank, its WAL was truncated
    assert other.put("after", np.ones(2)) and len(EmbeddingCache(tmp_path)) == 1
    with sqlite3.connect(tmp_path / DB_FILENAME) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA application_id").fetchone()[0] == cache_mod._APPLICATION_ID


def test_clear_keeps_file_open_elsewhere(tmp_path):
    _fill(tmp_path)
    other = EmbeddingCache(tmp_path)
    assert other.get(make_key("view", "fp", 0)) is not None  # holds the database open
    assert EmbeddingCache(tmp_path).clear() == 7
    assert len(other) == 0
    assert other.put("v:1", np.ones(2)) and len(EmbeddingCache(tmp_path)) == 1  # nothing lost after


def test_clear_leaves_foreign_databases_alone(tmp_path):
    with sqlite3.connect(tmp_path / DB_FILENAME) as db:
        db.execute("CREATE TABLE notes (x TEXT)")
    with pytest.raises(OSError, match="not a vlm_tta cache"):
        EmbeddingCache(tmp_path).clear()
    assert (tmp_path / DB_FILENAME).exists()


def _parse(*argv):
    parser = argparse.ArgumentParser(prog="vlm-tta")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    return parser.parse_args(list(argv))


def test_cli_info_json_and_text(tmp_path, capsys):
    _fill(tmp_path)
    args = _parse("cache", "info", "--json", "--cache-dir", str(tmp_path))
    assert args.func is run and args.func(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["entries"] == 7 and d["kinds"]["view"] == 5 and d["location"] == str(tmp_path)
    args = _parse("cache", "--cache-dir", str(tmp_path), "info")  # option before the sub-verb
    assert run(args) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "entries:   7" in out and "view: 5" in out and "KiB" in out


def test_cli_uses_env_dir(tmp_path, capsys, monkeypatch):
    _fill(tmp_path)
    monkeypatch.setenv("VLM_TTA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("VLM_TTA_NO_CACHE", "1")  # info still inspects the files
    assert run(_parse("cache", "info", "--json")) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["entries"] == 7 and d["enabled"] is False


def test_cli_clear(tmp_path, capsys):
    _fill(tmp_path)
    assert run(_parse("cache", "clear", "--cache-dir", str(tmp_path))) == 1  # no --yes: nothing happens
    assert "would delete 7 entries" in capsys.readouterr().out
    assert len(EmbeddingCache(tmp_path)) == 7
    assert run(_parse("cache", "clear", "--kind", "text", "--yes", "--cache-dir", str(tmp_path))) == 0
    assert len(EmbeddingCache(tmp_path)) == 5
    assert run(_parse("cache", "clear", "-y", "--cache-dir", str(tmp_path))) == 0
    assert "deleted 5 entries" in capsys.readouterr().out
    assert len(EmbeddingCache(tmp_path)) == 0
    assert run(_parse("cache", "clear", "--yes", "--cache-dir", str(tmp_path / "none"))) == 0
    assert "nothing to clear" in capsys.readouterr().out
    assert run(_parse("cache", "info", "--cache-dir", str(tmp_path / "nowhere"))) == 0
    assert "no cache database yet" in capsys.readouterr().out
    assert not (tmp_path / "nowhere").exists()


def test_pickled_cache_opens_its_own_connection(tmp_path):
    import pickle

    c = EmbeddingCache(tmp_path, storage_dtype="float16")
    c.put("a", np.ones(3))
    c2 = pickle.loads(pickle.dumps(c))
    assert c2.storage_dtype == "float16" and c2.directory == tmp_path
    assert np.array_equal(c2.get("a"), np.ones(3)) and c2.put("b", np.ones(2))
    assert len(c) == 2


def test_unwritable_directory_reads_through_immutable_fallback(tmp_path, monkeypatch):
    """What a read-only directory does to SQLite (simulated: root ignores permissions): no
    read-write open, no -shm file for an ordinary read-only open; the immutable open still reads."""
    with EmbeddingCache(tmp_path) as c:
        c.put("a", np.ones(3))
    assert not (tmp_path / (DB_FILENAME + "-wal")).exists()  # the last close checkpointed the WAL
    real = cache_mod._connect

    def connect(path, readonly=False, immutable=False):
        if not immutable:
            raise sqlite3.OperationalError("unable to open database file")
        return real(path, readonly, immutable)

    monkeypatch.setattr(cache_mod, "_connect", connect)
    c = EmbeddingCache(tmp_path)
    compute = Counter(rows(2, 3))
    with pytest.warns(RuntimeWarning, match="cannot be written") as rec:
        out = c.get_or_compute(["a", "b"], compute)
        assert c.put("c", np.ones(1)) is False
    assert len(rec) == 1 and compute.calls == [[1]]
    assert np.array_equal(out, np.stack([np.ones(3, np.float32), compute.values[1]]))


# ----------------------------------------------------------------------------------------------
# export / merge: one cache per machine, copied between machines
# ----------------------------------------------------------------------------------------------


def test_export_is_a_consistent_copy_while_the_cache_is_in_use(tmp_path):
    node0 = EmbeddingCache(tmp_path / "node0")
    values = rows(6)
    node0.put_many([(make_key("view", i), values[i]) for i in range(4)])
    assert (tmp_path / "node0" / f"{DB_FILENAME}-wal").exists()  # the writer's WAL holds uncheckpointed rows
    assert node0.export(tmp_path / "snap" / "node0.sqlite3") == 4  # node0 stays open and usable
    node0.put(make_key("view", 4), values[4])
    snap = tmp_path / "snap" / "node0.sqlite3"
    assert not Path(f"{snap}-wal").exists() and not list(snap.parent.glob(".*.tmp"))
    # the snapshot seeds an empty cache of another machine: the same arrays, bit for bit
    node1 = EmbeddingCache(tmp_path / "node1")
    assert node1.merge(snap) == 4
    got = node1.get_many([make_key("view", i) for i in range(5)])
    assert sorted(got) == sorted(make_key("view", i) for i in range(4))
    assert all(np.array_equal(got[make_key("view", i)], values[i]) for i in range(4))
    # merging adds only what is missing; entries already there are kept as they are
    node1.put(make_key("view", 5), values[5])
    node1.put(make_key("view", 0), values[5])
    assert node1.merge(tmp_path / "node0") == 1  # a cache directory works too: view 4 is new
    assert np.array_equal(node1.get(make_key("view", 0)), values[5]) and len(node1) == 6


def test_merge_refuses_what_is_not_a_cache(tmp_path):
    other = tmp_path / "other.sqlite3"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(OSError, match="not a vlm_tta cache"):
        EmbeddingCache(tmp_path / "c").merge(other)
    with pytest.raises(OSError, match="no cache database"):
        EmbeddingCache(tmp_path / "c").merge(tmp_path / "missing.sqlite3")
    with pytest.raises(OSError, match="no cache database at .* to export"):
        EmbeddingCache(tmp_path / "empty").export(tmp_path / "x.sqlite3")


def test_cli_export_and_merge(tmp_path, capsys):
    _fill(tmp_path / "a")
    snap = tmp_path / "a.sqlite3"
    assert run(_parse("cache", "export", str(snap), "--cache-dir", str(tmp_path / "a"))) == 0
    assert "exported 7 entries" in capsys.readouterr().out
    assert run(_parse("cache", "merge", str(snap), str(snap), "--cache-dir", str(tmp_path / "b"))) == 0
    out = capsys.readouterr().out
    assert "merged 7 new entries" in out and "merged 0 new entries" in out and len(EmbeddingCache(tmp_path / "b")) == 7
    assert run(_parse("cache", "merge", str(tmp_path / "nope.sqlite3"), "--cache-dir", str(tmp_path / "b"))) == 1
    assert "no cache database" in capsys.readouterr().err


def test_fast_key_paths_equal_the_canonical_encoding():
    # make_key's fast path for plain str/int parts and make_keys' shared prefix write exactly the
    # text the canonical JSON encoding writes, so existing cache entries keep their keys.
    import hashlib
    import json

    from vlm_tta.cache import make_keys

    tricky = ["view", 'ü"\\\n\t\x00é漢😀', 1, -5, 10**30, "", "0"]
    text = json.dumps(tricky, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert cache_mod.make_key(*tricky) == "view:" + hashlib.sha256(text.encode()).hexdigest()
    prefix = ("view", "fp", "hash")
    suffixes = [("original", 1), ("augmix", 0, 7, 1), ("given", 3), (), (1.5, None, True, {"b": 1, "a": [2]})]
    assert make_keys(prefix, suffixes) == [cache_mod.make_key(*prefix, *s) for s in suffixes]
    assert make_keys((), [("text", 1)]) == [cache_mod.make_key("text", 1)]


def test_rows_with_the_earlier_blake2b_checksum_still_read(tmp_path):
    """Rows written by earlier versions carry a 16-byte BLAKE2b checksum: they are verified with it."""
    from vlm_tta.cache import _blake2b_checksum

    c = EmbeddingCache(tmp_path)
    c.put("k", np.arange(6, dtype=np.float32))
    with sqlite3.connect(tmp_path / DB_FILENAME) as db:
        key, dtype, shape, data = db.execute("SELECT key, dtype, shape, data FROM embeddings").fetchone()
        assert len(db.execute("SELECT checksum FROM embeddings").fetchone()[0]) == 4  # CRC-32 now
        legacy = _blake2b_checksum(key, dtype, shape, data)
        db.execute("UPDATE embeddings SET checksum = ?", (legacy,))
    assert np.array_equal(EmbeddingCache(tmp_path).get("k"), np.arange(6, dtype=np.float32))
    with sqlite3.connect(tmp_path / DB_FILENAME) as db:
        db.execute("UPDATE embeddings SET checksum = ?", (bytes(16),))  # a damaged legacy checksum
    with pytest.warns(RuntimeWarning, match="1 damaged entry"):
        assert EmbeddingCache(tmp_path).get("k") is None


def test_shared_key_suffixes_keep_bools_and_floats_apart():
    """make_keys remembers encoded suffixes: 1, True and 1.0 must still give three keys."""
    keys = make_keys(("view", "fp", "img"), [(1,), (True,), (1.0,), ("1",), (1,)])
    assert len(set(keys)) == 4 and keys[0] == keys[4]
    assert keys == [make_key("view", "fp", "img", p) for p in (1, True, 1.0, "1", 1)]
