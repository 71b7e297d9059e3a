"""Throughput of the feature-level methods on cached embeddings, against zero-shot in the same run.

Every method reads random unit vectors shaped like CLIP ViT-B/16 embeddings (512-d, 1,000 classes),
with its own default number of views, fed in stream order in chunks of ``--batch-size`` images, as
the stream loop feeds them. Only the methods' work is timed (making and normalising the embeddings
is not), by the wall clock and by the process's CPU time (with ``--threads 1`` the CPU rate is what
one quiet core would do, even on a busy machine). Online methods start empty, so their memories
fill over the stream: the rate depends on ``--images``. Not part of the test run:

    python benchmarks/bench_feature_methods.py                     # 4,000 images, every method
    python benchmarks/bench_feature_methods.py --images 20000 --methods tda dmn
    python benchmarks/bench_feature_methods.py --threads 1         # torch intra-op threads

Add a feature-level method with one line in ``METHODS``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vlm_tta.methods import MethodContext, create_method

#: (label, registered method, options): one line per benchmarked configuration.
METHODS = [
    ("zeroshot", "zeroshot", {}),
    ("tda", "tda", {}),
    ("tda, ImageNet-A preset (64 views)", "tda", {"preset": "imagenet_a"}),
    ("dmn", "dmn", {}),
    ("zero", "zero", {}),
    ("sts", "sts", {}),
]


def embeddings(n: int, views: int, dim: int, seed: int, raw: bool = False) -> torch.Tensor:
    """``n x views x dim`` random embeddings: unit vectors, or raw ones (norm ~10) for methods that
    read the encoder's raw output."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, views, dim, generator=g)
    return x * 10 / dim**0.5 if raw else F.normalize(x, dim=-1)


def run(name: str, options: dict, args, classes: torch.Tensor) -> tuple[float, float]:
    """Images per second of one method over the stream (setup excluded): by wall and CPU time."""
    method = create_method(name, **options)
    method.setup(MethodContext(classes, 100.0))
    n_views = method.view_set().n_views
    raw = getattr(method, "raw_features", False)
    step = method.stream_batch_size() or args.batch_size
    wall = cpu = 0.0
    for start in range(0, args.images, step):
        n = min(step, args.images - start)
        chunk = embeddings(n, n_views, args.dim, args.seed + start, raw)
        t0, c0 = time.perf_counter(), time.process_time()
        method.predict_batch(chunk)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
    method.finish()
    return args.images / wall, args.images / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4000, help="stream length (default 4000)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64, help="images per predict_batch call")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--methods", nargs="*", default=None, help="labels or method names to run (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    classes = embeddings(args.classes, 1, args.dim, seed=12345)[:, 0]
    chosen = [m for m in METHODS if not args.methods or m[0] in args.methods or m[1] in args.methods]
    if not any(m[1] == "zeroshot" for m in chosen):
        chosen.insert(0, METHODS[0])  # the baseline is always measured in the same run
    print(
        f"{args.images} images, {args.classes} classes, {args.dim}-d, batch {args.batch_size}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    rates = {}
    for label, name, options in chosen:
        rates[label] = run(name, options, args, classes)
    base_wall, base_cpu = rates["zeroshot"]
    width = max(len(label) for label in rates)
    head = f"{'method':<{width}}  {'views':>5}  {'images/s':>10}  {'ms/image':>8}  {'vs zero-shot':>12}"
    print(head + f"  {'images/CPU-s':>12}  {'vs zero-shot':>12}")
    for label, name, options in chosen:
        views = create_method(name, **options).view_set().n_views
        wall, cpu = rates[label]
        print(
            f"{label:<{width}}  {views:>5}  {wall:>10,.0f}  {1000 / wall:>8.3f}  {wall / base_wall:>11.3f}x"
            f"  {cpu:>12,.0f}  {cpu / base_cpu:>11.3f}x"
        )


if __name__ == "__main__":
    main()
