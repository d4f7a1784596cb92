"""Distillation methods, one file per family, registered by short key.

Every module in this package is imported here, so a new method file registers itself with
``@METHODS.register("key")`` and needs no edit elsewhere.
"""

import importlib
import pkgutil

from ddkit.methods.base import METHODS, FitContext, Method, SyntheticSet, check_ipc
from ddkit.methods.common import Checkpoint

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "common"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["METHODS", "Checkpoint", "FitContext", "Method", "SyntheticSet", "check_ipc"]
