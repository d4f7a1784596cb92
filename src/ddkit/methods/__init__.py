"""Distillation methods, one file per family, registered by short key."""

from ddkit.methods import full, random  # noqa: F401  (registration)
from ddkit.methods.base import METHODS, FitContext, Method, SyntheticSet

__all__ = ["METHODS", "FitContext", "Method", "SyntheticSet"]
