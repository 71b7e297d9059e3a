"""The benchmark runner's throughput and overhead on a warm cache, against classify_features.

A tiny fake natural-shift suite (ImageNet-A and ImageNet-R layouts, 200 classes each, images made
here) and a small random open_clip model whose joint embedding is 512-d, as CLIP ViT-B/16's. A cold
run fills the embedding cache; then, in one process:

* **runner**: every feature-level method of the suite run by ``Runner`` into a fresh run folder on
  the warm cache (one pass per stream reads each view embedding once for all methods, then the
  methods, the metrics and the rows);
* **direct**: the same jobs (same options, views, stream orders) through ``classify_features`` on
  the same embeddings already in memory (reading them is not timed).

The overhead is runner time / direct time - 1 (target: under 10%); ``overhead_beyond_reading`` also
counts, on the direct side, reading each stream's view embeddings from the warm cache once (which
the runner cannot skip). Not part of the test run:

    python benchmarks/bench_runner.py [--per-class 3] [--methods zeroshot,tda,dmn,zero] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fake_datasets import make_imagenet_subset  # noqa: E402

import vlm_tta  # noqa: E402
from vlm_tta.benchmark.results import ResultStore  # noqa: E402
from vlm_tta.benchmark.runner import Runner, parse_methods  # noqa: E402
from vlm_tta.benchmark.suites import load_suite  # noqa: E402
from vlm_tta.cache import EmbeddingCache  # noqa: E402
from vlm_tta.features import FeatureStore  # noqa: E402
from vlm_tta.methods import create_method  # noqa: E402

MODEL = {
    "name": "bench-512",
    "embed_dim": 512,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=3, help="images per class (200 classes per dataset)")
    ap.add_argument("--methods", default="zeroshot,tda,dmn,zero")
    ap.add_argument("--seeds", default="0", help="stream orders of the online methods")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_runner_"))
    make_imagenet_subset(work / "data" / "imagenet-a", "imagenet_a", per_class=args.per_class)
    make_imagenet_subset(work / "data" / "imagenet-r", "imagenet_r", per_class=args.per_class)
    suite_file = work / "suite.yaml"
    seeds = [int(s) for s in args.seeds.split(",")]
    suite_file.write_text(
        yaml.safe_dump(
            {
                "name": "natural_shift_tiny",
                "seeds": seeds,
                "datasets": ["imagenet_a", "imagenet_r"],
                "defaults": {"templates": "single", "views": "crop_flip"},
            }  # fmt: skip
        )
    )
    suite = load_suite(suite_file)
    model = vlm_tta.load_model(MODEL, pretrained=None)
    methods = parse_methods(args.methods)
    cache = work / "cache"

    def runner(out: str) -> Runner:
        return Runner(suite, methods, model, work / "data", work / out, cache=cache, log=lambda _: None)

    t0 = time.perf_counter()
    runner("cold").run()
    cold = time.perf_counter() - t0

    warm = runner("warm")
    t0 = time.perf_counter()
    warm.run()
    runner_s = time.perf_counter() - t0
    rows = ResultStore(work / "warm").rows()
    images = sum(r["n_images"] for r in rows)

    # The same jobs through classify_features on the same embeddings, already in memory.
    store = FeatureStore(model, EmbeddingCache(cache), encode_batch_size=64)
    direct_s = 0.0
    read_s = 0.0  # reading each job's view embeddings from the warm cache (what the runner cannot skip)
    per_method: dict[str, float] = {}
    for p in warm.plan():
        ds = warm._stream_dataset(p.dataset, p.extra, p.stream_seed)
        order = ds.order(p.stream_seed)
        images_ = store.open_images([ds.path(int(k)) for k in order])
        classes = store.class_features(ds.classnames, p.templates, allow_duplicates=True)
        read: dict = {}
        for job in p.jobs:
            method = create_method(job.method.name, **job.options)
            key = (method.view_set(), method.raw_features)
            if key not in read:  # each view set read once per stream, as the runner does
                t0 = time.perf_counter()
                read[key] = store.view_features(images_, method.view_set(), normalize=not method.raw_features)
                read_s += time.perf_counter() - t0
            feats = read[key]
            t0 = time.perf_counter()
            vlm_tta.classify_features(
                feats, classes, method=job.method.name, logit_scale=model.logit_scale, batch_size=64,
                allow_duplicate_classnames=True, **job.options,
            )  # fmt: skip
            dt = time.perf_counter() - t0
            direct_s += dt
            per_method[job.method.label] = per_method.get(job.method.label, 0.0) + dt
    print(
        json.dumps(
            {
                "jobs": len(rows),
                "images_per_job_total": images,
                "cold_run_s": round(cold, 2),
                "runner_warm_s": round(runner_s, 3),
                "direct_classify_features_s": round(direct_s, 3),
                "runner_images_per_s": round(images / runner_s, 1),
                "direct_images_per_s": round(images / direct_s, 1),
                "overhead": f"{100 * (runner_s / direct_s - 1):.1f}%",
                "reading_view_embeddings_s": round(read_s, 3),
                "overhead_beyond_reading": f"{100 * (runner_s / (direct_s + read_s) - 1):.1f}%",
                "direct_s_per_method": {k: round(v, 3) for k, v in per_method.items()},
                "threads": torch.get_num_threads(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
