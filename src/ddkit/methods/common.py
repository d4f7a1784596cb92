"""Small pieces every synthesis method shares: initialisation, checkpoints, progress, sharding.

Methods stay one class in one file; these are functions and a tiny checkpoint helper, not a base
class to inherit behaviour from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ddkit import distributed as ddist
from ddkit.artifacts import atomic_torch_save, load_resume_state
from ddkit.data.base import DataBundle
from ddkit.errors import DDKitError
from ddkit.methods.base import FitContext, check_ipc
from ddkit.methods.random import stratified_indices
from ddkit.models.registry import other_float_dtypes
from ddkit.training import sum_dtype


def init_images(real: DataBundle, ipc: int, init: str, seed: int,
                rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial synthetic images in pixel space (float32) and their labels, class-major.

    ``init``: ``real`` (a stratified random real subset drawn with ``seed``) or ``noise``
    (Gaussian around the dataset mean with its std, as in DC/DSA's noise option). ``rows``: only
    these positions of the class-major set, equal to the same rows of the whole set, which is never
    held (a rank of a torchrun job builds only its own images).
    """
    ipc = check_ipc(real, ipc)
    labels = torch.arange(real.num_classes).repeat_interleave(ipc)
    if init == "real":
        idx = stratified_indices(real.train.labels, real.num_classes, ipc, seed)
        if rows is not None:
            idx, labels = idx[rows], labels[rows]
        return real.train.subset(idx).float_images().clone(), labels
    if init == "noise":
        gen = torch.Generator().manual_seed(seed)
        c, h, w = real.image_shape
        mean = torch.tensor(real.mean).view(1, c, 1, 1)
        std = torch.tensor(real.std).view(1, c, 1, 1)
        if rows is None:
            return (mean + std * torch.randn(len(labels), c, h, w, generator=gen)), labels
        return mean + std * randn_rows(len(labels), (c, h, w), gen, rows), labels[rows]
    raise ValueError(f"unknown init {init!r}; use real or noise")


