"""TCA benchmark: GMACs and per-image time of TCA at R = 1.0, 0.9 and 0.7 (K = 2 and K = 4 merge
centres) against zero-shot, in one run on the same images.

Not part of the test run. Every configuration classifies the same images one at a time through
``vlm_tta.classify`` (``batch_size=1``, no cache); the configurations take turns for several rounds
and each keeps its median wall and CPU time per image, so the ratios to zero-shot are meaningful on a
busy machine:

    python benchmarks/bench_tca.py                       # random-weight ViT-B-16 (real size), CPU
    python benchmarks/bench_tca.py --images 16 --rounds 5 --device cuda

GMACs are what the forward ran (:mod:`vlm_tta.models.steppable`); the paper reports 17.59 (CLIP),
15.45 (TCA R = 0.9) and 11.69 (TCA R = 0.7) with fvcore, which matches K = 2 centres.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

import vlm_tta
from vlm_tta.methods import create_method
from vlm_tta.models.steppable import SteppableViT

CLASSES = ["cat", "dog", "bird", "car", "tree", "house", "boat", "plane", "horse", "flower"]
#: (label, TCA options); None is zero-shot
CONFIGS = [
    ("zero-shot", None),
    ("TCA R=1.0", dict(keep_ratio=1.0)),
    ("TCA R=0.9 K=2", dict(keep_ratio=0.9, merge_centers=2)),
    ("TCA R=0.9 K=4", dict(keep_ratio=0.9, merge_centers=4)),
    ("TCA R=0.7 K=2", dict(keep_ratio=0.7, merge_centers=2)),
    ("TCA R=0.7 K=4", dict(keep_ratio=0.7, merge_centers=4)),
]


def make_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16", help="open_clip ViT name (random weights)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="turns each configuration takes (median kept)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    model = vlm_tta.load_model(args.model, pretrained=None, device=args.device)
    size = model.preprocess_cfg.image_size[0]
    images = make_images(args.images, size)
    full_gmacs = SteppableViT(model).shape.macs() / 1e9
    print(
        f"model: {args.model} (random weights) on {args.device}; {args.images} images of {size} px, "
        f"{len(CLASSES)} classes, batch 1, {args.rounds} rounds; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )

    def run(options):
        method = "zeroshot" if options is None else create_method("tca", **options)
        t0, c0 = time.perf_counter(), time.process_time()
        vlm_tta.classify(images, CLASSES, method=method, model=model, cache=False, batch_size=1, num_workers=0)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        gmacs = full_gmacs if options is None else method.run_info()["gmacs_per_image"]
        tokens = None if options is None else method.run_info()["tokens_after_blocks"]
        return wall / len(images), cpu / len(images), gmacs, tokens

    run(CONFIGS[0][1])  # warm-up
    walls: dict[str, list[float]] = {label: [] for label, _ in CONFIGS}
    cpus: dict[str, list[float]] = {label: [] for label, _ in CONFIGS}
    gmacs, tokens = {}, {}
    for _ in range(args.rounds):
        for label, options in CONFIGS:
            wall, cpu, gmacs[label], tokens[label] = run(options)
            walls[label].append(wall)
            cpus[label].append(cpu)

    # CPU time (all threads of this process) is less disturbed by other processes than wall time
    base_w, base_c = statistics.median(walls["zero-shot"]), statistics.median(cpus["zero-shot"])
    base_g = gmacs["zero-shot"]
    header = f"{'configuration':<16}{'GMACs':>7}{'vs ZS':>7}{'wall ms':>10}{'vs ZS':>7}{'CPU ms':>10}{'vs ZS':>7}"
    print(f"\n{header}  tokens after blocks 3/6/9")
    for label, _ in CONFIGS:
        w, c = statistics.median(walls[label]), statistics.median(cpus[label])
        toks = "" if tokens[label] is None else "/".join(str(tokens[label][i]) for i in (3, 6, 9))
        row = f"{gmacs[label]:>7.2f}{gmacs[label] / base_g:>7.3f}{w * 1e3:>10.1f}{w / base_w:>7.3f}"
        print(f"{label:<16}{row}{c * 1e3:>10.1f}{c / base_c:>7.3f}  {toks}")
    print("\npaper (fvcore): CLIP 17.59, TCA R=0.9 15.45, TCA R=0.7 11.69 GFLOPs")


if __name__ == "__main__":
    main()
