"""Performance suite (issue 15): every registered method against zero-shot, on the same images, in one
process; writes ``perf_suite.json`` and ``perf_suite.md``.

Not part of the test run. Models have random weights: speed and memory do not depend on the weights
(the output says so). Images are generated here and written as JPEG files, so decoding is timed.

    python benchmarks/perf_suite.py --quick                         # tiny model, CPU, a couple of minutes
    python benchmarks/perf_suite.py --model bench512 --threads 2    # 512-d joint embedding (CLIP B/16's)
    python benchmarks/perf_suite.py --model ViT-B-16 --device cuda  # full-size architecture, random weights
    python benchmarks/perf_suite.py --methods zeroshot,tda,dmn --images 32 --out perf_out

What it measures, every method through the one stream loop (:func:`vlm_tta.engine.run_on_images`,
images fed one at a time unless ``--batch-size``):

* **main table**: each method with its default options and views, on a *cold* cache (a fresh cache
  folder: views are made and encoded) and then a *warm* one (the same folder again: view embeddings
  are read back). Per-image latency (median, p90: the time from one image's read to the next), images
  per second over the stream, images per second of the method's own calls (``method_seconds`` of the
  loop: what a method costs on cached embeddings), peak memory (CUDA max allocated on a GPU, peak RSS
  on the CPU, reset before each run where Linux allows), GMACs per image where known (the method's own
  count, e.g. TCA's, else ``views x`` the image encoder's MACs for a cold feature-level run, 0 when
  every embedding came from the cache), and the time as a ratio to **zero-shot with the same views**
  (zero-shot reading the method's view set, so both make, encode or read the same views) in the same
  cache state;
* **scaling** (warm cache): cost with the number of classes (10, 100, 1,000 class names) and, for the
  methods with an ``n_views`` option, with the number of views (16, 32, 64), each against zero-shot
  with the same views;
* **cached embeddings**: the feature-level methods of ``bench_feature_methods.py`` on random 512-d
  embeddings at 1,000 classes (issue 15's target: >= 1,000 images/s on 2 CPU cores);
* **encoder**: the image encoder's own throughput on preprocessed views, beside the zero-shot pipeline
  with 64 views from the JPEG files (issue 15's target: at least half of it).

A method whose requirements are not met (an unusable model, missing weights such as DiffTPT's
diffusion model, an error at set-up) is skipped with the reason in both outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import bench_feature_methods  # noqa: E402
from bench_foundation import make_images  # noqa: E402

import vlm_tta  # noqa: E402
from vlm_tta.cache import EmbeddingCache  # noqa: E402
from vlm_tta.engine import run_on_images  # noqa: E402
from vlm_tta.features import FeatureStore  # noqa: E402
from vlm_tta.methods import MethodContext, create_method, get_method_class, list_methods  # noqa: E402
from vlm_tta.methods.zeroshot import ZeroShot  # noqa: E402
from vlm_tta.views import ViewSet  # noqa: E402

WEIGHTS_NOTE = "random weights: speed and memory do not depend on the weights"


def model_configs() -> dict[str, dict]:
    """Named small open_clip configs: ``tiny`` (the tests' tiniest model, 32-d) and ``bench512``
    (bench_runner.py's 512-d model)."""
    import bench_runner
    from tiny_models import TINY_OPENCLIP_CONFIG

    return {"tiny": dict(TINY_OPENCLIP_CONFIG), "bench512": dict(bench_runner.MODEL)}


class SameViewsZeroShot(ZeroShot):
    """Zero-shot on the original view that reads a given view set: the baseline with the same views
    as a method (the loop makes, encodes or reads them all; the prediction uses view 0)."""

    def __init__(self, view_set: ViewSet) -> None:
        super().__init__()
        self._view_set = view_set

    def view_set(self) -> ViewSet:
        return self._view_set


# ------------------------------------------------------------------------------------ measuring
class PeakMemory:
    """Peak memory of a run: CUDA max allocated on a GPU, else the process's peak RSS (reset through
    /proc/self/clear_refs where Linux allows; otherwise the peak since the process started)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.kind = "cuda_max_allocated" if self.cuda else "cpu_peak_rss"
        self.resettable = True

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.resettable = False

    def peak_mb(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        import resource

        self.resettable = False
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation, as numpy's default."""
    s = sorted(values)
    if not s:
        return math.nan
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclasses.dataclass
class Bench:
    """What every run shares: the model, the images, the options."""

    model: Any
    paths: list[str]
    device: str
    batch_size: int
    workers: int
    memory: PeakMemory
    encoder_gmacs: float | None  # GMACs of one view through the image encoder (None: not a known ViT)

    def class_names(self, n: int) -> list[str]:
        return [f"class {i}" for i in range(n)]

    def run(self, method, n_classes: int, cache_dir: Path) -> dict:
        """One pass of ``method`` (a Method instance) over the images through the stream loop."""
        store = FeatureStore(self.model, EmbeddingCache(cache_dir), encode_batch_size=64, num_workers=self.workers)
        names = self.class_names(n_classes)
        class_features = store.class_features(names, None)  # not timed: every method needs it once
        ctx = MethodContext(class_features, self.model.logit_scale, self.model.logit_bias, names, self.model, store)
        stamps: list[tuple[float, int]] = []
        open_images = store.open_images

        def timed_open(sources, *args, **kwargs):  # one call per chunk of the loop: the chunk starts
            stamps.append((time.perf_counter(), len(sources)))
            return open_images(sources, *args, **kwargs)

        store.open_images = timed_open
        self.memory.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        out = run_on_images(method, ctx, store, self.paths, self.paths, batch_size=self.batch_size)
        if self.memory.cuda:
            torch.cuda.synchronize()
        end, cpu = time.perf_counter(), time.process_time() - c0
        peak = self.memory.peak_mb()
        ends = [t for t, _ in stamps[1:]] + [end]
        per_image = [(e - s) / n for (s, n), e in zip(stamps, ends) for _ in range(n)]
        stream = end - stamps[0][0] if stamps else end - t0
        n = len(out.predictions)
        info = method.run_info()
        return {
            "images": n,
            "setup_s": round((stamps[0][0] if stamps else end) - t0, 4),
            "wall_s": round(stream, 4),
            "cpu_s": round(cpu, 4),
            "latency_ms": {"median": 1e3 * statistics.median(per_image), "p90": 1e3 * percentile(per_image, 0.9)},
            "images_per_s": n / stream if stream > 0 else None,
            "method_images_per_s": n / out.method_seconds if out.method_seconds > 0 else None,
            "peak_memory_mb": round(peak, 1),
            "gmacs_per_image": self.gmacs(method, info, store.stats),
            "cache": dict(store.stats),
            "run_info": {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool)) or v is None},
        }

    def gmacs(self, method, info: dict, stats: dict) -> float | None:
        """GMACs per image where known: the method's own count, else views x the encoder's for a
        feature-level method (0 on a warm cache: nothing encoded)."""
        if info.get("gmacs_per_image") is not None:
            return float(info["gmacs_per_image"])
        if method.needs_pixels or self.encoder_gmacs is None:
            return None
        encoded = stats["view_misses"] / max(1, len(self.paths))
        return encoded * self.encoder_gmacs


