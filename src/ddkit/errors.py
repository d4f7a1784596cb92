"""User-facing errors.

Every problem a user can cause (bad input, unknown names, mismatched classes) raises
:class:`DDKitError` with a one-line message that names the problem and the fix. The CLI turns it
into ``error: <message>`` on stderr and exit code 2; library users catch it like any exception.
"""


class DDKitError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class ConfigError(DDKitError, ValueError):
    """An invalid configuration: unknown key, wrong type or out-of-range value."""


class DataError(DDKitError):
    """A dataset that is missing, corrupt, or does not fit what the run expects."""


class ImageTooSmall(DDKitError):
    """A model that cannot be built for images this small (too many poolings or strides)."""


def printable(text: str, keep: str = "") -> str:
    """``text`` with every character that is not printable (control characters: a terminal escape sequence, a
    newline inside a table cell), except those in ``keep``, written as ``repr`` writes it (``\\x1b``, ``\\n``):
    text read from an artifact a terminal then shows as it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)
