"""Methods and models from a user's own module (a plugin): their code is part of what they make, and the
mistakes a method author makes end in one line that names the fix."""

import hashlib
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from ddkit.config import Checked, config_hash, from_dict
from ddkit.data.base import DatasetConfig, make_synthetic
from ddkit.errors import ConfigError, DataError, DDKitError
from ddkit.methods import METHODS, Checkpoint, Method, SyntheticSet, check_ipc
from ddkit.models import MODELS, create_model
from ddkit.pipeline import DistillConfig, RunConfig, distill, distill_hash, run

PICK = '''
from dataclasses import dataclass

from ddkit.config import Checked
from ddkit.methods import METHODS, Method, SyntheticSet


@METHODS.register("{key}")
class Pick(Method):
    """The images OFFSET.. of every class."""

    @dataclass
    class Config(Checked):
        pass

    def fit(self, real, teachers, ctx):
        idx = [i for c in range(real.num_classes) for i in real.train.indices_of(c)[OFFSET:OFFSET + ctx.ipc].tolist()]
        self.synthetic_ = SyntheticSet(real.train.images[idx].clone(), real.train.labels[idx].clone(),
                                       meta={{"source_index": idx}})
        return self


OFFSET = 0
'''

NET = '''
from torch import nn

from ddkit.models import MODELS

HIDDEN = 8


class Net(nn.Module):
    def __init__(self, in_channels, num_classes, image_size, hidden=HIDDEN):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, hidden), nn.ReLU())
        self.feature_dim = hidden
        self.head = nn.Linear(hidden, num_classes)

    def embed(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.embed(x))


def {key}(in_channels, num_classes, image_size):
    return Net(in_channels, num_classes, image_size)


MODELS.add("{key}", {key})
'''


@pytest.fixture
def registries(monkeypatch):
    """Registrations a test makes are undone after it (the contract test lists every registered method)."""
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))
    monkeypatch.setattr(MODELS, "_entries", dict(MODELS._entries))


def _plugin(tmp_path, monkeypatch, name: str, text: str):
    """Write module ``name`` into tmp_path and import it (again: reload, as an edited plugin in a new process)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # an edit of the same size in the same second: no stale pyc
    (tmp_path / f"{name}.py").write_text(text)
    importlib.invalidate_caches()
    if name in sys.modules:
        return importlib.reload(sys.modules[name])
    monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module(name)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_edited_plugin_method_makes_its_set_again(tmp_path, monkeypatch, registries):
    """A set was identified by the method's key, options and `revision` only: a run after an edit of the
    plugin's method reused the old set (and its evaluations) without a word, and the set did not record
    where its method came from. The sha256 of the plugin's source now enters its identity and manifest."""
    _plugin(tmp_path, monkeypatch, "pickplug", PICK.format(key="pick"))
    cfg = from_dict(RunConfig, {
        "dataset": {"name": "synthetic"}, "teacher": None, "distill": {"method": "pick", "ipc": 2},
        "evaluate": {"overrides": {"student": "tiny_convnet", "full_reference": False,
                                   "train": {"epochs": 1, "batch_size": 32}}, "seeds": [0]},
        "device": "cpu", "out": str(tmp_path / "run")})
    assert run(cfg)["reused"] == []
    man = json.loads((tmp_path / "run/distilled/manifest.json").read_text())
    assert man["method"] == {"name": "pick", "config": {}, "module": "pickplug.Pick",
                             "source_sha256": _sha(tmp_path / "pickplug.py")}
    assert man["source_index"] == [0, 1, 24, 25, 48, 49, 72, 73]
    assert run(cfg)["reused"] == ["distilled", "eval-hard.json"]  # unchanged code: reused
    old_sha, old_key = man["method"]["source_sha256"], man["config_hash"]
    _plugin(tmp_path, monkeypatch, "pickplug", PICK.format(key="pick").replace("OFFSET = 0", "OFFSET = 5"))
    again = run(cfg)
    assert again["reused"] == []  # the edited method made its set again, and it was evaluated again
    man = json.loads((tmp_path / "run/distilled/manifest.json").read_text())
    assert man["source_index"] == [5, 6, 29, 30, 53, 54, 77, 78]
    assert man["method"]["source_sha256"] == _sha(tmp_path / "pickplug.py") != old_sha
    assert man["config_hash"] != old_key


def test_builtin_identities_hold_no_source_and_keep_their_values(tmp_path, monkeypatch, registries):
    """ddkit's own methods and models keep the keys they had (their `revision` counts, not a file's
    sha): every cached set and teacher stays valid. The payloads below are those of the base code."""
    import ddkit.pipeline as pipeline
    from ddkit.teacher import TeacherConfig
    from ddkit.teacher.squeeze import teacher_hash

    data = make_synthetic()
    payloads = []
    monkeypatch.setattr(pipeline, "config_hash", lambda key: payloads.append(key) or config_hash(key))
    for name in METHODS.list():
        distill_hash(DistillConfig(method=name, ipc=None if name == "full" else 2), data, None)
    assert payloads and not any("method_source" in p for p in payloads)
    # the values the base code (611c2fc) computes: edc has a revision
    assert distill_hash(DistillConfig(method="random", ipc=2), data, None) == "df4c3875b63f04ed"
    assert distill_hash(DistillConfig(method="edc", ipc=2, options={"iterations": 3}), data, None) == "c3c32d7ec0b3e781"
    assert teacher_hash(TeacherConfig(model="tiny_convnet")) == "d99de0aabf289a6c"
    for model in ("tiny_convnet", "convnet3", "convnet4-w64-bn", "resnet18_cifar"):
        tcfg = TeacherConfig(model=model)
        assert teacher_hash(tcfg) == config_hash(tcfg)
    _plugin(tmp_path, monkeypatch, "pickplug2", PICK.format(key="pick2"))
    payloads.clear()
    distill_hash(DistillConfig(method="pick2", ipc=2), data, None)
    assert payloads[-1]["method_source"] == _sha(tmp_path / "pickplug2.py")


def test_an_edited_plugin_model_trains_its_teacher_again(tmp_path, monkeypatch, registries):
    """A teacher was identified by its config: an edited plugin model reused the teacher of the old code.
    Its manifest records where the model is, and a load without the plugin names the module to import."""
    from ddkit.teacher import Teacher, TeacherConfig, saved_teacher, train_teacher
    from ddkit.teacher.squeeze import teacher_hash
    from ddkit.training import TrainConfig

    data = make_synthetic()
    _plugin(tmp_path, monkeypatch, "netplug", NET.format(key="plug_net"))
    cfg = TeacherConfig(model="plug_net", train=TrainConfig(epochs=1, batch_size=32))
    train_teacher(data, cfg, tmp_path / "t")
    man = json.loads((tmp_path / "t/manifest.json").read_text())
    assert man["model"]["module"] == "netplug.plug_net"
    assert man["model"]["source_sha256"] == _sha(tmp_path / "netplug.py")
    assert man["config_hash"] == teacher_hash(cfg) != config_hash(cfg)
    assert saved_teacher(data, cfg, tmp_path / "t") is not None
    _plugin(tmp_path, monkeypatch, "netplug", NET.format(key="plug_net").replace("HIDDEN = 8", "HIDDEN = 16"))
    assert saved_teacher(data, cfg, tmp_path / "t") is None  # trained again, with the new code
    del MODELS._entries["plug_net"]  # a later process without the plugin
    with pytest.raises(DDKitError, match=r"\(unknown model 'plug_net'\); made by module netplug: import it first "
                                         r"\(CLI: set DDKIT_PLUGINS=netplug\); else"):
        Teacher.load(tmp_path / "t")


def test_a_teacher_of_a_model_registered_in_a_script_names_a_fix_that_works(tmp_path, monkeypatch, registries):
    """QA 18c #18: a model registered in a script run as `python script.py` is recorded as module __main__, and
    loading its teacher in another process advised DDKIT_PLUGINS=__main__, which imports ddkit's own __main__."""
    from ddkit.teacher import Teacher, TeacherConfig, train_teacher
    from ddkit.training import TrainConfig

    plug = _plugin(tmp_path, monkeypatch, "scriptnet", NET.format(key="script_net"))
    plug.script_net.__module__ = "__main__"  # as `python scriptnet.py` defines it
    MODELS.add("script_net", plug.script_net)
    train_teacher(make_synthetic(), TeacherConfig(model="script_net", train=TrainConfig(epochs=1, batch_size=32)),
                  tmp_path / "t")
    assert json.loads((tmp_path / "t/manifest.json").read_text())["model"]["module"] == "__main__.script_net"
    del MODELS._entries["script_net"]  # another process
    with pytest.raises(DDKitError) as err:
        Teacher.load(tmp_path / "t")
    assert "DDKIT_PLUGINS=__main__" not in str(err.value)
    assert ("(unknown model 'script_net'); made by a script (module __main__), which another process cannot import: "
            "move the model's registration into a module of its own, import that in the script, and import it first "
            "(CLI: name it in DDKIT_PLUGINS); else the manifest is damaged") in str(err.value)


