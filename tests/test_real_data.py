"""Real Fashion-MNIST (slow tier; runs in CI with DDKIT_DATA set, skipped where the files are absent)."""

import pytest

from conftest import real_data_dir
from ddkit.data import load_dataset
from ddkit.data.base import DatasetConfig
from ddkit.evaluate import evaluate, resolve_protocol
from ddkit.pipeline import DistillConfig, distill
from ddkit.teacher import TeacherConfig, train_teacher
from ddkit.training import TrainConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(real_data_dir() is None, reason="set DDKIT_DATA to a folder with fashion-mnist/"),
]


@pytest.fixture(scope="module")
def fmnist():
    return load_dataset("fashion-mnist")


@pytest.fixture(scope="module")
def small_teacher(fmnist, tmp_path_factory):
    # the demo's teacher recipe (src/ddkit/presets/demo.yaml)
    cfg = TeacherConfig(model="convnet3-w32", train=TrainConfig(epochs=4, batch_size=128, lr=0.05, schedule="cosine"))
    return train_teacher(fmnist, cfg, tmp_path_factory.mktemp("teacher") / "t")


def test_small_teacher_reaches_88(small_teacher):
    assert small_teacher.test_accuracy >= 0.88


def test_random_ipc10_dc_protocol_and_soft_labels(fmnist, small_teacher, tmp_path):
    ds = distill(fmnist, DistillConfig(method="random", ipc=10, seed=0), DatasetConfig(name="fashion-mnist"),
                 tmp_path / "r10")
    hard = resolve_protocol("dc-protocol", {"random_baseline": False, "full_reference": False})
    assert (hard.student, hard.train.epochs, hard.train.lr) == ("convnet3", 300, 0.01)
    rep_hard = evaluate(ds, hard, [0], data=fmnist)
    acc_hard = rep_hard["results"]["distilled"]["mean"]
    assert acc_hard >= 0.70, acc_hard
    soft = resolve_protocol(hard, {"label_mode": "teacher"})
    rep_soft = evaluate(ds, soft, [0], data=fmnist, teacher=small_teacher)
    acc_soft = rep_soft["results"]["distilled"]["mean"]
    assert acc_soft > acc_hard, (acc_soft, acc_hard)
