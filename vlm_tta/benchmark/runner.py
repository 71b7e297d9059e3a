"""The benchmark runner: a suite x methods x seeds, resumable, shardable, one JSON row per job.

Planning. Every (dataset, method, seed) of a suite is a *job* with a stable id
(:func:`~vlm_tta.benchmark.results.job_id`). Online methods get one job per seed (the seed is the
stream order); episodic methods do not depend on the order and get one job (seed ``None``). For the
OOD and noisy-TTA protocols a job also names its OOD / noisy set (and noisy fraction), and its
stream is the in-distribution set mixed with that set (:func:`vlm_tta.data.noisy_mix`, saved under
the run folder so it repeats).

Running. Jobs that read the same stream with the same prompts form a *pass*: all feature-level
methods of a pass run together through :func:`vlm_tta.engine.run_stream`, so each view embedding is
read (or encoded, the first time) once for all of them; a model-level method gets a pass of its own.
Passes are sharded (``shard=(i, n)``: every n-th pass), so several processes or machines can share one
output folder; online streams always stay whole. A finished job's row is written atomically and is
never recomputed: kill a run at any moment and run the same command again to finish it.

Under ``torchrun`` (``world=``), the ranks divide the work further: episodic jobs split their
images, online streams go whole to one rank (:mod:`vlm_tta.benchmark.distributed`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import VlmTtaError
from . import metrics
from .results import ROW_VERSION, ResultStore, environment, job_id
from .suites import DatasetSpec, Suite


class BenchmarkError(VlmTtaError, ValueError):
    """A benchmark cannot run as asked (missing datasets, bad method list or shard)."""


# --------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class MethodSpec:
    """A method and the options the user gave it (``tda``, ``zeroshot[score=mcm]``)."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        return f"{self.name}[{';'.join(f'{k}={v}' for k, v in self.options)}]"


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_methods(specs: str | Sequence[str], options: dict[str, dict] | None = None) -> list[MethodSpec]:
    """Method specs from ``"zeroshot,tda"`` / ``["zeroshot[score=mcm;mcm_temperature=2]", "tda"]``.

    ``options`` maps a method name (or ``"*"`` for every method that has the option) to extra
    options, as ``vlm-tta bench -o tda.alpha=2 -o view_seed=1`` gives them.
    """
    from ..methods import create_method, get_method_class
    from ..methods.base import parse_option_text

    items = _split_top(specs) if isinstance(specs, str) else [s for x in specs for s in _split_top(x)]
    if not items:
        raise BenchmarkError("no methods given; e.g. --methods zeroshot,tda")
    out = []
    for item in items:
        name, _, rest = item.partition("[")
        name = get_method_class(name.strip()).name
        opts: dict[str, Any] = {}
        if rest:
            if not rest.endswith("]"):
                raise BenchmarkError(f"method spec {item!r}: options go in brackets, e.g. zeroshot[score=mcm]")
            for pair in filter(None, (p.strip() for p in rest[:-1].split(";"))):
                if "=" not in pair:
                    raise BenchmarkError(f"method spec {item!r}: expected key=value inside the brackets, got {pair!r}")
                key, value = (x.strip() for x in pair.split("=", 1))
                opts[key] = parse_option_text(name, key, value)
        fields = _config_fields(name)
        for target, extra in (options or {}).items():
            for key, value in extra.items():
                if target == name or (target == "*" and key in fields):
                    opts.setdefault(key, parse_option_text(name, key, value) if isinstance(value, str) else value)
        create_method(name, **opts)  # validate now, before any work
        out.append(MethodSpec(name, tuple(sorted(opts.items()))))
    unknown_targets = set(options or ()) - {"*"} - {m.name for m in out}
    if unknown_targets:
        raise BenchmarkError(f"options given for method(s) not in the run: {', '.join(sorted(unknown_targets))}")
    return out