def test_an_edited_plugin_teacher_model_is_a_new_teacher_for_every_cache(tmp_path, monkeypatch, registries):
    """QA 18c #8: a teacher's fingerprint was its weights' sha alone, so after an edit of its plugin model's forward
    (same weights, other logits) the cached real-data statistics, teacher-labelled students and the sets of a run with
    an imported teacher made by the old code were reused. Its model's source now enters the fingerprint; a teacher of
    ddkit's own models keeps the weights' sha (the keys of every cache stay)."""
    import copy

    from ddkit.methods.statistics import statistics_key
    from ddkit.pipeline import teacher_weights
    from ddkit.teacher import Teacher, TeacherConfig, train_teacher
    from ddkit.training import TrainConfig

    data = make_synthetic()
    recipe = TrainConfig(epochs=1, batch_size=32)
    _plugin(tmp_path, monkeypatch, "actplug", NET.format(key="act_net"))
    train_teacher(data, TeacherConfig(model="act_net", train=recipe), tmp_path / "t")
    old = Teacher.load(tmp_path / "t")
    x = torch.rand(2, *data.image_shape)
    sre2l = DistillConfig(method="sre2l", ipc=1)
    extra = DistillConfig(method="sre2l", ipc=1, options={"extra_teachers": [str(tmp_path / "t")]})
    before = (old.fingerprint, old(x), statistics_key(old, data, ["logits"]), distill_hash(sre2l, data, old),
              distill_hash(extra, data, None))  # an extra teacher is keyed by its manifest alone
    assert before[0] != old.manifest["weights_sha"]
    _plugin(tmp_path, monkeypatch, "actplug", NET.format(key="act_net").replace("nn.ReLU()", "nn.Tanh()"))
    new = Teacher.load(tmp_path / "t")
    assert new.manifest["weights_sha"] == old.manifest["weights_sha"]  # the same weights...
    assert not torch.equal(new(x), before[1])  # ...give other logits
    after = (new.fingerprint, statistics_key(new, data, ["logits"]), distill_hash(sre2l, data, new),
             distill_hash(extra, data, None))
    assert all(a != b for a, b in zip(after, before[:1] + before[2:]))
    # stored labels, label stores and committees record the fingerprint: the old code's is not this teacher's, while
    # a record from before the code entered it (the weights' sha alone) still names it
    assert new.made(after[0]) and new.made(new.manifest["weights_sha"]) and not new.made(before[0])
    # a module of the user's own in Teacher(model, manifest): its class's source counts without a registered name (the
    # same file as the factory's: the same fingerprint)
    own = Teacher(copy.deepcopy(new.model), {**new.manifest, "model": {**new.manifest["model"], "name": "unknown"}})
    assert own.fingerprint == new.fingerprint != new.manifest["weights_sha"]
    builtin = train_teacher(data, TeacherConfig(model="tiny_convnet", train=recipe), tmp_path / "b")
    assert builtin.fingerprint == builtin.manifest["weights_sha"] and builtin.made(builtin.manifest["weights_sha"])
    assert teacher_weights([str(tmp_path / "b")]) == [builtin.manifest["weights_sha"]]
    assert Teacher(builtin.model, builtin.manifest).fingerprint == builtin.manifest["weights_sha"]


def test_a_method_whose_source_cannot_be_read_is_warned_about(caplog, registries):
    """A class defined where no source is kept (``python -c``, some notebooks) cannot be tracked: its
    identity is its key, options and `revision`, and a warning says so, once."""
    from ddkit.registry import source_sha256

    ns: dict = {}
    exec("class Ghost:\n    pass\n", {"__name__": "ghostmod"}, ns)  # no file, no source
    with caplog.at_level("WARNING", logger="ddkit"):
        assert source_sha256(ns["Ghost"]) is None
        assert source_sha256(ns["Ghost"]) is None
    assert caplog.text.count("cannot read the source of ghostmod.Ghost: edits to it are not tracked") == 1
    assert "bump a method's `revision`" in caplog.text
    assert source_sha256(DistillConfig) is None  # ddkit's own: never hashed


@dataclass
class _NoFields(Checked):
    pass


def _method(fit, config=_NoFields):
    return type("M", (Method,), {"Config": config, "fit": fit})


def test_a_tensor_in_meta_is_refused_at_build_in_memory_and_on_disk(tmp_path, registries):
    """A tensor in synthetic_.meta worked in memory, then failed at the save (after the whole fit) with a
    raw "TypeError: Object of type Tensor is not JSON serializable" naming neither method nor key."""
    data = make_synthetic()

    def fit(self, real, teachers, ctx):
        idx = torch.arange(0, 96, 12)
        self.synthetic_ = SyntheticSet(real.train.images[idx], real.train.labels[idx], meta={"ok": [1], "scores":
                                                                                           torch.ones(3)})
        return self

    METHODS.register("tmeta")(_method(fit))
    message = ("method 'tmeta' put a Tensor in synthetic_.meta['scores']; meta is saved as JSON: convert it to lists, "
               "numbers or str (.tolist())")
    for out in (None, tmp_path / "set"):
        with pytest.raises(DDKitError) as err:
            distill(data, DistillConfig(method="tmeta", ipc=2), DatasetConfig(name="synthetic"), out)
        assert str(err.value) == message
    assert not (tmp_path / "set").exists()


def test_method_author_mistakes_end_in_one_line(registries):
    """fit without `return self`, a class that is no Method or has no Config, a dict for a config, labels
    out of range and NaN pixels from a method without a learning rate: raw AttributeErrors or a message
    that did not fit."""
    data = make_synthetic()

    def no_return(self, real, teachers, ctx):
        self.synthetic_ = SyntheticSet(real.train.images[:4], real.train.labels[:4])

    METHODS.register("noreturn")(_method(no_return))
    with pytest.raises(DDKitError) as err:
        distill(data, DistillConfig(method="noreturn", ipc=1), DatasetConfig(name="synthetic"))
    assert str(err.value) == ("method 'noreturn': its fit returned None; it must `return self` after setting "
                              "self.synthetic_")

    METHODS.register("noset")(_method(lambda self, real, teachers, ctx: self))
    with pytest.raises(DDKitError, match=r"^method 'noset': its fit set no self.synthetic_ \(a "):
        distill(data, DistillConfig(method="noset", ipc=1), DatasetConfig(name="synthetic"))

    class NotAMethod:
        Config = _NoFields

    with pytest.raises(DDKitError) as err:
        METHODS.register("notamethod")(NotAMethod)
    assert str(err.value) == ("method 'notamethod': test_method_author_mistakes_end_in_one_line.<locals>.NotAMethod is "
                              "not a subclass of ddkit.methods.Method; derive it from Method (class X(Method): ...)")
    with pytest.raises(DDKitError, match=r"^method 'noconfig': M has no dataclass Config; give it one \(a @dataclass "):
        METHODS.register("noconfig")(type("M", (Method,), {}))
    with pytest.raises(DDKitError, match="no dataclass Config"):
        METHODS.add("plainconfig", _method(no_return, config=dict))
    contradiction = type("T", (_method(no_return),), {"needs_teacher": True, "uses_teacher": False})
    with pytest.raises(DDKitError) as err:  # fit would get no teacher, which it needs
        METHODS.add("needsnone", contradiction)
    assert str(err.value) == ("method 'needsnone': T sets needs_teacher = True and uses_teacher = False; a method that "
                              "needs a teacher reads it: drop uses_teacher = False")
    assert not {"notamethod", "noconfig", "plainconfig", "needsnone"} & set(METHODS.list())

    @dataclass
    class Cfg(Checked):
        space: str = "pixels"

    assert _method(no_return, Cfg)({"space": "teacher"}).cfg == Cfg(space="teacher")
    with pytest.raises(DDKitError, match=r"options\.spac.*did you mean 'space'"):
        _method(no_return, Cfg)({"spac": "teacher"})

    def bad_labels(self, real, teachers, ctx):
        self.synthetic_ = SyntheticSet(real.train.images[:5], torch.tensor([0, 1, 9, 3, -1]))
        return self

    METHODS.register("badlabels")(_method(bad_labels))
    with pytest.raises(DDKitError) as err:
        distill(data, DistillConfig(method="badlabels", ipc=1), DatasetConfig(name="synthetic"))
    assert str(err.value) == ("method 'badlabels' produced 2 label(s) outside the class indices 0..3, the first 9 "
                              "(image 2); this is a bug in the method")

    def nan_images(self, real, teachers, ctx):
        self.synthetic_ = SyntheticSet(torch.full((4, *real.image_shape), float("nan")), torch.arange(4))
        return self

    METHODS.register("nanimgs")(_method(nan_images))
    with pytest.raises(DDKitError) as err:
        distill(data, DistillConfig(method="nanimgs", ipc=1), DatasetConfig(name="synthetic"))
    assert str(err.value) == ("method 'nanimgs' produced non-finite pixels; check the method (for optimising methods: "
                              "lower the learning rate of its images in distill.options, or undo another option that "
                              "makes the updates larger)")


