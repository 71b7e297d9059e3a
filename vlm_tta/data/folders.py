"""Scanning folders of images: one folder per class, or a whole tree of images."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .base import is_image_file

WNID_RE = re.compile(r"^n\d{8}$")


def _listdir(path: Path) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def has_wnid_folders(path: Path) -> bool:
    try:
        return any(WNID_RE.match(e.name) and _is_dir(e) for e in _listdir(path))
    except OSError:
        return False


@dataclass
class FolderScan:
    """Result of :func:`scan_class_folders`."""

    samples: list = field(default_factory=list)  # (abs path, label), class by class
    found: dict = field(default_factory=dict)  # label -> folder name
    missing: list = field(default_factory=list)  # expected folder names absent ("n0123/")
    unexpected_folders: list = field(default_factory=list)  # class-like folders not expected
    unexpected_files: list = field(default_factory=list)  # non-image files, nested folders
    empty: list = field(default_factory=list)  # class folders with no image
    loose_images: int = 0  # images lying directly in the base folder


def scan_class_folders(
    base: Path,
    label_of: Callable[[str], Optional[int]],
    expected: Optional[dict] = None,
) -> FolderScan:
    """Scan ``base/<class folder>/<image>``.

    ``label_of(folder name)`` gives the label of a folder or ``None`` when the folder is not a
    class of this dataset (reported as unexpected). ``expected`` maps label -> folder name for the
    missing-folder report. Images inside a class folder are sorted by file name; classes are
    emitted in label order, so the sample order does not depend on the file system.
    """
    out = FolderScan()
    per_label: dict[int, list[str]] = {}
    for entry in _listdir(base):
        if entry.name.startswith("."):
            continue
        if not _is_dir(entry):
            if is_image_file(entry.name):
                out.loose_images += 1
            continue  # README.txt and friends at the top are fine
        label = label_of(entry.name)
        if label is None:
            out.unexpected_folders.append(entry.name + "/")
            continue
        if label in out.found:
            out.unexpected_folders.append(f"{entry.name}/ (same class as {out.found[label]}/)")
            continue
        out.found[label] = entry.name
        images: list[str] = []
        for f in _listdir(Path(entry.path)):
            if f.name.startswith("."):
                continue
            if is_image_file(f.name) and _is_file(f):
                images.append(os.path.join(base, entry.name, f.name))
            else:
                out.unexpected_files.append(f"{entry.name}/{f.name}" + ("/" if _is_dir(f) else ""))
        if not images:
            out.empty.append(entry.name + "/")
        per_label[label] = images
    for label in sorted(per_label):
        out.samples.extend((p, label) for p in per_label[label])
    if expected:
        out.missing = [f"{name}/" for lab, name in sorted(expected.items()) if lab not in out.found]
    return out


def scan_image_tree(base: Path) -> tuple[list[str], list[str]]:
    """All images under ``base`` (recursively, sorted by relative path), and the non-image files.

    Hidden files and folders are skipped. Symlinked folders are not followed (no cycles).
    """
    images: list[str] = []
    others: list[str] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, base)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            if is_image_file(name):
                images.append(full)
            else:
                others.append(name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/"))
    images.sort(key=lambda p: os.path.relpath(p, base).split(os.sep))
    return images, others
