"""Checks of user input that need no model: class names and prompt templates.

Kept apart from :mod:`vlm_tta.models` (which imports torch) so that light code such as
:mod:`vlm_tta.templates` and the ``vlm-tta templates`` command can use them without torch.
``vlm_tta.models.base`` re-exports both functions.
"""

from __future__ import annotations

from typing import Sequence

from .errors import FIX, ClassNamesError, TemplateError

__all__ = ["validate_classnames", "validate_templates"]


def validate_classnames(classnames: Sequence[str], allow_duplicates: bool = False) -> list[str]:
    """Return the class names as a list after checking none is empty, blank or (unless
    ``allow_duplicates``) duplicated. CLIP's curated ImageNet names repeat "missile" and
    "sunglasses"; benchmark code passes ``allow_duplicates=True`` for them."""
    if isinstance(classnames, str):
        raise ClassNamesError(
            "classnames must be a sequence of names, not one string; e.g. ['cat', 'dog'] "
            "(on the command line: --classes cat,dog)"
        )
    names = list(classnames)
    if not names:
        raise ClassNamesError("classnames is empty: pass at least one class name")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise ClassNamesError(f"class name #{i} is a {type(name).__name__}, not a string: {name!r}")
        if not name.strip():
            raise ClassNamesError(f"class name #{i} is blank; every class needs a name")
    seen: dict[str, int] = {}
    for i, name in enumerate(names if not allow_duplicates else ()):
        key = name.strip()
        if key in seen:
            raise ClassNamesError(
                f"class name {name!r} appears twice (positions {seen[key]} and {i}); class names must be unique "
                f"(pass {FIX} if two classes really share a name)",
                fix={"allow_duplicate_classnames": True},
            )
        seen[key] = i
    return names


def validate_templates(templates: Sequence[str]) -> list[str]:
    """Check every template has exactly one ``{}`` placeholder for the class name."""
    if isinstance(templates, str):
        templates = [templates]
    out = list(templates)
    if not out:
        raise TemplateError("the template list is empty: pass at least one template such as 'a photo of a {}.'")
    for t in out:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise TemplateError(
                f"template {t!r} must contain the placeholder '{{}}' exactly once, where the class name goes "
                "(e.g. 'a photo of a {}.')"
            )
    return out