def fresh(folder: Path, repeat: int) -> Path:
    """A cold cache folder for each repeat (the first keeps the name, so the warm runs find it filled)."""
    return folder if repeat == 0 else folder.with_name(f"{folder.name}__r{repeat}")


def fastest(runs: Sequence[dict]) -> dict:
    """The pass with the shortest stream time (the least disturbed by other work on the machine)."""
    best = dict(min(runs, key=lambda r: r["wall_s"]))
    best["passes"] = len(runs)
    return best


def ratio(run: dict, base: dict | None) -> float | None:
    if not base or not run.get("wall_s") or not base.get("wall_s"):
        return None
    return run["wall_s"] / base["wall_s"]


# ------------------------------------------------------------------------------------ the suite
def method_specs(specs: Sequence[str] | None) -> list[tuple[str, dict]]:
    """(method, options) pairs to run: every registered method, or the chosen ones, each written
    ``name`` or ``name:option=value[:option=value...]`` (e.g. ``tda:preset=imagenet_a``)."""
    from vlm_tta.methods.base import parse_option_text

    out = []
    for spec in specs or list_methods():
        name, *pairs = spec.split(":")
        name = get_method_class(name).name
        options = {}
        for pair in pairs:
            key, _, text = pair.partition("=")
            options[key] = parse_option_text(name, key, text)
        out.append((name, options))
    return out