def test_the_pipeline_checks_ipc_for_every_method(registries):
    """A plugin method that did not call check_ipc ran with more images per class than the class holds
    (herding with ipc 30 on 24 images: duplicates, accepted). A method may opt out."""
    assert check_ipc(make_synthetic(), 3) == 3 and Checkpoint.__module__ == "ddkit.methods.common"  # exported
    data = make_synthetic()
    made = []

    def fit(self, real, teachers, ctx):
        made.append(ctx.ipc)
        idx = torch.cat([real.train.indices_of(c)[torch.arange(ctx.ipc) % 24] for c in range(real.num_classes)])
        self.synthetic_ = SyntheticSet(real.train.images[idx], real.train.labels[idx])
        return self

    METHODS.register("nocheck")(_method(fit))
    with pytest.raises(DataError, match=r"^ipc 30 is larger than the smallest class \('class0' has 24 training "):
        distill(data, DistillConfig(method="nocheck", ipc=30), DatasetConfig(name="synthetic"))
    assert made == []  # refused before the fit
    beyond = _method(fit)
    beyond.ipc_within_class_size = False
    METHODS.register("beyond")(beyond)
    ds = distill(data, DistillConfig(method="beyond", ipc=30), DatasetConfig(name="synthetic"))
    assert made == [30] and ds.manifest["class_counts"] == [30] * 4
    assert all(METHODS.get(m).ipc_within_class_size for m in METHODS.list() if m not in ("beyond",))



def test_an_edited_plugin_model_is_a_new_student_expert_recipe_and_set(tmp_path, monkeypatch, registries):
    """A plugin model used as the evaluation's student, as MTT's experts or named in a method's options
    entered those keys by name only: cached evaluations, expert buffers and sets made with the old code
    were reused after an edit. Its source now enters them; ddkit's own models keep their keys."""
    from ddkit.evaluate import ProtocolConfig, resolve_protocol
    from ddkit.methods.trajectory import ExpertConfig
    from ddkit.models.registry import model_config_hash

    data = make_synthetic()
    builtin = resolve_protocol("dc-protocol", {"student": "tiny_convnet"})
    assert "student_source" not in builtin.identity()
    assert model_config_hash(ExpertConfig(model="tiny_convnet")) == config_hash(ExpertConfig(model="tiny_convnet"))
    with_builtin = DistillConfig(method="mtt", ipc=2, options={"buffer": {"model": "tiny_convnet"}})
    payloads = []
    import ddkit.pipeline as pipeline

    monkeypatch.setattr(pipeline, "config_hash", lambda key: payloads.append(key) or config_hash(key))
    distill_hash(with_builtin, data, None)
    assert "model_sources" not in payloads[-1]

    _plugin(tmp_path, monkeypatch, "stunet", NET.format(key="stu_net"))
    proto, experts = ProtocolConfig(student="stu_net"), ExpertConfig(model="stu_net")
    mtt = DistillConfig(method="mtt", ipc=2, options={"buffer": {"model": "stu_net"}})
    before = (proto.hash, model_config_hash(experts), distill_hash(mtt, data, None))
    assert proto.identity()["student_source"] == _sha(tmp_path / "stunet.py")
    assert payloads[-1]["model_sources"] == {"stu_net": _sha(tmp_path / "stunet.py")}
    assert before[1] != config_hash(experts)
    _plugin(tmp_path, monkeypatch, "stunet", NET.format(key="stu_net").replace("HIDDEN = 8", "HIDDEN = 16"))
    after = (proto.hash, model_config_hash(experts), distill_hash(mtt, data, None))
    assert all(a != b for a, b in zip(before, after))


def test_a_plugin_model_given_a_value_it_cannot_take_is_one_line(tmp_path, monkeypatch, registries, caplog):
    """A user's factory that raises TypeError/ValueError on an option's value is a DDKitError naming the model, its
    options and the exception (the traceback logged at INFO, which -v shows); one of ddkit's own is not wrapped."""
    def my_mlp(in_channels, num_classes, image_size, width=16):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, width),
                             nn.Linear(width, num_classes))

    MODELS.add("my_mlp_w", my_mlp)
    with caplog.at_level(logging.INFO, logger="ddkit.models.registry"), pytest.raises(
            DDKitError, match=r"^model 'my_mlp_w' cannot be built with options \{'width': 'x'\} \(TypeError: .*\); "
                              r"check their values \(model_options / student_options; -v shows the traceback\)$"):
        create_model("my_mlp_w", 1, 3, 8, width="x")
    assert "building model 'my_mlp_w' failed" in caplog.text and "Traceback" in caplog.text

    def my_checked(in_channels, num_classes, image_size, width=16):  # QA 23b F6: a message of several lines
        raise ValueError(f"width must be positive\n  got: {width}")

    MODELS.add("my_checked", my_checked)
    with pytest.raises(DDKitError) as exc:
        create_model("my_checked", 1, 3, 8, width=0)
    assert str(exc.value) == ("model 'my_checked' cannot be built with options {'width': 0} (ValueError: width must be "
                              "positive); check their values (model_options / student_options; -v shows the traceback)")
    monkeypatch.setattr(my_mlp, "__module__", "ddkit.models.fake")  # ddkit's own: a TypeError is a bug, kept
    with pytest.raises(TypeError):
        create_model("my_mlp_w", 1, 3, 8, width="x")


