"""ddkit's cache folder (``$DDKIT_CACHE``, else ``~/.cache/ddkit``): what it holds, and pruning it.

The cache has a folder per kind (``imagefolder``: decoded datasets; ``statistics``: teachers' real-data
statistics; ``experts``: expert trajectory buffers; ``random-baseline``, ``distilled-student`` and
``full-reference``: cached accuracies), each holding entries: a folder or a file per key. Beside an entry live
its hidden lock file (``.<name>.lock``, see :func:`~ddkit.artifacts.build_lock`), the temporary folders a killed
build left (``.<name>.tmp-*``, ``.<name>.old-*``, see :func:`~ddkit.artifacts.temp_path`) and the resumable work of
an interrupted build (``.<name>.partial-*``). :func:`cache_entries` lists them with their sizes;
:func:`prune_cache` removes whole entries that no process is building.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ddkit.artifacts import _alive, _lock_file, _names, _origin, cache_dir, remove_unused_lock, temp_path
from ddkit.errors import ConfigError

log = logging.getLogger(__name__)

#: the kinds of entries ddkit caches, and what they hold
KINDS = {"imagefolder": "decoded datasets of the imagefolder source", "statistics": "teachers' real-data statistics",
         "experts": "expert trajectory buffers", "random-baseline": "random subsets' accuracies (and their labels)",
         "distilled-student": "distilled sets' students' accuracies",
         "full-reference": "full-data students' accuracies"}

# What this ddkit's entries hold: here rather than beside the code that writes them (ddkit.data.sources and
# ddkit.methods.statistics import them from here), so that listing and showing the cache import no torch.
#: an imagefolder entry's layout and meaning: bump it when a change to the decoding changes what the same files give
DECODED_SCHEMA = 3  # 2: the key stats inode and ctime too; the manifest records the writing host; 3: it records the
# data fingerprint, checked at every read
#: real-data statistics' layout, in their cache key and manifest
STATISTICS_SCHEMA = 2  # 2: per-image sums in the features' dtype (1: float64 copies), ~1e-7
#: a statistics entry's tensor file
STATISTICS_TENSORS = "statistics.safetensors"
#: random-baseline, distilled-student and full-reference accuracies (written by ddkit.evaluate.runner)
ACCURACY_SCHEMA = 2  # 2: keyed by ddkit.evaluate.runner.trained_on (entries of schema 1 are stale)
#: the revision of ddkit's student training and evaluation code (ddkit.training, ddkit.evaluate, the replay of FKD
#: labels): bump it whenever a change there changes the numbers a student of the same settings and seed gives, so that
#: the cached students (random-baseline, distilled-student, full-reference) train again instead of being read back.
#: It enters their keys from 2 on (:func:`revised`): at 1 the keys are those of the entries made before it existed
STUDENT_REVISION = 1
#: the same for the expert trajectory buffers (ddkit.methods.trajectory.train_experts): bump it whenever a change
#: there (or in the training it calls) changes the trajectories the same recipe gives; it enters their names from 2 on
EXPERTS_REVISION = 1


def revised(revision: int) -> dict[str, int]:
    """``{"revision": revision}`` for a cache key, or nothing at revision 1 (:data:`STUDENT_REVISION`,
    :data:`EXPERTS_REVISION`): the keys of the entries made before the revision was counted stay valid."""
    return {"revision": revision} if revision != 1 else {}


# what a killed build leaves beside an entry NAME (artifacts.temp_path), and a build's resumable work
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<origin>[A-Za-z0-9._]+)-(?P<pid>\d+)-[0-9a-f]{8}")
_PARTIAL = re.compile(r"\.(?P<name>.+)\.partial(?:-.*)?")


@dataclasses.dataclass
class CacheEntry:
    """One entry of the cache, or what a build left beside one."""

    kind: str  #: the kind folder it is in (``imagefolder``, ``statistics``...)
    name: str  #: its file or folder name
    path: Path
    bytes: int  #: the sizes of its files, summed (symlinks not followed)
    mtime: float  #: its last modification (seconds since the epoch)
    #: ``entry``; ``leftover``: the temporary folder of a build that was killed (or still runs);
    #: ``partial``: an interrupted build's resumable work
    state: str = "entry"
    of: str = ""  #: the entry a leftover or partial folder belongs to
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  #: imagefolder: root and image_size
    #: an entry an older ddkit made, which this one never reads (its key or layout changed since): what tells
    #: (``schema 1``); empty for a current entry and for one that records nothing to tell it by
    stale: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "path": str(self.path), "bytes": self.bytes,
                "mtime": self.mtime, "state": self.state, "of": self.of or None, **self.details,
                "stale": self.stale or None}


def tree_bytes(path: str | Path) -> int:
    """The sizes of the files under ``path`` (or of the file itself), summed; symlinks count as themselves,
    never followed, and files that vanish while walked count as nothing."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not os.path.isdir(path) or os.path.islink(path):
        return st.st_size
    total, stack = 0, [os.fspath(path)]
    while stack:
        with contextlib.suppress(OSError), os.scandir(stack.pop()) as it:
            for e in it:
                with contextlib.suppress(OSError):
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    else:
                        total += e.stat(follow_symlinks=False).st_size
    return total


