"""The dataset registry: one :class:`Reader` per built-in benchmark, found by name or alias.

A reader knows where its dataset usually lives under a root folder, how to read its layout
(docstring = the expected layout, quoted in every error), its class names, its expected sizes and
the prompt-template sets published for it. :func:`get_dataset` turns a reader + root into a
:class:`~vlm_tta.data.base.Dataset`; :func:`check_dataset` reports what is missing or unexpected
instead of raising.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, TypeVar

from ..errors import DatasetError
from .base import Dataset, PathLike, as_path
from .resources import classnames_file

__all__ = [
    "Reader",
    "Scan",
    "CheckReport",
    "register_dataset",
    "get_reader",
    "resolve_name",
    "list_datasets",
    "get_dataset",
    "check_dataset",
    "get_classnames",
    "get_templates_for",
]

_REGISTRY: dict[str, "Reader"] = {}
_ALIASES: dict[str, str] = {}


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def summarize(items: list[str], limit: int = 5) -> str:
    """``a, b, c and 7 more``."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


@dataclass
class Scan:
    """What a reader found in a dataset folder. ``problems`` are fatal for :func:`get_dataset`."""

    base: Path
    image_root: Optional[Path] = None
    samples: list = field(default_factory=list)
    classnames: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    found_classes: Optional[int] = None
    files: list = field(default_factory=list)  # files read (split files, variants.txt, ...)


@dataclass
class CheckReport:
    """Result of :func:`check_dataset`: counts against the expected ones, and what is wrong."""

    name: str
    split: str
    root: str
    base: Optional[str]
    expected_classes: Optional[int]
    found_classes: Optional[int]
    expected_images: Optional[int]
    found_images: int
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    files: list = field(default_factory=list)

    @property
    def counts_match(self) -> bool:
        ok_img = self.expected_images is None or self.expected_images == self.found_images
        ok_cls = (
            self.expected_classes is None or self.found_classes is None or self.expected_classes == self.found_classes
        )
        return ok_img and ok_cls

    @property
    def ok(self) -> bool:
        return not self.problems and not self.missing and self.counts_match

    def format(self, max_list: Optional[int] = 20) -> str:
        def num(x):
            return "?" if x is None else f"{x:,}"

        def mark(found, expected):
            if expected is None or found is None:
                return ""
            return "  ok" if found == expected else f"  MISMATCH ({found - expected:+,})"

        lines = [
            f"dataset  {self.name}  (split: {self.split})",
            f"root     {self.root}",
            f"found at {self.base if self.base else '-- not found --'}",
        ]
        for f in self.files:
            lines.append(f"read     {f}")
        lines += [
            "",
            f"{'':10}{'found':>10}{'expected':>10}",
            f"{'classes':10}{num(self.found_classes):>10}{num(self.expected_classes):>10}"
            + mark(self.found_classes, self.expected_classes),
            f"{'images':10}{num(self.found_images):>10}{num(self.expected_images):>10}"
            + mark(self.found_images, self.expected_images),
        ]

        def block(title, items):
            if not items:
                return
            lines.append("")
            lines.append(f"{title} ({len(items):,}):")
            shown = items if max_list is None else items[:max_list]
            lines.extend("  " + str(x).replace("\n", "\n    ") for x in shown)
            if len(shown) < len(items):
                lines.append(f"  ... and {len(items) - len(shown):,} more (use --all to list every one)")

        block("problems", self.problems)
        block("missing", self.missing)
        block("unexpected", self.unexpected)
        block("notes", self.notes)
        lines.append("")
        lines.append("OK" if self.ok else "NOT OK")
        return "\n".join(lines)


