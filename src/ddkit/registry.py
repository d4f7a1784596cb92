"""One generic name -> object registry used for datasets, models, methods and protocols."""

from __future__ import annotations

import difflib
import fnmatch
import functools
import hashlib
import inspect
import json
import logging
import re
import weakref
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from ddkit.errors import DDKitError

T = TypeVar("T")

log = logging.getLogger(__name__)


class Registry(Generic[T]):
    """Maps short keys to objects (classes or factories).

    ``get`` fails with a did-you-mean suggestion; ``list`` takes an optional glob pattern. ``check(name,
    obj)``, if given, refuses an entry at registration (a DDKitError naming the fix).
    """

    def __init__(self, kind: str, check: Callable[[str, T], None] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._check = check

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; names are unique."""

        def deco(obj: T) -> T:
            if self._check is not None:
                self._check(name, obj)
            if name in self._entries and (_origin(obj) is None or _origin(self._entries[name]) != _origin(obj)):
                raise DDKitError(f"{self.kind} {name!r} is already registered (by "
                                 f"{_origin(self._entries[name]) or type(self._entries[name]).__name__}); register "
                                 "yours under another name")
            self._entries[name] = obj  # the same definition again (a re-run notebook cell, a reload) replaces it
            source_sha256(obj)  # a plugin's source as it is when loaded, not as an edit during a long run leaves it
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


def origin(obj: object) -> str:
    """``module.QualName`` of a registered class or function (``functools.partial``: of its function);
    the type's name for other objects."""
    return _origin(_unwrap(obj)) or type(obj).__name__


_UNTRACKED: set[str] = set()  # definitions warned about once per process
_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # definition -> its source_sha256, read once


def source_sha256(obj: object) -> str | None:
    """sha256 of the source of a registered class or function defined outside the ddkit package (a
    plugin): its module's file, else (a function of a notebook cell) the definition's own source text. It
    enters the identity of what ``obj`` makes, so an edited plugin makes new sets and teachers instead of
    reusing those of its old code. None for ddkit's own (their ``revision`` counts), and for a definition
    whose source cannot be read (with a warning, once).

    A ``functools.partial`` of such a definition: the sha256 of its function's source and of the arguments it
    binds (:func:`bound_arguments`), so that ``partial(f, width=16)`` registered where ``partial(f, width=8)``
    was makes new sets and teachers too; one that binds nothing has its function's.

    Read once per definition and process, when it is registered (or first asked): the hash describes the
    code this process runs, so an edit of the file during a long run does not label what the old code
    makes with the new code's hash (a reload, or the next process, defines it anew and reads it again)."""
    try:
        return _SOURCES[obj]
    except KeyError:
        pass
    except TypeError:  # not hashable or not weakly referable: read every time
        return _read_source_sha256(obj)
    sha = _SOURCES[obj] = _read_source_sha256(obj)
    return sha


def _read_source_sha256(obj: object) -> str | None:
    if isinstance(obj, functools.partial):
        sha = source_sha256(obj.func)
        if sha is None or not (obj.args or obj.keywords):  # ddkit's own (or untracked), or nothing bound
            return sha
        blob = json.dumps({"source_sha256": sha, "bound": bound_arguments(obj)}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()
    module = getattr(obj, "__module__", None) or ""
    if module == "ddkit" or module.startswith("ddkit."):
        return None
    try:
        with open(inspect.getsourcefile(obj) or "", "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except (OSError, TypeError):
        pass
    try:
        return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()
    except (OSError, TypeError):
        name = origin(obj)
        if name not in _UNTRACKED:
            _UNTRACKED.add(name)
            log.warning("cannot read the source of %s: edits to it are not tracked (what it made is reused after one); "
                        "after an edit bump a method's `revision` class attribute, or write to another out folder",
                        name)
        return None


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # an object's default repr: another text in every process


def bound_arguments(p: functools.partial) -> dict:
    """The arguments partial ``p`` binds as JSON data that is the same in every process: numbers, strings, None,
    lists and dicts of them as they are; a class or function as ``module.QualName``; any other object as its repr.
    An object whose repr holds a memory address (the default ``<X object at 0x...>``) enters as its type's name,
    with a warning: a change of it is not tracked."""
    return {"args": [_stable(v, p) for v in p.args], "keywords": {k: _stable(v, p) for k, v in p.keywords.items()}}


def _stable(value: object, p: functools.partial) -> object:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_stable(v, p) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _stable(v, p) for k, v in value.items()}
    if isinstance(value, functools.partial):
        return {"def": origin(value), "bound": bound_arguments(value)}
    name = getattr(value, "__qualname__", None)
    if callable(value) and isinstance(name, str):  # a class or function (torch.relu too): its name
        return {"def": f"{getattr(value, '__module__', None)}.{name}"}
    text = repr(value)
    if _ADDRESS.search(text):
        text = f"<{type(value).__module__}.{type(value).__qualname__} object>"
        log.warning("functools.partial(%s, ...) binds a %s, whose repr holds a memory address: it enters the "
                    "identity of what the partial makes as its type only, and a change of it is not tracked; bind "
                    "numbers, strings, lists or dicts instead (the settings the object is made from)", origin(p), text)
    return {"repr": text}


def _unwrap(obj: object) -> object:
    """The function of a ``functools.partial``; ``obj`` itself otherwise."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    return obj