def default_specs(model: Any) -> list[str]:
    """Every registered method; TCA condenses the last block instead of blocks 3/6/9 (its default)
    on an image tower with fewer than 10 blocks (the tiny models), so it runs there too."""
    specs = list_methods()
    try:
        from vlm_tta.models.steppable import SteppableViT

        blocks = SteppableViT(model).num_blocks
    except Exception:  # noqa: BLE001 - not a stepped ViT: TCA reports its own error
        return specs
    if blocks < 10 and "tca" in specs:
        specs[specs.index("tca")] = f"tca:condense_blocks={blocks - 1}"
    return specs


def has_option(method: str, option: str) -> bool:
    config = get_method_class(method).config_class
    return dataclasses.is_dataclass(config) and option in {f.name for f in dataclasses.fields(config)}


def try_create(name: str, options: dict) -> tuple[Any, str | None]:
    try:
        return create_method(name, **options), None
    except Exception as e:  # noqa: BLE001 - reported as a skip
        return None, f"{type(e).__name__}: {e}"


def run_suite(args: argparse.Namespace, model: Any = None) -> dict:
    """The whole suite; ``model`` (a loaded VisionLanguageModel) replaces ``--model`` when given."""
    work = Path(args.work or tempfile.mkdtemp(prefix="perf_suite_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = model_configs().get(args.model, args.model) if model is None else getattr(model, "name", "given")
    if model is None:
        model = vlm_tta.load_model(spec, pretrained=None, device=args.device, seed=0)
    size = model.preprocess_cfg.image_size[0]
    images_dir = work / "images"
    images_dir.mkdir(exist_ok=True)
    paths = []
    for i, img in enumerate(make_images(args.images, seed=args.seed)):
        p = images_dir / f"img_{i:04d}.jpg"
        img.save(p, quality=90)
        paths.append(str(p))
    try:
        from vlm_tta.models.steppable import SteppableViT

        encoder_gmacs = SteppableViT(model).shape.macs() / 1e9
    except Exception:  # noqa: BLE001 - not a ViT the stepper knows: MACs unknown
        encoder_gmacs = None
    from vlm_tta.views import default_num_workers

    workers = default_num_workers() if args.workers is None else args.workers
    bench = Bench(model, paths, args.device, args.batch_size, workers, PeakMemory(args.device), encoder_gmacs)
    result: dict = {
        "config": {
            "model": args.model if isinstance(spec, str) else {"name": args.model, **spec},
            "note": WEIGHTS_NOTE,
            "device": args.device,
            "image_size": size,
            "images": len(paths),
            "classes": args.classes,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "view_workers": workers,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "quick": bool(args.quick),
            "memory": bench.memory.kind,
            "encoder_gmacs_per_view": encoder_gmacs,
        },
        "methods": [],
        "skipped": [],
        "scaling": {"classes": [], "views": []},
    }
    start = time.perf_counter()

    def log(*parts: Any) -> None:
        if not args.silent:
            print(f"[{time.perf_counter() - start:6.1f} s]", *parts, flush=True)

    baselines: dict[tuple, dict] = {}

    def baseline(view_set: ViewSet, n_classes: int, state: str, cache_dir: Path, tag: str = "") -> dict:
        """Zero-shot reading ``view_set``: measured once per (views, classes, state, folder, tag); the
        tag (the method) makes it run next to each method, so a change in the machine's load between
        methods does not enter the ratios."""
        key = (view_set.recipe, view_set.n_views, view_set.seed, n_classes, state, str(cache_dir), tag)
        if key not in baselines:
            method = (
                create_method("zeroshot")
                if view_set.n_views == 1 and view_set.recipe == "original"
                else (SameViewsZeroShot(view_set))
            )
            baselines[key] = bench.run(method, n_classes, cache_dir)
        return baselines[key]

    # ---- main table: cold then warm, each method against zero-shot with the same views
    bench.run(create_method("zeroshot"), args.classes, work / "cache" / "warm-up")  # one-time costs, not timed
    for name, options in method_specs(args.methods or default_specs(model)):
        method, error = try_create(name, options)
        if method is None:
            result["skipped"].append({"method": name, "options": options, "reason": error})
            log(f"skip {name} {options}: {error}")
            continue
        vs = method.view_set()
        label = name + "".join(f":{k}={v}" for k, v in options.items())
        entry = {
            "method": name,
            "label": label,
            "options": options,
            "kind": "model" if method.needs_pixels else "feature",
            "episodic": method.episodic,
            "views": {"recipe": vs.recipe, "n": vs.n_views, "seed": vs.seed},
            "stream_batch_size": method.stream_batch_size(),
            "runs": {},
        }
        cache_dir = work / "cache" / label.replace(":", "_").replace("=", "-")
        base_dir = work / "cache" / (cache_dir.name + "__zeroshot")  # measured next to the method, same state
        try:
            for state in ("cold", "warm"):
                runs, bases = [], []
                for r in range(args.repeats):  # method and zero-shot take turns; each keeps its fastest pass
                    rdir, bdir = (fresh(cache_dir, r), fresh(base_dir, r)) if state == "cold" else (cache_dir, base_dir)
                    runs.append(bench.run(create_method(name, **options), args.classes, rdir))
                    bases.append(baseline(vs, args.classes, state, bdir, tag=f"{label}#{r}"))
                run, base = fastest(runs), fastest(bases)
                run["zeroshot_same_views"] = {k: base[k] for k in ("wall_s", "latency_ms", "images_per_s")}
                run["ratio_to_zeroshot"] = ratio(run, base)
                entry["runs"][state] = run
                log(
                    f"{label:<14} {state}: {run['latency_ms']['median']:8.2f} ms/image median, "
                    f"{run['images_per_s']:8.1f} images/s, x{run['ratio_to_zeroshot'] or math.nan:.2f} vs zero-shot"
                )
        except Exception as e:  # noqa: BLE001 - a method whose requirements are not met is skipped
            result["skipped"].append({"method": name, "options": options, "reason": f"{type(e).__name__}: {e}"})
            log(f"skip {name} {options}: {type(e).__name__}: {e}")
            continue
        result["methods"].append(entry)

    # ---- scaling on a warm cache (filled first with the longest view set of every recipe)
    chosen = set(args.scaling_methods or [m["method"] for m in result["methods"]])
    ran = [(m["method"], m["options"]) for m in result["methods"] if m["method"] in chosen]
    scale_dir = work / "cache" / "scaling"
    fill = FeatureStore(model, EmbeddingCache(scale_dir), num_workers=workers)
    recipes: dict[tuple[str, int], int] = {}
    for name, options in ran:
        sets = [create_method(name, **options).view_set()]
        if has_option(name, "n_views"):
            for v in args.scale_views:
                method, _ = try_create(name, {**options, "n_views": v})
                sets += [method.view_set()] if method is not None else []
        for vs in sets:
            recipes[(vs.recipe, vs.seed)] = max(vs.n_views, recipes.get((vs.recipe, vs.seed), 0))
    opened = fill.open_images(paths)
    for (recipe, seed), n in recipes.items():
        fill.view_features(opened, ViewSet(recipe, n, seed), normalize=False)

    def scale(name: str, options: dict, axis: str, value: int, method_options: dict, classes: int) -> None:
        """One scaling row: the method with ``method_options`` at ``classes`` against zero-shot."""
        try:
            vs = create_method(name, **method_options).view_set()
            pairs = [
                (bench.run(create_method(name, **method_options), classes, scale_dir),
                 baseline(vs, classes, "warm", scale_dir, tag=f"{name}#{r}"))
                for r in range(args.repeats)
            ]  # fmt: skip
            run, base = fastest([a for a, _ in pairs]), fastest([b for _, b in pairs])
        except Exception as e:  # noqa: BLE001
            log(f"scaling {name} {axis}={value}: {type(e).__name__}: {e}")
            return
        result["scaling"][axis].append(_scaling_row(name, options, axis, value, run, base))

    for name, options in ran:
        for c in args.scale_classes:
            scale(name, options, "classes", c, options, c)
        if has_option(name, "n_views"):
            for v in args.scale_views:
                scale(name, options, "views", v, {**options, "n_views": v}, args.classes)

    # ---- feature-level methods on cached embeddings (bench_feature_methods.py), and the encoder
    if args.embedding_images:
        result["cached_embeddings"] = cached_embeddings(args)
    result["encoder"] = encoder_throughput(bench, result)
    return result


def _scaling_row(name: str, options: dict, what: str, value: int, run: dict, base: dict) -> dict:
    return {
        "method": name + "".join(f":{k}={v}" for k, v in options.items() if k != "n_views"),
        what: value,
        "latency_ms": run["latency_ms"],
        "images_per_s": run["images_per_s"],
        "method_images_per_s": run["method_images_per_s"],
        "peak_memory_mb": run["peak_memory_mb"],
        "zeroshot_images_per_s": base["images_per_s"],
        "ratio_to_zeroshot": ratio(run, base),
    }


def cached_embeddings(args: argparse.Namespace) -> dict:
    """bench_feature_methods.py's measurement: method-only rates on random embeddings."""
    ns = argparse.Namespace(images=args.embedding_images, dim=512, batch_size=64, seed=0)
    classes = bench_feature_methods.embeddings(1000, 1, 512, seed=12345)[:, 0]
    rows = []
    for label, name, options in bench_feature_methods.METHODS:
        wall, cpu = bench_feature_methods.run(name, options, ns, classes)
        views = create_method(name, **options).view_set().n_views
        rows.append({"method": label, "views": views, "images_per_s": wall, "images_per_cpu_s": cpu})
    return {"images": args.embedding_images, "classes": 1000, "dim": 512, "threads": torch.get_num_threads(),
            "target_images_per_s": 1000, "rows": rows}  # fmt: skip


def encoder_throughput(bench: Bench, result: dict) -> dict:
    """Views per second through the image encoder alone (preprocessed random pixels, batches of 64),
    beside the zero-shot pipeline's views per second (64 views from JPEG files, cold cache) when the
    main table has it."""
    model = bench.model
    size = model.preprocess_cfg.image_size
    x = torch.rand(64, 3, size[0], size[1], device=model.device)
    with torch.inference_mode():
        model.encode_images(x[:8])  # warm-up
        if bench.memory.cuda:
            torch.cuda.synchronize()
        t0, reps = time.perf_counter(), 0
        while reps < 3 or time.perf_counter() - t0 < 1.0:
            model.encode_images(x)
            reps += 1
        if bench.memory.cuda:
            torch.cuda.synchronize()
    encoder = 64 * reps / (time.perf_counter() - t0)
    out = {"encoder_views_per_s": encoder, "pipeline_64_views_per_s": None, "pipeline_fraction": None}
    for key, run in _baseline_runs(result):
        if key == 64:
            out["pipeline_64_views_per_s"] = run["images_per_s"] * 64
            out["pipeline_fraction"] = out["pipeline_64_views_per_s"] / encoder
            out["pipeline"] = "zero-shot reading 64 views, cold cache (views made and encoded)"
            break
    return out


def _baseline_runs(result: dict):
    for m in result["methods"]:
        if m["views"]["n"] == 64 and "cold" in m["runs"]:
            base = m["runs"]["cold"]["zeroshot_same_views"]
            yield 64, {"images_per_s": base["images_per_s"]}


# ------------------------------------------------------------------------------------ output
def _f(x: Any, fmt: str = ".2f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown(result: dict) -> str:
    cfg = result["config"]
    model = cfg["model"] if isinstance(cfg["model"], str) else cfg["model"]["name"]
    lines = [
        "# Performance suite",
        "",
        f"Model `{model}` ({cfg['note']}), device {cfg['device']}, {cfg['images']} JPEG images "
        f"({cfg['image_size']} px input), {cfg['classes']} classes, stream batch {cfg['batch_size']}, "
        f"{cfg['threads']} torch thread(s), {cfg['view_workers']} view worker(s), torch {cfg['torch']}, "
        f"fastest of {cfg['repeats']} pass(es) per measurement. "
        f"Memory: {cfg['memory']}. Encoder: {_f(cfg['encoder_gmacs_per_view'], '.3f')} GMACs per view.",
        "",
        "Latency: per image (median, p90), from one image's read to the next. images/s: over the stream. "
        "method img/s: the method's own calls only (on a warm cache, what it costs on cached embeddings). "
        "vs ZS: time / zero-shot's reading the same views in the same cache state.",
        "",
        "| method | kind | views | cache | median ms | p90 ms | images/s | method img/s | peak MB | GMACs/img "
        "| vs ZS (same views) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in result["methods"]:
        views = f"{m['views']['n']} {m['views']['recipe']}"
        for state, r in m["runs"].items():
            cells = [
                m["label"], m["kind"], views, state, _f(r["latency_ms"]["median"]), _f(r["latency_ms"]["p90"]),
                _f(r["images_per_s"], ".1f"), _f(r["method_images_per_s"], ".0f"), _f(r["peak_memory_mb"], ".0f"),
                _f(r["gmacs_per_image"], ".3f"), _f(r["ratio_to_zeroshot"]) + "x",
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    for what, label in (("classes", "classes"), ("views", "views")):
        rows = result["scaling"][what]
        if not rows:
            continue
        values = sorted({r[what] for r in rows})
        lines += ["", f"## Cost with the number of {label} (warm cache)", ""]
        lines.append("| method | " + " | ".join(f"{v} {label}: ms/img, vs ZS, method img/s" for v in values) + " |")
        lines.append("|---|" + "---:|" * len(values))
        for name in dict.fromkeys(r["method"] for r in rows):
            cells = []
            for v in values:
                r = next((r for r in rows if r["method"] == name and r[what] == v), None)
                cells.append(
                    "—"
                    if r is None
                    else f"{_f(r['latency_ms']['median'])}, {_f(r['ratio_to_zeroshot'])}x, "
                    f"{_f(r['method_images_per_s'], '.0f')}"
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ce = result.get("cached_embeddings")
    if ce:
        lines += [
            "",
            f"## Feature-level methods on cached embeddings ({ce['images']} images, {ce['classes']} classes, "
            f"{ce['dim']}-d, {ce['threads']} thread(s); target >= {ce['target_images_per_s']:,} images/s)",
            "",
            "| method | views | images/s | images/CPU-s |",
            "|---|---:|---:|---:|",
        ]
        for r in ce["rows"]:
            lines.append(f"| {r['method']} | {r['views']} | {r['images_per_s']:,.0f} | {r['images_per_cpu_s']:,.0f} |")
    enc = result.get("encoder")
    if enc:
        lines += [
            "",
            f"Image encoder alone: {enc['encoder_views_per_s']:,.0f} views/s (batches of 64 preprocessed views)"
            + (
                f"; zero-shot with 64 views from JPEG (cold): {enc['pipeline_64_views_per_s']:,.0f} views/s = "
                f"{enc['pipeline_fraction']:.2f} of it (target >= 0.5)."
                if enc.get("pipeline_fraction") is not None
                else "."
            ),
        ]
    if result["skipped"]:
        lines += ["", "## Skipped", ""]
        lines += [f"- {s['method']} {s['options'] or ''}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="tiny | bench512 | an open_clip name (random weights); default tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=None, help="images in the stream (default 16; --quick 6)")
    ap.add_argument("--classes", type=int, default=None, help="classes of the main table (default 100; --quick 10)")
    ap.add_argument("--methods", default=None, help="comma-separated registered methods (default: all)")
    ap.add_argument("--scaling-methods", default=None, help="methods of the scaling tables (default: all that ran)")
    ap.add_argument("--scale-classes", default="10,100,1000")
    ap.add_argument("--scale-views", default="16,32,64")
    ap.add_argument("--embedding-images", type=int, default=None, help="cached-embeddings section (0: skip)")
    ap.add_argument("--batch-size", type=int, default=1, help="images per chunk of the stream loop (default 1)")
    ap.add_argument("--workers", type=int, default=None, help="view-making threads (default: the library's)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--repeats", type=int, default=2, help="passes per measurement, fastest kept (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny model, 6 images, 10 classes: a couple of minutes")
    ap.add_argument("--out", default="perf_suite_out", help="folder for perf_suite.json and perf_suite.md")
    ap.add_argument("--work", default=None, help="scratch folder for images and caches (default: a temp dir)")
    ap.add_argument("--silent", action="store_true")
    args = ap.parse_args(argv)
    args.model = args.model or "tiny"
    args.images = args.images or (6 if args.quick else 16)
    args.classes = args.classes or (10 if args.quick else 100)
    if args.embedding_images is None:
        args.embedding_images = 500 if args.quick else 4000
    args.methods = [m for m in args.methods.split(",") if m] if args.methods else None
    args.scaling_methods = [m for m in args.scaling_methods.split(",") if m] if args.scaling_methods else None
    args.scale_classes = [int(c) for c in args.scale_classes.split(",") if c]
    args.scale_views = [int(v) for v in args.scale_views.split(",") if v]
    return args


def main(argv: Sequence[str] | None = None, model: Any = None) -> dict:
    """Run the suite and write its JSON and Markdown; ``model``: an already loaded model (tests)."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    result = run_suite(args, model)
    result["config"]["suite_seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf_suite.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "perf_suite.md").write_text(markdown(result))
    if not args.silent:
        print(markdown(result))
        print(f"wrote {out / 'perf_suite.json'} and {out / 'perf_suite.md'} in {result['config']['suite_seconds']} s")
    return result


if __name__ == "__main__":
    main()