class Reader:
    """Base class of a built-in dataset reader. Subclasses set the class attributes below and
    implement :meth:`scan`; their docstring is the expected layout, quoted in errors."""

    name: str = ""
    title: str = ""
    aliases: tuple = ()
    kind: str = "classification"  # or "ood"
    splits: tuple = ("test",)
    split_sizes: dict = {}
    num_classes: Optional[int] = None
    classnames_stem: Optional[str] = None
    templates: dict = {}
    folder: str = ""  # the folder name people usually have under $DATA
    extra_folders: tuple = ()

    # -- layout / location ----------------------------------------------------------------------
    @property
    def layout(self) -> str:
        return inspect.cleandoc(type(self).__doc__ or "(no layout documented)")

    def fail(self, message: str) -> DatasetError:
        indented = "\n".join("    " + line for line in self.layout.splitlines())
        return DatasetError(f"{self.name}: {message}\n\nExpected layout of {self.title or self.name}:\n{indented}")

    def candidates(self, split: str) -> list[str]:
        """Folders (relative to the root) that may hold the dataset, tried in order."""
        out = [""]
        for f in (self.folder, *self.extra_folders):
            if f and f not in out:
                out.append(f)
        return out

    def looks_like(self, cand: Path, split: str) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def locate(self, root: PathLike, split: str) -> Path:
        root_p = as_path(root)
        if not root_p.exists():
            raise self.fail(f"dataset root {root_p} does not exist")
        if not root_p.is_dir():
            raise self.fail(f"dataset root {root_p} is not a folder")
        tried = []
        for rel in self.candidates(split):
            cand = root_p / rel if rel else root_p
            tried.append(str(cand))
            if cand.is_dir() and self.looks_like(cand, split):
                return cand
        raise self.fail(f"no {self.title or self.name} found under {root_p}; looked in: {summarize(tried, 8)}")

    def check_split(self, split: str) -> str:
        s = (split or "test").lower()
        if s not in self.splits:
            raise DatasetError(f"{self.name} has no split {split!r}; available: {', '.join(self.splits)}")
        return s

    # -- reading ----------------------------------------------------------------------------------
    def scan(self, base: Path, split: str, **kwargs) -> Scan:  # pragma: no cover - abstract
        raise NotImplementedError

    def _named_classes(self, classnames: str | Sequence[str], expected: int) -> list[str]:
        """Other names for the same labels: a shipped class-name file's stem (``"food101_tpt"``) or a list."""
        if isinstance(classnames, str):
            try:
                names = classnames_file(classnames)
            except (FileNotFoundError, OSError, DatasetError) as exc:
                raise DatasetError(f"{self.name}: no shipped class-name list {classnames!r} ({exc})") from exc
        else:
            names = [str(c) for c in classnames]
        if len(names) != expected:
            raise DatasetError(f"{self.name}: {len(names)} class names given for {expected} classes")
        return names

    def classnames(self) -> list[str]:
        if self.classnames_stem is None:
            raise DatasetError(f"{self.name} is an out-of-distribution set: it has no class names")
        return classnames_file(self.classnames_stem)

    def load(
        self, root: PathLike, split: str = "test", classnames: str | Sequence[str] | None = None, **kwargs
    ) -> Dataset:
        split = self.check_split(split)
        base = self.locate(root, split)
        scan = self.scan(base, split, **kwargs)
        if scan.problems:
            raise self.fail("\n".join(scan.problems))
        if not scan.samples:
            raise self.fail(f"no images found in {scan.image_root or base}")
        names = scan.classnames if classnames is None else self._named_classes(classnames, len(scan.classnames))
        return Dataset(
            scan.samples,
            names,
            name=self.name,
            split=split,
            root=scan.image_root or base,
            meta=scan.meta,
        )

    def check(self, root: PathLike, split: str = "test", **kwargs) -> CheckReport:
        split = self.check_split(split)
        report = CheckReport(
            name=self.name,
            split=split,
            root=str(root),
            base=None,
            expected_classes=self.num_classes,
            found_classes=None,
            expected_images=self.split_sizes.get(split),
            found_images=0,
        )
        try:
            base = self.locate(root, split)
        except DatasetError as exc:
            report.problems.append(str(exc).split("\n\nExpected layout")[0])
            report.notes.append("expected layout:\n" + self.layout)
            return report
        scan = self.scan(base, split, **kwargs)
        report.base = str(base)
        report.found_classes = scan.found_classes
        report.found_images = len(scan.samples)
        report.missing = list(scan.missing)
        report.unexpected = list(scan.unexpected)
        report.problems = list(scan.problems)
        report.notes = list(scan.notes)
        report.files = [str(f) for f in scan.files]
        return report

    def info(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "kind": self.kind,
            "aliases": list(self.aliases),
            "splits": list(self.splits),
            "num_classes": self.num_classes,
            "split_sizes": dict(self.split_sizes),
            "folder": self.folder,
            "templates": dict(self.templates),
            "layout": self.layout,
        }


