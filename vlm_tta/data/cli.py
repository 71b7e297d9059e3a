"""The ``vlm-tta datasets`` command: list the built-in datasets, show one, check a layout.

    vlm-tta datasets                          # same as: vlm-tta datasets list
    vlm-tta datasets list [--kind ood]
    vlm-tta datasets info NAME                # aliases, sizes, templates, expected layout
    vlm-tta datasets check NAME --root DIR [--split test] [--all]

``check`` exits 0 when the layout is complete and the counts match the expected ones, 1 when
something is missing or unexpected, 2 on a usage error (unknown dataset or split).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, TextIO

from ..errors import DatasetError

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``datasets`` verb to an ``argparse`` sub-parser collection; returns its parser."""
    p = subparsers.add_parser(
        "datasets",
        help="list built-in datasets or check a dataset folder",
        description="List the built-in datasets, show one, or verify a dataset folder's layout.",
    )
    sub = p.add_subparsers(dest="datasets_command", metavar="{list,info,check}")
    p_list = sub.add_parser("list", help="list the built-in datasets (default)")
    p_list.add_argument(
        "--kind", choices=["classification", "ood"], default=None, help="only classification or only OOD sets"
    )
    p_info = sub.add_parser("info", help="show a dataset's facts and expected layout")
    p_info.add_argument("name", help="dataset name or alias, e.g. imagenet_a or A")
    p_check = sub.add_parser("check", help="verify a dataset folder and print counts against the expected ones")
    p_check.add_argument("name", help="dataset name or alias, e.g. imagenet_a or A")
    p_check.add_argument("--root", required=True, help="the dataset's folder, or the folder above it")
    p_check.add_argument("--split", default="test", help="split to check (default: test)")
    p_check.add_argument("--all", action="store_true", help="list every missing/unexpected file, not the first 20")
    p.set_defaults(func=run, datasets_command=None)
    return p


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header).rstrip(), fmt.format(*["-" * w for w in widths]).rstrip()]
    lines += [fmt.format(*map(str, r)).rstrip() for r in rows]
    return "\n".join(lines)


def _list(kind: Optional[str], out: TextIO) -> int:
    from . import get_reader, list_datasets

    rows = []
    for name in list_datasets(kind):
        r = get_reader(name)
        size = r.split_sizes.get("test")
        rows.append(
            [
                name,
                r.kind,
                "-" if r.num_classes is None else str(r.num_classes),
                "?" if size is None else f"{size:,}",
                ",".join(r.splits),
                r.folder,
                ", ".join(r.aliases[:4]) + (" ..." if len(r.aliases) > 4 else ""),
            ]
        )
    print(_table(rows, ["NAME", "KIND", "CLASSES", "TEST IMAGES", "SPLITS", "FOLDER", "ALIASES"]), file=out)
    print("\nCheck a folder with: vlm-tta datasets check NAME --root DIR", file=out)
    return 0


def _info(name: str, out: TextIO) -> int:
    from . import dataset_info

    info = dataset_info(name)
    sizes = ", ".join(f"{k} {v:,}" for k, v in info["split_sizes"].items()) or "?"
    templates = ", ".join(f"{k}: {v}" for k, v in info["templates"].items()) or "none"
    lines = [
        f"name       {info['name']}  ({info['title']})",
        f"kind       {info['kind']}",
        f"aliases    {', '.join(info['aliases']) or '-'}",
        f"classes    {info['num_classes'] if info['num_classes'] is not None else '- (OOD set)'}",
        f"splits     {', '.join(info['splits'])}",
        f"sizes      {sizes}",
        f"templates  {templates}",
        "",
        "expected layout:",
        *("    " + ln for ln in info["layout"].splitlines()),
    ]
    print("\n".join(lines), file=out)
    return 0


def run(args: argparse.Namespace, out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> int:
    """Run the ``datasets`` verb; returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    cmd = getattr(args, "datasets_command", None) or "list"
    try:
        if cmd == "list":
            return _list(getattr(args, "kind", None), out)
        if cmd == "info":
            return _info(args.name, out)
        if cmd == "check":
            from . import check_dataset

            report = check_dataset(args.name, args.root, split=args.split)
            print(report.format(max_list=None if args.all else 20), file=out)
            return 0 if report.ok else 1
    except DatasetError as exc:
        print(f"error: {exc}", file=err)
        return 2
    print(f"error: unknown datasets command {cmd!r}", file=err)
    return 2
