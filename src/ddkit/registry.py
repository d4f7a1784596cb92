"""One generic name -> object registry used for datasets, models, methods and protocols."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from ddkit.errors import DDKitError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps short keys to objects (classes or factories).

    ``get`` fails with a did-you-mean suggestion; ``list`` takes an optional glob pattern.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; names are unique."""

        def deco(obj: T) -> T:
            if name in self._entries and (_origin(obj) is None or _origin(self._entries[name]) != _origin(obj)):
                raise DDKitError(f"{self.kind} {name!r} is already registered (by "
                                 f"{_origin(self._entries[name]) or type(self._entries[name]).__name__}); register "
                                 "yours under another name")
            self._entries[name] = obj  # the same definition again (a re-run notebook cell, a reload) replaces it
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise DDKitError(self.unknown_message(name)) from None

    def suggest(self, name: str) -> str | None:
        """The registered name ``name`` is most likely a typo of, or None."""
        same_case = [n for n in self._entries if n.lower() == str(name).lower()]  # 'EDC' for 'edc'
        close = same_case or difflib.get_close_matches(name, list(self._entries), n=1, cutoff=0.5)
        return close[0] if close else None

    def unknown_message(self, name: str) -> str:
        close = self.suggest(name)
        hint = (f"did you mean {close!r}?" if close else
                f"see `ddkit list {self.kind}s` (one of your own: import the module that registers it first; the CLI "
                "imports those named in DDKIT_PLUGINS)")
        return f"unknown {self.kind} {name!r}; {hint}"

    def list(self, pattern: str | None = None) -> list[str]:
        names = sorted(self._entries)
        if pattern:
            names = [n for n in names if fnmatch.fnmatch(n, pattern)]
        return names

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


def _origin(obj: object) -> str | None:
    """Where a class or function ``obj`` is defined (``module.QualName``), which tells a second
    registration of the same definition from another one under a taken name; None for other objects
    (instances, partials), which are never taken for the same definition."""
    if not (isinstance(obj, type) or inspect.isfunction(obj)):
        return None
    return f"{obj.__module__}.{obj.__qualname__}"