def _config_fields(name: str) -> set[str]:
    from ..methods import get_method_class

    cls = get_method_class(name).config_class
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def options_for(spec: MethodSpec, dataset: DatasetSpec) -> dict:
    """The spec's options plus what the suite decides for this dataset: ``preset`` = the dataset
    (per-dataset settings, where the method has them) and the suite's view recipe for methods that
    take it (:attr:`~vlm_tta.methods.Method.suite_view_option`: TPT, DiffTPT), for options the user
    did not set."""
    from ..methods import create_method, get_method_class

    opts = dict(spec.options)
    fields = _config_fields(spec.name)
    view_option = get_method_class(spec.name).suite_view_option
    if view_option and view_option not in opts and dataset.views:
        opts[view_option] = dataset.views
    if "preset" in fields and "preset" not in opts:
        try:
            create_method(spec.name, **{**opts, "preset": dataset.name})
            opts["preset"] = dataset.name
        except VlmTtaError:  # no preset for this dataset: the method's defaults
            pass
    return opts


# --------------------------------------------------------------------------- planning
@dataclass
class Job:
    dataset: DatasetSpec
    method: MethodSpec
    options: dict
    seed: int | None  # None: an episodic method, run once
    templates: Any
    extra: dict  # protocol extras: {"ood": name} / {"noisy": name, "noisy_fraction": f}
    identity: dict = field(default_factory=dict)
    id: str = ""


@dataclass
class Pass:
    """Jobs that share one stream (images, order) and one prompt set."""

    dataset: DatasetSpec
    stream_seed: int
    extra: dict
    templates: Any
    jobs: list[Job]
    pixels: bool  # a model-level method's own pass

    @property
    def key(self) -> str:
        methods = ",".join(sorted(j.method.label for j in self.jobs)) if self.pixels else "features"
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.extra.items()))
        return f"{self.dataset.name}|{extra}|{self.stream_seed}|{self.templates}|{methods}"


@dataclass
class Stream:
    """A pass's images in stream order: ``ds.path(order[k])`` is stream position ``k``."""

    ds: Any
    order: np.ndarray
    digest: str  # of the sample list and the order: processes that share work check they agree


@dataclass
class JobOutput:
    """What a job gave over its stream (or one process's share of it), by stream position."""

    positions: np.ndarray  # int64 stream positions of the predictions, increasing
    logits: np.ndarray  # float32, one row per position
    scores: np.ndarray | None  # the method's ID / clean score, when it gives one for every image
    noisy: np.ndarray | None  # the method's own noisy decisions, when it makes them
    reference_scores: np.ndarray | None  # noisy TTA: frozen zero-shot MSP, for ZS-NTTA's noise rule
    skipped: list  # (stream position, name, reason) of unreadable images
    seconds: float  # method time plus the pass's shared work (images, views, embeddings)
    method_seconds: float
    peak_memory_mb: float
    memory_kind: str
    run_info: dict


