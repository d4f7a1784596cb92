"""Deterministic CUDA kernels (ddkit.determinism) and the gather-based resampling they rely on.

The CUDA paths themselves run in tests/test_cuda.py (marked gpu); here the replacement ops are
checked against the PyTorch ops they stand in for, on the CPU, values and gradients. Also: the
caller's global generators and numeric modes around a stage (global_rng, stage_modes).
"""

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ddkit.data.augment import bilinear_gather
from ddkit.determinism import use_deterministic_cuda


def _thetas(n, gen):
    angle = (torch.rand(n, generator=gen) - 0.5) * math.pi / 2
    scale = 0.6 + 0.8 * torch.rand(n, 2, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.8
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([scale[:, 0] * cos, -sin, shift[:, 0]], 1),
                        torch.stack([sin, scale[:, 1] * cos, shift[:, 1]], 1)], 1)


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("out_size", [(13, 11), (28, 28)])
def test_bilinear_gather_equals_grid_sample(padding_mode, out_size):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 17, 19, generator=gen, dtype=torch.float64, requires_grad=True)
    grid = F.affine_grid(_thetas(6, gen).double(), [6, 3, *out_size], align_corners=False)
    ref = F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    out = bilinear_gather(x, grid, padding_mode)
    assert out.shape == (6, 3, *out_size)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    up = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad((ref * up).sum(), x)
    (g_out,) = torch.autograd.grad((out * up).sum(), x)
    torch.testing.assert_close(g_out, g_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [(32, 32), (9, 7)])
def test_bilinear_gather_on_the_identity_grid_is_interpolate(size):
    x = torch.rand(2, 4, 14, 14, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64).expand(2, 2, 3)
    grid = F.affine_grid(theta, [2, 4, *size], align_corners=False)
    torch.testing.assert_close(bilinear_gather(x, grid, "border"),
                               F.interpolate(x, size=size, mode="bilinear", align_corners=False), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="padding_mode"):
        bilinear_gather(x, grid, "reflection")


def test_use_deterministic_cuda_switches_only_for_cuda(monkeypatch):
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    assert before == (False, False)
    try:
        use_deterministic_cuda("cpu")
        assert not torch.are_deterministic_algorithms_enabled()
        monkeypatch.setenv("DDKIT_CUDA_DETERMINISTIC", "0")
        use_deterministic_cuda("cuda:0")
        assert not torch.are_deterministic_algorithms_enabled()
        monkeypatch.delenv("DDKIT_CUDA_DETERMINISTIC")
        use_deterministic_cuda(torch.device("cuda", 0))
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark
        torch.use_deterministic_algorithms(True)  # a stricter setting of the caller's is kept
        use_deterministic_cuda("cuda")
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_import_sets_the_cublas_workspace():
    import os

    import ddkit  # noqa: F401

    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG")


def test_every_replacement_computes_what_pytorch_computes(monkeypatch):
    """The deterministic replacements switched on (as on CUDA) against PyTorch's ops, on the CPU:
    augmentations, the patch statistics' resize, the ResNets' global pooling and torchvision
    models' input upsampling; outputs and input gradients."""
    from ddkit import determinism
    from ddkit.data.augment import build_augment
    from ddkit.methods.statistics import patch_grid
    from ddkit.models import create_model

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=gen)
    torch.manual_seed(0)
    nets = {name: create_model(name, 3, 5, 16, **opts).eval()
            for name, opts in (("resnet18_cifar", {"width": 8}), ("tv_resnet18", {}))}
    cases = {
        f"aug {spec}": (lambda v, a=build_augment(spec), p=build_augment(spec).sample(4, gen, (16, 16)): a.apply(v, p))
        for spec in ("dsa", "rrc_flip")}
    cases["patch_grid 3 px (16 -> 18)"] = lambda v: patch_grid(v, 3)
    cases.update({name: net for name, net in nets.items()})

    def run(fn):
        v = x.clone().requires_grad_(True)
        out = fn(v)
        (grad,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), v)
        return out.detach(), grad

    for name, fn in cases.items():
        monkeypatch.setattr(determinism, "gather_resampling", lambda t: False)
        ref = run(fn)
        monkeypatch.setattr(determinism, "gather_resampling", lambda t: True)
        got = run(fn)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------
# the global generators: the caller's states kept, threads serialised (ddkit.determinism.global_rng)


@pytest.fixture(scope="module")
def synthetic():
    from ddkit.data import DatasetConfig, load_dataset

    return load_dataset(DatasetConfig(name="synthetic"))


def _teacher(data, model="tiny_convnet", seed=0, **train):
    from ddkit.teacher import TeacherConfig, train_teacher
    from ddkit.training import TrainConfig

    return train_teacher(data, TeacherConfig(model=model, seed=seed, train=TrainConfig(epochs=1, **train)))