def test_a_partial_plugin_model_is_identified_by_the_arguments_it_binds(tmp_path, monkeypatch, registries, caplog):
    """A functools.partial of a plugin's class or function was identified by that definition's source alone:
    registered again under its key with other bound arguments (a notebook, another process), it reused the
    teachers, sets and evaluations of the old arguments. They now enter its identity (teacher, expert recipe,
    student protocol, set); ddkit's own partials (convnet3-w32, tv_resnet18) keep their keys."""
    from functools import partial

    from ddkit.evaluate import ProtocolConfig
    from ddkit.methods.trajectory import ExpertConfig
    from ddkit.models.registry import model_config_hash, model_source
    from ddkit.registry import bound_arguments, source_sha256
    from ddkit.teacher import TeacherConfig
    from ddkit.teacher.squeeze import teacher_hash

    # the values the base code (c0c0211) computes for ddkit's own partials
    assert [teacher_hash(TeacherConfig(model=m)) for m in ("convnet3-w32", "tv_resnet18", "tiny_convnet")] == [
        "1069d514be96d88b", "82df8601efb54366", "d99de0aabf289a6c"]
    assert [ProtocolConfig(student=m).hash for m in ("convnet3-w32", "tv_resnet18")] == [
        "1ab9abf8133bc46f", "df2120d22f852022"]
    assert model_source("convnet3-w32") == {"module": "ddkit.models.convnet.convnet"}

    mod = _plugin(tmp_path, monkeypatch, "partnet", NET.format(key="part_base"))
    file_sha = _sha(tmp_path / "partnet.py")
    data = make_synthetic()
    mtt = DistillConfig(method="mtt", ipc=2, options={"buffer": {"model": "part_net"}})

    def keys():
        return (teacher_hash(TeacherConfig(model="part_net")), model_config_hash(ExpertConfig(model="part_net")),
                ProtocolConfig(student="part_net").hash, distill_hash(mtt, data, None))

    MODELS.add("part_net", partial(mod.Net, hidden=8))
    narrow = keys()
    del MODELS._entries["part_net"]  # the same key, other bound arguments: a notebook cell edited, a new process
    MODELS.add("part_net", partial(mod.Net, hidden=16))
    wide = keys()
    assert all(a != b for a, b in zip(narrow, wide))
    del MODELS._entries["part_net"]
    MODELS.add("part_net", partial(mod.Net, hidden=8))
    assert keys() == narrow  # stable: the same arguments are the same model again
    assert source_sha256(partial(mod.Net)) == source_sha256(mod.Net) == file_sha  # nothing bound: the source's
    assert model_source("part_net")["source_sha256"] == hashlib.sha256(json.dumps(
        {"source_sha256": file_sha, "bound": {"args": [], "keywords": {"hidden": 8}}}, sort_keys=True,
        separators=(",", ":")).encode()).hexdigest()
    # classes and functions by name, other values by repr; an object whose repr holds a memory address
    # (another text in every process) by its type, with a warning
    assert bound_arguments(partial(mod.Net, 3, act=torch.nn.ReLU, dtype=torch.float16, sizes=(1, 2))) == {
        "args": [3], "keywords": {"act": {"def": "torch.nn.modules.activation.ReLU"},
                                  "dtype": {"repr": "torch.float16"}, "sizes": [1, 2]}}
    with caplog.at_level("WARNING", logger="ddkit"):
        MODELS.add("part_obj", partial(mod.Net, hidden=object()))
        first = model_source("part_obj")["source_sha256"]
    assert caplog.text.count("binds a <builtins.object object>, whose repr holds a memory address") == 1
    del MODELS._entries["part_obj"]
    MODELS.add("part_obj", partial(mod.Net, hidden=object()))
    assert model_source("part_obj")["source_sha256"] == first  # the same in every process


def test_a_partial_binding_an_object_is_warned_about_where_it_is_used(tmp_path, monkeypatch, registries, caplog):
    """QA 22c F9: the warning of a partial that binds an object with a memory address in its repr was given at its
    registration, so every command of a process importing the plugin printed it (`ddkit list`, a teacher of another
    model). It is given once, where the identity of what the partial makes is taken."""
    from functools import partial

    from ddkit.models.registry import model_source

    mod = _plugin(tmp_path, monkeypatch, "objnet", NET.format(key="obj_base"))
    with caplog.at_level("WARNING", logger="ddkit"):
        MODELS.add("obj_net", partial(mod.Net, hidden=object()))
        MODELS.add("obj_net8", partial(mod.Net, hidden=8))
        model_source("obj_net8")
        assert caplog.text == ""
        sha = model_source("obj_net")["source_sha256"]
        assert model_source("obj_net")["source_sha256"] == sha
    assert [r.getMessage() for r in caplog.records] == [
        "functools.partial(objnet.Net, ...) binds a <builtins.object object>, whose repr holds a memory address: it "
        "enters the identity of what the partial makes as its type only, and a change of it is not tracked; bind "
        "numbers, strings, lists or dicts instead (the settings the object is made from)"]


def test_a_method_that_ignores_ipc_is_treated_as_full_is(registries):
    """The pipeline asked `method == "full"` where it meant "makes no ipc images per class": a plugin
    method declaring uses_ipc = False was refused ipc as full is, got its ipc checked against the class
    sizes and had its set recorded with an ipc. It now reads the class attribute."""

    @METHODS.register("everything")
    class Everything(Method):
        uses_ipc = uses_seed = resumable = False

        @dataclass
        class Config(Checked):
            pass

        def fit(self, real, teachers, ctx):
            self.synthetic_ = SyntheticSet(real.train.images.clone(), real.train.labels.clone())
            return self

    with pytest.raises(ConfigError, match=r"^ipc 3 does not apply to method 'everything', which makes no ipc images "
                                          r"per class; remove ipc"):
        DistillConfig(method="everything", ipc=3)
    data = make_synthetic()
    ds = distill(data, DistillConfig(method="everything", ipc=None), DatasetConfig(name="synthetic"))
    assert ds.ipc is None and len(ds) == len(data.train)


def test_a_plugin_is_hashed_as_loaded_not_as_edited_since(tmp_path, monkeypatch, registries):
    """The sha was read from the file at every key: an edit during a long run labelled what the old,
    loaded code made with the new code's hash, so the next run (new code) reused it. The source is read
    once, at registration; a reload (or the next process) reads it again."""
    from ddkit.models.registry import model_source
    from ddkit.registry import source_sha256

    mod = _plugin(tmp_path, monkeypatch, "loadednet", NET.format(key="loaded_net"))
    loaded = _sha(tmp_path / "loadednet.py")
    (tmp_path / "loadednet.py").write_text(NET.format(key="loaded_net").replace("HIDDEN = 8", "HIDDEN = 16"))
    assert source_sha256(mod.loaded_net) == model_source("loaded_net")["source_sha256"] == loaded
    _plugin(tmp_path, monkeypatch, "loadednet", NET.format(key="loaded_net").replace("HIDDEN = 8", "HIDDEN = 16"))
    assert model_source("loaded_net")["source_sha256"] == _sha(tmp_path / "loadednet.py") != loaded


def test_protocol_hash_and_full_reference_of_a_plugin_student(tmp_path, monkeypatch, registries, caplog):
    """The full-data reference was keyed by the student's name: after an edit of a plugin student its
    stale accuracy was reused. A student no registry knows (its plugin not imported) hashes without its
    source, with a warning saying so."""
    import ddkit.evaluate.runner as runner
    from ddkit.evaluate import ProtocolConfig

    data = make_synthetic()
    with caplog.at_level("WARNING", logger="ddkit"):
        ProtocolConfig(student="later_net").identity()
    assert "student 'later_net' is not a registered model" in caplog.text and "DDKIT_PLUGINS" in caplog.text
    keys = []
    monkeypatch.setattr(runner, "_train_student", lambda *a, **k: 0.5)
    monkeypatch.setattr(runner, "cache_dir_of", lambda *a: tmp_path)
    real_hash = runner.config_hash
    monkeypatch.setattr(runner, "config_hash", lambda key: keys.append(key) or real_hash(key))
    for hidden in ("HIDDEN = 8", "HIDDEN = 16"):
        _plugin(tmp_path, monkeypatch, "laternet", NET.format(key="later_net").replace("HIDDEN = 8", hidden))
        protocol = ProtocolConfig(student="later_net", full_epochs=1)
        runner.full_reference(data, protocol, [0], "cpu", tmp_path)
    assert [k["student_source"] for k in keys] == [keys[0]["student_source"], _sha(tmp_path / "laternet.py")]
    assert keys[0]["student_source"] != keys[1]["student_source"]
    runner.full_reference(data, ProtocolConfig(student="tiny_convnet", full_epochs=1), [0], "cpu", tmp_path)
    assert "student_source" not in keys[-1]


def test_a_plugin_model_a_method_defaults_to_is_part_of_the_set_identity(tmp_path, monkeypatch, registries):
    """Only the options as given were scanned for plugin models: a method whose Config defaults to a
    plugin model of another file did not see that model's edits."""
    data = make_synthetic()
    _plugin(tmp_path, monkeypatch, "defnet", NET.format(key="def_net"))

    @dataclass
    class UsesNet(Checked):
        net: str = "def_net"

    METHODS.add("usesnet", _method(lambda self, real, teachers, ctx: self, UsesNet))
    before = distill_hash(DistillConfig(method="usesnet", ipc=2), data, None)
    _plugin(tmp_path, monkeypatch, "defnet", NET.format(key="def_net").replace("HIDDEN = 8", "HIDDEN = 16"))
    assert distill_hash(DistillConfig(method="usesnet", ipc=2), data, None) != before


