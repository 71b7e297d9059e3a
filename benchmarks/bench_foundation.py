"""Foundation benchmark: zero-shot throughput with a cold vs a warm embedding cache, view generation
time per recipe, and the cache's bytes per 1,000 view embeddings at fp32 and fp16.

Not part of the test run. Everything is measured in this one run on the same images, so the ratios
are meaningful on any machine:

    python benchmarks/bench_foundation.py                      # random-weight ViT-B-16 (real size)
    python benchmarks/bench_foundation.py --model tiny         # a tiny random open_clip model
    python benchmarks/bench_foundation.py --images 64 --views 64 --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vlm_tta
from vlm_tta.cache import EmbeddingCache, make_key
from vlm_tta.features import encoder_call_counter
from vlm_tta.images import content_hash, load_image
from vlm_tta.views import ViewSet, default_num_workers, list_view_recipes

TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLASSES = ["cat", "dog", "bird", "car", "tree", "house", "boat", "plane", "horse", "flower"]


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(500, 375), (375, 500), (640, 480), (320, 320)]
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for w, h in (sizes[i % len(sizes)] for i in range(n))
    ]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16", help="open_clip name (random weights) or 'tiny'")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--views", type=int, default=64, help="views per image for the view-generation timing")
    ap.add_argument("--view-images", type=int, default=8, help="images for the view-generation timing")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    spec = TINY_CONFIG if args.model == "tiny" else args.model
    model = vlm_tta.load_model(spec, pretrained=None, device=args.device)
    images = make_images(args.images)
    print(
        f"model: {args.model} (random weights) on {args.device}; {args.images} images "
        f"(500x375 .. 640x480), torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    with tempfile.TemporaryDirectory() as tmp:
        # ---------------------------------------------------------------- cold vs warm cache
        paths = []
        for i, img in enumerate(images):
            paths.append(str(Path(tmp) / f"img{i:04d}.jpg"))
            img.save(paths[-1], quality=90)
        cache = EmbeddingCache(Path(tmp) / "cache")
        calls = encoder_call_counter(model)
        run = lambda: vlm_tta.classify(paths, CLASSES, model=model, cache=cache, batch_size=32)  # noqa: E731
        cold, t_cold = timed(run)
        after_cold = calls()
        warm, t_warm = timed(run)
        after_warm = calls()
        assert (cold.indices == warm.indices).all() and np.array_equal(cold.logits, warm.logits)
        _, t_decode = timed(lambda: [content_hash(load_image(p)) for p in paths])
        n = len(paths)
        print(f"\nzero-shot from {n} JPEG files (vlm_tta.classify: read, views, encode or cache read)")
        print(f"  cold cache: {n / t_cold:9.1f} images/s   image-encoder calls {after_cold['images']}")
        warm_calls = after_warm["images"] - after_cold["images"]
        print(f"  warm cache: {n / t_warm:9.1f} images/s   image-encoder calls {warm_calls}, no image decoded")
        print(f"  warm / cold speed ratio: {t_cold / t_warm:.1f}x")
        print(
            f"  (decoding + hashing the pixels alone, which the warm run skips: {n / t_decode:.1f} images/s, "
            f"{t_decode / t_warm:.1f}x the warm run's time)"
        )

        # ---------------------------------------------------------------- views per recipe
        cfg = model.preprocess_cfg
        vimgs = images[: args.view_images]
        print(
            f"\nview generation ({args.views} views per image incl. the original, "
            f"{cfg.image_size[0]}px, CPU, per image)"
        )
        workers = default_num_workers()
        for recipe in list_view_recipes():
            n = 1 if recipe == "original" else args.views
            vs = ViewSet(recipe, n, seed=0)
            vs.make(vimgs[0], cfg)  # warm-up
            _, t0 = timed(lambda vs=vs: [vs.make(img, cfg) for img in vimgs])
            _, t1 = timed(lambda vs=vs: [vs.make(img, cfg, num_workers=workers) for img in vimgs])
            print(
                f"  {recipe:15s} {n:3d} views: {1000 * t0 / len(vimgs):8.1f} ms/image serial, "
                f"{1000 * t1 / len(vimgs):8.1f} ms/image with {workers} threads"
            )

        # ---------------------------------------------------------------- bytes per 1000 views
        # The exact rows FeatureStore writes (same keys, D-dim float rows), without the encoder.
        print(f"\ncache size per 1,000 view embeddings (D = {model.embed_dim}; whole database file)")
        vs = ViewSet("crop_flip", 64, seed=0)
        rng = np.random.default_rng(0)
        for dtype in ("float32", "float16"):
            c = EmbeddingCache(Path(tmp) / f"bytes-{dtype}", storage_dtype=dtype)
            rows = [
                (
                    make_key("view", model.fingerprint, f"image{i:04d}", *vs.key_parts(j)),
                    rng.standard_normal(model.embed_dim).astype(np.float32),
                )
                for i in range(100)
                for j in range(1, 11)
            ]
            c.put_many(rows)
            c.close()  # checkpoints the write-ahead log into the database file
            info = EmbeddingCache(Path(tmp) / f"bytes-{dtype}", storage_dtype=dtype).info()
            per_1000 = info["bytes"] * 1000 / info["entries"]
            payload = info["payload_bytes"] * 1000 / info["entries"]
            print(f"  {dtype}: {per_1000 / 1024:8.1f} KiB on disk per 1,000 (raw payload {payload / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