def randn_rows(n: int, shape: tuple[int, ...], gen: torch.Generator, rows: torch.Tensor,
               values: int = 1 << 22) -> torch.Tensor:
    """``torch.randn(n, *shape, generator=gen)[rows]`` without holding the ``n`` rows: drawn in
    slices of about ``values`` values, a multiple of 16 (the last slice takes the rest), which
    continue ``gen``'s stream exactly as one call does, since torch's CPU ``randn`` turns blocks of
    16 uniform draws into normals (tests/test_decoupled_methods.py checks the rows are the one call's)."""
    size = math.prod(shape)
    step = 16 // math.gcd(16, size)  # rows per 16 values
    chunk = step * max(1, values // (step * size))
    out = torch.empty(len(rows), *shape)
    lo = 0
    while lo < n:
        hi = n if n - lo < 2 * chunk else lo + chunk
        draw = torch.randn(hi - lo, *shape, generator=gen)
        take = (rows >= lo) & (rows < hi)
        out[take] = draw[rows[take] - lo]
        lo = hi
    return out


def to_normalized(x: torch.Tensor, real: DataBundle) -> torch.Tensor:
    c = x.shape[1]
    return ((x - torch.tensor(real.mean, device=x.device).view(1, c, 1, 1))
            / torch.tensor(real.std, device=x.device).view(1, c, 1, 1))


def to_pixels(x: torch.Tensor, real: DataBundle) -> torch.Tensor:
    c = x.shape[1]
    return (x * torch.tensor(real.std, device=x.device).view(1, c, 1, 1)
            + torch.tensor(real.mean, device=x.device).view(1, c, 1, 1))


class Checkpoint:
    """Resumable state of an iterative method, saved every ``every`` steps into ``ctx.work_dir``.

    State is a flat dict of tensors and plain values (saved with ``torch.save``, read back with
    ``weights_only=True``). Include every RNG ``Generator`` state the method uses
    (``gen.get_state()``), so a resumed run equals an uninterrupted one.
    """

    def __init__(self, ctx: FitContext, every: int, tag: str = "state", per_rank: bool = False) -> None:
        self.every = max(1, every)
        self.path = Path(ctx.work_dir) / f"{tag}.pt" if ctx.work_dir is not None else None
        self.per_rank = per_rank  # a tag naming the rank: every rank saves its own; otherwise rank 0 alone

    def load(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.is_file():
            return None
        return load_resume_state(self.path)

    def due(self, step: int, total: int) -> bool:
        return self.path is not None and (step % self.every == 0 or step == total)

    def save(self, state: dict[str, Any]) -> None:
        if self.path is None or not (self.per_rank or ddist.current().is_main):
            return
        atomic_torch_save(state, self.path)


def check_float32_teacher(model: torch.nn.Module, method: str) -> None:
    """Refuse, in one line, a teacher ``model`` with floating weights or buffers other than float32 (a caller's
    bfloat16, float16 or float64 module): a synthesis method computes its images through the teacher (gradients,
    BatchNorm and convolution statistics, patch scores) in float32, and cached real-data statistics are keyed by
    the teacher's weights file, not by the dtype it was cast to. Labelling with it (relabel, evaluate) takes it."""
    if dtypes := other_float_dtypes((*model.parameters(), *model.buffers())):
        raise DDKitError(f"method {method!r} synthesises its images through the teacher in float32, but the teacher's "
                         f"weights are {' and '.join(dtypes)}; pass it in float32 (teacher.model.float()); relabel and "
                         "evaluate label with it as it is")


def floats(record: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """A record's values as Python numbers; its tensor values are read in one copy from their device
    (one wait, not one per value)."""
    tensors = [v.detach().reshape(()).to(sum_dtype(v.device)) for v in record.values() if isinstance(v, torch.Tensor)]
    read = iter(torch.stack(tensors).tolist() if tensors else [])
    return {key: next(read) if isinstance(v, torch.Tensor) else float(v) for key, v in record.items()}


def report(ctx: FitContext, step: int, total: int, **record: float | torch.Tensor) -> None:
    """Progress callback (after any checkpoint of ``step`` was written). Tensor values are read as
    numbers only when there is a callback, so a library call without one does not wait for the
    device at every step."""
    if ctx.progress is not None:
        ctx.progress(step, total, floats(record))


# markers a method puts in its progress record while it runs a one-off pass before its own
# iterations, with what a progress bar calls that pass and counts in
PASSES = {"statistics_pass": ("real-data statistics", "img"), "expert_epochs_pass": ("expert epochs", "ep")}


def progress_view(stage: str, record: dict | None) -> tuple[str, str]:
    """Label and unit of a synthesis progress report: ``stage`` counting iterations, or the one-off
    pass the record is marked with (the real-data statistics pass of the decoupled methods, counting
    images; experts trained on the fly, counting epochs), so that a long pass is not shown as
    iterations that do not move."""
    for marker, (what, unit) in PASSES.items():
        if record and marker in record:
            return f"{stage}: {what}", unit
    return stage, "it"


def my_classes(num_classes: int) -> list[int]:
    """Classes this rank synthesises under torchrun (round-robin); all classes single-process."""
    info = ddist.current()
    return list(range(info.rank, num_classes, info.world_size))


def gather_classes(per_class: dict[int, torch.Tensor], num_classes: int) -> list[torch.Tensor]:
    """Collect every rank's per-class tensors so each rank holds all classes, in class order."""
    merged: dict[int, torch.Tensor] = {}
    for part in ddist.all_gather_objects({c: t.cpu() for c, t in per_class.items()}):
        merged.update(part)
    missing = [c for c in range(num_classes) if c not in merged]
    assert not missing, f"classes {missing} were synthesised by no rank"
    return [merged[c] for c in range(num_classes)]


def gather_units(done: dict[int, torch.Tensor], shapes: list[tuple[int, ...]],
                 place: Callable[[int, torch.Tensor], None]) -> None:
    """Hand every unit's tensor to ``place(unit, tensor)`` on rank 0, in unit order: its own from
    ``done``, the others' (unit ``u`` was made by rank ``u % world_size``, as :func:`my_classes`
    deals them; ``shapes[u]``: its shape, float32) received from their rank one at a time, so rank 0
    holds one received unit besides what ``place`` keeps. The other ranks send theirs and place
    nothing: no rank but rank 0 ever holds the whole set. One process: every unit from ``done``."""
    info = ddist.current()
    for u, shape in enumerate(shapes):
        owner = u % info.world_size
        if info.is_main:
            assert owner != 0 or u in done, f"unit {u} was made by no rank"
            place(u, done[u] if owner == 0 else ddist.receive_from(owner, shape, torch.float32))
        elif owner == info.rank:
            ddist.send_to_main(done[u])


def exchange_rows(done: dict[int, torch.Tensor], ipc: int, rows: torch.Tensor,
                  shape: tuple[int, ...]) -> torch.Tensor:
    """The images at ``rows`` (positions ``class * ipc + slot`` of a class-major set of ``ipc`` images
    per class, each of ``shape``, float32), in the order of ``rows``, where each rank made the classes
    :func:`my_classes` deals it (``done``: this rank's, class -> its ``ipc`` images). A rank's rows of
    its own classes come from ``done``, the others from the rank that made them, point to point; only
    the row indices are shared, so no rank holds more than its classes, its rows and one part in
    transit. Every rank calls it, with its own ``rows``. One process: all from ``done``."""
    info = ddist.current()
    out = torch.empty(len(rows), *shape)
    # every (receiving rank, making rank) pair in one order on all ranks: each send meets its receive
    for dst, want in enumerate(ddist.all_gather_objects(rows.tolist())):
        want = torch.tensor(want, dtype=torch.int64)
        for src in range(info.world_size):
            pick = torch.nonzero((want // ipc) % info.world_size == src).flatten()
            if len(pick) == 0 or info.rank not in (src, dst):
                continue
            if src == info.rank:
                part = torch.stack([done[r // ipc][r % ipc] for r in want[pick].tolist()])
                if dst == info.rank:
                    out[pick] = part
                else:
                    ddist.send_to(part, dst)
            else:
                out[pick] = ddist.receive_from(src, (len(pick), *shape), torch.float32)
    return out
