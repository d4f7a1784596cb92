"""The command line every script in benchmarks/ shares (a helper, not a script).

Bad input ends a script as it ends a ``ddkit`` command: one line ``error: <what is wrong and the
fix>`` on stderr, exit code 2, no traceback and nothing written. Two halves:

- :class:`Parser` and the argument types below refuse a bad value while the arguments are parsed,
  before any data is read or folder made (``argument --ipc: expected an integer >= 1, got '0'``);
- :func:`run_main` runs a script's ``main`` and turns a :class:`~ddkit.errors.DDKitError` raised later
  (missing data, an unknown dataset, a bad bench config) into the same line.

    from _cli import Parser, positive_int, run_main

    def main() -> None:
        ap = Parser(description=__doc__.splitlines()[0])
        ap.add_argument("--ipc", type=positive_int, default=10)
        ...

    if __name__ == "__main__":
        run_main(main)

Scripts import it as ``_cli``: Python puts a script's folder first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from ddkit.config import SEED_LIMIT  # as the ddkit CLI's --seeds
from ddkit.errors import DDKitError


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``error: <message>``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        head, sep, choices = message.partition(" (choose from ")
        if sep and len(message) > 200:  # a long list of choices (--family has ~70): --help lists them
            message = f"{head}; see --help for the choices"
        self.exit(2, f"error: {message}\n")


def run_main(main: Callable[[], Any]) -> None:
    """Call ``main()``; a DDKitError ends the process with ``error: <message>`` (one line) and exit 2."""
    try:
        main()
    except DDKitError as exc:
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (IPCs, epochs, steps, threads, repeats)."""
    value = _int(text, "an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def seed_int(text: str) -> int:
    """A seed: an integer in [0, 2^32)."""
    value = _int(text, "a seed, an integer in [0, 2^32)")
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected a seed, an integer in [0, 2^32), got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (seconds, budgets)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def comma_list(item: Callable[[str], Any], example: str) -> Callable[[str], list]:
    """A type for a comma-separated list of ``item`` values, at least one (``--ipcs 1,10,50``)."""

    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list like {example}, got {text!r}")
        try:
            return [item(p) for p in parts]
        except argparse.ArgumentTypeError as exc:
            where = f" in {text!r}" if len(parts) > 1 else ""
            raise argparse.ArgumentTypeError(f"{exc}{where} (a comma-separated list like {example})") from None

    parse.__name__ = f"{item.__name__}_list"
    return parse


def one_of(*names: str) -> Callable[[str], list[str]]:
    """A type for a comma-separated list of some of ``names``, at least one (``--methods dc,dsa``)."""

    def parse(text: str) -> list[str]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        bad = [p for p in parts if p not in names]
        if bad or not parts:
            raise argparse.ArgumentTypeError(f"expected one or more of {', '.join(names)}, comma-separated, got {text!r}")
        return list(dict.fromkeys(parts))

    return parse


def registered_model(text: str) -> str:
    """A registered model name, with its name-implied options (``convnet3-w32``, ``resnet18_cifar``)."""
    from ddkit.models.registry import resolve_model

    try:
        resolve_model(text)
    except DDKitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def device_spec(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` (on a machine that has it), ``mps`` or ``auto`` (cuda if present,
    else cpu; returned resolved). Checked without touching the device's settings."""
    import torch

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text == "auto":
        return "cuda" if cuda else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not cuda:
        raise argparse.ArgumentTypeError(f"device {text!r} asked for but CUDA is not available here; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= cuda:
        raise argparse.ArgumentTypeError(f"device {text!r} does not exist (this machine has {cuda} CUDA "
                                         f"device(s)); use cuda:0..{cuda - 1}")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported; use cpu, cuda, cuda:N or auto")
    return text
