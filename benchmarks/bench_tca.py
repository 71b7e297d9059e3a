"""TCA benchmark: GMACs and per-image time of TCA at R = 1.0, 0.9 and 0.7 (K = 2 and K = 4 merge
centres) against zero-shot, in one run on the same images.

Not part of the test run. Every configuration gets the same preprocessed images one at a time (batch
1) and the same class embeddings (computed once): zero-shot is the backbone's own ``encode_images``
plus the logits, TCA is its ``predict_sample`` (condensed forward, reservoir, correction logits). The
configurations take turns image by image, and each keeps its median wall and CPU time per image, so
the ratios to zero-shot are meaningful on a busy machine:

    python benchmarks/bench_tca.py                       # random-weight ViT-B-16 (real size), CPU
    python benchmarks/bench_tca.py --threads 1           # steadier ratios on a shared CPU
    python benchmarks/bench_tca.py --images 16 --rounds 3 --device cuda

GMACs are what the forward ran (:mod:`vlm_tta.models.steppable`); the paper reports 17.59 (CLIP),
15.45 (TCA R = 0.9) and 11.69 (TCA R = 0.7) with fvcore, which matches K = 2 centres.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import numpy as np
import torch
from PIL import Image

import vlm_tta
from vlm_tta.methods import MethodContext, create_method
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
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="passes over the images (TCA stays online across them)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = vlm_tta.load_model(args.model, pretrained=None, device=args.device)
    size = model.preprocess_cfg.image_size[0]
    pixels = [model.preprocess(img)[None] for img in make_images(args.images, size)]
    class_features = model.class_embeddings(CLASSES)
    full_gmacs = SteppableViT(model).shape.macs() / 1e9
    print(
        f"model: {args.model} (random weights) on {args.device}; {args.images} images of {size} px x "
        f"{args.rounds} rounds, {len(CLASSES)} classes, batch 1; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )

    def zero_shot(x: torch.Tensor) -> torch.Tensor:
        return model.logits(model.encode_images(x), class_features)

    runners, methods = {}, {}
    for label, options in CONFIGS:
        if options is None:
            runners[label] = zero_shot
            continue
        method = methods[label] = create_method("tca", **options)
        method.setup(MethodContext(class_features, model.logit_scale, None, CLASSES, model))
        runners[label] = lambda x, m=method: (
            m.predict_sample(types.SimpleNamespace(views=lambda view_set, indices=None: x)).logits
        )

    zero_shot(pixels[0])  # warm-up
    walls: dict[str, list[float]] = {label: [] for label, _ in CONFIGS}
    cpus: dict[str, list[float]] = {label: [] for label, _ in CONFIGS}
    for _ in range(args.rounds):
        for x in pixels:
            for label, _ in CONFIGS:
                t0, c0 = time.perf_counter(), time.process_time()
                runners[label](x)
                walls[label].append(time.perf_counter() - t0)
                cpus[label].append(time.process_time() - c0)

    # CPU time (all threads of this process) is less disturbed by other processes than wall time
    base_w, base_c = statistics.median(walls["zero-shot"]), statistics.median(cpus["zero-shot"])
    header = f"{'configuration':<16}{'GMACs':>7}{'vs ZS':>7}{'wall ms':>10}{'vs ZS':>7}{'CPU ms':>10}{'vs ZS':>7}"
    print(f"\n{header}  tokens after blocks 3/6/9")
    for label, _ in CONFIGS:
        info = methods[label].run_info() if label in methods else {"gmacs_per_image": full_gmacs}
        g = info["gmacs_per_image"]
        w, c = statistics.median(walls[label]), statistics.median(cpus[label])
        toks = "/".join(str(info["tokens_after_blocks"][i]) for i in (3, 6, 9)) if label in methods else ""
        row = f"{g:>7.2f}{g / full_gmacs:>7.3f}{w * 1e3:>10.1f}{w / base_w:>7.3f}"
        print(f"{label:<16}{row}{c * 1e3:>10.1f}{c / base_c:>7.3f}  {toks}")
    print("\npaper (fvcore): CLIP 17.59, TCA R=0.9 15.45, TCA R=0.7 11.69 GFLOPs")


if __name__ == "__main__":
    main()