def _entry_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest.json of the cache entry ``path``, or None where there is none or it is damaged."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _details(kind: str, manifest: dict[str, Any] | None) -> dict[str, Any]:
    """What the listing says of an entry besides its size: an imagefolder entry's dataset root and image_size
    (from its ``manifest``)."""
    if kind != "imagefolder":
        return {}
    try:
        settings = manifest.get("settings") or {}
        return {"root": settings.get("root"), "image_size": settings.get("image_size")}
    except AttributeError:  # a damaged entry (no manifest, or settings not a mapping): listed without them
        return {"root": None, "image_size": None}


# an expert buffer's name before ddkit 2026-12-06 added the normalisation's hash to it (now: ...-<8 hex>)
_OLD_EXPERTS_NAME = re.compile(r"[0-9a-f]{16}-[0-9a-f]{16}")
# an expert buffer's name before ddkit 2026-12-07 added the hash of its thread count and device to it
_UNPLACED_EXPERTS_NAME = re.compile(r"[0-9a-f]{16}-[0-9a-f]{16}-[0-9a-f]{8}(?:-r\d+)?")
# the revision an expert buffer's name ends with (trajectory.buffer_for): none at revision 1
_EXPERTS_REVISION = re.compile(r"-r(\d+)$")


def stale_reason(kind: str, path: Path, manifest: dict[str, Any] | None = None) -> str:
    """Why the entry ``path`` of ``kind`` is one an older ddkit made and this one never reads, or "" when it is
    current or records nothing that tells: an imagefolder entry of an older :data:`DECODED_SCHEMA`,
    statistics of an older :data:`STATISTICS_SCHEMA` (recorded since schema 2), an expert buffer
    named without the normalisation part or the thread count and device part, or of an older
    :data:`EXPERTS_REVISION`, a cached student's accuracy
    (random-baseline, distilled-student, full-reference) of an older :data:`ACCURACY_SCHEMA` (keyed without thread
    count and device) or :data:`STUDENT_REVISION`. Cache keys hash these,
    so such an entry is never found again and never replaced: ``ddkit cache prune --stale`` removes it.
    ``manifest``: the entry's, where already read."""
    if kind == "experts":
        if _OLD_EXPERTS_NAME.fullmatch(path.name):
            return "named without its normalisation"
        if _UNPLACED_EXPERTS_NAME.fullmatch(path.name):
            return "named without its thread count and device"
        revision = int(hit[1]) if (hit := _EXPERTS_REVISION.search(path.name)) else 1
        return f"expert revision {revision}" if revision < EXPERTS_REVISION else ""
    if kind in ("random-baseline", "distilled-student", "full-reference"):  # accuracies: keyed without thread count
        # and device before schema 2 (distilled-student entries began at 2)
        return _accuracy_stale(path)
    if kind not in ("imagefolder", "statistics"):
        return ""
    if manifest is None and (manifest := _entry_manifest(path)) is None:  # none, or damaged: not told apart here
        return ""
    if kind == "imagefolder":
        schema, current = manifest.get("schema_version"), DECODED_SCHEMA
    else:
        schema, current = manifest.get("statistics_schema"), STATISTICS_SCHEMA
    return f"schema {schema}" if isinstance(schema, int) and not isinstance(schema, bool) and schema < current else ""


