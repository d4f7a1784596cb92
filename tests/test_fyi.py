"""FYI's flip plug-in (``flip_plugin``): which methods take it, what the others say, and what it changes."""

import dataclasses
import hashlib
import importlib

import pytest
import torch

from conftest import REPO
from ddkit.cli import main
from ddkit.config import from_dict
from ddkit.data.base import make_synthetic
from ddkit.errors import ConfigError
from ddkit.methods import METHODS, FitContext

TAKERS = sorted(k for k in METHODS.list()
                if "flip_plugin" in {f.name for f in dataclasses.fields(METHODS.get(k).Config)})
OTHERS = sorted(set(METHODS.list()) - set(TAKERS))


def test_the_methods_that_take_the_plugin():
    assert TAKERS == ["cda", "cvdd", "datadam", "datm", "dc", "dm", "dsa", "dwa", "edc", "ftd", "gvbsm", "mtt", "shq",
                      "sre2l", "tesla"]


@pytest.mark.parametrize("name", OTHERS)
def test_a_method_without_the_plugin_refuses_it_naming_those_that_take_it(name):
    """It used to be the generic 'unknown config key ...; valid keys: ...', which reads like a typo."""
    with pytest.raises(ConfigError) as err:
        from_dict(METHODS.get(name).Config, {"flip_plugin": True}, "distill.options")
    assert str(err.value) == (f"distill.options.flip_plugin: flip_plugin (FYI) is supported by {', '.join(TAKERS)}; "
                              f"{name} does not take it: remove the key, or use one of those methods")


def test_the_refusal_comes_with_the_configs_other_problems():
    with pytest.raises(ConfigError) as err:
        from_dict(METHODS.get("random").Config, {"flip_plugin": False, "sede": 1}, "distill.options")
    first, second = str(err.value).split("; unknown config key ")
    assert first.startswith("distill.options.flip_plugin: flip_plugin (FYI) is supported by ")
    assert second.startswith("'distill.options.sede'")


def test_run_refuses_the_plugin_in_one_line_before_any_stage(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", str(REPO / "configs/fashion-mnist/random/ipc10.yaml"), "--out", str(out), "-q", "--set",
                 "dataset.name=synthetic", "--set", "distill.ipc=2", "--set", "distill.options.flip_plugin=true"])
    err = capsys.readouterr().err
    assert code == 2 and err == (f"error: distill.options.flip_plugin: flip_plugin (FYI) is supported by "
                                 f"{', '.join(TAKERS)}; random does not take it: remove the key, or use one of those "
                                 "methods\n")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# the matching methods that take it: off is the set from before, on changes it, the loss sees the doubled batch

#: sha256[:16] of the images (and the soft labels of tesla, datm) of ``_fit(name, ipc=2)`` (smoke options,
#: make_synthetic, seed 3, CPU), computed at bcee3df, before these methods took the plug-in, per intra-op thread count
#: (float reductions round differently with another count): flip_plugin false must keep them bit for bit. The test
#: session runs at conftest's THREADS = min(2, cpu count), so 1 and 2 are pinned; the 1-thread values are also those
#: of the review's bcee3df run (QA 17d ident-base.log). Computed with the AVX512 kernels (PINNED_CPU): another CPU
#: capability rounds differently, and there only the machine-independent part of the test runs.
BEFORE = {
    1: {"dm": ("1c7176e8d00b9d71",), "datadam": ("ede590e4c4e6de33",), "dc": ("35f05cca7ab8b86f",),
        "dsa": ("2f2b233fff81c007",), "mtt": ("7e2f824623a1095a",), "tesla": ("b2b97ead2c893104", "82085b09d7ec7b67"),
        "ftd": ("4234a29fdd5064f4",), "datm": ("e2543cf8bc7b62bd", "61067d42b9349660"), "shq": ("d88ae5ee40ffc0d0",)},
    2: {"dm": ("1c7176e8d00b9d71",), "datadam": ("ede590e4c4e6de33",), "dc": ("7f6d952bb0146f50",),
        "dsa": ("062205f23b49a328",), "mtt": ("5cf24260147bc7ee",), "tesla": ("64d6d7699556d51a", "e03bb44c3fca91aa"),
        "ftd": ("30acf275fe194c16",), "datm": ("ee88f8745aaa3c81", "44299c51acbeb633"), "shq": ("e45e64eb4d544837",)},
}
PINNED_CPU = "AVX512"
NAMES = sorted(BEFORE[2])