HELPED = '''
from dataclasses import dataclass

import numpy as np
from torch import nn

from ddkit.config import Checked
from ddkit.methods import METHODS, Method, SyntheticSet
from ddkit.models import MODELS

from . import losses
from .consts import HIDDEN


@METHODS.register("helped")
class Helped(Method):
    """The images OFFSET.. of every class, OFFSET from a helper module."""

    @dataclass
    class Config(Checked):
        pass

    def fit(self, real, teachers, ctx):
        lo = losses.offset()
        idx = [i for c in range(real.num_classes) for i in real.train.indices_of(c)[lo:lo + ctx.ipc].tolist()]
        self.synthetic_ = SyntheticSet(real.train.images[idx].clone(), real.train.labels[idx].clone(),
                                       meta={"source_index": idx, "np": int(np.int64(1))})
        return self


def helped_net(in_channels, num_classes, image_size):  # only hashed here, never built
    return nn.Linear(HIDDEN, num_classes)


MODELS.add("helped_net", helped_net)
'''

LOSSES = '''
import math

from helpplug import consts


def offset():
    from helpplug import plug  # back to the plugin: a cycle, which the hash must end

    return consts.OFFSET + 0 * math.floor(len(plug.__name__))
'''


HELPED_FILES = {"__init__": "", "plug": HELPED, "losses": LOSSES, "consts": "OFFSET = 0\nHIDDEN = 8\n"}


def _package(tmp_path, monkeypatch, request, name: str, files: dict[str, str]):
    """Write package ``name`` of ``files`` (module name -> source) under ``tmp_path`` and import its ``plug``; the
    package leaves sys.modules after the test."""
    pkg = tmp_path / name
    pkg.mkdir()
    for module, text in files.items():
        (pkg / f"{module}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    request.addfinalizer(lambda: [sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] == name])
    importlib.invalidate_caches()
    return pkg, importlib.import_module(f"{name}.plug")


def test_an_edited_helper_module_of_a_plugin_is_an_edited_plugin(tmp_path, monkeypatch, registries, request):
    """The identity of a plugin hashed its defining file only: an edit of a helper module of the user's
    own that the plugin imports (here through a relative import, and a helper's own import) reused the
    sets and teachers of the old code. Its own imported modules now count, transitively and in name
    order; the standard library, installed packages (numpy, torch) and ddkit do not."""
    from ddkit.registry import source_deps, source_record, source_sha256
    from ddkit.teacher import TeacherConfig
    from ddkit.teacher.squeeze import teacher_hash

    pkg, plug = _package(tmp_path, monkeypatch, request, "helpplug", HELPED_FILES)

    def expected() -> str:
        lines = [_sha(pkg / "plug.py"), *(f"helpplug{'' if n == '__init__' else '.' + n} {_sha(pkg / f'{n}.py')}"
                                         for n in ("__init__", "consts", "losses"))]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    deps = ["helpplug", "helpplug.consts", "helpplug.losses"]
    assert source_deps(plug.Helped) == source_deps(plug.helped_net) == deps  # not numpy, torch, math or ddkit
    assert source_sha256(plug.Helped) == source_sha256(plug.helped_net) == expected() != _sha(pkg / "plug.py")
    assert source_record(plug.Helped) == {"source_sha256": expected(), "source_deps": deps}
    data, cfg = make_synthetic(), DistillConfig(method="helped", ipc=2)
    ds = distill(data, cfg, DatasetConfig(name="synthetic"), tmp_path / "set")
    man = json.loads((tmp_path / "set/manifest.json").read_text())
    assert man["method"] == {"name": "helped", "config": {}, "module": "helpplug.plug.Helped",
                             "source_sha256": expected(), "source_deps": deps}
    assert ds.manifest["source_index"] == [0, 1, 24, 25, 48, 49, 72, 73]
    before = (distill_hash(cfg, data, None), teacher_hash(TeacherConfig(model="helped_net")), expected())

    (pkg / "consts.py").write_text("OFFSET = 5\nHIDDEN = 8\n")  # the plugin's own file is untouched
    importlib.invalidate_caches()
    for name in ("consts", "losses", "plug"):  # as the next process imports them
        importlib.reload(sys.modules[f"helpplug.{name}"])
    plug = sys.modules["helpplug.plug"]
    assert source_sha256(METHODS.get("helped")) == source_sha256(MODELS.get("helped_net")) == expected() != before[2]
    after = (distill_hash(cfg, data, None), teacher_hash(TeacherConfig(model="helped_net")))
    assert after[0] != before[0] and after[1] != before[1]
    ds = distill(data, cfg, DatasetConfig(name="synthetic"), tmp_path / "set2")
    assert ds.manifest["source_index"] == [5, 6, 29, 30, 53, 54, 77, 78]


def test_a_helper_module_reloaded_alone_is_read_again(tmp_path, monkeypatch, registries, request):
    """The hash was read once per definition: reloading an edited helper module (importlib.reload, IPython's
    autoreload) changes the code the plugin runs but not its class, so `ddkit.run` reused the old code's set.
    A reload reads it again; an edit without one (the old code still runs) does not."""
    from ddkit.registry import source_sha256

    pkg, plug = _package(tmp_path, monkeypatch, request, "helpplug", HELPED_FILES)
    data, cfg = make_synthetic(), DistillConfig(method="helped", ipc=2)
    sha, key = source_sha256(plug.Helped), distill_hash(cfg, data, None)
    importlib.reload(sys.modules["helpplug.consts"])  # reloaded unchanged: the same hash
    assert source_sha256(plug.Helped) == sha and distill_hash(cfg, data, None) == key
    (pkg / "consts.py").write_text("OFFSET = 5\nHIDDEN = 8\n")
    assert source_sha256(plug.Helped) == sha  # edited, not reloaded: the old code runs, under the old hash
    importlib.invalidate_caches()
    importlib.reload(sys.modules["helpplug.consts"])  # the plugin's class is the same object
    assert METHODS.get("helped") is plug.Helped
    assert source_sha256(plug.Helped) != sha and distill_hash(cfg, data, None) != key
    assert distill(data, cfg, DatasetConfig(name="synthetic")).manifest["source_index"] == [5, 6, 29, 30, 53, 54, 77,
                                                                                           78]


def test_a_helper_reloaded_whose_names_were_taken_keeps_the_hash_of_the_code_that_runs(tmp_path, monkeypatch,
                                                                                      registries, request):
    """A plugin that took a name from its helper (`from .consts import WIDTH`) keeps the old object after the helper
    is reloaded: old and new code mixed, so a hash of its own. The new code's hash would file what the mix makes
    for the next process to reuse; the old hash would reuse, in this process, what the old code made. Reloading
    the plugin's module too gives the new code's hash."""
    from ddkit.registry import source_sha256

    plug_text = "from .consts import WIDTH\n\n\ndef width_net(in_channels, num_classes, image_size):\n" \
                "    return WIDTH\n"
    pkg, plug = _package(tmp_path, monkeypatch, request, "takeplug",
                         {"__init__": "", "plug": plug_text, "consts": "WIDTH = 8\n"})
    sha = source_sha256(plug.width_net)
    (pkg / "consts.py").write_text("WIDTH = 16\n")
    importlib.invalidate_caches()
    importlib.reload(sys.modules["takeplug.consts"])
    mixed = source_sha256(plug.width_net)  # the old width_net, the helper's new module: neither old nor new code
    assert plug.width_net(1, 2, 3) == 8 and mixed != sha
    plug = importlib.reload(plug)
    assert plug.width_net(1, 2, 3) == 16 and source_sha256(plug.width_net) not in (sha, mixed)  # what a fresh
    # process gives


def test_a_plugin_without_own_imports_keeps_its_file_sha(tmp_path, monkeypatch, registries):
    """Only a plugin that imports modules of the user's own hashes more than its file: one importing the
    standard library, installed packages and ddkit alone keeps the sha256 of its file (its cached sets and
    teachers stay valid), and its manifests record no source_deps."""
    from ddkit.registry import source_deps, source_record

    imports = "import json\nimport numpy\nimport torch.nn\nimport ddkit.config\nfrom ddkit.methods import common\n"
    mod = _plugin(tmp_path, monkeypatch, "plainplug", imports + NET.format(key="plain_net"))
    assert source_deps(mod.plain_net) == []
    assert source_record(mod.plain_net) == {"source_sha256": _sha(tmp_path / "plainplug.py")}


def test_bound_arguments_of_a_partial_are_the_same_in_every_process():
    """A partial binding a set hashed its repr, whose order changes with PYTHONHASHSEED: every process gave the
    plugin model another identity (nothing reused, torchrun ranks disagreeing)."""
    import subprocess
    import sys

    code = ("import functools, json; from ddkit.registry import bound_arguments; "
            "print(json.dumps(bound_arguments(functools.partial(max, tags={'alpha', 'beta', 'gamma', 'delta'}, "
            "frozen=frozenset({3, 1, 2}), keyed={1: 'a', 0: 'b'})), sort_keys=True))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3", "4")}
    assert len(outs) == 1
    assert json.loads(outs.pop())["keywords"] == {
        "tags": {"set": ["alpha", "beta", "delta", "gamma"]}, "frozen": {"set": [1, 2, 3]},
        "keyed": {"items": [[1, "a"], [0, "b"]]}}


