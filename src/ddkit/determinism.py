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

Some draws have no generator argument: a model's initial weights, dropout masks, torch's gamma sampler.
ddkit makes them inside :func:`global_rng`, which seeds torch's global generators for the span, gives the
caller's states back afterwards, and lets one thread at a time in, so that stages called from several
threads give the numbers they give alone.

A stage also computes in the numeric modes it records whatever the caller's code around it has set:
:func:`stage_modes` runs it with float32 as torch's default dtype, gradients on (also inside the caller's
``torch.no_grad()`` or ``torch.inference_mode()``) and autocast off (ddkit's own ``precision`` option turns
it on again for the passes it names), and gives the caller's settings back afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ddkit.errors import DDKitError

log = logging.getLogger(__name__)


# held wherever ddkit's results depend on the state of torch's global generators (one process, many threads)
_GLOBAL_RNG = threading.RLock()


@contextlib.contextmanager
def global_rng(seed: int | None = None, device: str | torch.device | None = None) -> Iterator[None]:
    """Inside: torch's global CPU generator, and ``device``'s when it is an accelerator, to this thread
    alone (a process-wide re-entrant lock), seeded with ``seed`` unless None; after, also on an
    exception: their old states back and the lock released. Other devices' generators are left alone
    (``torch.manual_seed`` would reseed every CUDA generator). For drawing from a seed alone (a model's
    initial weights, then the dropout masks of its training) without disturbing the caller's randomness,
    and without another thread's stage reseeding or drawing in between: hold it for the whole span
    whose draws follow from the seed."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    accel = dev.type in ("cuda", "mps")
    index = (dev.index if dev.index is not None else torch.cuda.current_device()) if dev.type == "cuda" else 0
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[index] if accel else [],
                                            device_type=dev.type if accel else None):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
            if dev.type == "cuda":
                torch.cuda.default_generators[index].manual_seed(seed)
            elif dev.type == "mps":
                torch.mps.manual_seed(seed)
        yield


# torch's default dtype is one setting for the whole process (grad mode, inference mode and autocast are per thread):
# the caller's is kept while any thread runs a stage and given back when the last one ends
_DTYPE_LOCK = threading.Lock()
_dtype_holders: list[torch.dtype] = []  # the caller's default dtype, once per stage running now

# the device types whose autocast a caller may have left on around a stage
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")

# the starts of torch's errors for a tensor made under torch.inference_mode() used where autograd needs it
_INFERENCE_TENSOR_ERRORS = ("Inference tensors cannot be saved for backward", "Inplace update to inference tensor")


@contextlib.contextmanager
def stage_modes() -> Iterator[None]:
    """Inside: the numeric modes a stage records, whatever the caller set around it: float32 as torch's
    default dtype (for the whole process while any thread is inside), gradients on and inference mode off
    (the caller's ``torch.no_grad()``, ``torch.inference_mode()``), no autocast (ddkit's ``precision``
    option enters its own :func:`ddkit.training.autocast` inside), and the CPU as torch's default device in this
    thread (:func:`cpu_default_device`); after, also on an exception: the caller's settings back (a default dtype
    another thread set while the stage ran stays, and the stage computed with it from then on). torch's error for a
    tensor the caller made under ``torch.inference_mode()`` (which autograd cannot use) becomes a one-line
    :class:`DDKitError`. A decorator too (``@stage_modes()``), of every public stage entry."""
    with _DTYPE_LOCK:
        _dtype_holders.append(torch.get_default_dtype())
        torch.set_default_dtype(torch.float32)
    try:
        with contextlib.ExitStack() as modes:
            modes.enter_context(cpu_default_device())
            modes.enter_context(torch.inference_mode(False))
            modes.enter_context(torch.enable_grad())
            for kind in _AUTOCAST_DEVICE_TYPES:
                if torch.is_autocast_enabled(kind):
                    modes.enter_context(torch.autocast(kind, enabled=False))
            yield
    except RuntimeError as exc:
        if not str(exc).startswith(_INFERENCE_TENSOR_ERRORS):
            raise
        raise DDKitError("an input to this stage (a teacher's weights, or tensors of yours) was made under "
                         "torch.inference_mode(), which autograd cannot use; make it outside inference_mode, or "
                         "pass a copy made outside it (tensor.clone(), a model loaded again)") from None
    finally:
        with _DTYPE_LOCK:
            caller = _dtype_holders.pop()
            # the first stage to start had the caller's setting; one the caller made meanwhile (another thread) stays
            if not _dtype_holders and torch.get_default_dtype() == torch.float32:
                torch.set_default_dtype(caller)


@contextlib.contextmanager
def cpu_default_device() -> Iterator[None]:
    """Inside, in this thread: the CPU as torch's default device, where the caller set another
    (``torch.set_default_device("cuda")``, ``("meta")``): ddkit makes its tensors and models on the CPU and moves
    them to a stage's ``device`` itself, and would otherwise put them elsewhere (or draw from another device's
    generator); the caller's back after. A no-op where the default is the CPU: the device mode
    would cost every torch call. A decorator too (``@cpu_default_device()``), of the public calls outside a stage
    (:func:`stage_modes` enters it) that make tensors: saving and loading artifacts."""
    if torch.get_default_device().type == "cpu":
        yield
        return
    with torch.device("cpu"):
        yield


def seeded_cpu_rng(seed: int) -> contextlib.AbstractContextManager[None]:
    """:func:`global_rng` for the CPU: inside, the global CPU generator seeded with ``seed`` (and held
    by this thread); after, its old state back, and every CUDA generator untouched."""
    return global_rng(seed)


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


def cuda_numerics(device: str | torch.device) -> dict[str, Any]:
    """What the numbers of a stage on the CUDA ``device`` depend on besides its inputs and seed, for the keys of
    cached results: the kernels ddkit's stages pick (deterministic, :func:`use_deterministic_cuda`; with
    ``DDKIT_CUDA_DETERMINISTIC=0`` the caller's deterministic, cuDNN deterministic and benchmark settings), TF32 in
    matmuls and cuDNN convolutions, torch's float32 matmul precision, the GPU's model (of ``device``'s index, else the
    current device), and the CUDA and cuDNN versions."""
    device = torch.device(device)
    kernels = ({"deterministic": True} if wanted() else
               {"deterministic": torch.are_deterministic_algorithms_enabled(),
                "cudnn_deterministic": torch.backends.cudnn.deterministic,
                "cudnn_benchmark": torch.backends.cudnn.benchmark})
    gpu = None  # where torch sees no GPU (a key computed ahead), none to name: nothing trains there
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device.index if device.index is not None else torch.cuda.current_device())
    return {**kernels, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "gpu": gpu, "cuda_version": torch.version.cuda, "cudnn_version": torch.backends.cudnn.version()}


def device_numerics(device: str | torch.device) -> dict[str, Any]:
    """``{"cuda": cuda_numerics(device)}`` on a CUDA device, nothing on the CPU: what a record of results (an
    evaluation report, a bench cell) notes beside its thread count, so that a folder made under other CUDA settings
    or on another GPU is not reused whole (:func:`numerics_change`); records made on the CPU stay as they were."""
    return {"cuda": cuda_numerics(device)} if torch.device(device).type == "cuda" else {}


def made_under(device: str | torch.device) -> dict[str, Any]:
    """Where float results are made, for the keys of cached ones: the torch thread count (float sums are split
    differently over another number of intra-op threads), the device type (cpu, cuda) and, on a CUDA device, its
    :func:`device_numerics`. The same settings give the same bytes; another thread count may not."""
    return {"torch_threads": torch.get_num_threads(), "device": torch.device(device).type, **device_numerics(device)}


def numerics_change(recorded: Any, device: str | torch.device) -> str:
    """Why results recorded with ``recorded`` (the ``cuda`` of :func:`device_numerics` they were made under; None:
    none, i.e. on the CPU or by a ddkit before 2026-12-07) are not what ``device`` would make now ("" when they are):
    their students were trained under other CUDA settings (TF32, matmul precision, kernels), on another GPU model or
    with other CUDA/cuDNN versions, or on another device type. A CPU record on the CPU is always alike."""
    now = device_numerics(device).get("cuda")
    if recorded == now:
        return ""
    if now is None:
        gpu = recorded.get("gpu") if isinstance(recorded, dict) else recorded
        return f"it was made on CUDA ({gpu}), not on the CPU"
    if not isinstance(recorded, dict):
        return "it records no CUDA settings (made on the CPU, or on CUDA by a ddkit that did not record them)"
    changed = [f"{k} {recorded.get(k)!r}, now {v!r}" for k, v in now.items() if recorded.get(k) != v]
    changed += [f"{k} {v!r}, now none" for k, v in recorded.items() if k not in now]
    return f"it was made under other CUDA settings ({'; '.join(changed)})"


def evaluation_change(run: Any, device: str | torch.device) -> str:
    """Why an evaluation whose report's ``run`` record is ``run`` (torch thread count and :func:`device_numerics`'
    ``cuda``) is not what training its students on ``device`` would give now ("" when it is): another thread count
    (float sums depend on it: a student trained with another one is another number) or another device's numerics
    (:func:`numerics_change`)."""
    run = run if isinstance(run, dict) else {}
    made = run.get("torch_threads")
    if made not in (None, torch.get_num_threads()):
        return f"it was evaluated with {made} torch threads, this run has {torch.get_num_threads()}"
    return numerics_change(run.get("cuda"), device)


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
