import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import REPO, cuda_settings_kept, fake_cuda, twice_at_once
from ddkit.config import from_dict
from ddkit.data.base import DatasetConfig, make_synthetic
from ddkit.errors import ConfigError, DDKitError
from ddkit.evaluate import evaluate, format_table, resolve_protocol
from ddkit.pipeline import DistillConfig, distill
from ddkit.teacher import Teacher, TeacherConfig, train_teacher
from ddkit.training import TrainConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    data = make_synthetic()
    teacher = train_teacher(data, TeacherConfig(model="tiny_convnet",
                                                train=TrainConfig(epochs=8, batch_size=32, lr=0.05)), root / "teacher")
    ds = distill(data, DistillConfig(method="random", ipc=4, soft_labels=True), DatasetConfig(name="synthetic"),
                 root / "r4", teacher)
    return data, teacher, ds, root


def test_report_structure_and_values(setup, tiny_protocol, tmp_path):
    data, teacher, ds, _ = setup
    out = tmp_path / "eval.json"
    rep = evaluate(ds, tiny_protocol, [0, 1, 2], data=data, out=out)
    assert json.loads(out.read_text())["results"] == rep["results"]
    res = rep["results"]
    assert set(res) == {"distilled", "random", "full"}
    for key in ("distilled", "random"):
        assert len(res[key]["per_seed"]) == 3 and res[key]["n"] == 3
        assert all(0.0 <= a <= 1.0 for a in res[key]["per_seed"])
        mean = sum(res[key]["per_seed"]) / 3
        assert res[key]["mean"] == pytest.approx(mean)
        assert res[key]["std"] == pytest.approx((sum((a - mean) ** 2 for a in res[key]["per_seed"]) / 3) ** 0.5)
    # 4 images per class of structured data: clearly better than chance (0.25)
    assert res["distilled"]["mean"] > 0.5
    assert res["full"]["n"] == 1 and res["full"]["mean"] > 0.7
    # hard-label students train from the images and hard labels: the set's soft labels are not counted
    assert ds.soft_labels is not None and ds.label_bytes == 16 * 8 + 16 * 4 * 4
    assert rep["bytes"] == {"images": 16 * 256, "labels": 16 * 8, "total": 16 * 256 + 16 * 8}
    assert rep["protocol_hash"] == tiny_protocol.hash and rep["seeds"] == [0, 1, 2]
    table = format_table([rep])
    assert ("baseline: random ipc=4" in table and "baseline: full data (15 ep)" in table
            and f"{100 * res['distilled']['mean']:.2f}" in table)


def test_same_seeds_same_numbers_and_baseline_caches(setup, tiny_protocol, tmp_path, monkeypatch):
    data, _, ds, _ = setup
    a = evaluate(ds, tiny_protocol, [3], data=data)
    # trained again in a cache of its own: the same numbers (in the same cache they are read back, below)
    assert evaluate(ds, tiny_protocol, [3], data=data, cache_dir=tmp_path / "fresh")["results"] == a["results"]
    import ddkit.evaluate.runner as runner

    calls = []
    real = runner._train_student
    monkeypatch.setattr(runner, "_train_student", lambda *a, **k: calls.append(a[1] is a[2]) or real(*a, **k))
    b = evaluate(ds, tiny_protocol, [3], data=data)
    assert a["results"] == b["results"]
    assert len(calls) == 0  # the set's, the random subset's and the full data's students came from the caches
    # the caches are keyed by the protocol: another epoch count trains the set's and the random subset's again
    other = resolve_protocol(tiny_protocol, {"train": {"epochs": tiny_protocol.train.epochs + 1}})
    c = evaluate(ds, other, [3], data=data)
    assert len(calls) == 2 and c["results"]["random"]["n"] == 1  # distilled + random trained again


def test_damaged_cache_entries_are_computed_again(setup, tiny_protocol, tmp_path):
    """A cache entry that reads but lacks its value (a foreign or hand-edited file) is a miss, not a KeyError.
    (One epoch per student: what is cached is tested, not how well it learns.)"""
    data, _, ds, _ = setup
    cache = tmp_path / "cache"
    tiny_protocol = resolve_protocol(tiny_protocol, {"full_epochs": 1, "train": {"epochs": 1}})
    first = evaluate(ds, tiny_protocol, [5], data=data, cache_dir=cache)
    entries = sorted(p for p in cache.rglob("*.json"))
    assert {p.parent.name for p in entries} == {"distilled-student", "random-baseline", "full-reference"}
    for p in entries:
        p.write_text(json.dumps({"kind": "something else"}))
    again = evaluate(ds, tiny_protocol, [5], data=data, cache_dir=cache)
    assert again["results"] == first["results"]
    assert all("accuracy" in json.loads(p.read_text()) or "result" in json.loads(p.read_text()) for p in entries)


@pytest.mark.parametrize("accuracy", [2.0, float("nan")])
def test_cache_entries_with_impossible_numbers_are_computed_again(setup, tiny_protocol, tmp_path, accuracy, caplog):
    """A random-baseline entry whose accuracy read 2.0 or NaN was reused: the report said 200.00 % (or nan).
    Now it is damaged as the full-data reference with an edited mean is: trained again (the same numbers),
    overwritten, with a warning naming the file; `ddkit show` refuses both."""
    from ddkit.describe import describe

    data, _, ds, _ = setup
    cache = tmp_path / "cache"
    protocol = resolve_protocol(tiny_protocol, {"full_epochs": 1, "train": {"epochs": 1}})
    first = evaluate(ds, protocol, [5], data=data, cache_dir=cache)
    (rb,), (fr,) = cache.glob("random-baseline/*.json"), cache.glob("full-reference/*.json")
    good = {p: p.read_text() for p in (rb, fr)}
    rb.write_text(json.dumps({**json.loads(good[rb]), "accuracy": accuracy}))
    edited = json.loads(good[fr])
    edited["result"]["mean"] = 0.99
    fr.write_text(json.dumps(edited))
    for p in cache.glob("distilled-student/*.json"):
        p.unlink()  # the set's student is trained again too, so `again == first` compares two trainings of it
    for p, held in ((rb, "holds accuracy "), (fr, "holds result mean 0.99, not the mean of its per_seed")):
        with pytest.raises(DDKitError, match=f"cache entry '{p}' {held}.*it is damaged: delete it"):
            describe(p)
    with caplog.at_level("WARNING", logger="ddkit.evaluate.runner"):
        again = evaluate(ds, protocol, [5], data=data, cache_dir=cache)
    assert again["results"] == first["results"]
    assert {p: p.read_text() for p in (rb, fr)} == good  # trained again to the same numbers and rewritten
    warned = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert sorted(w.split(" is damaged")[0] for w in warned) == sorted(f"cache entry {p}" for p in (fr, rb))
    assert f"damaged (accuracy {accuracy!r}, not an accuracy in [0, 1])" in "".join(warned)
    assert describe(rb).startswith("cached random-baseline student: test accuracy ")


def test_a_cache_that_cannot_be_written_still_gives_the_report(setup, tiny_protocol, tmp_path, monkeypatch, caplog):
    """An empty cache folder that cannot be written (read-only, full) made evaluate train every student, then
    fail on caching the random baseline or the full-data reference: no report. Now a warning per entry."""
    import errno

    import ddkit.evaluate.runner as runner

    data, _, ds, _ = setup
    cache, real = tmp_path / "rocache", runner.write_json

    def refuse_cache(path, data):
        if cache in path.parents:
            raise PermissionError(errno.EACCES, "Permission denied", str(path.parent))
        return real(path, data)

    monkeypatch.setattr(runner, "write_json", refuse_cache)
    proto = resolve_protocol(tiny_protocol, {"full_epochs": 1, "train": {"epochs": 1}})
    out = tmp_path / "e.json"
    with caplog.at_level("WARNING", logger="ddkit.evaluate.runner"):
        rep = evaluate(ds, proto, [5], data=data, cache_dir=cache, out=out)
    assert set(rep["results"]) == {"distilled", "random", "full"}
    assert json.loads(out.read_text())["results"] == rep["results"]
    warned = sorted(r.getMessage() for r in caplog.records if r.getMessage().startswith("cannot cache"))
    assert [w.split(" in ")[0] for w in warned] == ["cannot cache the distilled set's student of seed 5",
                                                   "cannot cache the full-data reference",
                                                   "cannot cache the random baseline of seed 5"]
    assert all(w.endswith(": Permission denied; later runs will train it again") for w in warned)
    assert not cache.exists() or not list(cache.rglob("*.json"))


def test_fkd_baseline_labels_that_cannot_be_cached_are_made_in_memory(setup, tiny_protocol, tmp_path, monkeypatch,
                                                                       caplog):
    """Label mode fkd streams the random subset's labels into the cache: a cache that could not be written
    failed the evaluation after its students were trained (no report). Now a warning, the labels made in
    memory, and the numbers of a writable cache."""
    import errno

    import ddkit.labels as labels_pkg
    from ddkit.labels import relabel

    data, teacher, ds, _ = setup
    relabel(ds, teacher, epochs=2, augment="rrc_flip", seed=0).save(tmp_path / "fkd")
    proto = resolve_protocol(tiny_protocol, {"label_mode": "fkd", "fkd_store": str(tmp_path / "fkd"),
                                             "full_reference": False, "train": {"epochs": 2}})
    want = evaluate(ds, proto, [0], data=data, teacher=teacher, cache_dir=tmp_path / "ok")
    # the labels streamed into the cache are removed once the student is cached, and their lock file with them
    left = [p.name for p in (tmp_path / "ok" / "random-baseline").iterdir()]
    assert len(left) == 1 and left[0].endswith(".json") and not left[0].startswith("."), left
    cache, real = tmp_path / "rocache", labels_pkg.relabel

    def refuse_cache(*a, out=None, **k):
        if out is not None and cache in Path(out).parents:
            Path(k["work_dir"]).mkdir(parents=True)  # the first epoch written, then the disk is full
            (Path(k["work_dir"]) / "epoch_00000.safetensors").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device", str(out))
        return real(*a, out=out, **k)

    monkeypatch.setattr(labels_pkg, "relabel", refuse_cache)
    out = tmp_path / "e.json"
    with caplog.at_level("WARNING", logger="ddkit.evaluate.runner"):
        got = evaluate(ds, proto, [0], data=data, teacher=teacher, cache_dir=cache, out=out)
    assert got["results"] == want["results"] and json.loads(out.read_text())["results"] == got["results"]
    assert "cannot keep the random subset's labels in " in caplog.text
    assert caplog.text.count("No space left on device; labelling it in memory") == 1
    assert not list(cache.rglob("*.fkd")) and not list(cache.rglob("*.partial*"))  # no epochs left behind


def test_fkd_baseline_epochs_a_kill_left_beside_the_whole_labels_are_removed(setup, tiny_protocol, tmp_path,
                                                                             monkeypatch):
    """A kill between the random subset's FKD labels' save and the removal of their epochs left the hidden
    ``.KEY.fkd.partial`` folder: the next run found the labels whole and used them, cached the student, and the
    epochs stayed in the cache for good. The run that finds the labels whole removes them."""
    import ddkit.labels as labels_pkg
    from ddkit.labels import relabel

    data, teacher, ds, _ = setup
    relabel(ds, teacher, epochs=2, augment="rrc_flip", seed=0).save(tmp_path / "fkd")
    proto = resolve_protocol(tiny_protocol, {"label_mode": "fkd", "fkd_store": str(tmp_path / "fkd"),
                                             "full_reference": False, "train": {"epochs": 2}})
    want = evaluate(ds, proto, [0], data=data, teacher=teacher, cache_dir=tmp_path / "ok")
    cache, real = tmp_path / "killed", labels_pkg.relabel

    def killed_after_the_save(*a, work_dir=None, **k):
        real(*a, work_dir=work_dir, **k)
        (Path(work_dir) / "relabel-x").mkdir(parents=True)  # the epochs the kill kept from their removal
        (Path(work_dir) / "relabel-x" / "epoch_00000.safetensors").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(labels_pkg, "relabel", killed_after_the_save)
    with pytest.raises(KeyboardInterrupt):
        evaluate(ds, proto, [0], data=data, teacher=teacher, cache_dir=cache)
    assert len(list(cache.glob("random-baseline/.*.fkd.partial/relabel-x/*"))) == 1
    monkeypatch.setattr(labels_pkg, "relabel", real)
    assert evaluate(ds, proto, [0], data=data, teacher=teacher, cache_dir=cache)["results"] == want["results"]
    left = [p.name for p in (cache / "random-baseline").iterdir()]
    assert len(left) == 1 and left[0].endswith(".json") and not left[0].startswith("."), left


def test_fkd_baseline_labels_on_a_full_cache_disk_are_made_in_memory(setup, tiny_protocol, tmp_path, monkeypatch,
                                                                      caplog):
    """The safetensors writer reports a full disk as a one-line DDKitError (save_tensors), which the fallback
    to labels in memory did not catch: the evaluation failed after its students were trained. And an error
    that is not the cache's (here the teacher's) is raised as it is, not blamed on the cache and relabelled."""
    import safetensors.torch
    from safetensors import SafetensorError

    from ddkit.labels import relabel

    data, teacher, ds, _ = setup
    relabel(ds, teacher, epochs=2, augment="rrc_flip", seed=0).save(tmp_path / "fkd")
    proto = resolve_protocol(tiny_protocol, {"label_mode": "fkd", "fkd_store": str(tmp_path / "fkd"),
                                             "full_reference": False, "train": {"epochs": 2}})
    want = evaluate(ds, proto, [0], data=data, teacher=teacher, cache_dir=tmp_path / "ok")
    cache, real = tmp_path / "full", safetensors.torch.save_file

    def full_disk(tensors, path, **k):
        if cache in Path(path).parents:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)  # ddkit.artifacts imports it where it writes
    with caplog.at_level("WARNING", logger="ddkit.evaluate.runner"):
        got = evaluate(ds, proto, [0], data=data, teacher=teacher, cache_dir=cache)
    assert got["results"] == want["results"]
    assert caplog.text.count("No space left on device; labelling it in memory") == 1
    assert not list(cache.rglob("*.fkd")) and not list(cache.rglob("*.partial*"))

    calls = []

    def broken_teacher(*a, **k):
        calls.append(1)
        raise OSError(5, "Input/output error", str(tmp_path / "elsewhere"))

    import ddkit.labels.fkd as fkd

    monkeypatch.setattr(safetensors.torch, "save_file", real)
    monkeypatch.setattr(fkd, "_epoch_logits", broken_teacher)
    with pytest.raises(OSError, match="Input/output error"):
        evaluate(ds, proto, [1], data=data, teacher=teacher, cache_dir=tmp_path / "other")
    assert len(calls) == 1, "an error that is not the cache's was blamed on it and the subset relabelled"


def test_random_baseline_never_draws_the_sets_own_subset(setup, tiny_protocol, monkeypatch):
    """A `random` set of seed s evaluated with student seed s: a baseline subset drawn with the same seed
    is the set itself, so IOR would be 0 by construction. The baseline draws with seed + RANDOM_SEED_OFFSET."""
    import ddkit.evaluate.runner as runner

    data, _, ds, _ = setup
    assert ds.manifest["seed"] == 0 and ds.method == "random"
    seen = []
    monkeypatch.setattr(runner, "_train_student", lambda train_set, *a, **k: seen.append(train_set) or 0.5)
    evaluate(ds, resolve_protocol(tiny_protocol, {"full_reference": False}), [0], data=data)
    mine, baseline = seen  # the set's student, then the random subset's
    assert torch.equal(mine.images, ds.images)
    assert baseline.images.shape == ds.images.shape and torch.equal(baseline.labels, ds.labels)
    assert not torch.equal(baseline.images, ds.images), "the random baseline trained on the set's own subset"


