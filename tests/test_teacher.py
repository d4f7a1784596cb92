import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from ddkit.data.base import DataBundle, DatasetConfig, make_synthetic
from ddkit.errors import DDKitError
from ddkit.teacher import Teacher, TeacherConfig, train_teacher
from ddkit.training import TrainConfig


def _cfg(**kw):
    if "checkpoint" not in kw:  # an import takes no training recipe (TeacherConfig refuses one)
        kw.setdefault("train", TrainConfig(epochs=8, batch_size=32, lr=0.05, schedule="cosine"))
    return TeacherConfig(model="tiny_convnet", **kw)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "teacher"
    train_teacher(make_synthetic(), _cfg(), out)
    return out


def test_teacher_artifact(teacher_dir, tiny):
    names = sorted(p.name for p in teacher_dir.iterdir())
    assert names == ["manifest.json", "model.safetensors"]
    assert not any(p.name.startswith(".") for p in teacher_dir.parent.iterdir())  # resume state removed
    man = json.loads((teacher_dir / "manifest.json").read_text())
    assert man["kind"] == "teacher" and man["seed"] == 0
    assert man["dataset"]["classes"] == tiny.classes and man["dataset"]["fingerprint"] == tiny.fingerprint
    assert man["model"] == {"name": "tiny_convnet", "options": {}, "input_shape": [1, 16, 16],
                            "module": "ddkit.models.convnet.convnet"}  # where its factory is (tiny: a partial of it)
    assert man["test_accuracy"] >= 0.85
    assert man["config"]["train"]["epochs"] == 8
    t = Teacher.load(teacher_dir)
    from ddkit.training import accuracy

    assert accuracy(t.model, tiny.test, t.mean, t.std, "cpu") == pytest.approx(man["test_accuracy"])


def test_class_mismatch_errors(teacher_dir, tiny):
    t = Teacher.load(teacher_dir)
    t.check_compatible(tiny)
    five = make_synthetic(num_classes=5)
    with pytest.raises(DDKitError, match=f"teacher '{teacher_dir}' has 4 classes but dataset 'synthetic' has 5"):
        t.check_compatible(five)
    swapped = DataBundle("synthetic", tiny.train, tiny.test, ["class1", "class0", "class2", "class3"],
                         tiny.mean, tiny.std)
    with pytest.raises(DDKitError, match=r"class order differs .* at index 0 \('class0' vs 'class1'\)"):
        t.check_compatible(swapped)
    big = make_synthetic(image_size=20)
    with pytest.raises(DDKitError, match=r"teacher '.*' expects images \[1, 16, 16\]"):
        t.check_compatible(big)
    # other names: no order fits, so the order hint ("pass dataset.classes ...") would fail when followed
    renamed = DataBundle("synthetic", tiny.train, tiny.test, ["x", "class1", "class2", "class3"], tiny.mean, tiny.std)
    with pytest.raises(DDKitError,
                       match=r"teacher '.*' classes \['class0', 'class1', 'class2', 'class3'\] differ from dataset "
                             r"'synthetic''s \['x', .*\]; use a teacher trained on this data"):
        t.check_compatible(renamed)
    # colour for a grayscale teacher: the size hint would not help either
    rgb = make_synthetic(channels=3)
    with pytest.raises(DDKitError,
                       match="teacher '.*' expects 1-channel images but dataset 'synthetic' has 3-channel ones"):
        t.check_compatible(rgb)


def test_class_order_advice_fits_the_source(teacher_dir, tiny, tmp_path):
    """Only imagefolder re-orders its classes by dataset.classes; the other sources only check it, so
    advising it there led to a second error."""
    from PIL import Image

    from ddkit.data import load_dataset

    t = Teacher.load(teacher_dir)
    order = ["class1", "class0", "class2", "class3"]
    head = f"teacher '{teacher_dir}' class order differs from dataset '{{}}' at index 0 ('class0' vs 'class1'); "
    for split, part in (("train", tiny.train), ("test", tiny.test)):
        for c in range(4):
            for i in part.indices_of(c)[:2].tolist():
                path = tmp_path / "folder" / split / f"class{c}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(part.images[i, 0].numpy()).save(path)
    folder = load_dataset("imagefolder", path=str(tmp_path / "folder"), classes=order)
    with pytest.raises(DDKitError) as err:
        t.check_compatible(folder)
    assert str(err.value) == head.format("imagefolder") + "pass dataset.classes in the teacher's order"
    t.check_compatible(load_dataset("imagefolder", path=str(tmp_path / "folder")))  # the advice, followed, works
    torch.save({"train_images": tiny.train.images, "train_labels": tiny.train.labels, "test_images": tiny.test.images,
                "test_labels": tiny.test.labels, "classes": order}, tmp_path / "d.pt")
    for data in (load_dataset("tensors", path=str(tmp_path / "d.pt")),
                 DataBundle("imagefolder", tiny.train, tiny.test, order, tiny.mean, tiny.std)):  # built by hand
        with pytest.raises(DDKitError) as err:
            t.check_compatible(data)
        assert str(err.value) == head.format(data.name) + ("re-order the labels and 'classes' in the data, or train a "
                                                           "teacher on this data")


