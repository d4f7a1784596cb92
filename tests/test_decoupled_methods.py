"""SRe2L / CDA / G-VBSM / EDC and their shared statistics machinery (fast tier)."""

import copy
import dataclasses
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ddkit.artifacts import shared_costs
from ddkit.config import from_dict
from ddkit.data.base import make_synthetic
from ddkit.errors import ConfigError, DDKitError
from ddkit.methods import METHODS, FitContext
from ddkit.methods import statistics as S
from ddkit.methods.edc import EDCConfig
from ddkit.methods.fyi import flip_pair
from ddkit.methods.sre2l import CDAConfig, SRe2LConfig
from ddkit.teacher import Teacher, TeacherConfig, train_teacher
from ddkit.training import TrainConfig


@pytest.fixture(scope="module")
def data():
    return make_synthetic()


def _teacher(data, norm, seed=0):
    cfg = TeacherConfig(model="convnet", model_options={"depth": 2, "width": 8, "norm": norm}, seed=seed,
                        train=TrainConfig(epochs=2, batch_size=32, lr=0.05))
    return train_teacher(data, cfg)


@pytest.fixture(scope="module")
def in_teacher(data):
    return _teacher(data, "instancenorm")


def _run(name, data, teachers, ipc=1, seed=0, progress=None, **options):
    cls = METHODS.get(name)
    cfg = from_dict(cls.Config, options)
    return cls(cfg).fit(data, teachers, FitContext(ipc=ipc, seed=seed, progress=progress)).synthetic_


def _hand_moments(f):
    means, vars_ = [], []
    for c in range(f.shape[1]):
        v = f[:, c].flatten().double()
        m = v.sum() / v.numel()
        means.append(m)
        vars_.append(((v - m) ** 2).sum() / v.numel())
    return torch.stack(means).float(), torch.stack(vars_).float()


def test_hooks_capture_bn_inputs_and_conv_outputs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2)).eval()
    keys = S.statistic_layers(net)
    assert keys == ["conv:0", "bn:1", "conv:3", "bn:4"]
    x = torch.randn(5, 1, 8, 8)
    with S.FeatureHooks(net, keys) as hooks:
        net(x)
    conv0 = net[0](x)
    assert torch.equal(hooks.features["conv:0"], conv0) and torch.equal(hooks.features["bn:1"], conv0)
    conv3 = net[3](net[2](net[1](conv0)))
    assert torch.allclose(hooks.features["bn:4"], conv3)
    for key in keys:
        mean, var = S.channel_moments(hooks.features[key])
        hm, hv = _hand_moments(hooks.features[key])
        assert torch.allclose(mean, hm, atol=1e-6) and torch.allclose(var, hv, atol=1e-6)
    labels = torch.tensor([0, 1, 0, 2, 1])
    cm, cv = S.class_moments(hooks.features["bn:4"], labels, torch.tensor([0, 1, 2]))
    for row, c in enumerate([0, 1, 2]):
        hm, hv = _hand_moments(hooks.features["bn:4"][labels == c])
        assert torch.allclose(cm[row], hm, atol=1e-5) and torch.allclose(cv[row], hv, atol=1e-5)
    # hooks are removed on exit
    assert all(not m._forward_hooks for m in net)
    # conv_features: input (G-VBSM/EDC code): the conv layers' inputs, the images at the first one
    keys_in = S.statistic_layers(net, ("bn", "convin"))
    assert keys_in == ["convin:0", "bn:1", "convin:3", "bn:4"] and all(S.is_conv_key(k) for k in keys_in[::2])
    with S.FeatureHooks(net, keys_in) as hooks:
        net(x)
    assert torch.equal(hooks.features["convin:0"], x) and torch.equal(hooks.features["convin:3"], net[2](net[1](conv0)))


def test_real_statistics_report_the_wait_for_another_build(data, bn_teacher, tmp_path):
    """As an expert buffer's: waiting for another process's build of the statistics is recorded."""
    from conftest import lock_held

    _, path = S.real_statistics(bn_teacher, data, cache_dir=tmp_path)
    with lock_held(path, 0.6), shared_costs() as costs:
        assert S.real_statistics(bn_teacher, data, cache_dir=tmp_path)[1] == path
    assert len(costs) == 1 and costs[0]["seconds_here"] == 0
    assert 0.5 <= costs[0]["waited_seconds"] < 5


def test_conv_input_statistics_and_batch_augmentation(data, bn_teacher, tmp_path):
    """The two knobs that follow the G-VBSM/EDC/SRe2L code: conv statistics at the conv inputs
    (their own cache entry) and one crop box and flip per batch. Both change the images; leaving
    them at their defaults keeps the config's identity (cached sets stay valid)."""
    from ddkit.config import config_hash

    stats_out, path_out = S.real_statistics(bn_teacher, data, cache_dir=tmp_path)
    stats_in, path_in = S.real_statistics(bn_teacher, data, cache_dir=tmp_path, conv_features="input")
    assert path_in != path_out and any(k.startswith("convin:") for k in stats_in)
    first_conv = next(k for k in stats_in if k.startswith("convin:") and k.endswith("/mean"))
    images = ((data.train.float_images() - torch.tensor(data.mean).view(1, -1, 1, 1))
              / torch.tensor(data.std).view(1, -1, 1, 1))
    assert torch.allclose(stats_in[first_conv], images.mean((0, 2, 3)), atol=1e-5)  # the images' own mean
    base = {"iterations": 2, "cache_dir": str(tmp_path), "stats": "bn+conv"}
    out = _run("gvbsm", data, [bn_teacher], ipc=1, **base)
    conv_in = _run("gvbsm", data, [bn_teacher], ipc=1, **base, conv_features="input")
    per_batch = _run("gvbsm", data, [bn_teacher], ipc=1, **base, augment_per="batch")
    assert not torch.equal(out.images, conv_in.images) and not torch.equal(out.images, per_batch.images)
    assert torch.isfinite(conv_in.images).all() and torch.isfinite(per_batch.images).all()
    cfg = METHODS.get("gvbsm").Config
    assert config_hash(from_dict(cfg, {"augment_per": "image", "conv_features": "output"})) == config_hash(cfg())
    assert config_hash(from_dict(cfg, {"augment_per": "batch"})) != config_hash(cfg())
    with pytest.raises(ConfigError, match="augment_per: 'pixel' is not one of"):
        from_dict(SRe2LConfig, {"augment_per": "pixel"})


def test_real_statistics_equal_hand_computation_and_ignore_batch_size(data, bn_teacher):
    model = bn_teacher.model
    keys = S.statistic_layers(model)
    calls = []
    stats = S.compute_real_statistics(model, data, keys, batch_size=7, progress=lambda d, t, r: calls.append((d, t)))
    assert calls[-1] == (len(data.train), len(data.train))
    x = ((data.train.float_images() - torch.tensor(data.mean).view(1, -1, 1, 1))
         / torch.tensor(data.std).view(1, -1, 1, 1))
    with torch.no_grad(), S.FeatureHooks(model, keys) as hooks:
        logits = model(x)
    y = data.train.labels
    for key in keys:
        hm, hv = _hand_moments(hooks.features[key])
        assert (torch.allclose(stats[f"{key}/mean"], hm, atol=1e-5)
                and torch.allclose(stats[f"{key}/var"], hv, atol=1e-4))
        for c in range(data.num_classes):
            cm, cv = _hand_moments(hooks.features[key][y == c])
            assert torch.allclose(stats[f"{key}/class_mean"][c], cm, atol=1e-5)
            assert torch.allclose(stats[f"{key}/class_var"][c], cv, atol=1e-4)
    for c in range(data.num_classes):
        assert torch.allclose(stats["logits/class_mean"][c], logits[y == c].mean(0), atol=1e-5)


def test_real_statistics_keep_their_float64_sums_where_float64_exists(data, bn_teacher):
    """The real-data pass summed in float64 on the device, which Apple MPS lacks (it raised there). Its
    sums now stay on the device where float64 exists (CPU, CUDA: no host sync per batch, as before) and
    go to the CPU otherwise; the statistics do not depend on where they were summed."""
    assert S.sums_device(torch.device("cpu")) == torch.device("cpu")
    assert S.sums_device(torch.device("cuda:1")) == torch.device("cuda:1")
    assert S.sums_device(torch.device("mps")) == torch.device("cpu")
    model = bn_teacher.model
    keys = S.statistic_layers(model)
    a = S.compute_real_statistics(model, data, keys, batch_size=7, patch_size=2)
    b = S.compute_real_statistics(model, data, keys, batch_size=7, patch_size=2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("/patch_var") for k in a)


