"""Exceptions raised by vlm_tta.

Every error a user can trigger with bad input derives from :class:`VlmTtaError` and from the
built-in exception a Python user would expect (``ValueError``, ``FileNotFoundError``, ``KeyError``),
so both ``except VlmTtaError`` and ``except ValueError`` work. Messages say what to do.
"""

from __future__ import annotations

#: Python option -> command-line flag, for errors that name their fix (one place for the mapping).
CLI_FLAGS = {
    "model": "--model",
    "pretrained": "--pretrained",
    "tokenizer": "--tokenizer",
    "trust_remote_code": "--trust-remote-code",
    "precision": "--precision",
    "device": "--device",
    "allow_duplicate_classnames": "--allow-duplicate-classes",
    "templates": "--templates",
    "cache_dir": "--cache-dir",
    "download_dir": "--download-dir",
    "batch_size": "--batch-size",
    "seed": "--seed",
    "on_error": "--on-error",
}

FIX = "<fix>"  # where a message puts its fix; rendered for the caller's interface


def render_fix(fix: dict, style: str = "python") -> str:
    """``{"pretrained": "/p"}`` as ``pretrained='/p'`` (Python) or ``--pretrained /p`` (command line)."""
    if style == "cli":
        import shlex

        parts = []
        for key, value in fix.items():
            flag = CLI_FLAGS.get(key, "--" + key.replace("_", "-"))
            if value is True:
                parts.append(flag)
            else:
                parts.append(f"{flag} {'none' if value is None else shlex.quote(str(value))}")
        return " ".join(parts)
    rest = ", ".join(f"{key}={value!r}" for key, value in fix.items() if key != "model")
    if "model" in fix:  # in Python the model spec is load_model's first argument
        return f"load_model({fix['model']!r}{', ' + rest if rest else ''})"
    return rest


class VlmTtaError(Exception):
    """Base class of every error raised by vlm_tta on bad input.

    A message can name its fix as options (``fix={"pretrained": "/path/model.safetensors"}``, placed
    at :data:`FIX` in the message, else appended): ``str(err)`` shows it the Python way
    (``pretrained='/path/model.safetensors'``), :meth:`render` with ``"cli"`` the command-line way
    (``--pretrained /path/model.safetensors``), so each user is told the fix in their own terms.
    """

    def __init__(self, *args, fix: dict | None = None) -> None:
        super().__init__(*args)
        self.fix = dict(fix or {})

    def render(self, style: str = "python") -> str:
        msg = str(self.args[0]) if self.args else ""
        if not self.fix:
            return msg
        text = render_fix(self.fix, style)
        return msg.replace(FIX, text) if FIX in msg else f"{msg} ({text})"

    def __str__(self) -> str:
        return self.render("python")


class ImageError(VlmTtaError, ValueError):
    """An image could not be read or has unusable content (corrupt file, NaNs, bad shape)."""


class ModelSpecError(VlmTtaError, ValueError):
    """A model spec string could not be resolved, or its weights are not available offline."""


class UnknownMethodError(VlmTtaError, KeyError):
    """A method name is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable.
        return self.render("python")


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


class OptionError(VlmTtaError, TypeError, ValueError):
    """An argument of a public function (or a CLI flag) has the wrong type or an invalid value."""


class UnsupportedBackboneError(VlmTtaError, ValueError):
    """A method needs something of the backbone that this backbone does not have (e.g. TCA needs a
    vision transformer with a class token)."""
