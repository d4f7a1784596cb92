"""Thin helpers over ``torch.distributed`` for runs launched with ``torchrun``.

Nothing here launches processes: ``torchrun --nproc-per-node N -m ddkit.cli ...`` does. On CPU the
gloo backend is used, on CUDA NCCL. A program that calls :func:`init_from_env` ends with
:func:`shutdown` on every rank.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ddkit.determinism import use_deterministic_cuda
from ddkit.errors import DDKitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


TIMEOUT_ENV = "DDKIT_DIST_TIMEOUT"
MAX_TIMEOUT_MINUTES = 30 * 24 * 60  # 30 days: far beyond a wait worth having (a huge value crashed in timedelta)
DEFAULT_TIMEOUT_MINUTES = 24 * 60  # a rank may wait at a barrier while another trains a teacher or runs a cell


def timeout_minutes() -> float:
    """How long a collective waits for the other ranks before failing: ``$DDKIT_DIST_TIMEOUT``
    minutes, 24 h by default. torch's own default (30 min gloo, 10 min NCCL) ends a bench whose
    ranks wait while one of them trains a teacher, makes a set or runs a long cell."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return float(DEFAULT_TIMEOUT_MINUTES)
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value <= MAX_TIMEOUT_MINUTES):
        raise DDKitError(f"{TIMEOUT_ENV}={text!r} is not a number of minutes in (0, "
                         f"{MAX_TIMEOUT_MINUTES}]; set it like {TIMEOUT_ENV}=600 or unset it (24 h)")
    return value


