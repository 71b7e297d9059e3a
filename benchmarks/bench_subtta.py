"""SubTTA benchmark: images per second of SubTTA against zero-shot on the same images, at batch 64.

Not part of the test run. Both methods classify the same in-memory images in one run, through
``vlm_tta.classify`` with the embedding cache off (SubTTA never uses it: its weights change), so the
ratio is meaningful on any machine. Per batch SubTTA runs three forward passes of the image encoder
(alignment, base loss, prediction) and two backward passes (through the SVD into the LayerNorms);
zero-shot runs one forward pass.

    python benchmarks/bench_subtta.py                        # random-weight ViT-B-32, 2 batches of 64
    python benchmarks/bench_subtta.py --model ViT-B-16 --batches 3 --device cuda
    python benchmarks/bench_subtta.py --model tiny           # a tiny random open_clip model (seconds)
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np
import torch
from PIL import Image

import vlm_tta

TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLASSES = [f"class {i}" for i in range(100)]


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(n)]


def peak_rss_gib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip name (random weights) or 'tiny'")
    ap.add_argument("--batches", type=int, default=2, help="batches of --batch-size images")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    spec = TINY_CONFIG if args.model == "tiny" else args.model
    model = vlm_tta.load_model(spec, pretrained=None, device=args.device)
    n = args.batches * args.batch_size
    images = make_images(n)
    print(
        f"model: {args.model} (random weights) on {args.device}; {n} images in batches of {args.batch_size}, "
        f"{len(CLASSES)} classes; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    common = dict(model=model, cache=False, batch_size=args.batch_size, num_workers=0, progress=False)
    vlm_tta.classify(images[:4], CLASSES, **common)  # warm-up (first-call allocations, thread pools)

    t0 = time.perf_counter()
    zero_shot = vlm_tta.classify(images, CLASSES, method="zeroshot", **common)
    t_zs = time.perf_counter() - t0
    rss_zs = peak_rss_gib()

    t0 = time.perf_counter()
    adapted = vlm_tta.classify(images, CLASSES, method="subtta", adapt_batch_size=args.batch_size, **common)
    t_sub = time.perf_counter() - t0
    rss_sub = peak_rss_gib()

    changed = float(np.mean(zero_shot.indices != adapted.indices))
    print(f"zero-shot : {n / t_zs:8.2f} images/s  ({t_zs:7.2f} s)   peak RSS so far {rss_zs:5.2f} GiB")
    print(f"SubTTA    : {n / t_sub:8.2f} images/s  ({t_sub:7.2f} s)   peak RSS so far {rss_sub:5.2f} GiB")
    print(f"SubTTA takes {t_sub / t_zs:.2f}x the time of zero-shot; predictions changed on {changed:.1%} of images")
    print(f"SubTTA info: { {k: v for k, v in adapted.info.items() if k.startswith('subtta')} }")


if __name__ == "__main__":
    main()
