"""Teacher BatchNorm modes: running statistics, or CV-DD's batch-specific soft labels (BSSL)."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from ddkit.bench import BenchConfig, RelabelSpec, run_bench
from ddkit.cli import main
from ddkit.config import config_hash, from_dict, to_dict
from ddkit.data.base import DatasetConfig, make_synthetic
from ddkit.distilled import DistilledSet
from ddkit.errors import ConfigError
from ddkit.evaluate import PROTOCOLS, resolve_protocol
from ddkit.evaluate.runner import teacher_logits
from ddkit.labels import SoftLabelStore, relabel
from ddkit.pipeline import DistillConfig, distill, distill_hash
from ddkit.teacher import Teacher, TeacherConfig, train_teacher
from ddkit.training import (
    TrainConfig,
    batch_statistics,
    label_groups,
    normalizer,
    teacher_forward,
    to_float,
    train_classifier,
)

BN_TEACHER = {"model": "convnet", "model_options": {"depth": 2, "width": 8, "norm": "batchnorm"},
              "train": {"epochs": 3, "batch_size": 32, "lr": 0.05}}


@pytest.fixture(scope="module")
def data():
    return make_synthetic()


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    """A ConvNet with BatchNorm: its running statistics are estimates on the real training images."""
    cfg = TeacherConfig(model="convnet", model_options=BN_TEACHER["model_options"],
                        train=TrainConfig(epochs=3, batch_size=32, lr=0.05))
    return train_teacher(data, cfg, tmp_path_factory.mktemp("bn") / "teacher")


@pytest.fixture(scope="module")
def distilled(data, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("bnset") / "r3"
    return distill(data, DistillConfig(method="random", ipc=3), DatasetConfig(name="synthetic"), out, teacher)


def _views(data, n=12, start=0):
    return normalizer(data.mean, data.std, "cpu")(to_float(data.train.images[start : start + n], "cpu"))


def _manual_batch_logits(model, x):
    """The ConvNet by hand, every BatchNorm with the batch's mean and biased variance."""
    h = x
    for layer in model.features:
        if isinstance(layer, nn.BatchNorm2d):
            mu = h.mean((0, 2, 3), keepdim=True)
            var = h.var((0, 2, 3), unbiased=False, keepdim=True)
            h = (h - mu) / torch.sqrt(var + layer.eps) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
        else:
            h = layer(h)
    return model.classifier(h.flatten(1))


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(m.training, getattr(m, "track_running_stats", None)) for m in model.modules()])


def _assert_unchanged(model, snap):
    state, flags = snap
    for k, v in model.state_dict().items():  # parameters, running stats and num_batches_tracked
        assert torch.equal(v, state[k]), k
    assert [(m.training, getattr(m, "track_running_stats", None)) for m in model.modules()] == flags


# --- the shared helper ---------------------------------------------------------------------------


def test_batch_mode_uses_batch_statistics_and_leaves_the_teacher_as_it_was(data, teacher):
    model = teacher.model.eval()
    x = _views(data)
    snap = _snapshot(model)
    running = teacher_forward(model, x)
    batch = teacher_forward(model, x, "batch")
    _assert_unchanged(model, snap)
    with torch.no_grad():
        assert torch.equal(running, model(x))
        assert torch.allclose(batch, _manual_batch_logits(model, x), atol=1e-5)
    assert float((batch - running).abs().max()) > 1e-2  # the running statistics are not the batch's
    assert not batch.requires_grad and batch.dtype == torch.float32
    # a model in train mode keeps it; the flags come back even when the forward pass fails
    model.train()
    snap = _snapshot(model)
    with pytest.raises(RuntimeError), batch_statistics(model) as layers:
        assert layers == 2 and all(m.training and not m.track_running_stats for m in model.modules()
                                   if isinstance(m, nn.BatchNorm2d))
        model(torch.zeros(2, 5, 16, 16))  # wrong channel count
    _assert_unchanged(model, snap)
    model.eval()


