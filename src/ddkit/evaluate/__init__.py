"""Fair evaluation: protocols, student training over seeds, baselines, reports."""

from ddkit.evaluate.protocol import PROTOCOLS, ProtocolConfig, resolve_protocol
from ddkit.evaluate.runner import evaluate, format_table

__all__ = ["PROTOCOLS", "ProtocolConfig", "evaluate", "format_table", "resolve_protocol"]
