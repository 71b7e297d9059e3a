"""Cache maintenance benchmark: what `vlm-tta cache clear` costs on a large cache, how long a
concurrent writer waits meanwhile, and how fast the light `vlm-tta` verbs start.

Not part of the test run. Figures are printed beside a baseline measured in the same run:

* clear: seconds to clear a cache of ``--rows`` embeddings of ``--dim`` floats, against the
  seconds it took to write them; the longest put_many of a writer process running meanwhile,
  against its median put_many; the size on disk before and after;
* start-up: the median wall time of ``vlm-tta cache info`` (and ``templates``, ``datasets``,
  ``methods``) over ``--runs`` runs, against ``python -c pass``.

    python benchmarks/bench_cache.py                       # 200,000 rows of 512 floats (~400 MB)
    python benchmarks/bench_cache.py --rows 20000 --runs 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vlm_tta.cache import EmbeddingCache, _human_bytes, make_key

WRITER = """
import json, sys, time, os
import numpy as np
from vlm_tta.cache import EmbeddingCache, make_key
cache, stop, out = EmbeddingCache(sys.argv[1]), sys.argv[2], []
rows, i = np.ones((10, int(sys.argv[3])), np.float32), 0
while not os.path.exists(stop):
    t0 = time.time()
    n = cache.put_many((make_key("w", i + j), rows[j]) for j in range(10))
    out.append((t0, time.time() - t0, n))
    i += 10
    time.sleep(0.005)
print(json.dumps(out))
"""


def bench_clear(rows: int, dim: int, directory: Path) -> None:
    cache = EmbeddingCache(directory)
    values = np.random.default_rng(0).standard_normal((1000, dim)).astype(np.float32)
    t0 = time.perf_counter()
    for start in range(0, rows, 1000):
        cache.put_many((make_key("view", start + j), values[j]) for j in range(min(1000, rows - start)))
    fill = time.perf_counter() - t0
    cache.close()
    before = cache.info()["bytes"]

    stop = directory / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory), str(stop), str(dim)], stdout=subprocess.PIPE, text=True
    )
    time.sleep(2.0)  # the writer is running (and has imported what it needs)
    start = time.time()
    deleted = EmbeddingCache(directory).clear()
    end = time.time()
    time.sleep(1.0)
    stop.touch()
    puts = json.loads(writer.communicate(timeout=600)[0])
    after = cache.info()
    quiet = [d for t, d, _ in puts if t + d < start or t > end]
    during = [d for t, d, _ in puts if t < end and t + d > start]
    lost = sum(1 for _, _, n in puts if n != 10)
    print(
        f"clear: {rows:,} rows of {dim} floats, {_human_bytes(before)} on disk ({deleted:,} deleted with the writer's)"
    )
    print(f"  writing them:            {fill:8.2f} s")
    print(f"  clear():                 {end - start:8.2f} s   ({(end - start) / fill:.3f} x the writing time)")
    print(f"  size on disk after:      {_human_bytes(after['bytes'])} ({after['entries']} entries: the writer's)")
    if during and quiet:
        print(
            f"  concurrent writer:       longest put_many {max(during):.2f} s during the clear, "
            f"median {statistics.median(quiet) * 1000:.1f} ms otherwise ({len(puts)} puts, {lost} dropped)"
        )


def bench_startup(runs: int) -> None:
    script = Path(sys.executable).with_name("vlm-tta")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "vlm_tta.cli"]
    cases = {"python -c pass": [sys.executable, "-c", "pass"]}
    with tempfile.TemporaryDirectory() as tmp:
        for verb in (["cache", "info", "--cache-dir", tmp], ["templates"], ["datasets"], ["methods"]):
            cases["vlm-tta " + " ".join(verb[:2] if verb[0] == "cache" else verb)] = command + verb
        medians = {}
        for name, argv in cases.items():
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
                times.append(time.perf_counter() - t0)
            medians[name] = statistics.median(times)
    base = medians["python -c pass"]
    print(f"start-up, median of {runs} runs:")
    for name, m in medians.items():
        print(f"  {name:22s} {m:7.3f} s   {m / base:6.1f} x python -c pass")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--runs", type=int, default=7, help="runs per command for the start-up timing")
    ap.add_argument("--dir", default=None, help="where to build the test cache (default: a temporary folder)")
    args = ap.parse_args()
    bench_startup(args.runs)
    directory = Path(args.dir or tempfile.mkdtemp(prefix="vlm_tta_bench_cache_"))
    try:
        bench_clear(args.rows, args.dim, directory)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
