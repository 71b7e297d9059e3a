"""TPT benchmark: per-image time and peak memory of zero-shot, TPT as the reference computes it, and TPT
with the exact speed-ups (cold cache, then a second pass on a warm cache), at several class counts.

Not part of the test run. Every configuration gets the same images as the same preprocessed views
(``--views`` per image, view 0 the original, made once before timing: view making is not timed), the
same random-weight open_clip model and the same class names (CLIP's ImageNet names, the first C):

* zero-shot: the original view's embedding and the logits against the class embeddings (computed once);
* TPT reference: ``reference_compute=True`` (every forward re-encodes all views, full 77-token text,
  one image at a time);
* TPT fast: the defaults (view embeddings once through the shared cache, length-bucketed EOS cut,
  several images per forward), optionally ``--class-chunk`` classes per text forward;
* TPT warm: the fast configuration again on the same images (the view embeddings are in the cache).

Predictions of the fast and reference runs are compared (max |logit difference| and argmax agreement).
Peak memory is the process's resident set (RSS) above its level before the configuration, sampled
every 5 ms, with glibc's mmap threshold fixed so that freed buffers go back to the system (the script
re-runs itself with ``MALLOC_MMAP_THRESHOLD_=131072``); ``torch.cuda.max_memory_allocated`` on CUDA::

    python benchmarks/bench_tpt.py                                  # ViT-B-16 size, random weights, CPU
    python benchmarks/bench_tpt.py --small --threads 1 --images 2   # a reduced run on a shared CPU
    python benchmarks/bench_tpt.py --classes 1000 --class-chunk 250 --device cuda
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time

import numpy as np
import torch

import vlm_tta
from vlm_tta.cache import EmbeddingCache
from vlm_tta.features import FeatureStore, GivenViews, Sample
from vlm_tta.methods import MethodContext, create_method

#: a smaller CLIP for a loaded CPU: ViT-B/32-like towers of width 256 and 4 layers
SMALL_CONFIG = {
    "name": "bench-small",
    "embed_dim": 256,
    "vision_cfg": {"image_size": 224, "patch_size": 32, "width": 256, "layers": 4, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak RSS above the starting level (CPU) or peak CUDA allocation, over a ``with`` block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = _rss()
        self.peak = self.base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss())
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())
        self.extra_mb = (self.peak - self.base) / 2**20


def make_views(model, n_images: int, n_views: int, seed: int = 0) -> list[GivenViews]:
    """The original and ``n_views - 1`` crop_flip views of random images, as GivenViews."""
    from PIL import Image

    from vlm_tta.views import ViewSet

    rng = np.random.default_rng(seed)
    size = model.preprocess_cfg.image_size[0]
    out = []
    for i in range(n_images):
        img = Image.fromarray(rng.integers(0, 256, (size + 32, size + 48, 3), dtype=np.uint8))
        pixels = ViewSet("crop_flip", n_views, seed).make(
            img, model.preprocess_cfg, original=model.preprocess, image_hash=f"bench-{i}"
        )
        out.append(GivenViews(pixels, name=f"image {i}"))
    return out


def bench_classes(model, views: list[GivenViews], names: list[str], args, cache_dir: str, n_ref: int) -> None:
    """One class count: every configuration on the same views, then the comparison line."""
    device = model.device
    c = len(names)
    cache = EmbeddingCache(cache_dir)
    store = FeatureStore(model, cache, encode_batch_size=args.views)
    class_features = model.class_embeddings(names, allow_duplicates=True)
    ctx = MethodContext(class_features, model.logit_scale, model.logit_bias, names, model, store)
    samples = [Sample(i, v, store) for i, v in enumerate(views)]
    rows = {}

    def run(label, fn, n, repeat=args.repeat):
        best, out = None, None
        for _ in range(repeat):  # the fastest of `repeat` runs (a shared machine's load only slows down)
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                out = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = (time.perf_counter() - t0) / n
            best = (seconds, mem.extra_mb) if best is None else (min(best[0], seconds), max(best[1], mem.extra_mb))
        rows[label] = best
        return out

    def zero_shot():
        pixels = torch.stack([v.pixels[0] for v in views])
        return model.logits(model.encode_images(pixels), class_features)

    run("zero-shot", zero_shot, len(views))
    with_ref = args.reference_max_classes is None or c <= args.reference_max_classes
    ref_pred = []
    if with_ref:
        ref = create_method("tpt", n_views=args.views, reference_compute=True)
        ref.setup(ctx)
        ref_pred = run("TPT reference", lambda: ref.predict_samples(samples[:n_ref]), n_ref)
    fast = create_method("tpt", n_views=args.views, class_chunk=args.class_chunk)
    fast.setup(ctx)
    fast_pred = run("TPT fast (cold)", lambda: fast.predict_samples(samples), len(samples), repeat=1)
    misses = dict(store.stats)
    warm_pred = run("TPT fast (warm)", lambda: fast.predict_samples(samples), len(samples))
    hits = {k: store.stats[k] - misses[k] for k in ("view_hits", "view_misses")}
    ref_s = rows["TPT reference"][0] if with_ref else math.nan
    for label, (seconds, mb) in rows.items():
        print(f"{c:>7} {label:<16} {seconds:>9.3f} {mb:>9.0f} {ref_s / seconds:>7.2f}")
    diff = max((float((a.logits - b.logits).abs().max()) for a, b in zip(ref_pred, fast_pred)), default=math.nan)
    same = all(a.index == b.index for a, b in zip(ref_pred, fast_pred))
    warm_same = all(torch.equal(a.logits, b.logits) for a, b in zip(fast_pred, warm_pred))
    print(
        f"{c:>7} fast vs reference: max |logit diff| {diff:.2e}, same predictions {same}; warm = cold "
        f"{warm_same}; warm pass view cache {hits['view_hits']} hits / {hits['view_misses']} misses"
    )


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and os.name == "posix":
        # glibc otherwise raises its mmap threshold after the first large free and keeps freed memory in the
        # heap, so later configurations would reuse it and show no RSS growth: fix the threshold and re-run
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16", help="open_clip architecture (random weights)")
    ap.add_argument("--small", action="store_true", help="a smaller CLIP (width 256, 4 layers per tower)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--views", type=int, default=64)
    ap.add_argument("--classes", default="10,100,1000", help="comma-separated class counts")
    ap.add_argument("--reference-images", type=int, default=None, help="images for the (slow) reference run")
    ap.add_argument(
        "--reference-max-classes", type=int, default=None, help="skip the reference run above this many classes"
    )
    ap.add_argument("--class-chunk", type=int, default=None, help="TPT fast: classes per text forward")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration (the fastest counts)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from vlm_tta.data import get_classnames

    model = vlm_tta.load_model(SMALL_CONFIG if args.small else args.model, pretrained=None, device=args.device)
    device = model.device
    all_names = get_classnames("imagenet")
    views = make_views(model, args.images, args.views)
    n_ref = min(args.images, args.reference_images or args.images)
    print(
        f"model: {'small config' if args.small else args.model} (random weights) on {device}; {args.images} images x "
        f"{args.views} views ({model.preprocess_cfg.image_size[0]} px; reference on {n_ref}); torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
    )
    header = f"{'classes':>7} {'configuration':<16} {'s/image':>9} {'peak MB':>9} {'x ref':>7}"
    print(header)
    with tempfile.TemporaryDirectory(prefix="bench_tpt_") as tmp:
        for c in [int(x) for x in args.classes.split(",")]:
            names = all_names[:c]  # CLIP's ImageNet names (two appear twice, as in TPT's list)
            bench_classes(model, views, names, args, os.path.join(tmp, f"cache{c}"), n_ref)


if __name__ == "__main__":
    main()
