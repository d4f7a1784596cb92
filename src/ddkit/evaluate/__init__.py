"""Fair evaluation: protocols, student training over seeds, baselines, reports.

The subpackage is callable as its stage function: ``ddkit.evaluate(distilled, protocol, seeds, ...)``
is :func:`ddkit.evaluate.evaluate` (``import ddkit`` then reaches every stage as ``ddkit.<stage>``).
"""

import inspect as _inspect
import sys as _sys
import types as _types

from ddkit.evaluate.protocol import PROTOCOLS, ProtocolConfig, resolve_protocol
from ddkit.evaluate.runner import evaluate, format_table

__all__ = ["PROTOCOLS", "ProtocolConfig", "evaluate", "format_table", "resolve_protocol"]


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        """``ddkit.evaluate(...)``: :func:`ddkit.evaluate.evaluate` (its arguments and report)."""
        return evaluate(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
__signature__ = _inspect.signature(evaluate)  # inspect.signature / help of ``ddkit.evaluate``: the function's