def test_damaged_teacher_manifest_is_a_one_line_error(teacher_dir, tmp_path):
    import shutil

    for damage, key in ((lambda m: m.pop("model"), "model.name"),
                        (lambda m: m["model"].update(options=3), "model.options"),
                        (lambda m: m["dataset"].pop("classes"), "dataset.classes")):
        t = tmp_path / key
        shutil.copytree(teacher_dir, t)
        man = json.loads((t / "manifest.json").read_text())
        damage(man)
        (t / "manifest.json").write_text(json.dumps(man))
        with pytest.raises(DDKitError, match=f"lacks '{key}' .*re-create the teacher artifact"):
            Teacher.load(t)
    # a model this ddkit cannot build, or class names that are not names, are damage too (not "did you mean")
    for name, damage, message in [
        ("model", lambda m: m["model"].update(name="nonexist"),
         r"holds a model this ddkit cannot build \(unknown model 'nonexist'.*\); a model of your own: import the "
         r"module that registers it first \(the CLI imports those named in DDKIT_PLUGINS\); else the manifest is "
         r"damaged or from another ddkit: re-create the teacher artifact$"),
        ("classes", lambda m: m["dataset"].update(classes=[1, 2, 3, 4]), r"holds dataset.classes \[1, 2, 3, 4\], not a "
                                                                         r"list of class names"),
    ]:
        t = tmp_path / f"bad-{name}"
        shutil.copytree(teacher_dir, t)
        man = json.loads((t / "manifest.json").read_text())
        damage(man)
        (t / "manifest.json").write_text(json.dumps(man))
        with pytest.raises(DDKitError, match=message):
            Teacher.load(t)


def test_teacher_manifest_without_weights_sha_or_input_shape_is_refused(teacher_dir, tmp_path):
    """An empty ``model.input_shape`` used to raise IndexError and a missing ``weights_sha`` KeyError
    (in relabel, distill --soft-labels and evaluate), after the teacher had loaded."""
    good = json.loads((teacher_dir / "manifest.json").read_text())
    for name, damage, msg in [
        ("sha", lambda m: m.pop("weights_sha"), "lacks 'weights_sha' .*re-create the teacher artifact"),
        ("sha-type", lambda m: m.update(weights_sha=5), "lacks 'weights_sha' .*re-create the teacher artifact"),
        ("empty", lambda m: m["model"].update(input_shape=[]), r"holds model.input_shape \[\], not \[channels, height, "
                                                                 r"width\]; .*re-create the teacher artifact"),
        ("text", lambda m: m["model"].update(input_shape=["1", 16, 16]), r"holds model.input_shape \['1', 16, 16\]"),
        # a zero std (every normalised pixel inf) or one value per channel too many used to load
        ("std0", lambda m: m["dataset"].update(std=[0.0]), r"holds dataset.std \[0.0\], not one positive number per "
                                                           r"image channel \(1\); .*re-create the teacher artifact"),
        ("mean2", lambda m: m["dataset"].update(mean=[0.5, 0.5]), r"holds dataset.mean \[0.5, 0.5\], not one finite"),
    ]:
        t = tmp_path / name
        shutil.copytree(teacher_dir, t)
        man = json.loads(json.dumps(good))
        damage(man)
        (t / "manifest.json").write_text(json.dumps(man))
        with pytest.raises(DDKitError, match=msg):
            Teacher.load(t)


def test_teacher_weights_that_are_not_the_manifests_are_refused(teacher_dir, tmp_path):
    """The fingerprint keys every cache, store and reuse check; a teacher whose weights file was replaced,
    or whose weights_sha was edited, loaded under the old identity."""
    from ddkit.artifacts import load_tensors

    swapped = tmp_path / "swapped"
    shutil.copytree(teacher_dir, swapped)
    state = load_tensors(teacher_dir / "model.safetensors", what="teacher weights")
    save_file({k: v * 0.5 if v.is_floating_point() else v for k, v in state.items()}, swapped / "model.safetensors")
    edited = tmp_path / "edited"
    shutil.copytree(teacher_dir, edited)
    man = json.loads((edited / "manifest.json").read_text())
    (edited / "manifest.json").write_text(json.dumps({**man, "weights_sha": "0" * 16}))
    for t, sha in ((swapped, man["weights_sha"]), (edited, "0" * 16)):
        with pytest.raises(DDKitError, match=rf"^'{t}/model.safetensors' does not hold the weights its manifest names "
                                             rf"\(weights_sha {sha}\); the teacher artifact is damaged: re-create it$"):
            Teacher.load(t)
    assert Teacher.load(teacher_dir).fingerprint == man["weights_sha"]


def test_teacher_record_names_the_folder_absolutely(teacher_dir, monkeypatch):
    """Sets and reports recorded a teacher never saved as the string 'None', and a relative folder as given."""
    t = Teacher.load(teacher_dir)
    monkeypatch.chdir(teacher_dir.parent)
    assert Teacher.load("teacher").record() == {"path": str(teacher_dir), "weights_sha": t.fingerprint}
    assert Teacher(t.model, t.manifest).record() == {"path": None, "weights_sha": t.fingerprint}