def test_a_users_partial_of_a_ddkit_model_is_identified_by_what_it_binds(registries):
    """A user's `partial(convnet, width=8)` registered again under its key with width=16 kept its teacher key
    (ddkit's function has no plugin source), reusing the narrow teacher; ddkit's own registrations keep theirs."""
    from functools import partial

    from ddkit.models.convnet import convnet
    from ddkit.models.registry import model_source
    from ddkit.registry import OwnPartial
    from ddkit.teacher import TeacherConfig
    from ddkit.teacher.squeeze import teacher_hash

    assert isinstance(MODELS.get("convnet3-w32"), OwnPartial) and model_source("convnet3-w32") == {
        "module": "ddkit.models.convnet.convnet"}
    keys = []
    for width in (8, 16, 8):
        MODELS._entries.pop("my_conv", None)
        MODELS.add("my_conv", partial(convnet, depth=2, width=width))
        keys.append(teacher_hash(TeacherConfig(model="my_conv")))
    assert keys[0] != keys[1] and keys[0] == keys[2]
    assert model_source("my_conv")["source_sha256"] == hashlib.sha256(json.dumps(
        {"def": "ddkit.models.convnet.convnet", "bound": {"args": [], "keywords": {"depth": 2, "width": 8}}},
        sort_keys=True, separators=(",", ":")).encode()).hexdigest()


BIG = '''
from dataclasses import dataclass

import torch

from ddkit.config import Checked
from ddkit.methods import METHODS, Method, SyntheticSet


@METHODS.register("bigipc")
class Big(Method):
    """ipc copies of every class's first image: more than a class holds."""

    ipc_within_class_size = False

    @dataclass
    class Config(Checked):
        pass

    def fit(self, real, teachers, ctx):
        idx = [int(real.train.indices_of(c)[0]) for c in range(real.num_classes) for _ in range(ctx.ipc)]
        self.synthetic_ = SyntheticSet(real.train.images[idx].clone(), real.train.labels[idx].clone())
        return self
'''


def test_a_random_baseline_larger_than_a_class_is_refused(tmp_path, monkeypatch, registries):
    """A method allowed more images per class than the data holds (ipc_within_class_size = False): the random
    subset beside its set held the whole class (24 images), fewer than the set's 30, under the name "random
    ipc=30". evaluate and run refuse it, naming the class and the fix; without the baseline the set evaluates."""
    import ddkit.evaluate.runner as runner
    from ddkit.evaluate import evaluate, resolve_protocol

    _plugin(tmp_path, monkeypatch, "bigplug", BIG)
    data = make_synthetic()
    ds = distill(data, DistillConfig(method="bigipc", ipc=30), DatasetConfig(name="synthetic"), tmp_path / "big")
    protocol = resolve_protocol("dc-protocol", {"student": "tiny_convnet", "full_reference": False,
                                                "train": {"epochs": 1, "batch_size": 32}})
    sizes = []
    monkeypatch.setattr(runner, "_train_student", lambda *a, **k: sizes.append(len(a[0])) or 0.5)
    with pytest.raises(DDKitError, match=r"^the random baseline beside an ipc-30 set needs 30 training images per "
                       r"class, but class 'class0' has 24, .*random_baseline: false \(--set random_baseline=false\)"):
        evaluate(ds, protocol, [0], data=data, cache_dir=tmp_path / "c")
    assert sizes == []  # refused before any student trains
    rep = evaluate(ds, resolve_protocol(protocol, {"random_baseline": False}), [0], data=data)
    assert sizes == [120] and "random" not in rep["results"]
    cfg = from_dict(RunConfig, {
        "dataset": {"name": "synthetic"}, "teacher": None, "distill": {"method": "bigipc", "ipc": 30},
        "evaluate": {"overrides": {"student": "tiny_convnet", "full_reference": False}, "seeds": [0]},
        "device": "cpu", "out": str(tmp_path / "run")})
    with pytest.raises(DDKitError, match=r"class 'class0' has 24.*\(evaluate.overrides.random_baseline: false\)"):
        run(cfg)
    assert not (tmp_path / "run" / "distilled").exists()  # before any stage