def test_groups_have_their_own_statistics(data, teacher):
    model = teacher.model.eval()
    x = _views(data, 12)
    grouped = teacher_forward(model, x, "batch", group=4)
    for g in range(3):
        part = x[4 * g : 4 * g + 4]
        assert torch.allclose(grouped[4 * g : 4 * g + 4], teacher_forward(model, part, "batch"), atol=1e-6)
    other = x.clone()
    other[4:] = _views(data, 8, start=40)  # new images in groups 2 and 3
    again = teacher_forward(model, other, "batch", group=4)
    assert torch.equal(again[:4], grouped[:4]) and not torch.allclose(again[4:], grouped[4:])
    whole = teacher_forward(model, x, "batch")
    assert not torch.allclose(whole[:4], grouped[:4], atol=1e-3)
    assert torch.allclose(teacher_forward(model, x, "batch", group=12), whole) and torch.allclose(
        teacher_forward(model, x, "batch", group=50), whole)
    assert torch.allclose(teacher_forward(model, x[:5], "batch", group=4)[4:],
                          teacher_forward(model, x[4:5], "batch"), atol=1e-6)  # a smaller last group


def test_label_groups():
    gen = torch.Generator().manual_seed(0)
    assert [g.tolist() for g in label_groups(7, 3, "running", None, gen)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())  # running draws nothing
    groups = label_groups(10, 3, "batch", 4, torch.Generator().manual_seed(1))
    assert [len(g) for g in groups] == [4, 4, 2] and sorted(torch.cat(groups).tolist()) == list(range(10))
    assert torch.cat(groups).tolist() != list(range(10))  # a permutation: groups mix a class-sorted set
    assert torch.equal(torch.cat(groups),
                       torch.cat(label_groups(10, 256, "batch", 4, torch.Generator().manual_seed(1))))
    assert [len(g) for g in label_groups(10, 3, "batch", None, torch.Generator())] == [10]
    assert label_groups(0, 3, "batch", 2, torch.Generator()) == []


def test_teacher_logits_in_batch_mode(data, teacher):
    images = data.train.images[:12]
    x = _views(data, 12)
    running = teacher_logits(teacher, images, data.mean, data.std, "cpu")
    with torch.no_grad():
        assert torch.allclose(running, teacher.model(x), atol=1e-6)
    whole = teacher_logits(teacher, images, data.mean, data.std, "cpu", batch_size=5, bn="batch")
    assert torch.allclose(whole, teacher_forward(teacher.model, x, "batch"), atol=1e-5)  # one group of all images
    grouped = teacher_logits(teacher, images, data.mean, data.std, "cpu", bn="batch", bn_batch=4, seed=3)
    assert torch.equal(grouped, teacher_logits(teacher, images, data.mean, data.std, "cpu", batch_size=2, bn="batch",
                                               bn_batch=4, seed=3))  # independent of the forward batch size
    for idx in label_groups(12, 512, "batch", 4, torch.Generator().manual_seed(3)):
        assert torch.allclose(grouped[idx], teacher_forward(teacher.model, x[idx], "batch"), atol=1e-6)
    assert not torch.allclose(grouped, running, atol=1e-2)
    with pytest.raises(ConfigError, match="teacher_bn_batch=4 only applies with teacher_bn 'batch'"):
        teacher_logits(teacher, images, data.mean, data.std, "cpu", bn_batch=4)


# --- training with an online teacher -------------------------------------------------------------


def test_train_classifier_labels_with_batch_statistics(data, teacher):
    """A hook on the teacher's first BatchNorm: in batch mode it normalises every group of the
    student's batch with that group's statistics (output mean = beta per channel)."""
    model = teacher.model.eval()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    seen = []

    def hook(module, inputs, output):
        seen.append((module.training, len(output), output.mean((0, 2, 3)) - module.bias))

    handle = bn.register_forward_hook(hook)
    snap = _snapshot(model)
    sub = data.train.subset(torch.arange(0, 96, 4))  # 24 images
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.01, augment="flip")

    def run(**kw):
        torch.manual_seed(0)
        student = nn.Sequential(nn.Flatten(), nn.Linear(256, 4))
        return train_classifier(student, sub, data.mean, data.std, cfg, seed=0, label_source="teacher", loss="kl",
                                teacher=model, **kw).history

    try:
        running = run()
        assert [s[:2] for s in seen] == [(False, 8)] * 6
        seen.clear()
        batch = run(teacher_bn="batch", teacher_bn_batch=4)
        assert [s[:2] for s in seen] == [(True, 4)] * 12
        assert max(float(s[2].abs().max()) for s in seen) < 1e-5  # normalised by its own group's statistics
        assert batch != running and batch == run(teacher_bn="batch", teacher_bn_batch=4)  # other labels, deterministic
    finally:
        handle.remove()
    _assert_unchanged(model, snap)
    with pytest.raises(ConfigError, match="teacher_bn must be 'running' or 'batch'"):
        run(teacher_bn="train")


