"""RDED (patch selection + stitching) and FKD-style stored per-epoch soft labels."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from ddkit.distilled import DistilledSet
from ddkit.errors import DDKitError
from ddkit.evaluate.protocol import ProtocolConfig
from ddkit.labels import SoftLabelStore, relabel, train_with_store
from ddkit.labels.fkd import FILE
from ddkit.methods import METHODS, FitContext
from ddkit.methods.random import stratified_indices
from ddkit.methods.rded import RDEDConfig, cell_sizes, crop_patches, pad_to, select_patches, stitch
from ddkit.models import create_model
from ddkit.teacher import TeacherConfig, train_teacher
from ddkit.training import TrainConfig, normalizer


@pytest.fixture(scope="module")
def data():
    from ddkit.data.base import make_synthetic

    return make_synthetic()


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    cfg = TeacherConfig(model="tiny_convnet", model_options={}, train=TrainConfig(epochs=6, batch_size=32, lr=0.05))
    return train_teacher(data, cfg, tmp_path_factory.mktemp("t") / "teacher")


def _subset(data, ipc, seed=0):
    idx = stratified_indices(data.train.labels, data.num_classes, ipc, seed)
    sub = data.train.subset(idx)
    return DistilledSet(sub.images.clone(), sub.labels.clone(), {"dataset": data.describe()})


@pytest.fixture(scope="module")
def small_set(data):
    return _subset(data, 3)  # 12 images


@pytest.fixture(scope="module")
def store(small_set, teacher):
    return relabel(small_set, teacher, epochs=3, augment="rrc_flip", cutmix_prob=0.7, seed=5, batch_size=5)


# ---------------------------------------------------------------------------------------------- RDED


def test_rded_output(data, teacher):
    for factor in (1, 2):
        cfg = RDEDConfig(mipc=12, num_crop=3, factor=factor)
        out = METHODS.get("rded")(cfg).fit(data, [teacher], FitContext(ipc=2, seed=3)).synthetic_
        assert out.images.shape == (8, *data.image_shape) and out.images.dtype == torch.float32
        assert torch.isfinite(out.images).all() and out.images.min() >= 0 and out.images.max() <= 1
        assert out.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        assert out.soft_labels.shape == (8, data.num_classes) and torch.isfinite(out.soft_labels).all()
        if factor == 1:  # one selected (realistic) patch per image: the teacher recognises it
            assert torch.equal(out.soft_labels.argmax(1), out.labels)
        assert out.meta["factor"] == factor


def test_rded_sets_evaluate_with_their_stored_labels(data, teacher, tmp_path):
    """RDED stores the teacher's logits itself: label mode stored takes them (its random subset labelled by
    the teacher), and a run or bench asking for stored labels accepts RDED without distill.soft_labels."""
    from ddkit.bench import BenchConfig
    from ddkit.config import from_dict
    from ddkit.data import DatasetConfig, load_dataset
    from ddkit.evaluate import evaluate
    from ddkit.methods.rded import RDED
    from ddkit.pipeline import DistillConfig, distill

    options = {"mipc": 12, "num_crop": 3}
    data = load_dataset(DatasetConfig(name="synthetic"))  # with its config, which the set records
    ds = distill(data, DistillConfig(method="rded", ipc=1, seed=0, options=options), teacher=teacher,
                 out=tmp_path / "set")
    assert ds.soft_labels is not None and not ds.manifest["config"]["distill"]["soft_labels"]
    protocol = ProtocolConfig(student="tiny_convnet", label_mode="stored", full_reference=False,
                              train=TrainConfig(epochs=2, batch_size=8, lr=0.05))
    report = evaluate(tmp_path / "set", protocol, seeds=[0], data=data, teacher=teacher)
    res = report["results"]
    assert set(res) == {"distilled", "random"} and res["random"]["n"] == res["distilled"]["n"] == 1
    assert 0.25 < res["distilled"]["mean"] <= 1.0 and 0.0 <= res["random"]["mean"] <= 1.0  # 4 classes
    assert RDED.stores_soft_labels(RDEDConfig()) and not RDED.stores_soft_labels(RDEDConfig(soft_labels=False))
    assert RDED.own_soft_labels(RDEDConfig()) is None  # --soft-labels (the same logits) is not a clash
    bench = {"out": str(tmp_path / "bench"), "datasets": ["synthetic"], "teacher": {"model": "tiny_convnet"},
             "students": ["tiny_convnet"], "ipcs": [1], "label_modes": ["stored"],
             "methods": [{"name": "random", "soft_labels": True}, {"name": "rded", "options": options}]}
    assert [m.name for m in from_dict(BenchConfig, bench).methods] == ["random", "rded"]
    bench["methods"][1]["options"] = {**options, "soft_labels": False}
    with pytest.raises(DDKitError, match=r"\['rded'\] store none"):
        from_dict(BenchConfig, bench)


def test_rded_needs_teacher(data):
    with pytest.raises(DDKitError, match="needs a teacher"):
        METHODS.get("rded")(RDEDConfig()).fit(data, [], FitContext(ipc=1, seed=0))


def test_rded_pool_too_small_is_a_clear_error(data, teacher, tmp_path):
    from ddkit.errors import ConfigError

    # 2 images x 2^2 patches need 8 sources per class; mipc 5 draws only 5 (the classes hold more)
    with pytest.raises(ConfigError, match=r"rded needs 8 source images per class .* but mipc is 5; raise "
                                          r"distill.options.mipc to at least 8, or lower --ipc or "
                                          r"distill.options.factor$"):
        METHODS.get("rded")(RDEDConfig(mipc=5, num_crop=2, factor=2)).fit(
            data, [teacher], FitContext(ipc=2, seed=0, work_dir=tmp_path / "w"))
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())
    # the classes hold 24 images: 7 images x 2^2 patches need 28 (the message named "ipc or factor", no key)
    counts = data.train.class_counts(data.num_classes)
    assert int(counts.min()) == 24 and data.classes[int(counts.argmin())] == "class0"
    with pytest.raises(DDKitError) as err:
        METHODS.get("rded")(RDEDConfig(mipc=30, num_crop=2, factor=2)).fit(data, [teacher], FitContext(ipc=7, seed=0))
    assert str(err.value) == ("rded needs 28 real images per class (ipc 7 x factor 2^2) but class 'class0' has 24; "
                              "lower --ipc or distill.options.factor")
    # both too small: the class size is named first (raising mipc, as the other message says, cannot help it)
    with pytest.raises(DDKitError) as err:
        METHODS.get("rded")(RDEDConfig(mipc=5, num_crop=2, factor=2)).fit(data, [teacher], FitContext(ipc=7, seed=0))
    assert str(err.value).startswith("rded needs 28 real images per class (ipc 7 x factor 2^2) but class 'class0'")
    # run by another method (init: rded), the keys are those inside its options; with factor 1 only --ipc helps
    with pytest.raises(ConfigError, match=r"but mipc is 1; raise distill.options.rded_options.mipc to at least 2, or "
                                          r"lower --ipc$"):
        METHODS.get("rded")(RDEDConfig(mipc=1, num_crop=2, factor=1)).fit(
            data, [teacher], FitContext(ipc=2, seed=0, options_key="distill.options.rded_options"))
    with pytest.raises(ConfigError,
                       match=r"rded factor 17 is larger than the image side 16; lower distill.options.factor$"):
        METHODS.get("rded")(RDEDConfig(factor=17)).fit(data, [teacher], FitContext(ipc=1, seed=0))


def test_rded_auto_factor_follows_reference_scripts():
    from ddkit.methods.rded import resolve_factor

    assert resolve_factor(None, (28, 28)) == 1 and resolve_factor(None, (32, 32)) == 1
    assert resolve_factor(None, (64, 64)) == 1 and resolve_factor(None, (128, 128)) == 2
    assert resolve_factor(3, (28, 28)) == 3


def test_selected_patches_are_the_teachers_best(data, teacher):
    """Brute force: score every crop alone, keep each image's best crop, then the best images."""
    c, m, num_crop, keep, patch, size = 2, 6, 4, 3, (8, 8), (16, 16)
    src = data.train.float_images()[data.train.labels == c][:m]
    gen = torch.Generator().manual_seed(11)
    chosen, scores = select_patches(teacher.model, src, c, num_crop, keep, patch, size, teacher.mean, teacher.std,
                                    gen, (0.08, 1.0), 5, "cpu")

    from ddkit.data.augment import RandomResizedCropFlip

    gen = torch.Generator().manual_seed(11)
    sampler = RandomResizedCropFlip(ratio=(1.0, 1.0), flip_prob=0.0)
    boxes = [sampler.sample(m, gen, size)["box"] for _ in range(num_crop)]  # boxes[j][i]: crop j of image i
    norm = normalizer(teacher.mean, teacher.std, "cpu")
    best = []
    for i in range(m):
        cands = []
        for j in range(num_crop):
            crop = crop_patches(src[i : i + 1], boxes[j][i : i + 1], patch)
            with torch.no_grad():
                logit = teacher.model(pad_to(norm(crop), size))
            cands.append((float(F.cross_entropy(logit, torch.tensor([c]))), j, crop[0]))
        best.append(min(cands, key=lambda t: (t[0], t[1])))
    best.sort(key=lambda t: t[0])
    assert torch.allclose(scores, torch.tensor([b[0] for b in best[:keep]]), atol=1e-5)
    assert torch.allclose(chosen, torch.stack([b[2] for b in best[:keep]]), atol=1e-6)
    assert scores.tolist() == sorted(scores.tolist())


