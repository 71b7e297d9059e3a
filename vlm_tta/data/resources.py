"""Reading the data files shipped in ``vlm_tta.prompts``: class names, WNIDs and templates.

Files are one entry per line, UTF-8, in label order (``prompts/classnames/<name>.txt``) or one
template per line with ``{}`` for the class name (``prompts/templates/<set>.txt``).
"""

from __future__ import annotations

import functools

from .._shipped import shipped_folder
from ..errors import DatasetError

__all__ = ["read_lines", "classnames_file", "templates_file", "imagenet_wnids", "imagenet_classnames"]


def _package_file(*parts: str):
    return shipped_folder("prompts").joinpath(*parts)


@functools.lru_cache(maxsize=None)
def _read(kind: str, stem: str) -> tuple[str, ...]:
    f = _package_file(kind, f"{stem}.txt")
    try:
        text = f.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"vlm_tta.prompts/{kind}/{stem}.txt is not installed") from None
    return tuple(line.rstrip("\r") for line in text.split("\n") if line.strip())


def read_lines(kind: str, stem: str) -> list[str]:
    """Lines of ``vlm_tta.prompts/<kind>/<stem>.txt`` (blank lines dropped)."""
    return list(_read(kind, stem))


def classnames_file(stem: str) -> list[str]:
    return read_lines("classnames", stem)


def templates_file(stem: str) -> list[str]:
    return read_lines("templates", stem)


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WNIDs in class-index order (sorted)."""
    return classnames_file("imagenet_wnids")


def imagenet_classnames() -> list[str]:
    """CLIP's curated 1000 ImageNet class names, in class-index order."""
    return classnames_file("imagenet")
