"""The benchmark verbs of ``vlm-tta``: ``bench`` (any suite), ``ood`` and ``ntta`` (the detection
protocols, with their suites as defaults). ``python eval/<suite>.py ...`` runs the same code."""

from __future__ import annotations

import argparse
import sys

PROTOCOL_DEFAULTS = {"bench": None, "ood": "ood_detection", "ntta": "noisy_tta"}


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n such as 0/4, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"expected i/n with 0 <= i < n, got {text!r}")
    return i, n


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _fraction_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated fractions such as 0,0.25,0.5, got {text!r}"
        ) from None
    if not values or any(not 0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"noisy fractions must lie in [0, 1), got {text!r}")
    return values


def add_parsers(sub) -> None:
    from ..cli import add_model_arguments, int_at_least
    from .suites import list_suites

    helps = {
        "bench": "run a benchmark suite (natural_shift, cross_dataset, ...) and write one JSON row per job",
        "ood": "zero-shot OOD detection: FPR95, AUROC, AUPR per OOD set (suite ood_detection)",
        "ntta": "zero-shot noisy TTA: Acc_S, Acc_N, Acc_H per noisy set and fraction (suite noisy_tta)",
    }
    for verb, default_suite in PROTOCOL_DEFAULTS.items():
        p = sub.add_parser(verb, help=helps[verb])
        p.add_argument(
            "--suite",
            required=default_suite is None,
            default=default_suite,
            help=f"a built-in suite ({', '.join(list_suites())}) or a suite .yaml file",
        )
        p.add_argument("--methods", default=None, help="comma-separated methods, e.g. zeroshot,tda,zeroshot[score=mcm]")
        p.add_argument("--data-root", required=True, help="folder holding the datasets (see `vlm-tta datasets`)")
        p.add_argument("--out", required=True, help="run folder: rows/, predictions/, subsets/ (resumable)")
        p.add_argument("--seeds", type=_int_list, default=None, help="stream orders of online methods, e.g. 0,1,2")
        p.add_argument("--limit", type=int_at_least(1), default=None, help="a seeded subset of N images per dataset")
        p.add_argument(
            "--shard", type=_shard, default=(0, 1), help="every n-th pass from i: i/n (torchrun's ranks divide it)"
        )
        p.add_argument("--skip-missing", action="store_true", help="run the datasets that are there")
        p.add_argument("--templates", default=None, help="override the suite's prompt set for every dataset")
        p.add_argument(
            "--option", "-o", action="append", metavar="[METHOD.]KEY=VALUE", help="method option (repeatable)"
        )
        if verb == "ntta":
            p.add_argument("--noisy-fractions", type=_fraction_list, default=None, help="e.g. 0,0.25,0.5,0.75")
        add_model_arguments(p)
        g = p.add_argument_group("running")
        g.add_argument("--batch-size", type=int_at_least(1), default=64, help="images per chunk (default 64)")
        g.add_argument("--num-workers", type=int_at_least(0), default=None, help="threads making views")
        g.add_argument("--cache-dir", default=None, help="embedding cache directory")
        g.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
        g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars")
        p.set_defaults(func=_cmd_bench, verb=verb)
    add_report_parser(sub)


def add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="tables (Markdown, CSV), plots and an HTML page from run folders")
    p.add_argument("runs", nargs="+", help="run folders written by vlm-tta bench / ood / ntta")
    p.add_argument("--out", default=None, help="where to write the report (default: the first run's report/)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    from .report import write_report

    written = write_report(args.runs, args.out)
    md = written["md"][0]
    print(md.read_text(encoding="utf-8"))
    print(
        f"vlm-tta: wrote {md.name}, {written['csv'][0].name}, {len(written['png'])} plot(s) and "
        f"{written['html'][0].name} in {md.parent}",
        file=sys.stderr,
    )
    return 0


def _method_options(pairs) -> dict[str, dict]:
    from ..cli import CliError

    out: dict[str, dict] = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise CliError(f"-o/--option expects [method.]key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        method, _, key = key.strip().rpartition(".")
        out.setdefault(method or "*", {})[key.replace("-", "_")] = value
    return out


def _cmd_bench(args) -> int:
    from ..distributed import torchrun_world

    with torchrun_world(args.device) as world:  # one process, or a rank of a torchrun world
        return _bench(args, world)


def _bench(args, world) -> int:
    from ..cli import load_model_from_args
    from .runner import Runner, parse_methods
    from .suites import load_suite

    suite = load_suite(args.suite)
    if args.verb in ("ood", "ntta") and suite.protocol != args.verb:
        from .runner import BenchmarkError

        raise BenchmarkError(f"suite {suite.name!r} is a {suite.protocol!r} suite; use `vlm-tta bench` for it")
    methods = parse_methods(args.methods or list(suite.methods), _method_options(args.option))
    if world.distributed:
        args.device = world.device
    model = load_model_from_args(args)
    cache = False
    if not args.no_cache:
        cache = True if args.cache_dir is None else args.cache_dir
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    prefix = f"[{world.label}] " if world.distributed else ""
    runner = Runner(
        suite,
        methods,
        model,
        args.data_root,
        args.out,
        seeds=args.seeds,
        limit=args.limit,
        shard=args.shard,
        skip_missing=args.skip_missing,
        templates=args.templates,
        batch_size=args.batch_size,
        cache=cache,
        num_workers=args.num_workers,
        progress=progress and world.rank == 0,  # one bar: rank 0's
        noisy_fractions=getattr(args, "noisy_fractions", None),
        log=lambda line: print(prefix + line, file=sys.stderr),
        world=world,
    )
    counts = runner.run()
    if world.rank == 0:
        ranks = f" over {world.size} ranks" if world.distributed else ""
        print(
            f"vlm-tta: {counts['ran']} row(s) written, {counts['already_done']} already done, "
            f"{counts['jobs']} job(s) in {counts['passes']} pass(es) of shard {args.shard[0]}/{args.shard[1]}"
            f"{ranks}; rows in {runner.store.rows_dir}",
            file=sys.stderr,
        )
    return 0
