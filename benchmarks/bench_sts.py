"""STS benchmark: speed and memory against zero-shot, measured in one run on the same inputs.

Not part of the test run. Two parts:

(a) from cached view embeddings (1000 classes, 512-d, 64 views per image, random unit vectors):
    images/s of STS and zero-shot, through ``classify_features`` and through the method's
    ``predict_batch`` on already-normalised embeddings (what ``classify`` hands it). Target: STS >=
    1,000 images/s.
(b) from raw images with a ViT-B/16-sized random open_clip model: per-image time and peak memory of
    zero-shot reading the same 64 crop_flip views (so both pay for encoding them), STS, and TPT when
    ``vlm_tta.methods.tpt`` exists. Each method runs in its own process on the same images with a cold
    view cache (the class embeddings are computed once first, outside the timing, and copied into each
    process's cache); methods alternate over ``--rounds`` and the best round counts. Target: STS
    within 1.5x of zero-shot-with-64-views.

    python benchmarks/bench_sts.py                       # both parts
    python benchmarks/bench_sts.py --part a --images 4096 --chunk-powers 20,22,24
    python benchmarks/bench_sts.py --part b --raw-images 2 --device cuda
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from PIL import Image

import vlm_tta
from vlm_tta.methods import MethodContext, create_method
from vlm_tta.methods.zeroshot import ZeroShot
from vlm_tta.views import ViewSet


def part_a(n_images: int, n_classes: int, dim: int, n_views: int, repeats: int, chunk_powers: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    views = torch.nn.functional.normalize(torch.randn(n_images, n_views, dim, generator=g), dim=-1)
    shared = torch.randn(dim, generator=g)  # CLIP-like prototypes share a direction
    classes = torch.nn.functional.normalize(torch.randn(n_classes, dim, generator=g) + 2 * shared, dim=-1)
    print(
        f"(a) cached embeddings: {n_images} images x {n_views} views x {dim}-d, {n_classes} classes, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    def best(fn) -> tuple[float, float]:
        """The best wall time and the best CPU time (this process, all threads) of ``repeats`` runs:
        on a busy machine the CPU time is the steadier figure."""
        wall, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        return min(wall), min(cpu)

    rows = {}
    for name in ("zeroshot", "sts"):
        rows[name, "classify_features"] = best(lambda n=name: vlm_tta.classify_features(views, classes, method=n))
        method = create_method(name)
        method.setup(MethodContext(classes, 100.0))
        rows[name, "predict_batch"] = best(lambda m=method: m.predict_batch(views))
    for path in ("classify_features", "predict_batch"):
        (zs, zs_cpu), (sts, sts_cpu) = rows["zeroshot", path], rows["sts", path]
        print(
            f"  {path:18s} zero-shot {n_images / zs:8.0f} img/s ({n_images / zs_cpu:6.0f} per CPU-s)   "
            f"STS {n_images / sts:6.0f} img/s ({n_images / sts_cpu:5.0f} per CPU-s)   "
            f"STS / zero-shot time {sts / zs:5.1f}x"
        )
    for power in chunk_powers:  # STS.chunk_elements: results do not depend on it, speed does
        method = create_method("sts")
        method.setup(MethodContext(classes, 100.0))
        method.chunk_elements = 2**power
        wall, cpu = best(lambda m=method: m.predict_batch(views))
        print(
            f"  STS predict_batch, chunk_elements 2^{power}: "
            f"{n_images / wall:6.0f} img/s ({n_images / cpu:5.0f} per CPU-s)"
        )
    method = create_method("sts")
    t0 = time.perf_counter()
    method.setup(MethodContext(classes, 100.0))
    print(
        f"  STS setup (SVD of {n_classes} x {dim}, memoised afterwards): {time.perf_counter() - t0:.3f} s; "
        f"k = {method.spectrum.k} by Gavish-Donoho"
    )


class ZeroShotViews(ZeroShot):
    """Zero-shot that makes and encodes the same 64 crop_flip views as STS (and uses view 0)."""

    def view_set(self) -> ViewSet:
        return ViewSet("crop_flip", 64)


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(500, 375), (375, 500), (640, 480)]
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in (sizes[i % 3] for i in range(n))
    ]


class PeakRSS:
    """The peak resident memory of this process while in the ``with`` block, sampled every 5 ms from
    /proc (Linux), and the resident memory at its start (``ru_maxrss`` cannot be reset)."""

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._now())

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._now())

    @staticmethod
    def _now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()


def child(method_name: str, args) -> dict:
    """One method in this process on ``args.cache`` (class embeddings there, no view embeddings)."""
    from vlm_tta.data.resources import imagenet_classnames
    from vlm_tta.features import encoder_call_counter

    model = vlm_tta.load_model(args.model, pretrained=None, device=args.device)
    classes = imagenet_classnames()[: args.classes]
    images = make_images(args.raw_images)
    method = ZeroShotViews() if method_name == "zeroshot_64" else create_method(method_name)
    calls = encoder_call_counter(model)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        vlm_tta.classify(
            images, classes, method=method, model=model, cache_dir=args.cache, allow_duplicate_classnames=True
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    out = {
        "s_per_image": seconds / len(images),
        "rss_before_mb": rss.start / 2**20,
        "rss_growth_mb": (rss.peak - rss.start) / 2**20,
        "image_encoder_calls": calls()["images"],
        "text_encoder_calls": calls()["texts"],
    }
    if args.device.startswith("cuda"):
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def part_b(args) -> None:
    from vlm_tta.cache import EmbeddingCache
    from vlm_tta.data.resources import imagenet_classnames
    from vlm_tta.features import FeatureStore

    methods = ["zeroshot_64", "sts"] + (["tpt"] if importlib.util.find_spec("vlm_tta.methods.tpt") else [])
    print(
        f"(b) raw images: {args.model} (random weights) on {args.device}, {args.raw_images} images, 64 crop_flip "
        f"views, {args.classes} classes; one process per method and round (methods alternate, the best round "
        "is reported), each with a cache holding the class embeddings and no view embedding"
    )
    if "tpt" not in methods:
        print("  TPT: vlm_tta.methods.tpt does not exist in this checkout; not measured")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        text_cache = f"{tmp}/text"
        model = vlm_tta.load_model(args.model, pretrained=None, device=args.device)
        store = FeatureStore(model, EmbeddingCache(text_cache))
        store.class_features(imagenet_classnames()[: args.classes], allow_duplicates=True)
        del model, store
        for round_ in range(args.rounds):
            for name in methods:
                cache = f"{tmp}/{name}{round_}"
                shutil.copytree(text_cache, cache)
                cmd = [sys.executable, __file__, "--child", name, "--cache", cache, "--model", args.model]
                cmd += ["--device", args.device, "--raw-images", str(args.raw_images), "--classes", str(args.classes)]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    print(f"  {name}: failed\n{proc.stderr[-2000:]}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"  round {round_} {name:12s} {r['s_per_image']:8.2f} s/image", flush=True)
                best = results.setdefault(name, r)
                best["s_per_image"] = min(best["s_per_image"], r["s_per_image"])
                for key in ("rss_before_mb", "rss_growth_mb", "peak_cuda_mb"):
                    if key in r:
                        best[key] = max(best[key], r[key])
    base = results.get("zeroshot_64")
    for name, r in results.items():
        ratio = f"{r['s_per_image'] / base['s_per_image']:5.2f}x" if base else "  n/a"
        cuda = f", peak CUDA {r['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in r else ""
        print(
            f"  {name:12s} {r['s_per_image']:8.2f} s/image ({ratio} zero-shot-64)  "
            f"peak RSS +{r['rss_growth_mb']:.0f} MB during classify (from {r['rss_before_mb']:.0f} MB){cuda}; "
            f"encoder calls: image {r['image_encoder_calls']}, text {r['text_encoder_calls']}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("a", "b", "both"), default="both")
    ap.add_argument("--images", type=int, default=2048, help="(a) images")
    ap.add_argument("--repeats", type=int, default=3, help="(a) timing repeats (the best is reported)")
    ap.add_argument("--chunk-powers", default="", help="(a) also time STS.chunk_elements = 2^p for p in this list")
    ap.add_argument("--raw-images", type=int, default=2, help="(b) images")
    ap.add_argument("--classes", type=int, default=1000, help="classes (ImageNet's names in (b))")
    ap.add_argument("--model", default="ViT-B-16", help="(b) open_clip model name, random weights")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=2, help="(b) rounds; methods alternate within a round")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    if args.part in ("a", "both"):
        part_a(args.images, args.classes, 512, 64, args.repeats, [int(x) for x in args.chunk_powers.split(",") if x])
    if args.part in ("b", "both"):
        part_b(args)


if __name__ == "__main__":
    main()
