"""Versioned on-disk artifacts shared by all stages.

Every artifact is a directory with a ``manifest.json`` (``schema_version``, ``kind``, the resolved
config, the seed, package versions) and tensors in safetensors files. Directories are written to a
temporary sibling and renamed into place at the end, so a crash or a bad input never leaves a
partial artifact behind. Nothing here unpickles data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import re
import shutil
import socket
import stat
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddkit.config import is_count, short_repr
from ddkit.errors import DDKitError

if TYPE_CHECKING:  # torch is imported where tensors are read or written: listing and showing records need none
    import torch

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# the collector of shared_costs(), when one is open
_SHARED_COSTS: ContextVar[list[dict[str, Any]] | None] = ContextVar("ddkit_shared_costs", default=None)


@functools.cache
def _versions() -> tuple[tuple[str, str], ...]:
    import torch

    from ddkit import __version__

    return (
        ("ddkit", __version__),
        ("torch", str(torch.__version__)),  # a TorchVersion, which weights_only loading refuses
        ("torchvision", _torchvision_version()),
        ("python", platform.python_version()),
    )


def _torchvision_version() -> str:
    """torchvision's ``__version__`` (``0.29.1+cu130``: the build, which the package metadata leaves out), read from
    its ``version.py`` when it is not imported yet: importing it takes seconds, a no-op rerun of a run or bench
    about a third of its time."""
    if "torchvision" not in sys.modules:
        import importlib.util

        spec = importlib.util.find_spec("torchvision")
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            with contextlib.suppress(OSError):
                found = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""",
                                  Path(folder, "version.py").read_text(encoding="utf-8"), re.M)
                if found:
                    return found.group(1)
    import torchvision

    return str(torchvision.__version__)


def versions() -> dict[str, str]:
    """Versions of the code that produced an artifact (read once per process)."""
    return dict(_versions())


def cache_dir(kind: str = "") -> Path:
    """ddkit's cache (``$DDKIT_CACHE``, else ``~/.cache/ddkit``), or its ``kind`` folder in it
    (``imagefolder``, ``statistics``, ``experts``, ``full-reference``, ``random-baseline``, ``distilled-student``;
    ``ddkit cache`` lists and prunes them)."""
    root = Path(os.environ.get("DDKIT_CACHE") or Path.home() / ".cache" / "ddkit")
    return root / kind if kind else root


# --- temporary names, and what a killed process leaves ------------------------------------------


def _origin() -> str:
    """Where this process runs, as a name part: the host and (on Linux) the PID namespace, so that a
    process id in a temporary name is only ever checked where it means the same process."""
    where = socket.gethostname()
    with contextlib.suppress(OSError):
        where += "_" + os.readlink("/proc/self/ns/pid").removeprefix("pid:").strip("[]")
    return re.sub(r"[^A-Za-z0-9.]", "_", where) or "host"


# A file name may hold 255 bytes (NAME_MAX), and ddkit's hidden names add to the output's name up to a temporary's
# suffix: ".tmp-" + origin (a host name of up to 64 bytes, "_", a 10-digit PID namespace) + "-" + a 7-digit PID +
# "-" + 8 hex digits. A longer output name is embedded shortened, the same on every host (a checkpoint resumes
# anywhere): see work_name.
NAME_MAX = 255
_LONGEST_SUFFIX = len(".tmp-") + 64 + 1 + 10 + 1 + 7 + 1 + 8
# the names work_name shortened in this process, so that output_for can name the output the user gave
_SHORTENED: dict[str, str] = {}


def work_name(name: str) -> str:
    """``name`` as ddkit embeds it in the hidden names of its work beside the output ``name`` (``.<name>.tmp-...``,
    ``.<name>.partial``, ``.<name>.work``, ``.<name>.resume-<hash>.pt``, ``.<name>.lock``): ``name`` itself,
    or, where the hidden name could exceed NAME_MAX bytes, its first bytes, ``~`` and 16 hex digits of its
    sha256 (so that a legal output name is not refused as "File name too long")."""
    room = NAME_MAX - 1 - _LONGEST_SUFFIX
    raw = os.fsencode(name)
    if len(raw) <= room:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    short = raw[:room - 17].decode("utf-8", "ignore") + f"~{digest}"  # "ignore": no character cut in two
    _SHORTENED[short] = name
    return short


def hidden_path(path: str | Path, suffix: str) -> Path:
    """The hidden sibling ``.<name><suffix>`` of ``path`` where ddkit keeps work for it (``suffix``: ``.partial``,
    ``.work``, ``.resume-<hash>.pt``...), the name shortened as :func:`work_name` says."""
    path = Path(path)
    return path.with_name(f".{work_name(path.name)}{suffix}")