# --- protocol --------------------------------------------------------------------------------------


def test_protocol_identity_omits_running_and_records_batch():
    for name in ("dc-protocol", "soft-kl", "edc"):
        p = PROTOCOLS.get(name)()
        old = {k: v for k, v in to_dict(p).items()
               if k not in ("teacher_bn", "teacher_bn_batch", "extra_teachers", "learned_lr", "zca", "zca_reg")}
        if p.train.ema_decay > 0:  # the EMA's decay warm-up is marked (test_training.py)
            old["train"]["ema_warmup"] = True
        del old["train"]["precision"]  # added later, left out at fp32 (test_config.py)
        assert p.teacher_bn == "running" and p.identity() == old and p.hash == config_hash(old)
    base = resolve_protocol("soft-kl")
    batch = resolve_protocol("soft-kl", {"teacher_bn": "batch"})
    grouped = resolve_protocol("soft-kl", {"teacher_bn": "batch", "teacher_bn_batch": 8})
    assert batch.identity()["teacher_bn"] == "batch" and batch.identity()["teacher_bn_batch"] is None
    assert grouped.identity()["teacher_bn_batch"] == 8
    assert len({base.hash, batch.hash, grouped.hash}) == 3
    with pytest.raises(ConfigError, match="'batchy' is not one of \\['running', 'batch'\\]; did you mean 'batch'"):
        resolve_protocol("soft-kl", {"teacher_bn": "batchy"})
    with pytest.raises(ConfigError,
                       match="teacher_bn_batch=8 only applies with teacher_bn 'batch'; set teacher_bn=batch"):
        resolve_protocol("soft-kl", {"teacher_bn_batch": 8})
    with pytest.raises(ConfigError, match="teacher_bn_batch must be a number of images >= 1"):
        resolve_protocol("soft-kl", {"teacher_bn": "batch", "teacher_bn_batch": 0})