def test_real_statistics_do_not_depend_on_the_thread_count(data, bn_teacher, in_teacher):
    """Their cache key holds no thread count (unlike the expert buffers', QA 20b F1): that is right only while the
    pass gives the same bytes at any thread count (checked at 1 and 2, BatchNorm and instance-norm teachers,
    convolution inputs and outputs, patch statistics)."""
    threads = torch.get_num_threads()
    for teacher in (bn_teacher, in_teacher):
        model = teacher.model
        for conv in ("output", "input"):
            keys = S.statistic_layers(model, ("bn", S.CONV_KIND[conv]))
            try:
                made = []
                for n in (1, 2):
                    torch.set_num_threads(n)
                    made.append(S.compute_real_statistics(model, data, keys, batch_size=64, patch_size=2))
            finally:
                torch.set_num_threads(threads)
            one, two = made
            assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_statistics_cache_round_trip_and_reuse(data, bn_teacher, tmp_path, monkeypatch):
    calls = []
    real_compute = S.compute_real_statistics

    def counting(*a, **kw):
        calls.append(1)
        return real_compute(*a, **kw)

    monkeypatch.setattr(S, "compute_real_statistics", counting)
    with shared_costs() as costs:
        first, path = S.real_statistics(bn_teacher, data, cache_dir=tmp_path)
        assert (path / "manifest.json").is_file() and (path / S.TENSORS).is_file() and path.parent == tmp_path
        second, path2 = S.real_statistics(bn_teacher, data, cache_dir=tmp_path)
    assert len(calls) == 1 and path2 == path
    # building is charged once, to the call that built; the reuse reports the build time it saved
    built, reused = costs
    assert built["kind"] == reused["kind"] == S.KIND and built["key"] == reused["key"] == path.name
    assert built["build_seconds"] > 0 and built["seconds_here"] == built["build_seconds"]
    assert reused["seconds_here"] == 0 and reused["build_seconds"] == built["build_seconds"]
    assert json.loads((path / "manifest.json").read_text())["build_seconds"] == built["build_seconds"]
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # a corrupt cache is recomputed, not trusted
    (path / S.TENSORS).write_bytes(b"not safetensors")
    third, _ = S.real_statistics(bn_teacher, data, cache_dir=tmp_path)
    assert len(calls) == 2 and all(torch.equal(first[k], third[k]) for k in first)
    # so is one whose values rotted to NaN (it used to be trusted, and synthesis then failed on NaN pixels)
    from safetensors.torch import load_file, save_file

    rotten = load_file(str(path / S.TENSORS))
    key = next(iter(rotten))
    rotten[key] = torch.full_like(rotten[key], float("nan"))
    save_file(rotten, str(path / S.TENSORS))
    fourth, _ = S.real_statistics(bn_teacher, data, cache_dir=tmp_path)
    assert len(calls) == 3 and all(torch.equal(first[k], fourth[k]) for k in first)
    calls.pop()
    # a different teacher gets its own entry
    other = Teacher(copy.deepcopy(bn_teacher.model), {**bn_teacher.manifest, "weights_sha": "0" * 16})
    _, path3 = S.real_statistics(other, data, cache_dir=tmp_path)
    assert path3 != path and len(calls) == 3
    # so do the same images under another normalisation (the statistics are of normalised inputs)
    renorm = dataclasses.replace(data, mean=tuple(m + 0.1 for m in data.mean))
    assert renorm.fingerprint == data.fingerprint
    renormed, path4 = S.real_statistics(bn_teacher, renorm, cache_dir=tmp_path)
    assert path4 not in (path, path3) and len(calls) == 4
    assert renormed.keys() == first.keys() and any(not torch.equal(renormed[k], first[k]) for k in first)


def test_statistics_loss_zero_at_targets_and_alpha_one_ignores_class_stats():
    torch.manual_seed(0)
    feats = {"conv:a": torch.randn(6, 3, 4, 4), "bn:b": torch.randn(6, 2, 2, 2) * 3 + 1}
    labels = torch.tensor([0, 0, 1, 1, 3, 3])
    classes = torch.tensor([0, 1, 3])
    mean, var, cmean, cvar = {}, {}, {}, {}
    for key, f in feats.items():
        mean[key], var[key] = S.channel_moments(f)
        cm, cv = S.class_moments(f, labels, classes)
        cmean[key] = torch.zeros(4, f.shape[1]).index_copy(0, classes, cm)
        cvar[key] = torch.ones(4, f.shape[1]).index_copy(0, classes, cv)
    targets = S.StatTargets(list(feats), mean, var, cmean, cvar)
    for alpha in (0.0, 0.5, 1.0):
        assert float(S.statistics_loss(feats, targets, labels, alpha, first_multiplier=10)) < 1e-5
    shifted = {k: v + 0.5 for k, v in feats.items()}
    assert float(S.statistics_loss(shifted, targets, labels, 0.5)) > 0.5
    # alpha = 1: class statistics are never read (absent or garbage gives the same value)
    garbage = S.StatTargets(list(feats), mean, var, {k: v + 100 for k, v in cmean.items()}, cvar)
    no_class = S.StatTargets(list(feats), mean, var)
    a = S.statistics_loss(shifted, targets, labels, 1.0)
    assert torch.equal(a, S.statistics_loss(shifted, garbage, labels, 1.0))
    assert torch.equal(a, S.statistics_loss(shifted, no_class, labels, 1.0))
    assert (float(S.statistics_loss(shifted, garbage, labels, 0.5))
            > float(S.statistics_loss(shifted, targets, labels, 0.5)) + 10)
    with pytest.raises(DDKitError, match="class statistics"):
        S.statistics_loss(shifted, no_class, labels, 0.5)


def _objective(images, data, teacher):
    """SRe2L's objective on un-augmented pixel images: CE + 0.01 * BN statistics loss."""
    model = teacher.model
    keys = S.statistic_layers(model, ("bn",))
    targets = S.build_targets(model, keys, None)
    labels = torch.arange(data.num_classes)
    x = (images - torch.tensor(data.mean).view(1, -1, 1, 1)) / torch.tensor(data.std).view(1, -1, 1, 1)
    with torch.no_grad(), S.FeatureHooks(model, keys) as hooks:
        ce = torch.nn.functional.cross_entropy(model(x), labels)
        return float(ce), float(S.statistics_loss(hooks.features, targets, labels, 1.0, 10.0))


def test_sre2l_iterations_reduce_the_loss(data, bn_teacher):
    from ddkit.methods.common import init_images

    records = []
    out = _run("sre2l", data, [bn_teacher], progress=lambda s, t, r: records.append(r), iterations=25)
    assert out.images.shape == (data.num_classes, *data.image_shape)
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert len(records) == 25 and {"loss", "loss_ce", "loss_stats"} <= set(records[-1])
    ce0, st0 = _objective(init_images(data, 1, "noise", 0)[0].clamp(0, 1), data, bn_teacher)
    ce1, st1 = _objective(out.images, data, bn_teacher)
    assert ce1 + 0.01 * st1 < 0.8 * (ce0 + 0.01 * st0) and st1 < st0, (ce0, st0, ce1, st1)
    # with the statistics term dominating, it is what gets minimised
    stat_only = _run("sre2l", data, [bn_teacher], iterations=25, r_stats=1.0)
    ce2, st2 = _objective(stat_only.images, data, bn_teacher)
    assert st2 < 0.7 * st0 and st2 < st1, (st0, st1, st2)


def test_bn_statistics_need_a_batchnorm_teacher(data, in_teacher):
    with pytest.raises(DDKitError, match="needs teachers with BatchNorm layers.*convnet3-bn"):
        _run("sre2l", data, [in_teacher], iterations=1)
    with pytest.raises(DDKitError, match="needs a teacher"):
        _run("cda", data, [], iterations=1)
    # convolution statistics work for any teacher
    out = _run("sre2l", data, [in_teacher], iterations=2, stats="conv")
    assert torch.isfinite(out.images).all()


