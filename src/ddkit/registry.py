"""One generic name -> object registry used for datasets, models, methods and protocols."""

from __future__ import annotations

import ast
import difflib
import fnmatch
import functools
import hashlib
import importlib.machinery
import importlib.util
import inspect
import json
import logging
import os
import re
import sys
import sysconfig
import weakref
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from ddkit.errors import DDKitError

T = TypeVar("T")

log = logging.getLogger(__name__)

#: what a registered name may be: it becomes part of file and folder names (a bench's cells and sets), so no path
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_name(kind: str, name: object) -> None:
    """Refuse, in one line, a name no registry takes: empty, with whitespace, ``/`` or other characters, or starting
    with ``.`` or ``-`` (``..``, a hidden file, an option). Every built-in name (``resnet18_cifar``,
    ``convnet3-w32``, ``fashion-mnist``) is one."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise DDKitError(f"{kind} name {name!r} is not allowed: a name starts with a letter or digit and holds only "
                         "letters, digits, '_', '-' and '.' (it becomes part of file names); register it under "
                         "such a name")


#: how alike (difflib's ratio, case ignored) a registered name must be to be suggested for an unknown one: typos
#: ('edcc', 'convnt3', 'synthetc', 'dc-protocl': 0.8 and more; 'ecd' for 'edc': 0.67) are; a plugin's name that shares
#: a few letters with one of ours ('myrec' and 'edc': 0.5, 'nonexist' and 'convnet': 0.53) is not
SUGGEST_CUTOFF = 0.6


class Registry(Generic[T]):
    """Maps short keys to objects (classes or factories).

    ``get`` fails with a did-you-mean suggestion; ``list`` takes an optional glob pattern. A name must pass
    :func:`check_name`; ``check(name, obj)``, if given, refuses an entry at registration (a DDKitError naming the
    fix).
    """

    def __init__(self, kind: str, check: Callable[[str, T], None] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._check = check

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; names are unique and pass :func:`check_name`."""
        check_name(self.kind, name)

        def deco(obj: T) -> T:
            if self._check is not None:
                self._check(name, obj)
            if name in self._entries and (_origin(obj) is None or _origin(self._entries[name]) != _origin(obj)):
                raise DDKitError(f"{self.kind} {name!r} is already registered (by {origin(self._entries[name])}); "
                                 "register yours under another name")
            self._entries[name] = obj  # the same definition again (a re-run notebook cell, a reload) replaces it
            _source(obj)  # a plugin's source as it is when loaded, not as an edit during a long run leaves it
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
        """The registered name ``name`` is most likely a typo of (at least :data:`SUGGEST_CUTOFF` alike, case
        ignored), or None."""
        same_case = [n for n in self._entries if n.lower() == str(name).lower()]  # 'EDC' for 'edc'
        if same_case:
            return same_case[0]
        lower = {n.lower(): n for n in self._entries}
        close = difflib.get_close_matches(str(name).lower(), list(lower), n=1, cutoff=SUGGEST_CUTOFF)
        return lower[close[0]] if close else None

    def unknown_message(self, name: str) -> str:
        """``unknown KIND 'name'; ...`` with a did-you-mean; unless ``name`` differs from a registered name in case
        alone, it says too how a name of the user's own is found (a plugin's name may look like a typo of ours)."""
        close = self.suggest(name)
        own = ("one of your own: import the module that registers it first; the CLI imports those named in "
               "DDKIT_PLUGINS")
        if close is not None and close.lower() == str(name).lower():
            hint = f"did you mean {close!r}?"
        elif close is not None:
            hint = f"did you mean {close!r}? (or {own})"
        else:
            hint = f"see `ddkit list {self.kind}s` ({own})"
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
# definition -> (its source_sha256, the user's own modules that entered it, the specs of its module and of those as
# they were imported when it was read): read again once one of them is reloaded
_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def source_sha256(obj: object) -> str | None:
    """sha256 of the source of a registered class or function defined outside the ddkit package (a
    plugin): its module's file, else (a function of a notebook cell) the definition's own source text. It
    enters the identity of what ``obj`` makes, so an edited plugin makes new sets and teachers instead of
    reusing those of its old code. None for ddkit's own (their ``revision`` counts), and for a definition
    whose source cannot be read (with a warning, once).

    The user's own modules that the file imports, directly or through each other (:func:`source_deps`),
    count too: an edited helper module is an edited plugin. With none, the hash is the file's sha256
    alone (the value before helpers counted, so caches of such plugins stay valid).

    A ``functools.partial`` of such a definition: the sha256 of its function's source and of the arguments it
    binds (:func:`bound_arguments`), so that ``partial(f, width=16)`` registered where ``partial(f, width=8)``
    was makes new sets and teachers too; one that binds nothing has its function's.

    Read once per definition and process, when it is registered (or first asked), and again once its module
    or a helper module it uses as a module (``import helper``) is reloaded (``importlib.reload``, IPython's
    autoreload; a reload that leaves the definition in place too). Names it took with ``from helper import f``
    keep the old ``f``, which then runs among the helper's new code: until its own module is reloaded too, such
    a mix gets a hash of its own, which neither the old nor the new code gives. So the hash describes the code
    this process runs: an edit of the file during a long run does not label what the old code makes with the
    new code's hash (a reload, or the next process, reads it again). A partial binding an object whose repr
    holds a memory address is warned about here (once), where the identity is used, not at its registration."""
    _warn_unstable(obj)
    return _source(obj)[0]