def _evaluate(data, model="tiny_convnet", seed=0):
    import ddkit
    from ddkit.pipeline import DistillConfig, distill

    d = distill(data, DistillConfig(method="random", ipc=2))
    p = ddkit.resolve_protocol("dc-protocol", {"train": {"epochs": 2}, "full_reference": False,
                                               "random_baseline": False, "student": model})
    return ddkit.evaluate(d, p, [seed], data=data)["results"]["distilled"]["per_seed"]


def _dm(data, model, seed):
    import hashlib

    from ddkit.pipeline import DistillConfig, distill

    d = distill(data, DistillConfig(method="dm", ipc=1, seed=seed, options={"iterations": 2, "model": model}))
    return hashlib.sha256(d.images.numpy().tobytes()).hexdigest()


def test_stages_leave_the_callers_rng_alone(synthetic):
    """train_teacher and evaluate seeded torch's global generator (torch.manual_seed) and left it so: the
    caller's draws after the call were a fixed function of ddkit's seed, even after a stage that raised."""
    from ddkit.errors import DDKitError

    for stage in (lambda: _teacher(synthetic), lambda: _evaluate(synthetic)):
        torch.manual_seed(123)
        state = torch.get_rng_state()
        stage()
        assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with pytest.raises(DDKitError, match="nothing was saved"):
        _teacher(synthetic, lr=1e12)
    assert torch.equal(torch.get_rng_state(), state)


def test_global_rng_forks_only_the_cpu_generator_for_the_cpu(monkeypatch):
    """Seeding for a CPU stage reseeds no CUDA generator (torch.manual_seed reseeds them all)."""
    from ddkit.determinism import global_rng

    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: pytest.fail("reseeded every CUDA generator"))
    with global_rng(3, "cpu"):
        inside = torch.rand(2)
    assert torch.equal(inside, torch.rand(2, generator=torch.Generator().manual_seed(3)))


class _SlowInit(torch.nn.Module):
    """Two layers, initialised after pauses in which other threads run."""

    def __init__(self, in_channels, num_classes, image_size):
        import time

        super().__init__()
        time.sleep(0.03)
        self.fc1 = torch.nn.Linear(in_channels * image_size * image_size, 16)
        time.sleep(0.03)
        self.fc2 = torch.nn.Linear(16, num_classes)
        self.feature_dim = 16

    def embed(self, x):
        return torch.relu(self.fc1(x.flatten(1)))

    def forward(self, x):
        return self.fc2(self.embed(x))


@pytest.mark.parametrize("stage", [_evaluate, lambda data, model, seed: _teacher(data, model, seed).fingerprint, _dm],
                         ids=["evaluate", "train_teacher", "distill_dm"])
def test_stages_in_threads_give_what_they_give_alone(synthetic, stage, monkeypatch, tmp_path):
    """Concurrent calls of a stage from threads (a notebook's ThreadPoolExecutor) gave other numbers than
    alone: one thread reseeded or restored the global generator while another drew initial weights from it."""
    from concurrent.futures import ThreadPoolExecutor

    from ddkit.models import MODELS

    monkeypatch.setitem(MODELS._entries, "slow_init", _SlowInit)
    seeds = [0, 1, 2]
    alone = [stage(synthetic, "slow_init", s) for s in seeds]
    # the threads compute in a cache of their own: in the same one they would read what the calls alone wrote
    # (evaluate's students) and train nothing
    monkeypatch.setenv("DDKIT_CACHE", str(tmp_path / "threads-cache"))
    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(lambda s: stage(synthetic, "slow_init", s), seeds)) == alone


class _DropoutNet(_SlowInit):
    """:class:`_SlowInit` with dropout on its features: its training draws masks from the global generator."""

    def embed(self, x):
        return F.dropout(torch.relu(self.fc1(x.flatten(1))), 0.5, self.training)


def test_expert_training_with_dropout_is_seeded_and_leaves_the_callers_rng(synthetic, monkeypatch):
    """Experts drew their dropout masks from the caller's generator: the same seed gave other trajectories in one
    process, and the caller's state moved (a teacher's training is seeded and forked whole, an expert's was not)."""
    from ddkit.config import from_dict
    from ddkit.methods.trajectory import ExpertConfig, train_experts
    from ddkit.models import MODELS

    monkeypatch.setitem(MODELS._entries, "drop_net", _DropoutNet)
    cfg = from_dict(ExpertConfig, {"model": "drop_net", "num_experts": 2, "epochs": 2, "batch_size": 16})
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = train_experts(synthetic, cfg, None, torch.device("cpu")).trajectories
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(7)  # the caller draws: the experts do not depend on it
    again = train_experts(synthetic, cfg, None, torch.device("cpu")).trajectories
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


# ------------------------------------------------------------------------------------------------
# the numeric modes: a stage's own, whatever the caller set around it (ddkit.determinism.stage_modes)


@contextlib.contextmanager
def _default_float64():
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


# what a caller may have around a stage call: a numerics notebook's default dtype, an eval block, a bf16 block
_AMBIENT = {"default_float64": _default_float64, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
            "autocast_bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}


def _modes():
    return (torch.get_default_dtype(), torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))


