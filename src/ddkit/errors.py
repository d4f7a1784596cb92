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
