"""Prompt template sets, stored as data files in ``prompts/templates/`` (one template per line).

Built-in names: ``single`` ("a photo of a {}.", TPT/ZERO/MTA), ``clip80`` (the 80 ImageNet templates
of Radford et al. 2021, TPT's "ensemble"), ``clip7`` (the 7-template subset CLIP's authors selected,
used by Tip-Adapter, TDA, ZERO+Ensemble, DPE), and per-dataset sets that arrive with the datasets
(CLIP's published templates as ``<dataset>``, CoOp's single templates as ``coop_<dataset>``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence, Union

from ._shipped import shipped_folder
from .errors import TemplateError
from .validation import validate_templates

Templates = Union[str, Sequence[str]]
DEFAULT_TEMPLATES = "single"


def _template_dir():
    return shipped_folder("prompts") / "templates"


def list_template_sets() -> list[str]:
    """Names accepted by :func:`get_templates`."""
    return sorted(p.name[: -len(".txt")] for p in _template_dir().iterdir() if p.name.endswith(".txt"))


@lru_cache(maxsize=None)
def _read_set(name: str) -> tuple[str, ...]:
    path = _template_dir() / f"{name}.txt"
    if not path.is_file():
        import difflib

        known = list_template_sets()
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise TemplateError(
            f"unknown template set {name!r}.{hint} Known sets: {', '.join(known)}; or pass a list of "
            "templates such as ['a photo of a {}.'], or a path to a text file with one template per line."
        )
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    return tuple(validate_templates([line for line in lines if line]))


def get_templates(templates: Templates | None = None) -> list[str]:
    """Resolve a template set name, a path to a text file (one template per line) or a list of
    templates into a validated list of templates (each with exactly one ``{}``)."""
    if templates is None:
        templates = DEFAULT_TEMPLATES
    if isinstance(templates, (str, os.PathLike)):
        text = os.fspath(templates)
        if "{}" in text:  # a single template given as a string
            return validate_templates([text])
        if text.endswith(".txt") or os.sep in text:
            path = Path(text)
            if not path.is_file():
                raise TemplateError(f"template file not found: {path}")
            lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
            return validate_templates([line for line in lines if line])
        return list(_read_set(text))
    return validate_templates(list(templates))


def template_set_id(templates: Templates | None) -> str:
    """A readable name for logs and result rows: the set's name, or ``custom[N]``."""
    if templates is None:
        return DEFAULT_TEMPLATES
    if isinstance(templates, str) and "{}" not in templates:
        return templates
    return f"custom[{len(get_templates(templates))}]"
