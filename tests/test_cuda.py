"""The CUDA path (marked ``gpu``; skipped without CUDA): teacher, every method, relabel, evaluation.

CI has no GPU; run these where one is lent: ``pytest -m gpu``. The CPU suite checks the numbers,
these check that the same code runs on the device, stays on it, agrees with the CPU where the
arithmetic allows, and that the same seed gives the same bytes on the same GPU: the teacher's weights, a
set's images, labels and soft labels, an FKD store's tensors and the evaluation's accuracies.
"""

import pytest
import torch

from ddkit.config import from_dict
from ddkit.data.base import DatasetConfig, make_synthetic
from ddkit.distilled import DistilledSet
from ddkit.evaluate.protocol import resolve_protocol
from ddkit.evaluate.runner import evaluate
from ddkit.labels.fkd import relabel
from ddkit.methods import METHODS, FitContext
from ddkit.pipeline import DistillConfig, distill
from ddkit.teacher import TeacherConfig, train_teacher
from ddkit.training import TrainConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

IPC = 2
CUDA = torch.device("cuda")
TEACHER = TeacherConfig(model="tiny_convnet", model_options={}, train=TrainConfig(epochs=6, batch_size=32, lr=0.05))


@pytest.fixture(scope="module")
def data():
    return make_synthetic()


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    return train_teacher(data, TEACHER, tmp_path_factory.mktemp("t") / "teacher", CUDA)


def _assert_same_set(a, b, what):
    """The same images, labels and soft labels (dtype and bytes), as tests/test_method_contract.py asks on the CPU."""
    assert a.images.dtype == b.images.dtype and torch.equal(a.images.cpu(), b.images.cpu()), \
        f"{what}: same seed, different images on the GPU"
    assert torch.equal(a.labels.cpu(), b.labels.cpu()), f"{what}: same seed, different labels on the GPU"
    assert (a.soft_labels is None) == (b.soft_labels is None), f"{what}: soft labels in one run only"
    if a.soft_labels is not None:
        assert a.soft_labels.dtype == b.soft_labels.dtype and torch.equal(a.soft_labels.cpu(), b.soft_labels.cpu()), \
            f"{what}: same seed, different soft labels on the GPU"


def _fit(name, data, teacher, work_dir=None):
    cls = METHODS.get(name)
    method = cls(from_dict(cls.Config, dict(cls.smoke_options)))
    return method.fit(data, [teacher], FitContext(ipc=IPC, seed=0, device=CUDA, work_dir=work_dir)).synthetic_


