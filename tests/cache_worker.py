"""Subprocess worker for the multi-process tests of vlm_tta.cache (run by tests/test_cache.py).

    python tests/cache_worker.py write DIR --worker W --start S --count N [--dim D] [--fp16]
    python tests/cache_worker.py loop  DIR --batch B [--dim D] [--fp16]
    python tests/cache_worker.py churn DIR --batch B --stop FILE --log LOG [--start S] [--dim D]
    python tests/cache_worker.py clear DIR --seconds S --log LOG [--log LOG2 ...] [--dim D]

``write`` stores keys S..S+N-1 (mixing put_many batches and single puts), reads back the whole
key range as it goes and checks every value it sees; prints one JSON line and exits 0 when all
is well. ``loop`` appends batches of B keys (one transaction each) after those already stored,
forever, printing ``committed <n>`` after each commit; the test kills it with SIGKILL.
``churn`` writes batches of B new keys (S, S+1, ...) until FILE exists, through fresh cache
objects (open, write, close) and two long-lived ones (one reopening now and then, one never), then
one last batch through each; it appends one JSON line to LOG for every batch ``put_many`` reported
stored, with the wall-clock time it started. ``clear`` runs ``vlm-tta cache clear --yes`` over and
over for S seconds, pausing 50 ms between clears; before each clear it reads, through a new cache
object, every batch logged since the previous clear returned. It prints one JSON line: the number
of clears, when the last one returned, the rows checked and the rows lost (missing or wrong).

The module is loaded from its file so the worker does not import the whole package (torch):
four of these start at once on two cores.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

_CACHE_PY = Path(__file__).resolve().parents[1] / "vlm_tta" / "cache.py"


def load_cache_module():
    spec = importlib.util.spec_from_file_location("_vlm_tta_cache_worker", _CACHE_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def key_of(cache_mod, i: int) -> str:
    return cache_mod.make_key("test", "worker-fingerprint", i)


def value_of(i: int, dim: int) -> np.ndarray:
    """The one value key ``i`` ever has: every writer writes the same bytes for it."""
    return np.random.default_rng(i).standard_normal(dim).astype(np.float32)


def expected(i: int, dim: int, fp16: bool) -> np.ndarray:
    v = value_of(i, dim)
    return v.astype(np.float16).astype(np.float32) if fp16 else v


def cmd_write(args, cache_mod) -> int:
    cache = cache_mod.EmbeddingCache(args.dir, storage_dtype="float16" if args.fp16 else "float32")
    ids = list(range(args.start, args.start + args.count))
    lo, hi = args.lo, args.hi
    all_keys = {key_of(cache_mod, i): i for i in range(lo, hi)}
    written = checked = 0
    pos = 0
    step = 0
    while pos < len(ids):
        if step % 3 == 2:
            i = ids[pos]
            assert cache.put(key_of(cache_mod, i), value_of(i, args.dim)), "put was dropped"
            pos += 1
            written += 1
        else:
            batch = ids[pos : pos + 10]
            n = cache.put_many((key_of(cache_mod, i), value_of(i, args.dim)) for i in batch)
            assert n == len(batch), f"put_many stored {n} of {len(batch)}"
            pos += len(batch)
            written += len(batch)
        step += 1
        if step % 4 == 0:  # read everything visible now, including other workers' keys
            got = cache.get_many(list(all_keys))
            for k, arr in got.items():
                if not np.array_equal(arr, expected(all_keys[k], args.dim, args.fp16)):
                    raise AssertionError(f"wrong value for key {all_keys[k]}")
            checked += len(got)
    own = cache.get_many([key_of(cache_mod, i) for i in ids])
    missing = [i for i in ids if key_of(cache_mod, i) not in own]
    assert not missing, f"own keys missing after writing: {missing[:5]}"
    for i in ids:
        assert np.array_equal(own[key_of(cache_mod, i)], expected(i, args.dim, args.fp16)), i
    cache.close()
    print(json.dumps({"worker": args.worker, "written": written, "checked": checked}), flush=True)
    return 0


def cmd_loop(args, cache_mod) -> int:
    cache = cache_mod.EmbeddingCache(args.dir, storage_dtype="float16" if args.fp16 else "float32")
    nxt = cache.info()["kinds"].get("test", 0)  # keys 0..nxt-1 are there: append after them
    while True:
        batch = range(nxt, nxt + args.batch)
        n = cache.put_many((key_of(cache_mod, i), value_of(i, args.dim)) for i in batch)
        if n != args.batch:
            print(f"dropped {args.batch - n}", flush=True)
            return 1
        nxt += args.batch
        print(f"committed {nxt}", flush=True)


def cmd_churn(args, cache_mod) -> int:
    """Write batches until the stop file appears; log each one put_many reported stored."""

    def new():
        return cache_mod.EmbeddingCache(args.dir)

    lasting, steady = new(), new()  # `lasting` closes its connection every 5th batch, `steady` never
    nxt, batches = args.start, 0
    log = open(args.log[0], "a", encoding="utf-8")

    def write(cache) -> None:
        nonlocal nxt, batches
        ids = list(range(nxt, nxt + args.batch))
        nxt += args.batch
        t0 = time.time()
        n = cache.put_many((key_of(cache_mod, i), value_of(i, args.dim)) for i in ids)
        if n == len(ids):  # logged only after put_many has returned
            log.write(json.dumps({"ids": [ids[0], ids[-1] + 1], "start": t0}) + "\n")
            log.flush()
            batches += 1

    step = 0
    while not os.path.exists(args.stop):
        if step % 3 == 0:
            with new() as fresh:
                write(fresh)
        else:
            write(lasting if step % 3 == 1 else steady)
            if step % 15 == 1:
                lasting.close()  # the next write reopens the database
        step += 1
    for cache in (lasting, steady, new()):
        write(cache)
    log.close()
    print(json.dumps({"batches": batches}), flush=True)
    return 0


def logged_batches(paths: list[str]) -> list[dict]:
    """The complete lines of the writers' logs (a line being written is skipped)."""
    out = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        out += [json.loads(line) for line in text.split("\n")[:-1]]
    return out


