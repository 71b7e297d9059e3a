"""vlm_tta: test-time adaptation of frozen vision-language models (CLIP, SigLIP).

    >>> import vlm_tta
    >>> result = vlm_tta.classify(images, ["cat", "dog"], method="zeroshot", model="ViT-B-16@openai")
    >>> result.labels, result.probs

See :func:`classify`, :func:`classify_features`, :func:`load_model` and :func:`list_methods`.

The public names are imported on first use (PEP 562 module ``__getattr__``), so ``import vlm_tta``,
``import vlm_tta.cache`` and the light ``vlm-tta`` verbs (``cache``, ``datasets``, ``templates``)
do not pay for importing torch; ``vlm_tta.classify`` and ``from vlm_tta import classify`` work as
usual and import what they need then.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "ClassificationResult": "api",
    "classify": "api",
    "classify_features": "api",
    "EmbeddingCache": "cache",
    "VlmTtaError": "errors",
    "create_method": "methods",
    "list_methods": "methods",
    "register_method": "methods",
    "load_model": "models",
    "get_templates": "templates",
    "list_template_sets": "templates",
}

__all__ = [
    "ClassificationResult",
    "EmbeddingCache",
    "VlmTtaError",
    "classify",
    "classify_features",
    "create_method",
    "get_templates",
    "list_methods",
    "list_template_sets",
    "load_model",
    "register_method",
    "__version__",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from .api import ClassificationResult, classify, classify_features
    from .cache import EmbeddingCache
    from .errors import VlmTtaError
    from .methods import create_method, list_methods, register_method
    from .models import load_model
    from .templates import get_templates, list_template_sets


def __getattr__(name: str) -> Any:
    """Import a public name, or a submodule (``vlm_tta.models``), on first access."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # later accesses do not come here again
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # sets the attribute itself
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
