"""Same config and seed, same numbers: on CUDA too.

On the CPU ddkit's numbers depend only on the seed (and the thread count). On CUDA several kernels
accumulate with atomic adds in whatever order the threads arrive, so two runs with the same seed
differ in the last bits, and iterative synthesis amplifies that. On an H200 SRe2L, CDA, G-VBSM, EDC,
CV-DD, DM and DataDAM gave different images for the same seed; PyTorch's strict mode named the
backward of ``grid_sample`` (every crop and DSA transform), and PyTorch documents others (cuDNN's
benchmarked convolutions, the backward of ``gather``, ``interpolate`` and adaptive pooling).

:func:`use_deterministic_cuda` switches PyTorch to its deterministic kernels
(``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN without benchmarking) the first
time a CUDA device is used by a ddkit stage. Where :func:`gather_resampling` says so, ddkit then
replaces the ops that have no deterministic CUDA backward by equivalents that have one: resampling
by gathers instead of ``grid_sample`` and ``interpolate`` (:mod:`ddkit.data.augment`), a mean
instead of adaptive pooling (the ResNets). An operation that still has none only warns (PyTorch's
message names it). cuBLAS needs
``CUBLAS_WORKSPACE_CONFIG`` set before its first call: ``import ddkit`` sets ``:4096:8`` unless the
variable is already set. Set ``DDKIT_CUDA_DETERMINISTIC=0`` to keep PyTorch's defaults (faster
kernels, run-to-run differences).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@contextlib.contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Inside: the global CPU generator seeded with ``seed``; after: its old state back, and every
    CUDA generator untouched (``torch.manual_seed`` would reseed those too, and ``fork_rng(devices=[])``
    would not restore them). For drawing something from a seed alone (a model's initial weights, a
    sampler that takes no generator) without disturbing the caller's randomness."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def wanted() -> bool:
    """False when ``DDKIT_CUDA_DETERMINISTIC=0`` asks for PyTorch's default (nondeterministic) kernels."""
    return os.environ.get("DDKIT_CUDA_DETERMINISTIC", "1") != "0"


def gather_resampling(x: torch.Tensor) -> bool:
    """Whether ``x`` is resampled and pooled with the deterministic replacements (on CUDA with
    deterministic algorithms on); the CPU keeps PyTorch's ops, bit for bit."""
    return x.is_cuda and torch.are_deterministic_algorithms_enabled()


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """``adaptive_avg_pool2d(x, 1)``; under :func:`gather_resampling` a plain mean, whose backward
    has no atomics (adaptive pooling's CUDA backward has)."""
    if gather_resampling(x):
        return x.mean((2, 3), keepdim=True)
    return F.adaptive_avg_pool2d(x, 1)


def use_deterministic_cuda(device: str | torch.device) -> None:
    """Turn on PyTorch's deterministic kernels when ``device`` is a CUDA device (no-op on CPU).

    Process-wide and idempotent; a stricter setting made by the caller (``warn_only=False``) is kept.
    """
    if torch.device(device).type != "cuda" or not wanted():
        return
    torch.backends.cudnn.benchmark = False
    if not torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(True, warn_only=True)
        log.info("CUDA: deterministic algorithms on (DDKIT_CUDA_DETERMINISTIC=0 turns them off)")