def test_crops_of_one_size_are_resized_together_as_each_alone(monkeypatch):
    """RDED resized its candidate crops one interpolate call each (1,500 a class at the reference's
    settings, the bulk of its CPU time). Crops of the same size now go through one call, with the
    bytes of the one-at-a-time resize, into one output tensor (no list of crops to concatenate)."""
    from ddkit.methods import rded

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 40, 30, generator=gen)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.1, 0.2, 0.6, 0.7], [0.0, 0.0, 1.0, 1.0],
                          [0.2, 0.1, 0.5, 0.9], [0.3, 0.3, 0.31, 0.31]]).repeat(3, 1)
    boxes[12:] = torch.rand(6, 4, generator=gen).sort(1).values  # x0 <= y0 <= x1 <= y1
    alone, sizes = [], set()
    for j, box in enumerate(boxes.tolist()):
        x0, y0, x1, y1 = round(box[0] * 30), round(box[1] * 40), round(box[2] * 30), round(box[3] * 40)
        crop = images[j % 6, None, :, y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)]
        sizes.add(tuple(crop.shape[-2:]))
        alone.append(F.interpolate(crop, size=(9, 7), mode="bilinear", align_corners=False, antialias=True))
    calls, interpolate = [], F.interpolate
    monkeypatch.setattr(rded.F, "interpolate", lambda x, **kw: calls.append(len(x)) or interpolate(x, **kw))
    out = crop_patches(images, boxes, (9, 7))
    assert torch.equal(out, torch.cat(alone))
    assert len(calls) == len(sizes) < len(boxes) and sum(calls) == len(boxes)


def test_rded_soft_labels_normalise_one_forward_batch_at_a_time(data, teacher, monkeypatch):
    """The soft-label pass normalised the whole set at once (a 30 GB float copy at ImageNet IPC 50); it
    now normalises and forwards ``batch_size`` images at a time, with the same logits."""
    from ddkit.methods import rded

    seen, forward = [], rded._forward
    monkeypatch.setattr(rded, "_forward", lambda model, x, *a: seen.append(len(x)) or forward(model, x, *a))
    cfg = RDEDConfig(**{**METHODS.get("rded").smoke_options, "batch_size": 3})
    out = METHODS.get("rded")(cfg).fit(data, [teacher], FitContext(ipc=2, seed=0)).synthetic_
    with torch.no_grad():
        want = teacher.model(normalizer(teacher.mean, teacher.std, "cpu")(out.images))
    assert torch.allclose(out.soft_labels, want, atol=1e-5)
    assert seen and max(seen) <= 3  # the 8 stitched images were one call of 8


def test_stitch_geometry():
    patches = torch.arange(1.0, 5.0).view(4, 1, 1, 1).expand(4, 1, 4, 4).clone()
    out = stitch(patches, 1, 2, (8, 8))[0, 0]
    assert (out[:4, :4] == 1).all() and (out[:4, 4:] == 2).all()
    assert (out[4:, :4] == 3).all() and (out[4:, 4:] == 4).all()
    # two images: image t gets patches t, n+t, 2n+t, 3n+t (the reference's mix_images order)
    patches = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 3, 3).clone()
    out = stitch(patches, 2, 2, (6, 6))
    assert out[1, 0, 0, 0] == 1 and out[1, 0, 0, 5] == 3 and out[1, 0, 5, 0] == 5 and out[1, 0, 5, 5] == 7
    assert cell_sizes(9, 2) == [5, 4]
    odd = stitch(torch.ones(4, 1, 4, 4), 1, 2, (9, 9))
    assert odd.shape == (1, 1, 9, 9) and torch.allclose(odd, torch.ones_like(odd))


def test_rded_initial_rows_are_those_rows_of_its_set(data, teacher):
    """What another method starts from (init: rded) is the given rows of the set rded makes, in their order."""
    cfg = RDEDConfig(**METHODS.get("rded").smoke_options)
    full = METHODS.get("rded")(cfg).fit(data, [teacher], FitContext(ipc=2, seed=0)).synthetic_.images
    rows = torch.tensor([5, 0, 7, 2, 3])
    got = METHODS.get("rded")(cfg).initial_rows(data, [teacher], FitContext(ipc=2, seed=0), rows)
    assert torch.equal(got, full[rows])
    assert METHODS.get("rded")(cfg).initial_rows(data, [teacher], FitContext(ipc=2, seed=0), rows[:0]).shape == (
        0, *data.image_shape)


def test_rded_is_deterministic_and_class_seeded(data, teacher):
    cfg = RDEDConfig(**METHODS.get("rded").smoke_options)
    a = METHODS.get("rded")(cfg).fit(data, [teacher], FitContext(ipc=2, seed=0)).synthetic_
    b = METHODS.get("rded")(cfg).fit(data, [teacher], FitContext(ipc=2, seed=0)).synthetic_
    c = METHODS.get("rded")(cfg).fit(data, [teacher], FitContext(ipc=2, seed=1)).synthetic_
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)


def test_rded_does_not_resume_another_teachers_classes(data, teacher, tmp_path):
    """The teacher scores the patches: a checkpoint left by a run with teacher A (all classes done)
    must not be resumed by a run with teacher B in the same work folder."""
    other = train_teacher(data, TeacherConfig(model="tiny_convnet", model_options={}, seed=1,
                                              train=TrainConfig(epochs=2, batch_size=32, lr=0.05)), tmp_path / "other")
    assert other.fingerprint != teacher.fingerprint
    cls, cfg = METHODS.get("rded"), RDEDConfig(**METHODS.get("rded").smoke_options)
    a = cls(cfg).fit(data, [teacher], FitContext(ipc=2, seed=0, work_dir=tmp_path / "work")).synthetic_
    assert (tmp_path / "work" / "rded-class0.pt").is_file()
    fresh_b = cls(cfg).fit(data, [other], FitContext(ipc=2, seed=0)).synthetic_
    assert not torch.equal(a.images, fresh_b.images), "the two teachers should pick different patches"
    b = cls(cfg).fit(data, [other], FitContext(ipc=2, seed=0, work_dir=tmp_path / "work")).synthetic_
    assert torch.equal(b.images, fresh_b.images)
    again_a = cls(cfg).fit(data, [teacher], FitContext(ipc=2, seed=0, work_dir=tmp_path / "work")).synthetic_
    assert torch.equal(again_a.images, a.images)


def test_rded_checkpoints_write_each_class_once(data, teacher, tmp_path, monkeypatch):
    """Every checkpoint re-saved all finished classes: C(C+1)/2 class images written for C classes."""
    from ddkit.methods import common

    saved, real_save = [], common.atomic_torch_save
    monkeypatch.setattr(common, "atomic_torch_save", lambda state, path: saved.append((path.name, state))
                        or real_save(state, path))
    cls, cfg = METHODS.get("rded"), RDEDConfig(**METHODS.get("rded").smoke_options)
    a = cls(cfg).fit(data, [teacher], FitContext(ipc=2, seed=0, work_dir=tmp_path / "work")).synthetic_
    assert [name for name, _ in saved] == [f"rded-class{c}.pt" for c in range(data.num_classes)]
    for c, (_, state) in enumerate(saved):
        assert sorted(state) == ["images", "key"] and torch.equal(state["images"], a.images[2 * c:2 * c + 2])
    saved.clear()
    again = cls(cfg).fit(data, [teacher], FitContext(ipc=2, seed=0, work_dir=tmp_path / "work")).synthetic_
    assert saved == [] and torch.equal(again.images, a.images)  # every class resumed, nothing rewritten


# ----------------------------------------------------------------------------------------------- FKD


def test_store_round_trip(store, tmp_path):
    store.save(tmp_path / "fkd")
    loaded = SoftLabelStore.load(tmp_path / "fkd")
    assert loaded.tensors.keys() == store.tensors.keys()
    for k in store.tensors:
        assert torch.equal(loaded.tensors[k], store.tensors[k]), k
    assert loaded.nbytes == store.nbytes > 0
    assert loaded.manifest["schema_version"] >= 1 and loaded.manifest["teacher"]["fingerprint"]
    a, b = store.replay(2, [4, 0, 7]), loaded.replay(2, [4, 0, 7])
    assert torch.equal(a.targets, b.targets) and torch.equal(a.partner, b.partner)
    assert all(torch.equal(a.aug[k], b.aug[k]) for k in a.aug)


def test_a_saved_store_has_the_same_bytes_every_time(store, tmp_path):
    """The store file's safetensors metadata held two entries, which safetensors writes in an order that
    changes from call to call: the same labels gave other bytes in every other save (and a resumed
    relabel never equalled an uninterrupted one byte for byte)."""
    saved = {(store.save(tmp_path / f"fkd{i}") / "fkd_labels.safetensors").read_bytes() for i in range(16)}
    assert len(saved) == 1