def test_teacher_loads_from_its_manifest_path(teacher_dir):
    """`read_manifest` maps `.../manifest.json` to its folder; the weights are read from there too."""
    t = Teacher.load(teacher_dir / "manifest.json")
    assert t.path == teacher_dir and t.fingerprint == Teacher.load(teacher_dir).fingerprint


def test_import_checkpoint(teacher_dir, tiny, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(teacher_dir / "model.safetensors"))
    pt = tmp_path / "ck.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, pt)
    imported = train_teacher(tiny, _cfg(checkpoint=str(pt)), tmp_path / "imp")
    assert (imported.test_accuracy
            == pytest.approx(json.loads((teacher_dir / "manifest.json").read_text())["test_accuracy"]))
    # wrong architecture: strict load fails with a one-line explanation, nothing written
    bad = dict(state)
    bad.pop(next(iter(bad)))
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(DDKitError, match="does not fit model 'tiny_convnet' \\(missing"):
        train_teacher(tiny, _cfg(checkpoint=str(tmp_path / "bad.safetensors")), tmp_path / "bad-out")
    assert not (tmp_path / "bad-out").exists()
    with pytest.raises(DDKitError, match="does not fit model 'tiny_mlp'"):
        train_teacher(tiny, TeacherConfig(model="tiny_mlp", checkpoint=str(pt)), tmp_path / "x")
    # a DDP-saved safetensors file (keys prefixed `module.`) imports like the .pt one
    ddp = tmp_path / "ddp.safetensors"
    save_file({f"module.{k}": v for k, v in state.items()}, str(ddp))
    assert train_teacher(tiny, _cfg(checkpoint=str(ddp))).fingerprint == imported.fingerprint
    # a folder is named as one (a teacher folder as a teacher, which needs no import), not as "not found"
    with pytest.raises(DDKitError, match="is a ddkit teacher folder, which needs no import; pass it as --teacher"):
        train_teacher(tiny, _cfg(checkpoint=str(teacher_dir)), tmp_path / "y")
    with pytest.raises(DDKitError, match="is a folder; give the weights file in it"):
        train_teacher(tiny, _cfg(checkpoint=str(tmp_path)), tmp_path / "y")
    with pytest.raises(DDKitError, match="not found; check --checkpoint \\(teacher.checkpoint in a config\\)"):
        train_teacher(tiny, _cfg(checkpoint=str(tmp_path / "nope.pt")), tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_an_imported_checkpoint_is_read_once_after_its_check(teacher_dir, tiny, tmp_path, monkeypatch):
    """check_teacher (the pre-flight of run and bench) read the checkpoint, and the import read it again."""
    from safetensors.torch import load_file

    import ddkit.teacher.squeeze as squeeze
    from ddkit.teacher import check_teacher

    shutil.copy(teacher_dir / "model.safetensors", tmp_path / "ck.safetensors")
    cfg = _cfg(checkpoint=str(tmp_path / "ck.safetensors"))
    reads, read = [], squeeze._read_checkpoint_file
    monkeypatch.setattr(squeeze, "_read_checkpoint_file", lambda path: reads.append(path) or read(path))
    check_teacher(cfg, tiny)
    once = train_teacher(tiny, cfg, tmp_path / "imp")
    assert len(reads) == 1 and squeeze._CHECKED == {}  # the import took what the check read
    assert train_teacher(tiny, cfg).fingerprint == once.fingerprint and len(reads) == 2  # no check: read again
    check_teacher(cfg, tiny)
    save_file({k: v + 1 for k, v in load_file(str(cfg.checkpoint)).items()}, str(cfg.checkpoint))  # changed since
    assert train_teacher(tiny, cfg).fingerprint != once.fingerprint and len(reads) == 4


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unsafe_pickle_checkpoint_refused(tiny, tmp_path):
    pt = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, pt)
    with pytest.raises(DDKitError, match=r"cannot be read safely \(it holds Python objects that safe \(weights_only\) "
                                         r"loading refuses\); save a plain state_dict or safetensors file$"):
        train_teacher(tiny, _cfg(checkpoint=str(pt)))


def test_resume_after_interruption_matches(tiny, tmp_path):
    out = tmp_path / "t"
    cfg = _cfg(train=TrainConfig(epochs=4, batch_size=32, lr=0.05))
    calls = {"n": 0}

    def killer(epoch, total, record):
        calls["n"] += 1
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_teacher(tiny, cfg, out, progress=killer)
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if ".resume-" in p.name]
    assert len(leftovers) == 1
    resumed = train_teacher(tiny, cfg, out)
    straight = train_teacher(tiny, cfg, tmp_path / "straight")
    assert [h["epoch"] for h in resumed.manifest["history"]] == [1, 2, 3, 4]
    assert resumed.fingerprint == straight.fingerprint
    assert not any(".resume-" in p.name for p in tmp_path.iterdir())
    # a teacher with other settings trained into the same place discards an interrupted one's checkpoint,
    # which it cannot resume (it stayed for good)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(tiny, cfg, tmp_path / "other", progress=killer)
    train_teacher(tiny, dataclasses.replace(cfg, seed=1), tmp_path / "other")
    assert not any(".resume-" in p.name for p in tmp_path.iterdir())