def test_teacher_trains_on_cuda_like_on_cpu(data, teacher, tmp_path):
    assert next(teacher.model.parameters()).device.type == "cpu"  # trained on CUDA, handed back on the CPU
    cpu = train_teacher(data, TEACHER, tmp_path / "cpu", "cpu")
    assert teacher.test_accuracy > 2.0 / data.num_classes
    again = train_teacher(data, TEACHER, tmp_path / "again", CUDA)  # same seed, same GPU: the same weights
    assert again.fingerprint == teacher.fingerprint and again.test_accuracy == teacher.test_accuracy
    for (key, a), b in zip(teacher.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    # same seed, same data: the two devices differ by float rounding only, over 6 epochs
    assert abs(teacher.test_accuracy - cpu.test_accuracy) <= 0.1


@pytest.mark.parametrize("name", [m for m in METHODS.list() if m != "full"])
def test_method_on_cuda(name, data, teacher, tmp_path):
    out = _fit(name, data, teacher, tmp_path / "a")
    n = IPC * data.num_classes
    assert out.images.shape == (n, *data.image_shape) and torch.isfinite(out.images.float()).all()
    assert torch.bincount(out.labels.cpu(), minlength=data.num_classes).tolist() == [IPC] * data.num_classes
    if out.soft_labels is not None:
        assert out.soft_labels.shape == (n, data.num_classes) and torch.isfinite(out.soft_labels).all()
    again = _fit(name, data, teacher, tmp_path / "b")
    diff = (out.images.float().cpu() - again.images.float().cpu()).abs().max().item()
    assert diff == 0.0, f"{name}: the same seed on the same GPU gave images differing by up to {diff:.3g}"
    _assert_same_set(out, again, name)


@pytest.mark.parametrize("name", ["sre2l", "gvbsm", "edc"])
def test_batchnorm_teacher_synthesis_is_deterministic_on_cuda(name, data, tmp_path):
    """A ResNet teacher: BN statistics, global average pooling and (G-VBSM/EDC) patch statistics of
    feature maps that are resized first, all differentiated with respect to the images."""
    cfg = TeacherConfig(model="resnet18_cifar", model_options={"width": 8}, train=TrainConfig(epochs=1, batch_size=32))
    resnet = train_teacher(data, cfg, tmp_path / "r18", CUDA)
    cls = METHODS.get(name)
    options = {**cls.smoke_options, "stats": "bn+conv", "patch_size": 3}  # 16 px maps resized to 18 for 3 px patches
    runs = [cls(from_dict(cls.Config, dict(options))).fit(data, [resnet],
                                                          FitContext(ipc=IPC, seed=0, device=CUDA)).synthetic_
            for _ in range(2)]
    assert torch.isfinite(runs[0].images.float()).all()
    _assert_same_set(runs[0], runs[1], name)


def test_real_statistics_on_cuda_equal_cpu_and_repeat_exactly(data, tmp_path):
    """The statistics pass keeps its float64 sums on the device (class sums by matmul, not atomics)."""
    from ddkit.methods import statistics as S

    cfg = TeacherConfig(model="resnet18_cifar", model_options={"width": 8}, train=TrainConfig(epochs=1, batch_size=32))
    model = train_teacher(data, cfg, tmp_path / "r18", CUDA).model
    keys = S.statistic_layers(model)
    cuda = [S.compute_real_statistics(model, data, keys, CUDA, batch_size=16, patch_size=3) for _ in range(2)]
    cpu = S.compute_real_statistics(model.cpu(), data, keys, "cpu", batch_size=16, patch_size=3)
    assert cuda[0].keys() == cpu.keys() and all(v.device.type == "cpu" for v in cuda[0].values())
    for key, ref in cpu.items():
        assert torch.equal(cuda[0][key], cuda[1][key]), key
        torch.testing.assert_close(cuda[0][key], ref, rtol=2e-2, atol=2e-3, msg=key)  # cuDNN convs may use TF32


def test_distill_relabel_evaluate_on_cuda(data, teacher, tmp_path):
    """Every stage after the teacher twice with the same seed on the GPU: the same set (images, labels,
    the teacher's soft labels), the same FKD store and the same accuracies, seed by seed."""
    cfg = DistillConfig(method="sre2l", ipc=IPC, soft_labels=True, options=dict(METHODS.get("sre2l").smoke_options))
    ds = distill(data, cfg, DatasetConfig(name="synthetic"), tmp_path / "set", teacher, CUDA)
    assert ds.images.device.type == "cpu"  # artifacts hold CPU tensors whatever the device
    assert ds.soft_labels is not None and ds.soft_labels.device.type == "cpu"
    loaded = DistilledSet.load(tmp_path / "set")
    _assert_same_set(ds, loaded, "sre2l saved and loaded")
    _assert_same_set(ds, distill(data, cfg, DatasetConfig(name="synthetic"), tmp_path / "set2", teacher, CUDA),
                     "sre2l distilled again")
    store = relabel(loaded, teacher, epochs=3, device=CUDA)
    assert store.epochs == 3 and store.num_images == len(loaded)
    again = relabel(loaded, teacher, epochs=3, device=CUDA)
    assert store.tensors.keys() == again.tensors.keys()
    for key, value in store.tensors.items():
        assert value.dtype == again.tensors[key].dtype and torch.equal(value, again.tensors[key]), \
            f"FKD store {key}: same seed, different values on the GPU"
    cpu_store = relabel(loaded, teacher.to("cpu"), epochs=3, device="cpu")
    teacher.to(CUDA)
    # the same views (drawn by CPU generators) on both devices; fp16 logits equal to rounding
    idx = torch.arange(len(loaded))
    torch.testing.assert_close(store.targets(0, idx).float(), cpu_store.targets(0, idx).float(), rtol=2e-2, atol=2e-2)
    protocol = resolve_protocol("soft-kl", {"train": {"epochs": 8, "batch_size": 8}, "full_reference": False})
    report = evaluate(ds, protocol, [0, 1], data=data, teacher=teacher, device=CUDA)
    acc = report["results"]["distilled"]["mean"]
    assert 1.0 / data.num_classes < acc <= 1.0
    # in a cache of its own: in the first call's, every student would be read back instead of trained again
    again = evaluate(ds, protocol, [0, 1], data=data, teacher=teacher, device=CUDA, cache_dir=tmp_path / "again")
    assert again["results"]["distilled"]["per_seed"] == report["results"]["distilled"]["per_seed"]
    assert again["results"] == report["results"]  # the random baseline's too


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda(data, precision):
    from ddkit.models import create_model
    from ddkit.training import train_classifier

    def train(p):
        torch.manual_seed(0)
        model = create_model("tiny_convnet", 1, 4, 16)
        cfg = TrainConfig(epochs=15, batch_size=32, lr=0.05, precision=p)
        return train_classifier(model, data.train, data.mean, data.std, cfg, seed=0, device=CUDA, test=data.test)

    full, mixed, again = train("fp32"), train(precision), train(precision)
    assert mixed.test_accuracy >= 0.85 and abs(mixed.test_accuracy - full.test_accuracy) <= 0.1
    assert [h["loss"] for h in mixed.history] != [h["loss"] for h in full.history]
    assert [h["loss"] for h in mixed.history] == [h["loss"] for h in again.history]
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in mixed.model.parameters())


