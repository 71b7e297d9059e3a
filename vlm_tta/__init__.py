"""vlm_tta: test-time adaptation of frozen vision-language models (CLIP, SigLIP).

    >>> import vlm_tta
    >>> result = vlm_tta.classify(images, ["cat", "dog"], method="zeroshot", model="ViT-B-16@openai")
    >>> result.labels, result.probs

See :func:`classify`, :func:`classify_features`, :func:`load_model` and :func:`list_methods`.
"""

from .api import ClassificationResult, classify, classify_features
from .cache import EmbeddingCache
from .errors import VlmTtaError
from .methods import create_method, list_methods, register_method
from .models import load_model
from .templates import get_templates, list_template_sets

__version__ = "0.1.0"

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