def test_a_second_teacher_to_the_same_out_is_refused_at_once(tiny, tmp_path):
    """Two teachers trained into one --out at once: the last save won, while the first reported a folder
    that held the other's teacher. The second refuses at once, as a second distill does, and writes nothing."""
    from ddkit.artifacts import OutputBusy

    out = tmp_path / "t"
    cfg = _cfg(train=TrainConfig(epochs=2, batch_size=32, lr=0.05))
    refused = []

    def second(epoch, total, record):
        if epoch == 1:  # another call, from this one's progress, while the first trains
            with pytest.raises(OutputBusy) as info:
                train_teacher(tiny, dataclasses.replace(cfg, seed=1), out)
            refused.append(str(info.value))

    first = train_teacher(tiny, cfg, out, progress=second)
    assert refused == [f"another ddkit call (in this process or another) is writing {str(out)!r}; wait for it or "
                       "choose another --out"]
    assert Teacher.load(out).fingerprint == first.fingerprint and first.manifest["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no lock folder or checkpoint left
    (tmp_path / ".t.work").mkdir()  # the lock folder of a killed run goes with the next one
    train_teacher(tiny, cfg, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_distill_hash_follows_extra_teachers_weights_not_paths(tmp_path):
    from ddkit.pipeline import DistillConfig, distill_hash

    data = make_synthetic()
    pool = tmp_path / "pool"
    cfg = DistillConfig(method="sre2l", ipc=1, options={"extra_teachers": [str(pool)]})
    hashes = []
    for seed in (3, 4):  # the pool teacher retrained in place with another seed
        train_teacher(data, _cfg(seed=seed, train=TrainConfig(epochs=1, batch_size=32)), pool)
        hashes.append(distill_hash(cfg, data, None))
    assert hashes[0] != hashes[1]
    assert distill_hash(cfg, data, None) == hashes[1]
    # the same teacher elsewhere (a moved or copied bench folder) keys the same set; it used to re-make it
    shutil.copytree(pool, tmp_path / "moved")
    moved = DistillConfig(method="sre2l", ipc=1, options={"extra_teachers": [str(tmp_path / "moved")]})
    assert distill_hash(moved, data, None) == hashes[1]
    assert moved.options == {"extra_teachers": [str(tmp_path / "moved")]}  # the config is left alone
    # the same pixels under another normalisation (a tensors file's stored mean/std) are another set
    renormed = dataclasses.replace(data, mean=(0.25,) * len(data.mean))
    assert renormed.fingerprint == data.fingerprint and distill_hash(cfg, renormed, None) != hashes[1]


def test_checkpoint_with_non_string_keys_is_a_one_line_error(tiny, tmp_path):
    """A dict keyed by integers used to crash on ``k.removeprefix`` with an AttributeError."""
    pt = tmp_path / "ints.pt"
    torch.save({0: torch.zeros(3)}, pt)
    with pytest.raises(DDKitError, match="is not a state_dict \\(parameter names to tensors\\)"):
        train_teacher(tiny, _cfg(checkpoint=str(pt)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_with_nan_or_integer_weights_is_refused(teacher_dir, tiny, tmp_path):
    """Both used to import silently: a teacher of NaN logits at chance accuracy, or of weights cast from integers."""
    from safetensors.torch import load_file

    state = load_file(str(teacher_dir / "model.safetensors"))
    key = next(k for k, v in state.items() if v.is_floating_point())
    for name, value, message in (("nan", torch.full_like(state[key], float("nan")), "NaN or infinite values in"),
                                 ("long", state[key].long(), "wants floating point weights")):
        pt = tmp_path / f"{name}.pt"
        torch.save({**state, key: value}, pt)
        with pytest.raises(DDKitError, match=message):
            train_teacher(tiny, _cfg(checkpoint=str(pt)), tmp_path / name)
        assert not (tmp_path / name).exists()
    assert train_teacher(tiny, _cfg(checkpoint=str(teacher_dir / "model.safetensors"))).test_accuracy is not None


def test_damaged_resume_checkpoint_is_a_one_line_error(tiny, tmp_path):
    """A resume checkpoint damaged on disk (truncated) or not a ddkit one crashed the next run with
    torch's traceback; it is a one-line error naming the file and the fix."""
    from ddkit.methods.base import FitContext
    from ddkit.methods.common import Checkpoint

    out = tmp_path / "t"
    cfg = _cfg(train=TrainConfig(epochs=4, batch_size=32, lr=0.05))

    def killer(epoch, total, record):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_teacher(tiny, cfg, out, progress=killer)
    (state,) = [p for p in tmp_path.iterdir() if ".resume-" in p.name]
    state.write_bytes(state.read_bytes()[:500])
    with pytest.raises(DDKitError, match=r"^resume checkpoint '.*\.resume-\w+\.pt' cannot be read \(.+\); delete it to "
                                         r"start afresh$"):
        train_teacher(tiny, cfg, out)
    torch.save({"model": {}}, state)  # readable, but not this training's state
    with pytest.raises(DDKitError, match=r"does not hold this training's state \(KeyError: 'optimizer'\)|does not hold "
                                         r"this training's state \(RuntimeError"):
        train_teacher(tiny, cfg, out)
    state.unlink()
    assert train_teacher(tiny, cfg, out).manifest["history"][-1]["epoch"] == 4
    ckpt = Checkpoint(FitContext(ipc=1, seed=0, work_dir=tmp_path / "w"), 1, tag="dm")
    ckpt.path.parent.mkdir()
    torch.save([1, 2], ckpt.path)
    with pytest.raises(DDKitError,
                       match=r"^resume checkpoint '.*dm\.pt' holds a list, not a ddkit checkpoint; delete it"):
        ckpt.load()
    ckpt.path.write_bytes(b"\x80\x04K\x01.")  # a plain pickle
    with pytest.raises(DDKitError, match=r"dm\.pt' cannot be read .*; delete it to start afresh$"):
        ckpt.load()


def test_a_teacher_whose_model_breaks_the_contract_is_not_called_damaged(teacher_dir, monkeypatch):
    """A teacher of a user's model that no longer keeps the contract was reported as a damaged manifest
    to re-create, which fails the same way: the model's code is at fault, and the message says so."""
    import ddkit.teacher.squeeze as squeeze
    from ddkit.models.registry import ContractError

    def broken(name, *a, **k):
        raise ContractError(f"model {name!r} does not keep ddkit's model contract: it has no embed(x) method; rule")

    monkeypatch.setattr(squeeze, "create_model", broken)
    with pytest.raises(DDKitError) as err:
        Teacher.load(teacher_dir)
    assert str(err.value) == (f"teacher {str(teacher_dir)!r}: model 'tiny_convnet' does not keep ddkit's "
                              "model contract: it has no embed(x) method; rule")


def test_a_forged_teacher_manifest_is_refused_before_its_model_is_built(teacher_dir, tmp_path, monkeypatch):
    """A manifest naming a vast model (images of 10^5 x 10^5 px: an 80 GB head; 10^6 class names) made ddkit
    allocate and initialise it before reading the weights. The names, shapes and dtypes in the weights file's
    header are compared first with the manifest's model built on the meta device: the model is never built."""
    import ddkit.teacher.squeeze as squeeze

    built = []
    create = squeeze.create_model
    monkeypatch.setattr(squeeze, "create_model", lambda *a, **k: built.append(a) or create(*a, **k))
    good = json.loads((teacher_dir / "manifest.json").read_text())
    weights = "the teacher artifact is damaged: re-create it"
    for name, change, problem in [
        ("huge", {"model": {**good["model"], "input_shape": [1, 100000, 100000]}},
         "'classifier.weight' is F32 [4, 128], the model's F32 [4, 5000000000]"),
        ("classes", {"dataset": {**good["dataset"], "classes": [f"c{i}" for i in range(10**6)]}},
         "'classifier.weight' is F32 [4, 128], the model's F32 [1000000, 128]"),
        ("other", {"model": {**good["model"], "name": "tiny_mlp"}},
         "missing ['fc1.bias', 'fc1.weight']; unexpected ['features.0.bias', 'features.0.weight', "
         "'features.1.bias']...; 'classifier.weight' is F32 [4, 128], the model's F32 [4, 32]"),
    ]:
        t = tmp_path / name
        shutil.copytree(teacher_dir, t)
        (t / "manifest.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(DDKitError) as err:
            Teacher.load(t)
        assert str(err.value) == (f"teacher weights '{t}/model.safetensors' do not match its manifest's model "
                                  f"{change.get('model', good['model'])['name']!r} ({problem}); {weights}")
    from ddkit.artifacts import load_tensors

    retyped = tmp_path / "retyped"
    shutil.copytree(teacher_dir, retyped)
    held = load_tensors(teacher_dir / "model.safetensors")
    save_file({k: v.double() if v.is_floating_point() else v for k, v in held.items()}, retyped / "model.safetensors")
    with pytest.raises(DDKitError, match=r"do not match its manifest's model 'tiny_convnet' \('features.0.weight' is "
                                         r"F64 \[8, 1, 3, 3\], the model's F32 \[8, 1, 3, 3\]\)"):
        Teacher.load(retyped)
    assert built == []
    assert Teacher.load(teacher_dir).fingerprint == good["weights_sha"] and len(built) == 1


def test_a_model_that_cannot_be_allocated_is_a_damaged_manifest(teacher_dir, monkeypatch):
    """A model whose factory cannot run on the meta device is built for real, unchecked: running out of
    memory there (RuntimeError, MemoryError) was a traceback."""
    import ddkit.teacher.squeeze as squeeze

    monkeypatch.setattr(squeeze, "_meta_state", lambda *a: None)
    for exc in (RuntimeError("[enforce fail at alloc_cpu.cpp:127] you tried to allocate 14400000000 bytes"),
                MemoryError()):
        def vast(*a, exc=exc, **k):
            raise exc

        monkeypatch.setattr(squeeze, "create_model", vast)
        with pytest.raises(DDKitError) as err:
            Teacher.load(teacher_dir)
        what = f"{type(exc).__name__}: {str(exc) or type(exc).__name__}"
        assert str(err.value) == (f"'{teacher_dir}/manifest.json' holds a model this ddkit cannot build ({what}); the "
                                  "manifest is damaged: re-create the teacher artifact")


def test_a_train_config_given_to_teacher_config_is_taken_as_it_is():
    """As TeacherConfig's docstring and the README say: YAML (and from_dict) merge a teacher's train section into
    the teacher recipe, a TrainConfig object is taken with TrainConfig's own defaults; dataclasses.replace of the
    recipe gives the YAML teacher from Python."""
    from ddkit.config import from_dict

    yaml = from_dict(TeacherConfig, {"model": "tiny_convnet", "train": {"epochs": 4}})
    assert (yaml.train.augment, yaml.train.schedule, yaml.train.epochs) == ("crop_flip", "cosine", 4)
    given = TeacherConfig(model="tiny_convnet", train=TrainConfig(epochs=4))
    assert (given.train.augment, given.train.schedule) == ("none", "step")
    assert dataclasses.replace(TeacherConfig().train, epochs=4) == yaml.train


def test_teacher_and_expert_buffer_record_the_dataset_config(tmp_path, monkeypatch):
    """Teachers and expert buffers recorded the data's description (fingerprint, sizes), not the config it was
    loaded with: a stratified subset (train_per_class, test_per_class, subset_seed) or a relative path could not
    be made again from the record, as a distilled set's dataset_config can. Artifacts from before the field
    load as before, and what keys caches (weights_sha, config_hash, buffer_identity) does not depend on it."""
    from ddkit.config import from_dict, to_dict
    from ddkit.data import DatasetConfig, load_dataset, save_tensors
    from ddkit.methods.trajectory import ExpertConfig, buffer_identity, load_experts, train_experts
    from ddkit.teacher import saved_teacher

    monkeypatch.chdir(tmp_path)
    save_tensors(make_synthetic(), "data.safetensors")
    given = DatasetConfig(name="tensors", path="data.safetensors", train_per_class=6, test_per_class=4, subset_seed=3)
    data = load_dataset(given)
    recorded = {**to_dict(given), "path": str(tmp_path / "data.safetensors")}  # absolute: found from any folder
    cfg = _cfg(train=TrainConfig(epochs=1, batch_size=16, lr=0.05))
    teacher = train_teacher(data, cfg, "t")
    ecfg = ExpertConfig(model="tiny_convnet", num_experts=1, epochs=1, batch_size=16)
    buffer = train_experts(data, ecfg, tmp_path / "ex")
    for path in (tmp_path / "t", tmp_path / "ex"):
        assert json.loads((path / "manifest.json").read_text())["dataset_config"] == recorded
    # made again from their records, in another folder: the same data, weights and trajectories
    monkeypatch.chdir(tmp_path / "ex")
    again = load_dataset(from_dict(DatasetConfig, recorded, "dataset"))
    assert again.fingerprint == data.fingerprint and len(again.test) == len(data.test) == 4 * data.num_classes
    assert train_teacher(again, cfg).fingerprint == teacher.fingerprint
    assert torch.equal(train_experts(again, ecfg).trajectories[0], buffer.trajectories[0])
    # a record from before the field: loaded and reused, under the same identities
    identity = buffer_identity(tmp_path / "ex")
    for path in (tmp_path / "t", tmp_path / "ex"):
        manifest = json.loads((path / "manifest.json").read_text())
        del manifest["dataset_config"]
        (path / "manifest.json").write_text(json.dumps(manifest))
    old = saved_teacher(again, cfg, tmp_path / "t")
    assert old is not None and old.fingerprint == teacher.fingerprint
    assert old.manifest["config_hash"] == teacher.manifest["config_hash"]
    assert buffer_identity(tmp_path / "ex") == identity and load_experts(tmp_path / "ex").num_experts == 1


def test_a_teacher_edited_in_memory_gets_a_new_fingerprint(teacher_dir, tiny, tmp_path, monkeypatch):
    """Teacher.fingerprint was the manifest's weights_sha, taken once: a teacher edited in place (fine-tuned further,
    model.load_state_dict) kept it, and label mode teacher read its students from the cache of the old weights.
    It now follows the weights, hashing them again only when their tensors changed (version counters, storage)."""
    import ddkit.teacher.squeeze as squeeze
    from ddkit.evaluate import resolve_protocol
    from ddkit.evaluate.runner import random_cache_path
    from ddkit.teacher import teacher_ensemble

    hashed, real = [], squeeze.weights_sha
    monkeypatch.setattr(squeeze, "weights_sha", lambda model: hashed.append(model) or real(model))
    teacher, other = Teacher.load(teacher_dir), Teacher.load(teacher_dir)
    protocol = resolve_protocol("dc-protocol", {"student": "tiny_convnet", "label_mode": "teacher"})
    saved = teacher.fingerprint
    key = random_cache_path(protocol, tiny, teacher, None, 4, 0, tmp_path)
    hashed.clear()
    teacher.to("cpu").model.eval()
    with torch.no_grad():
        teacher(torch.zeros(2, *tiny.image_shape))  # used, not changed: read from the memo
    assert [teacher.fingerprint for _ in range(3)] == [saved] * 3 and hashed == []
    with torch.no_grad():
        next(teacher.model.parameters())[0].mul_(2)
    assert teacher.fingerprint != saved and len(hashed) == 1 and teacher.fingerprint == real(teacher.model)
    assert random_cache_path(protocol, tiny, teacher, None, 4, 0, tmp_path) != key
    assert len(hashed) == 1 and other.fingerprint == saved  # hashed once per change; another teacher is its own
    teacher.model.load_state_dict(other.model.state_dict())  # the old weights back
    assert teacher.fingerprint == saved and random_cache_path(protocol, tiny, teacher, None, 4, 0, tmp_path) == key
    assert teacher.record()["weights_sha"] == saved

    ensemble = teacher_ensemble([teacher, other])  # an ensemble follows its members' weights
    before = ensemble.fingerprint
    with torch.no_grad():
        next(other.model.parameters())[0].add_(1)
    assert ensemble.fingerprint != before and other.fingerprint != saved
    assert ensemble.fingerprint == teacher_ensemble([teacher, other]).fingerprint

    with torch.no_grad():
        next(teacher.model.parameters())[0].add_(1)
    teacher.save(tmp_path / "edited")  # the manifest names the weights saved: it loads
    assert Teacher.load(tmp_path / "edited").fingerprint == teacher.fingerprint != saved


def test_a_thread_asking_while_another_hashes_an_edited_teacher_gets_the_new_fingerprint(teacher_dir, monkeypatch):
    """Review 17c F1: the first thread to see an edit marked the weights as hashed before it had the new sha, so a
    second thread asking meanwhile was given the old one (and the cache entries of the old weights)."""
    import threading

    import ddkit.teacher.squeeze as squeeze

    teacher = Teacher.load(teacher_dir)
    old = teacher.fingerprint
    with torch.no_grad():
        next(teacher.model.parameters())[0].add_(1)
    hashing, release, real = threading.Event(), threading.Event(), squeeze.weights_sha

    def slow(model):  # the first hash waits until the second thread has asked
        hashing.set()
        release.wait(5)
        return real(model)

    monkeypatch.setattr(squeeze, "weights_sha", slow)
    seen = {}
    first = threading.Thread(target=lambda: seen.update(first=teacher.fingerprint))
    first.start()
    assert hashing.wait(5)
    second = threading.Thread(target=lambda: seen.update(second=teacher.fingerprint))
    second.start()
    second.join(0.2)  # it waits for the hash under way, not returning the old sha
    assert "second" not in seen
    release.set()
    first.join(5)
    second.join(5)
    new = real(teacher.model)
    assert new != old and seen == {"first": new, "second": new}


def test_saving_a_teacher_ensemble_is_refused_in_one_line(teacher_dir, tmp_path):
    """Review 17c F8: Teacher.save of an ensemble wrote its wrapper's weights under the first member's model, a
    folder Teacher.load then refused as damaged."""
    from ddkit.teacher import teacher_ensemble

    ensemble = teacher_ensemble([Teacher.load(teacher_dir), Teacher.load(teacher_dir)], [0.7, 0.3])
    with pytest.raises(DDKitError, match=r"cannot save a teacher ensemble as one teacher .* save each member") as e:
        ensemble.save(tmp_path / "ens")
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []


class _OwnNet(torch.nn.Module):
    """A module of the user's own, trained outside ddkit."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, classes))

    def forward(self, x):
        return self.body(x)


def test_a_teacher_of_a_users_module_needs_a_manifest_or_of_module(tiny, teacher_dir):
    """QA 18c #9: Teacher(model, {}) was accepted, then every stage failed with a raw KeyError ('weights_sha',
    'dataset'), and nothing said what the manifest must hold. The manifest is checked at construction (one line
    listing what it lacks), and Teacher.of_module(model, data) makes the teacher of a module of one's own."""
    from ddkit.pipeline import DistillConfig, distill
    from ddkit.training import teacher_forward

    torch.manual_seed(0)
    own = _OwnNet()
    with pytest.raises(DDKitError) as err:
        Teacher(own, {})
    assert str(err.value) == (
        "Teacher(model, manifest): the manifest lacks model.name, model.input_shape, model.options, dataset.classes, "
        "weights_sha, dataset.mean, dataset.std; make a teacher of a module of your own with "
        "Teacher.of_module(model, data), or load a teacher artifact with Teacher.load(DIR)")
    manifest = Teacher.load(teacher_dir).manifest
    with pytest.raises(DDKitError, match=r"^Teacher\(model, manifest\): the manifest lacks weights_sha; make "):
        Teacher(own, {k: v for k, v in manifest.items() if k != "weights_sha"})
    teacher = Teacher.of_module(own, tiny)
    assert teacher.classes == tiny.classes and teacher.manifest["model"]["input_shape"] == [1, 16, 16]
    assert teacher.manifest["model"]["name"] == "_OwnNet" and teacher.test_accuracy is None
    ds = distill(tiny, DistillConfig(method="random", ipc=1, soft_labels=True), DatasetConfig(name="synthetic"),
                 teacher=teacher)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (tiny.mean, tiny.std))
    assert torch.allclose(ds.soft_labels, teacher_forward(own, (ds.images.float() / 255 - mean) / std), atol=1e-5)
    with pytest.raises(DDKitError, match=r"^teacher gives logits \[2, 7\] for 2 images but the data has 4 classes; "):
        Teacher.of_module(_OwnNet(7), tiny)
    with pytest.raises(DDKitError) as err:
        distill(tiny, DistillConfig(method="random", ipc=1, soft_labels=True), DatasetConfig(name="synthetic"),
                teacher=own)
    assert str(err.value) == ("teacher must be a Teacher or the folder path (str or Path) of a teacher artifact, got a "
                              "module (_OwnNet); make a teacher of it with Teacher.of_module(model, data)")


def test_a_manifest_holding_a_data_bundles_tuples_makes_a_teacher(teacher_dir, tiny):
    """QA 19a F5: Teacher(model, manifest) refused dataset.mean/std and model.input_shape given as tuples (as a
    DataBundle holds them), saying the manifest lacked them. Sequences of numbers are taken (as the lists JSON saves),
    and a field of the wrong type is named as such, not as missing."""
    from ddkit.pipeline import DistillConfig, distill
    from ddkit.teacher.squeeze import teacher_ensemble

    loaded = Teacher.load(teacher_dir)
    manifest = {**loaded.manifest, "model": {**loaded.manifest["model"], "input_shape": tuple(tiny.image_shape)},
                "dataset": {**loaded.manifest["dataset"], "mean": tiny.mean, "std": tiny.std}}
    assert isinstance(tiny.mean, tuple) and isinstance(tiny.std, tuple)
    teacher = Teacher(loaded.model, manifest)
    assert teacher.manifest["model"]["input_shape"] == [1, 16, 16]
    assert teacher.manifest["dataset"]["mean"] == list(tiny.mean) and teacher.manifest["dataset"]["std"] == list(
        tiny.std)
    assert isinstance(manifest["dataset"]["mean"], tuple)  # the caller's manifest is left as it was
    assert teacher.fingerprint == loaded.fingerprint
    teacher_ensemble([teacher, loaded])  # the same image shape as a loaded teacher's list
    ds = distill(tiny, DistillConfig(method="random", ipc=1, soft_labels=True), DatasetConfig(name="synthetic"),
                 teacher=teacher)
    assert ds.soft_labels.shape == (4, 4)
    with pytest.raises(DDKitError) as err:
        Teacher(loaded.model, {**manifest, "dataset": {**manifest["dataset"], "mean": "0.5"}})
    assert str(err.value) == (
        "Teacher(model, manifest): dataset.mean must be a list of numbers, found str '0.5'; make a teacher of a module "
        "of your own with Teacher.of_module(model, data), or load a teacher artifact with Teacher.load(DIR)")


def test_of_module_checks_a_module_in_training_mode_in_eval_mode_leaving_its_statistics(tiny):
    """QA 19a F6: Teacher.of_module probed a module left in training mode (as a training loop leaves it) before
    putting it in eval mode: BatchNorm's running statistics moved toward the probe's zero images, and a module with
    auxiliary logits in training mode only was refused. The probe runs in eval mode, the module's state left alone."""
    from ddkit.teacher.squeeze import weights_sha

    class BN(_OwnNet):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.BatchNorm2d(1)

        def forward(self, x):
            return super().forward(self.norm(x))

    class Aux(_OwnNet):
        def forward(self, x):
            out = super().forward(x)
            return (out, out / 2) if self.training else out

    torch.manual_seed(0)
    own = BN()
    with torch.no_grad():  # trained: statistics away from their start
        own.norm.running_mean.fill_(0.5)
        own.norm.running_var.fill_(2.0)
    sha = weights_sha(own)
    teacher = Teacher.of_module(own, tiny)
    assert weights_sha(own) == sha and teacher.manifest["weights_sha"] == sha and not own.training
    assert float(own.norm.running_mean) == 0.5 and float(own.norm.running_var) == 2.0
    assert int(own.norm.num_batches_tracked) == 0
    aux = Aux()  # built: in training mode
    assert aux.training and not Teacher.of_module(aux, tiny).model.training
    with pytest.raises(DDKitError, match=r"^teacher gives logits \[2, 7\] for 2 images but the data has 4 classes; "):
        Teacher.of_module(_OwnNet(7).train(), tiny)
    refused = _OwnNet(7).train()
    with pytest.raises(DDKitError):
        Teacher.of_module(refused, tiny)
    assert refused.training  # a refused module is left in its mode


def test_a_teacher_of_a_module_defined_without_a_source_file_is_fingerprinted_by_its_weights(tiny, monkeypatch,
                                                                                               caplog):
    """A module class defined where no file is kept (``python -c``, a notebook) cannot enter the fingerprint: inspect
    raised OSError out of Teacher.fingerprint; its weights' sha identifies it, with a warning that edits are not
    tracked."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # as `python -c`: no __file__
    scope = {"__name__": "__main__", "torch": torch}
    exec("class Cell(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
         "        self.fc = torch.nn.Linear(256, 4)\n    def forward(self, x):\n        return self.fc(x.flatten(1))\n",
         scope)
    with caplog.at_level("WARNING", logger="ddkit"):
        teacher = Teacher.of_module(scope["Cell"](), tiny)
        assert teacher.fingerprint == teacher.manifest["weights_sha"]
    assert "cannot read the source of __main__.Cell: edits to it are not tracked" in caplog.text