def test_baseline_cache_keys_follow_what_decides_the_student(setup, tiny_protocol, tmp_path):
    import dataclasses

    from ddkit.evaluate.runner import full_reference, random_cache_path

    data = setup[0]

    def rkey(protocol, d=data):
        return random_cache_path(protocol, d, None, None, 4, 0, tmp_path).name

    base = rkey(tiny_protocol)
    # what only says which other numbers evaluate reports leaves the random student's entry alone
    for change in ({"full_epochs": 7}, {"full_seeds": 2}, {"full_reference": False}, {"random_baseline": False},
                   {"train": {"eval_batch_size": 7}}):
        assert rkey(resolve_protocol(tiny_protocol, change)) == base, change
    # its training settings and the images' normalisation do not
    assert rkey(resolve_protocol(tiny_protocol, {"train": {"lr": 0.5}})) != base
    renorm = dataclasses.replace(data, mean=(0.25,) * len(data.mean), std=(0.5,) * len(data.std))
    assert renorm.fingerprint == data.fingerprint and rkey(tiny_protocol, renorm) != base
    # the full-data reference: normalisation is its key too, so a renormalised dataset trains it again
    one = resolve_protocol(tiny_protocol, {"full_epochs": 1, "train": {"batch_size": 32}})
    a = full_reference(data, one, [0], "cpu", tmp_path)
    assert full_reference(data, resolve_protocol(one, {"train": {"eval_batch_size": 7}}), [0], "cpu", tmp_path) == a
    b = full_reference(renorm, one, [0], "cpu", tmp_path)
    assert a["key"] != b["key"] and len(list((tmp_path / "full-reference").glob("*.json"))) == 2


def test_the_order_the_seeds_are_written_in_changes_no_number(setup, tiny_protocol, tmp_path):
    """`--seeds 1,0` reported the full-data reference of seed 1 and `--seeds 0,1` that of seed 0 (the first
    full_seeds seeds as written; in a bench HLR and LRS changed with it): the reference trains from the smallest
    seeds, and the report lists the seeds sorted. Run and bench configs keep their seeds sorted, so their keys
    agree too."""
    from ddkit.bench import BenchConfig
    from ddkit.evaluate.runner import full_reference
    from ddkit.pipeline import EvalConfig

    data, _, ds, _ = setup
    p = resolve_protocol(tiny_protocol, {"full_epochs": 1, "train": {"epochs": 2}})
    first = full_reference(data, p, [0], "cpu", tmp_path / "c0")
    assert full_reference(data, p, [1], "cpu", tmp_path / "c1")["mean"] != first["mean"]  # the order matters here
    a = evaluate(ds, p, [0, 1], data=data, cache_dir=tmp_path / "a")
    b = evaluate(ds, p, [1, 0], data=data, cache_dir=tmp_path / "b")
    assert a["seeds"] == b["seeds"] == [0, 1] and b["results"] == a["results"]
    assert b["results"]["full"]["mean"] == first["mean"] and b["results"]["full"]["key"] == first["key"]
    assert full_reference(data, p, [1, 0], "cpu", tmp_path / "c0")["key"] == first["key"]
    assert EvalConfig(seeds=[2, 0, 1]).seeds == BenchConfig(seeds=[2, 0, 1]).seeds == [0, 1, 2]


def test_full_reference_takes_its_seeds_as_every_stage_does(setup, tiny_protocol, tmp_path):
    """full_reference sorted the seeds it was given with a sort of its own, unchecked: a repeated seed trained the
    same reference student twice. It keeps them as config.sorted_seeds does for every stage, and refuses a repeat
    before any student trains."""
    from ddkit.config import sorted_seeds
    from ddkit.evaluate.runner import full_reference

    assert sorted_seeds([2, torch.tensor(0), 1]) == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"^full_reference seeds: \[0, 0\] repeats a seed"):
        full_reference(setup[0], resolve_protocol(tiny_protocol, {"full_epochs": 1}), [0, 0], "cpu", tmp_path)
    assert not any(tmp_path.iterdir())  # nothing cached