def test_config_errors():
    with pytest.raises(ConfigError, match="alpha"):
        from_dict(EDCConfig, {"alpha": 1.5})
    with pytest.raises(ConfigError, match="did you mean 'iterations'"):
        from_dict(SRe2LConfig, {"iteration": 10})
    with pytest.raises(ConfigError, match="stats"):
        from_dict(SRe2LConfig, {"stats": "batchnorm"})
    with pytest.raises(ConfigError, match="scale_min"):
        SRe2LConfig(scale_min=0)
    with pytest.raises(ConfigError, match="iterations must be >= 1.*lr must be > 0"):
        SRe2LConfig(iterations=0, lr=0)
    for weight in ("r_stats", "first_multiplier"):  # a negative first_multiplier pushed layer 1 away from the data
        with pytest.raises(ConfigError, match=r"loss weights \(r_stats, r_logit, flatness_weight, first_multiplier\) "
                                              "must be >= 0"):
            from_dict(SRe2LConfig, {weight: -10})
    assert from_dict(SRe2LConfig, {"first_multiplier": 0}).first_multiplier == 0
    # the crop-scale settings shape only RandomResizedCrop: set with another augment they would do nothing
    with pytest.raises(ConfigError,
                       match="scale_min, curriculum apply only to augment: rrc_flip, but augment is crop_flip"):
        from_dict(SRe2LConfig, {"augment": "crop_flip", "scale_min": 0.5, "curriculum": "cosine"})
    with pytest.raises(ConfigError, match="milestone applies only to augment: rrc_flip, but augment is none"):
        from_dict(CDAConfig, {"augment": "none", "milestone": 0.5})
    assert from_dict(EDCConfig, {"augment": "crop_flip"}).scale_min == 0.5  # the preset's own default is no error


