"""One generic name -> object registry used for datasets, models, methods and protocols."""

from __future__ import annotations

import difflib
import fnmatch
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
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise DDKitError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self._entries), n=1, cutoff=0.5)
        hint = (f"did you mean {close[0]!r}?" if close else
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
