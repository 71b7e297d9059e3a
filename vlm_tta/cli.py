"""The ``vlm-tta`` command: one verb per task.

vlm-tta classify IMG... --classes cat,dog [--method zeroshot] [--model ViT-B-16@openai] [--json]
vlm-tta methods                  list the registered methods and their options
vlm-tta templates                list the prompt template sets
vlm-tta cache info|clear         the shared embedding cache
vlm-tta datasets [check NAME --root DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from .errors import VlmTtaError


class CliError(VlmTtaError):
    """A command-line usage problem (a missing file, a malformed flag value)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``vlm-tta classify: error: ... (see vlm-tta classify --help)``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _parse_options(method: str, pairs: Sequence[str]) -> dict:
    """``-o key=value`` pairs, each value converted to the type the method's config declares."""
    from .methods.base import get_method_class, parse_option_text

    get_method_class(method)  # an unknown method is reported before its options
    options = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise CliError(f"-o/--option expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise CliError(f"-o/--option expects key=value, got {pair!r}")
        options[key] = parse_option_text(method, key, value)
    return options


def read_text_lines(path: Path, what: str) -> list[str]:
    """Non-blank, stripped lines of a UTF-8 text file (a byte-order mark is dropped, not read as text)."""
    if not path.is_file():
        raise CliError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise CliError(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_classes(args) -> list[str]:
    names: list[str] = []
    if args.classes:
        names += [c.strip() for c in args.classes.split(",")]
    if args.classes_file:
        names += read_text_lines(Path(args.classes_file), "class file")
    if not names:
        raise CliError("give the class names with --classes a,b,c or --classes-file FILE (one per line)")
    return names


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """Plain aligned text table (first column left-aligned, the others too; numbers pre-formatted)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def cache_summary(stats: dict) -> str:
    """One line saying what the cache served and what was computed."""
    return (
        f"cache: class embeddings {stats['class_hits']} cached, {stats['class_misses']} computed; "
        f"view embeddings {stats['view_hits']} cached, {stats['view_misses']} computed"
    )


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model flags shared by every verb that loads a backbone (classify, bench, ood, ntta)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="model spec, e.g. ViT-B-16@openai or hf:/path/to/dir")
    g.add_argument(
        "--pretrained", default="default", help="pretrained tag or checkpoint path; 'none' for random weights"
    )
    g.add_argument("--seed", type=int_at_least(0), default=0, help="seed of random weights (--pretrained none)")
    g.add_argument("--tokenizer", default=None, help="open_clip: directory with Hugging Face tokenizer files")
    g.add_argument("--trust-remote-code", action="store_true", help="let transformers run the model repo's code")
    g.add_argument("--precision", choices=["fp32", "amp", "amp_bf16"], default=None, help="default: amp on CUDA")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--download-dir", default=None, help="where open_clip / transformers keep downloaded weights")


def load_model_from_args(args):
    """The backbone the model flags describe (see :func:`add_model_arguments`)."""
    from .api import resolve_model

    pretrained = None if args.pretrained.lower() == "none" else args.pretrained
    load = {}
    if args.tokenizer:
        load["tokenizer"] = args.tokenizer
    if args.trust_remote_code:
        load["trust_remote_code"] = True
    if args.precision:
        load["precision"] = args.precision
    if args.download_dir:
        load["cache_dir"] = args.download_dir
    return resolve_model(args.model, device=args.device, pretrained=pretrained, seed=args.seed, **load)


def _cmd_classify(args) -> int:
    from .api import classify

    classes = _read_classes(args)
    options = _parse_options(args.method, args.option)
    from .methods import create_method

    create_method(args.method, **options)  # fail on a bad option before loading a model
    model = load_model_from_args(args)
    result = classify(
        args.images,
        classes,
        method=args.method,
        model=model,
        templates=args.templates,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        cache=not args.no_cache,
        progress=args.progress if args.progress is not None else (None if not args.json else False),
        num_workers=args.num_workers,
        allow_duplicate_classnames=args.allow_duplicate_classes,
        on_error=args.on_error,
        exif_transpose=not args.ignore_exif,
        prefetch=args.prefetch,
        **options,
    )
    if not args.quiet:
        print(f"vlm-tta: {cache_summary(result.info['cache'])}", file=sys.stderr)
    rows = result.to_rows(names=list(args.images), top_k=min(args.top_k, len(classes)))
    if args.json:
        print(json.dumps({"method": result.method, "info": result.info, "predictions": rows}, indent=2))
        return 0
    header = ["image", "label", "prob"]
    header += ["score"] if result.scores is not None else []
    header += ["noisy"] if result.noisy is not None else []
    header += ["runner-up"] if args.top_k > 1 else []
    table = []
    for row in rows:
        cells = [row["image"], row["label"], f"{row['prob']:.3f}"]
        if result.scores is not None:
            cells.append(f"{row['score']:.4f}")
        if result.noisy is not None:
            cells.append("yes" if row["noisy"] else "no")
        if args.top_k > 1:
            cells.append(f"{row['top'][1]['label']} ({row['top'][1]['prob']:.3f})" if len(row["top"]) > 1 else "")
        table.append(cells)
    print(format_table(table, header))
    for skipped in result.info["skipped"]:
        print(f"vlm-tta: skipped {skipped['image']}: {skipped['error']}", file=sys.stderr)
    return 0


def _cmd_methods(args) -> int:
    from .methods import get_method_class, list_methods

    rows = []
    for name in list_methods():
        cls = get_method_class(name)
        options = []
        if dataclasses.is_dataclass(cls.config_class):
            options = [f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.config_class)]
        kind = "online" if not cls.episodic else "episodic"
        level = "pixels" if cls.needs_pixels else "features"
        rows.append([name, kind, level, ", ".join(options)])
    print(format_table(rows, ["method", "kind", "needs", "options (defaults)"]))
    return 0


def _cmd_templates(args) -> int:
    from .templates import get_templates, list_template_sets

    rows = [[name, str(len(get_templates(name))), get_templates(name)[0]] for name in list_template_sets()]
    print(format_table(rows, ["set", "templates", "first"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="vlm-tta", description="Test-time adaptation of vision-language models.")
    parser.add_argument("--version", action="version", version=f"vlm-tta {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("classify", help="classify images with a test-time method")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--classes", help="comma-separated class names")
    p.add_argument("--classes-file", help="file with one class name per line (UTF-8)")
    p.add_argument("--method", default="zeroshot", help="method name (see `vlm-tta methods`)")
    p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE", help="method option (repeatable)")
    add_model_arguments(p)
    g = p.add_argument_group("prompts and images")
    g.add_argument("--templates", default=None, help="template set name, or a file with one template per line")
    g.add_argument(
        "--allow-duplicate-classes",
        action="store_true",
        help="accept class names that repeat or that the tokenizer cannot tell apart",
    )
    g.add_argument(
        "--on-error", choices=["raise", "skip"], default=None, help="unreadable images: stop (default) or skip"
    )
    g.add_argument("--ignore-exif", action="store_true", help="do not turn photos upright by their EXIF orientation")
    g = p.add_argument_group("running")
    g.add_argument("--batch-size", type=int_at_least(1), default=64, help="images per chunk (default 64)")
    g.add_argument("--num-workers", type=int_at_least(0), default=None, help="threads making views")
    g.add_argument(
        "--prefetch",
        type=int_at_least(0),
        default=None,
        help="images whose views are made ahead of the encoder (default 2; 0: off; results are identical)",
    )
    g.add_argument("--cache-dir", default=None, help="embedding cache directory")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="show a progress bar")
    g = p.add_argument_group("output")
    g.add_argument("--top-k", type=int_at_least(1), default=3, help="classes listed per image in --json")
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")
    g.add_argument("--quiet", "-q", action="store_true", help="do not print the cache summary on stderr")
    p.set_defaults(func=_cmd_classify)

    sub.add_parser("methods", help="list the methods and their options").set_defaults(func=_cmd_methods)
    sub.add_parser("templates", help="list the prompt template sets").set_defaults(func=_cmd_templates)

    from .benchmark.cli import add_parsers as add_benchmark_parsers

    add_benchmark_parsers(sub)
    from .cache import add_parser as add_cache_parser

    add_cache_parser(sub)
    try:
        from .data.cli import add_parser as add_datasets_parser
    except ImportError:  # pragma: no cover - the datasets verb arrives with vlm_tta.data
        pass
    else:
        add_datasets_parser(sub)
    from .diffusion import add_parser as add_generate_parser

    add_generate_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed on one line
        return done.code if isinstance(done.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    # Warnings as one line each, in the CLI's voice (no file:line of library code).
    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *a, **k: f"vlm-tta: warning: {message}\n"
    try:
        return int(args.func(args) or 0)
    except VlmTtaError as exc:
        print(f"vlm-tta: error: {exc.render('cli')}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `vlm-tta cache info --json | head -1`
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("vlm-tta: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a CLI user gets one line; --debug shows the traceback
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"vlm-tta: error: unexpected {type(exc).__name__}: {first} (run with --debug for the traceback, and "
            "please report it)",
            file=sys.stderr,
        )
        return 1
    finally:
        warnings.formatwarning = previous


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
