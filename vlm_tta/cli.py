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


def _parse_value(text: str):
    """``--option k=v`` values: JSON when it parses (numbers, booleans, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_options(pairs: Sequence[str]) -> dict:
    options = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise SystemExit(f"vlm-tta: --option expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        options[key.strip().replace("-", "_")] = _parse_value(value)
    return options


def _read_classes(args) -> list[str]:
    names: list[str] = []
    if args.classes:
        names += [c.strip() for c in args.classes.split(",")]
    if args.classes_file:
        path = Path(args.classes_file)
        if not path.is_file():
            raise SystemExit(f"vlm-tta: class file not found: {path}")
        names += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise SystemExit("vlm-tta: give the class names with --classes a,b,c or --classes-file FILE (one per line)")
    return names


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """Plain aligned text table (first column left-aligned, the others too; numbers pre-formatted)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _cmd_classify(args) -> int:
    from .api import classify, resolve_model
    from .methods import create_method

    classes = _read_classes(args)
    options = _parse_options(args.option)
    create_method(args.method, **options)  # fail on a bad method or option before loading a model
    pretrained = None if args.pretrained.lower() == "none" else args.pretrained
    result = classify(
        args.images,
        classes,
        method=args.method,
        model=resolve_model(args.model, device=args.device, pretrained=pretrained),
        templates=args.templates,
        device=args.device,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        cache=not args.no_cache,
        progress=None if not args.json else False,
        **options,
    )
    rows = result.to_rows(names=list(args.images), top_k=min(args.top_k, len(classes)))
    if args.json:
        print(json.dumps({"method": result.method, "info": result.info, "predictions": rows}, indent=2))
        return 0
    header = ["image", "label", "prob"] + (["score"] if result.scores is not None else []) + ["runner-up"]
    table = []
    for row in rows:
        runner = f"{row['top'][1]['label']} ({row['top'][1]['prob']:.3f})" if len(row["top"]) > 1 else ""
        cells = [row["image"], row["label"], f"{row['prob']:.3f}"]
        if result.scores is not None:
            cells.append(f"{row['score']:.4f}")
        table.append(cells + [runner])
    print(format_table(table, header))
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

    parser = argparse.ArgumentParser(prog="vlm-tta", description="Test-time adaptation of vision-language models.")
    parser.add_argument("--version", action="version", version=f"vlm-tta {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("classify", help="classify images with a test-time method")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--classes", help="comma-separated class names")
    p.add_argument("--classes-file", help="file with one class name per line")
    p.add_argument("--method", default="zeroshot", help="method name (see `vlm-tta methods`)")
    p.add_argument("--model", default=None, help="model spec, e.g. ViT-B-16@openai or hf:/path/to/dir")
    p.add_argument(
        "--pretrained", default="default", help="pretrained tag or checkpoint path; 'none' for random weights"
    )
    p.add_argument("--templates", default=None, help="template set name, or a file with one template per line")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE", help="method option (repeatable)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_classify)

    sub.add_parser("methods", help="list the methods and their options").set_defaults(func=_cmd_methods)
    sub.add_parser("templates", help="list the prompt template sets").set_defaults(func=_cmd_templates)

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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except VlmTtaError as exc:
        print(f"vlm-tta: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `vlm-tta cache info --json | head -1`
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