def _accuracy_stale(path: Path) -> str:
    """Why the cached accuracy ``path`` (a JSON file) is of an older :data:`ACCURACY_SCHEMA` or
    :data:`STUDENT_REVISION` (entries record theirs from 2 on), or "" (current, damaged or not such a file)."""
    if path.suffix != ".json":
        return ""
    try:
        entry = json.loads(path.read_text())
        schema, revision = entry.get("schema_version"), entry.get("revision", 1)
    except (OSError, ValueError, RecursionError, AttributeError):
        return ""
    if isinstance(schema, int) and not isinstance(schema, bool) and schema < ACCURACY_SCHEMA:
        return f"schema {schema}"
    old = isinstance(revision, int) and not isinstance(revision, bool) and revision < STUDENT_REVISION
    return f"student revision {revision}" if old else ""


def cache_entries(root: str | Path | None = None) -> list[CacheEntry]:
    """The entries of every kind folder of the cache ``root`` (default :func:`~ddkit.artifacts.cache_dir`), by
    kind and name, with the leftovers of killed builds and interrupted builds' work (``state``); lock files are
    left out (empty)."""
    root = Path(root) if root is not None else cache_dir()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"the cache {str(root)!r} is a file, not a folder; set DDKIT_CACHE to a folder")
    found = []
    kinds = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()
                   and not p.name.startswith(".")) if root.is_dir() else []
    for folder in kinds:
        with contextlib.suppress(OSError):
            for path in sorted(folder.iterdir()):
                name, state, of = path.name, "entry", ""
                if name.startswith("."):
                    if name.endswith(".lock"):
                        continue
                    hit = _LEFTOVER.fullmatch(name) or _PARTIAL.fullmatch(name)
                    if hit is None:
                        continue  # someone else's hidden file
                    state, of = ("leftover" if hit.re is _LEFTOVER else "partial"), hit["name"]
                try:
                    mtime = path.lstat().st_mtime
                except OSError:  # removed meanwhile
                    continue
                if state == "entry":
                    manifest = _entry_manifest(path) if folder.name in ("imagefolder", "statistics") else None
                    details, stale = _details(folder.name, manifest), stale_reason(folder.name, path, manifest)
                else:  # an expert build's work is named as its entry: of an older name, never resumed
                    details, stale = {}, stale_reason(folder.name, folder / of) if folder.name == "experts" else ""
                found.append(CacheEntry(folder.name, name, path, tree_bytes(path), mtime, state, of, details, stale))
    return found


def cache_summary(entries: list[CacheEntry]) -> dict[str, dict[str, int]]:
    """Per kind: the number of entries and their bytes, and the same of leftovers and partial work."""
    kinds: dict[str, dict[str, int]] = {}
    for e in entries:
        row = kinds.setdefault(e.kind, {"entries": 0, "bytes": 0, "leftovers": 0, "leftover_bytes": 0,
                                        "partial": 0, "partial_bytes": 0})
        count, size = {"entry": ("entries", "bytes"), "leftover": ("leftovers", "leftover_bytes"),
                       "partial": ("partial", "partial_bytes")}[e.state]
        row[count] += 1
        row[size] += e.bytes
    return kinds


@dataclasses.dataclass
class PruneResult:
    removed: list[CacheEntry]  #: removed (with ``dry_run``: what would be)
    skipped: list[tuple[CacheEntry, str]]  #: selected but kept, and why
    dry_run: bool = False

    @property
    def freed(self) -> int:
        return sum(e.bytes for e in self.removed)