def source_deps(obj: object) -> list[str]:
    """The modules of the user's own (neither the standard library, nor an installed package under
    site-packages or dist-packages, whose version is what counts, nor ddkit) that the source file of
    ``obj`` imports, directly or through each other, sorted: those whose files :func:`source_sha256`
    covers besides the definition's own."""
    return list(_source(obj)[1])


def source_record(obj: object) -> dict:
    """What a manifest records of the source of ``obj``: ``source_sha256`` and, when helper modules
    entered it, ``source_deps`` (their names); empty for ddkit's own and for an unreadable source."""
    _warn_unstable(obj)
    sha, deps = _source(obj)
    if sha is None:
        return {}
    return {"source_sha256": sha, **({"source_deps": list(deps)} if deps else {})}


def _source(obj: object) -> tuple[str | None, tuple[str, ...]]:
    try:
        memo = _SOURCES.get(obj)
    except TypeError:  # not hashable or not weakly referable: read every time
        return _read_source(obj)
    if memo is not None:
        specs = _specs(obj, memo[1])
        reloaded = [name for name, old, new in zip(_chain(obj, memo[1]), memo[2], specs, strict=True) if old is not new]
        if not reloaded:
            return memo[0], memo[1]
    sha, deps = _read_source(obj)
    if (memo is not None and None not in (sha, memo[0]) and sha != memo[0] and reloaded[0] != _chain(obj, memo[1])[0]
            and not _runs_anew(_chain(obj, memo[1]), reloaded)):
        # names taken from an edited, reloaded helper (`from helper import f`): the old f runs among the helper's
        # new globals, neither the old code nor the new, so a hash of its own that no fresh process gives
        sha = hashlib.sha256(f"{memo[0]} {sha}".encode()).hexdigest()
    _SOURCES[obj] = (sha, deps, _specs(obj, deps))
    return sha, deps


def _chain(obj: object, deps: tuple[str, ...]) -> tuple:
    """The module of ``obj`` (None if it has none), then its helper modules ``deps``."""
    return (getattr(_unwrap(obj), "__module__", None), *deps)


def _specs(obj: object, deps: tuple[str, ...]) -> tuple:
    """The ``__spec__`` of the module of ``obj`` and of its helper modules ``deps`` as imported now (None for one
    not imported): ``importlib.reload`` or a new import makes a new one, which tells a reloaded module."""
    return tuple(getattr(sys.modules.get(name), "__spec__", None) if name else None for name in _chain(obj, deps))


def _runs_anew(chain: tuple, reloaded: list[str]) -> bool:
    """Whether the new code of a reloaded helper module runs in the definition: some module of its ``chain`` (or a
    package one holds) holds the helper as a module (``import helper``, ``from . import helper``), whose names are
    looked up at each call. Names taken from it (``from helper import f``) keep the old objects, which run among
    the helper's new globals: old and new code mixed."""
    helpers = [sys.modules.get(name) for name in reloaded]
    for holder in (sys.modules.get(name) for name in chain if name):
        for key, value in vars(holder).items() if holder is not None else ():
            # a package holds its imported submodules by itself: not a use (`from .consts import x` sets it too)
            if any(value is h and f"{holder.__name__}.{key}" != h.__name__ for h in helpers):
                return True
            if inspect.ismodule(value) and any(v is h for v in vars(value).values() for h in helpers):
                return True
    return False