class Runner:
    """Run a suite; see the module docstring. ``log`` receives one line per finished row."""

    def __init__(
        self,
        suite: Suite,
        methods: Sequence[MethodSpec],
        model,
        data_root: str | Path,
        out: str | Path,
        *,
        seeds: Sequence[int] | None = None,
        limit: int | None = None,
        shard: tuple[int, int] = (0, 1),
        skip_missing: bool = False,
        templates: Any = None,
        batch_size: int = 64,
        cache=True,
        num_workers: int | None = None,
        progress: bool = False,
        noisy_fractions: Sequence[float] | None = None,
        log: Callable[[str], None] | None = None,
        world=None,
    ) -> None:
        from ..api import resolve_model

        if not methods:
            raise BenchmarkError("no methods to run")
        i, n = shard
        if not (isinstance(i, int) and isinstance(n, int) and n >= 1 and 0 <= i < n):
            raise BenchmarkError(f"shard must be i/n with 0 <= i < n; got {i}/{n}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise BenchmarkError(f"limit must be an integer >= 1; got {limit!r}")
        self.suite = suite
        self.methods = list(methods)
        self.model = resolve_model(model)
        self.data_root = Path(data_root).expanduser()
        self.store = ResultStore(out)
        self.seeds = tuple(seeds) if seeds else suite.seeds
        self.limit = limit
        self.shard = (i, n)
        self.skip_missing = skip_missing
        self.templates = templates
        self.batch_size = batch_size
        self.cache = cache
        self.num_workers = num_workers
        self.progress = progress
        self.noisy_fractions = tuple(noisy_fractions) if noisy_fractions else suite.noisy_fractions
        self.log = log or (lambda line: print(line, file=sys.stderr))
        self.world = world  # a vlm_tta.distributed.World: this process's share of a torchrun run
        self._datasets: dict[str, Any] = {}
        self._features = None
        self._env: dict | None = None

    # ----------------------------------------------------------------- data
    def check_data(self) -> list[str]:
        """Open every dataset the suite needs, before any work; returns the names that are missing
        (with ``skip_missing``) or raises one error naming each with its expected layout."""
        from ..data import get_dataset

        names = list(dict.fromkeys(self.suite.dataset_names + list(self.suite.ood) + list(self.suite.noisy)))
        problems, missing = [], []
        for name in names:
            try:
                self._datasets[name] = get_dataset(name, self.data_root)
            except VlmTtaError as err:
                missing.append(name)
                problems.append(f"- {name}: {err}")
        if missing and not self.skip_missing:
            raise BenchmarkError(
                f"{len(missing)} dataset(s) of suite {self.suite.name!r} are missing or incomplete under "
                f"{self.data_root}:\n" + "\n".join(problems) + "\nFix them (`vlm-tta datasets check NAME --root DIR` "
                "names every missing file), or pass --skip-missing to run the rest."
            )
        for name in missing:
            self.log(f"vlm-tta: skipping dataset {name} (missing; see `vlm-tta datasets check {name}`)")
        return missing

    def _base_dataset(self, spec: DatasetSpec):
        from ..data import subset

        ds = self._datasets[spec.name]
        if self.suite.subset:
            size, seed = self.suite.subset["size"], self.suite.subset.get("seed", 0)
            if size < len(ds):
                ds = subset(ds, size, seed=seed, path=self.store.root / "subsets" / f"{spec.name}_{size}_{seed}.json")
        if self.limit is not None and self.limit < len(ds):
            ds = subset(
                ds, self.limit, seed=0, path=self.store.root / "subsets" / f"{spec.name}_limit{self.limit}.json"
            )
        return ds

    def _stream_dataset(self, spec: DatasetSpec, extra: dict, seed: int):
        from ..data import noisy_mix

        ds = self._base_dataset(spec)
        other = extra.get("ood") or extra.get("noisy")
        if other is None:
            return ds
        fraction = 0.5 if "ood" in extra else extra["noisy_fraction"]
        tag = f"{spec.name}_{other}_{fraction:g}_{seed}" + (f"_limit{self.limit}" if self.limit else "")
        return noisy_mix(
            ds,
            self._datasets[other],
            noisy_fraction=fraction,
            seed=seed,
            path=self.store.root / "mixes" / f"{tag}.json",
        )

    # ----------------------------------------------------------------- planning
    def _extras(self) -> list[dict]:
        if self.suite.protocol == "ood":
            return [{"ood": name} for name in self.suite.ood if name in self._datasets]
        if self.suite.protocol == "ntta":
            return [
                {"noisy": name, "noisy_fraction": float(f)}
                for name in self.suite.noisy
                if name in self._datasets
                for f in self.noisy_fractions
            ]
        return [{}]

    def plan(self) -> list[Pass]:
        """Every pass of the run (all shards), in a stable order."""
        from ..methods import create_method, get_method_class
        from ..templates import template_set_id

        if not self._datasets:
            self.check_data()
        fingerprint = self.model.fingerprint
        passes: dict[str, Pass] = {}
        for spec in self.suite.datasets:
            if spec.name not in self._datasets:
                continue
            for extra in self._extras():
                for mspec in self.methods:
                    cls = get_method_class(mspec.name)
                    opts = options_for(mspec, spec)
                    method = create_method(mspec.name, **opts)
                    templates = self.templates or cls.default_templates or spec.templates
                    for seed in [None] if cls.episodic else self.seeds:
                        identity = {
                            "v": ROW_VERSION,
                            "suite": self.suite.name,
                            "protocol": self.suite.protocol,
                            "dataset": spec.name,
                            "subset": self.suite.subset,
                            "limit": self.limit,
                            "method": mspec.name,
                            "config": dataclasses.asdict(method.config)
                            if dataclasses.is_dataclass(method.config)
                            else None,
                            "model": fingerprint,
                            "templates": template_set_id(templates),
                            "views": repr(method.view_set()),
                            "seed": seed,
                            **extra,
                        }
                        job = Job(spec, mspec, opts, seed, templates, extra, identity, job_id(identity))
                        stream_seed = self.seeds[0] if seed is None else seed
                        p = Pass(spec, stream_seed, extra, templates, [job], cls.needs_pixels)
                        if p.key in passes and not cls.needs_pixels:
                            passes[p.key].jobs.append(job)
                        elif p.key in passes:
                            passes[f"{p.key}|{len(passes)}"] = p
                        else:
                            passes[p.key] = p
        return [passes[k] for k in sorted(passes)]

    # ----------------------------------------------------------------- running
    def run(self) -> dict:
        """Run this shard's unfinished jobs; returns counts (done before, run now, rows total).
        Under torchrun the ranks divide the shard's work (:mod:`vlm_tta.benchmark.distributed`)."""
        if self.world is not None and self.world.distributed:
            from .distributed import run_distributed

            return run_distributed(self, self.world)
        passes = self.plan()
        i, n = self.shard
        mine = [p for k, p in enumerate(passes) if k % n == i]
        before = sum(self.store.has(j.id) for p in mine for j in p.jobs)
        ran = 0
        for p in mine:
            todo = [j for j in p.jobs if not self.store.has(j.id)]
            if todo:
                self._run_pass(p, todo)
                ran += len(todo)
        return {"passes": len(mine), "jobs": sum(len(p.jobs) for p in mine), "already_done": before, "ran": ran}

    def _feature_store(self):
        from ..api import DEFAULT_PREFETCH
        from ..cache import as_cache
        from ..features import FeatureStore
        from ..views import default_num_workers

        if self._features is None:
            workers = default_num_workers() if self.num_workers is None else self.num_workers
            self._features = FeatureStore(
                self.model,
                as_cache(self.cache),
                encode_batch_size=self.batch_size,
                num_workers=workers,
                prefetch=DEFAULT_PREFETCH,  # views made ahead of the encoder (bit-identical results)
            )
        return self._features

    def _environment(self) -> dict:
        if self._env is None:
            self._env = environment()
        return self._env

    def _run_pass(self, p: Pass, jobs: list[Job]) -> None:
        """Run ``jobs`` over the pass's whole stream and write their rows."""
        stream = self.open_stream(p)
        for job, out in zip(jobs, self.compute(p, jobs, stream)):
            self.write_row(p, job, stream, out)

    def open_stream(self, p: Pass) -> Stream:
        """The pass's stream: its dataset and image order (the same in every process)."""
        ds = self._stream_dataset(p.dataset, p.extra, p.stream_seed)
        order = ds.order(p.stream_seed)
        digest = hashlib.sha256(f"{ds.fingerprint()}|".encode() + order.astype("<i8").tobytes()).hexdigest()
        return Stream(ds, order, digest[:20])

    def compute(self, p: Pass, jobs: list[Job], stream: Stream, positions: np.ndarray | None = None) -> list[JobOutput]:
        """Run ``jobs`` over the stream positions ``positions`` (default: all, in order) through
        :func:`vlm_tta.engine.run_stream`; one :class:`JobOutput` per job, in stream positions."""
        from ..engine import run_stream
        from ..methods import MethodContext, create_method

        store = self._feature_store()
        ds, order = stream.ds, stream.order
        positions = np.arange(len(order), dtype=np.int64) if positions is None else np.asarray(positions, np.int64)
        sources = [ds.path(int(order[k])) for k in positions]
        classes = store.class_features(ds.classnames, p.templates, allow_duplicates=True)
        vlm = self.model

        def ctx():
            return MethodContext(classes, vlm.logit_scale, vlm.logit_bias, list(ds.classnames), vlm, store)

        runs = [(create_method(j.method.name, **j.options), ctx()) for j in jobs]
        reference = None
        if self.suite.protocol == "ntta":  # ZS-NTTA's noise rule for methods that do not flag noise
            reference = create_method("zeroshot", score="msp")
            runs.append((reference, ctx()))
        cuda = vlm.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(vlm.device)
        outs = run_stream(
            runs,
            store,
            sources,
            [ds.relpath(int(order[k])) for k in positions],
            batch_size=self.batch_size,
            on_error="skip",
            progress=self.progress,
        )
        if cuda:
            memory, memory_kind = torch.cuda.max_memory_allocated(vlm.device) / 2**20, "cuda_max_allocated"
        else:
            memory, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"
        reference_by_pos = {}
        if reference is not None:
            reference_by_pos = {int(k): pr.score for k, pr in zip(outs[-1].positions, outs[-1].predictions)}
        results = []
        for (method, _), out in zip(runs, outs):
            local = np.asarray(out.positions, dtype=np.int64)
            preds = out.predictions
            results.append(
                JobOutput(
                    positions=positions[local],
                    logits=torch.stack([pr.logits.float() for pr in preds]).numpy()
                    if preds
                    else np.zeros((0, len(ds.classnames)), np.float32),
                    scores=np.array([pr.score for pr in preds], dtype=np.float64)
                    if preds and all(pr.score is not None for pr in preds)
                    else None,
                    noisy=np.array([bool(pr.noisy) for pr in preds])
                    if preds and all(pr.noisy is not None for pr in preds)
                    else None,
                    reference_scores=np.array([reference_by_pos[int(k)] for k in local], dtype=np.float64)
                    if reference is not None
                    else None,
                    skipped=[(int(positions[k]), name, reason) for k, name, reason in out.skipped],
                    seconds=out.method_seconds + out.shared_seconds,
                    method_seconds=out.method_seconds,
                    peak_memory_mb=memory,
                    memory_kind=memory_kind,
                    run_info=_jsonable(method.run_info()),
                )
            )
        return results[: len(jobs)]

    def write_row(self, p: Pass, job: Job, stream: Stream, out: JobOutput, parts: int = 1) -> None:
        """Write ``job``'s row and arrays from its output over the whole stream (``parts``: how many
        processes computed it, see :mod:`vlm_tta.benchmark.distributed`)."""
        from ..templates import template_set_id

        vlm = self.model
        ds, order = stream.ds, stream.order
        pos = out.positions
        y = ds.labels[order][pos]
        logits = out.logits
        pred = logits.argmax(1) if len(logits) else np.zeros(0, np.int64)
        n_img = len(pos)
        config = {
            "method_options": dict(job.options),
            "method_config": job.identity["config"],
            "templates": template_set_id(job.templates),
            "model_fingerprint": vlm.fingerprint,
            "batch_size": self.batch_size,
            "stream_seed": p.stream_seed,
            **self._environment(),
        }
        if parts > 1:
            config["split_over_ranks"] = parts
        row = {
            "job_id": job.id,
            "version": ROW_VERSION,
            "suite": self.suite.name,
            "protocol": self.suite.protocol,
            "dataset": job.dataset.name,
            "method": job.method.name,
            "method_label": job.method.label,
            "options": dict(job.method.options),
            "seed": job.seed,
            "model": vlm.name,
            "prompts": template_set_id(job.templates),
            "views": job.identity["views"],
            "limit": self.limit,
            "subset": self.suite.subset,
            "n_images": n_img,
            "n_skipped": len(out.skipped),
            "seconds_per_image": out.seconds / max(n_img, 1),
            "method_seconds_per_image": out.method_seconds / max(n_img, 1),
            "peak_memory_mb": round(out.peak_memory_mb, 1),
            "memory_kind": out.memory_kind,
            "config": config,
            "run_info": out.run_info,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **job.extra,
        }
        row.update(self._metrics(y, logits, pred, out.scores, out.noisy, out.reference_scores))
        # stream position, the image's index in the (sub)dataset of the stream, its label, the answer
        arrays = {
            "positions": pos,
            "index": order[pos],
            "labels": y,
            "pred": pred,
            "logits": logits.astype(np.float32),
        }
        if out.scores is not None:
            arrays["scores"] = out.scores
        if out.noisy is not None:
            arrays["noisy"] = out.noisy
        self.store.write(row, arrays)
        self.log(_summary(row))

    def _metrics(self, y, logits, pred, scores, noisy, reference_scores) -> dict:
        from ..data import NOISY_LABEL

        clean = y != NOISY_LABEL
        out: dict[str, Any] = {}
        if clean.any():
            out["top1"] = metrics.top1_accuracy(pred[clean], y[clean])
            probs = torch.from_numpy(logits[clean]).double().softmax(-1).numpy()
            out["ece"] = metrics.expected_calibration_error(probs, y[clean])
        if self.suite.protocol == "ood":
            out["id_top1"] = out.get("top1")
            if scores is None:
                out["note"] = "the method returns no score: no OOD metrics"
            elif clean.all() or not clean.any():
                out["note"] = "the stream has only one kind of sample: no OOD metrics"
            else:
                out["fpr95"] = metrics.fpr_at_tpr(scores[clean], scores[~clean], tpr=0.95)
                out["auroc"] = metrics.auroc(scores[clean], scores[~clean])
                out["aupr"] = metrics.aupr(scores[clean], scores[~clean])
        if self.suite.protocol == "ntta":
            if noisy is None:  # ZS-NTTA's rule for its baselines: frozen zero-shot 1 - MSP against Otsu
                noisy = metrics.otsu_noisy_flags(1.0 - reference_scores, batch_size=NOISE_RULE_BATCH)
                out["noise_rule"] = "zs_ntta_otsu"
            else:
                out["noise_rule"] = "method"
            acc = metrics.ntta_accuracies(pred, y, noisy, ~clean)._asdict()
            out.update({k: (None if math.isnan(v) else v) for k, v in acc.items()})
        return out


#: ZS-NTTA runs its ZS-CLIP baseline (and so the noise rule of every baseline) in batches of 64.
NOISE_RULE_BATCH = 64


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def _summary(row: dict) -> str:
    parts = [row["dataset"]]
    for key in ("ood", "noisy"):
        if row.get(key):
            parts.append(f"vs {row[key]}" + (f" @{row['noisy_fraction']:.0%}" if key == "noisy" else ""))
    parts.append(row["method_label"])
    if row.get("seed") is not None:
        parts.append(f"seed {row['seed']}")
    stats = []
    if row.get("top1") is not None:
        stats.append(f"top-1 {100 * row['top1']:.2f}%")
    for key, name in (("fpr95", "FPR95"), ("auroc", "AUROC"), ("acc_h", "Acc_H")):
        if row.get(key) is not None:
            stats.append(f"{name} {100 * row[key]:.2f}%")
    stats.append(f"{row['n_images']} images, {row['seconds_per_image'] * 1000:.1f} ms/img")
    return "done: " + " ".join(parts) + " -- " + ", ".join(stats)