def test_the_pins_cover_the_thread_counts_the_tests_run_at():
    from conftest import THREADS

    assert sorted(BEFORE) == [1, 2] and sorted(BEFORE[1]) == NAMES
    assert THREADS in BEFORE and torch.get_num_threads() == THREADS


@pytest.fixture(scope="module")
def data():
    return make_synthetic()


def _fit(name, data, work, ipc=2, **options):
    cls = METHODS.get(name)
    cfg = from_dict(cls.Config, {**cls.smoke_options, **options})
    return cls(cfg).fit(data, [], FitContext(ipc=ipc, seed=3, work_dir=work)).synthetic_


def _sha(images):
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("name", NAMES)
def test_flip_plugin_off_keeps_the_set_from_before_and_on_changes_it(name, data, tmp_path, monkeypatch):
    """Off: the plug-in's helpers are never reached (on any machine), and where this machine's thread count and CPU
    kernels are pinned, the set (soft labels too) is bcee3df's bit for bit. On: another set of the same shape."""
    from ddkit.methods import fyi, gradient_matching, matching, statistics, trajectory

    calls = []
    for module in (fyi, matching, gradient_matching, statistics, trajectory):
        for helper in ("with_mirror", "flip_pair", "pair_params"):
            if hasattr(module, helper):
                monkeypatch.setattr(module, helper, lambda *a, _h=helper, **k: calls.append(_h))
    assert METHODS.get(name).Config().flip_plugin is False
    off = _fit(name, data, tmp_path / "off", flip_plugin=False)
    assert calls == []
    monkeypatch.undo()
    pins = BEFORE.get(torch.get_num_threads()) if torch.backends.cpu.get_cpu_capability() == PINNED_CPU else None
    if pins is not None:
        soft = () if off.soft_labels is None else (_sha(off.soft_labels),)
        assert (_sha(off.images), *soft) == pins[name]
    on = _fit(name, data, tmp_path / "on", flip_plugin=True)
    assert on.images.shape == off.images.shape and on.labels.tolist() == off.labels.tolist()
    assert torch.isfinite(on.images).all() and not torch.equal(on.images, off.images)


def _spy_dsa(monkeypatch):
    """Record DSA's apply calls: (whether the batch carries a graph to the synthetic images, input, params, output)."""
    from ddkit.data.augment import DSA

    calls, apply = [], DSA.apply

    def spy(self, x, params):
        out = apply(self, x, params)
        calls.append((x.requires_grad, x.detach().clone(), {k: v.clone() for k, v in params.items()},
                      out.detach().clone()))
        return out

    monkeypatch.setattr(DSA, "apply", spy)
    return calls


def _mirrored(x):
    half = len(x) // 2
    return torch.equal(x[half:], x[:half].flip(-1))


@pytest.mark.parametrize("name", ["dm", "datadam"])
@pytest.mark.parametrize("flip", [False, True])
def test_the_per_class_loss_sees_the_images_with_their_mirror_images(name, flip, data, tmp_path, monkeypatch):
    """FYI's DM: the class's synthetic batch concatenated with its mirror *before* DSA (the authors' BatchAug, then
    DiffAugment): the loss sees augment.apply(with_mirror(rows), params). A crop with a horizontal shift does not
    commute with the mirror, so mirroring after DSA gives other batches."""
    module = importlib.import_module(METHODS.get(name).__module__)
    seen, fit_per_class = [], module.fit_per_class

    def spy(cfg, real, ctx, classes, loss_fn, tag):
        def loss(net, x_real, x_syn):
            seen.append(x_syn.detach().clone())
            return loss_fn(net, x_real, x_syn)

        return fit_per_class(cfg, real, ctx, classes, loss, tag)

    monkeypatch.setattr(module, "fit_per_class", spy)
    calls = _spy_dsa(monkeypatch)
    _fit(name, data, tmp_path, ipc=2, flip_plugin=flip, dsa_options={"strategy": "crop"})
    applied = [call[1:] for call in calls if call[0]]
    assert len(seen) == len(applied) == METHODS.get(name).smoke_options["iterations"] * data.num_classes
    shifted = 0
    for x, (given, params, out) in zip(seen, applied):
        assert torch.equal(x, out) and len(x) == (4 if flip else 2)
        if flip:
            assert _mirrored(given) and not torch.equal(given[:2], given[2:])
            dx = int(params["translate"][0, 1])
            shifted += dx != 0
            assert _mirrored(x) == (dx == 0)  # a horizontal shift is not mirrored by the mirror image
    assert not flip or shifted > 0  # seed 3 draws horizontal shifts


