"""Views off the critical path: what making 64 views costs, and whether the pipeline keeps up with
the image encoder (issue 15's target: the zero-shot pipeline with 64 views from JPEG files reaches at
least half of the pure image-encoder throughput measured in the same run).

Not part of the test run. In one process, on the same images:

* views: milliseconds per image to make ``--views`` views from a decoded image, for the PIL recipes
  (the exact-reproduction default) and their tensor-path twins (``*_t``), with ``--workers`` threads;
* encoder: images/s of ``model.encode_images`` alone on ready-made pixels (``--views`` per image, in
  batches of ``--batch-size`` views), the ceiling for everything else;
* pipeline: images/s of ``vlm_tta.classify(method="zero", n_views=--views)`` (zero-shot voting
  over the views; its own arithmetic is negligible) from JPEG files with the cache off, for each
  recipe, with and without ``prefetch``, and its ratio to the encoder's images/s.

Weights are random (speed does not depend on them). ``--model`` is an open_clip architecture name
(``ViT-B-16``; slow on a CPU) or ``tiny224`` (a 4-layer, 192-wide ViT at 224 px, for quick CPU runs).

    python benchmarks/bench_views.py                                  # tiny224, 8 images, CPU
    python benchmarks/bench_views.py --model ViT-B-16 --device cuda --images 64 --threads 0
    python benchmarks/bench_views.py --images 4 --recipes crop_flip,crop_flip_t --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vlm_tta
from vlm_tta.models import load_model
from vlm_tta.views import ViewSet, default_num_workers

TINY224 = {
    "name": "tiny224",
    "embed_dim": 256,
    "vision_cfg": {"image_size": 224, "patch_size": 16, "width": 192, "layers": 4, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}
CLASSES = [f"class {i}" for i in range(10)]


def photo(seed: int, w: int = 500, h: int = 375) -> Image.Image:
    """A photo-like test image: smooth random colour fields plus fine noise (JPEG-compressible)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-12, 13, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def bench_views(images, model, recipes, n_views, workers) -> dict:
    out = {}
    cfg = model.preprocess_cfg
    for recipe in recipes:
        vs = ViewSet(recipe, n_views, seed=0)
        vs.make(images[0], cfg, num_workers=workers, device=model.device)  # warm-up
        times = []
        for img in images:
            t0 = time.perf_counter()
            x = vs.make(img, cfg, num_workers=workers, device=model.device)
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[recipe] = 1000 * statistics.median(times)
    return out


def bench_encoder(model, n_images, n_views, batch_size) -> float:
    h, w = model.preprocess_cfg.image_size
    pixels = torch.randn(batch_size, 3, h, w)
    model.encode_images(pixels)  # warm-up
    t0 = time.perf_counter()
    total = n_images * n_views
    for start in range(0, total, batch_size):
        model.encode_images(pixels[: min(batch_size, total - start)])
    return n_images / (time.perf_counter() - t0)


def bench_pipeline(paths, model, recipe, n_views, workers, prefetch, batch_size) -> float:
    kw = dict(method="zero", n_views=n_views, view_recipe=recipe, model=model, cache=False, num_workers=workers)
    vlm_tta.classify(paths[:1], CLASSES, batch_size=batch_size, prefetch=prefetch, **kw)  # warm-up
    t0 = time.perf_counter()
    vlm_tta.classify(paths, CLASSES, batch_size=batch_size, prefetch=prefetch, **kw)
    return len(paths) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny224", help="open_clip architecture name, or tiny224")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default=None, help="fp32, amp, amp_bf16 (default: the device's)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--views", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="views per encoder batch (and images per chunk)")
    p.add_argument("--workers", type=int, default=None, help="view threads (default: usable CPUs, at most 8)")
    p.add_argument("--prefetch", default="0,2", help="prefetch values to compare")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--recipes", default="crop_flip,crop_flip_t,augmix,augmix_t")
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder")
    p.add_argument("--repeat", type=int, default=1, help="pipeline runs per setting (median; settings alternate)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    workers = default_num_workers() if args.workers is None else args.workers
    spec = TINY224 if args.model == "tiny224" else args.model
    model = load_model(spec, pretrained=None, device=args.device, precision=args.precision)
    if args.compile:
        model.compile()
    recipes = [r for r in args.recipes.split(",") if r]
    prefetches = [int(v) for v in args.prefetch.split(",") if v]
    images = [photo(i) for i in range(args.images)]
    result = {
        "model": model.name,
        "device": str(model.device),
        "precision": model.precision,
        "torch_threads": torch.get_num_threads(),
        "view_workers": workers,
        "images": args.images,
        "views": args.views,
        "note": "random weights (speed does not depend on them)",
    }
    print(f"{model!r}, {args.images} images x {args.views} views, torch threads {torch.get_num_threads()}, "
          f"view workers {workers}")  # fmt: skip

    result["views_ms_per_image"] = bench_views(images, model, recipes, args.views, workers)
    print("\nviews: ms per image")
    for r, ms in result["views_ms_per_image"].items():
        print(f"  {r:<16} {ms:8.1f}")

    enc = bench_encoder(model, args.images, args.views, args.batch_size)
    result["encoder_images_per_s"] = enc
    print(f"\nencoder alone: {enc:.3g} images/s ({enc * args.views:.3g} views/s)")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, img in enumerate(images):
            paths.append(str(Path(tmp) / f"{i}.jpg"))
            img.save(paths[-1], quality=90)
        print("\npipeline from JPEG files (zero-shot over the views, cache off): images/s, ratio to the encoder")
        for recipe in recipes:
            runs: dict[int, list[float]] = {p: [] for p in prefetches}
            for _ in range(args.repeat):  # alternate the settings, so a change in load hits both
                for prefetch in prefetches:
                    runs[prefetch].append(
                        bench_pipeline(paths, model, recipe, args.views, workers, prefetch, args.batch_size)
                    )
            for prefetch in prefetches:
                ips = statistics.median(runs[prefetch])
                rows.append({"recipe": recipe, "prefetch": prefetch, "images_per_s": ips, "ratio": ips / enc})
                print(f"  {recipe:<16} prefetch={prefetch}  {ips:8.3g} images/s  {ips / enc:5.2f}x encoder")
    result["pipeline"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