def test_replay_is_per_epoch_and_image(store, small_set):
    full = store.replay(1, torch.arange(len(small_set)))
    part = store.replay(1, [3, 1])
    assert torch.equal(part.targets, full.targets[[3, 1]])
    assert torch.equal(part.partner, full.partner[[3, 1]]) and torch.equal(part.mix_box, full.mix_box[[3, 1]])
    assert torch.equal(part.lam, full.lam[[3, 1]])
    for k in full.aug:
        assert torch.equal(part.aug[k], full.aug[k][[3, 1]])
    views_full = store.render(full, small_set.images, small_set.mean, small_set.std)
    views_part = store.render(part, small_set.images, small_set.mean, small_set.std)
    assert torch.allclose(views_part, views_full[[3, 1]], atol=1e-6)
    assert store.mixed and bool((full.lam < 1).any()), "cutmix_prob 0.7 should mix some images"
    # epochs differ
    assert not torch.equal(store.replay(0, [3, 1]).aug["box"], part.aug["box"])


def test_stored_logits_are_the_teachers_on_the_views(store, small_set, teacher):
    for e in range(store.epochs):
        r = store.replay(e, torch.arange(len(small_set)))
        with torch.no_grad():
            expect = teacher.model(store.render(r, small_set.images, small_set.mean, small_set.std))
        assert torch.allclose(r.targets, expect, atol=2e-2, rtol=2e-3)


def test_relabel_views_do_not_depend_on_batch_size(small_set, teacher, store):
    """The views (boxes, flips, CutMix partners) are the same at any teacher batch size; the logits only
    within float16 rounding (the store records the batch size and keys by it, see below)."""
    other = relabel(small_set, teacher, epochs=3, augment="rrc_flip", cutmix_prob=0.7, seed=5, batch_size=256)
    for k in store.tensors:
        if k == "logits":
            assert torch.allclose(store.tensors[k].float(), other.tensors[k].float(), atol=1e-2)
        else:
            assert torch.equal(store.tensors[k], other.tensors[k]), k