def init_from_env(device: str = "cpu") -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes()))
        # last resort for programs that do not call shutdown(): never leave the group to static destructors
        atexit.register(shutdown, barrier=False)
        log.info("initialised %s process group: rank %d of %d", backend, rank, world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def shutdown(barrier: bool = True) -> None:
    """Wait for every rank (``barrier``), then destroy the process group; no-op without one.

    Call it at the end of a ``torchrun`` program on every rank (the CLI does). A gloo rank that exits
    while a peer still holds the connection can abort in its static destructors ("terminate called
    without an active exception", SIGABRT), and ``torchrun`` then kills the peer, possibly half-way
    through writing its output. Pass ``barrier=False`` on error paths, where the other ranks may
    never arrive. :func:`init_from_env` registers ``shutdown(barrier=False)`` at exit as a fallback.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


_SINGLE = [0]  # depth of nested single_process() blocks


def current() -> DistInfo:
    """This process's rank and the world size (one process outside torchrun or inside :func:`single_process`)."""
    if not _SINGLE[0] and dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Run the block as if this were the only process: :func:`current` reports one, so ddkit's stage
    functions do their whole job on this rank and skip their collectives. For work a rank does on its
    own under ``torchrun`` (a bench cell, one evaluation seed's random-baseline labels), and for a ddkit
    call that only some ranks of the caller's own ``torch.distributed`` job make (README)."""
    _SINGLE[0] += 1
    try:
        yield
    finally:
        _SINGLE[0] -= 1


def resolve_device(device: str | torch.device, info: DistInfo | None = None) -> torch.device:
    """``device`` (a name or a torch.device) checked against this machine; ``auto`` -> cuda:<local_rank>
    if available else cpu, ``cuda`` -> cuda:<local_rank>."""
    info = info or current()
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise DDKitError(f"device must be a name such as 'cpu', 'cuda', 'cuda:N' or 'auto', or a torch.device, got "
                         f"{type(device).__name__} {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{info.local_rank}"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DDKitError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DDKitError(f"device {device!r} asked for but CUDA is not available here; use --device cpu or auto")
        if dev.index is not None and dev.index >= count:
            raise DDKitError(f"device {device!r} does not exist (this machine has {count} CUDA device(s)); use "
                             f"cuda:0..{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise DDKitError(f"device {device!r} asked for but MPS is not available here; use --device cpu or auto")
    elif dev.type != "cpu":
        raise DDKitError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or auto")
    use_deterministic_cuda(device)
    return dev


def all_gather_objects(obj: Any) -> list[Any]:
    info = current()
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def agree_settings(settings: Mapping[str, Any]) -> None:
    """Stop every rank, in one line naming the settings that differ, when the ranks of this torchrun job
    were given different ``settings`` for the stage that calls this first (a no-op in a single process).

    ``settings``: what decides the stage's result, by the name an error gives it (``{"distill": cfg,
    "dataset": data.fingerprint, "teacher": ...}``); dicts and dataclasses in it are compared setting by
    setting and named by dotted key (``distill.options.lr``). Each rank builds its share of the work from its
    own command line and rank 0 alone records its settings, so ranks started with another seed, option or
    epoch count would make an artifact that no recorded setting describes. One all-gather of a short digest
    per setting."""
    if not current().enabled:
        return
    from ddkit.config import config_hash, to_dict

    def flat(value: Any, name: str) -> Iterator[tuple[str, Any]]:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                yield from flat(item, f"{name}.{key}")
        else:
            yield name, value

    mine = {name: config_hash(value) for key, value in to_dict(dict(settings)).items() for name, value in
            flat(value, key)}
    every = all_gather_objects(mine)
    differ = sorted({name for digests in every for name in digests if any(d.get(name) != digests[name] for d in every)})
    if differ:
        shown = ", ".join(differ[:6]) + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
        raise DDKitError(f"the ranks of this torchrun job were started with different settings (they differ in "
                         f"{shown}); give every rank the same command, data and teacher")


def agree_found(found: bool, what: str, folder: str | Path) -> bool:
    """``found`` (whether this rank found the cached ``what`` in the cache ``folder`` on its disk),
    checked to be every rank's: ranks that disagree would take different paths (load it, or build it
    in collectives) and hang, as happens when the nodes of a job each keep their own cache. ``what`` names the
    entry by its key: ranks that look for different entries loaded different data (or teachers), which a shared
    cache folder would not mend, and stop saying so."""
    gathered = all_gather_objects((bool(found), str(what)))
    flags, names = [f for f, _ in gathered], [n for _, n in gathered]
    if len(set(names)) > 1:
        each = "; ".join(f"ranks {[r for r, n in enumerate(names) if n == name]}: {name}"
                         for name in dict.fromkeys(names))
        raise DDKitError(f"the ranks of this torchrun job look for different cache entries ({each}): they loaded "
                         "different data or teachers; give every rank the same --dataset and --data-path (the same "
                         "files on every node), settings and teacher")
    if len(set(flags)) > 1:
        have = [r for r, f in enumerate(flags) if f]
        lack = [r for r, f in enumerate(flags) if not f]
        raise DDKitError(f"the ranks of this torchrun job disagree on whether {what} exists (found by ranks {have}, "
                         f"not by ranks {lack}); the nodes of a job must share the cache folder "
                         f"{str(folder)!r}: put it on storage every node mounts ($DDKIT_CACHE, or the option "
                         "that named it)")
    return bool(found)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if current().enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers of ``module`` (BatchNorm running statistics: under DDP
    each rank updates them from its own slice of the batch, and DDP only re-broadcasts them at the
    next forward)."""
    if current().enabled:
        for buf in module.buffers():
            dist.broadcast(buf, src)


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _wire_device() -> torch.device:
    """Where a point-to-point tensor travels from: this rank's GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def send_to_main(t: torch.Tensor) -> None:
    """Send ``t`` to rank 0 alone, which takes it with :func:`receive_from` (tensors a rank sends
    arrive in the order it sent them)."""
    send_to(t, 0)


def send_to(t: torch.Tensor, dst: int) -> None:
    """Send ``t`` to rank ``dst`` alone, which takes it with :func:`receive_from`."""
    dist.send(t.to(_wire_device()).contiguous(), dst=dst)


def receive_from(src: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The next tensor (of ``shape`` and ``dtype``) that rank ``src`` sent to this rank (:func:`send_to`,
    :func:`send_to_main`), on the CPU."""
    buf = torch.empty(shape, dtype=dtype, device=_wire_device())
    dist.recv(buf, src=src)
    return buf.cpu()
