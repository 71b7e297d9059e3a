"""DiffTPT generation benchmark: time per image to generate image variations (tiny random pipeline),
one generation per pipeline call against batched calls, the cache hit rate and time of a second run,
reading the generations back, and the cache's bytes per stored generation at 512 px and 224 px.

Not part of the test run. Everything is measured in this one run, so the ratios are meaningful on any
machine (the absolute times of the tiny pipeline say nothing about Stable Diffusion's):

    python benchmarks/bench_diffusion.py                    # 8 images x 63 generations, 32 px, 2 steps
    python benchmarks/bench_diffusion.py --images 4 --count 16 --steps 4 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tiny_models import TINY_SD_SIZE, build_tiny_image_variation_pipeline  # noqa: E402

from vlm_tta.cache import EmbeddingCache, make_key  # noqa: E402
from vlm_tta.diffusion import ImageVariations  # noqa: E402
from vlm_tta.images import content_hash  # noqa: E402


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)) for _ in range(n)]


def stored_bytes(side: int, n: int, directory: Path) -> tuple[float, float]:
    """(payload bytes, bytes on disk) per generation for ``n`` uint8 side x side x 3 arrays in a cache."""
    cache = EmbeddingCache(directory)
    rng = np.random.default_rng(0)
    for start in range(0, n, 8):  # committed in batches, as generation does
        cache.put_many(
            (make_key("diffusion", side, i), rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
            for i in range(start, min(n, start + 8))
        )
    cache.close()  # the last connection checkpoints the write-ahead log into the database file
    info = cache.info()
    return info["payload_bytes"] / n, info["bytes"] / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--count", type=int, default=63, help="generations per image (DiffTPT: 63)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny kernels: 1 is fastest)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe = build_tiny_image_variation_pipeline()
    images = make_images(args.images)
    hashes = [content_hash(im) for im in images]
    settings = dict(count=args.count, steps=args.steps, height=TINY_SD_SIZE, width=TINY_SD_SIZE)
    total = args.images * args.count
    print(
        f"tiny image-variation pipeline ({TINY_SD_SIZE} px, {args.steps} steps), {args.images} images x "
        f"{args.count} generations = {total}, torch threads {torch.get_num_threads()}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 1. cold: one generation per call (the reference's unit of work is one pass over a batch of
        #    5 source images) against batched calls over images and generations
        one = ImageVariations(pipe, cache=EmbeddingCache(tmp / "one"), batch_size=1, **settings)
        r1 = one.generate(images, progress=False)
        batched = ImageVariations(pipe, cache=EmbeddingCache(tmp / "batched"), batch_size=args.batch_size, **settings)
        rb = batched.generate(images, progress=False)
        print("\ncold run (every generation made and stored; JPEG round trip, stored <= 224 px):")
        for label, r, g in (("batch 1", r1, one), (f"batch {args.batch_size}", rb, batched)):
            print(
                f"  {label}: {r.seconds_per_image:8.3f} s per image  {1e3 * r.seconds_per_generation:7.2f} ms "
                f"per generation  ({g.calls} pipeline calls)"
            )
        print(f"  batched / one-by-one time: {rb.seconds / r1.seconds:.2f}")

        # 2. warm: a second run over the same images (a new object, as a new process would be)
        again = ImageVariations(pipe, cache=EmbeddingCache(tmp / "batched"), batch_size=args.batch_size, **settings)
        t0 = time.perf_counter()
        rw = again.generate(images, progress=False)
        t_check = time.perf_counter() - t0
        t0 = time.perf_counter()
        arrays = again.load(hashes)
        t_load = time.perf_counter() - t0
        hit = rw.cached / (rw.cached + rw.generated)
        print("\nsecond run (same images, same cache):")
        print(f"  cache hit rate {100 * hit:.1f}% ({rw.cached} of {total}), generated {rw.generated}, ", end="")
        print(f"pipeline calls {again.calls}")
        print(
            f"  presence check: {1e3 * t_check / args.images:.2f} ms per image "
            f"({t_check / rb.seconds * 100:.2f}% of the cold batched run)"
        )
        print(
            f"  reading the generations back: {1e3 * t_load / args.images:.2f} ms per image ({arrays[0].shape} uint8)"
        )

        # 3. disk cost per generation
        print("\ncache bytes per generation (uint8 H x W x 3, SQLite on disk):")
        for side in (512, 224):
            payload, disk = stored_bytes(side, 64, tmp / f"disk{side}")
            print(
                f"  {side} px: {payload:9,.0f} B payload, {disk:9,.0f} B on disk; x 63 per image = "
                f"{63 * disk / 2**20:6.1f} MiB; x 1,000 images = {63e3 * disk / 2**30:5.1f} GiB"
            )


if __name__ == "__main__":
    main()