def test_the_teachers_batch_size_is_recorded_and_keys_the_store_off_its_default(small_set, teacher, tmp_path):
    """QA 20b F3: `ddkit relabel --batch-size` changed a few float16 logits by an ulp (the teacher's forward runs in
    batches), yet no store recorded it and its identity ignored it: two stores of one identity held other bytes. A
    store records its teacher batch size and its identity holds it where it is not the default, 256, so stores of
    the default (and those made before the field) keep their identity."""
    from ddkit.labels.fkd import TEACHER_BATCH, store_identity

    opts = dict(epochs=2, augment="rrc_flip", cutmix_prob=0.7, seed=5)
    plain = relabel(small_set, teacher, **opts, out=tmp_path / "plain")
    made = {b: relabel(small_set, teacher, **opts, batch_size=b, out=tmp_path / f"b{b}") for b in (TEACHER_BATCH, 5, 7)}
    assert TEACHER_BATCH == 256 and plain.manifest["teacher_batch_size"] == 256
    assert {b: s.manifest["teacher_batch_size"] for b, s in made.items()} == {256: 256, 5: 5, 7: 7}
    ids = {b: store_identity(s.path) for b, s in made.items()}
    assert ids[256] == store_identity(plain.path) and len(set(ids.values())) == 3
    assert store_identity(relabel(small_set, teacher, **opts, batch_size=7)) == ids[7]  # in memory, never saved
    # the same store as ddkit wrote it before the field (its manifest without it): the default's identity, old and new
    old = tmp_path / "old"
    shutil.copytree(plain.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["teacher_batch_size"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert store_identity(old) == ids[256]
    assert store_identity(old, legacy=True) == store_identity(plain.path, legacy=True)
    # a relabel resumed with another batch size labels afresh (its epochs could differ by an ulp from the others')
    work = tmp_path / "work"
    relabel(small_set, teacher, **opts, work_dir=work)
    relabel(small_set, teacher, **opts, batch_size=5, work_dir=work)
    assert len(list(work.iterdir())) == 2


def test_topk_store(small_set, teacher, store):
    topk = relabel(small_set, teacher, epochs=3, augment="rrc_flip", cutmix_prob=0.7, seed=5, top_k=2)
    assert topk.nbytes < store.nbytes and topk.logit_nbytes < store.logit_nbytes
    dense = store.replay(2, [5, 2, 9]).targets
    sparse = topk.replay(2, [5, 2, 9]).targets
    assert torch.equal(torch.isfinite(sparse).sum(1), torch.full((3,), 2))
    assert torch.equal(sparse.topk(2, 1).indices.sort(1).values, dense.topk(2, 1).indices.sort(1).values)
    # softmax over the top-k target = the dense distribution renormalised over those classes
    keep = torch.isfinite(sparse)
    p = torch.softmax(dense, 1) * keep
    assert torch.allclose(torch.softmax(sparse, 1), p / p.sum(1, keepdim=True), atol=1e-3)


def test_damaged_store_manifest_is_a_ddkit_error(store, small_set, tmp_path):
    """A store whose manifest lost a key gives a one-line error naming it, not a KeyError; a store made
    for another image size is refused for a set."""
    import shutil

    store.save(tmp_path / "fkd")
    good = json.loads((tmp_path / "fkd" / "manifest.json").read_text())
    for key in ("epochs", "augment", "top_k", "cutmix", "image_size"):
        bad = tmp_path / f"fkd-{key}"
        shutil.copytree(tmp_path / "fkd", bad)
        (bad / "manifest.json").write_text(json.dumps({k: v for k, v in good.items() if k != key}))
        with pytest.raises(DDKitError, match=rf"lacks '{key}(\.spec)?'"):
            SoftLabelStore.load(bad)
    other = tmp_path / "fkd-size"
    shutil.copytree(tmp_path / "fkd", other)
    (other / "manifest.json").write_text(json.dumps({**good, "image_size": [s + 1 for s in good["image_size"]]}))
    with pytest.raises(DDKitError, match="soft-label store was made for .* images but this set has"):
        SoftLabelStore.load(other).check_matches(small_set)
    SoftLabelStore.load(tmp_path / "fkd").check_matches(small_set)
    # a files entry of the wrong type and class names that are not names crashed the loader; classes that
    # are not the set's were taken
    for name, change, message in [
        ("files", {"files": None}, r"holds files None, not the name of its labels file; the manifest is damaged"),
        ("ints", {"classes": [0, 1, 2, 3]},
         r"holds classes \[0, 1, 2, 3\], not a list of class names; the manifest is damaged"),
        ("spec", {"augment": {**good["augment"], "spec": "bogus"}},
         r"holds an augmentation this ddkit cannot replay \(unknown augmentation 'bogus'\); re-create the store"),
    ]:
        bad = tmp_path / f"fkd-{name}"
        shutil.copytree(tmp_path / "fkd", bad)
        (bad / "manifest.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(DDKitError, match=message):
            SoftLabelStore.load(bad)
    renamed = tmp_path / "fkd-renamed"
    shutil.copytree(tmp_path / "fkd", renamed)
    (renamed / "manifest.json").write_text(json.dumps({**good, "classes": ["a", "b", "c", "d"]}))
    with pytest.raises(DDKitError,
                       match=r"made for classes \['a', 'b', 'c', 'd'\] but this set has .*re-run `ddkit relabel`"):
        SoftLabelStore.load(renamed).check_matches(small_set)


def test_store_manifest_without_teacher_or_cutmix_alpha_is_refused(store, tmp_path):
    """A store without its teacher, or with CutMix settings lacking alpha, used to load and then give a
    KeyError at evaluate (checking the teacher, relabelling the random baseline alike)."""
    import shutil

    store.save(tmp_path / "fkd")
    good = json.loads((tmp_path / "fkd" / "manifest.json").read_text())
    assert good["cutmix"] is not None
    for name, man, key in [("teacher", {k: v for k, v in good.items() if k != "teacher"}, "teacher.fingerprint"),
                           ("teacher-null", {**good, "teacher": None}, "teacher.fingerprint"),
                           ("alpha", {**good, "cutmix": {"prob": good["cutmix"]["prob"]}}, "cutmix.alpha"),
                           ("alpha-text", {**good, "cutmix": {**good["cutmix"], "alpha": "1"}}, "cutmix.alpha"),
                           ("prob", {**good, "cutmix": {"alpha": 1.0}}, "cutmix.prob")]:
        bad = tmp_path / f"fkd-{name}"
        shutil.copytree(tmp_path / "fkd", bad)
        (bad / "manifest.json").write_text(json.dumps(man))
        with pytest.raises(DDKitError, match=rf"lacks '{key}' .*re-create the fkd-soft-labels artifact"):
            SoftLabelStore.load(bad)


def test_corrupt_store_is_a_ddkit_error(store, tmp_path):
    store.save(tmp_path / "fkd")
    path = tmp_path / "fkd" / FILE
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DDKitError, match="corrupt"):
        SoftLabelStore.load(tmp_path / "fkd")
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(DDKitError):
        SoftLabelStore.load(tmp_path / "fkd")
    # a readable file with non-finite logits (bit rot in an fp16 exponent) is refused too, not trained on
    from safetensors.torch import load_file, save_file

    store.save(tmp_path / "fkd2")
    path = tmp_path / "fkd2" / FILE
    tensors = load_file(str(path))
    key = "topk.values" if "topk.values" in tensors else "logits"
    tensors[key][0, 0, 0] = float("inf")
    save_file(tensors, str(path), metadata={"kind": "fkd-soft-labels", "format": "1"})
    with pytest.raises(DDKitError, match=f"\\['{key}'\\] hold NaN or infinite values"):
        SoftLabelStore.load(tmp_path / "fkd2")


def test_store_with_boxes_out_of_the_image_or_a_thin_manifest_is_refused(store, small_set, tmp_path):
    """Crop boxes scaled out of the unit square or CutMix boxes out of the image (the views would sample
    padding), and a manifest without its tensor list or classes, used to load without a word."""
    import shutil

    from safetensors.torch import load_file, save_file

    store.save(tmp_path / "fkd")
    good = json.loads((tmp_path / "fkd" / "manifest.json").read_text())
    tensors = load_file(str(tmp_path / "fkd" / FILE))
    assert store.mixed and "aug.box" in tensors
    h, w = good["image_size"]
    damages = [("aug.box", tensors["aug.box"] * 2, "'aug.box' holds boxes outside the normalised image 0..1 x 0..1"),
               ("aug.box", tensors["aug.box"][..., [2, 1, 0, 3]], "'aug.box' holds boxes outside"),
               ("mix.box", tensors["mix.box"] + w, f"'mix.box' holds boxes outside the pixel image 0..{w} x 0..{h}"),
               ("mix.box", tensors["mix.box"] - 1, "'mix.box' holds boxes outside")]
    for i, (key, value, message) in enumerate(damages):
        bad = tmp_path / f"fkd-box{i}"
        shutil.copytree(tmp_path / "fkd", bad)
        save_file({**tensors, key: value.contiguous()}, str(bad / FILE),
                  metadata={"kind": "fkd-soft-labels", "format": "1"})
        with pytest.raises(DDKitError, match=f"{message}.*the store is corrupt, re-run `ddkit relabel`"):
            SoftLabelStore.load(bad)
    thin = [({k: v for k, v in good.items() if k != "tensors"}, "lacks 'tensors'"),
            ({k: v for k, v in good.items() if k != "classes"}, "lacks 'classes'"),
            ({**good, "classes": good["classes"][:-1]}, f"holds {len(good['classes']) - 1} classes for num_classes"),
            ({**good, "image_size": [h]}, "image_size \\[" + str(h) + "\\]"),
            ({**good, "tensors": {k: v for k, v in good["tensors"].items() if k != "mix.box"}},
             "the manifest lists tensors .* but the file holds .*'mix.box'")]
    for i, (man, message) in enumerate(thin):
        bad = tmp_path / f"fkd-thin{i}"
        shutil.copytree(tmp_path / "fkd", bad)
        (bad / "manifest.json").write_text(json.dumps(man))
        with pytest.raises(DDKitError, match=message):
            SoftLabelStore.load(bad / "manifest.json")
    assert SoftLabelStore.load(tmp_path / "fkd" / "manifest.json").epochs == store.epochs  # the manifest's path reads


def test_store_refuses_other_set(store, data):
    other = _subset(data, 3, seed=1)
    proto = ProtocolConfig(student="tiny_convnet", label_mode="teacher", loss="kl", train=TrainConfig(epochs=1))
    with pytest.raises(DDKitError, match="fingerprint"):
        train_with_store(create_model("tiny_convnet", 1, 4, 16), other, store, proto, seed=0)


def test_training_with_store_learns(data, teacher):
    distilled = _subset(data, 10)
    store = relabel(distilled, teacher, epochs=25, augment="rrc_flip", augment_options={"scale_min": 0.5},
                    cutmix_prob=0.5, seed=0)
    proto = ProtocolConfig(student="tiny_convnet", label_mode="teacher", loss="kl", temperature=4.0,
                           train=TrainConfig(epochs=25, batch_size=12, optimizer="adamw", lr=1e-2, weight_decay=0.01,
                                             schedule="cosine"))
    torch.manual_seed(0)
    model = create_model("tiny_convnet", 1, data.num_classes, 16)
    result = train_with_store(model, distilled, store, proto, seed=0, test=data.test)
    assert result.test_accuracy > 0.7, result.history[-3:]


def test_student_epoch_e_replays_store_epoch_e_mod_epochs(store, small_set, monkeypatch, caplog):
    """FKD's point is another stored view (and its logits) every epoch: student epoch e replays store
    epoch e % store.epochs, cyclically when training is longer. A loop that replayed epoch 0 only still
    reached the accuracy floors, so the epochs asked of the store are recorded here."""
    asked = []
    real = SoftLabelStore.replay

    def spy(self, epoch, indices):
        asked.append((epoch, sorted(int(i) for i in indices)))
        return real(self, epoch, indices)

    monkeypatch.setattr(SoftLabelStore, "replay", spy)
    epochs, n = store.epochs + 2, len(small_set)
    proto = ProtocolConfig(student="tiny_convnet", label_mode="teacher", loss="kl",
                           train=TrainConfig(epochs=epochs, batch_size=n // 2))
    with caplog.at_level("WARNING", logger="ddkit"):
        train_with_store(create_model("tiny_convnet", 1, 4, 16), small_set, store, proto, seed=0)
    assert f"store has {store.epochs} epochs but training runs {epochs}: epochs are reused cyclically" in caplog.text
    assert [e for e, _ in asked] == [e % store.epochs for e in range(epochs) for _ in range(2)]  # two batches an epoch
    for e in range(epochs):  # each epoch's two batches replay every image once
        assert sorted(asked[2 * e][1] + asked[2 * e + 1][1]) == list(range(n))


def test_topk_labels_refuse_mse(small_set, teacher):
    from ddkit.errors import ConfigError

    topk = relabel(small_set, teacher, epochs=1, cutmix_prob=0.0, seed=0, top_k=2)
    assert not topk.mixed and torch.equal(topk.replay(0, [1]).lam, torch.ones(1))
    proto = ProtocolConfig(student="tiny_convnet", label_mode="teacher", loss="mse_ce", train=TrainConfig(epochs=1))
    with pytest.raises(ConfigError, match="top-k"):
        train_with_store(create_model("tiny_convnet", 1, 4, 16), small_set, topk, proto, seed=0)


def test_relabel_resumes_from_finished_epochs(small_set, teacher, store, tmp_path, monkeypatch):
    """A relabel killed after 2 epochs restarts at epoch 3 and gives the uninterrupted store."""
    import ddkit.labels.fkd as fkd

    calls = []
    real = fkd.render

    def dying(r, *a, **k):
        calls.append(r.epoch)
        if r.epoch == 2:
            raise KeyboardInterrupt
        return real(r, *a, **k)

    monkeypatch.setattr(fkd, "render", dying)
    opts = dict(epochs=3, augment="rrc_flip", cutmix_prob=0.7, seed=5, batch_size=5, work_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        relabel(small_set, teacher, **opts)
    partial = next(tmp_path.iterdir())
    assert sorted(p.name for p in partial.iterdir()) == ["epoch_00000.safetensors", "epoch_00001.safetensors"]
    calls.clear()
    monkeypatch.setattr(fkd, "render", lambda r, *a, **k: calls.append(r.epoch) or real(r, *a, **k))
    resumed = relabel(small_set, teacher, **opts)
    assert set(calls) == {2}  # only the missing epoch was labelled
    for k in store.tensors:
        assert torch.equal(store.tensors[k], resumed.tensors[k]), k
    # the tensors' order (the saved manifest lists them in it) came from the first epoch, read back from its
    # checkpoint in the file's order when resumed: the manifests of a resumed and an uninterrupted run differed
    assert list(resumed.tensors) == list(store.tensors) == sorted(store.tensors)
    # a finished epoch damaged on disk used to stop the relabel ("re-create it", which cannot be done for one
    # epoch); it is labelled again
    (partial / "epoch_00001.safetensors").write_bytes(b"damaged")
    calls.clear()
    again = relabel(small_set, teacher, **opts)
    assert set(calls) == {1}
    for k in store.tensors:
        assert torch.equal(store.tensors[k], again.tensors[k]), k


def test_relabel_refuses_a_bare_module_that_gives_no_logits_of_the_sets_classes(small_set, teacher, tmp_path):
    """QA 18c #10: a bare teacher module (documented for relabel) that returns a tuple crashed with AttributeError
    ('tuple' object has no attribute 'float'), and one with 7 outputs for 4 classes labelled every epoch, then failed
    at the store with a message that did not blame the teacher. Both are refused in one line before any labelling."""
    from torch import nn

    class Tuple(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x), x

    seen = []
    opts = {"epochs": 2, "augment": "none", "progress": lambda *a: seen.append(a), "out": tmp_path / "store"}
    with pytest.raises(DDKitError) as err:
        relabel(small_set, Tuple(teacher.model), **opts)
    assert str(err.value) == ("the teacher's model(x) gives a tuple, not a logits tensor [B, num_classes]; pass a "
                              "teacher whose forward returns the logits alone")
    wide = nn.Sequential(nn.Flatten(), nn.Linear(256, 7))
    with pytest.raises(DDKitError) as err:
        relabel(small_set, wide, **opts)
    assert str(err.value) == ("teacher gives logits [2, 7] for 2 images but the distilled set has 4 classes; use the "
                              "teacher of this dataset")
    assert seen == [] and not (tmp_path / "store").exists()


def test_relabel_of_bare_modules_resumes_only_its_own(small_set, teacher, tmp_path):
    """A bare module has no teacher fingerprint: its weights key the resume folder and the store, so
    a second module never gets the first one's epochs back."""
    import copy

    a = copy.deepcopy(teacher.model)
    b = copy.deepcopy(teacher.model)
    with torch.no_grad():
        next(b.parameters()).add_(0.5)
    opts = {"epochs": 2, "augment": "none", "seed": 1, "work_dir": tmp_path}
    first = relabel(small_set, a, **opts)
    second = relabel(small_set, b, **opts)
    fresh = relabel(small_set, b, **{**opts, "work_dir": None})
    assert not torch.equal(first.tensors["logits"], second.tensors["logits"])
    assert torch.equal(second.tensors["logits"], fresh.tensors["logits"])
    assert second.manifest["teacher"]["fingerprint"] is not None
    assert first.manifest["teacher"]["fingerprint"] != second.manifest["teacher"]["fingerprint"]
    assert relabel(small_set, teacher, **opts).manifest["teacher"]["fingerprint"] == teacher.fingerprint


def test_weights_sha_hashes_raw_bytes_of_any_dtype():
    """weights_sha went through numpy, which has no bfloat16: a caller's bf16 teacher module crashed relabel with
    "Got unsupported ScalarType BFloat16". It hashes raw bytes; a float32 model's fingerprint is the one the numpy
    version gave (teachers and FKD stores of older runs keep their identity). The weights are exact in float32
    (small integers over 16): torch.linspace rounds differently with another CPU capability (ATEN_CPU_CAPABILITY)."""
    import hashlib

    from ddkit.teacher.squeeze import weights_sha

    m = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Flatten(),
                            torch.nn.Linear(3, 2))
    with torch.no_grad():
        for i, t in enumerate(m.state_dict().values()):
            if t.is_floating_point():
                t.copy_((torch.arange(t.numel(), dtype=t.dtype) - t.numel() // 2).reshape(t.shape) * (i + 1) / 16)
        m[1].num_batches_tracked.fill_(7)  # a 0-d int64 buffer
    m[0].weight.data = m[0].weight.data.transpose(2, 3)  # a non-contiguous weight
    numpy_sha = hashlib.sha256()  # ddkit 0.1.0's hash: each name, then the tensor's bytes through numpy
    for k, v in sorted(m.state_dict().items()):
        numpy_sha.update(k.encode())
        numpy_sha.update(v.detach().cpu().contiguous().numpy().tobytes())
    assert weights_sha(m) == numpy_sha.hexdigest()[:16] == "c344792a119c43c0"
    half = m.bfloat16()
    h = hashlib.sha256()
    for k, v in sorted(half.state_dict().items()):
        h.update(k.encode() + (v.contiguous().view(torch.int16) if v.dtype == torch.bfloat16 else v).numpy().tobytes())
    assert weights_sha(half) == h.hexdigest()[:16] != weights_sha(m.double())


def test_relabel_takes_a_bfloat16_or_float64_module(small_set, teacher):
    """A caller's teacher module in bf16 crashed relabel in ddkit's weight hash, one in float64 met float32 views
    ("Input type (float) and bias type (double) should be the same"). Each gets the views in its own dtype: its
    logits are those of the float32 module up to its precision, under its own fingerprint."""
    import copy

    opts = {"epochs": 1, "augment": "none", "cutmix_prob": 0}
    base = relabel(small_set, teacher, **opts)
    stores = {dtype: relabel(small_set, copy.deepcopy(teacher.model).to(dtype), **opts)
              for dtype in (torch.float64, torch.bfloat16)}
    want = base.tensors["logits"].float()
    assert torch.allclose(stores[torch.float64].tensors["logits"].float(), want, atol=1e-2)
    assert torch.allclose(stores[torch.bfloat16].tensors["logits"].float(), want, atol=0.1, rtol=0.05)
    assert not torch.equal(stores[torch.bfloat16].tensors["logits"], base.tensors["logits"])
    assert len({s.manifest["teacher"]["fingerprint"] for s in (base, *stores.values())}) == 3


def test_relabel_refuses_logits_beyond_float16(small_set):
    class Loud(torch.nn.Module):
        def forward(self, x):
            return torch.full((len(x), 4), 7e4)

    with pytest.raises(DDKitError, match="beyond float16"):
        relabel(small_set, Loud(), epochs=1, augment="none")


def test_relabel_leaves_no_work_folder_without_a_finished_epoch(small_set, teacher, tmp_path, monkeypatch):
    """A refusal in the first epoch (teacher logits beyond float16) left an empty hidden .OUT.partial/ folder;
    a crash after finished epochs keeps them for the resume."""
    import ddkit.labels.fkd as fkd
    from ddkit.errors import DDKitError

    real = fkd._epoch_logits

    def overflowing(*a, **k):
        z = real(*a, **k)
        return z * 1e6 if a[5] == 1 else z  # epoch 1's logits pass float16's 65504

    monkeypatch.setattr(fkd, "_epoch_logits", lambda *a, **k: real(*a, **k) * 1e6)
    with pytest.raises(DDKitError, match=r"teacher logits reach .* in relabel epoch 0, beyond float16's 65504"):
        relabel(small_set, teacher, epochs=2, out=tmp_path / "fk")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(fkd, "_epoch_logits", overflowing)
    with pytest.raises(DDKitError, match=r"in relabel epoch 1, beyond float16's 65504"):
        relabel(small_set, teacher, epochs=2, out=tmp_path / "fk")
    (work,) = tmp_path.iterdir()
    assert work.name == ".fk.partial"
    assert [p.name for p in work.rglob("*.safetensors")] == ["epoch_00000.safetensors"]


@pytest.mark.slow
def test_relabel_under_torchrun_equals_single_process(tmp_path):
    """2 gloo ranks label alternate epochs; the saved store equals the single-process one."""
    from safetensors.torch import load_file

    from conftest import run_ddkit

    def run(*args, ranks=1, cache="cache"):
        run_ddkit(tmp_path, *args, ranks=ranks, cache=cache)

    run("teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", "1", "--out", "t")
    run("distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--out", "d")
    run("relabel", "d", "--teacher", "t", "--epochs", "5", "--out", "l1")
    run("relabel", "d", "--teacher", "t", "--epochs", "5", "--out", "l2", ranks=2)
    a, b = load_file(str(tmp_path / "l1" / FILE)), load_file(str(tmp_path / "l2" / FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    # evaluating with the store spreads seeds over ranks; each rank labels its own seeds' random
    # subsets whole (3 seeds on 2 ranks: collectives inside would pair up wrongly or hang)
    ev = ("evaluate", "d", "--teacher", "t", "--label-mode", "fkd", "--set", "fkd_store=l1", "--seeds", "0,1,2",
          "--set", "student=tiny_convnet", "--set", "train.batch_size=8", "--set", "full_reference=false")
    run(*ev, "--out", "e1.json")
    run(*ev, "--out", "e2.json", ranks=2, cache="cache2")  # its own random-baseline cache
    r1, r2 = (json.loads((tmp_path / f"e{i}.json").read_text())["results"] for i in (1, 2))
    assert r1["distilled"] == r2["distilled"] and r1["random"] == r2["random"] and len(r1["random"]["per_seed"]) == 3


@pytest.mark.parametrize("bad, message", [
    ({"cutmix_alpha": float("nan")}, "cutmix_alpha must be a finite number > 0"),
    ({"cutmix_alpha": float("inf")}, "cutmix_alpha must be a finite number > 0"),
    ({"cutmix_alpha": 0.0}, "cutmix_alpha must be a finite number > 0"),
    ({"cutmix_prob": float("nan")}, r"cutmix_prob must be in \[0, 1\]"),
    ({"seed": -1}, r"relabel seed must be an integer in \[0, 2\^32\), got -1"),
    ({"seed": 99999999999999999999}, r"relabel seed must be an integer in \[0, 2\^32\), got 99999999999999999999"),
    ({"seed": True}, r"relabel seed must be an integer in \[0, 2\^32\), got True"),
    ({"epochs": 0}, "relabel epochs must be an integer >= 1, got 0"),
    ({"epochs": 2.5}, "relabel epochs must be an integer >= 1, got 2.5"),
])
def test_relabel_checks_its_settings_before_any_work(small_set, teacher, tmp_path, monkeypatch, bad, message):
    """NaN CutMix alpha used to fail inside torch (a ValueError) after the work folder was made; an
    infinite alpha and out-of-range seeds were accepted."""
    import ddkit.labels.fkd as fkd
    from ddkit.errors import ConfigError

    monkeypatch.setattr(fkd, "_epoch_logits", lambda *a, **k: pytest.fail("labelled before checking the settings"))
    work = tmp_path / "work"
    with pytest.raises(ConfigError, match=message):
        relabel(small_set, teacher, **{"epochs": 1, "cutmix_prob": 0.5, "work_dir": work, **bad})
    assert not work.exists()


def test_evaluate_takes_the_protocols_store_by_any_spelling_of_its_path(teacher, data, tmp_path, monkeypatch):
    """evaluate(fkd_store=) replays a store already in memory; the same store named relative, absolute
    or by its manifest is the protocol's. It was refused unless spelled alike, with a bare ValueError."""
    from ddkit.data.base import DatasetConfig
    from ddkit.evaluate import evaluate, resolve_protocol
    from ddkit.pipeline import DistillConfig, distill

    ds = distill(data, DistillConfig(method="random", ipc=3), DatasetConfig(name="synthetic"), tmp_path / "d")
    store = relabel(ds, teacher, epochs=2, augment="rrc_flip", cutmix_prob=0.0, seed=0)
    store.save(tmp_path / "st")
    store.save(tmp_path / "other")
    monkeypatch.chdir(tmp_path)
    proto = resolve_protocol("dc-protocol", {"student": "tiny_convnet", "label_mode": "fkd", "loss": "kl",
                                             "fkd_store": "st/manifest.json", "random_baseline": False,
                                             "full_reference": False,
                                             "train": {"epochs": 2, "batch_size": 6, "augment": "rrc_flip"}})
    fresh = evaluate(ds, proto, [0], data=data, teacher=teacher)["results"]
    assert evaluate(ds, proto, [0], data=data, teacher=teacher, fkd_store=SoftLabelStore.load(tmp_path / "st"),
                    cache_dir=tmp_path / "c2")["results"] == fresh  # trained again: the student was cached
    with pytest.raises(DDKitError, match=rf"^fkd_store was loaded from '{tmp_path}/other', not from the protocol's "
                                         r"fkd_store "
                                         r"'st/manifest.json'; pass the store loaded from the protocol's fkd_store, or "
                                         r"leave fkd_store out \(it is read from there\)$"):
        evaluate(ds, proto, [0], data=data, teacher=teacher, fkd_store=SoftLabelStore.load("other"))
    with pytest.raises(DDKitError, match=r"^fkd_store was never saved, so it cannot be the protocol's fkd_store "
                                         r"'st/manifest.json'; save it there and pass the saved store"):
        evaluate(ds, proto, [0], data=data, teacher=teacher,
                 fkd_store=relabel(ds, teacher, epochs=2, augment="rrc_flip", cutmix_prob=0.0, seed=0))



def test_evaluate_replays_a_store_held_in_memory(teacher, data, tmp_path):
    """evaluate(..., fkd_store=relabel(...)) needed the store saved and named as the protocol's fkd_store
    ("label_mode 'fkd' needs fkd_store ... set fkd_store=DIR", then "fkd_store was never saved"). A
    protocol without fkd_store now replays the store it is given, and the report names the store by its
    content: a store in memory by the identity it has once saved, another store by another."""
    from ddkit.data.base import DatasetConfig
    from ddkit.evaluate import evaluate, resolve_protocol
    from ddkit.labels.fkd import store_identity
    from ddkit.pipeline import DistillConfig, distill

    ds = distill(data, DistillConfig(method="random", ipc=3), DatasetConfig(name="synthetic"), tmp_path / "d")
    mem = relabel(ds, teacher, epochs=2, augment="rrc_flip", cutmix_prob=0.0, seed=0)
    over = {"student": "tiny_convnet", "label_mode": "fkd", "full_reference": False,
            "train": {"epochs": 2, "batch_size": 6, "augment": "rrc_flip"}}
    proto = resolve_protocol("dc-protocol", over)
    assert proto.fkd_store is None and proto.loss == "kl"
    rep = evaluate(ds, proto, [0], data=data, teacher=teacher, fkd_store=mem, cache_dir=tmp_path / "cache")
    assert mem.path is None and rep["fkd_store"] == {"path": None, "identity": store_identity(mem)}
    assert set(rep["results"]) == {"distilled", "random"}
    mem.save(tmp_path / "st")
    assert store_identity(tmp_path / "st") == rep["fkd_store"]["identity"]
    saved = evaluate(ds, resolve_protocol("dc-protocol", {**over, "fkd_store": str(tmp_path / "st")}), [0], data=data,
                     teacher=teacher, cache_dir=tmp_path / "cache2")
    assert saved["results"] == rep["results"]
    assert saved["fkd_store"] == {"path": str(tmp_path / "st"), "identity": rep["fkd_store"]["identity"]}
    # the folder passed as fkd_store= is loaded, as teacher= is
    assert evaluate(ds, proto, [0], data=data, teacher=teacher, fkd_store=tmp_path / "st",
                    cache_dir=tmp_path / "cache3")["results"] == rep["results"]
    other = relabel(ds, teacher, epochs=2, augment="rrc_flip", cutmix_prob=0.0, seed=1)
    assert store_identity(other) != store_identity(mem)
    with pytest.raises(DDKitError, match=r"^fkd_store must be a SoftLabelStore \(as relabel returns\) or its folder, "
                                         r"got int; pass one of them$"):
        evaluate(ds, proto, [0], data=data, teacher=teacher, fkd_store=3)


def test_relabel_takes_augment_as_relabel_spec_and_the_cli_name_it(small_set, teacher):
    """relabel(..., augment="flip") was a TypeError: the argument was augment_spec, where RelabelSpec and
    --augment say augment. augment_spec= still works, with a DeprecationWarning; RelabelSpec(epochs=N).make
    asked for protocol_epochs although its epochs were set."""
    from ddkit.config import ConfigError
    from ddkit.labels import RelabelSpec

    new = relabel(small_set, teacher, epochs=1, augment="flip", cutmix_prob=0.0)
    with pytest.warns(DeprecationWarning, match=r"^relabel\(augment_spec=\) is deprecated; pass augment=$") as warned:
        old = relabel(small_set, teacher, epochs=1, augment_spec="flip", cutmix_prob=0.0)
    assert [w.filename for w in warned] == [__file__]  # the caller's line, not torch's no_grad wrapper
    made = RelabelSpec(epochs=1, augment="flip", cutmix_prob=0.0).make(small_set, teacher)
    positional = relabel(small_set, teacher, 1, "flip", None, 0.0)
    for store in (old, made, positional):
        assert store.manifest["augment"] == new.manifest["augment"] and store.manifest["augment"]["spec"] == "flip"
        assert store.tensors.keys() == new.tensors.keys()
        assert all(torch.equal(store.tensors[k], new.tensors[k]) for k in new.tensors)
    with pytest.raises(ConfigError, match=r"^relabel got augment='none' and its old name augment_spec='flip'; pass "
                                          r"augment= alone$"):
        relabel(small_set, teacher, epochs=1, augment="none", augment_spec="flip")
    with pytest.raises(ConfigError, match=r"^RelabelSpec.epochs is None \(the protocol's training epochs\), so make "
                                          r"needs protocol_epochs; pass protocol_epochs=N, or set epochs$"):
        RelabelSpec().make(small_set, teacher)
    assert RelabelSpec(cutmix_prob=0.0).make(small_set, teacher, 2).epochs == 2

# --- stores at scale: streamed to disk, checked per epoch -----------------------------------------------------------


def test_set_fingerprint_hashes_the_tensors_without_a_copy(small_set, monkeypatch):
    """set_fingerprint copied the whole set into bytes before hashing it; it hashes the arrays themselves,
    to the same value."""
    import hashlib

    import numpy as np

    from ddkit.labels.fkd import set_fingerprint

    def old(images, labels):
        h = hashlib.sha256()
        h.update(str(tuple(images.shape)).encode() + str(images.dtype).encode())
        h.update(images.detach().cpu().contiguous().numpy().tobytes())
        h.update(labels.detach().cpu().long().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    x = torch.rand(6, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    cases = [(small_set.images, small_set.labels), (x, torch.arange(6)), (x.transpose(2, 3), torch.arange(6).int()),
             ((x * 255).to(torch.uint8), torch.arange(6)), (x.half(), torch.arange(6)), (x[:0], torch.arange(0))]
    assert [set_fingerprint(*c) for c in cases] == [old(*c) for c in cases]
    fed, real = [], hashlib.sha256

    class Spy:
        def __init__(self):
            self.h = real()

        def update(self, data):
            fed.append(type(data))
            self.h.update(data)

        def hexdigest(self):
            return self.h.hexdigest()

    want = old(x, torch.arange(6))
    monkeypatch.setattr(hashlib, "sha256", Spy)
    assert set_fingerprint(x, torch.arange(6)) == want
    assert fed == [bytes, np.ndarray, np.ndarray]  # the shape and dtype as text, the tensors' own buffers


def test_training_with_a_store_makes_its_normaliser_once(store, small_set, monkeypatch):
    """render() built the normaliser (two tensors copied to the device: a wait on a GPU) at every step."""
    import ddkit.labels.fkd as fkd

    made, real_norm, rendered, real_render = [], fkd.normalizer, [], fkd.render
    monkeypatch.setattr(fkd, "normalizer", lambda *a: made.append(a) or real_norm(*a))
    monkeypatch.setattr(fkd, "render", lambda *a: rendered.append(a) or real_render(*a))
    proto = ProtocolConfig(student="tiny_convnet", label_mode="teacher", loss="kl",
                           train=TrainConfig(epochs=3, batch_size=4))
    fresh = SoftLabelStore(store.tensors, store.manifest)  # the module's store may have rendered already
    train_with_store(create_model("tiny_convnet", 1, 4, 16), small_set, fresh, proto, seed=0)
    assert len(rendered) == 9 and len(made) == 1  # 3 epochs of 3 steps, one normaliser


class _LargestAllocation:
    """Records the largest tensor storage any torch op allocates inside the block (views, in-place ops and
    memory-mapped loads allocate none): a store written or checked one epoch at a time never allocates one
    of the store's size."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        watch = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if all(r.alias_info is None for r in func._schema.returns):  # a new tensor, not a view or in-place
                    for t in out if isinstance(out, (tuple, list)) else [out]:
                        if isinstance(t, torch.Tensor):
                            watch.bytes = max(watch.bytes, t.untyped_storage().nbytes())
                return out

        self.bytes, self.mode = 0, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def _wide(epochs=40, n=12, classes=50):
    """A set of ``n`` 4x4 images and a bare linear teacher over many classes: its dense store
    (epochs x n x classes fp16) is 40 times one epoch's float32 logits."""
    import types

    g = torch.Generator().manual_seed(0)
    ds = types.SimpleNamespace(images=torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8),
                               labels=torch.arange(n) % classes, classes=[f"c{i}" for i in range(classes)],
                               mean=(0.5,), std=(0.25,), path=None)
    torch.manual_seed(0)
    return ds, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, classes)), epochs * n * classes * 2


def test_loading_and_showing_a_store_checks_it_one_epoch_at_a_time(tmp_path, capsys):
    """Loading a store (every evaluation) and `ddkit show` checked its values over whole tensors, about 4
    times the store in temporaries; per epoch they take a fraction, and still refuse a bad last epoch."""
    from safetensors.torch import load_file, save_file

    from ddkit.cli import main

    ds, model, logit_bytes = _wide()
    relabel(ds, model, 40).save(tmp_path / "fkd")
    with _LargestAllocation() as loading:
        SoftLabelStore.load(tmp_path / "fkd")
    with _LargestAllocation() as showing:
        assert main(["show", str(tmp_path / "fkd"), "-q"]) == 0
    assert 0 < loading.bytes < logit_bytes / 8 and 0 < showing.bytes < logit_bytes / 8
    tensors = load_file(str(tmp_path / "fkd" / FILE))
    for key, damage, message in (("logits", float("nan"), r"\['logits'\] hold NaN or infinite values"),
                                 ("aug.box", 2.0, "'aug.box' holds boxes outside the normalised image")):
        bad = {k: v.clone() for k, v in tensors.items()}
        bad[key][-1, -1, -1] = damage
        save_file(bad, str(tmp_path / "fkd" / FILE), metadata={"kind": "fkd-soft-labels"})
        with pytest.raises(DDKitError, match=message):
            SoftLabelStore.load(tmp_path / "fkd")


def test_saved_and_streamed_stores_are_what_save_file_writes(store, small_set, teacher, tmp_path):
    """save() and relabel(out=) write the labels file epoch by epoch; it holds the bytes safetensors'
    save_file writes for the whole stacked tensors (the format before), and the same manifest."""
    from safetensors.torch import save_file

    topk = relabel(small_set, teacher, epochs=3, augment="none", cutmix_prob=0.0, seed=2, top_k=2)
    for name, made, opts in (("dense", store, dict(augment="rrc_flip", cutmix_prob=0.7, seed=5, batch_size=5)),
                             ("topk", topk, dict(augment="none", cutmix_prob=0.0, seed=2, top_k=2))):
        save_file(made.tensors, str(tmp_path / f"{name}.safetensors"), metadata={"kind": "fkd-soft-labels"})
        made.save(tmp_path / f"{name}-saved")
        streamed = relabel(small_set, teacher, epochs=3, out=tmp_path / f"{name}-streamed", **opts)
        want = (tmp_path / f"{name}.safetensors").read_bytes()
        assert (tmp_path / f"{name}-saved" / FILE).read_bytes() == want
        assert (tmp_path / f"{name}-streamed" / FILE).read_bytes() == want
        assert ((tmp_path / f"{name}-saved" / "manifest.json").read_text()
                == (tmp_path / f"{name}-streamed" / "manifest.json").read_text())
        assert streamed.path == tmp_path / f"{name}-streamed" and streamed.manifest == made.manifest
        assert all(torch.equal(streamed.tensors[k], made.tensors[k]) for k in made.tensors)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no work folder left


def test_relabel_into_a_folder_holds_one_epoch_at_a_time(tmp_path):
    """relabel(out=) streams each epoch to disk: it never allocates a tensor of the store's size (it stacked
    every epoch in memory, about 4.7 times the store at its peak); returned in memory, the store is one."""
    ds, model, logit_bytes = _wide()
    with _LargestAllocation() as streamed:
        on_disk = relabel(ds, model, 40, out=tmp_path / "fkd")
    assert 0 < streamed.bytes < logit_bytes / 8
    with _LargestAllocation() as whole:
        in_memory = relabel(ds, model, 40)
    assert whole.bytes >= logit_bytes
    assert all(torch.equal(on_disk.tensors[k], in_memory.tensors[k]) for k in in_memory.tensors)


def test_streaming_refuses_work_epochs_of_other_shapes(tmp_path):
    """An epoch file in the work folder that does not match the first epoch's tensors is refused in one line."""
    from ddkit.artifacts import save_tensors

    ds, model, _ = _wide(epochs=2)
    relabel(ds, model, 1, work_dir=tmp_path / "work")
    partial = next((tmp_path / "work").iterdir())
    save_tensors(partial / "epoch_00001.safetensors", {"logits": torch.zeros(3, 50, dtype=torch.float16)})
    with pytest.raises(DDKitError, match=r"^relabel epoch 1 holds tensors .*; delete the relabel work folder and "
                                         r"relabel again$"):
        relabel(ds, model, 2, augment="rrc_flip", work_dir=tmp_path / "work", out=tmp_path / "fkd")
    assert not (tmp_path / "fkd").exists()


def _relabel_rank(rank: int, store_path: str, out: str) -> None:
    """relabel under 2 gloo ranks, into a folder and in memory, with all_gather refused and the largest
    allocation recorded."""
    import os

    import torch.distributed as dist

    import ddkit.distributed as ddist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)

    real_gather = ddist.all_gather_objects

    def gather(obj):  # the ranks' settings digests (ddist.agree_settings) pass, epochs do not
        if not (isinstance(obj, dict) and all(isinstance(v, str) for v in obj.values())):
            raise AssertionError("relabel gathered every rank's epochs")
        return real_gather(obj)

    ddist.all_gather_objects = gather
    try:
        ds, model, _ = _wide(epochs=9)
        with _LargestAllocation() as streamed:
            relabel(ds, model, 9, out=f"{out}/fkd2")
        in_memory = relabel(ds, model, 9)
        torch.save({"bytes": streamed.bytes, "tensors": in_memory.tensors}, f"{out}/rank{rank}.pt")
    finally:
        ddist.shutdown()
    os._exit(0)  # see test_distributed._train_bn_rank


def test_relabel_under_two_ranks_streams_the_store_without_gathering_it(tmp_path):
    """Under torchrun every rank gathered every rank's epochs (all_gather_object of the tensors) and stacked
    them; now the ranks hand their epochs over in the work folder and rank 0 streams them into the store,
    which is byte for byte the single-process one; in memory, ranks pass one epoch at a time. The two stores
    have one identity (the process count was part of it), so evaluations keyed by it are shared."""
    import torch.multiprocessing as mp

    from ddkit.labels.fkd import store_identity

    ds, model, logit_bytes = _wide(epochs=9)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' thread count, which the identity holds (float sums depend on it)
    try:
        one = relabel(ds, model, 9, out=tmp_path / "fkd1")
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_relabel_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "fkd1" / FILE).read_bytes() == (tmp_path / "fkd2" / FILE).read_bytes()
    assert json.loads((tmp_path / "fkd2" / "manifest.json").read_text())["run"]["world_size"] == 2
    assert store_identity(tmp_path / "fkd1") == store_identity(tmp_path / "fkd2")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert 0 < got["bytes"] < logit_bytes / 4
        assert got["tensors"].keys() == one.tensors.keys()
        assert all(torch.equal(got["tensors"][k], one.tensors[k]) for k in one.tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fkd1", "fkd2", "rank0.pt", "rank1.pt", "store"]


def test_random_baseline_streams_its_labels_and_reuses_a_whole_store(data, teacher, tmp_path, monkeypatch):
    """Label mode fkd's random subset was relabelled in memory for every seed; its labels now go to a folder
    beside its cache entry, removed once the student's accuracy is cached; labels left whole there by a
    stopped evaluation are used again. The accuracy is the in-memory one."""
    import ddkit.labels
    from ddkit.data.base import DatasetConfig
    from ddkit.evaluate import evaluate, resolve_protocol
    from ddkit.evaluate.runner import _random_baseline, _relabel_like, random_cache_path
    from ddkit.pipeline import DistillConfig, distill

    small_set = distill(data, DistillConfig(method="random", ipc=3), DatasetConfig(name="synthetic"), tmp_path / "d")
    store = relabel(small_set, teacher, epochs=2, augment="rrc_flip", cutmix_prob=0.5, seed=0)
    store.save(tmp_path / "fkd")
    proto = resolve_protocol("soft-kl", {"student": "tiny_convnet", "label_mode": "fkd",
                                         "fkd_store": str(tmp_path / "fkd"), "full_reference": False,
                                         "train": {"epochs": 2, "batch_size": 6}})
    outs, real = [], ddkit.labels.relabel
    monkeypatch.setattr(ddkit.labels, "relabel", lambda *a, **k: outs.append(k.get("out")) or real(*a, **k))
    rep = evaluate(small_set, proto, [0], data=data, teacher=teacher, cache_dir=tmp_path / "cache")
    entry = random_cache_path(proto, data, teacher, store, 3, 0, tmp_path / "cache")
    assert outs == [entry.with_suffix(".fkd")] and entry.is_file()
    assert sorted(p.name for p in entry.parent.iterdir() if not p.name.endswith(".lock")) == [entry.name]
    monkeypatch.setattr(ddkit.labels, "relabel", real)
    assert rep["results"]["random"]["per_seed"] == [_random_baseline(data, proto, teacher, store, 3, 0, "cpu")]
    # a whole store in the folder (the student was stopped) is used again, not labelled again
    subset = data.train.subset(torch.arange(0, 96, 8))
    _, made = _relabel_like(store, subset, data, teacher, 5, "cpu", out=tmp_path / "r.fkd")
    monkeypatch.setattr(ddkit.labels, "relabel", lambda *a, **k: pytest.fail("labelled the subset again"))
    _, again = _relabel_like(store, subset, data, teacher, 5, "cpu", out=tmp_path / "r.fkd")
    monkeypatch.setattr(ddkit.labels, "relabel", real)
    _, fresh = _relabel_like(store, subset, data, teacher, 5, "cpu")
    assert made.path == again.path == tmp_path / "r.fkd"
    assert all(torch.equal(again.tensors[k], fresh.tensors[k]) for k in fresh.tensors)


def test_store_labels_file_stays_inside_the_store(store, tmp_path):
    """files.labels was joined onto the folder unchecked: a store whose manifest named another store's
    labels file by an absolute path or '../' trained students on those labels without a word."""
    import shutil

    store.save(tmp_path / "fkd")
    shutil.copy(tmp_path / "fkd" / FILE, tmp_path / "other.safetensors")
    good = json.loads((tmp_path / "fkd" / "manifest.json").read_text())
    man = str(tmp_path / "fkd" / "manifest.json")
    for name in (str(tmp_path / "other.safetensors"), "../other.safetensors", "sub/" + FILE):
        (tmp_path / "fkd" / "manifest.json").write_text(json.dumps({**good, "files": {"labels": name}}))
        with pytest.raises(DDKitError) as raised:
            SoftLabelStore.load(tmp_path / "fkd")
        assert str(raised.value) == (f"{man!r} names {name!r} as files.labels, which leads outside the artifact's "
                                     "folder; the manifest is damaged: re-create the store with `ddkit relabel`")
    (tmp_path / "fkd" / "manifest.json").write_text(json.dumps(good))
    assert SoftLabelStore.load(tmp_path / "fkd").epochs == store.epochs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fkd", "other.safetensors"]


def test_artifacts_name_their_folders_absolute_from_any_working_folder(data, tmp_path, monkeypatch):
    """Teachers, sets and stores kept the relative out they were given: after a chdir the records named folders
    under the new working folder, and a store loaded from the protocol's folder was refused."""
    from ddkit.data.base import DatasetConfig
    from ddkit.evaluate import evaluate, resolve_protocol
    from ddkit.pipeline import DistillConfig, distill
    from ddkit.teacher import Teacher

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    monkeypatch.chdir(a)
    t = train_teacher(data, TeacherConfig(model="tiny_convnet", train=TrainConfig(epochs=1)), "t")
    d = distill(data, DistillConfig(method="random", ipc=2), DatasetConfig(name="synthetic"), "s")
    store = relabel(d, t, epochs=1, augment="rrc_flip", cutmix_prob=0.0, seed=0, out="s.fkd")
    assert (t.path, d.path, store.path) == (a / "t", a / "s", a / "s.fkd")
    (a / "link").symlink_to(a / "s")
    loaded = (Teacher.load("t"), DistilledSet.load("s/manifest.json"), SoftLabelStore.load("s.fkd"),
              DistilledSet.load("link"))
    assert [x.path for x in loaded] == [a / "t", a / "s", a / "s.fkd", a / "link"]  # absolute, links kept
    d.save("s2")
    store.save("s2.fkd")
    assert (d.path, store.path) == (a / "s2", a / "s2.fkd")
    monkeypatch.chdir(b)
    d3 = distill(data, DistillConfig(method="random", ipc=2, seed=1, soft_labels=True),
                 DatasetConfig(name="synthetic"), "s3", t)
    assert d3.manifest["teacher"]["path"] == str(a / "t") and d3.path == b / "s3"
    proto = resolve_protocol("dc-protocol", {"student": "tiny_convnet", "label_mode": "fkd", "loss": "kl",
                                             "fkd_store": str(a / "s2.fkd"), "random_baseline": False,
                                             "full_reference": False, "train": {"epochs": 1, "augment": "rrc_flip"}})
    rep = evaluate(d, proto, [0], data=data, teacher=t, fkd_store=store)  # was refused: loaded from 's2.fkd'
    assert rep["distilled"]["path"] == str(a / "s2") and rep["teacher"]["path"] == str(a / "t")


def test_a_users_teacher_module_keeps_its_train_eval_flags(data, teacher, small_set):
    """relabel (a bare module), distill and evaluate left a user's module in eval mode: fine-tuning it afterwards
    trained with dropout and BatchNorm frozen. Every submodule's flag comes back, after an exception too."""
    import copy

    from ddkit.data.base import DatasetConfig
    from ddkit.evaluate import evaluate, resolve_protocol
    from ddkit.pipeline import DistillConfig, distill
    from ddkit.teacher import Teacher

    def flags(m):
        return [x.training for x in m.modules()]

    mine = copy.deepcopy(teacher.model).train()
    next(iter(mine.children())).eval()  # mixed, as the caller left them
    want = flags(mine)
    assert True in want and False in want
    a = relabel(small_set, mine, epochs=1, cutmix_prob=0.0, seed=0)
    assert flags(mine) == want
    assert torch.equal(a.tensors["logits"], relabel(small_set, teacher, epochs=1, cutmix_prob=0.0, seed=0)
                       .tensors["logits"])  # labelled in eval mode all the same

    def stop(*args):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        relabel(small_set, mine, epochs=1, cutmix_prob=0.0, seed=0, progress=stop)
    assert flags(mine) == want
    wrapped = Teacher(mine, teacher.manifest)  # puts it in eval mode itself (documented)
    mine.train()
    ds = distill(data, DistillConfig(method="random", ipc=1, soft_labels=True), DatasetConfig(name="synthetic"),
                 teacher=wrapped)
    assert set(flags(mine)) == {True}
    proto = resolve_protocol("dc-protocol", {"student": "tiny_convnet", "label_mode": "teacher", "train": {"epochs": 1},
                                             "random_baseline": False, "full_reference": False})
    evaluate(ds, proto, [0], data=data, teacher=wrapped)
    assert set(flags(mine)) == {True}


def test_relabel_takes_numpy_numbers_and_records_options_as_typed(small_set, teacher):
    """np.int64 epochs were refused (config fields took them); `scale_min: 1` and `1.0` made one store under two
    identities (the integer recorded as written)."""
    import numpy as np

    from ddkit.labels.fkd import store_identity

    def store(epochs, seed, scale_min):
        return relabel(small_set, teacher, epochs=epochs, augment="rrc_flip", augment_options={"scale_min": scale_min},
                       seed=seed, batch_size=6)

    py = store(1, 5, 1.0)
    for other in (store(np.int64(1), np.int64(5), np.float32(1.0)), store(1, 5, 1)):
        assert store_identity(other) == store_identity(py)
        assert torch.equal(other.tensors["logits"], py.tensors["logits"])
    assert py.manifest["augment"]["options"] == {"scale_min": 1.0}
    assert type(store(1, 5, 1).manifest["augment"]["options"]["scale_min"]) is float
    json.dumps(store(np.int64(1), np.int64(5), np.float32(1.0)).manifest["config"])
