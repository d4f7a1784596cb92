"""Every registered method, on tiny data with its ``smoke_options``: the contract.

Shapes, finite pixels, label range, same seed -> same bytes (soft labels too), another seed ->
other images, config not mutated, artifact round-trip (the saved set is the fit's output), and
resume after an interruption equals an uninterrupted run.
"""

from dataclasses import dataclass

import pytest
import torch
import yaml

from ddkit import testing
from ddkit.config import Checked, from_dict
from ddkit.data.base import DatasetConfig
from ddkit.errors import DDKitError
from ddkit.methods import METHODS, Method, SyntheticSet
from ddkit.methods.common import Checkpoint
from ddkit.pipeline import DistillConfig, distill

IPC = testing.IPC


@pytest.fixture(scope="module")
def data():
    return testing.tiny_data()


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    return testing.tiny_teacher(data, tmp_path_factory.mktemp("t") / "teacher")


# every method, `full` (every training image, which no seed changes) and deterministic ones (uses_seed = False) too
@pytest.mark.parametrize("name", METHODS.list())
def test_method_contract(name, data, teacher, tmp_path):
    testing.check_output(name, data, teacher, tmp_path)


def test_methods_that_label_their_images_say_so():
    ours = [m for m in METHODS.list() if METHODS.get(m).__module__.startswith("ddkit.")]  # not DDKIT_PLUGINS' ones
    assert {m for m in ours if METHODS.get(m).own_soft_labels(
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


# every method marked resumable (random, full: one pass, nothing to interrupt)
@pytest.mark.parametrize("name", [m for m in METHODS.list() if METHODS.get(m).resumable])
def test_resume_equals_uninterrupted(name, data, teacher, tmp_path):
    testing.check_resume(name, data, teacher, tmp_path)


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


@dataclass
class _NoConfig(Checked):
    """No settings."""


class _Copies(Method):
    """The first ipc images of each class, optionally shifted by the seed, optionally iterating."""

    Config = _NoConfig
    shift_by_seed = True
    wrong_label = False
    iterations = 0
    checkpoints = False  # a checkpoint saved in every iteration
    resumes = False  # read back: the iterations it holds are not done again (but reported, as rded its classes)
    mutates_real = False  # blanks the first real training image in place

    def fit(self, real, teachers, ctx):
        index = torch.cat([real.train.indices_of(c)[:ctx.ipc] + ctx.seed * self.shift_by_seed
                           for c in range(real.num_classes)])
        labels = real.train.labels[index].clone()
        if self.mutates_real:
            real.train.images[0].zero_()
        if self.wrong_label:
            labels[-1] = real.num_classes + 5
        ckpt = Checkpoint(ctx, 1) if self.checkpoints else None
        state = ckpt.load() if ckpt is not None and self.resumes else None
        for step in range(self.iterations):
            if ckpt is not None and step >= (state["step"] if state is not None else 0):
                ckpt.save({"step": step + 1})
            if ctx.progress is not None:
                ctx.progress(step + 1, self.iterations, {"loss": 0.0})
        self.synthetic_ = SyntheticSet(real.train.images[index].clone(), labels)
        return self


def _register(monkeypatch, name, **attrs):
    cls = type(name, (_Copies,), attrs)
    monkeypatch.setitem(METHODS._entries, name, cls)  # for this test only: the parametrized lists stay ddkit's
    return cls


def test_check_method_passes_a_method_that_keeps_the_contract(monkeypatch, data, teacher, tmp_path):
    """A one-pass method of one's own marked resumable = False, checked by key and by class."""
    cls = _register(monkeypatch, "copies", resumable=False)
    testing.check_method("copies", data, teacher, tmp_path / "a")
    testing.check_method(cls, data, teacher, tmp_path / "b")
    assert (tmp_path / "a" / "output" / "art" / "manifest.json").is_file()
    assert not (tmp_path / "a" / "resume").exists()  # not resumable: not fitted for it
    _register(monkeypatch, "resumes", iterations=3, checkpoints=True, resumes=True)
    testing.check_method("resumes", data, teacher, tmp_path / "c")  # it reports the iterations it restored: passes
    assert [p.name for p in (tmp_path / "c" / "resume" / "work").iterdir()] == ["state.pt"]


@pytest.mark.parametrize(("attrs", "message"), [
    ({"shift_by_seed": False, "resumable": False},
     "method 'broken' made the same images with seed 0 and seed 1; draw its randomness from ctx.seed, or set "
     "`uses_seed = False` on the class if it is deterministic (herding)"),
    ({"wrong_label": True, "resumable": False}, "method 'broken' made label 9, outside 0..3 for 4 classes"),
    ({}, "method 'broken' is marked resumable but called ctx.progress 0 time(s) outside one-off passes, so it was "
         "never interrupted: call ctx.progress(step, total, record) once per iteration and checkpoint to "
         "ctx.work_dir (ddkit.methods.common.Checkpoint), or set `resumable = False` on the class"),
    ({"iterations": 3}, "method 'broken' is marked resumable but wrote no checkpoint to ctx.work_dir before it was "
                        "interrupted in its 2nd iteration"),
    # QA 22c F3: it saved a checkpoint in every iteration and never read one, so a resumed fit started over
    ({"iterations": 3, "checkpoints": True},
     "method 'broken': resumed after an interruption in iteration 2, it wrote state.pt in ctx.work_dir again by "
     "iteration 1: it started over instead of resuming from its checkpoint; load the checkpoint at the start of fit "
     "(Checkpoint.load) and continue after its step"),
])
def test_check_method_names_what_a_broken_method_breaks(monkeypatch, data, teacher, tmp_path, attrs, message):
    """The contract test said "DID NOT RAISE KeyboardInterrupt" for a method that never reports progress, and
    exempted methods by name ('full', 'random'), so a deterministic method of one's own could not pass it."""
    _register(monkeypatch, "broken", **attrs)
    with pytest.raises(testing.ContractError) as exc:
        testing.check_method("broken", data, teacher, tmp_path)
    assert str(exc.value).startswith(message)
    _register(monkeypatch, "broken", **attrs, uses_seed=False)  # deterministic by design: the seed check is off
    if attrs == {"shift_by_seed": False, "resumable": False}:
        testing.check_method("broken", data, teacher, tmp_path / "det")


def test_check_method_refuses_a_method_that_changes_the_real_data(monkeypatch, teacher, tmp_path):
    """QA 22c F5: a fit that wrote into `real` passed the contract, though a run's baselines and evaluations use
    that data after it (and its set recorded the fingerprint of the changed data)."""
    data = testing.tiny_data()  # its own: the fit changes it
    before = data.fingerprint
    _register(monkeypatch, "broken", mutates_real=True, resumable=False)
    with pytest.raises(testing.ContractError) as exc:
        testing.check_method("broken", data, teacher, tmp_path)
    assert str(exc.value) == (
        f"method 'broken' changed the real data it was given in place (fingerprint {before} before its fit, "
        f"{data.fingerprint} after), which the run's baselines and evaluations use next; fix the method to work on "
        "copies (real.train.images.float(), .clone()), never on `real` itself")
    assert not (tmp_path / "output").exists()


def test_distill_refuses_a_method_that_changes_the_real_data(monkeypatch, tmp_path):
    """The distill stage itself (ddkit run, bench, distill) refuses a fit that changed `real` in place, writing no
    set: the run would train its baselines on the changed data and the set record its fingerprint."""
    data = testing.tiny_data()
    before = data.fingerprint
    _register(monkeypatch, "broken", mutates_real=True, resumable=False)
    with pytest.raises(DDKitError) as exc:
        distill(data, DistillConfig(method="broken", ipc=1), out=tmp_path / "set")
    assert str(exc.value) == (
        f"method 'broken' changed the real data it was given in place (fingerprint {before} before its fit, "
        f"{data.fingerprint} after), which the run's baselines and evaluations use next; fix the method to work on "
        "copies (real.train.images.float(), .clone()), never on `real` itself")
    assert before != data.fingerprint and not (tmp_path / "set").exists()


class _PeeksAtTeacher(_Copies):
    """_Copies that reads its teacher: always (``teachers[0]``), or only when it is given one."""

    only_if_given = False

    def fit(self, real, teachers, ctx):
        super().fit(real, teachers, ctx)
        if teachers or not self.only_if_given:  # other images with a teacher than without one
            self.synthetic_.images = self.synthetic_.images * teachers[0].test_accuracy
        return self


def test_check_method_fits_a_method_that_reads_no_teacher_without_one(monkeypatch, data, teacher, tmp_path):
    """check_method passed a teacher to every method while distill passes none to one with uses_teacher = False: a
    plugin that declares it but reads teachers[0] failed with a raw IndexError inside the check's distill, and one
    that reads the teacher only when given one was told its randomness does not come from ctx.seed."""
    def register(**attrs):
        monkeypatch.setitem(METHODS._entries, "peek", type("peek", (_PeeksAtTeacher,), {"resumable": False, **attrs}))

    register(uses_teacher=False)
    with pytest.raises(testing.ContractError) as exc:
        testing.check_method("peek", data, teacher, tmp_path / "a")
    assert str(exc.value) == (
        "method 'peek' declares `uses_teacher = False`, so distill gives its fit no teacher, but it fails without one "
        "(IndexError: list index out of range) and not with one; drop `uses_teacher = False` from the class, or read "
        "no teacher in fit")
    register()  # it may read one (the default): it gets one
    testing.check_method("peek", data, teacher, tmp_path / "b")
    register(uses_teacher=False, only_if_given=True)  # fitted as distill fits it: with no teacher
    testing.check_method("peek", data, teacher, tmp_path / "c")


def test_check_method_refuses_an_unregistered_class():
    with pytest.raises(DDKitError, match="register the class with @METHODS.register"):
        testing.check_method(type("Loose", (_Copies,), {}))


def test_the_contract_covers_the_methods_of_ddkit_plugins(tmp_path):
    """`DDKIT_PLUGINS=myplug pytest tests/test_method_contract.py -k myherding` ran nothing ("37 deselected"):
    conftest.py now imports the plugins, as the CLI does, before the tests are parametrized over METHODS."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "herdplug.py").write_text(
        "import torch\n"
        "from dataclasses import dataclass\n"
        "from ddkit.config import Checked\n"
        "from ddkit.methods import METHODS, Method, SyntheticSet\n"
        "@dataclass\n"
        "class Cfg(Checked):\n"
        "    pass\n"
        "@METHODS.register('herdplug')\n"
        "class First(Method):\n"
        "    '''The first ipc images of each class: deterministic, one pass.'''\n"
        "    Config = Cfg\n"
        "    uses_seed = False\n"
        "    resumable = False\n"
        "    def fit(self, real, teachers, ctx):\n"
        "        index = torch.cat([real.train.indices_of(c)[:ctx.ipc] for c in range(real.num_classes)])\n"
        "        self.synthetic_ = SyntheticSet(real.train.images[index].clone(), real.train.labels[index].clone())\n"
        "        return self\n")
    env = {**os.environ, "DDKIT_PLUGINS": "herdplug", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "herdplug",
                           str(Path(__file__))], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
