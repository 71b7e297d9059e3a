"""Exceptions raised by vlm_tta.

Every error a user can trigger with bad input derives from :class:`VlmTtaError` and from the
built-in exception a Python user would expect (``ValueError``, ``FileNotFoundError``, ``KeyError``),
so both ``except VlmTtaError`` and ``except ValueError`` work. Messages say what to do.
"""

from __future__ import annotations


class VlmTtaError(Exception):
    """Base class of every error raised by vlm_tta on bad input."""


class ImageError(VlmTtaError, ValueError):
    """An image could not be read or has unusable content (corrupt file, NaNs, bad shape)."""


class ModelSpecError(VlmTtaError, ValueError):
    """A model spec string could not be resolved, or its weights are not available offline."""


class UnknownMethodError(VlmTtaError, KeyError):
    """A method name is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable.
        return str(self.args[0]) if self.args else ""


class ClassNamesError(VlmTtaError, ValueError):
    """Class names are empty, blank or duplicated."""


class TemplateError(VlmTtaError, ValueError):
    """A prompt template set is unknown or a template lacks the ``{}`` placeholder."""


class DatasetError(VlmTtaError, ValueError):
    """A dataset folder, split file or CSV does not have the expected layout."""


class FeatureError(VlmTtaError, ValueError):
    """Embeddings passed to classify_features have the wrong shape or non-finite values."""


class MethodOptionError(VlmTtaError, TypeError, ValueError):
    """A method option is unknown or has an invalid value."""


class UnsupportedBackboneError(VlmTtaError, ValueError):
    """A method needs something of the backbone that this backbone does not have (e.g. TCA needs a
    vision transformer with a class token)."""
