"""Fair evaluation: protocols, student training over seeds, baselines, reports.

The subpackage is callable as its stage function: ``ddkit.evaluate(distilled, protocol, seeds, ...)``
is :func:`ddkit.evaluate.evaluate` (``import ddkit`` then reaches every stage as ``ddkit.<stage>``).
"""

import importlib as _importlib
import sys as _sys
import types as _types

# name -> the submodule it is re-exported from, imported on first use (module __getattr__, PEP 562, as in
# ddkit/__init__.py): ddkit.evaluate.metrics and .tables import no torch, so `ddkit show` of an evaluation or a
# bench table reads them without the seconds that importing torch (through .protocol and .runner) takes
_EXPORTS = {"PROTOCOLS": "protocol", "ProtocolConfig": "protocol", "resolve_protocol": "protocol",
            "evaluate": "runner", "format_table": "tables"}

__all__ = ["PROTOCOLS", "ProtocolConfig", "evaluate", "format_table", "resolve_protocol"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value  # once: later look-ups are plain attribute reads
        return value
    if name == "__signature__":  # inspect.signature / help of ``ddkit.evaluate``: the function's
        import inspect

        return inspect.signature(__getattr__("evaluate"))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        """``ddkit.evaluate(...)``: :func:`ddkit.evaluate.evaluate` (its arguments and report)."""
        return self.evaluate(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