def temp_path(final: Path, what: str = "tmp") -> Path:
    """A hidden name beside ``final`` for this process's temporary file or folder ``what`` (``tmp``, or
    ``old`` for a folder being replaced): ``.<name>.<what>-<origin>-<pid>-<random>``, which
    :func:`sweep_leftovers` recognises once the process is gone."""
    return hidden_path(final, f".{what}-{_origin()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


# hidden names ddkit keeps beside an output while it is made: temporaries, checkpoints, work folders
_HIDDEN_FOR = re.compile(
    r"\.(?P<name>.+?)\.(?:(?:tmp|old)-[A-Za-z0-9._]+-\d+-[0-9a-f]{8}|resume-\w+\.pt|work|partial(?:-.*)?)")


def output_for(path: str | Path) -> Path:
    """The output a path of ddkit's hidden work stands for (``.t.resume-<hash>.pt`` and its temporary
    ``..t.resume-<hash>.pt.tmp-...`` for ``t``, ``.d.work/<key>/dm.pt`` for ``d``), so that an error
    names what the user asked for; any other path unchanged."""
    path = Path(path)
    for i, part in enumerate(path.parts):
        name = part
        while (found := _HIDDEN_FOR.fullmatch(name)) is not None:
            name = _SHORTENED.get(found["name"], found["name"])
        if name != part:
            return Path(*path.parts[:i], name)
    return path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or not a process id here
        return True
    return True


def sweep_leftovers(final: str | Path) -> list[Path]:
    """Remove the temporary files and folders that killed processes (SIGKILL, power loss: no cleanup
    runs) left beside ``final`` (see :func:`temp_path`); returns them. Only names made on this host
    and PID namespace by a process that no longer runs are touched: a live writer's, another
    machine's on a shared filesystem, or anything else hidden there is left alone."""
    final = Path(final)
    pattern = re.compile(
        rf"\.{re.escape(work_name(final.name))}\.(?:tmp|old)-(?P<origin>[A-Za-z0-9._]+)-(?P<pid>\d+)-[0-9a-f]{{8}}")
    try:
        entries = list(final.parent.iterdir())
    except OSError:  # no folder yet, or not readable: nothing of ours there
        return []
    origin, removed = _origin(), []
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if found is None or found["origin"] != origin or _alive(int(found["pid"])):
            continue
        _remove(entry)
        log.info("removed %s, left by a process that was killed while writing %s", entry.name, final.name)
        removed.append(entry)
    return removed


def _remove(entry: Path) -> None:
    """Delete ``entry``, whatever it is: a folder with what it holds, or a file or symbolic link (the link, not
    what it points to). A missing or undeletable entry is left for :func:`sweep_leftovers` to try again."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            entry.unlink()


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    """Yield an empty temporary file beside ``path`` (once dead writers' leftovers are swept; its folder
    made if missing, as :func:`atomic_dir` makes an output's) that replaces ``path`` if the block succeeds
    and is removed if it fails. A folder or temporary that cannot be made is a :class:`WriteFailure`
    naming ``path``, not the hidden temporary. A ``path`` that is a symbolic link is written where it points."""
    if path.is_symlink():
        path = path.resolve()
    check_output_file(path)
    sweep_leftovers(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # made 0666, as open() makes a file: the kernel applies the process's umask (and a folder's default ACL) of
        # this write, which the file keeps (a writer that makes the file anew, as safetensors does, gets it back).
        # No umask read at import, none set and restored (which would race with the caller's threads).
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        os.close(fd)
    except OSError as exc:
        raise WriteFailure(path, exc.strerror or str(exc), exc.errno) from None
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is None:  # a failed write() names no file: name the one being written
            exc.filename = str(path)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def recorded_path(path: str | Path | None) -> str | None:
    """How a record names another artifact's folder: absolute (against the current folder), so the
    record still finds it from another working folder; None for one never saved."""
    return str(Path(path).absolute()) if path else None


def recorded_paths(section: dict, keys: tuple[str, ...]) -> dict:
    """``section`` (a config's dict) with the paths under ``keys`` (a string, or a list of strings) made absolute
    as :func:`recorded_path` does, so a record of the config finds the same files from another working folder;
    a bench's ``"@name"`` reference to its teacher pool stays as it is."""
    out = dict(section)
    for key in keys:
        value = out.get(key)
        if isinstance(value, list):
            out[key] = [recorded_paths({key: v}, (key,))[key] for v in value]
        elif isinstance(value, str) and value and not value.startswith("@"):
            out[key] = recorded_path(value)
    return out


def check_output_file(path: str | Path) -> None:
    """Refuse an output file path that ``write_text`` could not write: a folder, or one inside a file."""
    path = Path(path)
    if path.is_dir():
        raise DDKitError(f"output {str(path)!r} is a folder; give a file path")
    _refuse_file_parent(path)


def check_writable(path: str | Path, inside: bool = False) -> None:
    """Refuse, as a :class:`WriteFailure` naming ``path``, an output that this process cannot create: a temporary
    file is made (as :func:`write_text` makes one) and removed in its folder (``inside``: in ``path`` itself where it
    is a folder, for an output folder a command fills in place, a run's or a bench's), or, where that is missing, in
    the nearest folder above it (where the missing ones would be made, which the message then names), so that a
    command that writes its output last fails before its work, not after it. Under torchrun only rank 0 writes
    outputs: it tries the folder, and every rank stops on its verdict (a rank of another node that cannot write
    there does not stop alone, leaving the others waiting)."""
    from ddkit import distributed as ddist

    path, failure = Path(path), None
    if ddist.current().is_main:
        folder = next((p for p in [*([path] if inside else []), *path.parents] if p.is_dir()), path.parent)
        probe = temp_path(folder / path.name)
        try:
            os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except OSError as exc:
            where = f" in {str(folder)!r}" if folder not in (path, path.parent) else ""
            failure = (str(path), f"{exc.strerror or exc}{where}", exc.errno)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(probe)
    failure = ddist.broadcast_object(failure)
    if failure is not None:
        raise WriteFailure(*failure)


def _refuse_file_parent(path: Path) -> None:
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise DDKitError(f"output {str(path)!r} lies inside {str(parent)!r}, which is a file; give another path")


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically (temp file in the same folder + rename): readers never see half a file."""
    with _atomic_file(Path(path)) as tmp:
        tmp.write_text(text)


def copy_file(src: str | Path, path: str | Path) -> None:
    """Copy the file ``src`` to ``path`` atomically, as :func:`write_text`: a failed write names ``path`` (not
    ``src``, as ``shutil.copyfile``'s error does) and leaves no half file."""
    data = Path(src).read_bytes()
    path = Path(path)
    with _atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (:func:`write_text`)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_results(path: str | Path, result: Any, markdown: str) -> Path:
    """A benchmark's output: ``result`` as JSON at ``path`` and ``markdown`` beside it (``.md``), each
    written atomically; returns the markdown's path."""
    path = Path(path)
    write_json(path, result)
    md = path.with_suffix(".md")
    write_text(md, markdown)
    return md


def read_json(path: str | Path, what: str = "file", mapping: bool = True) -> dict[str, Any]:
    """A JSON file ddkit wrote; ``mapping``: it must hold an object (every ddkit record does), which its
    callers read with ``.get``."""
    path = Path(path)
    if not path.is_file():
        raise DDKitError(f"{what} {str(path)!r} not found; check the path")
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # bad JSON or bytes, a 5000-digit number, arrays nested too deep
        raise DDKitError(f"{what} {str(path)!r} is corrupt ({exc.__class__.__name__}); re-create it") from None
    if mapping and not isinstance(data, dict):
        raise DDKitError(f"{what} {str(path)!r} is corrupt (a JSON {type(data).__name__}, not an object); re-create it")
    return data


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save tensors to safetensors atomically; returns the file's sha256 (what a manifest's
    :data:`FILES_SHA256` records). ``metadata``: at most one entry, since safetensors writes
    several in an order that changes from call to call, and equal tensors must give equal bytes."""
    if metadata is not None and len(metadata) > 1:
        raise ValueError("save_tensors takes at most one metadata entry (several make the file's bytes vary), got "
                         f"{sorted(metadata)}")
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    with _atomic_file(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        except SafetensorError as exc:  # a failed write: "... I/O error: No space left on device (os error 28)"
            code = int(found[1]) if (found := re.search(r"\(os error (\d+)\)", str(exc))) else None
            raise WriteFailure(path, os.strerror(code) if code else str(exc).splitlines()[0], code) from None
        sha = file_sha256(tmp)  # read back from the page cache: about as fast as hashing the bytes in memory
    return sha


# the manifest field of an artifact's tensor files' sha256, by file name: {"images.safetensors": "ab12..."}.
# Not part of any identity (config hashes, store identity): it says which bytes the artifact holds, not
# what made them. Artifacts written before ddkit recorded it load without the check.
FILES_SHA256 = "files_sha256"
# file_sha256 of the files this process read, by (path, device, inode, size, mtime, ctime): a store or set
# that a bench loads for every cell is hashed once; a file written or replaced since is hashed again
_SHA256_READ: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 (64 hex digits) of a file's bytes, read a chunk at a time (no copy of the file in memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_sha256(manifest: dict[str, Any], folder: Path, name: str, kind: str, what: str = "file",
                 fix: str = "re-create it") -> None:
    """Refuse the tensor file ``name`` of the ``kind`` artifact in ``folder`` unless its bytes have the sha256
    that the artifact's manifest records under :data:`FILES_SHA256` (a file swapped or edited since it
    was written); no check for an artifact written before ddkit recorded them (no such field)."""
    recorded = manifest.get(FILES_SHA256)
    if recorded is None:
        return
    want = recorded.get(name) if isinstance(recorded, dict) else None
    if not isinstance(want, str):
        raise DDKitError(f"{str(folder / MANIFEST)!r} holds no sha256 of {name!r} in {FILES_SHA256}; the manifest is "
                         f"damaged: re-create the {kind} artifact")
    path = folder / name
    try:
        st = path.stat()
        key = (str(path.absolute()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key not in _SHA256_READ:
            _SHA256_READ[key] = file_sha256(path)
    except OSError:
        return  # missing or unreadable: load_tensors refuses it
    if _SHA256_READ[key] != want:
        raise DDKitError(f"{what} {str(path)!r} does not match its manifest (sha256); {fix}")


def load_tensors(path: str | Path, what: str = "tensor file") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        raise DDKitError(f"{what} {str(path)!r} is a folder, not a file; the artifact is damaged, re-create it")
    if not path.is_file():
        raise DDKitError(f"{what} {str(path)!r} not found; the artifact is incomplete, re-create it")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DDKitError(f"{what} {str(path)!r} is corrupt ({str(exc).splitlines()[0]}); re-create it") from None


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file beside ``path`` and rename (for resume states read back with
    ``weights_only=True``)."""
    import torch

    path = Path(path)
    # Python writes the bytes: a failure is an OSError with its errno
    with _atomic_file(path) as tmp, torch_write_failures(path, tmp), open(tmp, "wb") as f:
        torch.save(obj, f)


@contextlib.contextmanager
def torch_write_failures(path: Path, tmp: Path) -> Iterator[None]:
    """Turn a failed ``torch.save`` to ``tmp``, the temporary file of the output ``path``, into one line
    naming ``path`` (:func:`write_failure`) instead of torch's traceback."""
    try:
        yield
    except OSError as exc:
        raise WriteFailure(path, exc.strerror or str(exc), exc.errno) from None
    except RuntimeError as exc:  # torch's own report of a write cut short ("unexpected pos 64 vs 0")
        code = _why_cut_short(tmp)
        cause = os.strerror(code) if code else f"could not write ({str(exc).splitlines()[0]})"
        raise WriteFailure(path, cause, code) from None


def _why_cut_short(path: Path) -> int | None:
    """The likely errno of a write to ``path`` that a library reported without one: EFBIG where the file
    reached this process's file-size limit (RLIMIT_FSIZE), ENOSPC where its disk has under 1 MiB free."""
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and path.stat().st_size >= limit:
            return errno.EFBIG
    with contextlib.suppress(OSError):
        if shutil.disk_usage(path.parent).free < 2**20:
            return errno.ENOSPC
    return None


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX, or the name unknown here
        return None


def check_room(need: int, what: str, fix: str, folder: str | Path | None = None) -> None:
    """Refuse in one line, before the work that would fill it, ``what`` (e.g. ``the store's logits``) of ``need``
    bytes that cannot fit: on the disk of ``folder`` (of the nearest folder above it that exists: an output not made
    yet), or, without ``folder``, in this machine's memory; ``fix`` names the setting to lower. A size the system
    cannot be asked about is let through (a failed allocation then ends the command in one line all the same)."""
    from ddkit.cache import size_text

    if folder is not None:
        folder = next((p for p in (Path(folder), *Path(folder).absolute().parents) if p.is_dir()), None)
        try:
            room = shutil.disk_usage(folder).free if folder is not None else None
        except OSError:
            room = None
        where = f"free on the disk of {str(folder)!r}"
    else:
        room, where = memory_bytes(), "of memory on this machine"
    if room is not None and need > room:
        raise DDKitError(f"{what} would take {size_text(need)}, more than the {size_text(room)} {where}; {fix}")


class WriteFailure(DDKitError):
    """A library's failed write of the file ``path`` (safetensors, ``torch.save``), as one line
    (:func:`write_failure`); ``path``, ``cause`` and ``errno`` say which file and why, for a caller that falls back."""

    def __init__(self, path: str | Path, cause: str, code: int | None = None) -> None:
        super().__init__(write_failure(path, cause, code))
        self.path, self.cause, self.errno = Path(path), cause, code


def write_failure(path: str | Path | None, cause: str, code: int | None = None) -> str:
    """One line for a failed write of ``path`` (``cause``: why, ``code``: its errno where known), naming the
    output the user gave (:func:`output_for`), not ddkit's hidden temporary beside it, and the fix the cause
    calls for."""
    where = f" {str(output_for(path))!r}" if path is not None else ""
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on that disk or choose another --out"
    elif code == errno.EFBIG:
        fix = ("a limit on file size (ulimit -f) or a quota stops this file; raise the limit or choose another "
               "--out")
    elif code == errno.EROFS:
        fix = "choose another --out"
    else:
        fix = "check the path and its permissions, or choose another --out"
    return f"cannot write{where}: {cause}; {fix}"


def quiet_torch_load(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, without the warnings torch prints for some
    files it refuses (a plain pickle): the caller turns the refusal into its own one-line error."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def load_failure(exc: BaseException) -> str:
    """Why ``torch.load`` refused a file, in a few words (torch's refusal of a pickle runs to a page)."""
    text = str(exc).strip()
    if text.startswith("Weights only load failed"):
        return "it holds Python objects that safe (weights_only) loading refuses"
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 120 else line[:117] + "..."


def load_resume_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint :func:`atomic_torch_save` wrote for resuming, read with ``weights_only=True``. One
    that cannot be read (damaged on disk, or not a ddkit checkpoint) is a one-line error: resuming is
    impossible, and deleting it starts the work afresh."""
    path = Path(path)
    try:
        state = quiet_torch_load(path)
    except Exception as exc:  # a damaged zip, a pickle weights_only refuses, an unreadable file
        raise DDKitError(f"resume checkpoint {str(path)!r} cannot be read ({load_failure(exc)}); delete it to start "
                         "afresh") from None
    if not isinstance(state, dict):
        raise DDKitError(f"resume checkpoint {str(path)!r} holds a {type(state).__name__}, not a ddkit checkpoint; "
                         "delete it to start afresh")
    return state


# files that name the kind of what a folder holds: an artifact's manifest, an export's meta or class
# list, a bench folder's config (a run folder's config.json records no kind)
KIND_FILES = ("manifest.json", "meta.json", "classes.json", "config.json")


def file_kind(path: Path) -> str | None:
    """The ``kind`` recorded in a ddkit JSON record at ``path``, or None (missing, not JSON, no kind)."""
    if path.is_file():
        with contextlib.suppress(OSError, ValueError, RecursionError):
            record = json.loads(path.read_text())
            kind = record.get("kind") if isinstance(record, dict) else None
            if isinstance(kind, str):
                return kind
    return None


def folder_kind(path: Path) -> str | None:
    """The ``kind`` recorded in a ddkit output folder (manifest, export meta, bench config), or None."""
    return next((kind for name in KIND_FILES if (kind := file_kind(path / name)) is not None), None)


def holds_files(out: Path, ignore_hidden: bool = False) -> bool:
    """Whether the output folder ``out`` exists with something in it (``ignore_hidden``: besides
    dot-entries, a resumable command's work folders); a file where the folder should be is an error."""
    if not out.exists() and not out.is_symlink():
        return False
    if not out.is_dir():
        raise DDKitError(f"output {str(out)!r} is a file, not a folder; choose another --out or remove the file")
    return any(not (ignore_hidden and p.name.startswith(".")) for p in out.iterdir())


def check_output_dir(final: Path, kind: str | None) -> None:
    """Refuse to replace ``final`` unless it is missing, an empty folder, or a ddkit output of ``kind``
    (any ddkit output when ``kind`` is None): --out must never delete a user's files, nor the folder
    the command runs in (an output is replaced whole, by a rename next to it); and refuse (a :class:`WriteFailure`,
    :func:`check_writable`) a ``final`` in a folder this process cannot write. Called by every rank of a torchrun
    job at once, at a command's start: its verdict is rank 0's."""
    _check_replaceable(final, kind)
    check_writable(final)


def refuse_current_folder(out: Path, why: str) -> None:
    """Refuse, in one line ending in the fix, an output folder ``out`` that is the current folder or one above it
    (``.``, ``""``, ``..``), for the reason ``why``."""
    here = Path.cwd().resolve()
    if Path(out).resolve() in (here, *here.parents):
        raise DDKitError(f"output {str(out)!r} is the current folder or holds it, and {why}; give a subfolder, e.g. "
                         "--out ./out")


def _check_replaceable(final: Path, kind: str | None) -> None:
    """:func:`check_output_dir`'s checks of what ``final`` holds, without the write test (:func:`atomic_dir`,
    which rank 0 alone calls, reports a folder it cannot write itself)."""
    final = Path(final)
    refuse_current_folder(final, "an output folder is replaced whole")
    _refuse_file_parent(final)
    if not holds_files(final):
        return
    found = folder_kind(final)
    if found is None:
        why = "its manifest.json is damaged or not ddkit's" if (final / MANIFEST).exists() else "no manifest"
        raise DDKitError(f"output {str(final)!r} exists and is not a ddkit output ({why}); choose another --out "
                         "or remove it")
    if kind is not None and found != kind:
        raise DDKitError(f"output {str(final)!r} holds a ddkit {found!r} output, where "
                         f"{'an' if kind[0] in 'aeiou' else 'a'} {kind!r} output would go; choose another "
                         "--out or remove it")


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, kind: str | None = None,
               accept: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``final`` only if the block succeeds.

    An existing ``final`` is replaced only when it is an empty folder or a ddkit output of ``kind``
    (see :func:`check_output_dir`), or when ``accept(final)`` says it is one an older ddkit wrote
    without a manifest; otherwise a one-line error. A ``final`` that is a symbolic link is written where it
    points (the link stays and names the new output)."""
    final = Path(final)
    if final.is_symlink():
        final = final.resolve()
    if accept is None or not (final.is_dir() and accept(final)):
        _check_replaceable(final, kind)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DDKitError(f"cannot create the output folder {str(final.parent)!r} ({exc.strerror}); choose "
                         "another --out") from None
    sweep_leftovers(final)
    tmp = temp_path(final)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise DDKitError(f"cannot write in {str(final.parent)!r} ({exc.strerror}); choose another --out") from None
    try:
        yield tmp
        olds = _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if olds and any(olds[0].iterdir()):  # a rerun with other settings must not replace the earlier output unannounced
        log.warning("replaced the earlier %s in %s", folder_kind(olds[0]) or "output", final)
    for old in olds:
        _remove(old)


def _swap_in(tmp: Path, final: Path, tries: int = 20) -> list[Path]:
    """Rename the finished folder ``tmp`` to ``final``, moving an existing ``final`` aside first; returns the
    folders moved aside, for the caller to remove. Another writer to ``final`` that finishes at the same time
    (two runs to one --out) can move ``final`` away, or put its own there, between the two renames: each
    rename is then tried again, and the last writer's output stays. On a failure the output moved aside
    is put back where it is still free."""
    olds: list[Path] = []
    try:
        for _ in range(tries):
            if final.exists() or final.is_symlink():
                old = temp_path(final, "old")
                try:
                    os.replace(final, old)
                except FileNotFoundError:  # the other writer moved it aside first
                    continue
                olds.append(old)
            try:
                os.replace(tmp, final)
                return olds
            except OSError as exc:  # the other writer put its output there in between
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
        raise OSError(errno.EBUSY, "other processes keep replacing it; give each run its own --out", str(final))
    except BaseException:
        if olds and not (final.exists() or final.is_symlink()):
            with contextlib.suppress(OSError):
                os.replace(olds.pop(), final)
        for old in olds:
            _remove(old)
        raise


def base_manifest(kind: str, config: Any, seed: int | None) -> dict[str, Any]:
    """The fields every artifact holds. ``run`` records what besides config, seed and versions
    changes the numbers: the CPU thread count (float summation order) and the number of processes."""
    import torch

    from ddkit.distributed import current

    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "seed": seed,
        "config": config,
        "versions": versions(),
        "run": {"torch_threads": torch.get_num_threads(), "world_size": current().world_size},
    }


def artifact_folder(path: str | Path, kind: str = "artifact") -> Path:
    """An artifact's folder from ``path``: the folder itself, or the folder of its ``manifest.json``;
    ``path`` of another type (a number, None) is refused naming the ``kind`` meant."""
    if not isinstance(path, (str, os.PathLike)):
        raise DDKitError(f"the {kind} path must be a folder path (str or Path), got {type(path).__name__} {path!r}; "
                         f"pass the folder of a {kind} artifact")
    path = Path(path)
    return path.parent if path.is_file() and path.name == MANIFEST else path


def read_manifest(path: str | Path, kind: str,
                  require: dict[str, type | tuple[type, ...]] | None = None) -> dict[str, Any]:
    """Read and check an artifact's manifest: a JSON object of ``kind`` and a schema version this
    ddkit reads, holding every key of ``require`` (dotted paths for nested keys) with a value of
    the given type or types (``(int, type(None))``: present, an integer or null; a bool is no int)."""
    path = artifact_folder(path, kind)
    if not path.exists():
        raise DDKitError(f"{kind} artifact {str(path)!r} not found; check the path or create it first")
    if path.is_file():
        raise DDKitError(f"{str(path)!r} is a file, not a {kind} artifact (a folder holding {MANIFEST}); pass the "
                         f"artifact's folder")
    manifest = read_json(path / MANIFEST, what=f"{kind} manifest", mapping=False)  # checked below, naming the kind
    if not isinstance(manifest, dict):
        raise DDKitError(f"{str(path / MANIFEST)!r} is not a JSON object; re-create the {kind} artifact")
    if manifest.get("kind") != kind:
        raise DDKitError(
            f"{str(path)!r} is a {manifest.get('kind', 'unknown')!r} artifact, not a {kind!r}; pass a {kind} directory"
        )
    check_schema_version(manifest, path / MANIFEST, f"the manifest is damaged: re-create the {kind} artifact", path)
    check_fields(manifest, require or {}, path, kind)
    return manifest


def check_schema_version(record: dict[str, Any], file: Path, fix: str, name: Path | None = None,
                         required: bool = True) -> None:
    """Refuse in one line a ddkit record (a manifest, an evaluation report, a bench table, read from ``file``) whose
    ``schema_version`` is no version number (damaged: ``fix`` says what to do) or one newer than this ddkit reads (a
    newer ddkit may have changed what its fields mean); ``name``: what the second message names (an artifact's
    folder), default ``file``. A record without one is taken where not ``required`` (JSON records of older ddkit)."""
    version = record.get("schema_version")
    if version is None and not required:
        return
    if not is_count(version):
        raise DDKitError(f"{str(file)!r} holds schema_version {version!r}, not a version number; {fix}")
    if version > SCHEMA_VERSION:
        raise DDKitError(f"{str(name or file)!r} has schema_version {version!r}, newer than this ddkit understands "
                         f"({SCHEMA_VERSION}); upgrade ddkit")


def member(folder: Path, name: Any, manifest: str | Path, field: str, fix: str) -> Path:
    """``folder / name`` for the file (or stage folder) ``name`` that the manifest at ``manifest`` gives in
    ``field``, refused in one line ending in ``fix`` where it could lead out of ``folder``: not a plain
    name (absolute, ``..``, or holding a separator), or a link that resolves outside the folder. A folder
    that is itself a link is fine: the name is resolved against the folder's own target."""
    # one plain name: with no separator, '..' can only lead out as the whole name ('a..b' is a fine name)
    inside = (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name and "/" not in name
              and "\\" not in name and os.sep not in name and not Path(name).is_absolute())
    path = folder / name if inside else folder
    if inside and (path.exists() or path.is_symlink()):
        try:
            root = folder.resolve(strict=True)
            real = path.resolve(strict=True)
            inside = real != root and real.is_relative_to(root)
        except (OSError, RuntimeError):  # a dangling link, or a loop
            inside = False
    if not inside:
        raise DDKitError(f"{str(manifest)!r} names {name!r} as {field}, which leads outside the artifact's folder; the "
                         f"manifest is damaged: {fix}")
    return path


def check_fields(manifest: dict[str, Any], require: dict[str, type | tuple[type, ...]], path: str | Path,
                 kind: str) -> None:
    """Check that the manifest of the ``kind`` artifact at ``path`` holds every key of ``require`` (as
    :func:`read_manifest` does), for fields required only when others hold some value."""
    missing = object()
    for key, tp in require.items():
        types = tp if isinstance(tp, tuple) else (tp,)
        value: Any = manifest
        for part in key.split("."):
            value = value.get(part, missing) if isinstance(value, dict) else missing
        if value is missing or not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise DDKitError(f"{str(Path(path) / MANIFEST)!r} lacks {key!r} (a {names}) or holds "
                             f"{None if value is missing else value!r} there; the manifest is damaged: re-create the "
                             f"{kind} artifact")


@contextlib.contextmanager
def damaged_record(where: str | Path, what: str, fix: str,
                   errors: tuple[type[Exception], ...] = (KeyError, TypeError, ValueError)) -> Iterator[None]:
    """Turn what reading a hand-edited or truncated record raises (a missing field: KeyError; a field of
    the wrong type: one of ``errors``) into a one-line error naming ``where`` as ``what`` and the ``fix``;
    a DDKitError (a ValueError too, for ConfigError) passes unchanged."""
    try:
        yield
    except DDKitError:
        raise
    except errors as exc:
        problem = f"without the field {exc}" if isinstance(exc, KeyError) else f"with a field of the wrong type ({exc})"
        raise DDKitError(f"{str(where)!r} is {what} {problem}; {fix}") from None


def check_classes(classes: Any, path: str | Path, kind: str, key: str = "dataset.classes") -> None:
    """Check the class names an artifact's manifest records at ``key``: a non-empty list of strings
    (exports name their folders after them, evaluation compares them across artifacts)."""
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise DDKitError(f"{str(Path(path) / MANIFEST)!r} holds {key} {classes!r}, not a list of class names; the "
                         f"manifest is damaged: re-create the {kind} artifact")


def check_normalisation(manifest: dict[str, Any], channels: int, path: str | Path, kind: str) -> None:
    """Check the ``dataset.mean`` / ``dataset.std`` of an artifact's manifest: one finite number per
    image channel, every std above 0 (a zero std would turn every normalised pixel into inf or NaN)."""
    described = manifest.get("dataset") if isinstance(manifest.get("dataset"), dict) else {}
    for key in ("mean", "std"):
        values = described.get(key)
        ok = (isinstance(values, list) and len(values) == channels
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
              and (key == "mean" or all(v > 0 for v in values)))
        if not ok:
            need = "positive number" if key == "std" else "finite number"
            raise DDKitError(f"{str(Path(path) / MANIFEST)!r} holds dataset.{key} {values!r}, not one {need} per image "
                             f"channel ({channels}); the manifest is damaged: re-create the {kind} artifact")
    # finite, but so large or small that normalising (in float32, as training does) makes inf or NaN of pixels
    import torch

    mean, std = (torch.tensor(described[key], dtype=torch.float32) for key in ("mean", "std"))
    if not all(math.isfinite(v) for edge in (0.0, 1.0) for v in ((edge - mean) / std).tolist()):
        raise DDKitError(f"{str(Path(path) / MANIFEST)!r} holds dataset.mean {short_repr(described['mean'])} and "
                         f"dataset.std {short_repr(described['std'])}, which normalise pixels 0..1 to non-finite "
                         f"values; the manifest is damaged: re-create the {kind} artifact")


class DescribesDataset:
    """Accessors for an artifact whose ``manifest["dataset"]`` describes the data it was made from."""

    manifest: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["dataset"]["classes"])

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.manifest["dataset"]["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.manifest["dataset"]["std"])

    def dataset_facts(self) -> dict[str, Any]:
        """The data's name and number of classes, for a repr (None where the manifest holds none)."""
        dataset = self.manifest.get("dataset") or {}
        return {"dataset": dataset.get("name"), "classes": len(dataset["classes"]) if "classes" in dataset else None}


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors if t is not None))


# --- shared (cached) work and what it cost -------------------------------------------------------


@contextlib.contextmanager
def build_lock(path: str | Path) -> Iterator[LockWait]:
    """Let one process at a time build (or look up) the cache entry ``path``.

    Two processes that need the same cached artifact at once, e.g. two ``torchrun`` ranks of
    ``ddkit bench`` each making a distilled set with the same expert recipe, or two runs sharing
    ``$DDKIT_CACHE``, would otherwise both build it in the same place. Inside the block, look the
    entry up again and build it only if still missing: a process that waited then finds the other's
    result. The lock is an exclusive ``flock`` on the hidden file ``.<name>.lock`` beside ``path``,
    released when the block ends or the process dies (no stale locks). The empty file stays, unless
    :func:`remove_unused_lock` removes it while holding the lock: a process that waited on the removed file
    then finds another (or none) at ``.<name>.lock`` and locks that one instead, so that two processes never hold
    the lock of one entry at once. A folder where the lock file cannot be made (read-only,
    or another user's file in a shared cache) uses the existing file read-only, or runs the block unlocked
    where there is none (the block's own writes there then fail as they would). Where ranks build one entry
    together (``ddkit.distributed.current()`` enabled), rank 0 holds the lock for all of them. No-op
    where ``fcntl`` is missing (Windows).

    Yields a :class:`LockWait`: how long this process waited for the lock (another process's build),
    which timings of the work around it leave out as they leave out the build.
    """
    from ddkit import distributed as ddist

    waited = LockWait()
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield waited
        return
    path = Path(path)
    info = ddist.current()
    t0 = time.perf_counter()
    if not info.is_main:
        ddist.barrier()  # rank 0 holds the lock
        waited.seconds = time.perf_counter() - t0
        yield waited
        return
    fd, said = None, False
    try:
        while True:
            fd = _open_lock(path)
            try:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not said:
                    log.info("waiting for another process that is building %s", path)
                    said = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:  # no locks here (NFS without lockd, or a read-only descriptor there)
                log.debug("cannot lock %s (%s); building %s without a lock", _lock_file(path), exc.strerror, path)
                os.close(fd)
                fd = None
            if fd is None or _names(_lock_file(path), fd):
                break
            os.close(fd)  # the file was removed (remove_unused_lock) while this process waited: lock the one there now
        ddist.barrier()
        waited.seconds = time.perf_counter() - t0
        yield waited
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


class OutputBusy(DDKitError):
    """Another holder of the :func:`writing` lock of the output ``out`` (the --out the message names): another
    process, or another call in this one (another thread's, or one a ``progress`` callback makes), since ``flock``
    locks per open folder, not per process."""

    def __init__(self, out: str | Path) -> None:
        super().__init__(f"another ddkit call (in this process or another) is writing {str(out)!r}; wait for it or "
                         "choose another --out")


@contextlib.contextmanager
def writing(work: str | Path, out: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``work``, the hidden folder (made if missing) where a command keeps the
    resumable work of its output ``out``, for the block. A second process (or a second call in this one, from
    another thread) writing the same ``out`` would share that folder, and the first to finish deletes it under the
    other: it refuses at once, in one line (waiting, as :func:`build_lock` does for a cache entry, would only make it
    do the same work again). The lock is an ``flock`` on the folder itself, released when the block ends or the
    process dies: a killed run never blocks the next. Under torchrun, rank 0 holds it for every rank. No-op
    without ``fcntl``.

    ``work`` may be ``out`` itself, for an output folder that a command fills stage by stage (a ``ddkit run``'s or
    ``ddkit bench``'s): a second process would replace its stages under the first. A ``work`` folder (and the
    parents) made here that the block leaves empty is removed as it ends: a refused or failed command leaves
    nothing behind."""
    from ddkit import distributed as ddist

    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    work, fd, busy = Path(work), None, False
    made = not work.exists()
    # the folders above it made here too (a new --out's parents): a refused command leaves none behind
    new_parents = list(itertools.takewhile(lambda p: not p.exists(), work.parents))
    if ddist.current().is_main:
        while True:
            work.mkdir(parents=True, exist_ok=True)
            fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = True
            except OSError as exc:  # no locks on this filesystem: write unlocked, as before
                log.debug("cannot lock %s (%s); writing %s without a lock", work, exc.strerror, out)
            if busy or _names(work, fd):
                break
            os.close(fd)  # the other writer removed the folder as we locked it: lock the one there now
    try:
        if ddist.broadcast_object(busy):
            raise OutputBusy(out)
        yield
    finally:
        if fd is not None:
            if made and not busy:  # nothing in it to resume: leave nothing behind
                with contextlib.suppress(OSError):
                    work.rmdir()
                    for parent in new_parents:  # only while empty: the output written there stays
                        parent.rmdir()
            os.close(fd)


def _lock_file(path: Path) -> Path:
    return hidden_path(path, ".lock")


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` is (still) the file or folder open as ``fd``: not removed or replaced since it was opened."""
    try:
        here, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def _open_lock(path: Path) -> int | None:
    """A descriptor of ``path``'s lock file for :func:`build_lock`, made if missing. Where it cannot be made or
    written (a read-only cache, another user's lock file in a shared one), the existing file opened read-only
    (``flock`` needs no write access); None where there is none either: the block then runs unlocked, and
    whatever it writes there fails on its own."""
    lock = _lock_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        why = exc.strerror
    try:
        return os.open(lock, os.O_RDONLY)
    except OSError:
        log.debug("cannot create the lock file %s (%s); building %s without a lock", lock, why, path)
        return None


def remove_unused_lock(path: str | Path) -> bool:
    """Remove :func:`build_lock`'s file of ``path`` when no process holds it (an entry that is gone for good, or
    no longer built); whether it did. One that is held, or cannot be locked here, stays. Removed while this process
    holds the lock, so that a process waiting on it then locks the file made after it (see :func:`build_lock`)."""
    return _remove_lock_file(_lock_file(Path(path)))


def remove_unused_locks(folder: str | Path) -> int:
    """Remove every :func:`build_lock` file in ``folder`` that no process holds (as :func:`remove_unused_lock`);
    how many it removed."""
    return sum(_remove_lock_file(lock) for lock in sorted(Path(folder).glob(".*.lock")))


def _remove_lock_file(lock: Path) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return False
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while another process holds it
        if not _names(lock, fd):  # another removed it meanwhile: the file there now may be held
            return False
        lock.unlink()
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@dataclasses.dataclass
class LockWait:
    """What :func:`build_lock` yields: ``seconds`` this process waited to enter the block."""

    seconds: float = 0.0


@contextlib.contextmanager
def shared_costs() -> Iterator[list[dict[str, Any]]]:
    """Collect the cached artifacts that the work inside the block builds or reuses.

    Some work is done once and cached for every later run: a teacher's real-data statistics (SRe2L,
    G-VBSM, EDC, ...), an expert trajectory buffer (MTT, TESLA, FTD, DATM). Timing one distilled set
    would otherwise charge the first set that needs such an artifact for building it. Inside the
    block, each use appends ``{"kind", "key", "build_seconds", "seconds_here", "waited_seconds"}`` to the yielded
    list: ``build_seconds`` is what building the artifact took (from its manifest when reused; None
    for artifacts written before ddkit recorded it), ``seconds_here`` the wall time this block spent
    building it (0 when reused; less than ``build_seconds`` when it finished an interrupted build),
    ``waited_seconds`` the wall time it waited for another process (a torchrun rank, a concurrent
    run) that was building it.
    """
    found: list[dict[str, Any]] = []
    token = _SHARED_COSTS.set(found)
    try:
        yield found
    finally:
        _SHARED_COSTS.reset(token)


def record_shared_cost(kind: str, key: str, build_seconds: float | None, seconds_here: float = 0.0,
                       waited_seconds: float = 0.0) -> None:
    """Note one use of a cached artifact for the enclosing :func:`shared_costs` (if any)."""
    found = _SHARED_COSTS.get()
    if found is not None:
        found.append({"kind": kind, "key": key, "seconds_here": round(float(seconds_here), 3),
                      "waited_seconds": round(float(waited_seconds), 3),
                      "build_seconds": None if build_seconds is None else round(float(build_seconds), 3)})
