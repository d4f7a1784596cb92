"""User-facing errors.

Every problem a user can cause (bad input, unknown names, mismatched classes) raises
:class:`DDKitError` with a one-line message that names the problem and the fix. The CLI turns it
into ``error: <message>`` on stderr and exit code 2; library users catch it like any exception.
"""

import unicodedata


class DDKitError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class ConfigError(DDKitError, ValueError):
    """An invalid configuration: unknown key, wrong type or out-of-range value."""


class DataError(DDKitError):
    """A dataset that is missing, corrupt, or does not fit what the run expects."""


class ImageTooSmall(DDKitError):
    """A model that cannot be built for images this small (too many poolings or strides)."""


_BIDI = set("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")  # reorder what follows


def _unsafe(c: str) -> bool:
    """A control character (a terminal escape sequence, a newline inside a table cell), a line or paragraph
    separator, or a bidirectional override; not other invisible characters of real names (no-break space, joiners)."""
    return unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in _BIDI


def printable(text: str, keep: str = "") -> str:
    """``text`` with every control character, line separator and bidirectional override (:func:`_unsafe`), except
    those in ``keep``, written as ``repr`` writes it (``\\x1b``, ``\\n``, ``\\u202e``): text read from an artifact
    a terminal then shows as it is."""
    if text.isprintable():
        return text
    return "".join(repr(c)[1:-1] if _unsafe(c) and c not in keep else c for c in text)


def caller_stacklevel() -> int:
    """The ``stacklevel`` for a :func:`warnings.warn` made by the function that calls this one, that names the first
    line outside ddkit: past ddkit's own frames and the wrappers its decorators add (``@stage_modes()``'s in
    contextlib, ``@torch.no_grad()``'s in torch's ``_contextlib``), however many there are (``ddkit.evaluate(...)``,
    the callable module, adds one more than ``ddkit.evaluate.evaluate(...)``)."""
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1  # the caller of this function: the one that warns, stacklevel 1
    while frame is not None:
        file = os.path.abspath(frame.f_code.co_filename)
        if not (file.startswith(here) or os.path.basename(file) in ("contextlib.py", "_contextlib.py")):
            break
        frame, level = frame.f_back, level + 1
    return level
