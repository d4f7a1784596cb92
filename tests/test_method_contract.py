"""Every registered method, on tiny data with its ``smoke_options``: the contract.

Shapes, finite pixels, label range, same seed -> same bytes (soft labels too), another seed ->
other images, config not mutated, artifact round-trip (the saved set is the fit's output), and
resume after an interruption equals an uninterrupted run.
"""

import copy
import re

import pytest
import torch
import yaml

import ddkit
from ddkit.config import from_dict, to_dict
from ddkit.data.base import DatasetConfig, make_synthetic
from ddkit.errors import ConfigError
from ddkit.methods import METHODS, FitContext
from ddkit.pipeline import DistillConfig, distill
from ddkit.teacher import TeacherConfig, train_teacher
from ddkit.training import TrainConfig

IPC = 2


@pytest.fixture(scope="module")
def data():
    return make_synthetic()


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    cfg = TeacherConfig(model="tiny_convnet", model_options={}, train=TrainConfig(epochs=6, batch_size=32, lr=0.05))
    return train_teacher(data, cfg, tmp_path_factory.mktemp("t") / "teacher")


def _fit(name, data, teacher, seed=0, work_dir=None, progress=None):
    cls = METHODS.get(name)
    cfg = from_dict(cls.Config, dict(cls.smoke_options))
    before = copy.deepcopy(to_dict(cfg))
    ctx = FitContext(ipc=IPC, seed=seed, work_dir=work_dir, progress=progress)
    method = cls(cfg).fit(data, [teacher], ctx)
    assert to_dict(cfg) == before, "fit() mutated its config"
    return method.synthetic_


def _assert_same_soft_labels(a, b):
    assert (a.soft_labels is None) == (b.soft_labels is None)
    if a.soft_labels is not None:
        assert a.soft_labels.dtype == b.soft_labels.dtype and torch.equal(a.soft_labels, b.soft_labels)


# every method but `full` (the whole training set, which no seed changes; it is not in the contract at all)
@pytest.mark.parametrize("name", [m for m in METHODS.list() if m != "full"])
def test_method_contract(name, data, teacher, tmp_path):
    out = _fit(name, data, teacher)
    n = IPC * data.num_classes
    assert out.images.shape == (n, *data.image_shape)
    assert out.images.dtype in (torch.uint8, torch.float32)
    assert torch.isfinite(out.images.float()).all()
    assert out.labels.dtype == torch.int64 and out.labels.shape == (n,)
    assert torch.bincount(out.labels, minlength=data.num_classes).tolist() == [IPC] * data.num_classes
    if out.soft_labels is not None:
        assert out.soft_labels.shape == (n, data.num_classes) and torch.isfinite(out.soft_labels).all()
    # another seed, another result: a method that ignores ctx.seed makes one set for every seed
    other = _fit(name, data, teacher, seed=1)
    assert not torch.equal(out.images, other.images), f"{name} made the same images with seed 0 and seed 1"
    # same seed, same result, and the artifact round-trip: a second run, through the distill stage with
    # seed 0, gives the first run's images, labels and (tesla, datm, cvdd) soft labels, and so does the
    # set loaded back from disk (a lossy save or load changes them)
    ds = distill(data, DistillConfig(method=name, ipc=IPC, options=dict(METHODS.get(name).smoke_options)),
                 DatasetConfig(name="synthetic"), tmp_path / "art", teacher)
    loaded = ddkit.load(tmp_path / "art")
    assert loaded.method == name
    for got in (ds, loaded):
        assert torch.equal(got.images, out.images) and torch.equal(got.labels, out.labels)
        _assert_same_soft_labels(out, got)
    # a method that labels its images itself refuses the pipeline's teacher logits over them
    own = METHODS.get(name).own_soft_labels(from_dict(METHODS.get(name).Config, dict(METHODS.get(name).smoke_options)))
    if own is not None:
        assert out.soft_labels is not None, f"{name} says {own} makes soft labels but made none"
        off = METHODS.get(name).own_soft_labels_off(own)
        with pytest.raises(ConfigError, match=re.escape(
                f"labels its images itself (distill.options.{own}), and distill.soft_labels (--soft-labels) "
                "would overwrite them with the teacher's logits; drop --soft-labels / distill.soft_labels: true, or "
                f"set distill.options.{off}")):
            distill(data, DistillConfig(method=name, ipc=IPC, soft_labels=True,
                                        options=dict(METHODS.get(name).smoke_options)),
                    DatasetConfig(name="synthetic"), tmp_path / "own", teacher)
        assert not (tmp_path / "own").exists()


def test_methods_that_label_their_images_say_so():
    assert {m for m in METHODS.list() if METHODS.get(m).own_soft_labels(
        from_dict(METHODS.get(m).Config, dict(METHODS.get(m).smoke_options))) is not None} == {"tesla", "datm", "cvdd"}
    assert METHODS.get("datm").own_soft_labels(from_dict(METHODS.get("datm").Config, {"learn_labels": False})) is None


def test_the_setting_that_turns_off_a_methods_own_labels():
    """The refusal said "turn off soft_labels", easily read as the pipeline's soft_labels / --soft-labels."""
    offs = {}
    for name in ("tesla", "datm", "cvdd"):
        cls = METHODS.get(name)
        own = cls.own_soft_labels(from_dict(cls.Config, dict(cls.smoke_options)))
        offs[name] = cls.own_soft_labels_off(own)
        assert cls.own_soft_labels(from_dict(cls.Config, {**cls.smoke_options, **yaml.safe_load(offs[name])})) is None
    assert offs == {"tesla": "soft_labels: none", "datm": "learn_labels: false", "cvdd": "soft_labels: none"}


@pytest.mark.parametrize("name", [m for m in METHODS.list() if m not in ("full", "random")])
def test_resume_equals_uninterrupted(name, data, teacher, tmp_path):
    straight = _fit(name, data, teacher)
    calls = []

    def kill(step, total, record):
        if any(k.endswith("_pass") for k in record):  # a one-off pass (statistics, experts), not an iteration
            return
        calls.append(step)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(name, data, teacher, work_dir=tmp_path / "work", progress=kill)
    assert any((tmp_path / "work").iterdir()), "no checkpoint was written before the interruption"
    resumed = _fit(name, data, teacher, work_dir=tmp_path / "work")
    assert torch.equal(straight.images, resumed.images)



@pytest.mark.parametrize("name", ["dm", "mtt"])  # methods that refuse checkpoints of other settings
def test_a_set_with_other_settings_starts_afresh_after_an_interruption(name, data, teacher, tmp_path):
    """An interrupted synthesis left checkpoints beside --out, and a re-run to the same --out with another
    seed (or options) stopped on them ("written by a run with other settings"): in `ddkit run` and
    `ddkit bench`, whose set folders keep their names, a changed config could not be run at all."""
    def run(out, seed, progress=None):
        return distill(data,
                       DistillConfig(method=name, ipc=IPC, seed=seed, options=dict(METHODS.get(name).smoke_options)),
                       DatasetConfig(name="synthetic"), tmp_path / out, teacher, progress=progress)

    def kill(step, total, record):
        if not any(k.endswith("_pass") for k in record):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run("set", 0, kill)
    assert any((tmp_path / ".set.work").iterdir()), "no checkpoint was written before the interruption"
    assert torch.equal(run("set", 1).images, run("straight", 1).images)
    assert not (tmp_path / ".set.work").exists()
