"""Same config and seed, same numbers: on CUDA too.

On the CPU ddkit's numbers depend only on the seed (and the thread count). On CUDA several kernels
accumulate with atomic adds in whatever order the threads arrive, so two runs with the same seed
differ in the last bits, and iterative synthesis amplifies that: cuDNN's fastest convolution
algorithms, the backward of ``gather`` / ``index_select`` (a scatter-add) and the backward of
``grid_sample``, which every crop and DSA transform uses, were seen to make SRe2L, CDA, G-VBSM, EDC,
CV-DD, DM and DataDAM give different images for the same seed on an H200.

:func:`use_deterministic_cuda` switches PyTorch to its deterministic kernels
(``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN without benchmarking) the first
time a CUDA device is used by a ddkit stage; :mod:`ddkit.data.augment` then resamples with gathers
instead of ``grid_sample``, whose CUDA backward has no deterministic kernel. An operation that
still has none only warns (PyTorch's message names it). cuBLAS needs
``CUBLAS_WORKSPACE_CONFIG`` set before its first call: ``import ddkit`` sets ``:4096:8`` unless the
variable is already set. Set ``DDKIT_CUDA_DETERMINISTIC=0`` to keep PyTorch's defaults (faster
kernels, run-to-run differences).
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def wanted() -> bool:
    """False when ``DDKIT_CUDA_DETERMINISTIC=0`` asks for PyTorch's default (nondeterministic) kernels."""
    return os.environ.get("DDKIT_CUDA_DETERMINISTIC", "1") != "0"


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
