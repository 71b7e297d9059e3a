"""Subprocess worker for the multi-process tests of vlm_tta.cache (run by tests/test_cache.py).

    python tests/cache_worker.py write DIR --worker W --start S --count N [--dim D] [--fp16]
    python tests/cache_worker.py loop  DIR --batch B [--dim D] [--fp16]

``write`` stores keys S..S+N-1 (mixing put_many batches and single puts), reads back the whole
key range as it goes and checks every value it sees; prints one JSON line and exits 0 when all
is well. ``loop`` appends batches of B keys (one transaction each) after those already stored,
forever, printing ``committed <n>`` after each commit; the test kills it with SIGKILL.

The module is loaded from its file so the worker does not import the whole package (torch):
four of these start at once on two cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
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


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["write", "loop"])
    p.add_argument("dir")
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--lo", type=int, default=0, help="key range read back while writing")
    p.add_argument("--hi", type=int, default=0)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--fp16", action="store_true")
    args = p.parse_args()
    cache_mod = load_cache_module()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a degraded cache is a failure here
            return cmd_write(args, cache_mod) if args.mode == "write" else cmd_loop(args, cache_mod)
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