def test_baseline_caches_are_keyed_by_thread_count_and_device(setup, tiny_protocol, tmp_path, monkeypatch):
    """A bench evaluates again under another torch thread count (float sums depend on it), but the random subset's
    and the full data's students still came from the cache, trained under the other count, while the report
    recorded the new one. Both entries are now keyed (and say) where their students trained."""
    import ddkit.evaluate.runner as runner
    from ddkit.evaluate.runner import random_cache_path

    data, _, ds, _ = setup
    protocol = resolve_protocol(tiny_protocol, {"full_epochs": 1, "train": {"epochs": 1}})
    calls, real = [], runner._train_student
    monkeypatch.setattr(runner, "_train_student", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            rep = evaluate(ds, protocol, [0], data=data, cache_dir=tmp_path)
            assert rep["run"]["torch_threads"] == n
    finally:
        torch.set_num_threads(threads)
    # 1 thread: set, random subset, full data; 2 threads: all three again; 1 thread again: none
    assert calls == [16, 16, len(data.train)] * 2
    entries = sorted(tmp_path.rglob("*.json"))
    assert sorted((p.parent.name, json.loads(p.read_text())["torch_threads"], json.loads(p.read_text())["device"],
                   json.loads(p.read_text())["schema_version"]) for p in entries) == [
        ("distilled-student", 1, "cpu", 2), ("distilled-student", 2, "cpu", 2),
        ("full-reference", 1, "cpu", 2), ("full-reference", 2, "cpu", 2),
        ("random-baseline", 1, "cpu", 2), ("random-baseline", 2, "cpu", 2)]
    on = {d: random_cache_path(protocol, data, None, None, 4, 0, tmp_path, device=d) for d in ("cpu", "cuda:1")}
    assert on["cpu"] != on["cuda:1"] == random_cache_path(protocol, data, None, None, 4, 0, tmp_path, device="cuda")
    # `ddkit show ENTRY` summarises every kind (it refused them: "not a ddkit record ddkit can summarise")
    from ddkit.describe import describe

    shown = {(p.parent.name, json.loads(p.read_text())["torch_threads"]): describe(p) for p in entries}
    rb = json.loads(next(p for p in entries if p.parent.name == "random-baseline").read_text())
    assert shown["random-baseline", rb["torch_threads"]] == (
        f"cached random-baseline student: test accuracy {100 * rb['accuracy']:.2f}% of a random subset of 4 images "
        f"per class, student seed 0, protocol {protocol.hash}, trained with {rb['torch_threads']} torch threads on cpu")
    assert shown["full-reference", 2].startswith("cached full-data reference: test accuracy ")
    st = json.loads(next(p for p in entries if p.parent.name == "distilled-student").read_text())
    assert shown["distilled-student", st["torch_threads"]] == (
        f"cached distilled-set student: test accuracy {100 * st['accuracy']:.2f}% of a random set (ipc 4), label mode "
        f"hard, student seed 0, protocol {protocol.hash}, trained with {st['torch_threads']} torch threads on cpu")
    assert shown["full-reference", 2].endswith(" over 1 student seed(s), 1 epochs, trained with 2 torch threads on cpu")
    old = entries[0].parent / "old.json"  # an older ddkit's entry: said to be stale
    old.write_text(json.dumps({"schema_version": 1, "kind": "full-reference-cache",
                               "result": {"per_seed": [0.5], "mean": 0.5, "std": 0.0, "n": 1, "epochs": 4}}))
    assert describe(old).endswith("4 epochs (made by an older ddkit, keyed without thread count and device: never "
                                  "read again; `ddkit cache prune --stale` removes it)")


def test_full_reference_is_trained_once_by_concurrent_callers(setup, tiny_protocol, tmp_path, monkeypatch):
    """Two bench ranks scoring other sets with the same student used to train the same whole-data students
    side by side; the second now waits for the first and reads its entry."""
    import ddkit.evaluate.runner as runner

    protocol = resolve_protocol(tiny_protocol, {"full_epochs": 1, "train": {"batch_size": 32}})
    calls, out = twice_at_once(monkeypatch, runner, "_train_student",
                               lambda: runner.full_reference(setup[0], protocol, [0], "cpu", tmp_path))
    assert len(calls) == 1 and len(out) == 2 and out[0] == out[1]


def test_soft_label_modes_need_their_inputs(setup, tiny_protocol):
    data, teacher, ds, root = setup
    teach = resolve_protocol(tiny_protocol, {"label_mode": "teacher"})
    with pytest.raises(DDKitError,
                       match=r"^label_mode 'teacher' needs a teacher; pass teacher= \(CLI: --teacher DIR\)$"):
        evaluate(ds, teach, [0], data=data)
    plain = distill(data, DistillConfig(method="random", ipc=2), DatasetConfig(name="synthetic"), root / "plain")
    stored = resolve_protocol(tiny_protocol, {"label_mode": "stored", "full_reference": False})
    with pytest.raises(DDKitError, match="needs soft labels in the distilled set"):
        evaluate(plain, stored, [0], data=data, teacher=teacher)
    rep = evaluate(ds, stored, [0], data=data, teacher=teacher)
    assert set(rep["results"]) == {"distilled", "random"} and rep["teacher"]["weights_sha"] == teacher.fingerprint
    # the set replays teacher A's logits: a random baseline labelled by teacher B is no comparison
    other = train_teacher(data, TeacherConfig(model="tiny_convnet", train=TrainConfig(epochs=1, batch_size=32)))
    assert other.fingerprint != teacher.fingerprint
    with pytest.raises(DDKitError, match=rf"^label_mode 'stored' replays the soft labels teacher {teacher.fingerprint} "
                                         rf"\(.*teacher\) gave this set, not teacher {other.fingerprint}; pass "
                                         r"that teacher"):
        evaluate(ds, stored, [0], data=data, teacher=other)


def test_fingerprint_and_class_checks(setup, tiny_protocol):
    _, teacher, ds, _ = setup
    other = make_synthetic(seed=5)
    with pytest.raises(DDKitError, match="fingerprint .* but the loaded data has"):
        evaluate(ds, tiny_protocol, [0], data=other)
    with pytest.raises(DDKitError, match="no evaluation seeds"):
        evaluate(ds, tiny_protocol, [], data=make_synthetic())


def test_fkd_label_mode_with_random_baseline(setup, tiny_protocol, tmp_path, caplog):
    from ddkit.evaluate.runner import _other_views
    from ddkit.labels import SoftLabelStore, relabel

    data, teacher, ds, _ = setup
    store = relabel(ds, teacher, epochs=5, augment="rrc_flip", cutmix_prob=0.5, seed=0)
    store.save(tmp_path / "fkd")
    proto = resolve_protocol(tiny_protocol, {"label_mode": "fkd", "fkd_store": str(tmp_path / "fkd"),
                                             "full_reference": False, "train": {"epochs": 10}})
    assert proto.loss == "kl"
    with caplog.at_level("WARNING", logger="ddkit"):
        rep = evaluate(ds, proto, [0], data=data, teacher=teacher)
    # the protocol's augmentation is not what students see in label mode fkd: said once, not per student
    assert caplog.text.count("the FKD store's augmentation (rrc_flip {}) is not the protocol's train.augment "
                             f"({proto.train.augment} ") == 1
    same = dataclasses.replace(proto.train, augment="rrc_flip", augment_options={"scale_min": 0.08})
    assert _other_views(same, store) is None  # options spelled out or left at their defaults agree; CutMix is FKD's
    assert _other_views(dataclasses.replace(same, augment_options={"scale_min": 0.5}), store) == (
        "rrc_flip {}", "rrc_flip {'scale_min': 0.5}")
    assert set(rep["results"]) == {"distilled", "random"}
    assert rep["bytes"]["fkd_labels"] == SoftLabelStore.load(tmp_path / "fkd").nbytes > 0
    assert rep["bytes"]["labels"] == ds.labels.numel() * 8 + rep["bytes"]["fkd_labels"]
    assert 0.25 < rep["results"]["distilled"]["mean"] <= 1.0
    with pytest.raises(DDKitError,
                       match=r"^label_mode 'fkd' needs a teacher to label the random subset beside the set; pass "
                             r"teacher= \(CLI: --teacher DIR\), or set random_baseline=false to evaluate the set "
                             r"alone$"):
        evaluate(ds, proto, [0], data=data)
    # a protocol may leave the store out (evaluate is then given it); evaluate needs one of the two
    no_store = resolve_protocol(tiny_protocol, {"label_mode": "fkd"})
    assert no_store.fkd_store is None and no_store.loss == "kl"
    with pytest.raises(DDKitError, match=r"^label_mode 'fkd' needs fkd_store: pass fkd_store= \(a SoftLabelStore, as "
                                         r"relabel returns\) or set the protocol's fkd_store to a `ddkit relabel` "
                                         r"folder \(CLI: --set fkd_store=DIR\)$"):
        evaluate(ds, no_store, [0], data=data, teacher=teacher)


def test_fkd_evaluation_fingerprints_its_set_once(setup, tiny_protocol, tmp_path, monkeypatch):
    """Every student seed checks the set against the store; the set is fingerprinted once, and a set
    changed since (another set, or this one edited in place) is still refused."""
    import ddkit.labels.fkd as fkd
    from ddkit.distilled import DistilledSet
    from ddkit.labels import relabel

    data, teacher, ds, _ = setup
    relabel(ds, teacher, epochs=2, augment="rrc_flip", seed=0).save(tmp_path / "fkd")
    proto = resolve_protocol(tiny_protocol, {"label_mode": "fkd", "fkd_store": str(tmp_path / "fkd"),
                                             "random_baseline": False, "full_reference": False,
                                             "train": {"epochs": 1}})
    calls = []
    real = fkd.set_fingerprint
    monkeypatch.setattr(fkd, "set_fingerprint", lambda *a: calls.append(1) or real(*a))
    rep = evaluate(ds.path, proto, [0, 1, 2], data=data, teacher=teacher)
    assert len(rep["results"]["distilled"]["per_seed"]) == 3 and len(calls) == 1
    edited = DistilledSet.load(ds.path)
    edited.images[0] = edited.images[1]
    with pytest.raises(DDKitError, match="made for a distilled set with fingerprint"):
        evaluate(edited, proto, [0], data=data, teacher=teacher)
    loaded = DistilledSet.load(ds.path)
    fkd.SoftLabelStore.load(tmp_path / "fkd").check_matches(loaded)
    loaded.images[0] = loaded.images[1]  # in place, after a check: fingerprinted again
    with pytest.raises(DDKitError, match="made for a distilled set with fingerprint"):
        fkd.SoftLabelStore.load(tmp_path / "fkd").check_matches(loaded)
    assert len(calls) == 4


def test_teacher_ensemble_soft_labels(setup, tiny_protocol, tmp_path):
    """Online soft labels from an ensemble: [t, t] is t itself; [t, u] averages their logits."""
    import torch

    from ddkit.evaluate.runner import teacher_logits
    from ddkit.teacher import teacher_ensemble

    data, teacher, ds, root = setup
    other = train_teacher(data, TeacherConfig(model="tiny_convnet", seed=5,
                                              train=TrainConfig(epochs=2, batch_size=32, lr=0.05)),
                          tmp_path / "other")
    both = teacher_ensemble([teacher, other])
    x = ds.images[:8]
    want = (teacher_logits(teacher, x, data.mean, data.std, "cpu")
            + teacher_logits(other, x, data.mean, data.std, "cpu")) / 2
    assert torch.allclose(teacher_logits(both, x, data.mean, data.std, "cpu"), want, atol=1e-5)
    assert both.fingerprint not in (teacher.fingerprint, other.fingerprint)
    import shutil  # the same members elsewhere are the same ensemble (its fingerprint named their paths)

    shutil.copytree(tmp_path / "other", tmp_path / "moved")
    assert teacher_ensemble([teacher, Teacher.load(tmp_path / "moved")]).fingerprint == both.fingerprint
    here, there = ({"extra_teachers": [str(tmp_path / p)]} for p in ("other", "moved"))
    soft = resolve_protocol(tiny_protocol, {"label_mode": "teacher", "random_baseline": False, "full_reference": False})
    assert resolve_protocol(soft, here).hash == resolve_protocol(soft, there).hash != soft.hash
    alone = evaluate(ds, soft, [0], data=data, teacher=teacher)
    # label mode teacher asks the teacher: the set's own soft labels (16 x 4 float32) are not counted
    assert ds.soft_labels is not None
    assert alone["bytes"] == {"images": 16 * 256, "labels": 16 * 8, "total": 16 * 256 + 16 * 8}
    twice = evaluate(ds, resolve_protocol(soft, {"extra_teachers": [str(root / "teacher")]}), [0], data=data,
                     teacher=teacher)
    mixed = evaluate(ds, resolve_protocol(soft, {"extra_teachers": [str(tmp_path / "other")]}), [0], data=data,
                     teacher=teacher)
    assert (twice["results"]["distilled"]["per_seed"]
            == pytest.approx(alone["results"]["distilled"]["per_seed"], abs=1e-9))
    assert mixed["teacher"]["weights_sha"] == both.fingerprint
    with pytest.raises(DDKitError, match="extra teacher .* not found"):
        evaluate(ds, resolve_protocol(soft, {"extra_teachers": [str(tmp_path / "nope")]}), [0], data=data,
                 teacher=teacher)


def test_stored_labels_leave_extra_teachers_out(setup, tiny_protocol, tmp_path, monkeypatch, caplog):
    """label_mode stored with extra_teachers: the set replays its teacher's labels, so the random subset beside it
    is labelled by that teacher too (not by the ensemble), and the report names that teacher; said once for the set
    and protocol."""
    import ddkit.evaluate.runner as runner

    data, teacher, ds, _ = setup
    train_teacher(data, TeacherConfig(model="tiny_convnet", seed=5,
                                      train=TrainConfig(epochs=2, batch_size=32, lr=0.05)), tmp_path / "other")
    stored = resolve_protocol(tiny_protocol, {"label_mode": "stored", "full_reference": False,
                                              "train": {"epochs": 2}})
    targets, real = [], runner._train_student
    monkeypatch.setattr(runner, "_train_student",
                        lambda *a, **k: targets.append((a[0].images, a[8] if len(a) > 8 else k.get("stored")))
                        or real(*a, **k))
    monkeypatch.setattr(runner, "_STORED_EXTRAS_SAID", set())
    alone = evaluate(ds, stored, [0], data=data, teacher=teacher, cache_dir=tmp_path / "c")
    with caplog.at_level("WARNING", logger="ddkit.evaluate.runner"):  # another cache: the random subsets train again
        both = [evaluate(ds, resolve_protocol(stored, {"extra_teachers": [str(tmp_path / "other")]}), [s], data=data,
                         teacher=teacher, cache_dir=tmp_path / "c2") for s in (0, 1)]
    assert sum("does not use the protocol's extra_teachers" in r.message for r in caplog.records) == 1
    assert both[0]["results"] == alone["results"]
    assert both[0]["teacher"] == alone["teacher"] == teacher.record()
    assert targets[2][1] is ds.soft_labels  # the distilled set's student, then the random subset's (seed 0)
    images, labels = targets[3]
    want = runner.teacher_logits(teacher, images, data.mean, data.std, "cpu", seed=runner.RANDOM_SEED_OFFSET)
    assert torch.equal(labels, want)  # the random subset's targets: the set's teacher's logits, as the set's own


def test_stored_and_fkd_set_students_are_not_keyed_by_the_teacher(setup, tiny_protocol, tmp_path):
    """In label modes stored and fkd the set's students learn from its soft labels or the FKD store, never from
    the teacher, but their cache key held the teacher: passing a teacher only to turn the random baseline on
    trained the set's students again. The random subset's students, which the teacher labels, keep it."""
    from ddkit.evaluate.runner import random_cache_path
    from ddkit.labels import relabel

    data, teacher, ds, _ = setup
    store = relabel(ds, teacher, epochs=1, augment="none", cutmix_prob=0.0, seed=0)
    for mode, more in (("stored", {}), ("fkd", {"fkd_store": store})):
        cache = tmp_path / mode
        alone = resolve_protocol(tiny_protocol, {"label_mode": mode, "random_baseline": False,
                                                 "full_reference": False, "train": {"epochs": 1}})
        first = evaluate(ds, alone, [0], data=data, cache_dir=cache, **more)
        students = sorted(cache.glob("distilled-student/*.json"))
        both = evaluate(ds, resolve_protocol(alone, {"random_baseline": True}), [0], data=data, teacher=teacher,
                        cache_dir=cache, **more)
        # the set's student read back under the key it had without a teacher, only the random subset's trained
        assert len(students) == 1 and sorted(cache.glob("distilled-student/*.json")) == students
        assert both["results"]["distilled"] == first["results"]["distilled"] and both["results"]["random"]["n"] == 1
        assert (random_cache_path(alone, data, teacher, None, 4, 0, cache)
                != random_cache_path(alone, data, None, None, 4, 0, cache))


def test_hard_and_stored_evaluations_leave_extra_teachers_out_of_their_keys(setup, tmp_path, monkeypatch):
    """Label modes hard and stored do not use the protocol's extra_teachers, but their count entered the protocol's
    hash, so adding them to a run, a bench or `ddkit evaluate` trained the same students again (the random subset's
    cached students too). Their keys now leave them out; keys without them are those ddkit made before (old run
    folders and caches are reused), and the modes that label with the ensemble still key it."""
    import ddkit.evaluate.runner as runner
    from ddkit.pipeline import RunConfig, ensemble_identity, protocol_inputs, run

    extra = [str(setup[3] / "teacher")]
    # the hashes of protocols without extra_teachers, as ddkit made them before
    assert [resolve_protocol("dc-protocol", {"label_mode": m}).hash for m in ("hard", "stored", "teacher", "fkd")] == [
        "26ab4d31935aff70", "e74f03ae3a0271a8", "2d0cf509f999d7a3", "dc584e20b1148f68"]
    for mode in ("hard", "stored"):
        alone = resolve_protocol("dc-protocol", {"label_mode": mode})
        both = resolve_protocol(alone, {"extra_teachers": extra})
        assert both.hash == alone.hash and ensemble_identity(both) == protocol_inputs(both) == {}
    soft = resolve_protocol("dc-protocol", {"label_mode": "teacher"})
    assert resolve_protocol(soft, {"extra_teachers": extra}).hash != soft.hash
    assert ensemble_identity(resolve_protocol(soft, {"extra_teachers": extra})) == {
        "extra_teacher_weights": [setup[1].fingerprint]}

    def config(extra_teachers: list[str]) -> RunConfig:
        return from_dict(RunConfig, {
            "dataset": {"name": "synthetic"}, "device": "cpu", "out": str(tmp_path / "run"),
            "teacher": {"model": "tiny_convnet", "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}},
            "distill": {"method": "random", "ipc": 2, "soft_labels": True},
            "evaluate": {"label_modes": ["hard", "stored"], "seeds": [0], "overrides": {
                "student": "tiny_convnet", "full_reference": False, "extra_teachers": extra_teachers,
                "train": {"epochs": 2, "batch_size": 32, "lr": 0.05}}}})

    first = run(config([]))
    trained = []
    monkeypatch.setattr(runner, "_train_student", lambda *a, **k: trained.append(a) or 0.5)
    again = run(config(extra))
    assert again["reused"] == ["teacher", "distilled", "eval-hard.json", "eval-stored.json"] and trained == []
    assert [e["results"] for e in again["evaluations"]] == [e["results"] for e in first["evaluations"]]
    # `ddkit evaluate`'s students (cached by the protocol): read back, not trained again
    hard = resolve_protocol("dc-protocol", {"student": "tiny_convnet", "full_reference": False,
                                            "train": {"epochs": 2, "batch_size": 32}})
    ds = tmp_path / "run" / "distilled"
    monkeypatch.undo()
    alone = evaluate(ds, hard, [0], data=setup[0], cache_dir=tmp_path / "c")
    monkeypatch.setattr(runner, "_train_student", lambda *a, **k: trained.append(a[0]) or 0.5)
    both = evaluate(ds, resolve_protocol(hard, {"extra_teachers": extra}), [0], data=setup[0],
                    cache_dir=tmp_path / "c")
    assert trained == [] and both["results"] == alone["results"]


def test_a_teacher_free_set_and_its_hard_evaluation_are_kept_when_only_the_teacher_changes(tmp_path, monkeypatch):
    """dm reads no teacher (uses_teacher = False), but the run's teacher was part of its set's identity and of the
    hard-label evaluation's key: another teacher seed synthesised the same images and trained the same students
    again. Both are now kept; a set and report ddkit made before (keyed with their teacher) are still reused, with
    that teacher or another."""
    import ddkit.pipeline as pipeline
    from ddkit.config import config_hash
    from ddkit.data import load_dataset
    from ddkit.pipeline import RunConfig, distill_hash, run

    def config(teacher_seed: int) -> RunConfig:
        return from_dict(RunConfig, {
            "dataset": {"name": "synthetic"}, "device": "cpu", "out": str(tmp_path / "run"),
            "teacher": {"model": "tiny_convnet", "seed": teacher_seed, "train": {"epochs": 1, "batch_size": 32}},
            "distill": {"method": "dm", "ipc": 2, "options": {"iterations": 2, "model": "tiny_convnet",
                                                              "batch_real": 8}},
            "evaluate": {"label_modes": ["hard"], "seeds": [0], "overrides": {
                "student": "tiny_convnet", "full_reference": False, "random_baseline": False,
                "train": {"epochs": 2, "batch_size": 32, "lr": 0.05}}}})

    first = run(config(0))
    ddir, report = tmp_path / "run/distilled", tmp_path / "run/eval-hard.json"
    images = (ddir / "images.safetensors").read_bytes()
    made = json.loads((ddir / "manifest.json").read_text())
    assert made["teacher"] is None  # it did not make the set
    assert json.loads(report.read_text())["teacher"] is None
    monkeypatch.setattr(pipeline, "distill", lambda *a, **k: pytest.fail("the dm set was synthesised again"))
    monkeypatch.setattr(pipeline, "evaluate", lambda *a, **k: pytest.fail("the hard-label students trained again"))
    again = run(config(1))
    assert again["reused"] == ["distilled", "eval-hard.json"]  # the teacher is new, the rest is kept
    assert again["evaluations"][0]["results"] == first["evaluations"][0]["results"]
    assert (ddir / "images.safetensors").read_bytes() == images

    # as ddkit until 2026-12-07 wrote them: the run's teacher recorded in the set and in both keys
    cfg = config(1)
    teacher = json.loads((tmp_path / "run/teacher/manifest.json").read_text())
    man = json.loads((ddir / "manifest.json").read_text())
    man["teacher"] = {"path": str(tmp_path / "run/teacher"), "weights_sha": teacher["weights_sha"]}
    man["config_hash"] = distill_hash(cfg.distill, load_dataset(cfg.dataset), teacher["weights_sha"],
                                      teacher_free=False)
    assert man["config_hash"] != made["config_hash"]
    (ddir / "manifest.json").write_text(json.dumps(man))
    rep = json.loads(report.read_text())
    protocol = cfg.evaluate.protocols()[0]
    rep["run_hash"] = config_hash({"protocol": protocol.hash, "seeds": [0], "distilled": man["config_hash"],
                                   "teacher": teacher["weights_sha"]})
    report.write_text(json.dumps(rep))
    assert run(cfg)["reused"] == ["teacher", "distilled", "eval-hard.json"]
    assert run(config(0))["reused"] == ["distilled", "eval-hard.json"]


def test_a_run_keeps_no_report_of_a_mode_it_dropped_or_of_a_set_it_replaced(tmp_path, monkeypatch, capsys):
    """QA 20d F10: a run into the same folder with fewer label modes and a new set left the old eval-<mode>.json
    beside the new set, and nothing in them named the set they scored. A run now removes the reports of the modes it
    does not evaluate, and (before it makes a new set) those of the set it replaces, so a run that fails after that
    leaves none of the old set's; a report names its set (config_hash, fingerprint), and `show` of a report whose
    set was replaced says so. Reports from before (no set named) still load and print."""
    import ddkit
    import ddkit.pipeline as pipeline
    from ddkit.describe import describe
    from ddkit.distilled import DistilledSet
    from ddkit.labels.fkd import distilled_fingerprint
    from ddkit.pipeline import RunConfig, run

    out = tmp_path / "run"

    def config(modes: list[str], seed: int = 0) -> RunConfig:
        return from_dict(RunConfig, {
            "dataset": {"name": "synthetic"}, "device": "cpu", "out": str(out),
            "teacher": {"model": "tiny_convnet", "train": {"epochs": 1, "batch_size": 32}},
            "distill": {"method": "random", "ipc": 2, "seed": seed, "soft_labels": True},
            "evaluate": {"label_modes": modes, "seeds": [0], "overrides": {
                "student": "tiny_convnet", "full_reference": False, "random_baseline": False,
                "train": {"epochs": 1, "batch_size": 32}}}})

    def reports() -> list[str]:  # the run's own (QA 21c F1: a user's eval-hard-3ep.json there is never removed)
        return sorted(p.name for p in out.glob("eval-*.json") if p.name != "eval-hard-3ep.json")

    run(config(["hard", "stored"]))
    made = json.loads((out / "distilled/manifest.json").read_text())
    first = json.loads((out / "eval-stored.json").read_text())
    assert first["distilled"]["config_hash"] == made["config_hash"]
    assert first["distilled"]["fingerprint"] == distilled_fingerprint(DistilledSet.load(out / "distilled"))
    (tmp_path / "kept.json").write_text(json.dumps(first))  # a copy, as a user may keep one
    users = out / "eval-hard-3ep.json"  # as `ddkit evaluate ... --out` writes one beside the run's
    users.write_text(json.dumps(first))
    assert run(config(["hard"]))["reused"] == ["teacher", "distilled", "eval-hard.json"]
    assert reports() == ["eval-hard.json"]  # the stored one is gone, the hard one kept
    assert json.loads((out / "manifest.json").read_text())["stages"]["evaluations"] == ["eval-hard.json"]

    # a new set: the old set's reports go before it is made; a run failing after that leaves none of them
    run(config(["hard", "stored"]))
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "evaluate", lambda *a, **k: pytest.fail("evaluating"))
        with pytest.raises(pytest.fail.Exception):
            run(config(["hard", "stored"], seed=1))
    assert reports() == [] and not (out / "manifest.json").exists()
    run(config(["hard"], seed=1))
    now = json.loads((out / "distilled/manifest.json").read_text())["config_hash"]
    assert now != made["config_hash"] and reports() == ["eval-hard.json"]
    assert json.loads((out / "eval-hard.json").read_text())["distilled"]["config_hash"] == now
    assert json.loads(users.read_text()) == first  # the user's file, through all of it

    # `show` of the kept report of the replaced set says so; a current one and an old one (no set named) say nothing
    shown = describe(tmp_path / "kept.json")
    assert shown.endswith(f"\nnote: this report scored set {made['config_hash']}, but the set now at "
                          f"{out / 'distilled'} is another ({now}): evaluate that set again")
    assert "note:" not in describe(out / "eval-hard.json")
    old = dict(first, distilled={k: v for k, v in first["distilled"].items()
                                 if k not in ("config_hash", "fingerprint")})
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert describe(tmp_path / "old.json") == shown.split("\nnote:")[0]
    assert ddkit.load(tmp_path / "old.json")["distilled"] == old["distilled"]


def test_an_old_set_with_its_own_soft_labels_is_made_again_when_the_teacher_changes(tmp_path, monkeypatch):
    """A set of a teacher-free method that ddkit made before 2026-12-07 (keyed with the run's teacher) is kept when
    only the teacher changes, unless it holds soft labels of its own (TESLA's, DATM's): label mode stored would
    replay them as those of the teacher recorded in the set, not the run's. With the same teacher it is kept."""
    import ddkit.methods.mtt as mtt
    import ddkit.pipeline as pipeline
    from ddkit.data import load_dataset
    from ddkit.pipeline import RunConfig, distill_hash, run

    def config(teacher_seed: int) -> RunConfig:
        return from_dict(RunConfig, {
            "dataset": {"name": "synthetic"}, "device": "cpu", "out": str(tmp_path / "run"),
            "teacher": {"model": "tiny_convnet", "seed": teacher_seed, "train": {"epochs": 1, "batch_size": 32}},
            "distill": {"method": "tesla", "ipc": 2, "options": dict(mtt.TESLA.smoke_options)},
            "evaluate": {"label_modes": ["hard"], "seeds": [0], "overrides": {
                "student": "tiny_convnet", "full_reference": False, "random_baseline": False,
                "train": {"epochs": 1, "batch_size": 32}}}})

    run(config(0))
    ddir = tmp_path / "run/distilled"
    made = json.loads((ddir / "manifest.json").read_text())
    assert made["files"]["soft_labels"] and made["teacher"] is None
    # as ddkit until 2026-12-07 wrote it: the run's teacher recorded in the set and in its key
    teacher = json.loads((tmp_path / "run/teacher/manifest.json").read_text())["weights_sha"]
    old = {**made, "teacher": {"path": str(tmp_path / "run/teacher"), "weights_sha": teacher},
           "config_hash": distill_hash(config(0).distill, load_dataset(config(0).dataset), teacher, teacher_free=False)}
    (ddir / "manifest.json").write_text(json.dumps(old))
    assert run(config(0))["reused"][:2] == ["teacher", "distilled"]  # the same teacher: kept as it is
    assert json.loads((ddir / "manifest.json").read_text()) == old
    synthesised = []
    monkeypatch.setattr(pipeline, "distill", lambda *a, **k: synthesised.append(a) or distill(*a, **k))
    assert "distilled" not in run(config(1))["reused"] and len(synthesised) == 1  # another teacher: made again
    assert json.loads((ddir / "manifest.json").read_text())["config_hash"] == made["config_hash"]


def test_fkd_with_extra_teachers_relabels_with_their_ensemble(setup, tmp_path):
    """Label mode fkd with extra_teachers labels with the ensemble: `ddkit run` made its store with the teacher
    alone, so the evaluation refused it (and advised a relabel that could not make an ensemble's store). The run
    now relabels with the ensemble and reuses that store; a store of the teacher alone is refused in one line
    whose advice (evaluating without the extra teachers) succeeds."""
    from ddkit.labels import SoftLabelStore, relabel
    from ddkit.pipeline import RunConfig, run
    from ddkit.teacher import teacher_ensemble

    data, teacher, _, root = setup
    extra = str(root / "teacher")  # any teacher artifact: the ensemble is another teacher all the same
    cfg = from_dict(RunConfig, {
        "dataset": {"name": "synthetic"}, "device": "cpu", "out": str(tmp_path / "run"),
        "teacher": {"model": "tiny_convnet", "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}},
        "distill": {"method": "random", "ipc": 2}, "relabel": {"epochs": 2},
        "evaluate": {"label_modes": ["fkd"], "seeds": [0], "overrides": {
            "student": "tiny_convnet", "full_reference": False, "extra_teachers": [extra],
            "train": {"epochs": 2, "batch_size": 32, "lr": 0.05}}}})
    first = run(cfg)
    own = Teacher.load(tmp_path / "run" / "teacher")
    both = teacher_ensemble([own, Teacher.load(extra)])
    store = SoftLabelStore.load(tmp_path / "run" / "labels")
    assert store.manifest["teacher"]["fingerprint"] == both.fingerprint != own.fingerprint
    assert first["evaluations"][0]["teacher"]["weights_sha"] == both.fingerprint
    assert run(cfg)["reused"] == ["teacher", "distilled", "labels", "eval-fkd.json"]
    # the store records the ensemble's other members (it named the teacher alone, with the ensemble's fingerprint),
    # and an evaluation with the teacher alone is told to pass them (it was told to pass "the same teacher")
    from ddkit.describe import describe

    assert store.manifest["teacher"]["extra_teachers"] == [extra]
    shown = describe(tmp_path / "run" / "labels")
    assert f"teacher {both.fingerprint} (ensemble with extra_teachers {extra}), " in shown
    made_by_run = resolve_protocol("dc-protocol", {
        "student": "tiny_convnet", "label_mode": "fkd", "fkd_store": str(tmp_path / "run" / "labels"),
        "random_baseline": False, "full_reference": False, "train": {"epochs": 1, "batch_size": 32}})
    with pytest.raises(DDKitError, match=rf"^soft-label store was made by the ensemble {both.fingerprint} of teacher "
                       rf"'{tmp_path / 'run' / 'teacher'}' and extra_teachers \['{extra}'\], not by {own.fingerprint}; "
                       rf'pass that teacher with --set "extra_teachers=\[{extra}\]"$'):
        evaluate(tmp_path / "run" / "distilled", made_by_run, [0], data=data, teacher=own)
    advised = resolve_protocol(made_by_run, {"extra_teachers": [extra]})
    assert evaluate(tmp_path / "run" / "distilled", advised, [0], data=data, teacher=own)["teacher"]["weights_sha"] == (
        both.fingerprint)
    alone = relabel(tmp_path / "run" / "distilled", own, 2, out=tmp_path / "alone.fkd")
    assert "extra_teachers" not in alone.manifest["teacher"]  # the store of one teacher is as it was
    protocol = resolve_protocol("dc-protocol", {
        "student": "tiny_convnet", "label_mode": "fkd", "fkd_store": str(alone.path), "random_baseline": False,
        "full_reference": False, "extra_teachers": [extra], "train": {"epochs": 1, "batch_size": 32}})
    with pytest.raises(DDKitError, match=rf"^the FKD store was labelled by teacher {own.fingerprint} alone, but "
                       rf"with the protocol's extra_teachers label mode fkd uses their ensemble {both.fingerprint}; "
                       r"evaluate without them \(--set extra_teachers=\[\]\)"):
        evaluate(tmp_path / "run" / "distilled", protocol, [0], data=data, teacher=own)
    rep = evaluate(tmp_path / "run" / "distilled", resolve_protocol(protocol, {"extra_teachers": []}), [0],
                   data=data, teacher=own)
    assert rep["teacher"]["weights_sha"] == own.fingerprint


def test_a_store_relabel_makes_with_a_runs_settings_has_the_runs_identity(tmp_path, monkeypatch):
    """`ddkit run` records its labels stage's key in its store's manifest, which the store's identity hashed: the
    store `ddkit relabel` made from the same set and teacher with the same settings (the same bytes) had another
    identity, so evaluations keyed by it were not shared. The process count was hashed too, although relabel gives
    the single-process bytes on any number (2 ranks: tests/test_distributed.py). Reports a run keyed by the old
    identity are still reused; that old key (which reads the store's manifest again) is computed only for a report
    without the current key, not on every run."""
    import ddkit.pipeline as pipeline
    from ddkit.config import config_hash
    from ddkit.labels import relabel
    from ddkit.labels.fkd import FILE, store_identity
    from ddkit.pipeline import RunConfig, run

    legacy_keys = []
    inputs = pipeline.protocol_inputs
    monkeypatch.setattr(pipeline, "protocol_inputs", lambda p, legacy=False: legacy_keys.append(legacy) or inputs(
        p, legacy))

    cfg = from_dict(RunConfig, {
        "dataset": {"name": "synthetic"}, "device": "cpu", "out": str(tmp_path / "run"),
        "teacher": {"model": "tiny_convnet", "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}},
        "distill": {"method": "random", "ipc": 2}, "relabel": {"epochs": 2},
        "evaluate": {"label_modes": ["fkd"], "seeds": [0], "overrides": {
            "student": "tiny_convnet", "full_reference": False, "random_baseline": False,
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}}}})
    run(cfg)
    assert run(cfg)["reused"] == ["teacher", "distilled", "labels", "eval-fkd.json"]  # by the current key
    assert legacy_keys == [False, False]  # one key per run: no report (first run), then one with that key
    labels = tmp_path / "run" / "labels"
    made = relabel(tmp_path / "run" / "distilled", tmp_path / "run" / "teacher", 2, out=tmp_path / "made.fkd")
    assert (labels / FILE).read_bytes() == (made.path / FILE).read_bytes()
    assert "config_hash" in json.loads((labels / "manifest.json").read_text())  # the run's key: kept, not hashed
    assert store_identity(labels) == store_identity(made.path) == store_identity(made) != store_identity(
        labels, legacy=True)
    # as a 2-process relabel records it
    man = json.loads((made.path / "manifest.json").read_text())
    man["run"]["world_size"] = 2
    (made.path / "manifest.json").write_text(json.dumps(man))
    assert store_identity(made.path) == store_identity(labels)

    report = tmp_path / "run" / "eval-fkd.json"
    rep = json.loads(report.read_text())
    assert rep["fkd_store"]["identity"] == store_identity(labels)
    protocol = cfg.evaluate.protocols(fkd_store=str(labels))[0]
    rep["run_hash"] = config_hash({  # the key ddkit until 2026-12-07 gave it
        "protocol": protocol.hash, "seeds": [0],
        "distilled": json.loads((tmp_path / "run/distilled/manifest.json").read_text())["config_hash"],
        "teacher": rep["teacher"]["weights_sha"], "fkd_store": store_identity(labels, legacy=True)})
    report.write_text(json.dumps(rep))
    legacy_keys.clear()
    assert run(cfg)["reused"] == ["teacher", "distilled", "labels", "eval-fkd.json"]
    assert legacy_keys == [False, True]  # the old key for the report that lacks the current one


def test_learned_lr_trains_students_with_the_sets_lr(setup, tiny_protocol, tmp_path):
    """learned_lr (MTT's evaluation): the distilled set's and the random subset's students train with
    the set's meta syn_lr, exactly as a protocol with that train.lr; sets without one are refused."""
    import copy

    from ddkit.distilled import DistilledSet

    data, _, ds, _ = setup
    with pytest.raises(DDKitError, match="set has none .*set learned_lr: false"):
        evaluate(ds, resolve_protocol(tiny_protocol, {"learned_lr": True}), [0], data=data)
    manifest = copy.deepcopy(ds.manifest)
    manifest.setdefault("meta", {})["syn_lr"] = 0.003
    learned = DistilledSet(ds.images, ds.labels, manifest)
    proto = resolve_protocol(tiny_protocol, {"learned_lr": True})
    assert proto.hash != tiny_protocol.hash and "learned_lr" not in tiny_protocol.identity()
    got = evaluate(learned, proto, [0, 1], data=data, cache_dir=tmp_path)
    assert got["learned_lr"] == 0.003
    fixed = resolve_protocol(tiny_protocol, {"train": {"lr": 0.003}})
    want = evaluate(ds, fixed, [0, 1], data=data, cache_dir=tmp_path / "other")
    assert got["results"]["distilled"] == want["results"]["distilled"]
    assert got["results"]["random"] == want["results"]["random"]
    plain = evaluate(ds, tiny_protocol, [0, 1], data=data, cache_dir=tmp_path)
    assert plain["results"]["distilled"]["per_seed"] != got["results"]["distilled"]["per_seed"]
    manifest["meta"]["syn_lr"] = -0.0066  # MTT's lr updates (lr_lr) can carry a plainly learned lr past zero
    with pytest.raises(DDKitError, match=r"set learned -0.0066 \(meta.syn_lr\), not a usable lr > 0; set learned_lr: "
                                         "false, or distil again with a smaller lr_lr or log_lr: true"):
        evaluate(DistilledSet(ds.images, ds.labels, manifest), proto, [0], data=data, cache_dir=tmp_path)
    with pytest.raises(Exception, match="learned_lr is not supported with label_mode fkd"):
        resolve_protocol(tiny_protocol, {"learned_lr": True, "label_mode": "fkd", "loss": "kl", "fkd_store": "x"})


def test_mtt_protocol_preset():
    """MTT's evaluate_synset: the DSA protocol (1000 epochs, DSA, SGD 0.9 / 5e-4, batch 256, step at
    half) with the set's learned lr."""
    import dataclasses

    p, dsa = resolve_protocol("mtt-protocol"), resolve_protocol("dsa-protocol")
    assert p.learned_lr and not dsa.learned_lr and dataclasses.replace(p, learned_lr=False) == dsa
    t = p.train
    assert (t.epochs, t.augment, t.optimizer, t.momentum, t.weight_decay, t.batch_size, t.schedule, p.label_mode) == (
        1000, "dsa", "sgd", 0.9, 5e-4, 256, "step", "hard")
    assert resolve_protocol("mtt-protocol", {"zca": True}).zca


def test_data_with_other_classes_is_named_before_its_fingerprint(setup, tiny_protocol):
    """Other class names used to be reported as an unexplained fingerprint mismatch; the classes are now
    named, and both errors point dataset.path at the set's data (the CLI says --data-path), or, for data
    built by hand (no files to point at), ask for the right bundle as data=."""
    import dataclasses

    from ddkit.data.base import load_dataset

    data, ds = setup[0], setup[2]
    renamed = dataclasses.replace(data, classes=[f"x{i}" for i in range(data.num_classes)])
    with pytest.raises(DDKitError, match=r"distilled set's classes \['class0', .*\] differ from the dataset's \['x0', "
                                         r".*\]; pass the bundle the set was made from as data=$"):
        evaluate(ds, tiny_protocol, [0], data=renamed)
    other = make_synthetic(num_classes=data.num_classes, seed=9)
    with pytest.raises(DDKitError, match="but the loaded data has .*; pass the bundle the set was made from as data=$"):
        evaluate(ds, tiny_protocol, [0], data=other)
    loaded = load_dataset(DatasetConfig(name="synthetic", options={"num_classes": data.num_classes, "seed": 9}))
    with pytest.raises(DDKitError, match="but the loaded data has .*; point dataset.path at the same files$"):
        evaluate(ds, tiny_protocol, [0], data=loaded)
    renamed = dataclasses.replace(loaded, classes=[f"x{i}" for i in range(data.num_classes)])
    renamed.config = loaded.config
    with pytest.raises(DDKitError, match=r"\]; point dataset.path at the data it was made from$"):
        evaluate(ds, tiny_protocol, [0], data=renamed)


def test_distill_and_evaluate_take_a_teacher_folder(setup, tiny_protocol, tmp_path):
    """distill(..., teacher="/path/to/teacher") failed with "'str' object has no attribute 'check_compatible'"."""
    from pathlib import Path

    data, teacher, ds, _ = setup
    cfg = DistillConfig(method="random", ipc=4, soft_labels=True)
    for given in (str(teacher.path), Path(teacher.path)):
        by_path = distill(data, cfg, DatasetConfig(name="synthetic"), tmp_path / f"by-{type(given).__name__}", given)
        assert by_path.manifest["teacher"] == {"path": str(teacher.path), "weights_sha": teacher.fingerprint}
        assert torch.equal(by_path.soft_labels, ds.soft_labels)  # the same logits as from the loaded teacher
    for bad in (5, ["t"]):
        with pytest.raises(DDKitError) as err:
            distill(data, cfg, DatasetConfig(name="synthetic"), tmp_path / "bad", bad)
        assert str(err.value) == ("teacher must be a Teacher or the folder path (str or Path) of a teacher "
                                  f"artifact, got {type(bad).__name__} {bad!r}; pass the teacher's folder or "
                                  "Teacher.load(folder)")
        assert not (tmp_path / "bad").exists()
    stored = resolve_protocol(tiny_protocol, {"label_mode": "stored", "full_reference": False})
    rep = evaluate(ds, stored, [0], data=data, teacher=str(teacher.path))
    assert rep["teacher"]["weights_sha"] == teacher.fingerprint
    with pytest.raises(DDKitError, match=r"^teacher must be a Teacher or the folder path .*, got int 3;"):
        evaluate(ds, stored, [0], data=data, teacher=3)


def test_evaluate_takes_a_protocol_preset_name_or_yaml_file(setup, tiny_protocol, tmp_path):
    """evaluate(path, "dc-protocol") failed with "'str' object has no attribute 'label_mode'"."""
    import yaml

    from ddkit.config import to_dict
    from ddkit.errors import ConfigError

    data, _, ds, _ = setup
    quick = resolve_protocol(tiny_protocol, {"full_reference": False, "random_baseline": False})
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump(to_dict(quick)))
    want = evaluate(ds, quick, [0], data=data)["results"]
    for spec in (str(path), path):  # each in a cache of its own: trained again, not read back
        rep = evaluate(ds, spec, [0], data=data, cache_dir=tmp_path / f"cache-{type(spec).__name__}")
        assert rep["protocol_hash"] == quick.hash and rep["results"] == want
    # a preset name is resolved: the run gets as far as the data check (no training needed to show it)
    with pytest.raises(DDKitError, match="but the loaded data has"):
        evaluate(ds, "dc-protocol", [0], data=make_synthetic(num_classes=data.num_classes, seed=9))
    with pytest.raises(DDKitError, match=r"unknown protocol 'dc-protocl'; did you mean 'dc-protocol'\?"):
        evaluate(ds, "dc-protocl", [0], data=data)
    for bad in (5, None, ["dc-protocol"]):
        with pytest.raises(ConfigError) as err:
            evaluate(ds, bad, [0], data=data)
        assert str(err.value) == ("protocol must be a ProtocolConfig, a preset name (`ddkit list "
                                  f"protocols`) or a YAML file's path, got {type(bad).__name__} {bad!r}; pass one of "
                                  "them, e.g. 'dc-protocol'")


def test_library_calls_refuse_wrong_arguments_in_one_line(setup, tiny_protocol, tmp_path):
    """Seeds, devices, data and configs given wrongly to the library raised raw torch/Python errors, or (seed
    -1) ran a whole evaluation; a dataset_cfg that disagreed with the data was recorded, and the set could not
    be evaluated later."""
    import numpy as np

    from ddkit.config import ConfigError
    from ddkit.data.base import load_dataset
    from ddkit.labels import relabel

    data, teacher, ds, _ = setup
    for seeds, msg in ((-1, r"must be a list of integers such as \[0, 1, 2\], got -1"),
                       ("0", r"must be a list of integers such as \[0, 1, 2\], got '0'"),
                       ([-1], r"^evaluation seeds: seeds must lie in \[0, 2\^32\), got -1$"),
                       ([0.5], r"^evaluation seeds must be integers, got 0.5 in \[0.5\]$")):
        with pytest.raises(ConfigError, match=msg):
            evaluate(ds, tiny_protocol, seeds, data=data)
    with pytest.raises(DDKitError, match=r"^unknown device 'gpu'; use cpu, cuda, cuda:N or auto$"):
        evaluate(ds, tiny_protocol, [0], data=data, device="gpu")
    with pytest.raises(DDKitError, match=r"^data must be a loaded DataBundle, got DatasetConfig .*; load it with "
                                         r"ddkit.data.load_dataset\(name or DatasetConfig\)$"):
        distill(DatasetConfig(name="synthetic"), DistillConfig(method="random", ipc=1))
    with pytest.raises(DDKitError, match=r"^data must be a loaded DataBundle, got NoneType"):
        train_teacher(None, TeacherConfig(model="tiny_convnet"))
    with pytest.raises(DDKitError, match=r"^unknown device 'gpu'"):
        distill(data, DistillConfig(method="random", ipc=1), DatasetConfig(name="synthetic"), device="gpu")

    loaded = load_dataset("synthetic", train_per_class=6)
    assert loaded.config == DatasetConfig(name="synthetic", train_per_class=6)
    with pytest.raises(ConfigError, match=r"^dataset_cfg does not describe the data it is given \(train_per_class None "
                                          r"vs 6, as loaded\); pass the config the data was loaded with"):
        distill(loaded, DistillConfig(method="random", ipc=1), DatasetConfig(name="synthetic"), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    made = distill(loaded, DistillConfig(method="random", ipc=1), out=tmp_path / "own")  # the data's own config
    assert made.manifest["dataset_config"]["train_per_class"] == 6
    assert evaluate(tmp_path / "own", tiny_protocol, np.arange(1))["seeds"] == [0]  # reloads the same data
    with pytest.raises(ConfigError, match=r"^dataset_cfg is needed for data built by hand \('synthetic'\)"):
        distill(data, DistillConfig(method="random", ipc=1))

    # relabel takes folders, as distill and evaluate do
    store = relabel(str(ds.path), str(teacher.path), epochs=1)
    assert store.manifest["teacher"]["fingerprint"] == teacher.fingerprint and store.manifest["epochs"] == 1
    with pytest.raises(DDKitError, match=r"^teacher must be a Teacher, its artifact folder or a module, got int$"):
        relabel(ds, 3, epochs=1)


def test_progress_is_called_as_every_stage_calls_it(setup, tiny_protocol, tmp_path):
    """evaluate called progress(label, epoch, total) where train_teacher, distill and relabel call
    progress(step, total, record): a callback written for the other stages got a string as its step. Now
    every student reports (epoch, epochs, record) with the student named in record["stage"]."""
    data, _, ds, _ = setup
    calls = []
    proto = resolve_protocol(tiny_protocol, {"full_epochs": 2, "train": {"epochs": 3}})
    evaluate(ds, proto, [0], data=data, cache_dir=tmp_path,
             progress=lambda step, total, record: calls.append((step, total, record["stage"], "loss" in record)))
    assert [c[:3] for c in calls] == (
        [(e, 3, "distilled, seed 0") for e in range(4)] + [(e, 3, "random subset, seed 0") for e in range(4)]
        + [(e, 2, "full data, seed 0") for e in range(3)])
    assert all(has_loss == (step > 0) for step, _, _, has_loss in calls)  # the epoch's record, as train_teacher's


def test_protocol_picks_the_loss_of_a_soft_label_mode_as_resolve_protocol_does():
    """ProtocolConfig(label_mode="teacher") was refused ("set loss=kl") where resolve_protocol and `ddkit run`
    switch to kl themselves; a loss given explicitly is still checked, and every preset keeps its hash."""
    from ddkit.config import ConfigError
    from ddkit.evaluate.protocol import PROTOCOLS, ProtocolConfig

    for mode in ("teacher", "stored", "fkd"):
        assert ProtocolConfig(label_mode=mode) == resolve_protocol("dc-protocol", {"label_mode": mode})
        assert ProtocolConfig(label_mode=mode).loss == "kl"
    assert ProtocolConfig().loss == "ce" and ProtocolConfig(label_mode="teacher", loss="mse_ce").loss == "mse_ce"
    with pytest.raises(ConfigError, match=r"^label_mode 'teacher' needs loss 'kl' or 'mse_ce'; set loss=kl$"):
        ProtocolConfig(label_mode="teacher", loss="ce")
    with pytest.raises(ConfigError, match=r"^label_mode 'hard' needs loss 'ce', got 'kl'"):
        ProtocolConfig(loss="kl")
    # the presets' hashes key cached evaluations: unchanged by the new default (cvdd's changed on 2026-12-07 with its
    # teacher_bn_batch 8; it was 1b41253b1c9e3d93)
    assert {k: PROTOCOLS.get(k)().hash for k in PROTOCOLS.list()} == {
        "cvdd": "eb26960c58ee238d", "dc-protocol": "26ab4d31935aff70", "demo": "c3ee88bcf436d67d",
        "dsa-protocol": "34feb71c5412d85e", "edc": "ce8aae6a0441945b", "mtt-protocol": "70fc2691509dc513",
        "soft-kl": "7d9477511be45149"}



def test_edc_protocol_lists_what_it_leaves_out_of_edcs_scripts():
    """QA 18b F1: the `edc` preset trains without the CutMix every EDC evaluation script applies to every batch, and
    called its batch 50 "EDC's CIFAR branch" (CIFAR-100's batch 50 trains with SGD). Recorded benches use the preset,
    so it stays; its docstring and the README say what it leaves out and how to switch CutMix on."""
    import inspect

    from ddkit.evaluate.protocol import PROTOCOLS

    assert resolve_protocol("edc").train.cutmix_prob == 0.0
    on = resolve_protocol("edc", {"train": {"cutmix_prob": 1.0}})  # the switch the docs name, taken as given
    assert (on.train.cutmix_prob, on.loss) == (1.0, "mse_ce")
    doc = " ".join(inspect.getdoc(PROTOCOLS.get("edc")).split())
    assert "without EDC's CutMix and RandAugment" in doc
    assert "``train.cutmix_prob: 1.0`` switches ddkit's on" in doc
    assert "where EDC's ``mse_gt`` takes it on the unmixed labels" in doc
    assert "batch 50 with AdamW 1e-3 is the ImageNet-10 script's" in doc
    assert "the CIFAR-100 script's batch 50 trains with SGD" in doc
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "`edc` (EDC's recipe without its CutMix and RandAugment" in readme
    assert "`--set train.cutmix_prob=1.0` switches ddkit's on" in readme


def test_edc_protocol_says_edc_labels_with_its_teacher_pool_and_how_to_get_that():
    """QA 22f F2: every EDC branch's train/direct_train.py trains the student on the mean logits of its whole teacher
    pool; the `edc` preset (and the edc-protocol bench, "EDC's own recipe") labels with one teacher, which its list
    of differences left out. The docstring, the extra_teachers help, the README and the bench's header say so, and
    the syntax they give for EDC's form resolves to the ensemble in evaluate, run and bench."""
    import inspect

    from ddkit.bench import load_bench_config
    from ddkit.config import apply_overrides, load_yaml
    from ddkit.evaluate.protocol import PROTOCOLS, ProtocolConfig
    from ddkit.pipeline import RunConfig

    counts = "CIFAR-10: 8 models, CIFAR-100 and Tiny-ImageNet: 5, ImageNet-10: 4"
    doc = " ".join(inspect.getdoc(PROTOCOLS.get("edc")).split())
    assert "- one teacher: every EDC branch's ``train/direct_train.py`` labels each batch with the mean logits" in doc
    assert counts in doc and "``extra_teachers: []``" in doc
    assert "--set 'extra_teachers=[T2, T3]'``" in doc and "--set 'evaluate.overrides.extra_teachers=[T2, T3]'``" in doc
    assert "CIFAR-10 8 models, CIFAR-100 and Tiny-ImageNet 5, ImageNet-10 4, where the edc preset uses the teacher" in (
        ProtocolConfig.__dataclass_fields__["extra_teachers"].metadata["help"])
    readme = " ".join((REPO / "README.md").read_text().split())
    assert ("every EDC branch's `train/direct_train.py` labels with the mean logits of its whole teacher pool "
            f"({counts};") in readme
    bench_file = REPO / "configs/bench/fashion-mnist-edc-protocol-cpu.yaml"
    header = " ".join(line.lstrip("# ") for line in bench_file.read_text().splitlines() if line.startswith("#"))
    assert "EDC's evaluation labels with the mean logits of its whole teacher pool" in header
    assert "--set \"overrides.extra_teachers=[$P@d2, $P@d4]\"" in header
    # the documented syntax: the ensemble in the protocol, the recorded bench's settings kept
    assert resolve_protocol("edc").extra_teachers == []
    overrides: dict = {}
    apply_overrides(overrides, ["extra_teachers=[T2, T3]"])
    assert resolve_protocol("edc", overrides).extra_teachers == ["T2", "T3"]
    run = {"dataset": {"name": "synthetic"}, "teacher": {"model": "tiny_convnet"}, "distill": {"method": "random"},
           "evaluate": {"protocol": "edc"}}
    apply_overrides(run, ["evaluate.overrides.extra_teachers=[T2, T3]"])
    assert [p.extra_teachers for p in from_dict(RunConfig, run).evaluate.protocols()] == [["T2", "T3"]]
    pool = "runs/bench/fashion-mnist-edc-protocol-cpu/teachers/fashion-mnist"
    bench = load_bench_config(bench_file, ["out=runs/bench/fashion-mnist-edc-protocol-ens-cpu",
                                           f"overrides.extra_teachers=[{pool}@d2, {pool}@d4]"])
    plain = load_bench_config(bench_file)
    assert [Path(t).parts[-1] for t in bench.overrides["extra_teachers"]] == ["fashion-mnist@d2", "fashion-mnist@d4"]
    assert {k: v for k, v in bench.overrides.items() if k != "extra_teachers"} == plain.overrides
    assert "extra_teachers" not in load_yaml(bench_file).get("overrides", {})


def test_data_built_by_hand_goes_through_every_stage_once_saved(tiny_protocol, tmp_path):
    """A DataBundle built from tensors in memory could be distilled only with a DatasetConfig naming no
    registered dataset, which the set recorded and evaluation could not load ("unknown dataset 'mine'").
    save_tensors writes the tensors source's file and returns the config that loads the same data."""
    from ddkit.config import ConfigError
    from ddkit.data import DataBundle, ImageSet, load_dataset, save_tensors

    g = torch.Generator().manual_seed(0)

    def split(n):
        y = torch.arange(3).repeat_interleave(n)
        return ImageSet(((torch.rand(len(y), 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1) * 0.2) / 1.5).clamp(0, 1), y)

    data = DataBundle(name="mine", train=split(12), test=split(4), classes=["a", "b", "c"], mean=(0.5,), std=(0.3,))
    with pytest.raises(ConfigError, match=r"^dataset_cfg names dataset 'mine', which no registered source loads, .*"
                                          r"dataset_cfg=ddkit.data.save_tensors\(data, 'data.safetensors'\)"):
        distill(data, DistillConfig(method="random", ipc=2), DatasetConfig(name="mine"))
    with pytest.raises(ConfigError, match=r"^dataset_cfg is needed for data built by hand .*ddkit.data.save_tensors"):
        distill(data, DistillConfig(method="random", ipc=2))
    cfg = save_tensors(data, tmp_path / "mine.safetensors")
    assert cfg == DatasetConfig(name="tensors", path=str(tmp_path / "mine.safetensors"))
    assert [p.name for p in tmp_path.iterdir()] == ["mine.safetensors"]  # written atomically: no temporary left
    again = load_dataset(cfg)
    assert (again.fingerprint, again.classes, again.mean, again.std) == (data.fingerprint, data.classes, data.mean,
                                                                         data.std)
    ds = distill(data, DistillConfig(method="random", ipc=2), cfg, out=tmp_path / "set")
    proto = resolve_protocol(tiny_protocol, {"full_reference": False, "train": {"epochs": 2}})
    rep = evaluate(tmp_path / "set", proto, [0], cache_dir=tmp_path / "cache")  # the data reloaded from the file
    assert rep["distilled"]["dataset_fingerprint"] == data.fingerprint == ds.manifest["dataset"]["fingerprint"]
    with pytest.raises(ConfigError, match=r"^save_tensors writes a .safetensors file"):
        save_tensors(data, tmp_path / "mine.pt")


def test_torchrun_ranks_share_out_students_not_seeds(setup, tiny_protocol, tmp_path, monkeypatch):
    """Ranks took whole seeds (a seed's distilled student and its random subset's): 3 seeds on 8 GPUs
    kept 3 busy. Each student is now one job, dealt round-robin, and random baselines already cached are
    read, not dealt. Rank 1 of 2 is simulated; rank 0's share arrives through the gather."""
    import ddkit.evaluate.runner as runner
    from ddkit.distributed import DistInfo

    data, _, ds, _ = setup
    protocol = dataclasses.replace(tiny_protocol, full_reference=False)
    trained = []
    monkeypatch.setattr(runner, "_train_student", lambda *a, **k: trained.append(("distilled", a[4])) or 0.5 + a[4])
    monkeypatch.setattr(runner, "_random_baseline", lambda *a, **k: trained.append(("random", a[5])) or 0.25 + a[5])
    monkeypatch.setattr(runner.ddist, "current", lambda: DistInfo(rank=1, world_size=2))
    cached = {}
    monkeypatch.setattr(runner.ddist, "broadcast_object", lambda obj, src=0: cached)  # rank 0's view of the cache
    rank0 = {}
    monkeypatch.setattr(runner.ddist, "all_gather_objects", lambda local: [rank0, local])
    monkeypatch.setattr(runner.ddist, "agree_settings", lambda settings: None)  # rank 0 was given the same

    # jobs d0 d1 d2 r0 r1 r2: rank 1 trains d1, r0, r2
    rank0.update({("distilled", 0): 0.5, ("distilled", 2): 2.5, ("random", 1): 1.25})
    rep = evaluate(ds, protocol, [0, 1, 2], data=data, cache_dir=tmp_path / "c1")
    assert trained == [("distilled", 1), ("random", 0), ("random", 2)]
    assert rep["results"]["distilled"]["per_seed"] == [0.5, 1.5, 2.5]
    assert rep["results"]["random"]["per_seed"] == [0.25, 1.25, 2.25]

    # seed 1's random baseline cached (as rank 0 found it): jobs d0 d1 d2 r0 r2, rank 1 trains d1 and r0
    trained.clear()
    cached.update({("random", 1): 1.25})
    rank0.clear()
    rank0.update({("distilled", 0): 0.5, ("distilled", 2): 2.5, ("random", 2): 2.25})
    rep = evaluate(ds, protocol, [0, 1, 2], data=data, cache_dir=tmp_path / "c2")
    assert trained == [("distilled", 1), ("random", 0)]
    assert rep["results"]["random"]["per_seed"] == [0.25, 1.25, 2.25]

    # seed 0's student of the set cached too: jobs d1 d2 r0 r2, rank 1 trains d2 and r2
    trained.clear()
    cached.update({("distilled", 0): 0.5})
    rank0.clear()
    rank0.update({("distilled", 1): 1.5, ("random", 0): 0.25})
    rep = evaluate(ds, protocol, [0, 1, 2], data=data, cache_dir=tmp_path / "c3")
    assert trained == [("distilled", 2), ("random", 2)]
    assert rep["results"]["distilled"]["per_seed"] == [0.5, 1.5, 2.5]


def test_save_tensors_writes_splits_that_share_memory(tmp_path):
    """One ImageSet as both splits (or overlapping views) made safetensors refuse the file with a raw
    "Some tensors share memory" RuntimeError; each tensor is now written from its own copy."""
    from ddkit.data import save_tensors
    from ddkit.data.base import DataBundle, ImageSet, load_dataset

    images, labels = torch.rand(6, 1, 4, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    both = ImageSet(images, labels)
    for test in (both, ImageSet(images[:3], labels[:3])):
        data = DataBundle("mine", both, test, ["a", "b", "c"], (0.5,), (0.29,))
        back = load_dataset(save_tensors(data, tmp_path / "mine.safetensors"))
        assert torch.equal(back.train.images, images) and torch.equal(back.test.images, test.images)
        assert torch.equal(back.test.labels, test.labels) and back.classes == ["a", "b", "c"]
    assert torch.equal(both.images, images)  # the caller's tensors are untouched


def test_the_callable_evaluate_module_has_the_functions_signature():
    """``ddkit.evaluate`` is the subpackage made callable; inspect (and help, IDEs) showed (*args, **kwargs)."""
    import inspect

    import ddkit
    from ddkit.evaluate.runner import evaluate as function

    assert inspect.signature(ddkit.evaluate) == inspect.signature(function)
    assert list(inspect.signature(ddkit.evaluate).parameters)[:3] == ["distilled", "protocol", "seeds"]


def test_switching_a_protocols_label_mode_picks_the_new_modes_loss():
    """The README's way to switch a protocol's mode: resolve_protocol with the new label_mode picks its loss
    (kl), also from a preset whose loss was resolved to ce; the config stays plain data (YAML, weights_only)."""
    import dataclasses
    import io

    import yaml

    from ddkit.evaluate.protocol import ProtocolConfig

    for base in (ProtocolConfig(), resolve_protocol("dc-protocol")):
        soft = resolve_protocol(base, {"label_mode": "teacher"})
        assert (soft.label_mode, soft.loss, base.loss) == ("teacher", "kl", "ce")
        assert type(soft.loss) is str and yaml.safe_load(yaml.safe_dump(dataclasses.asdict(soft)))["loss"] == "kl"
        buf = io.BytesIO()
        torch.save(dataclasses.asdict(soft), buf)
        buf.seek(0)
        assert torch.load(buf, weights_only=True)["loss"] == "kl"
    with pytest.raises(ConfigError, match=r"^label_mode 'teacher' needs loss 'kl' or 'mse_ce'; set loss=kl$"):
        dataclasses.replace(ProtocolConfig(), label_mode="teacher")


@pytest.mark.parametrize("temperature", [1e30, 1e20, 1e-39, 1e-300, 0.0, -1.0])
def test_temperatures_whose_square_or_inverse_overflow_float32_are_refused(temperature):
    """The kl loss scales by T² and divides by T in float32: T = 1e30 or 1e-300 used to train every
    student on NaN, reported as 0.00 % with exit 0."""
    with pytest.raises(ConfigError, match=r"^protocol.temperature must lie in \[1.18e-38, 1.84e\+19\] \(1/T and T² "
                                          r"finite in float32; 1 to 20 is usual\), got "):
        resolve_protocol("dc-protocol", {"temperature": temperature})
    assert resolve_protocol("dc-protocol", {"temperature": 1e19}).temperature == 1e19


def test_students_that_diverge_are_counted_in_the_report_and_not_cached(setup, tiny_protocol, tmp_path):
    """A student with NaN/inf test outputs scores 0 (counted as wrong): the report used to show 0.00 with
    nothing saying the students diverged. Reports of students that did not diverge are unchanged."""
    data, _, ds, _ = setup
    short = dataclasses.replace(tiny_protocol, full_epochs=1, train=dataclasses.replace(tiny_protocol.train, epochs=1))
    ok = evaluate(ds, short, [0], data=data, cache_dir=tmp_path / "ok")
    assert all(set(s) == {"per_seed", "mean", "std", "n"} for k, s in ok["results"].items() if k != "full")
    assert "diverged" not in ok["results"]["full"] and "diverged" not in format_table(ok)
    bad = dataclasses.replace(short, train=dataclasses.replace(short.train, lr=1e30))
    rep = evaluate(ds, bad, [0, 1], data=data, cache_dir=tmp_path / "bad", out=tmp_path / "bad.json")
    res = json.loads((tmp_path / "bad.json").read_text())["results"]
    assert res["distilled"] == res["random"] == {"per_seed": [0.0, 0.0], "diverged": 2, "mean": 0.0, "std": 0.0,
                                                 "n": 2}
    assert res["full"]["diverged"] == 1
    assert [type(v) for v in rep["results"]["distilled"]["per_seed"]] == [float, float]
    table = format_table(rep)
    assert table.count("0.00 ± 0.00 (2 diverged)") == 2 and "   0.00 (1 diverged)" in table  # full data: one seed
    # the column is widened for the mark (it pushed the seeds and bytes columns out of line); without one it is not
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1 and {line.index(" 2 ", 60) for line in lines[2:4]} == {
        lines[0].index("seeds") + 3}
    assert format_table(ok).splitlines()[0].endswith("top-1 % (mean ± std)   seeds        bytes")
    assert not list((tmp_path / "bad").glob("random-baseline/*.json"))  # a diverged student is trained again
    # the full-data reference's entry keeps its summary, mark included, so it is cached (as the docstring says)
    (entry,) = (tmp_path / "bad").glob("full-reference/*.json")
    assert json.loads(entry.read_text())["result"]["diverged"] == 1
    assert len(list((tmp_path / "ok").glob("random-baseline/*.json"))) == 1


def _spy_students(monkeypatch, ds) -> list[tuple[str, int]]:
    """The students ``evaluate`` trains from here on, as (``set`` or ``other``, seed): the set's own, or a random
    subset's (or the full data's)."""
    import ddkit.evaluate.runner as runner

    trained, real = [], runner._train_student
    monkeypatch.setattr(runner, "_train_student", lambda *a, **k: trained.append(
        ("set" if a[0].images is ds.images else "other", a[4])) or real(*a, **k))
    return trained


def test_more_seeds_train_only_the_new_students(setup, tiny_protocol, tmp_path, monkeypatch):
    """Evaluating a set with seeds 0,1 after seeds 0 trained seed 0's student again (the evaluation was cached as a
    whole, its seed list in the key). Each student of the set is now cached by what decides it: only seed 1's
    students train, and the numbers are those of an evaluation of 0,1 from scratch, bit for bit."""
    data, _, ds, _ = setup
    protocol = resolve_protocol(tiny_protocol, {"full_epochs": 1, "train": {"epochs": 3}})
    fresh = evaluate(ds, protocol, [0, 1], data=data, cache_dir=tmp_path / "fresh")
    evaluate(ds, protocol, [0], data=data, cache_dir=tmp_path / "c")
    trained = _spy_students(monkeypatch, ds)
    more = evaluate(ds, protocol, [1, 0], data=data, cache_dir=tmp_path / "c")
    assert trained == [("set", 1), ("other", 1)]  # seed 1's set and random-subset students; seed 0's from the cache
    assert more["seeds"] == [0, 1] and more["results"] == fresh["results"]
    assert more["results"]["distilled"]["per_seed"] == fresh["results"]["distilled"]["per_seed"]
    trained.clear()  # seed 1 alone: the report lists the seeds asked for, and only the full-data reference of its
    # smallest seed (now 1) trains
    assert evaluate(ds, protocol, [1], data=data, cache_dir=tmp_path / "c")["results"]["distilled"] == {
        "per_seed": fresh["results"]["distilled"]["per_seed"][1:], "mean": fresh["results"]["distilled"]["per_seed"][1],
        "std": 0.0, "n": 1}
    assert trained == [("other", 1)]
    entry = json.loads(next((tmp_path / "c" / "distilled-student").glob("*.json")).read_text())
    assert {k: entry[k] for k in ("kind", "label_mode", "method", "ipc", "protocol_hash", "device")} == {
        "kind": "distilled-student-cache", "label_mode": "hard", "method": "random", "ipc": 4,
        "protocol_hash": protocol.hash, "device": "cpu"}


def test_baseline_toggles_train_only_the_baselines_students(setup, tiny_protocol, tmp_path, monkeypatch):
    """Turning random_baseline on trained the set's students again (the protocol's hash keyed the whole
    evaluation); turning full_reference off did too. Only the random subsets' students train now."""
    data, _, ds, _ = setup
    protocol = resolve_protocol(tiny_protocol, {"full_reference": False, "random_baseline": False,
                                                "train": {"epochs": 3}})
    evaluate(ds, protocol, [0, 1], data=data, cache_dir=tmp_path / "c")
    trained = _spy_students(monkeypatch, ds)
    with_random = resolve_protocol(protocol, {"random_baseline": True})
    rep = evaluate(ds, with_random, [0, 1], data=data, cache_dir=tmp_path / "c")
    assert trained == [("other", 0), ("other", 1)]
    assert rep["results"] == evaluate(ds, with_random, [0, 1], data=data, cache_dir=tmp_path / "fresh")["results"]
    trained.clear()
    both = resolve_protocol(with_random, {"full_reference": True, "full_epochs": 1})
    assert set(evaluate(ds, both, [0, 1], data=data, cache_dir=tmp_path / "c")["results"]) == {
        "distilled", "random", "full"}
    assert trained == [("other", 0)]  # the full-data student only
    trained.clear()
    assert evaluate(ds, protocol, [0, 1], data=data, cache_dir=tmp_path / "c")["results"] == {
        "distilled": rep["results"]["distilled"]}
    assert trained == []


def test_a_killed_evaluation_keeps_the_students_it_finished(setup, tiny_protocol, tmp_path, monkeypatch):
    """Each of the set's students is cached as soon as it is trained: an evaluation stopped at its second student
    trains only that one (and the rest) when run again."""
    import ddkit.evaluate.runner as runner

    data, _, ds, _ = setup
    protocol = resolve_protocol(tiny_protocol, {"full_reference": False, "random_baseline": False,
                                                "train": {"epochs": 2}})
    real = runner._train_student

    def stopped(*a, **k):
        if a[4] == 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner, "_train_student", stopped)
    with pytest.raises(KeyboardInterrupt):
        evaluate(ds, protocol, [0, 1], data=data, cache_dir=tmp_path / "c")
    monkeypatch.setattr(runner, "_train_student", real)
    trained = _spy_students(monkeypatch, ds)
    rep = evaluate(ds, protocol, [0, 1], data=data, cache_dir=tmp_path / "c")
    assert trained == [("set", 1)]
    assert rep["results"] == evaluate(ds, protocol, [0, 1], data=data, cache_dir=tmp_path / "fresh")["results"]


def test_student_cache_keys_follow_what_decides_the_student(setup, tiny_protocol, tmp_path):
    """The key of a set's student: its seed, the protocol's training, the set's content (images, labels; its soft
    labels in label mode stored only), the teacher in label mode teacher only (stored and fkd replay labels); not the
    other seeds or the baselines."""
    from ddkit.distilled import DistilledSet
    from ddkit.evaluate.runner import student_cache_path

    data, teacher, ds, _ = setup

    def key(protocol=tiny_protocol, seed=0, s=ds, t=None):
        return student_cache_path(protocol, data, t, None, s, seed, tmp_path).name

    base = key()
    assert key(seed=1) != base and key(resolve_protocol(tiny_protocol, {"train": {"epochs": 31}})) != base
    toggled = resolve_protocol(tiny_protocol, {"random_baseline": False, "full_reference": False, "full_seeds": 3,
                                               "train": {"eval_batch_size": 7}}, check_inert=False)
    assert key(toggled) == base and key(t=teacher) == base  # hard labels ask no teacher
    edited = DistilledSet(ds.images.clone(), ds.labels, ds.manifest, ds.soft_labels)
    assert key(s=edited) == base
    edited.images[0, 0, 0, 0] += 1  # one pixel, edited in place
    assert key(s=edited) != base
    stored = resolve_protocol(tiny_protocol, {"label_mode": "stored"})
    other_soft = DistilledSet(ds.images, ds.labels, ds.manifest, ds.soft_labels + 1)
    assert key(stored, t=teacher) != key(stored, s=other_soft, t=teacher)
    assert key(stored, t=teacher) == key(stored)  # the set's soft labels, not the teacher, label its student
    soft = resolve_protocol(tiny_protocol, {"label_mode": "teacher"})
    assert key(soft, t=teacher) == key(soft, s=other_soft, t=teacher) != key(soft, t=None)
    # label mode fkd: the store by its content, not its path
    from ddkit.labels import relabel

    fkd = resolve_protocol(tiny_protocol, {"label_mode": "fkd", "fkd_store": "somewhere"})
    stores = [relabel(ds, teacher, epochs=1, augment="flip", cutmix_prob=0.0, seed=s) for s in (0, 0, 1)]
    keys = [student_cache_path(fkd, data, teacher, st, ds, 0, tmp_path).name for st in stores]
    moved = resolve_protocol(fkd, {"fkd_store": "elsewhere"})
    assert keys[0] == keys[1] == student_cache_path(moved, data, teacher, stores[0], ds, 0, tmp_path).name != keys[2]
    assert keys[0] == student_cache_path(fkd, data, None, stores[0], ds, 0, tmp_path).name  # the store, not the teacher


def _tiny_run(out: Path, seeds: list[int], **overrides):
    from ddkit.pipeline import RunConfig

    return from_dict(RunConfig, {
        "dataset": {"name": "synthetic"}, "device": "cpu", "out": str(out), "teacher": None,
        "distill": {"method": "random", "ipc": 2},
        "evaluate": {"label_modes": ["hard"], "seeds": seeds, "overrides": {
            "student": "tiny_convnet", "full_epochs": 1, "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
            **overrides}}})


def test_a_run_given_more_seeds_trains_only_theirs(tmp_path, monkeypatch):
    """`ddkit run` with seeds 0,1 after a run with seed 0 trained seed 0's students again; now only seed 1's, and the
    run's report holds what a run with seeds 0,1 from scratch gives."""
    import ddkit.evaluate.runner as runner
    from ddkit.pipeline import run

    monkeypatch.setenv("DDKIT_CACHE", str(tmp_path / "fresh-cache"))
    fresh = run(_tiny_run(tmp_path / "fresh", [0, 1]))["evaluations"][0]
    monkeypatch.setenv("DDKIT_CACHE", str(tmp_path / "cache"))
    run(_tiny_run(tmp_path / "run", [0]))
    trained, real = [], runner._train_student
    monkeypatch.setattr(runner, "_train_student", lambda *a, **k: trained.append((len(a[0]), a[4])) or real(*a, **k))
    more = run(_tiny_run(tmp_path / "run", [0, 1]))
    assert trained == [(8, 1), (8, 1)]  # seed 1's set and random subset (2 images of 4 classes each)
    assert more["reused"] == ["distilled"] and more["evaluations"][0]["results"] == fresh["results"]
    saved = json.loads((tmp_path / "run" / "eval-hard.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["results"] == fresh["results"]
    assert json.loads((tmp_path / "run" / "report" / "eval.json").read_text())["evaluations"][0]["seeds"] == [0, 1]


def test_a_run_evaluated_before_students_were_cached_is_reused_unchanged(tmp_path, monkeypatch):
    """A run folder whose evaluation was made before the students were cached one by one (here: the cache of
    them removed) is reused as it was when run again unchanged: no student trains, its report stays."""
    import shutil

    import ddkit.evaluate.runner as runner
    from ddkit.pipeline import run

    first = run(_tiny_run(tmp_path / "run", [0, 1], random_baseline=False))
    shutil.rmtree(tmp_path / "cache" / "distilled-student")
    report = tmp_path / "run" / "eval-hard.json"
    before = report.read_bytes()
    monkeypatch.setattr(runner, "_train_student", lambda *a, **k: pytest.fail("a student was trained again"))
    again = run(_tiny_run(tmp_path / "run", [0, 1], random_baseline=False))
    assert again["reused"] == ["distilled", "eval-hard.json"] and report.read_bytes() == before
    assert again["evaluations"][0]["results"] == first["evaluations"][0]["results"]


def test_report_folder_is_tried_by_rank_0_and_every_rank_stops_on_its_verdict(tmp_path, monkeypatch):
    """Only rank 0 writes the report: a rank that could not write there (another node's file system) does not stop
    alone, leaving the others waiting; when rank 0 cannot, every rank stops with its one line. (The same check,
    ddkit.artifacts.check_writable, guards the outputs of distill, relabel, train_teacher, run and run_bench.)"""
    import errno
    import os

    from ddkit import distributed as ddist
    from ddkit.artifacts import WriteFailure
    from ddkit.evaluate import runner

    tried, real_open = [], os.open

    def unwritable(path, flags, *args, **kw):
        if Path(path).parent == tmp_path and flags & os.O_CREAT:
            tried.append(path)
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", unwritable)
    monkeypatch.setattr(ddist, "current", lambda: ddist.DistInfo(rank=1, world_size=2))
    out = tmp_path / "eval.json"
    monkeypatch.setattr(ddist, "broadcast_object", lambda obj, src=0: None)  # rank 0 could write there
    runner.check_report_out(out)
    monkeypatch.setattr(ddist, "broadcast_object", lambda obj, src=0: (str(out), "Permission denied", 13))
    with pytest.raises(WriteFailure, match="Permission denied") as failed:
        runner.check_report_out(out)
    assert tried == [] and "eval.json" in str(failed.value) and "\n" not in str(failed.value)
    monkeypatch.setattr(ddist, "current", lambda: ddist.DistInfo())  # one process: it tries the folder itself
    monkeypatch.setattr(ddist, "broadcast_object", lambda obj, src=0: obj)
    with pytest.raises(WriteFailure):
        runner.check_report_out(out)
    assert len(tried) == 1 and list(tmp_path.iterdir()) == []


def _pinned_keys(cache: Path) -> tuple[str, str, str]:
    """The keys of a distilled set's, a random subset's and the full data's student of one fixed small evaluation
    (1 torch thread, on the CPU), without training any (the full-data reference's key from its result)."""
    import ddkit.evaluate.runner as runner
    from ddkit.distilled import DistilledSet
    from ddkit.evaluate.runner import full_reference, random_cache_path, student_cache_path

    torch.set_num_threads(1)  # the conftest gives the next test its own count back
    data = make_synthetic()
    protocol = resolve_protocol("dc-protocol", {"student": "tiny_convnet", "full_epochs": 1,
                                                "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}})
    ds = DistilledSet(data.train.images[:8], data.train.labels[:8], {"dataset": data.describe()})
    real, runner._train_student = runner._train_student, lambda *a, **k: 0.5
    try:
        full = full_reference(data, protocol, [0], "cpu", cache)["key"]
    finally:
        runner._train_student = real
    return (student_cache_path(protocol, data, None, None, ds, 0, cache).stem,
            random_cache_path(protocol, data, None, None, 2, 0, cache).stem, full)


def test_a_new_revision_of_student_training_trains_every_cached_student_again(setup, tiny_protocol, tmp_path,
                                                                             monkeypatch):
    """No revision of ddkit's student training keyed the cached students: after a fix to it, every student came
    back from the cache with the old numbers until `ddkit cache prune`. ddkit.cache.STUDENT_REVISION now keys them
    all from 2 on; at 1 every key is the one ddkit gave before it existed (users' caches stay valid)."""
    import ddkit.cache
    from ddkit.cache import cache_entries
    from ddkit.describe import describe

    # the keys ddkit gave before the revision was counted (computed with ddkit at commit bcee3df)
    assert _pinned_keys(tmp_path / "pin") == ("016d494fd2240909", "6ccf4e72c63cbd08", "8e05cbfce16638d9")
    monkeypatch.setattr(ddkit.cache, "STUDENT_REVISION", 2)
    bumped = _pinned_keys(tmp_path / "pin")
    assert all(a != b for a, b in zip(bumped, ("016d494fd2240909", "6ccf4e72c63cbd08", "8e05cbfce16638d9")))
    monkeypatch.setattr(ddkit.cache, "STUDENT_REVISION", 1)

    data, _, ds, _ = setup
    protocol = resolve_protocol(tiny_protocol, {"full_epochs": 1, "train": {"epochs": 1}})
    before = evaluate(ds, protocol, [0], data=data, cache_dir=tmp_path / "c")
    trained = _spy_students(monkeypatch, ds)
    evaluate(ds, protocol, [0], data=data, cache_dir=tmp_path / "c")
    assert trained == []  # all three from the cache
    monkeypatch.setattr(ddkit.cache, "STUDENT_REVISION", 2)
    again = evaluate(ds, protocol, [0], data=data, cache_dir=tmp_path / "c")
    assert trained == [("set", 0), ("other", 0), ("other", 0)]  # the set's, the random subset's, the full data's
    assert {k: {f: v for f, v in r.items() if f != "key"} for k, r in again["results"].items()} == {
        k: {f: v for f, v in r.items() if f != "key"} for k, r in before["results"].items()}  # the same numbers
    entries = [e for e in cache_entries(tmp_path / "c") if e.state == "entry" and e.path.suffix == ".json"]
    assert sorted((e.kind, json.loads(e.path.read_text()).get("revision", 1), e.stale) for e in entries) == [
        ("distilled-student", 1, "student revision 1"), ("distilled-student", 2, ""),
        ("full-reference", 1, "student revision 1"), ("full-reference", 2, ""),
        ("random-baseline", 1, "student revision 1"), ("random-baseline", 2, "")]
    old = next(e.path for e in entries if e.kind == "random-baseline" and e.stale)
    assert describe(old).endswith(" torch threads on cpu (made by revision 1 of ddkit's student training, this "
                                  "ddkit's is 2: never read again; `ddkit cache prune --stale` removes it)")


def test_cuda_students_are_keyed_by_their_kernels_gpu_and_libraries(setup, tiny_protocol, tmp_path, monkeypatch):
    """On CUDA a cached student's key said only "cuda": students trained with TF32 on, with nondeterministic
    kernels, on another GPU model or CUDA/cuDNN version came back from the cache as if trained as asked. These now key
    CUDA students (and are recorded in their entries); CPU keys are unchanged."""
    import ddkit.evaluate.runner as runner
    from ddkit.evaluate.runner import random_cache_path, student_cache_path

    data, _, ds, _ = setup
    protocol = resolve_protocol(tiny_protocol, {"full_epochs": 1, "train": {"epochs": 1}})
    cpu = _pinned_keys(tmp_path / "pin")
    real_name = torch.cuda.get_device_name
    fake_cuda(monkeypatch)
    assert _pinned_keys(tmp_path / "pin") == cpu  # nothing of CUDA is asked for a CPU key
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: pytest.fail("asked a GPU for a CPU key"))
    _pinned_keys(tmp_path / "pin")
    monkeypatch.setattr(torch.cuda, "get_device_name", real_name)
    fake_cuda(monkeypatch)

    def keys() -> tuple[str, str]:
        return (student_cache_path(protocol, data, None, None, ds, 0, tmp_path, device="cuda").name,
                random_cache_path(protocol, data, None, None, 4, 0, tmp_path, device="cuda:0").name)

    def full_key() -> str:
        with monkeypatch.context() as m:
            m.setattr(runner, "_train_student", lambda *a, **k: 0.5)
            m.setattr(runner, "_write_cache", lambda *a: None)
            return runner.full_reference(data, protocol, [0], "cuda", tmp_path)["key"]

    # torch.backends.cuda.matmul is no plain object (monkeypatch cannot restore it): set, then restored by hand
    tf32_flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        plain = (*keys(), full_key())
        assert runner.trained_on("cuda")["cuda"] == {
            "deterministic": True, "tf32_matmul": False, "tf32_cudnn": False, "float32_matmul_precision": "highest",
            "gpu": "NVIDIA H100 80GB HBM3", "cuda_version": "12.4", "cudnn_version": 90100}
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = (*keys(), full_key())
        torch.backends.cuda.matmul.allow_tf32 = False
        assert (*keys(), full_key()) == plain
        torch.backends.cudnn.allow_tf32 = True
        conv_tf32 = keys()
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("high")  # TF32 in matmuls, as allow_tf32 says it
        assert keys() == tf32[:2]
        torch.set_float32_matmul_precision("medium")  # bf16 too
        medium = keys()
        torch.set_float32_matmul_precision(precision)
        monkeypatch.setenv("DDKIT_CUDA_DETERMINISTIC", "0")
        fast = keys()
        monkeypatch.delenv("DDKIT_CUDA_DETERMINISTIC")
        fake_cuda(monkeypatch, "NVIDIA H200")
        other_gpu = keys()
        fake_cuda(monkeypatch)
        monkeypatch.setattr(torch.version, "cuda", "12.8")
        other_cuda = keys()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_flags
        torch.set_float32_matmul_precision(precision)
    found = [plain[:2], tf32[:2], conv_tf32, medium, fast, other_gpu, other_cuda]
    assert len({k for pair in found for k in pair}) == 2 * len(found)  # every setting its own keys
    assert tf32[2] != plain[2]
    assert not any(k in cpu for pair in found for k in pair)
    from ddkit.describe import describe  # the entry records them, and `ddkit show` names the GPU

    entry = tmp_path / "random-baseline" / "k.json"
    entry.parent.mkdir()
    entry.write_text(json.dumps({"schema_version": 2, "kind": "random-baseline-cache", "accuracy": 0.5, "ipc": 4,
                                 "seed": 0, "protocol_hash": "p", **runner.trained_on("cuda")}))
    assert describe(entry).endswith(", trained with 1 torch threads on cuda (NVIDIA H100 80GB HBM3)")


def test_a_run_folder_evaluates_again_under_a_new_revision_of_student_training(tmp_path, monkeypatch):
    """A run folder re-run unchanged reused its evaluation report whole, so a new STUDENT_REVISION (a fix to student
    training) never reached its students: the report kept the old numbers. The revision keys the run's evaluation too
    (from 2 on: at 1 the report is reused as before)."""
    import ddkit.cache
    from ddkit.pipeline import run

    cfg = _tiny_run(tmp_path / "run", [0])
    first = run(cfg)
    assert run(cfg)["reused"] == ["distilled", "eval-hard.json"]
    import ddkit.evaluate.runner as runner

    trained, real = [], runner._train_student
    monkeypatch.setattr(runner, "_train_student", lambda *a, **k: trained.append((len(a[0]), a[4])) or real(*a, **k))
    monkeypatch.setattr(ddkit.cache, "STUDENT_REVISION", 2)
    again = run(cfg)
    assert again["reused"] == ["distilled"] and trained == [(8, 0), (8, 0), (96, 0)]  # set, random subset, full data
    assert again["evaluations"][0]["results"]["distilled"] == first["evaluations"][0]["results"]["distilled"]
    assert run(cfg)["reused"] == ["distilled", "eval-hard.json"] and len(trained) == 3


def test_a_run_folder_evaluates_again_under_other_cuda_settings(tmp_path, monkeypatch, caplog):
    """A run folder's evaluation report was reused whatever CUDA settings, GPU or libraries (or device type) its
    students were trained under, while those key the students themselves (QA 17c F10): a run made with TF32 on kept
    its numbers when run again with TF32 off, or on another GPU. A report made on CUDA records them (``run.cuda``) and
    is evaluated again under others; on the CPU nothing changes (no GPU asked, the report reused as before)."""
    import dataclasses

    import ddkit.evaluate.runner as runner
    from ddkit.pipeline import run

    cfg = _tiny_run(tmp_path / "run", [0])
    first = run(cfg)
    assert "cuda" not in first["evaluations"][0]["run"]
    fake_cuda(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: pytest.fail("asked a GPU on the CPU"))
    assert run(cfg)["reused"] == ["distilled", "eval-hard.json"]  # on the CPU as before
    fake_cuda(monkeypatch)
    gpu = dataclasses.replace(cfg, device="cuda")
    trained = []  # no GPU here: the students "train" to 0.5 (the report's records are what is checked)
    monkeypatch.setattr(runner, "_train_student", lambda *a, **k: trained.append(a[4]) or 0.5)
    with cuda_settings_kept():
        torch.backends.cuda.matmul.allow_tf32 = True
        on = run(gpu)  # made on the CPU: evaluated again
        assert on["reused"] == ["distilled"] and len(trained) == 3
        report = json.loads((tmp_path / "run" / "eval-hard.json").read_text())
        assert report["run"]["cuda"] == runner.trained_on("cuda")["cuda"] and report["run"]["cuda"]["tf32_matmul"]
        assert report["results"]["distilled"]["mean"] == 0.5
        assert run(gpu)["reused"] == ["distilled", "eval-hard.json"] and len(trained) == 3  # the same settings
        torch.backends.cuda.matmul.allow_tf32 = False
        with caplog.at_level("INFO", logger="ddkit.pipeline"):
            assert run(gpu)["reused"] == ["distilled"] and len(trained) == 6
        assert ("evaluating eval-hard.json again: it was made under other CUDA settings (tf32_matmul True, now False; "
                "float32_matmul_precision 'high', now 'highest')") in caplog.text
        assert run(gpu)["reused"] == ["distilled", "eval-hard.json"] and len(trained) == 6
        fake_cuda(monkeypatch, "NVIDIA H200")
        assert run(gpu)["reused"] == ["distilled"] and len(trained) == 9
    caplog.clear()
    with caplog.at_level("INFO", logger="ddkit.pipeline"):
        back = run(cfg)  # made on CUDA: evaluated again on the CPU (its students come from the cache)
    assert back["reused"] == ["distilled"] and len(trained) == 9
    assert "evaluating eval-hard.json again: it was made on CUDA (NVIDIA H200), not on the CPU" in caplog.text
    assert back["evaluations"][0]["results"] == first["evaluations"][0]["results"]


def test_a_run_at_another_thread_count_evaluates_again(tmp_path, monkeypatch, caplog):
    """`ddkit run` reused the evaluations made with another torch thread count (QA 20b F4), while its students (cached
    by thread count) and `bench` train again: its report then showed numbers its recorded thread count does not give.
    Now it evaluates again (its students from the cache of this thread count), as bench does, and a report made with
    this count is reused."""
    import ddkit.evaluate.runner as runner
    from ddkit.pipeline import run

    monkeypatch.setenv("DDKIT_CACHE", str(tmp_path / "cache"))
    cfg = _tiny_run(tmp_path / "run", [0])
    run(cfg)
    path = tmp_path / "run" / "eval-hard.json"
    made = json.loads(path.read_text())["run"]["torch_threads"]
    assert made == torch.get_num_threads()
    trained = []
    monkeypatch.setattr(runner, "_train_student", lambda *a, **k: trained.append(a[4]) or 0.5)
    assert run(cfg)["reused"] == ["distilled", "eval-hard.json"] and trained == []
    path.write_text(json.dumps({**json.loads(path.read_text()), "run": {"torch_threads": made + 7, "world_size": 1}}))
    with caplog.at_level("INFO", logger="ddkit.pipeline"):
        again = run(cfg)
    # evaluated again: its students come from the cache, kept by thread count (this run's were made with this one)
    assert again["reused"] == ["distilled"] and trained == []
    assert (f"evaluating eval-hard.json again: it was evaluated with {made + 7} torch threads, this run has {made}"
            in caplog.text)
    assert json.loads(path.read_text())["run"]["torch_threads"] == made
    assert run(cfg)["reused"] == ["distilled", "eval-hard.json"]


def test_a_protocol_is_registered_as_a_function_of_no_arguments(monkeypatch):
    """PROTOCOLS took any object (QA 18c #12): a ProtocolConfig registered itself made every use of its name a
    TypeError ('ProtocolConfig' object is not callable); it is refused at registration, naming the fix."""
    from ddkit.evaluate.protocol import PROTOCOLS, ProtocolConfig, protocol_settings

    monkeypatch.setattr(PROTOCOLS, "_entries", {**PROTOCOLS._entries})
    cfg = ProtocolConfig(student="tiny_convnet", train=TrainConfig(epochs=2))
    with pytest.raises(DDKitError, match=r"^protocol 'quickinst': register a function returning the ProtocolConfig, "
                                         r"not the config itself: PROTOCOLS.add\('quickinst', lambda: cfg\) \(or save "
                                         r"it as a YAML file and pass its path\)$"):
        PROTOCOLS.add("quickinst", cfg)

    def needs_epochs(epochs):
        return ProtocolConfig(train=TrainConfig(epochs=epochs))

    for bad, shown in (({"student": "tiny_convnet"}, r"dict \{'student': 'tiny_convnet'\}"),
                       (needs_epochs, r"function <function .*needs_epochs at .*>")):
        with pytest.raises(DDKitError, match=rf"^protocol 'quickbad': {shown} is no function of no arguments returning "
                                             r"a ProtocolConfig; register such a function, e.g."):
            PROTOCOLS.add("quickbad", bad)
    assert "quickinst" not in PROTOCOLS and "quickbad" not in PROTOCOLS
    PROTOCOLS.add("quick", lambda: cfg)  # as README says
    assert protocol_settings("quick")["train"]["epochs"] == 2


def test_a_source_reading_no_files_that_loads_other_data_is_told_to_seed_itself(tiny_protocol, tmp_path, monkeypatch):
    """An unseeded plugin source (other pixels on each load) made evaluation refuse its set with advice to "point
    --data-path at the same files", which that source refuses (QA 18c #23): the source itself is named at fault."""
    from ddkit.data import DATASETS, DataBundle, ImageSet, load_dataset

    def rnd(cfg):  # forgot the seed
        y = torch.arange(3).repeat_interleave(4)
        return DataBundle("rnd", ImageSet(torch.rand(12, 1, 8, 8), y), ImageSet(torch.rand(12, 1, 8, 8), y),
                          ["a", "b", "c"], (0.5,), (0.25,))

    monkeypatch.setitem(DATASETS._entries, "rnd", rnd)
    monkeypatch.setitem(DATASETS.declared, "rnd", (frozenset(), frozenset()))
    ds = distill(load_dataset("rnd"), DistillConfig(method="random", ipc=2), DatasetConfig(name="rnd"),
                 tmp_path / "set")
    proto = resolve_protocol(tiny_protocol, {"full_reference": False, "random_baseline": False})
    with pytest.raises(DDKitError, match=r"^distilled set was made from 'rnd' data with fingerprint \w+ but the loaded "
                                         r"data has \w+; dataset source 'rnd' \(test_evaluate\..*rnd\) reads no files "
                                         r"and was given the settings the set records, so it loaded other data than "
                                         r"then: make it return the same data on every load \(seed its generator\), "
                                         r"then make the set again$"):
        evaluate(ds, proto, [0], out=tmp_path / "eval.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_a_protocol_name_with_a_files_suffix_is_refused(monkeypatch):
    """QA 22c F1: PROTOCOLS.add("fast.yml", f) was accepted, listed and shown, but every --protocol fast.yml read a
    file of that name instead: a name ending in a file's suffix is refused at registration, naming the fix."""
    from ddkit.evaluate.protocol import PROTOCOLS, ProtocolConfig

    monkeypatch.setattr(PROTOCOLS, "_entries", {**PROTOCOLS._entries})
    for name, suffix, stem in (("fast.yml", ".yml", "fast"), ("my.proto.YAML", ".YAML", "my.proto"),
                               ("e.json", ".json", "e")):
        with pytest.raises(DDKitError, match=rf"^protocol name '{name}' ends in '{suffix}', so every --protocol or "
                                             r"protocol: naming it reads a file of that name instead; register it "
                                             rf"under a name without the suffix, e.g. '{stem}'$"):
            PROTOCOLS.add(name, lambda: ProtocolConfig())
        assert name not in PROTOCOLS
    PROTOCOLS.add("fast.v2", lambda: ProtocolConfig())  # a dot elsewhere is a name as before


def test_a_registered_protocol_name_is_not_shadowed_by_a_file_in_the_working_folder(monkeypatch, tmp_path, caplog):
    """QA 22c F2: a file named `quick` (or `demo`) in the current folder was read as the protocol's YAML, over
    ProtocolConfig's defaults, in place of the registered protocol of that name, without a word. A spec is a file
    by its suffix or a path separator; a bare name is a registered one, with a warning (once) naming the file."""
    from ddkit.evaluate.protocol import PROTOCOLS, ProtocolConfig, is_protocol_file, protocol_settings

    monkeypatch.setattr(PROTOCOLS, "_entries", {**PROTOCOLS._entries})
    PROTOCOLS.add("quick", lambda: ProtocolConfig(student="tiny_convnet", train=TrainConfig(epochs=2)))
    monkeypatch.chdir(tmp_path)
    for name in ("quick", "demo", "stray"):
        (tmp_path / name).write_text("train: {epochs: 1}\n")
    with caplog.at_level("WARNING", logger="ddkit.evaluate.protocol"):
        assert protocol_settings("quick")["train"]["epochs"] == 2
        assert resolve_protocol("quick", {"full_epochs": 3}).student == "tiny_convnet"
        assert resolve_protocol("demo").student == "convnet3-w32"
    assert [r.getMessage() for r in caplog.records] == [
        f"protocol {n!r} is the registered one, not the file {n!r} in the current folder; pass ./{n} to read the file"
        for n in ("quick", "demo")]
    for path in ("./quick", str(tmp_path / "demo"), tmp_path / "stray"):  # a path reads the file
        assert resolve_protocol(path).student == "convnet3" and resolve_protocol(path).train.epochs == 1
    assert [is_protocol_file(s) for s in ("quick", "p.yaml", "P.YML", "eval-hard.json", "a/quick", Path("quick"))] == [
        False, True, True, True, True, True]
    with pytest.raises(ConfigError, match=r"^unknown protocol 'stray'; see `ddkit list protocols` \(.*\); to read the "
                                          r"file 'stray' in the current folder, pass its path: ./stray$"):
        resolve_protocol("stray")


def test_a_registered_protocol_that_returns_no_protocol_config_is_refused(monkeypatch, tmp_path, capsys):
    """QA 22c F4: a protocol function without `return` ran ProtocolConfig's defaults silently (with overrides: a
    TypeError traceback), and `ddkit show` printed `null`; another return value gave unrelated messages. Every
    resolution (evaluate, run, bench, show) refuses it in one line naming the protocol and what it returned."""
    from ddkit.bench import BenchConfig
    from ddkit.cli import main
    from ddkit.evaluate.protocol import PROTOCOLS, ProtocolConfig
    from test_bench import TINY

    monkeypatch.setattr(PROTOCOLS, "_entries", {**PROTOCOLS._entries})

    def noreturn():
        ProtocolConfig(train=TrainConfig(epochs=2))

    PROTOCOLS.add("noreturn", noreturn)
    PROTOCOLS.add("retstr", lambda: "soft-kl")
    PROTOCOLS.add("rettrain", lambda: TrainConfig(epochs=2))
    made_by = "test_evaluate.test_a_registered_protocol_that_returns_no_protocol_config_is_refused.<locals>."
    returned = {"noreturn": f"{made_by}noreturn) returned None (no `return`?)",
                "retstr": f"{made_by}<lambda>) returned str 'soft-kl'",
                "rettrain": f"{made_by}<lambda>) returned TrainConfig(epochs=2, batch_size=256, "}
    for name, what in returned.items():
        message = re.escape(f"protocol {name!r}: its function ({what}")
        for overrides in (None, {"train": {"epochs": 1}}):
            with pytest.raises(DDKitError, match=rf"^{message}.*, not a ProtocolConfig; make it `return "
                                                 r"ProtocolConfig\(...\)`$"):
                resolve_protocol(name, overrides)
        with pytest.raises(DDKitError, match=rf"^{message}"):
            from_dict(BenchConfig, {**TINY, "protocol": name, "out": str(tmp_path / "bench"), "device": "cpu"})
    distill(make_synthetic(), DistillConfig(method="random", ipc=2), DatasetConfig(name="synthetic"), tmp_path / "set")
    made = sorted(p.name for p in (tmp_path / "set").iterdir())
    for args in (["show", "noreturn"], ["evaluate", str(tmp_path / "set"), "--protocol", "noreturn", "--seeds", "0"],
                 ["run", str(REPO / "configs/fashion-mnist/random/ipc10.yaml"), "--out", str(tmp_path / "run"),
                  "--set", "dataset.name=synthetic", "--set", "evaluate.protocol=noreturn"]):
        assert main(args) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"error: protocol 'noreturn': its function ({returned['noreturn']}, not a " \
                                    "ProtocolConfig; make it `return ProtocolConfig(...)`\n"
    assert [p.name for p in tmp_path.iterdir()] == ["set"]
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == made
