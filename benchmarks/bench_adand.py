"""AdaND throughput on embeddings against zero-shot on the same embeddings, in one run.

Not part of the test run. The setting of issue 8: 512-d embeddings already computed (held in memory,
as the stream loop hands them over after reading the cache), 1,000 classes, each method's default
views (one), through ``classify_features`` (the stream loop: AdaND in its own batches of 128,
zero-shot in chunks of 128). AdaND's injected noise comes from a pool of noise embeddings
(``noise_features``), at its default rate 0.125.

    python benchmarks/bench_adand.py                       # 20,000 images
    python benchmarks/bench_adand.py --images 50000 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import vlm_tta


def stream(n: int, classes: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP-like raw embeddings (a shared direction, half near a class, half not) and class embeddings."""
    g = torch.Generator().manual_seed(seed)
    shared = F.normalize(torch.randn(dim, generator=g), dim=-1)
    cls = F.normalize(0.8 * shared + 0.6 * F.normalize(torch.randn(classes, dim, generator=g), dim=-1), dim=-1)
    near = cls[torch.randint(0, classes, (n,), generator=g)] * (torch.rand(n, 1, generator=g) < 0.5)
    feats = near + 3 * F.normalize(0.8 * shared + 0.6 * torch.randn(n, dim, generator=g), dim=-1)
    return feats * (8 + 4 * torch.rand(n, 1, generator=g)), cls


def run(name: str, feats: torch.Tensor, cls: torch.Tensor, **kwargs) -> tuple[float, vlm_tta.ClassificationResult]:
    """One pass of ``classify_features`` (the stream loop, in the method's own chunks or 128)."""
    t0 = time.perf_counter()
    res = vlm_tta.classify_features(feats, cls, method=name, logit_scale=100.0, batch_size=128, **kwargs)
    return time.perf_counter() - t0, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--batch1-images", type=int, default=3000, help="images for AdaND at batch size 1")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    feats, cls = stream(args.images, args.classes, args.dim)
    noise = torch.randn(args.images // 4, args.dim) * 8
    print(
        f"{args.images} images, {args.dim}-d raw embeddings in memory, {args.classes} classes, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    run("zeroshot", feats[:512], cls)  # warm-up
    t_zs, _ = run("zeroshot", feats, cls)
    t_ad, res = run("adand", feats, cls, noise_features=noise)
    n1 = min(args.batch1_images, args.images)
    t_ad1, _ = run("adand", feats[:n1], cls, noise_features=noise, adapt_batch_size=1)
    t_zs1, _ = run("zeroshot", feats[:n1], cls)
    rows = [
        ("zeroshot (chunks of 128)", args.images, t_zs),
        ("adand (batch 128, noise 0.125)", args.images, t_ad),
        ("zeroshot (chunks of 128), same images as below", n1, t_zs1),
        ("adand (batch 1)", n1, t_ad1),
    ]
    for label, n, t in rows:
        print(f"  {label:48s} {n / t:10.0f} images/s")
    print(f"adand / zeroshot throughput (batch 128): {t_zs / t_ad:.2f}")
    print(f"flagged noisy: {res.noisy.mean():.3f} of the stream; {res.info['noise_injected']} noise rows injected")


if __name__ == "__main__":
    main()