def missing_since(cache_mod, args, since: float) -> tuple[int, list[int]]:
    """(rows checked, rows missing or wrong) of the logged batches started after ``since``, read
    through a new cache object (a new connection, as another process would)."""
    ids = [i for b in logged_batches(args.log) if b["start"] > since for i in range(*b["ids"])]
    with cache_mod.EmbeddingCache(args.dir) as cache:
        got = cache.get_many([key_of(cache_mod, i) for i in ids])
    good = {
        i
        for i in ids
        if key_of(cache_mod, i) in got and np.array_equal(got[key_of(cache_mod, i)], value_of(i, args.dim))
    }
    return len(ids), [i for i in ids if i not in good]


def cmd_clear(args, cache_mod) -> int:
    """``vlm-tta cache clear --yes`` (the command's own code) in a loop. Before each clear, every
    batch the writers logged since the previous clear returned must be readable."""
    ns = argparse.Namespace(cache_dir=args.dir, cache_command="clear", yes=True, kind=None)
    deadline = time.time() + args.seconds
    clears = checked = 0
    lost: list[int] = []
    last = 0.0
    while time.time() < deadline:
        n, bad = missing_since(cache_mod, args, last)
        checked += n
        lost += bad
        with contextlib.redirect_stdout(io.StringIO()):
            rc = cache_mod.run(ns)
        last = time.time()
        if rc != 0:
            print(f"clear failed with status {rc}", flush=True)
            return 1
        clears += 1
        time.sleep(args.pause)  # let the writers commit a few batches before the next check
    print(json.dumps({"clears": clears, "last_end": last, "checked": checked, "lost": lost}), flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["write", "loop", "churn", "clear"])
    p.add_argument("dir")
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--lo", type=int, default=0, help="key range read back while writing")
    p.add_argument("--hi", type=int, default=0)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--stop", default="", help="churn: stop when this file exists")
    p.add_argument("--log", action="append", default=[], help="churn: batch log to write; clear: logs to check")
    p.add_argument("--seconds", type=float, default=2.0, help="clear: how long to keep clearing")
    p.add_argument("--pause", type=float, default=0.05, help="clear: seconds between clears")
    args = p.parse_args()
    cache_mod = load_cache_module()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a degraded cache is a failure here
            command = {"write": cmd_write, "loop": cmd_loop, "churn": cmd_churn, "clear": cmd_clear}[args.mode]
            return command(args, cache_mod)
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
