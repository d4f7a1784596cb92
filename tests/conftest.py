import contextlib
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ddkit.cli import load_plugins
from ddkit.data import make_synthetic

REPO = Path(__file__).resolve().parents[1]
# The whole session computes in a fresh cache of its own, from before the first fixture: module- and
# session-scoped fixtures are set up before the per-test `_isolated_cache`, and read and wrote the shell's
# $DDKIT_CACHE or ~/.cache/ddkit (the next session read their students back). Removed at the session's end.
SHELL_CACHE = os.environ.get("DDKIT_CACHE")
SESSION_CACHE = Path(tempfile.mkdtemp(prefix="ddkit-test-cache-"))
os.environ["DDKIT_CACHE"] = str(SESSION_CACHE)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)
    if SHELL_CACHE is None:
        os.environ.pop("DDKIT_CACHE", None)
    else:
        os.environ["DDKIT_CACHE"] = SHELL_CACHE


# a user's own methods, models and datasets join the tests parametrized over the registries (the method
# contract): `DDKIT_PLUGINS=myplug pytest tests/test_method_contract.py`, imported as the CLI imports them
load_plugins()
# One intra-op thread count for the whole session, set before any fixture computes: float reductions
# (and so trained weights) differ in the last bits between thread counts, and a module- or
# session-scoped fixture built under $OMP_NUM_THREADS would not equal the same computation in a test.
THREADS = min(2, os.cpu_count() or 1)
torch.set_num_threads(THREADS)


def run_cli(args, capsys) -> tuple[int, str, str]:
    """``ddkit ARGS`` in this process: (exit code, stdout, stderr)."""
    from ddkit.cli import main

    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def refused(args, capsys) -> str:
    """The one-line error of ``ddkit ARGS`` (exit code 2, nothing on stdout), without its 'error: ' prefix."""
    code, out, err = run_cli(args, capsys)
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, (code, out, err)
    return err.removeprefix("error: ").rstrip("\n")


def run_ddkit(cwd: Path, *args: str, ranks: int = 1, cache: str = "cache", timeout: int = 600) -> None:
    """``python -m ddkit ARGS -q`` in ``cwd`` (under torchrun with ``ranks`` gloo processes when > 1),
    one OpenMP thread per process and ``$DDKIT_CACHE = cwd/cache``; fails the test on a non-zero exit."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDKIT_CACHE": str(Path(cwd) / cache)}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
    proc = subprocess.run([sys.executable, *launcher, "-m", "ddkit", *args, "-q"], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def twice_at_once(monkeypatch, module, name: str, call) -> tuple[list, list]:
    """Run ``call()`` in two threads at once, with ``module.name`` slowed down so that the second
    thread arrives while the first is inside it; returns (the calls of ``module.name``, the results)."""
    import threading
    import time

    calls, real = [], getattr(module, name)

    def slow(*args, **kw):
        calls.append(threading.get_ident())
        time.sleep(0.5)
        return real(*args, **kw)

    monkeypatch.setattr(module, name, slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(call())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return calls, results


@contextlib.contextmanager
def lock_held(path: Path, seconds: float):
    """Another holder of ``build_lock(path)`` (a thread, as another process would be) for ``seconds``:
    the block starts once the lock is taken, so work in it that needs the lock waits that long."""
    import threading
    import time

    from ddkit.artifacts import build_lock

    taken, failed = threading.Event(), []

    def hold():
        try:
            with build_lock(path):
                taken.set()
                time.sleep(seconds)
        except BaseException as exc:  # reported below, not left to hang the session
            failed.append(exc)
            taken.set()

    thread = threading.Thread(target=hold)
    thread.start()
    assert taken.wait(60), "the lock holder never took the lock"
    if failed:
        raise failed[0]
    try:
        yield
    finally:
        thread.join()


# torch seeds its global generator from the OS in every process: a test drawing from it unseeded (a model's
# weights, random inputs) passed or failed by chance. Each test starts from this seed instead; another
# seed (`DDKIT_TEST_SEED=1 pytest`) shows which tests pass only by the draw.
TEST_SEED = int(os.environ.get("DDKIT_TEST_SEED", "0"))


def fake_cuda(monkeypatch, gpu: str = "NVIDIA H100 80GB HBM3") -> None:
    """torch.cuda as a machine with one GPU named ``gpu`` answers what a cache key (or resolve_device) asks of it;
    nothing trains there: a test that evaluates on "cuda" fakes its students."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: gpu)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)


@contextlib.contextmanager
def cuda_settings_kept():
    """Inside: change torch's TF32 flags and float32 matmul precision freely; after, they are back, and so are the
    deterministic-algorithm and cuDNN settings that a stage on a (faked) CUDA device turns on for the process.
    (torch.backends.cuda.matmul is no plain object: monkeypatch cannot restore it.)"""
    kept = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = kept[:2]
        torch.set_float32_matmul_precision(kept[2])
        torch.use_deterministic_algorithms(kept[3], warn_only=kept[4])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = kept[5:]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """ddkit's cache is a per-test folder (fixtures of a wider scope use the session's, ``SESSION_CACHE``),
    never ~/.cache; torch's, numpy's and Python's global generators start from ``TEST_SEED``."""
    monkeypatch.setenv("DDKIT_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(THREADS)  # undo a test that changed it
    torch.manual_seed(TEST_SEED)
    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)


@pytest.fixture(scope="session")
def tiny():
    """4 classes of 1x16x16 images with class-dependent structure: 24 train / 12 test per class."""
    return make_synthetic()


@pytest.fixture(scope="session")
def bn_teacher(tiny):
    """A depth-2, width-8 BatchNorm ConvNet trained 2 epochs on ``tiny``: the teacher of the decoupled
    methods' tests (trained once for every module that uses it)."""
    from ddkit.teacher import TeacherConfig, train_teacher
    from ddkit.training import TrainConfig

    cfg = TeacherConfig(model="convnet", model_options={"depth": 2, "width": 8, "norm": "batchnorm"},
                        train=TrainConfig(epochs=2, batch_size=32, lr=0.05))
    return train_teacher(tiny, cfg)


@pytest.fixture
def tiny_protocol():
    from ddkit.evaluate import resolve_protocol

    return resolve_protocol("dc-protocol", {"student": "tiny_convnet", "full_epochs": 15,
                                            "train": {"epochs": 30, "batch_size": 32, "lr": 0.05}})


def real_data_dir() -> Path | None:
    """Where real Fashion-MNIST is: $DDKIT_DATA/fashion-mnist or the Debian package's folder."""
    for root in (os.environ.get("DDKIT_DATA"), "/usr/share/datasets"):
        if root and (Path(root) / "fashion-mnist").is_dir():
            return Path(root)
    return None