def _stage_numbers(data, teacher) -> dict:
    """What four tiny stages compute: a teacher's weights, a student's accuracy, dm's images, FKD logits."""
    from ddkit.labels import relabel
    from ddkit.pipeline import DistillConfig, distill

    small = distill(data, DistillConfig(method="random", ipc=2))
    return {"train_teacher": _teacher(data).fingerprint, "evaluate": _evaluate(data),
            "distill_dm": _dm(data, "tiny_convnet", 0),
            "relabel": relabel(small, teacher, 1, augment="none", cutmix_prob=0).tensors["logits"].tolist()}


@pytest.fixture(scope="module")
def plain_numbers(synthetic):
    teacher = _teacher(synthetic)
    return teacher, _stage_numbers(synthetic, teacher)


@pytest.mark.parametrize("ambient", sorted(_AMBIENT))
def test_stages_compute_in_their_own_modes_inside_the_callers(synthetic, plain_numbers, ambient):
    """Inside a caller's torch.set_default_dtype(torch.float64), torch.no_grad() or torch.inference_mode() the
    stages failed with raw torch errors (float64 weights meeting float32 images; a backward without gradients), and
    inside a caller's torch.autocast an fp32 stage computed in bf16 (other numbers, recorded as fp32). Each computes
    what it computes alone, and the caller's modes are as they were after every call, one that raised too."""
    from ddkit.errors import DDKitError

    teacher, want = plain_numbers
    with _AMBIENT[ambient]():
        before = _modes()
        got = _stage_numbers(synthetic, teacher)
        assert _modes() == before
        with pytest.raises(DDKitError, match="nothing was saved"):
            _teacher(synthetic, lr=1e12)
        assert _modes() == before
    assert got == want


_OUTPUT_DTYPES = []


class _NotesDtype(_SlowInit):
    """:class:`_SlowInit` that notes the dtype of its outputs: float32, or autocast's type where autocast is on."""

    def forward(self, x):
        out = super().forward(x)
        _OUTPUT_DTYPES.append(out.dtype)
        return out


def test_a_stage_computes_in_its_own_precision_inside_the_callers_autocast(synthetic, monkeypatch):
    """An fp32 teacher trained inside a caller's torch.autocast computed every forward pass in the caller's type;
    it computes in float32 there, and precision bf16 (ddkit's own autocast) still in bf16."""
    from ddkit.models import MODELS

    monkeypatch.setitem(MODELS._entries, "notes_dtype", _NotesDtype)
    with torch.autocast("cpu", dtype=torch.float16):
        for precision, want in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            _OUTPUT_DTYPES.clear()
            _teacher(synthetic, "notes_dtype", precision=precision)
            assert set(_OUTPUT_DTYPES) == {want}
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16


def test_stage_modes_give_the_default_dtype_back_when_the_last_stage_ends():
    """torch's default dtype is one setting for the process: stages overlapping in threads keep float32 until the
    last one ends, whichever order they end in, and then the caller's comes back."""
    from ddkit.determinism import stage_modes

    with _default_float64():
        first, second = stage_modes(), stage_modes()
        first.__enter__()
        second.__enter__()  # another thread's stage, started while the first runs
        assert torch.get_default_dtype() == torch.float32
        first.__exit__(None, None, None)  # the first ends before the second
        assert torch.get_default_dtype() == torch.float32
        second.__exit__(None, None, None)
        assert torch.get_default_dtype() == torch.float64
    with _default_float64():  # the caller's own thread sets another dtype while a stage runs: it stays after it
        stage = stage_modes()
        stage.__enter__()
        torch.set_default_dtype(torch.float16)
        stage.__exit__(None, None, None)
        assert torch.get_default_dtype() == torch.float16


def test_a_teacher_made_under_inference_mode_is_refused_where_gradients_pass_through_it(synthetic):
    """A teacher whose weights the caller made under torch.inference_mode() failed in sre2l's backward with torch's
    "Inference tensors cannot be saved for backward"; it is a one-line DDKitError naming inference_mode. Where no
    gradient passes through it (relabel) it labels as the same teacher made normally."""
    from ddkit.errors import DDKitError
    from ddkit.labels import relabel
    from ddkit.pipeline import DistillConfig, distill
    from ddkit.teacher import Teacher

    teacher = _teacher(synthetic)
    with torch.inference_mode():
        frozen = Teacher(copy.deepcopy(teacher.model), teacher.manifest)
    assert next(frozen.model.parameters()).is_inference()
    small = distill(synthetic, DistillConfig(method="random", ipc=2))
    assert torch.equal(relabel(small, frozen, 1).tensors["logits"], relabel(small, teacher, 1).tensors["logits"])
    cfg = DistillConfig(method="sre2l", ipc=1, options={"iterations": 1, "stats": "conv"})
    with pytest.raises(DDKitError, match=r"^an input to this stage \(a teacher's weights, or tensors of yours\) was "
                                         r"made under torch.inference_mode\(\), [^\n]*make it outside inference_mode"):
        distill(synthetic, cfg, teacher=frozen)