@contextlib.contextmanager
def _unused(entry: Path) -> Iterator[str | None]:
    """Hold ``entry``'s build lock for the block if no process holds it: yields None, or why the entry is in use
    (or cannot be locked). A lock file that is missing is not made: no process builds the entry then. A lock file
    removed or replaced between its open and its lock (by :func:`~ddkit.artifacts.remove_unused_lock`, whereupon a
    builder makes a new one) is not the lock any more: the file there now is locked instead, as
    :func:`~ddkit.artifacts.build_lock` does."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield None
        return
    lock = _lock_file(entry)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            yield None
            return
        except OSError as exc:
            yield f"cannot open its lock file ({exc.strerror})"
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            yield ("in use: a process is building or reading it" if isinstance(exc, BlockingIOError)
                   else f"cannot lock it ({exc.strerror})")
            return
        if _names(lock, fd):
            break
        os.close(fd)  # an orphan: a builder may hold the file at that path now
    try:
        yield None
    finally:
        os.close(fd)


def prune_cache(kinds: list[str] | None = None, older_than: float | None = None, everything: bool = False,
                dry_run: bool = False, root: str | Path | None = None, stale: bool = False) -> PruneResult:
    """Remove whole entries of the cache ``root``: those of ``kinds`` (default every kind), last modified more
    than ``older_than`` days ago (default any time), with ``stale`` only those an older ddkit made that this one
    never reads (:func:`stale_reason`); ``everything`` selects all of them. Refuses to run with no
    selection at all. An entry that a process holds the build lock of (see :func:`~ddkit.artifacts.build_lock`)
    is skipped; the others are removed under their lock, with their lock file. The temporary folders of killed
    builds are removed where :func:`~ddkit.artifacts.sweep_leftovers` would remove them (a process of this host
    that no longer runs); an interrupted build's resumable work goes as its entry would. ``dry_run``: remove
    nothing, return what would go."""
    if not kinds and older_than is None and not everything and not stale:
        raise ConfigError("`ddkit cache prune` needs a selection: --kind KIND, --older-than DAYS, --stale or --all "
                          "(`ddkit cache` lists the kinds)")
    if older_than is not None and not older_than >= 0:
        raise ConfigError(f"--older-than must be a number of days >= 0, not {older_than}")
    entries = cache_entries(root)
    if kinds:
        known = sorted({*KINDS, *(e.kind for e in entries)})
        unknown = [k for k in kinds if k not in known]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], known, n=1)
            raise ConfigError(f"unknown cache kind {unknown[0]!r}{f'; did you mean {close[0]!r}?' if close else ''} "
                              f"(kinds: {', '.join(known)})")
    now = time.time()
    chosen = [e for e in entries if (not kinds or e.kind in kinds)
              and (older_than is None or now - e.mtime > older_than * 86400) and (not stale or e.stale)]
    result = PruneResult([], [], dry_run)
    origin = _origin()
    for e in chosen:
        if e.state == "leftover":
            hit = _LEFTOVER.fullmatch(e.name)
            if hit["origin"] != origin:
                result.skipped.append((e, "a build's on another host, which may still run"))
            elif _alive(int(hit["pid"])):
                result.skipped.append((e, f"its build (process {hit['pid']}) still runs"))
            elif (failed := None if dry_run else _remove(e.path)) is not None:
                result.skipped.append((e, failed))
            else:
                result.removed.append(e)
            continue
        owner = e.path.with_name(e.of) if e.state == "partial" else e.path
        with _unused(owner) as busy:
            if busy is not None:
                result.skipped.append((e, busy))
                continue
            if (failed := None if dry_run else _remove(e.path)) is not None:
                result.skipped.append((e, failed))
                continue
        result.removed.append(e)
        if not dry_run and not owner.exists():
            remove_unused_lock(owner)
    for e in result.removed:
        log.info("%s %s (%d bytes)", "would remove" if dry_run else "removed", e.path, e.bytes)
    return result


def _remove(path: Path) -> str | None:
    """Remove an entry as a whole: renamed out of the way first (a reader finds it whole or not at all), then
    deleted; None, or why it could not be removed. What a failed deletion leaves is a killed build's leftover
    (of this process), which the next prune removes."""
    try:
        if path.is_dir() and not path.is_symlink():
            gone = temp_path(path, "old")
            os.rename(path, gone)
            shutil.rmtree(gone, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:  # another prune's
        pass
    except OSError as exc:
        return f"cannot remove it ({exc.strerror})"
    return None


def size_text(n: int) -> str:
    """``n`` bytes for people: 512 B, 3.4 kB, 12.3 MB, 190 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"