class OwnPartial(functools.partial):
    """A ``functools.partial`` that ddkit registers itself (``convnet3-w32``, ``tv_resnet18``): the key names what
    it binds and ddkit's version counts, so its identity is its key alone, as before partials were hashed. A
    user's partial of one of ddkit's functions is hashed with its bound arguments."""


def _read_source(obj: object) -> tuple[str | None, tuple[str, ...]]:
    if isinstance(obj, functools.partial):
        sha, deps = _source(obj.func)
        if isinstance(obj, OwnPartial) or not (obj.args or obj.keywords):  # ddkit's own, or nothing bound
            return sha, deps
        if sha is not None:
            base: dict = {"source_sha256": sha}
        elif is_ddkit(_unwrap(obj.func)):  # a user's partial of ddkit's function: its arguments alone
            base = {"def": origin(obj.func)}
        else:  # a source that cannot be read (warned)
            return None, deps
        blob = json.dumps({**base, "bound": bound_arguments(obj)}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest(), deps
    module = getattr(obj, "__module__", None) or ""
    if is_ddkit(obj):
        return None, ()
    try:
        path = inspect.getsourcefile(obj) or ""
        with open(path, "rb") as f:
            text = f.read()
    except (OSError, TypeError):
        pass
    else:
        sha = hashlib.sha256(text).hexdigest()
        deps = _own_imports(module, path, text)
        if not deps:
            return sha, ()
        log.debug("the source of %s covers its module's own imports %s", origin(obj), sorted(deps))
        lines = [sha, *(f"{name} {deps[name]}" for name in sorted(deps))]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest(), tuple(sorted(deps))
    try:
        return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest(), ()
    except (OSError, TypeError):
        name = origin(obj)
        if name not in _UNTRACKED:
            _UNTRACKED.add(name)
            log.warning("cannot read the source of %s: edits to it are not tracked (what it made is reused after one); "
                        "after an edit bump a method's `revision` class attribute, or write to another out folder",
                        name)
        return None, ()


def _own_imports(module: str, path: str, text: bytes) -> dict[str, str]:
    """The sha256 of the file of every module of the user's own (:func:`_is_own`) that ``text`` (the
    source of ``module`` at ``path``) imports, and those import in turn, by module name. Found from
    the import statements and ``sys.modules`` or the import path, without importing anything."""
    found: dict[str, str] = {}
    seen = {module}  # a cycle ends at a module already seen; the definition's own file is hashed already
    todo = [(module, path, text)]
    while todo:
        name, file, source = todo.pop()
        for dep in _imported(name, file, source):
            if dep in seen:
                continue
            seen.add(dep)
            dep_file = _locate(dep)[0]
            if dep_file is None or not _is_own(dep, dep_file) or os.path.realpath(dep_file) == os.path.realpath(path):
                continue
            try:
                with open(dep_file, "rb") as f:
                    dep_text = f.read()
            except OSError:
                continue
            found[dep] = hashlib.sha256(dep_text).hexdigest()
            if dep_file.endswith(".py"):
                todo.append((dep, dep_file, dep_text))
    return found


def _imported(module: str, file: str, source: bytes) -> list[str]:
    """Names of the modules the import statements of ``source`` may load (relative ones resolved from
    ``module``): each named module, its parent packages (which run first), and for ``from X import y``
    also ``X.y`` (a submodule, if there is one)."""
    try:
        tree = ast.parse(source, file)
    except (SyntaxError, ValueError):
        return []
    package = getattr(sys.modules.get(module), "__package__", None)
    if package is None:
        package = module if os.path.basename(file).startswith("__init__.") else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                try:
                    base = importlib.util.resolve_name("." * node.level + base, package)
                except (ImportError, ValueError):
                    continue
            names += [base, *(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")]
    parts = [name.split(".") for name in names if name]
    return [".".join(p[:i]) for p in parts for i in range(1, len(p) + 1)]


def _locate(name: str) -> tuple[str | None, list[str] | None]:
    """The file of module ``name`` and, for a package, where its submodules are: from ``sys.modules``
    when it is imported, else found on the import path without running any of it."""
    mod = sys.modules.get(name)
    if mod is not None:
        return getattr(mod, "__file__", None), getattr(mod, "__path__", None)
    parent = name.rpartition(".")[0]
    where = _locate(parent)[1] if parent else None
    if parent and where is None:
        return None, None
    try:
        spec = importlib.machinery.PathFinder.find_spec(name, where)
    except (ImportError, ValueError):
        return None, None
    if spec is None:
        return None, None
    return spec.origin if spec.has_location else None, spec.submodule_search_locations


def _is_own(name: str, file: str) -> bool:
    """Whether module ``name`` (at ``file``) is the user's own code: not ddkit, not the standard library,
    not an installed package (site-packages, dist-packages), whose version is what identifies it. Decided by
    where the file is, not by the name: a module of the user's named like one of the standard library
    (``trace.py``, ``test.py`` beside the plugin) is theirs."""
    if name.partition(".")[0] == "ddkit":
        return False
    where = os.path.realpath(file)
    parts = where.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return False
    return not where.startswith(_stdlib_folders())


@functools.cache
def _stdlib_folders() -> tuple[str, ...]:
    """The folders of the standard library, pure and platform-specific (``lib64/.../lib-dynload`` on some
    systems), of the installation a virtual environment was made from, links resolved, each ending in a
    separator."""
    paths = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
    return tuple(sorted({os.path.join(os.path.realpath(paths[key]), "") for key in ("stdlib", "platstdlib")}))


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # an object's default repr: another text in every process


def bound_arguments(p: functools.partial, unstable: list[str] | None = None) -> dict:
    """The arguments partial ``p`` binds as JSON data that is the same in every process: numbers, strings, None,
    lists and dicts of them as they are; a class or function as ``module.QualName``; any other object as its repr.
    An object whose repr holds a memory address (the default ``<X object at 0x...>``) enters as its type's name,
    added to ``unstable`` where given (a change of it is not tracked: :func:`_warn_unstable` warns of those where the
    identity is used)."""
    found: list[str] = [] if unstable is None else unstable
    return {"args": [_stable(v, found) for v in p.args],
            "keywords": {k: _stable(v, found) for k, v in p.keywords.items()}}


_UNSTABLE: set[tuple[str, str]] = set()  # (partial, object type) warned about once per process


def _warn_unstable(obj: object) -> None:
    """Warn, once per process, of each object a user's partial ``obj`` binds whose repr holds a memory address."""
    if isinstance(obj, functools.partial) and not isinstance(obj, OwnPartial):
        found: list[str] = []
        bound_arguments(obj, found)
        for text in found:
            if (origin(obj), text) not in _UNSTABLE:
                _UNSTABLE.add((origin(obj), text))
                _warn_address(obj, text)


def _warn_address(p: functools.partial, text: str) -> None:
    log.warning("functools.partial(%s, ...) binds a %s, whose repr holds a memory address: it enters the identity of "
                "what the partial makes as its type only, and a change of it is not tracked; bind numbers, strings, "
                "lists or dicts instead (the settings the object is made from)", origin(p), text)


def _stable(value: object, unstable: list[str]) -> object:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_stable(v, unstable) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _stable(v, unstable) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):  # its iteration order (and repr) changes with PYTHONHASHSEED
        return {"set": sorted((_stable(v, unstable) for v in value), key=_json_key)}
    if isinstance(value, dict):  # other keys: as (key, value) pairs
        return {"items": [[_stable(k, unstable), _stable(v, unstable)] for k, v in value.items()]}
    if isinstance(value, functools.partial):
        return {"def": origin(value), "bound": bound_arguments(value, unstable)}
    name = getattr(value, "__qualname__", None)
    if callable(value) and isinstance(name, str):  # a class or function (torch.relu too): its name
        return {"def": f"{getattr(value, '__module__', None)}.{name}"}
    text = repr(value)
    if _ADDRESS.search(text):
        text = f"<{type(value).__module__}.{type(value).__qualname__} object>"
        unstable.append(text)
    return {"repr": text}


def own_source_sha256(obj: object) -> str | None:
    """:func:`source_sha256` of a class or function of the user's own code (:func:`_is_own`: a plugin, a script, a
    notebook); None for ddkit's, the standard library's and an installed package's, whose versions identify them."""
    try:
        file = inspect.getsourcefile(obj) or ""
    except (TypeError, OSError):  # a built-in, or defined where no file is kept (a notebook, python -c)
        if getattr(obj, "__module__", None) != "__main__":
            return None
        file = ""
    if not _is_own(getattr(obj, "__module__", None) or "", file):  # ddkit's own too
        return None
    return source_sha256(obj)


def is_ddkit(obj: object) -> bool:
    """Whether ``obj`` (a class or function) is ddkit's own, by its module."""
    module = getattr(obj, "__module__", None) or ""
    return module == "ddkit" or module.startswith("ddkit.")


def _json_key(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def _unwrap(obj: object) -> object:
    """The function of a ``functools.partial``; ``obj`` itself otherwise."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    return obj