def test_cvdd_protocol_preset(capsys):
    """QA 18b F4: CV-DD's relabel.py runs each batch of 16 through the teachers in two halves of 8 (BatchNorm
    statistics of 8 images); the preset normalised over the whole batch of 16."""
    p = resolve_protocol("cvdd")
    t = p.train
    assert ((p.label_mode, p.loss, p.temperature, p.teacher_bn, p.teacher_bn_batch)
            == ("teacher", "kl", 20.0, "batch", 8))
    assert t.batch_size == 2 * p.teacher_bn_batch
    assert ((t.optimizer, t.lr, t.weight_decay, t.schedule, t.batch_size, t.epochs)
            == ("adamw", 1e-3, 0.01, "cosine", 16, 300))
    assert (t.cutmix_prob, t.cutmix_alpha, t.augment, t.augment_options) == (1.0, 1.0, "rrc_flip", {"scale_min": 0.08})
    assert p.identity()["teacher_bn"] == "batch"
    assert main(["list", "protocols", "cv*"]) == 0 and capsys.readouterr().out.split() == ["cvdd"]
    assert main(["show", "cvdd"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["teacher_bn"], shown["teacher_bn_batch"]) == ("batch", 8)


def test_evaluate_passes_the_protocol_mode_to_training(data, teacher, distilled, monkeypatch):
    import ddkit.evaluate.runner as runner

    calls = []
    real = runner.train_classifier
    monkeypatch.setattr(runner, "train_classifier", lambda *a, **k: calls.append(k) or real(*a, **k))
    protocol = resolve_protocol("cvdd", {"student": "tiny_convnet", "random_baseline": False, "full_reference": False,
                                         "teacher_bn_batch": 6, "train": {"epochs": 1}})
    rep = runner.evaluate(distilled, protocol, [0], data=data, teacher=teacher)
    assert [(k["teacher_bn"], k["teacher_bn_batch"], k["label_source"]) for k in calls] == [("batch", 6, "teacher")]
    assert rep["config"]["teacher_bn"] == "batch" and rep["protocol_hash"] == protocol.hash


# --- distillation-time soft labels -----------------------------------------------------------------


def test_distill_soft_labels_in_batch_mode_and_stable_hashes(data, teacher, distilled):
    class Data:
        fingerprint = data.fingerprint
        normalisation = data.normalisation
        num_classes = data.num_classes

    plain = DistillConfig(method="random", ipc=3, soft_labels=True)
    # the fields a DistillConfig had before soft_labels_bn (image_dtype came later still, identity-neutral too)
    old = {k: v for k, v in to_dict(plain).items() if not k.startswith("soft_labels_bn") and k != "image_dtype"}
    assert distill_hash(plain, Data, teacher) == config_hash({"distill": old, "data": data.fingerprint,
                                                              "norm": data.normalisation,
                                                              "teacher": teacher.fingerprint})
    cfg = DistillConfig(method="random", ipc=3, soft_labels=True, soft_labels_bn="batch", soft_labels_bn_batch=4)
    assert distill_hash(cfg, Data, teacher) != distill_hash(plain, Data, teacher)
    ds = distill(data, cfg, DatasetConfig(name="synthetic"), None, teacher)
    assert torch.equal(ds.images, distilled.images)  # the same images; only the labels differ
    want = teacher_logits(teacher, ds.images, data.mean, data.std, "cpu", bn="batch", bn_batch=4, seed=cfg.seed)
    assert torch.allclose(ds.soft_labels.float(), want, atol=1e-3)
    running = teacher_logits(teacher, ds.images, data.mean, data.std, "cpu")
    assert not torch.allclose(ds.soft_labels.float(), running, atol=1e-2)
    with pytest.raises(ConfigError,
                       match="soft_labels_bn batch only applies to stored soft labels; set soft_labels: true"):
        DistillConfig(method="random", soft_labels_bn="batch")
    with pytest.raises(ConfigError, match="soft_labels_bn_batch=4 only applies with soft_labels_bn 'batch'"):
        DistillConfig(method="random", soft_labels=True, soft_labels_bn_batch=4)


def _random_subset_labels(runner, monkeypatch):
    """Spy on the students evaluate trains: the stored logits the random subset (the second) trains on."""
    seen = []
    monkeypatch.setattr(runner, "_train_student", lambda train_set, *a, **k: seen.append((train_set, a[7])) or 0.5)
    return seen


def test_random_baseline_of_batch_statistics_labels_is_labelled_alike(data, teacher, tmp_path, monkeypatch):
    """A set whose stored labels used batch statistics (soft_labels_bn: batch) was compared with a random
    subset labelled with running statistics: a better label source mixed into the comparison."""
    import ddkit.evaluate.runner as runner

    cfg = DistillConfig(method="random", ipc=3, soft_labels=True, soft_labels_bn="batch", soft_labels_bn_batch=4)
    ds = distill(data, cfg, DatasetConfig(name="synthetic"), tmp_path / "set", teacher)
    seen = _random_subset_labels(runner, monkeypatch)
    protocol = resolve_protocol("dc-protocol",
                                {"student": "tiny_convnet", "label_mode": "stored", "full_reference": False,
                                 "loss": "kl", "train": {"epochs": 1}})
    runner.evaluate(ds, protocol, [0], data=data, teacher=teacher, cache_dir=tmp_path / "cache")
    (_, own), (subset, stored) = seen
    assert torch.equal(own, ds.soft_labels)
    seed = runner.RANDOM_SEED_OFFSET
    want = teacher_logits(teacher, subset.images, data.mean, data.std, "cpu", bn="batch", bn_batch=4, seed=seed)
    assert torch.allclose(stored, want, atol=1e-5)
    running = teacher_logits(teacher, subset.images, data.mean, data.std, "cpu", seed=seed)
    assert not torch.allclose(stored, running, atol=1e-3)
    # its cache entry is not the one of a running-statistics set's random subset
    plain = distill(data, DistillConfig(method="random", ipc=3, soft_labels=True), DatasetConfig(name="synthetic"),
                    tmp_path / "plain", teacher)
    seen.clear()
    runner.evaluate(plain, protocol, [0], data=data, teacher=teacher, cache_dir=tmp_path / "cache")
    assert len(seen) == 2 and torch.allclose(seen[1][1], running, atol=1e-5)
    assert len(list((tmp_path / "cache" / "random-baseline").iterdir())) == 2
    # a set labelled with running statistics, under a protocol whose teacher_bn is batch (the cvdd preset's):
    # its random subset is labelled with running statistics too
    seen.clear()
    batch_protocol = dataclasses.replace(protocol, teacher_bn="batch")
    runner.evaluate(plain, batch_protocol, [0], data=data, teacher=teacher, cache_dir=tmp_path / "cache")
    assert len(seen) == 2 and torch.allclose(seen[1][1], running, atol=1e-5)


# --- FKD relabelling ---------------------------------------------------------------------------------


def test_relabel_cli_records_the_mode_and_stores_other_logits(teacher, distilled, tmp_path, capsys):
    common = ["relabel", str(distilled.path), "--teacher", str(teacher.path), "--epochs", "2", "--cutmix-prob", "0.5",
              "-q", "--out"]
    assert main([*common, str(tmp_path / "run")]) == 0
    assert main([*common, str(tmp_path / "batch"), "--teacher-bn", "batch", "--teacher-bn-batch", "4"]) == 0
    assert main([*common, str(tmp_path / "batch3"), "--teacher-bn", "batch", "--teacher-bn-batch", "4",
                 "--batch-size", "3"]) == 0
    capsys.readouterr()
    man = json.loads((tmp_path / "batch/manifest.json").read_text())
    assert (man["teacher_bn"], man["teacher_bn_batch"]) == ("batch", 4)
    assert (man["config"]["teacher_bn"], man["config"]["teacher_bn_batch"]) == ("batch", 4)
    run_man = json.loads((tmp_path / "run/manifest.json").read_text())
    assert ((run_man["teacher_bn"], run_man["teacher_bn_batch"]) == ("running", None)
            and "teacher_bn" not in run_man["config"])
    run, batch = SoftLabelStore.load(tmp_path / "run"), SoftLabelStore.load(tmp_path / "batch")
    assert batch.teacher_bn == "batch" and batch.teacher_bn_batch == 4 and run.teacher_bn == "running"
    for key in run.tensors:  # the same views (augmentation and CutMix) ...
        if key != "logits":
            assert torch.equal(run.tensors[key], batch.tensors[key]), key
    # ... other logits
    assert float((run.tensors["logits"].float() - batch.tensors["logits"].float()).abs().max()) > 1e-2
    assert torch.equal(batch.tensors["logits"], SoftLabelStore.load(tmp_path / "batch3").tensors["logits"])
    # the logits of one group: its rendered views through the teacher with the group's statistics
    one = relabel(distilled, teacher, 1, cutmix_prob=0.5, teacher_bn="batch", teacher_bn_batch=12)
    r = one.replay(0, torch.arange(12))
    views = one.render(r, distilled.images, distilled.mean, distilled.std)
    assert torch.allclose(r.targets, teacher_forward(teacher.model, views, "batch"), atol=2e-2)  # fp16 storage


def test_relabel_cli_rejects_bad_settings(teacher, distilled, tmp_path, capsys):
    import subprocess
    import sys

    base = ["relabel", str(distilled.path), "--teacher", str(teacher.path), "--epochs", "1", "--out",
            str(tmp_path / "x")]
    proc = subprocess.run([sys.executable, "-m", "ddkit", *base, "--teacher-bn", "batchy"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--teacher-bn: invalid choice: 'batchy'" in proc.stderr
    assert main([*base, "--teacher-bn-batch", "4", "-q"]) == 2
    assert capsys.readouterr().err.strip() == ("error: teacher_bn_batch=4 only applies with teacher_bn 'batch'; "
                                               "set teacher_bn=batch or drop teacher_bn_batch")
    assert main([*base, "--teacher-bn", "batch", "--teacher-bn-batch", "0", "-q"]) == 2
    assert "teacher_bn_batch must be a number of images >= 1" in capsys.readouterr().err
    for flags, message in ((["--batch-size", "0"], "relabel batch_size must be >= 1, got 0"),
                           (["--cutmix-prob", "-0.5"], "cutmix_prob must be in [0, 1] (0 disables CutMix), got -0.5"),
                           (["--augment-option", "scale_min=abc"],
                            "augment_options.scale_min: expected a number, got 'abc'")):
        assert main([*base, *flags, "-q"]) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"
    # a teacher of another image size: refused before anything is labelled
    small = make_synthetic(image_size=8)
    other = distill(small, DistillConfig(method="random", ipc=2),
                    DatasetConfig(name="synthetic", options={"image_size": 8}), tmp_path / "small")
    assert main(["relabel", str(other.path), "--teacher", str(teacher.path), "--epochs", "1", "--out",
                 str(tmp_path / "x"), "-q"]) == 2
    assert "teacher expects images [1, 16, 16] but the distilled set's are [1, 8, 8]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))


def test_random_baseline_relabels_like_the_store(data, teacher, distilled, tmp_path):
    from ddkit.evaluate.runner import _relabel_like, random_cache_path

    store = relabel(distilled, teacher, 1, cutmix_prob=0.0, teacher_bn="batch", teacher_bn_batch=4)
    plain = relabel(distilled, teacher, 1, cutmix_prob=0.0)
    subset = data.train.subset(torch.arange(0, 96, 8))
    _, rstore = _relabel_like(store, subset, data, teacher, 5, "cpu")
    assert (rstore.teacher_bn, rstore.teacher_bn_batch) == ("batch", 4)
    protocol = resolve_protocol("soft-kl", {"label_mode": "fkd", "fkd_store": "x"})
    keys = {random_cache_path(protocol, data, teacher, s, 3, 0, tmp_path) for s in (store, plain)}
    assert len(keys) == 2


# --- bench ---------------------------------------------------------------------------------------------


def test_bench_relabel_spec_passes_the_mode_and_keeps_default_keys(tmp_path):
    spec = RelabelSpec()
    assert spec.identity() == {k: v for k, v in to_dict(spec).items() if not k.startswith("teacher_bn")}
    assert RelabelSpec(teacher_bn="batch").identity()["teacher_bn"] == "batch"
    with pytest.raises(ConfigError, match="teacher_bn_batch=2 only applies"):
        RelabelSpec(teacher_bn_batch=2)
    cfg = from_dict(BenchConfig, {
        "datasets": ["synthetic"], "methods": ["random"], "ipcs": [2], "students": ["tiny_convnet"],
        "label_modes": ["fkd"], "seeds": [0], "protocol": "soft-kl", "out": str(tmp_path / "run"), "device": "cpu",
        "relabel": {"epochs": 1, "cutmix_prob": 0.0, "teacher_bn": "batch", "teacher_bn_batch": 4},
        "overrides": {"full_epochs": 1, "random_baseline": False, "train": {"epochs": 1, "batch_size": 8}},
        "teacher": BN_TEACHER})
    rows = run_bench(cfg)
    stores = [p for p in (tmp_path / "run" / "labels").iterdir() if not p.name.startswith(".")]
    man = json.loads((stores[0] / "manifest.json").read_text())
    assert len(stores) == 1 and (man["teacher_bn"], man["teacher_bn_batch"]) == ("batch", 4)
    assert rows[0]["label_mode"] == "fkd"
    # (one student epoch: its accuracy is the fkd evaluation's record, whatever it is)
    own = json.loads((tmp_path / "run" / "evals" / f"{rows[0]['eval_keys'][0]}.json").read_text())
    assert rows[0]["acc"] == own["results"]["distilled"] and own["protocol_hash"] == rows[0]["protocol_hash"]
    ds = DistilledSet.load(tmp_path / "run" / "distilled" / "synthetic-random-ipc2")
    t = Teacher.load(tmp_path / "run" / "teachers" / "synthetic")
    want = relabel(ds, t, 1, cutmix_prob=0.0, teacher_bn="batch", teacher_bn_batch=4, seed=0)
    assert torch.equal(SoftLabelStore.load(stores[0]).tensors["logits"], want.tensors["logits"])
    assert not torch.allclose(want.tensors["logits"].float(),
                              relabel(ds, t, 1, cutmix_prob=0.0).tensors["logits"].float(), atol=1e-2)



DDP_SCRIPT = """
import os, sys, torch
from ddkit import distributed as ddist
from ddkit.data import make_synthetic
from ddkit.teacher import Teacher
from ddkit.training import TrainConfig, train_classifier
info = ddist.init_from_env("cpu")
data = make_synthetic()
torch.manual_seed(0)
student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 4))
cfg = TrainConfig(epochs=2, batch_size=16, lr=0.01, augment="flip", cutmix_prob=0.5)
train_classifier(student, data.train.subset(torch.arange(0, 96, 2)), data.mean, data.std, cfg, seed=0,
                 label_source="teacher", loss="kl", teacher=Teacher.load(sys.argv[1]).model, teacher_bn="batch",
                 teacher_bn_batch=6, distributed=info.enabled)
if info.is_main:
    torch.save(student.state_dict(), sys.argv[2])
ddist.shutdown()
# skip interpreter teardown, as test_distributed's BatchNorm ranks: gloo's static destructors could
# abort a rank after its work was done ("terminate called without an active exception")
os._exit(0)
"""


@pytest.mark.slow
def test_batch_statistics_under_torchrun_are_those_of_the_global_batch(teacher, tmp_path):
    """2 gloo ranks: each labels the whole global batch (groups of 6 straddle the ranks' slices of 8), so
    the student equals the single-process one."""
    import os
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for ranks, out in ((1, "one.pt"), (2, "two.pt")):
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
        proc = subprocess.run([sys.executable, *launcher, str(script), str(teacher.path), str(tmp_path / out)],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5


@pytest.mark.parametrize("flags, message", [
    (["--cutmix-alpha", "nan"],
     "cutmix_alpha must be a finite number > 0 (CutMix's Beta(alpha, alpha); 1 is usual), got nan"),
    (["--cutmix-alpha", "inf"],
     "cutmix_alpha must be a finite number > 0 (CutMix's Beta(alpha, alpha); 1 is usual), got inf"),
    (["--cutmix-prob", "nan"], "cutmix_prob must be in [0, 1] (0 disables CutMix), got nan"),
    (["--seed", "-1"], "relabel seed must be an integer in [0, 2^32), got -1"),
    (["--seed", "99999999999999999999"], "relabel seed must be an integer in [0, 2^32), got 99999999999999999999"),
    (["--epochs", "0"], "relabel epochs must be an integer >= 1, got 0"),
])
def test_relabel_cli_rejects_non_finite_cutmix_and_out_of_range_seeds(teacher, distilled, tmp_path, capsys,
                                                                      flags, message):
    """`--cutmix-alpha nan` used to end in a torch ValueError traceback and leave `.x.partial` behind;
    `--cutmix-alpha inf` and seeds outside [0, 2^32) were accepted."""
    base = ["relabel", str(distilled.path), "--teacher", str(teacher.path), "--epochs", "1", "--out",
            str(tmp_path / "x")]
    assert main([*base, *flags, "-q"]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("over, message", [
    ({"cutmix_alpha": 0},
     r"relabel.cutmix_alpha must be a finite number > 0 \(CutMix's Beta\(alpha, alpha\); 1 is usual\), got 0.0"),
    ({"cutmix_alpha": float("nan")}, "relabel.cutmix_alpha: expected a finite number, got nan"),
    ({"cutmix_prob": 2}, r"relabel.cutmix_prob must be in \[0, 1\] \(0 disables CutMix\), got 2.0"),
    ({"epochs": 0}, r"relabel.epochs must be >= 1 \(or null: the protocol's training epochs\), got 0"),
    ({"top_k": 0}, r"relabel.top_k must be >= 1 \(or null: all logits\), got 0"),
])
def test_bench_relabel_settings_fail_with_the_config(tmp_path, over, message):
    """These used to pass the bench config and fail (or, epochs 0, silently fall back to the protocol's
    epochs) only at the first fkd cell, after the teacher and every distilled set were made."""
    cfg = {"students": ["tiny_convnet"], "label_modes": ["fkd"], "protocol": "soft-kl", "relabel": over,
           "out": str(tmp_path / "b")}
    with pytest.raises(ConfigError, match=message):
        from_dict(BenchConfig, cfg)