def test_bench_runs_a_method_larger_than_a_class_without_its_random_baseline(tmp_path, monkeypatch, registries):
    """`ddkit bench` refused a method with ipc_within_class_size = False at any ipc above a class's size, even
    with random_baseline: false, which `ddkit run` and `ddkit evaluate` accept. It now refuses only the random
    baseline beside such a set (before any output), as run does."""
    from ddkit.bench import BenchConfig, run_bench

    _plugin(tmp_path, monkeypatch, "bigplug", BIG)
    monkeypatch.setenv("DDKIT_CACHE", str(tmp_path / "cache"))
    bench = {"datasets": ["synthetic"], "methods": ["bigipc"], "ipcs": [30], "students": ["tiny_convnet"],
             "label_modes": ["hard"], "seeds": [0], "protocol": "dc-protocol", "device": "cpu",
             "overrides": {"full_reference": False, "random_baseline": False,
                           "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}}}
    rows = run_bench(from_dict(BenchConfig, {**bench, "out": str(tmp_path / "b")}))
    assert [(r["method"], r["ipc"], r["random"]) for r in rows] == [("bigipc", 30, None)]
    assert rows[0]["bytes"]["images"] == 4 * 30 * 16 * 16  # 120 one-byte images: more than the 96 the data holds
    on = {**bench, "out": str(tmp_path / "on"), "overrides": {**bench["overrides"], "random_baseline": True}}
    with pytest.raises(DDKitError, match=r"^the random baseline beside an ipc-30 set needs 30 training images per "
                       r"class, but class 'class0' has 24, .*\(overrides.random_baseline: false\)"):
        run_bench(from_dict(BenchConfig, on))
    assert not (tmp_path / "on").exists()  # before any output
    # turned on by an ipc_overrides entry (overrides says false already): the fix names that entry
    at_ipc = {**bench, "out": str(tmp_path / "at"), "ipc_overrides": {30: {"random_baseline": True}}}
    with pytest.raises(DDKitError, match=r"^the random baseline beside an ipc-30 set .*set random_baseline: false "
                       r"\(ipc_overrides: \{30: \{random_baseline: false\}\}\) to evaluate the set without it$"):
        run_bench(from_dict(BenchConfig, at_ipc))
    assert not (tmp_path / "at").exists()


def _firsts(make=lambda images, labels, k: SyntheticSet(images, labels), count=lambda c, ipc: ipc, **attrs):
    """A one-pass deterministic method keeping the first ``count(class, ipc)`` training images of every class, whose
    output is ``make(images, labels, num_classes)``; ``attrs``: more class attributes."""

    def fit(self, real, teachers, ctx):
        idx = torch.cat([real.train.indices_of(c)[: count(c, ctx.ipc)] for c in range(real.num_classes)])
        self.synthetic_ = make(real.train.images[idx].clone(), real.train.labels[idx].clone(), real.num_classes)
        return self

    return type("First", (_method(fit),), {"uses_seed": False, "resumable": False, **attrs})


def _own_soft(soft_of):
    """:func:`_firsts` with the soft labels ``soft_of(labels, classes)``."""
    return _firsts(lambda images, labels, k: SyntheticSet(images, labels, soft_of(labels, k)))


def test_a_methods_soft_labels_of_the_wrong_shape_or_dtype_are_refused_before_anything_is_written(tmp_path,
                                                                                                   registries):
    """Soft labels of [N, classes + 1] from a method were saved and `distill` reported success; every load then
    refused the set, telling the user to re-run with --soft-labels, which they never gave."""
    from safetensors.torch import save_file

    import ddkit

    data = make_synthetic()
    METHODS.register("widesoft")(_own_soft(lambda y, k: torch.zeros(len(y), k + 1)))
    METHODS.register("f64soft")(_own_soft(lambda y, k: torch.zeros(len(y), k, dtype=torch.float64)))
    METHODS.register("goodsoft")(_own_soft(lambda y, k: torch.nn.functional.one_hot(y, k).float() * 5))
    for name, message in (
            ("widesoft", "the soft labels method 'widesoft' made have shape [8, 5], expected [8, 4] (one row of "
                         "logits per image, one column per class of 4); this is a bug in the method"),
            ("f64soft", "the soft labels method 'f64soft' made are float64, expected float32 logits; convert them "
                        "with .float() in the method")):
        with pytest.raises(DDKitError) as err:
            distill(data, DistillConfig(method=name, ipc=2), DatasetConfig(name="synthetic"), tmp_path / name)
        assert str(err.value) == message
        assert list(tmp_path.iterdir()) == []
    ds = distill(data, DistillConfig(method="goodsoft", ipc=2), DatasetConfig(name="synthetic"), tmp_path / "good")
    assert ds.soft_labels.tolist()[0] == [5.0, 0.0, 0.0, 0.0]
    save_file({"logits": torch.zeros(8, 5)}, str(tmp_path / "good/soft_labels.safetensors"))  # damaged later
    with pytest.raises(DDKitError) as err:
        ddkit.load(tmp_path / "good")
    assert str(err.value).endswith("have shape [8, 5] but the set has 8 images of 4 classes; re-create the distilled "
                                   "set (method 'goodsoft' made them)")


def _one_hot5(labels, classes):
    return torch.nn.functional.one_hot(labels, classes).float() * 5


def test_a_methods_own_soft_labels_are_never_replaced_by_the_teachers_and_declared_serve_label_mode_stored(
        tmp_path, registries):
    """A plugin method making its own soft labels: `ddkit run` refused label mode stored ("set
    distill.soft_labels: true"), and that fix silently replaced the method's labels with the teacher's logits.
    Undeclared, they are now refused under distill.soft_labels (nothing saved) and the contract names the
    hook; declared (own_soft_labels, "always" here), run evaluates them in mode stored as DATM's."""
    from ddkit import testing
    from ddkit.bench import BenchConfig
    from ddkit.teacher import TeacherConfig, train_teacher
    from ddkit.training import TrainConfig

    data = make_synthetic()
    teacher = train_teacher(data, TeacherConfig(model="tiny_convnet", train=TrainConfig(epochs=1, batch_size=32)))
    METHODS.register("ownsoft")(_own_soft(_one_hot5))
    with pytest.raises(ConfigError) as err:
        distill(data, DistillConfig(method="ownsoft", ipc=2, soft_labels=True), DatasetConfig(name="synthetic"),
                tmp_path / "set", teacher)
    assert str(err.value) == (
        "method 'ownsoft' made soft labels of its own, and distill.soft_labels (--soft-labels) would overwrite them "
        "with the teacher's logits; drop --soft-labels / distill.soft_labels: true to keep them (label mode stored "
        "trains with them), and declare them in the method's class (classmethod own_soft_labels), which ddkit run "
        "and bench read before the fit")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(testing.ContractError, match=r"^method 'ownsoft' made soft labels, but its class does not "
                                                    r"declare them: override the classmethod own_soft_labels"):
        testing.check_output("ownsoft", data, teacher, tmp_path / "check")

    declared = type("Declared", (_own_soft(_one_hot5),), {"own_soft_labels": classmethod(lambda cls, cfg: "always")})
    METHODS.register("declaredsoft")(declared)
    testing.check_output("declaredsoft", data, teacher, tmp_path / "check2")
    with pytest.raises(ConfigError) as err:
        distill(data, DistillConfig(method="declaredsoft", ipc=2, soft_labels=True), DatasetConfig(name="synthetic"),
                tmp_path / "set", teacher)
    assert str(err.value) == ("method 'declaredsoft' labels its images itself (always), and distill.soft_labels "
                              "(--soft-labels) would overwrite them with the teacher's logits; drop --soft-labels / "
                              "distill.soft_labels: true")
    with pytest.raises(ConfigError, match=r"methods \['declaredsoft'\] label their images themselves \(declaredsoft: "
                                          r"always\), and their soft_labels: true would overwrite that with the "
                                          r"teacher's logits; drop soft_labels: true on them$"):
        from_dict(BenchConfig, {"datasets": ["synthetic"], "methods": [{"name": "declaredsoft", "soft_labels": True}],
                                "ipcs": [1], "students": ["tiny_convnet"], "out": str(tmp_path / "bench")})
    base = {"dataset": {"name": "synthetic"}, "teacher": {"model": "tiny_convnet", "train": {"epochs": 1}},
            "evaluate": {"protocol": "soft-kl", "label_modes": ["stored"], "seeds": [0], "overrides": {
                "student": "tiny_convnet", "train": {"epochs": 1}, "full_reference": False,
                "random_baseline": False}}, "device": "cpu"}
    with pytest.raises(ConfigError, match=r"^evaluate label mode 'stored' needs soft labels in the set, and method "
                                          r"'ownsoft' declares none of its own with these options; set "
                                          r"distill.soft_labels: true"):
        run({**base, "distill": {"method": "ownsoft", "ipc": 2}, "out": str(tmp_path / "run1")})
    run({**base, "distill": {"method": "declaredsoft", "ipc": 2}, "out": str(tmp_path / "run")})
    report = json.loads((tmp_path / "run/eval-stored.json").read_text())
    assert report["config"]["label_mode"] == "stored"
    soft = ddkit_load(tmp_path / "run/distilled").soft_labels
    assert soft.tolist()[:2] == [[5.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]]  # the method's, not the teacher's


def ddkit_load(path):
    import ddkit

    return ddkit.load(path)


def test_a_helper_module_named_like_a_standard_library_module_is_the_users_own(tmp_path, monkeypatch, registries):
    """A helper of the plugin's own whose name is also a standard-library module's (trace.py, test.py) was taken
    for the standard library by its name and not hashed: its edits reused the sets of the old code. Where its
    file is decides now; the standard library's own modules (json, math) stay out."""
    from ddkit.registry import _is_own, _locate, source_deps

    assert "tabnanny" in sys.stdlib_module_names
    # the user's tabnanny.py is imported, not the standard library's; sys.modules as it was after the test
    monkeypatch.setitem(sys.modules, "tabnanny", sys.modules.get("tabnanny"))
    monkeypatch.delitem(sys.modules, "tabnanny")
    (tmp_path / "tabnanny.py").write_text("OFFSET = 0\n")
    plugin = PICK.format(key="stdname").replace("from ddkit.config", "import json\nimport math\n\nimport tabnanny\n"
                                                                        "from ddkit.config")
    mod = _plugin(tmp_path, monkeypatch, "stdnameplug", plugin.replace("OFFSET = 0", "OFFSET = tabnanny.OFFSET"))
    assert source_deps(mod.Pick) == ["tabnanny"]
    assert not any(_is_own(n, _locate(n)[0]) for n in ("json", "math", "os"))
    data, cfg = make_synthetic(), DistillConfig(method="stdname", ipc=2)
    before = distill_hash(cfg, data, None)
    (tmp_path / "tabnanny.py").write_text("OFFSET = 5\n")
    importlib.reload(sys.modules["tabnanny"])
    _plugin(tmp_path, monkeypatch, "stdnameplug", plugin.replace("OFFSET = 0", "OFFSET = tabnanny.OFFSET"))
    assert distill_hash(cfg, data, None) != before
    assert distill(data, cfg, DatasetConfig(name="synthetic")).manifest["source_index"] == [5, 6, 29, 30, 53, 54, 77,
                                                                                           78]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_methods_images_of_another_dtype_than_uint8_or_float32_are_refused(tmp_path, registries, dtype):
    """float64 images from a method were stored as float64 and counted at 8 bytes a pixel in every table (and
    bench row) beside built-in methods' float32 sets, although check_method refuses them."""
    data = make_synthetic()
    METHODS.register("otherdtype")(_firsts(lambda images, labels, k: SyntheticSet(images.to(dtype) / 255, labels)))
    for image_dtype in ("float32", "uint8"):
        with pytest.raises(DDKitError) as err:
            distill(data, DistillConfig(method="otherdtype", ipc=2, image_dtype=image_dtype),
                    DatasetConfig(name="synthetic"), tmp_path / "set")
        assert str(err.value) == (f"method 'otherdtype' produced {str(dtype).removeprefix('torch.')} images; a set "
                                  "holds uint8 0..255 or float32 0..1 pixels: convert them with .float() in the method")
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("meta", "message"), [
    ({"final_loss": float("nan"), "ok": 1}, "method 'badmeta' put nan in synthetic_.meta['final_loss']; meta is saved "
                                            "as JSON, which holds no NaN or infinity: record it as None or a str"),
    ({"losses": [0.5, float("-inf")]}, "method 'badmeta' put -inf in synthetic_.meta['losses'][1]; meta is saved as "
                                       "JSON, which holds no NaN or infinity: record it as None or a str"),
    ({3: "intkey"}, "method 'badmeta' put the key 3 (int) in synthetic_.meta; meta is saved as JSON, whose keys are "
                    "str: use '3'"),
    ({"per_class": {0: 1.0}}, "method 'badmeta' put the key 0 (int) in synthetic_.meta['per_class']; meta is saved "
                              "as JSON, whose keys are str: use '0'"),
])
def test_a_nan_or_a_key_that_is_no_str_in_meta_is_refused_before_anything_is_written(tmp_path, registries, meta,
                                                                                       message):
    """A NaN in meta was written (and `ddkit show --json` then called the set damaged, advising to re-create it,
    which wrote the NaN again); an int key silently became a str."""
    METHODS.register("badmeta")(_firsts(lambda images, labels, k: SyntheticSet(images, labels, meta=meta)))
    with pytest.raises(DDKitError) as err:
        distill(make_synthetic(), DistillConfig(method="badmeta", ipc=1), DatasetConfig(name="synthetic"),
                tmp_path / "set")
    assert str(err.value) == message
    assert list(tmp_path.iterdir()) == []


def test_a_set_without_an_ipc_that_is_not_every_image_says_its_random_baseline_is_skipped(registries, caplog):
    """A method with uses_ipc = False (a fixed budget, unbalanced classes) was evaluated without the random
    baseline its protocol asks for, and nothing said why."""
    import ddkit

    data = make_synthetic()
    METHODS.register("unbalanced")(_firsts(count=lambda c, ipc: 3 if c == 0 else 1, uses_ipc=False))
    protocol = {"student": "tiny_convnet", "train": {"epochs": 1, "batch_size": 32}, "full_reference": False}
    said = ("the unbalanced set holds 6 of the 96 training images without an ipc (its method sets uses_ipc = False), "
            "so no random subset is evaluated beside it (random_baseline skipped)")
    for method, warned in (("unbalanced", True), ("full", False)):  # full: every image, no subset to draw
        ds = distill(data, DistillConfig(method=method, ipc=None), DatasetConfig(name="synthetic"))
        with caplog.at_level("WARNING", logger="ddkit"):
            caplog.clear()
            report = ddkit.evaluate(ds, protocol, [0], data=data)
        assert "random" not in report["results"]
        assert (said in caplog.text) is warned


def test_a_method_drawing_from_torchs_global_generator_makes_the_same_set_for_the_same_seed(tmp_path, registries):
    """README said torch's global generator is reseeded while a stage runs, but a method's fit was not: one drawing
    torch.rand without a generator gave other bytes on every run. fit now runs with the global generators seeded
    with the distill seed (the caller's state back after), in check_method too."""
    from ddkit import testing

    def fit(self, real, teachers, ctx):
        labels = torch.arange(real.num_classes).repeat_interleave(ctx.ipc)
        self.synthetic_ = SyntheticSet(torch.rand(len(labels), *real.image_shape), labels)
        return self

    METHODS.register("globalnoise")(type("G", (_method(fit),), {"resumable": False, "uses_teacher": False}))
    data = make_synthetic()

    def images(seed: int, caller: int) -> torch.Tensor:
        torch.manual_seed(caller)  # whatever the caller's generator holds
        got = distill(data, DistillConfig(method="globalnoise", ipc=1, seed=seed), DatasetConfig(name="synthetic"))
        assert torch.equal(torch.rand(3), torch.manual_seed(caller) and torch.rand(3))  # the caller's state is back
        return got.images

    assert torch.equal(images(0, 1), images(0, 2))
    assert not torch.equal(images(0, 1), images(1, 1))
    testing.check_output("globalnoise", data, work_dir=tmp_path)  # same seed, same bytes (distill and fit alone)


def test_only_a_users_method_fits_holding_the_global_generators(registries):
    """Seeding every fit under the global generators' lock made distils of ddkit's own methods in several threads
    run one after another, and a fit handing a stage to a worker thread wait forever (QA 19a F4). ddkit's own
    methods (which draw from generators of their own) fit without it; a user's method still holds it for its span."""
    import threading

    from ddkit import determinism
    from ddkit.methods.base import FitContext, fit_seeded

    data = make_synthetic()
    seen = {}

    def fit(self, real, teachers, ctx):
        seen["held"] = determinism._GLOBAL_RNG._is_owned()
        labels = torch.arange(real.num_classes).repeat_interleave(ctx.ipc)
        self.synthetic_ = SyntheticSet(real.train.images[:len(labels)].float() / 255, labels)
        return self

    METHODS.register("heldfit")(type("H", (_method(fit),), {"resumable": False, "uses_teacher": False}))
    release, holding = threading.Event(), threading.Event()

    def hold():
        with determinism.global_rng(0):
            holding.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(30)
        ctx = FitContext(ipc=1, seed=0)
        done = []
        own = threading.Thread(target=lambda: done.append(fit_seeded(METHODS.get("random")(
            METHODS.get("random").Config()), data, [], ctx)))
        own.start()
        own.join(30)
        assert done and not own.is_alive()  # ddkit's own method: not waiting for the other thread's generators
        users = threading.Thread(target=lambda: done.append(fit_seeded(METHODS.get("heldfit")(
            METHODS.get("heldfit").Config()), data, [], ctx)))
        users.start()
        users.join(0.5)
        assert users.is_alive() and len(done) == 1  # a user's method waits for them
    finally:
        release.set()
        holder.join(30)
    users.join(30)
    assert len(done) == 2 and seen["held"] is True


def test_a_method_without_a_docstring_is_not_described_by_the_base_classs(registries, capsys):
    """`ddkit show` and `ddkit list methods -l` described a user method without a docstring with ddkit's Method
    docstring ("Base class of a distillation method: ...")."""
    from ddkit.cli import main
    from ddkit.describe import describe_method, doc_summary

    METHODS.register("nodoc")(_method(lambda self, real, teachers, ctx: self))
    assert describe_method("nodoc").splitlines()[0] == (
        "method nodoc (test_plugins.M): no description (add a docstring to its class)")
    assert main(["list", "methods", "-l"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("nodoc")]
    assert listed == ["nodoc"]
    assert doc_summary(METHODS.get("dm")).startswith("Distribution Matching (Zhao & Bilen")  # ddkit's own: as before


def test_check_method_names_smoke_options_where_a_method_refuses_the_checks_teacher(registries):
    """check_method on a recover method of one's own failed on the checker's own BatchNorm-less teacher, naming
    neither the class attribute smoke_options nor check_method's teacher= argument, the ways out."""
    from ddkit import testing
    from ddkit.methods.statistics import RecoverConfig, RecoverMethod, recover

    @dataclass
    class RecCfg(RecoverConfig):
        pass

    class MyRecover(RecoverMethod):
        """A recover method of one's own (as sre2l's)."""

        Config = RecCfg
        needs_teacher = True
        resumable = False

        def fit(self, real, teachers, ctx):
            self.synthetic_ = recover("myrecover", self.cfg, real, teachers, ctx)
            return self

    METHODS.register("myrecover")(MyRecover)
    data = make_synthetic()
    teacher = testing.tiny_teacher(data)
    with pytest.raises(testing.ContractError) as err:
        testing.check_output("myrecover", data, teacher)
    message = str(err.value)
    assert message.startswith("method 'myrecover' refuses the check's run with its smoke_options {} (tiny data, and "
                              "check_method's own tiny_convnet teacher, without BatchNorm, unless teacher= is given): "
                              "method 'myrecover' with stats: bn needs teachers with BatchNorm layers")
    assert message.endswith("; set the class attribute smoke_options to options that run there in seconds (e.g. "
                            "{'stats': 'conv', 'iterations': 4}, as sre2l's), or pass check_method a data= / teacher= "
                            "it can use") and "\n" not in message
    MyRecover.smoke_options = {"stats": "conv", "iterations": 2}
    testing.check_output("myrecover", data, teacher)
