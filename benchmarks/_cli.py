"""The command line every script in benchmarks/ shares (a helper, not a script).

Bad input ends a script as it ends a ``ddkit`` command: one line ``error: <what is wrong and the
fix>`` on stderr, exit code 2, no traceback and nothing written. Two halves:

- :class:`Parser` and the argument types below refuse a bad value while the arguments are parsed,
  before any data is read or folder made (``argument --ipc: expected an integer >= 1, got '0'``);
- :func:`output_file` and :func:`output_folder` check where a script will write (``--out`` a ``.json``
  file whose folder exists or can be made and is writable; ``--results``/``--work`` folders likewise)
  right after parsing, before any work, so a run of hours never ends on an unwritable path;
- :func:`run_main` runs a script's ``main`` and turns a :class:`~ddkit.errors.DDKitError` raised later
  (missing data, an unknown dataset, a bad bench config) into the same line.

Every script records the command that made its JSON with :func:`command`, and the machine with
:func:`machine_record`.

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
import os
import platform
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from ddkit.config import SEED_LIMIT  # as the ddkit CLI's --seeds
from ddkit.errors import DDKitError


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with each option's default appended, ``(default: 10)``, where its help does not name it
    (a help text that says "default" already explains it); a list as it is typed: ``0 1 2`` for an
    option of several values, ``3,50,800`` for a comma-separated one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, value = action.help or "", action.default
        if (not action.option_strings or "default" in text or value is None or value is False
                or value is argparse.SUPPRESS or value == []):
            return text
        if isinstance(value, (list, tuple)):
            value = (" " if action.nargs in ("+", "*") else ",").join(map(str, value))
        return f"{text} (default: {str(value).replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``error: <message>``, exit code 2, and whose
    --help shows the defaults (:class:`DefaultsHelpFormatter`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

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


def command(script: str, argv: list[str] | None = None, data: bool = False) -> str:
    """The command line that ran ``benchmarks/<script>.py`` from the repository root, its arguments as
    given (``argv``, default ``sys.argv[1:]``: relative paths are relative to where it ran), quoted for a
    shell; ``data``: prefixed with the ``DDKIT_DATA`` it read. The ``DDKIT_*`` settings that change
    results (``DDKIT_CUDA_DETERMINISTIC``) are prefixed too when set."""
    args = sys.argv[1:] if argv is None else list(argv)
    line = " ".join(["python", f"benchmarks/{script}.py", *map(shlex.quote, args)])
    for name in ("DDKIT_CUDA_DETERMINISTIC", *(("DDKIT_DATA",) if data else ())):
        if os.environ.get(name):
            line = f"{name}={shlex.quote(os.environ[name])} {line}"
    return line


def machine_record(threads: int | None = None) -> dict:
    """This machine as the scripts' JSONs record it: CPUs, torch's CPU thread count (``threads``, default the
    current one; float sums, so results, depend on it) and the platform."""
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads() if threads is None else threads,
            "platform": platform.platform()}


def distinct_seeds(ap: argparse.ArgumentParser, seeds: list[int], flag: str = "--seeds") -> list[int]:
    """Refuse, right after parsing, a seed given twice (the same run twice would inflate n). Returns ``seeds``."""
    if len(set(seeds)) < len(seeds):
        ap.error(f"argument {flag}: a seed is given twice in {seeds}; give each once")
    return seeds


def _writable(ap: argparse.ArgumentParser, folder: Path, flag: str, given: str) -> None:
    """``folder`` exists and is writable, or can be made: its nearest existing parent is a writable folder."""
    probe = folder.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        ap.error(f"{flag} {given} lies inside {probe}, which is a file; choose another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        ap.error(f"{flag} {given}: the folder {probe} is not writable; choose another {flag}")


def output_file(ap: argparse.ArgumentParser, path: str | Path, flag: str = "--out") -> Path:
    """Check a JSON output path before any work (the markdown, and any plot, go beside it): it ends in
    ``.json``, is not a folder, and its folder exists or can be made and is writable. Returns it."""
    out = Path(path)
    if out.suffix != ".json":
        ap.error(f"{flag} must end in .json, got {path}; the markdown is written beside it")
    if out.is_dir():
        ap.error(f"{flag} {path} is a folder; give the JSON file's path")
    if out.exists() and not os.access(out, os.W_OK):
        ap.error(f"{flag} {path} is not writable; choose another {flag}")
    _writable(ap, out.parent, flag, str(path))
    return out


def output_folder(ap: argparse.ArgumentParser, path: str | Path, flag: str) -> Path:
    """Check an output folder (``--results``, ``--work``) before any work: not a file, and it exists or
    can be made, and is writable. Nothing is made here. Returns it."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        ap.error(f"{flag} {path} is a file, not a folder; choose another {flag}")
    _writable(ap, folder, flag, str(path))
    return folder


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
            raise argparse.ArgumentTypeError(f"expected one or more of {', '.join(names)}, comma-separated, "
                                             f"got {text!r}")
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
    """``cpu``, ``cuda``, ``cuda:N`` (on a machine that has it), ``mps`` (where it is available) or ``auto`` (cuda if
    present, else cpu; returned resolved). Checked without touching the device's settings."""
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
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} asked for but MPS is not available here; use cpu")
    return text