@pytest.mark.parametrize("name", ["dc", "dsa"])
@pytest.mark.parametrize("flip", [False, True])
def test_gradient_matching_sees_the_images_with_their_mirror_images(name, flip, data, tmp_path, monkeypatch):
    """FYI's DC/DSA: a class's synthetic gradient is taken on augment.apply(with_mirror(rows), params) -- mirrored
    before the siamese DSA draw, as the authors' code; the inner-loop network trains on batches doubled likewise,
    each mirror with its image's label and augmentation draw."""
    from ddkit.methods import gradient_matching as gm

    ipc, batch_real, batch_train = 2, 8, 3
    matched, trained, fresh_model = [], [], gm.fresh_model

    last = [None]  # the batch the network saw last

    def forward(_m, inp):
        last[0] = inp[0]
        (matched if inp[0].requires_grad else trained).append(inp[0].detach().clone())

    def spy_model(*args, **kw):
        net = fresh_model(*args, **kw)
        # the synthetic batches of the matching carry a graph to the images; the inner loop's are detached copies
        net.register_forward_pre_hook(forward)
        return net

    losses, cross_entropy = [], gm.F.cross_entropy

    def spy_loss(logits, y, *a, **kw):  # the inner loop's steps: the network's batch was a detached synthetic one
        if not last[0].requires_grad and len(last[0]) != batch_real:
            losses.append(y.clone())
        return cross_entropy(logits, y, *a, **kw)

    monkeypatch.setattr(gm, "fresh_model", spy_model)
    monkeypatch.setattr(gm.F, "cross_entropy", spy_loss)
    calls = _spy_dsa(monkeypatch)
    dsa = {"dsa_options": {"strategy": "crop"}} if name == "dsa" else {}
    _fit(name, data, tmp_path, ipc=ipc, flip_plugin=flip, batch_real=batch_real, batch_train=batch_train, **dsa)
    smoke = METHODS.get(name).smoke_options
    assert len(matched) == smoke["iterations"] * smoke["outer_loop"] * data.num_classes
    applied = [call[1:] for call in calls if call[0]]
    assert len(applied) == (len(matched) if name == "dsa" else 0)
    shifted = 0
    for k, x in enumerate(matched):
        assert len(x) == (2 * ipc if flip else ipc)
        if name == "dsa":
            given, params, out = applied[k]
            assert torch.equal(x, out)
            if flip:
                dx = int(params["translate"][0, 1])
                shifted += dx != 0
                assert _mirrored(given) and _mirrored(x) == (dx == 0)
        elif flip:
            assert _mirrored(x) and not torch.equal(x[:ipc], x[ipc:])
    assert not (flip and name == "dsa") or shifted > 0  # seed 3 draws horizontal shifts
    inner = [x for x in trained if len(x) != batch_real]  # the real batches (batch_real images) are not synthetic
    assert sum(map(len, inner)) == smoke["iterations"] * (smoke["outer_loop"] - 1) * data.num_classes * ipc * (
        2 if flip else 1)
    for x in inner:
        assert len(x) <= (2 * batch_train if flip else batch_train)
        if flip and name == "dc":
            assert _mirrored(x)
    steps = [(given, params) for graph, given, params, _ in calls if not graph and len(given) != batch_real]
    assert len(steps) == (len(inner) if name == "dsa" else 0)
    for given, params in steps:
        if flip:  # the inner loop's batch mirrored before DSA, each mirror with its image's draw
            assert _mirrored(given) and all(torch.equal(v[:len(v) // 2], v[len(v) // 2:]) for v in params.values())
    labels = losses  # one per inner-loop step
    assert [len(y) for y in labels] == [len(x) for x in inner]
    if flip:  # each mirror with its image's label
        assert all(torch.equal(y[len(y) // 2:], y[:len(y) // 2]) for y in labels)
        assert any(not torch.equal(y[:len(y) // 2], y[:len(y) // 2].flip(0)) for y in labels)


# ------------------------------------------------------------------------------------------------
# trajectory matching: every unrolled student step trains on its minibatch and the minibatch's mirror images


@pytest.mark.parametrize("mode", ["unroll", "exact", "first_order"])
def test_a_flipped_unroll_is_the_unroll_of_the_doubled_set(mode):
    """flip=True gives the gradients of an unroll over ``cat([images, flip(images)])`` whose steps take each minibatch
    with its mirrors (labels repeated, each mirror with its image's augmentation draw), folded back onto the images."""
    from ddkit.data.augment import build_augment
    from ddkit.methods.trajectory import Step, plan_steps, trajectory_gradients
    from test_trajectory_methods import _tiny_case

    student, start, target, images, _, _ = _tiny_case()
    # crops only, with horizontal shifts: they do not commute with the mirror, so mirroring after the augmentation
    # would give other batches
    augment = build_augment("dsa", strategy="crop")
    plan = plan_steps(6, 4, 4, torch.Generator().manual_seed(0), augment, (8, 8))
    assert any(bool((s.aug["translate"][:, 1] != 0).any()) for s in plan)
    labels = torch.randn(6, 3, dtype=torch.float64).requires_grad_(True)
    lr = torch.tensor(0.1, dtype=torch.float64)
    got = trajectory_gradients(student, start, target, images, labels, lr, plan, augment, mode, flip=True)
    doubled = [Step(torch.cat([s.index, s.index + 6]), {k: torch.cat([v, v]) for k, v in s.aug.items()}) for s in plan]
    want = trajectory_gradients(student, start, target, torch.cat([images, images.flip(-1)]),
                                torch.cat([labels, labels]).detach().requires_grad_(True), lr, doubled, augment, mode)
    assert torch.allclose(got.loss, want.loss, rtol=1e-12)
    assert torch.allclose(got.grad_images, want.grad_images[:6] + want.grad_images[6:].flip(-1), rtol=1e-9,
                          atol=1e-14)
    assert torch.allclose(got.grad_lr, want.grad_lr, rtol=1e-9)
    assert torch.allclose(got.grad_labels, want.grad_labels[:6] + want.grad_labels[6:], rtol=1e-9, atol=1e-14)
    plain = trajectory_gradients(student, start, target, images, labels, lr, plan, augment, mode)
    assert not torch.allclose(plain.grad_images, got.grad_images, rtol=1e-3)


@pytest.mark.parametrize("flip", [False, True])
def test_the_unrolled_student_trains_on_the_images_with_their_mirror_images(flip, data, tmp_path, monkeypatch):
    from ddkit.methods import trajectory as tr

    seen, call = [], tr.FunctionalStudent.__call__

    def spy(self, flat, x):
        if x.requires_grad:  # the unroll's batches (from the images being distilled), not the experts' training
            seen.append(x.detach().clone())
        return call(self, flat, x)

    monkeypatch.setattr(tr.FunctionalStudent, "__call__", spy)
    ipc = 2
    _fit("mtt", data, tmp_path, ipc=ipc, flip_plugin=flip, augment="none")
    smoke = METHODS.get("mtt").smoke_options
    n = ipc * data.num_classes  # batch_syn null: every image in every step
    assert len(seen) == smoke["iterations"] * smoke["syn_steps"]
    for x in seen:
        assert len(x) == (2 * n if flip else n)
        if flip:
            assert torch.equal(x[n:], x[:n].flip(-1))


@pytest.mark.parametrize("name", ["dm", "datadam", "mtt", "datm"])
def test_a_checkpoint_from_before_the_plugin_resumes_with_it_off(name, data):
    """The checkpoint fingerprint held the whole config, so the new field refused every checkpoint written before it
    existed; at its default it is now left out, as from the set's identity. (dc/dsa checkpoints from before also held
    bn_real_per_class, an earlier added field that the identity leaves out at its default: the identity form does not
    match them, the legacy form does -- see the next test.)"""
    from ddkit.config import to_dict
    from ddkit.methods.matching import state_fingerprint

    cfg = METHODS.get(name).Config()
    before = {k: v for k, v in to_dict(cfg).items() if k != "flip_plugin"}  # the whole config as it was
    assert state_fingerprint(cfg, 2, 0, data) == repr((before, 2, 0, data.fingerprint, data.normalisation))
    assert state_fingerprint(dataclasses.replace(cfg, flip_plugin=True), 2, 0, data) != state_fingerprint(
        cfg, 2, 0, data)


class _Interrupted(Exception):
    pass


def _legacy_fingerprint(cfg, ipc, seed, data):
    """The fingerprint as bcee3df (before flip_plugin) wrote it: the whole config, operational settings as set."""
    from ddkit.config import to_dict

    before = {k: v for k, v in to_dict(cfg).items() if k != "flip_plugin"}
    return repr((before, ipc, seed, data.fingerprint, data.normalisation))


@pytest.mark.parametrize("name,tag", [("dc", "dc"), ("dsa", "dsa"), ("dm", "dm"), ("mtt", "mtt-state")])
def test_a_checkpoint_written_before_the_plugin_resumes_to_the_same_bytes(name, tag, data, tmp_path):
    """A checkpoint from before flip_plugin holds ``repr((to_dict(cfg), ipc, seed, data))``: DC's bn_real_per_class
    and checkpoint_every as set included, which the identity form of the fingerprint (since 6d7e2e6) leaves out or
    holds at its default. It was refused, and ``ddkit distill`` met it again on every run in its work folder (keyed
    by distill_hash, which did not change). The same config resumes it to the uninterrupted bytes; another config,
    flip_plugin on included, is still refused."""
    from ddkit.errors import DDKitError
    from ddkit.methods.matching import state_fingerprint

    cls = METHODS.get(name)
    options = {**cls.smoke_options, "checkpoint_every": 1}

    def fit(work, interrupt=False, **more):
        calls = []

        def progress(step, total, record):
            if interrupt and not any(k.endswith("_pass") for k in record):
                calls.append(step)
                if len(calls) == 2:
                    raise _Interrupted

        cfg = from_dict(cls.Config, {**options, **more})
        ctx = FitContext(ipc=2, seed=3, work_dir=work, progress=progress)
        return cls(cfg).fit(data, [], ctx).synthetic_

    straight = fit(None)
    work = tmp_path / "work"
    with pytest.raises(_Interrupted):
        fit(work, interrupt=True)
    path = work / f"{tag}.pt"
    state = torch.load(path, weights_only=True)
    cfg = from_dict(cls.Config, options)
    legacy = _legacy_fingerprint(cfg, 2, 3, data)
    assert state["step"] == 2 and state["fingerprint"] == state_fingerprint(cfg, 2, 3, data) != legacy
    state["fingerprint"] = legacy  # as written before the merge
    torch.save(state, path)
    for changed in ({"lr_img": 2 * cfg.lr_img}, {"flip_plugin": True}):
        with pytest.raises(DDKitError, match="was written by a run with other settings"):
            fit(work, **changed)
    resumed = fit(work)
    assert torch.equal(resumed.images, straight.images) and torch.equal(resumed.labels, straight.labels)
    assert torch.load(path, weights_only=True)["fingerprint"] == state_fingerprint(cfg, 2, 3, data)  # the new form


@pytest.mark.parametrize("name,options", [("dm", {"dsa_options": {"flip": False}}), ("dc", {}),
                                          ("mtt", {"augment_options": {"flip": False}}), ("sre2l", {})])
def test_the_plugin_on_digits_warns_once_naming_its_key(name, options, data, bn_teacher, tmp_path, caplog,
                                                        monkeypatch):
    """FYI assumes flip-invariant classes; a mirrored digit is another symbol. Every method that takes the plug-in
    warns on mnist, as DSA's flips do, even with DSA's flip turned off."""
    from ddkit.data import augment

    monkeypatch.setattr(augment, "_warned_digits", set())
    mnist = dataclasses.replace(data, name="mnist")
    cls = METHODS.get(name)
    teachers = [bn_teacher] if name == "sre2l" else []

    def fit(work, flip):
        cfg = from_dict(cls.Config, {**cls.smoke_options, **options, "flip_plugin": flip})
        cls(cfg).fit(mnist, teachers, FitContext(ipc=1, seed=3, work_dir=tmp_path / work))

    def warnings():
        return [r.getMessage() for r in caplog.records if r.name == "ddkit.methods.fyi"]

    with caplog.at_level("WARNING"):
        fit("off", False)
        assert warnings() == []
        fit("on", True)
        assert warnings() == [
            "flip_plugin (FYI) matches every synthetic image of dataset 'mnist', a digit dataset, together with its "
            "mirror image, but FYI assumes flip-invariant classes (a mirrored digit is another symbol); set "
            "distill.options.flip_plugin: false to turn it off"]
        fit("again", True)
        assert len(warnings()) == 1  # once per process