R = TypeVar("R", bound=type)


def register_dataset(cls: R) -> R:
    """Class decorator: instantiate a :class:`Reader` subclass and register it by name/aliases."""
    reader = cls()
    key = _norm(reader.name)
    if not key:
        raise ValueError(f"{cls.__name__} has no name")
    if key in _REGISTRY or key in _ALIASES:
        raise ValueError(f"dataset name {reader.name!r} is already registered")
    _REGISTRY[key] = reader
    for alias in reader.aliases:
        a = _norm(alias)
        if a == key:
            continue
        if a in _REGISTRY or (a in _ALIASES and _ALIASES[a] != key):
            raise ValueError(f"alias {alias!r} of {reader.name} is already taken")
        _ALIASES[a] = key
    return cls


def resolve_name(name: str) -> str:
    """Canonical registry name for ``name`` or an alias (case-insensitive, ``-`` = ``_``)."""
    if not isinstance(name, str):
        raise DatasetError(f"dataset name must be a string, got {name!r}")
    key = _norm(name)
    if key in _REGISTRY:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    import difflib

    close = difflib.get_close_matches(key, list(_REGISTRY) + list(_ALIASES), n=3)
    hint = f"; did you mean {', '.join(_ALIASES.get(c, c) for c in close)}?" if close else ""
    raise DatasetError(
        f"unknown dataset {name!r}{hint} Built-in datasets: {', '.join(_REGISTRY)}. "
        "For your own data use ImageFolderDataset or CsvDataset."
    )


def get_reader(name: str) -> Reader:
    return _REGISTRY[resolve_name(name)]


def list_datasets(kind: Optional[str] = None) -> list[str]:
    """Names of the built-in datasets (``kind``: ``"classification"``, ``"ood"`` or all)."""
    return [n for n, r in _REGISTRY.items() if kind is None or r.kind == kind]


def get_dataset(name: str, root: PathLike, split: str = "test", **kwargs) -> Dataset:
    """Read built-in dataset ``name`` from ``root`` (the dataset's folder or the folder above it).

    ``split`` is ``"test"`` by default (ImageNet: the val images); CoOp datasets also have
    ``"train"`` and ``"val"``. Extra keyword arguments go to the reader (e.g. ``split_file=`` for a
    CoOp split JSON kept elsewhere, ``label_space="imagenet"`` for ImageNet-A/R labels in the
    1000-class space). Raises :class:`~vlm_tta.errors.DatasetError` naming the file and the
    expected layout when something is missing.
    """
    return get_reader(name).load(root, split=split, **kwargs)


def check_dataset(name: str, root: PathLike, split: str = "test", **kwargs) -> CheckReport:
    """Verify a dataset's layout without raising; see :class:`CheckReport`."""
    return get_reader(name).check(root, split=split, **kwargs)


def get_classnames(name: str) -> list[str]:
    """The class names (label order) of a built-in dataset, as the papers used them."""
    return get_reader(name).classnames()


def get_templates_for(name: str) -> dict[str, str]:
    """Template-set names published for a dataset: ``{"clip": ..., "coop": ...}``.

    ``"clip"`` is CLIP's per-dataset ensemble (openai/CLIP ``data/prompts.md``; the 80 ImageNet
    templates for the ImageNet family), ``"coop"`` CoOp's single hand-made template. Each value is
    the name of a file ``prompts/templates/<value>.txt`` that the template loader reads. Empty for
    OOD sets.
    """
    return dict(get_reader(name).templates)


def dataset_info(name: str) -> dict:
    """Facts about a built-in dataset: kind, aliases, splits, sizes, folder, templates, layout."""
    return get_reader(name).info()


def iter_readers() -> list[Reader]:
    """Every registered reader, in registration order."""
    return list(_REGISTRY.values())
