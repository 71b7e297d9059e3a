"""The data folders shipped with vlm_tta: ``prompts/`` and ``eval/``.

Installed, they are the subpackages ``vlm_tta.prompts`` and ``vlm_tta.eval`` (pyproject maps the
top-level folders into the wheel). When Python runs inside a source checkout (``python -m vlm_tta``
or ``python -c`` in the repository root), the checkout's ``vlm_tta/`` shadows the installed one and
has no such subpackages; the folders are then read where they sit, beside ``vlm_tta/``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["shipped_folder"]


def shipped_folder(name: str):
    """The shipped folder ``name`` (``"prompts"`` or ``"eval"``) as a traversable directory."""
    try:
        return resources.files(f"vlm_tta.{name}")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / name