@pytest.mark.parametrize("spec", ["dsa", "rrc_flip", "crop_flip", "cutmix"])
def test_augmentation_on_cuda_never_waits_for_the_gpu(spec):
    from ddkit.data.augment import CutMix, build_augment
    from ddkit.data.base import to_device

    aug = CutMix() if spec == "cutmix" else build_augment(spec)
    gen = torch.Generator().manual_seed(0)
    params = aug.sample(64, gen, (16, 16))
    if spec == "dsa":  # two draws of 32 images: different operations in one batch (the index path)
        more = aug.sample(32, gen, (16, 16))
        params = {k: torch.cat([v[:32], more[k]]) for k, v in params.items() if k in more}
    x = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    x_cuda = to_device(x, CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        out = aug.apply(x_cuda, params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = aug.apply(x, params)
    if spec == "cutmix":
        out, want = out[0], want[0]
    assert torch.allclose(out.cpu(), want, atol=1e-5)


def test_real_batches_of_the_matching_methods_never_wait_for_the_gpu(data):
    """RealByClass.batch moved its host-drawn indices with a plain .to("cuda"), which waits for the
    GPU's queue once per class step of DM, DataDAM, DC and DSA."""
    from ddkit.methods.matching import RealByClass

    real = RealByClass(data, CUDA)
    want = RealByClass(data, torch.device("cpu")).batch(1, 8, torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        got = real.batch(1, 8, torch.Generator().manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got.is_cuda and torch.equal(got.cpu(), want)


def test_stages_on_cuda_leave_the_callers_generators_alone(data):
    """train_teacher and evaluate seeded torch's generators (torch.manual_seed, every CUDA one too) and left them
    so; they now give the caller's CPU and CUDA states back, and give the same accuracy called twice."""
    torch.manual_seed(123)
    states = torch.get_rng_state(), torch.cuda.get_rng_state(CUDA)
    train_teacher(data, TeacherConfig(model="tiny_convnet", train=TrainConfig(epochs=1)), device=CUDA)
    d = distill(data, DistillConfig(method="random", ipc=IPC), DatasetConfig(name="synthetic"))
    p = resolve_protocol("dc-protocol", {"train": {"epochs": 2}, "full_reference": False, "random_baseline": False,
                                         "student": "tiny_convnet"})
    accs = [evaluate(d, p, [0], data=data, device=CUDA)["results"]["distilled"]["per_seed"] for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), states[0]) and torch.equal(torch.cuda.get_rng_state(CUDA), states[1])
    assert accs[0] == accs[1]


def test_stages_on_cuda_compute_in_their_own_precision_inside_the_callers_autocast(data):
    """Inside a caller's torch.autocast("cuda") an fp32 teacher trained in the caller's fp16 (recorded as fp32); it
    trains as alone there, and precision bf16 (ddkit's own autocast) still in bf16. The caller's autocast is back."""
    fp32 = TeacherConfig(model="tiny_convnet", train=TrainConfig(epochs=1))
    bf16 = TeacherConfig(model="tiny_convnet", train=TrainConfig(epochs=1, precision="bf16"))
    alone = [train_teacher(data, cfg, device=CUDA).fingerprint for cfg in (fp32, bf16)]
    with torch.autocast("cuda", dtype=torch.float16):
        inside = [train_teacher(data, cfg, device=CUDA).fingerprint for cfg in (fp32, bf16)]
        assert torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.float16
    assert inside == alone and alone[0] != alone[1]