def test_cda_curriculum_anneals_crop_scale():
    cfg = CDAConfig(iterations=100)
    assert S.crop_scale_min(cfg, 0) == pytest.approx(1.0)
    assert S.crop_scale_min(cfg, 50) == pytest.approx(0.08 + 0.92 / 2)
    assert S.crop_scale_min(cfg, 100) == pytest.approx(0.08)
    values = [S.crop_scale_min(cfg, i) for i in range(100)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    half = CDAConfig(iterations=100, milestone=0.5, curriculum="step")
    assert S.crop_scale_min(half, 49) == 1.0 and S.crop_scale_min(half, 50) == pytest.approx(0.08)
    assert S.crop_scale_min(SRe2LConfig(iterations=100), 0) == pytest.approx(0.08)
    line = CDAConfig(iterations=100, curriculum="linear")  # 1 -> scale_min in equal steps, then scale_min
    assert [S.crop_scale_min(line, i) for i in (0, 25, 50, 99, 100)] == pytest.approx(
        [1.0, 1.0 - 0.92 / 4, 1.0 - 0.92 / 2, 0.08 + 0.92 / 100, 0.08])


def test_recover_keeps_its_final_losses_when_resumed_after_the_last_step(data, bn_teacher, tmp_path):
    """A synthesis killed after its last step's checkpoint (before the set was returned) resumed with
    no step left to run, and recorded final_losses {}."""
    def run(progress=None):
        cfg = from_dict(METHODS.get("sre2l").Config, {"iterations": 3, "checkpoint_every": 1})
        ctx = FitContext(ipc=1, seed=0, work_dir=tmp_path / "work", progress=progress)
        return METHODS.get("sre2l")(cfg).fit(data, [bn_teacher], ctx).synthetic_

    def kill_at_the_end(step, total, record):
        if step == total and "loss" in record:  # after the last step's checkpoint
            raise KeyboardInterrupt

    straight = _run("sre2l", data, [bn_teacher], iterations=3)
    with pytest.raises(KeyboardInterrupt):
        run(kill_at_the_end)
    resumed = run()
    assert set(straight.meta["final_losses"]) >= {"loss", "loss_ce", "loss_stats"}
    assert resumed.meta["final_losses"] == straight.meta["final_losses"]
    assert torch.equal(resumed.images, straight.images)


def test_recover_reports_its_losses_as_numbers(data, bn_teacher, tmp_path):
    """The loop keeps its losses as tensors (no device wait per step); a progress callback and the
    set's final_losses get Python numbers, the last report equal to final_losses."""
    seen = []
    cfg = from_dict(METHODS.get("sre2l").Config, {"iterations": 3})
    ctx = FitContext(ipc=1, seed=0, work_dir=tmp_path / "work", progress=lambda s, t, rec: seen.append(rec))
    out = METHODS.get("sre2l")(cfg).fit(data, [bn_teacher], ctx).synthetic_
    assert len(seen) == 3  # IPC 1: one unit (every class in one batch), 3 steps
    assert all(type(v) is float for rec in seen for v in rec.values())
    assert seen[-1] == out.meta["final_losses"] and all(type(v) is float for v in seen[-1].values())
    assert seen[0]["loss"] != seen[-1]["loss"]


def test_a_record_is_read_in_one_copy_and_quiet_bars_take_no_callback():
    """Each loss term was read from the device on its own (4-6 waits per step), and the CLI passed a
    callback even with its bars off (-q, ranks other than 0), so every step read them anyway."""
    from ddkit.cli import Progress
    from ddkit.methods.common import floats

    record = {"loss": torch.tensor(1.5), "n": 2, "kl": torch.tensor(0.25, dtype=torch.float64)}
    out = floats(record)
    assert out == {"loss": 1.5, "n": 2.0, "kl": 0.25} and list(out) == ["loss", "n", "kl"]
    assert all(type(v) is float for v in out.values()) and floats({}) == {}
    assert Progress(enabled=False).stage("distill edc") is None and callable(Progress().stage("distill edc"))


@pytest.mark.parametrize("key, options, message", [
    ("cda", {"augment": "crop_flip"}, "curriculum cosine (this method's) shapes RandomResizedCrop's scale, but augment "
                                       "is crop_flip; set curriculum: none or augment: rrc_flip"),
    ("sre2l", {"jitter_mode": "symmetric"},
     "jitter_mode symmetric applies only with jitter > 0; remove it or set jitter"),
    ("sre2l", {"augment": "none", "augment_per": "batch"},
     "augment_per batch applies only with an augmentation, but augment is none; remove it or set augment"),
])
def test_settings_of_a_part_that_is_off_are_refused(key, options, message):
    """CDA's own curriculum under crop_flip did nothing, silently; jitter_mode without a jitter and
    augment_per without an augmentation did nothing but gave the set another identity."""
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        from_dict(METHODS.get(key).Config, options)
    from_dict(METHODS.get("cda").Config, {"augment": "crop_flip", "curriculum": "none"})  # the fix, accepted


@pytest.mark.parametrize("key, options, message", [
    ("sre2l", {"flatness_beta": 0.5},
     "flatness_beta 0.5 applies only with flatness_weight > 0, but flatness_weight is 0; remove it or set "
     "flatness_weight"),
    ("sre2l", {"flatness_tau": 1.0},
     "flatness_tau 1.0 applies only with flatness_weight > 0, but flatness_weight is 0; remove it or set "
     "flatness_weight"),
    ("sre2l", {"densify_tau": 2.0},
     "densify_tau 2.0 applies only with densify_weight > 0, but densify_weight is 0; remove it or set densify_weight"),
    ("sre2l", {"committee_weights": "equal"},
     "committee_weights equal applies only with a committee, but committee_size is null; remove it or set "
     "committee_size"),
    ("sre2l", {"committee_temperature": 1.0},
     "committee_temperature 1.0 applies only with a committee, but committee_size is null; remove it or set "
     "committee_size"),
    ("cvdd", {"committee_weights": "equal", "committee_temperature": 1.0},
     "committee_temperature 1.0 applies only with committee_weights prior, but committee_weights is equal; remove "
     "it or set committee_weights: prior"),
    ("cvdd", {"committee_size": None, "soft_labels": "none", "committee_weights": "equal"},
     "committee_weights equal applies only with a committee, but committee_size is null; remove it or set "
     "committee_size"),
    # the committee soft labels vote at label_temperature: committee_temperature weighs only the recover committee
    ("cvdd", {"committee_size": None, "committee_temperature": 2.0},
     "committee_temperature 2.0 applies only with a committee, but committee_size is null; remove it or set "
     "committee_size"),
    ("cvdd", {"soft_labels": "none", "label_temperature": 5.0},
     "label_temperature 5.0 applies only with soft_labels: committee, but soft_labels is none; remove it or set "
     "soft_labels: committee"),
    ("cvdd", {"committee_weights": "equal", "label_temperature": 5.0},
     "label_temperature 5.0 applies only with committee_weights prior, but committee_weights is equal; remove it or "
     "set committee_weights: prior"),
    ("cvdd", {"label_temperature": 0.0}, "label_temperature must be > 0, got 0.0"),
    ("sre2l", {"perturb_steps": 3},
     "perturb_steps 3 applies only with perturb_rho > 0, but perturb_rho is 0; remove it or set perturb_rho"),
    ("sre2l", {"milestone": 0.5},
     "milestone 0.5 applies only with a curriculum, but curriculum is none; remove it or set curriculum"),
    ("sre2l", {"conv_features": "input"},
     "conv_features input applies only with convolution statistics (stats conv or bn+conv), but stats is bn; "
     "remove it or set stats"),
    ("sre2l", {"rded_options": {"bogus": 1}},
     "rded_options {'bogus': 1} applies only with init: rded, but init is noise; remove it or set init: rded"),
    ("sre2l", {"stats": "conv", "alpha": 0.0, "patch_size": 2},
     "patch_size 2 applies only with global statistics (alpha > 0), but alpha is 0; remove it or set alpha"),
])
def test_settings_of_a_recover_part_that_is_off_are_refused(key, options, message):
    """QA 17a F2: on sre2l each of these did nothing (the same image bytes as without it) but gave the set another
    identity, so `ddkit run` made it again; rded_options were not even checked unless init was rded."""
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        from_dict(METHODS.get(key).Config, options)


@pytest.mark.parametrize("key, options", [
    ("edc", {"flatness_weight": 0.0}),  # its own flatness_beta / flatness_tau stay as the class has them
    ("gvbsm", {"densify_weight": 0.0, "slots_per_batch": 2}),
    ("gvbsm", {"alpha": 0.0}),  # its own patch_size 4
    ("cda", {"curriculum": "none"}),
    ("dwa", {"perturb_rho": 0.0}),
    ("cvdd", {"committee_size": None, "label_temperature": 2.0}),  # its committee soft labels still vote
    ("cvdd", {"committee_weights": "equal"}),
    ("sre2l", {"flatness_weight": 0.5, "flatness_tau": 1.0, "perturb_rho": 0.01, "perturb_steps": 3,
               "init": "rded", "rded_options": {"mipc": 20}}),
])
def test_a_preset_turns_its_own_part_off_with_its_settings_left_as_they_are(key, options):
    """An ablation of a preset (EDC without flatness) keeps the preset's own settings of the part: only a setting
    that differs from the method's default is refused."""
    cfg = from_dict(METHODS.get(key).Config, options)
    assert all(getattr(cfg, k) == v for k, v in options.items() if k != "rded_options")


def test_fyi_flip_pair():
    x = torch.arange(8.0).view(1, 1, 2, 4)
    out, labels = flip_pair(x, torch.tensor([3]))
    assert out.shape == (2, 1, 2, 4) and labels.tolist() == [3, 3]
    assert torch.equal(out[1, 0, 0], torch.tensor([3.0, 2.0, 1.0, 0.0]))


EDC_BASE = {"iterations": 4, "lr": 0.1}


def test_each_edc_knob_changes_the_output(data, bn_teacher, tmp_path):
    cache = {"cache_dir": str(tmp_path)}
    base = _run("edc", data, [bn_teacher], **EDC_BASE, **cache)
    assert base.images.shape == (data.num_classes, *data.image_shape)
    toggles = {
        "init": {"init": "noise"},
        "alpha": {"alpha": 1.0},
        "flatness": {"flatness_weight": 0.0},
        "weak_augmentation": {"scale_min": 0.08},
        "flip_plugin": {"flip_plugin": True},
        "iterations": {"iterations": 2},
    }
    for knob, opt in toggles.items():
        out = _run("edc", data, [bn_teacher], **{**EDC_BASE, **opt}, **cache)
        assert not torch.equal(out.images, base.images), f"toggling {knob} did not change the output"


def test_flatness_term_is_edcs():
    """EDC's code: F.kl_div(log_softmax(l / 4), softmax(l_ema / 4)) with the default 'mean'
    reduction, i.e. KL(p_ema || p_images) / (images x classes); gradient only through the images' logits."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=gen, requires_grad=True)
    ema = torch.randn(6, 10, generator=gen)
    got = S.flatness_loss(logits, ema, 4.0)
    p_ema, p_img = F.softmax(ema / 4, 1), F.softmax(logits.detach() / 4, 1)
    by_hand = (p_ema * (p_ema.log() - p_img.log())).sum() / (6 * 10)
    assert torch.allclose(got, by_hand, atol=1e-7)
    reverse = (p_img * (p_img.log() - p_ema.log())).sum() / 6  # ddkit before revision 3
    assert not torch.allclose(got, reverse, rtol=0.5)
    got.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert float(S.flatness_loss(ema, ema, 4.0)) == pytest.approx(0.0, abs=1e-7)


def test_edc_alpha_one_ignores_class_statistics(data, bn_teacher, tmp_path):
    opts = {**EDC_BASE, "cache_dir": str(tmp_path)}
    a1 = _run("edc", data, [bn_teacher], **opts, alpha=1.0)
    a05 = _run("edc", data, [bn_teacher], **opts, alpha=0.5)
    # corrupt only the class statistics in the cache
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    stats = load_file(str(entry / S.TENSORS))
    stats = {k: (v + 5.0 if "/class_" in k else v) for k, v in stats.items()}
    save_file(stats, str(entry / S.TENSORS))
    assert torch.equal(_run("edc", data, [bn_teacher], **opts, alpha=1.0).images, a1.images)
    assert not torch.equal(_run("edc", data, [bn_teacher], **opts, alpha=0.5).images, a05.images)


def test_gvbsm_samples_several_teachers(data, bn_teacher, in_teacher):
    out = _run("gvbsm", data, [bn_teacher, in_teacher], iterations=4, stats="conv")
    assert out.meta["teachers"] == [bn_teacher.fingerprint, in_teacher.fingerprint]
    assert set(out.meta["layers_matched"]) == {bn_teacher.fingerprint, in_teacher.fingerprint}
    assert "loss_logit" in out.meta["final_losses"]
    again = _run("gvbsm", data, [bn_teacher, in_teacher], iterations=4, stats="conv")
    assert torch.equal(out.images, again.images)


def test_a_mixed_pool_matches_bn_terms_of_its_bn_teachers_and_conv_terms_of_every_teacher(data, bn_teacher,
                                                                                          in_teacher, tmp_path,
                                                                                          monkeypatch):
    """G-VBSM's and EDC's pools mix BatchNorm backbones with instance-norm ConvNets, and the authors'
    hooks are per module type: under stats: bn+conv a teacher without BatchNorm matches its conv
    statistics (and its CE and logit terms), a BatchNorm teacher its BN and conv statistics. The main
    teacher may be either; the statistics artifact of each holds its own layers."""
    used = []  # [teacher fingerprint, the layers whose terms entered the loss at this step]
    member_loss, stats_loss = S._member_loss, S.statistics_loss

    def spy_member(cfg, st, *args, **kw):
        used.append([st.teacher.fingerprint, None])
        return member_loss(cfg, st, *args, **kw)

    def spy_stats(features, targets, *args, drop=frozenset(), **kw):
        used[-1][1] = {key for key in targets.keys if key not in drop} & set(features)
        return stats_loss(features, targets, *args, drop=drop, **kw)

    monkeypatch.setattr(S, "_member_loss", spy_member)
    monkeypatch.setattr(S, "statistics_loss", spy_stats)
    bn_conv, bn = S.statistic_layers(bn_teacher.model, ("conv",)), S.statistic_layers(bn_teacher.model, ("bn",))
    in_conv = S.statistic_layers(in_teacher.model, ("conv",))
    assert bn and in_conv and not S.statistic_layers(in_teacher.model, ("bn",))
    out = _run("gvbsm", data, [bn_teacher, in_teacher], iterations=8, cache_dir=str(tmp_path))
    layers = out.meta["layers_matched"]
    assert layers == {bn_teacher.fingerprint: S.statistic_layers(bn_teacher.model),
                      in_teacher.fingerprint: in_conv}
    assert {"loss_ce", "loss_stats", "loss_logit"} <= set(out.meta["final_losses"])
    terms = {fp: set().union(*(keys for f, keys in used if f == fp)) for fp in layers}
    assert {fp for fp, _ in used} == set(layers)  # both teachers were sampled
    assert terms[in_teacher.fingerprint] == set(in_conv)  # conv terms only (some steps drop some)
    assert terms[bn_teacher.fingerprint] == set(bn_conv) | set(bn)
    # each teacher's statistics artifact records the layers it holds
    manifests = [json.loads(m.read_text()) for m in tmp_path.glob("*/manifest.json")]
    assert sorted((m["teacher"], m["config"]["layers"]) for m in manifests) == sorted(layers.items())
    # a main teacher without BatchNorm is one of the pool as any other (teachers are sampled, not ranked)
    used.clear()
    swapped = _run("gvbsm", data, [in_teacher, bn_teacher], iterations=2, cache_dir=str(tmp_path))
    assert swapped.meta["layers_matched"] == layers and torch.isfinite(swapped.images).all()


def test_a_pool_is_refused_where_a_teacher_or_the_pool_would_match_no_bn_statistics(data, bn_teacher, in_teacher,
                                                                                   tmp_path):
    """stats: bn (BatchNorm alone) with a teacher without BatchNorm would match nothing of that teacher, and
    stats: bn+conv with no BatchNorm teacher at all nothing of what bn asks for: both refused in one line
    naming the teacher (its folder where it has one) and the fix, before any statistics pass."""
    folder = tmp_path / "in-teacher"
    Teacher(in_teacher.model, dict(in_teacher.manifest)).save(folder)
    cache = tmp_path / "stats"
    with pytest.raises(DDKitError) as err:
        _run("gvbsm", data, [bn_teacher], iterations=1, stats="bn", patch_size=0, extra_teachers=[str(folder)],
             cache_dir=str(cache))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(
        f"method 'gvbsm' with stats: bn needs teachers with BatchNorm layers, but teacher model 'convnet' "
        f"({folder.absolute()}) has none, so it would match no statistics; use a teacher with BatchNorm")
    assert "or set stats: bn+conv" in msg
    assert not cache.exists()  # refused before the BatchNorm teacher's statistics pass
    for teachers, which in (([in_teacher], "teacher model 'convnet' has none"),
                            ([in_teacher, in_teacher], "none of its 2 teachers has any")):
        with pytest.raises(DDKitError, match=f"^method 'edc' with stats: bn\\+conv needs a teacher with BatchNorm "
                                             f"layers, but {which}; .*or set stats: conv"):
            _run("edc", data, teachers, iterations=1, init="real", cache_dir=str(cache))
    assert not cache.exists()


def test_class_batches_and_ipc_slots(data, bn_teacher):
    out = _run("sre2l", data, [bn_teacher], ipc=2, iterations=2, class_batch=3)
    assert out.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.isfinite(out.images).all()
    # every slot starts from its own noise: no two images are equal
    flat = out.images.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(len(flat))).min() > 0


def test_many_classes_are_split_into_batches_of_100():
    """class_batch None: every class in one batch up to 100 classes, batches of 100 beyond (SRe2L's
    ImageNet-1K --batch-size 100), not one batch of every class."""
    many = make_synthetic(num_classes=120, image_size=8, train_per_class=2, test_per_class=1)
    cfg = TeacherConfig(model="convnet", model_options={"depth": 1, "width": 4, "norm": "batchnorm"},
                        train=TrainConfig(epochs=1, batch_size=64, lr=0.05))
    teacher = train_teacher(many, cfg)
    seen = []
    handle = teacher.model.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    try:
        out = _run("sre2l", many, [teacher], ipc=1, iterations=1)
    finally:
        handle.remove()
    assert seen == [100, 20] and out.labels.tolist() == list(range(120))
    assert S.class_chunk(S.RecoverConfig(), 120) == 100 and S.class_chunk(S.RecoverConfig(), 10) == 10
    assert S.class_chunk(S.RecoverConfig(class_batch=7), 120) == 7


@pytest.mark.parametrize("every, mixed", [(2, False), (3, False), (2, True)])
def test_resume_across_units_with_ema(data, bn_teacher, in_teacher, tmp_path, every, mixed):
    """ipc 2 = two units; EDC keeps an EMA copy and optimizer state: resume must be bit-exact. ``mixed``:
    a pool of a BatchNorm teacher and one without (per-teacher statistics moving averages of other layers)."""
    opts = {"iterations": 3, "lr": 0.1, "checkpoint_every": every, "cache_dir": str(tmp_path / "c")}
    cls = METHODS.get("edc")
    teachers = [bn_teacher, in_teacher] if mixed else [bn_teacher]
    straight = cls(from_dict(cls.Config, opts)).fit(data, teachers, FitContext(ipc=2, seed=3)).synthetic_
    if mixed:
        assert straight.meta["layers_matched"][in_teacher.fingerprint] == S.statistic_layers(in_teacher.model,
                                                                                             ("conv",))
    calls = []

    def kill(step, total, record):
        calls.append(step)
        if len(calls) == 5:
            raise KeyboardInterrupt

    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        cls(from_dict(cls.Config, opts)).fit(data, teachers,
                                             FitContext(ipc=2, seed=3, work_dir=work, progress=kill))
    assert any(work.iterdir())
    resumed = cls(from_dict(cls.Config, opts)).fit(data, teachers,
                                                   FitContext(ipc=2, seed=3, work_dir=work)).synthetic_
    assert torch.equal(straight.images, resumed.images)
    assert resumed.meta["final_losses"] == straight.meta["final_losses"]


def test_recover_does_not_resume_a_checkpoint_of_another_normalisation(data, bn_teacher, tmp_path):
    """The same pixels under another mean/std are other inputs to the teacher: a checkpoint made under
    one normalisation is not resumed under another (the data fingerprint covers the pixels only)."""
    opts = {"iterations": 2, "checkpoint_every": 1}
    cls = METHODS.get("sre2l")
    work = tmp_path / "work"

    def kill(step, total, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cls(from_dict(cls.Config, opts)).fit(data, [bn_teacher],
                                             FitContext(ipc=4, seed=0, work_dir=work, progress=kill))
    other = dataclasses.replace(data, mean=tuple(m + 0.1 for m in data.mean), std=tuple(1.5 * s for s in data.std))
    assert other.fingerprint == data.fingerprint
    steps: list[int] = []
    got = cls(from_dict(cls.Config, opts)).fit(
        other, [bn_teacher],
        FitContext(ipc=4, seed=0, work_dir=work, progress=lambda s, n, r: steps.append(s))).synthetic_
    straight = cls(from_dict(cls.Config, opts)).fit(other, [bn_teacher], FitContext(ipc=4, seed=0)).synthetic_
    assert steps[0] == 1, "resumed a checkpoint made under another normalisation"
    assert torch.equal(got.images, straight.images)
    # under its own normalisation the checkpoint is resumed: the run continues after the finished steps
    steps.clear()
    cls(from_dict(cls.Config, opts)).fit(data, [bn_teacher], FitContext(ipc=4, seed=0, work_dir=work,
                                                                        progress=lambda s, n, r: steps.append(s)))
    assert steps[0] > 1


def test_resume_with_another_number_of_ranks_starts_afresh(data, bn_teacher, tmp_path, monkeypatch):
    """A checkpoint from a run with another number of ranks is not resumed: which units a rank holds
    depends on it (a 1-rank run interrupted in unit 1 must not seed rank 0-of-2's unit 2). Every rank
    writes its own checkpoint."""
    from ddkit import distributed as ddist

    opts = {"iterations": 2, "checkpoint_every": 1}
    cls = METHODS.get("sre2l")
    straight = cls(from_dict(cls.Config, opts)).fit(data, [bn_teacher], FitContext(ipc=4, seed=0)).synthetic_
    slots = straight.images.view(data.num_classes, 4, *data.image_shape)

    def kill(step, total, record):
        if step == 3:  # one process: unit 1 (slot 1) half done
            raise KeyboardInterrupt

    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        cls(from_dict(cls.Config, opts)).fit(data, [bn_teacher],
                                             FitContext(ipc=4, seed=0, work_dir=work, progress=kill))
    held: dict[int, dict] = {}

    class Gathered(Exception):
        pass

    def gather(done, rank):  # what this rank contributes to the gather, then stop
        held[rank] = dict(done)
        raise Gathered

    for rank in (0, 1):
        monkeypatch.setattr(ddist, "current", lambda rank=rank: ddist.DistInfo(rank, 2))
        monkeypatch.setattr(S.common, "gather_units", lambda done, shapes, place, rank=rank: gather(done, rank))
        with pytest.raises(Gathered):
            cls(from_dict(cls.Config, opts)).fit(data, [bn_teacher], FitContext(ipc=4, seed=0, work_dir=work))
    assert sorted(held[0]) == [0, 2] and sorted(held[1]) == [1, 3]
    for rank, units in held.items():
        for u, images in units.items():
            assert torch.equal(images, slots[:, u]), (rank, u)
    assert len([p for p in work.iterdir() if "rank1" in p.name]) == 1  # rank 1 saved its own


def test_recover_checkpoint_bytes_grow_linearly_with_the_set(data, bn_teacher, tmp_path, monkeypatch):
    """Every checkpoint held every finished unit and was rewritten every checkpoint_every steps, so a
    run wrote O(units^2) bytes (43x the set at IPC 40, 20 classes). A finished unit is written once,
    to its own file, and the rolling checkpoint holds the unit in progress alone: the bytes a run
    writes stay a fixed multiple of the set's, whatever the IPC."""
    writes = []
    save = S.common.atomic_torch_save

    def counting(state, path):
        save(state, path)
        writes.append((path.name, path.stat().st_size))

    monkeypatch.setattr(S.common, "atomic_torch_save", counting)
    cls = METHODS.get("sre2l")
    ratio = {}
    for ipc in (2, 8):  # sre2l: one unit per IPC slot
        writes.clear()
        out = cls(from_dict(cls.Config, {"iterations": 4, "checkpoint_every": 2})).fit(
            data, [bn_teacher], FitContext(ipc=ipc, seed=0, work_dir=tmp_path / f"ipc{ipc}")).synthetic_
        units = [name for name, _ in writes if "-unit" in name]
        assert len(units) == len(set(units)) == ipc  # each finished unit written once
        unit = out.images.numel() * 4 / ipc
        # no write holds more than one unit's state: its images, Adam's two moments, the generator (5 KB)
        assert max(size for _, size in writes) < 3 * unit + 12_000
        ratio[ipc] = sum(size for _, size in writes) / (out.images.numel() * 4)
    assert ratio[2] < 8 and ratio[8] < 8 and ratio[8] <= 1.05 * ratio[2], ratio


def test_recover_resumes_bit_exactly_after_a_kill_at_any_step(data, bn_teacher, tmp_path):
    """Killed after any step (a unit's last included, and twice in one run), EDC (its EMA copy, the
    statistics moving average, Adam's state, the unit's generator) resumes from the unit files and the
    rolling checkpoint to the uninterrupted run's images and final losses."""
    cls = METHODS.get("edc")

    def fit(work=None, progress=None):
        cfg = from_dict(cls.Config, {"iterations": 3, "lr": 0.1, "checkpoint_every": 2, "init": "noise"})
        return cls(cfg).fit(data, [bn_teacher], FitContext(ipc=2, seed=3, work_dir=work, progress=progress)).synthetic_

    straight = fit()
    for kills in [[k] for k in range(1, 7)] + [[2, 5]]:  # 2 units of 3 steps
        work = tmp_path / "-".join(map(str, kills))
        for at in kills:
            def kill(step, total, record, at=at):
                if step == at and "loss" in record:
                    raise KeyboardInterrupt

            with pytest.raises(KeyboardInterrupt):
                fit(work, kill)
        resumed = fit(work)
        assert torch.equal(resumed.images, straight.images), kills
        assert resumed.meta["final_losses"] == straight.meta["final_losses"], kills


def test_recover_resumes_a_checkpoint_of_the_earlier_layout(data, bn_teacher, tmp_path):
    """A rolling checkpoint written before finished units had files of their own holds them all
    (``done_<unit>``) and its unit in progress as an index into the rank's units: it is resumed (its
    finished units move to their files), to the uninterrupted run's result."""
    cls = METHODS.get("sre2l")

    def fit(work, progress=None):
        cfg = from_dict(cls.Config, {"iterations": 3, "checkpoint_every": 1})
        return cls(cfg).fit(data, [bn_teacher], FitContext(ipc=3, seed=0, work_dir=work, progress=progress)).synthetic_

    straight = fit(None)
    slots = straight.images.view(data.num_classes, 3, *data.image_shape)

    def kill(step, total, record):
        if step == 5 and "loss" in record:  # unit 1, step 2 of 3
            raise KeyboardInterrupt

    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        fit(work, kill)
    (rolling,) = work.glob("*-rank0.pt")
    (unit0,) = work.glob("*-unit0.pt")
    state = torch.load(rolling, weights_only=True)
    old = {key: v for key, v in state.items() if key != "layout"}
    old.update(unit=1, done_0=torch.load(unit0, weights_only=True)["images"])  # single process: index = unit
    unit0.unlink()
    torch.save(old, rolling)
    resumed = fit(work)
    assert torch.equal(resumed.images, straight.images)
    assert resumed.meta["final_losses"] == straight.meta["final_losses"]
    # the earlier layout after the last unit: every unit finished, nothing in progress
    work = tmp_path / "finished"
    work.mkdir()
    torch.save({"unit": 3, "it": 0, "last": straight.meta["final_losses"],
                **{f"done_{u}": slots[:, u].clone() for u in range(3)}}, work / rolling.name)
    steps = []
    again = fit(work, lambda s, n, rec: steps.append(s))
    assert steps == [] and torch.equal(again.images, straight.images)
    assert again.meta["final_losses"] == straight.meta["final_losses"]
    assert len(list(work.glob("*-unit*.pt"))) == 3


def test_initial_images_of_some_rows_are_those_rows_of_the_whole_set(data):
    """A rank builds the initial images of its own units alone; they equal those rows of the whole set
    (the noise drawn in slices continues the generator's stream exactly as one call does)."""
    from ddkit.methods import common

    rows = torch.tensor([5, 0, 7, 2, 3])
    for init in ("noise", "real"):
        full, labels = common.init_images(data, 2, init, seed=4)
        part, part_labels = common.init_images(data, 2, init, seed=4, rows=rows)
        assert torch.equal(part, full[rows]) and torch.equal(part_labels, labels[rows])
    for shape in [(1, 16, 16), (3, 5, 7), (2, 3, 3), (1, 1, 1)]:  # values per image: multiples of 16 or not
        for n in (1, 7, 33):
            whole = torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))
            rows = torch.randperm(n, generator=torch.Generator().manual_seed(2))[: max(1, n // 2)]
            for values in (1, 40, 1 << 22):  # slices of one row (at least 16 values), a few rows, all of it
                got = common.randn_rows(n, shape, torch.Generator().manual_seed(1), rows, values=values)
                assert torch.equal(got, whole[rows]), (shape, n, values)


def _sre2l_distill(teacher_dir, out):
    from ddkit.data.base import DatasetConfig
    from ddkit.pipeline import DistillConfig, distill

    cfg = DistillConfig(method="sre2l", ipc=3, options={"iterations": 2, "checkpoint_every": 1})
    return distill(make_synthetic(), cfg, DatasetConfig(name="synthetic"), out, teacher_dir)


def _recover_rank(rank: int, store_path: str, tmp: str) -> None:
    """``distill`` (sre2l, IPC 3: rank 0 makes units 0 and 2, rank 1 unit 1) on 2 gloo ranks, recording
    the images each rank builds, sends, receives and gathers."""
    import os

    import torch.distributed as dist

    from ddkit import distributed as ddist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    seen = {"init": [], "sent": [], "received": [], "collective_tensors": 0}

    def record(key, fn, shape_of):
        def wrapped(*args, **kw):
            out = fn(*args, **kw)
            seen[key].append(tuple(shape_of(args, out)))
            return out
        return wrapped

    def tensors_in(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel()
        if isinstance(obj, dict):
            obj = list(obj.values())
        return sum(map(tensors_in, obj)) if isinstance(obj, (list, tuple)) else 0

    def collective(fn):
        def wrapped(obj, *args):
            seen["collective_tensors"] += tensors_in(obj)
            return fn(obj, *args)
        return wrapped

    try:
        S._initial_images = record("init", S._initial_images, lambda a, out: out.shape)
        ddist.send_to_main = record("sent", ddist.send_to_main, lambda a, out: a[0].shape)
        ddist.receive_from = record("received", ddist.receive_from, lambda a, out: out.shape)
        ddist.all_gather_objects = collective(ddist.all_gather_objects)
        ddist.broadcast_object = collective(ddist.broadcast_object)
        ds = _sre2l_distill(f"{tmp}/t", f"{tmp}/d2")
        torch.save({"images": ds.images.clone(), "labels": ds.labels, "seen": seen}, f"{tmp}/rank{rank}.pt")
    finally:
        ddist.shutdown()
    os._exit(0)  # see tests/test_distributed.py::_train_bn_rank


def _teacher_then_one_process(tmp_path, single):
    """Train a small BatchNorm teacher into ``tmp_path / "t"``, then return ``single()`` (the one-process run)
    computed with the ranks' thread count (1)."""
    cfg = TeacherConfig(model="convnet", model_options={"depth": 2, "width": 8, "norm": "batchnorm"},
                        train=TrainConfig(epochs=1, batch_size=32, lr=0.05))
    train_teacher(make_synthetic(), cfg, tmp_path / "t")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return single()
    finally:
        torch.set_num_threads(threads)


def test_recover_under_torchrun_holds_each_ranks_own_units_and_gathers_on_rank_0(tmp_path):
    """Every rank built the initial images of the whole set, and all ranks gathered every unit
    (``all_gather``), although rank 0 alone saves. Each rank now builds its own units' images, sends
    them to rank 0 unit by unit, and rank 0 alone holds (labels, builds, saves) the set; the other ranks
    read the saved set back. The result is one process's, to the bit."""
    import torch.multiprocessing as mp

    data = make_synthetic()
    one = _teacher_then_one_process(tmp_path, lambda: _sre2l_distill(tmp_path / "t", tmp_path / "d1"))
    mp.spawn(_recover_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for got in (r0, r1):
        assert torch.equal(got["images"], one.images) and torch.equal(got["labels"], one.labels)
    unit = (data.num_classes, *data.image_shape)  # sre2l: one image of every class per unit
    assert r0["seen"]["init"] == [(2 * data.num_classes, *data.image_shape)]  # units 0 and 2
    assert r1["seen"]["init"] == [unit]  # unit 1 only
    assert r1["seen"]["sent"] == [unit] and r1["seen"]["received"] == []
    assert r0["seen"]["sent"] == [] and r0["seen"]["received"] == [unit]
    assert r0["seen"]["collective_tensors"] == r1["seen"]["collective_tensors"] == 0  # no image through a gather


RDED_OPTS = {"mipc": 6, "num_crop": 2}


def _rded_distills(teacher_dir, tmp, tag):
    """rded (IPC 2) and sre2l starting from it (``init: rded``, IPC 3: units are the 3 slots of every class,
    so rank 0 of 2 starts slots 0 and 2 of every class, rank 1 slot 1), as their distilled sets."""
    from ddkit.data.base import DatasetConfig
    from ddkit.pipeline import DistillConfig, distill

    rded = DistillConfig(method="rded", ipc=2, options=RDED_OPTS)
    sre2l = DistillConfig(method="sre2l", ipc=3, options={"iterations": 2, "init": "rded", "cache_dir": f"{tmp}/c",
                                                          "rded_options": RDED_OPTS})
    return [distill(make_synthetic(), cfg, DatasetConfig(name="synthetic"), f"{tmp}/{cfg.method}-{tag}", teacher_dir)
            for cfg in (rded, sre2l)]


def _rded_rank(rank: int, store_path: str, tmp: str) -> None:
    """:func:`_rded_distills` on 2 gloo ranks, recording per set the image rows each rank sends, receives,
    gathers, starts from, and the set rded's fit leaves on it."""
    import os

    import torch.distributed as dist

    from ddkit import distributed as ddist
    from ddkit.methods import rded

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    seen = {"init": [], "sent": [], "received": [], "collective_tensors": 0, "rded_set": []}
    send_to, receive_from, gather, fit, init = (ddist.send_to, ddist.receive_from, ddist.all_gather_objects,
                                                rded.RDED.fit, S._initial_images)

    def sent(t, dst):
        seen["sent"].append((tuple(t.shape), dst))
        return send_to(t, dst)

    def received(src, shape, dtype):
        seen["received"].append((shape, src))
        return receive_from(src, shape, dtype)

    def gathered(obj):
        out = gather(obj)
        seen["collective_tensors"] += sum(isinstance(v, torch.Tensor) for part in out for v in
                                          (part.values() if isinstance(part, dict) else [part]))
        return out

    def fitted(self, *args):
        out = fit(self, *args)
        seen["rded_set"].append(None if out.synthetic_ is None else len(out.synthetic_.images))
        return out

    def initial(*args):
        out = init(*args)
        seen["init"].append(tuple(out.shape))
        return out

    ddist.send_to, ddist.receive_from, ddist.all_gather_objects = sent, received, gathered
    rded.RDED.fit, S._initial_images = fitted, initial
    try:
        sets = _rded_distills(f"{tmp}/t", tmp, "two")
        torch.save({"images": [d.images.clone() for d in sets], "soft": sets[0].soft_labels.clone(), "seen": seen},
                   f"{tmp}/rank{rank}.pt")
    finally:
        ddist.shutdown()
    os._exit(0)  # see tests/test_distributed.py::_train_bn_rank


def test_rded_under_torchrun_sends_each_rank_only_the_rows_it_needs(tmp_path):
    """rded gathered its whole set on every rank (all_gather of every class), and a method starting from
    it (init: rded) held that whole set on every rank to take its own rows. rded's own set is now sent to
    rank 0 alone, class by class, which alone labels it; a method starting from it receives only the rows
    of its units, from the rank that made their class. The sets are one process's, to the bit."""
    import torch.multiprocessing as mp

    data = make_synthetic()
    one = _teacher_then_one_process(tmp_path, lambda: _rded_distills(str(tmp_path / "t"), tmp_path, "one"))
    mp.spawn(_rded_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in ("rded", "sre2l"):
        for f in ("images.safetensors", "labels.safetensors", "soft_labels.safetensors"):
            if (tmp_path / f"{name}-one" / f).exists() or f == "images.safetensors":
                assert (tmp_path / f"{name}-one" / f).read_bytes() == (tmp_path / f"{name}-two" / f).read_bytes()
    for got in (r0, r1):
        assert all(torch.equal(a, b.images) for a, b in zip(got["images"], one))
        assert torch.equal(got["soft"], one[0].soft_labels)
    c, img = data.image_shape[0], tuple(data.image_shape[1:])
    # rded: rank 1 sends its classes (1, 3) to rank 0, which alone holds and labels the set (init: rded fits none)
    assert r0["seen"]["rded_set"] == [8] and r1["seen"]["rded_set"] == [None]
    assert r1["seen"]["sent"][:2] == [((2, c, *img), 0)] * 2 and r0["seen"]["received"][:2] == [((2, c, *img), 1)] * 2
    # init: rded: rank 0 starts 8 rows (slots 0 and 2 of every class), rank 1 4 (slot 1): the 4 of rank 0's
    # that rank 1's classes hold come from rank 1, the 2 of rank 1's that rank 0's classes hold from rank 0
    # (then sre2l's unit 1 goes to rank 0)
    assert r0["seen"]["init"] == [(8, c, *img)] and r1["seen"]["init"] == [(4, c, *img)]
    assert r0["seen"]["sent"] == [((2, c, *img), 1)] and r1["seen"]["received"] == [((2, c, *img), 0)]
    assert r1["seen"]["sent"][2:] == [((4, c, *img), 0), ((4, c, *img), 0)]
    assert r0["seen"]["received"][2:] == [((4, c, *img), 1), ((4, c, *img), 1)]
    assert r0["seen"]["collective_tensors"] == r1["seen"]["collective_tensors"] == 0  # no image through a gather


def test_gather_classes_returns_every_ranks_classes_in_class_order(monkeypatch):
    """Under torchrun, dm, datadam, rded and the statistics methods synthesise classes round-robin
    (rank 0: 0, 2; rank 1: 1, 3) and gather them: the set must come back in class order, not rank order,
    or images land under other classes' labels. No test runs those methods under torchrun, so the
    gather is checked with two ranks' parts handed in."""
    from ddkit import distributed as ddist
    from ddkit.methods import common

    a, b, c, d = (torch.full((2, 1), float(k)) for k in range(4))
    sent = []

    def all_gather(mine):
        sent.append(mine)
        return [mine, {1: b, 3: d}]  # this process is rank 0 of 2

    monkeypatch.setattr(ddist, "all_gather_objects", all_gather)
    got = common.gather_classes({0: a, 2: c}, 4)
    assert [t[0, 0].item() for t in got] == [0.0, 1.0, 2.0, 3.0]
    assert [sorted(m) for m in sent] == [[0, 2]]  # it sends only its own classes
    monkeypatch.setattr(ddist, "all_gather_objects", lambda mine: [mine, {1: b}])  # class 3 made by no rank
    with pytest.raises(AssertionError, match=r"classes \[3\] were synthesised by no rank"):
        common.gather_classes({0: a, 2: c}, 4)


def test_edc_init_from_rded(data, bn_teacher, tmp_path):
    opts = {**EDC_BASE, "iterations": 1, "init": "rded", "cache_dir": str(tmp_path),
            "rded_options": {"mipc": 6, "num_crop": 2, "soft_labels": False}}
    out = _run("edc", data, [bn_teacher], ipc=2, **opts)
    assert out.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and torch.isfinite(out.images).all()
    real_init = _run("edc", data, [bn_teacher], ipc=2, **{**opts, "init": "real", "rded_options": {}})
    assert not torch.equal(out.images, real_init.images)
    # rded's errors name its settings inside edc's options
    with pytest.raises(ConfigError, match=r"raise distill.options.rded_options.mipc to at least 2, or lower --ipc$"):
        _run("edc", data, [bn_teacher], ipc=2, **{**opts, "rded_options": {"mipc": 1, "num_crop": 2}})
    # it said 'rded_options.bogus'
    with pytest.raises(ConfigError, match=r"^unknown config key 'distill.options.rded_options.bogus'"):
        _run("edc", data, [bn_teacher], ipc=2, **{**opts, "rded_options": {"bogus": 1}})


@pytest.mark.slow
def test_torchrun_shards_units_and_matches_single_process(tmp_path):
    """2 gloo ranks synthesise disjoint (slot, class chunk) units; the gathered set equals 1 rank's.

    A couple of minutes on 2 cores, hence the slow tier (which CI runs).
    """
    from conftest import run_ddkit

    def run(*args, ranks=1, cache="cache"):
        run_ddkit(tmp_path, *args, ranks=ranks, cache=cache)

    run("teacher", "--dataset", "synthetic", "--model", "convnetd2-w8-bn", "--epochs", "2", "--out", "t")
    distill = ["distill", "--dataset", "synthetic", "--method", "edc", "--ipc", "3", "--teacher", "t",
               "--set", "distill.options.iterations=3", "--set", "distill.options.class_batch=3"]
    run(*distill, "--out", "d1")
    run(*distill, "--out", "d2", ranks=2, cache="cache2")  # the statistics pass also runs under torchrun
    a, b = load_file(str(tmp_path / "d1/images.safetensors")), load_file(str(tmp_path / "d2/images.safetensors"))
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    # final_losses are the last unit's (made by rank 1 of 2: 3 slots x 2 class chunks), not rank 0's last one's
    one, two = (json.loads((tmp_path / d / "manifest.json").read_text())["meta"]["final_losses"] for d in ("d1", "d2"))
    assert set(one) >= {"loss", "loss_stats"} and one == two
    # the real-data statistics pass was sharded over the 2 ranks (all-reduced float64 sums)
    (s1,), (s2,) = ((tmp_path / c).glob("statistics/*/statistics.safetensors") for c in ("cache", "cache2"))
    one, two = load_file(str(s1)), load_file(str(s2))
    assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], rtol=1e-6, atol=1e-7) for k in one)


def test_distill_bar_names_the_statistics_pass(data, bn_teacher, tmp_path):
    """The CLI's distill bar shows the one-off real-data statistics pass as such, counting images, then
    the method's iterations (users took the pass for a hang when it showed as iterations that do not move)."""
    from ddkit.cli import Progress
    from ddkit.methods.common import progress_view

    seen = []

    class Recording(Progress):
        def __call__(self, label, done, total, record=None, unit="ep"):
            seen.append((label, unit, total))
            super().__call__(label, done, total, record, unit)

    bar = Recording(True)
    _run("edc", data, [bn_teacher], progress=bar.stage("distill edc"),
         **{**METHODS.get("edc").smoke_options, "iterations": 3, "init": "real", "cache_dir": str(tmp_path)})
    bar.close()
    views = list(dict.fromkeys((label, unit, total) for label, unit, total in seen))
    assert views == [("distill edc: real-data statistics", "img", len(data.train)), ("distill edc", "it", 3)]
    assert progress_view("distill mtt", {"expert_epochs_pass": 1.0}) == ("distill mtt: expert epochs", "ep")
    assert progress_view("distill mtt", {"loss": 0.5}) == ("distill mtt", "it")


def test_real_statistics_record_their_schema_which_a_bump_makes_stale(data, bn_teacher, tmp_path, monkeypatch):
    """The key hashes SCHEMA, so after a bump an entry is never read again: its manifest records the schema, and
    `ddkit cache` marks the entry as an older ddkit's."""
    from ddkit import cache
    from ddkit.cache import cache_entries

    _, path = S.real_statistics(bn_teacher, data, cache_dir=tmp_path / "statistics")
    assert json.loads((path / "manifest.json").read_text())["statistics_schema"] == S.SCHEMA
    assert [(e.name, e.stale) for e in cache_entries(tmp_path)] == [(path.name, "")]
    monkeypatch.setattr(cache, "STATISTICS_SCHEMA", S.SCHEMA + 1)  # a bump (ddkit.cache holds the current one)
    assert [(e.name, e.stale) for e in cache_entries(tmp_path)] == [(path.name, f"schema {S.SCHEMA}")]


@pytest.mark.parametrize("name", ["sre2l", "cda", "gvbsm", "edc", "dwa", "cvdd", "rded"])
def test_a_teacher_in_another_dtype_is_refused_before_synthesis(data, bn_teacher, name, monkeypatch):
    """A library caller's bfloat16 teacher (teacher.model.to(torch.bfloat16)) made every synthesis method fail deep in
    a convolution ("Input type (float) and bias type (c10::BFloat16) should be the same"). The methods compute through
    the teacher in float32: such a teacher is refused at the start in one line naming the dtype and the fix, before
    the real-data statistics pass, and left as it was; the float32 teacher the fix gives synthesises as before."""
    cls = METHODS.get(name)
    teacher = Teacher(copy.deepcopy(bn_teacher.model).to(torch.bfloat16), bn_teacher.manifest)
    passes = []
    monkeypatch.setattr(S, "real_statistics", lambda *a, **k: passes.append(a) or pytest.fail("statistics pass"))
    with pytest.raises(DDKitError) as info:
        _run(name, data, [teacher], ipc=1, **cls.smoke_options)
    assert str(info.value) == (f"method {name!r} synthesises its images through the teacher in float32, but the "
                               "teacher's weights are bfloat16; pass it in float32 (teacher.model.float()); relabel "
                               "and evaluate label with it as it is")
    assert passes == [] and {p.dtype for p in teacher.model.parameters()} == {torch.bfloat16}
    monkeypatch.undo()
    teacher.model.float()  # the fix: the same weights (bfloat16's), in float32
    fixed = Teacher(copy.deepcopy(teacher.model), bn_teacher.manifest)
    made = _run(name, data, [teacher], ipc=1, **cls.smoke_options)
    assert made.images.dtype == torch.float32 and bool(torch.isfinite(made.images).all())
    assert torch.equal(made.images, _run(name, data, [fixed], ipc=1, **cls.smoke_options).images)
