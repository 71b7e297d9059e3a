"""Test-time methods and their registry. Importing this package registers every built-in method."""

from . import adand, difftpt, dmn, sts, subtta, tca, tda, tpt, zero, zeroshot  # noqa: F401  (each module registers its method)
from .base import (
    Method,
    MethodContext,
    Prediction,
    create_method,
    get_method_class,
    list_methods,
    register_method,
)

__all__ = [
    "Method",
    "MethodContext",
    "Prediction",
    "create_method",
    "get_method_class",
    "list_methods",
    "register_method",
]
