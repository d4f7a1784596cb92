"""What readers check of an artifact's files against its record (QA 22e, QA 22b F2 and F9): exports of a newer
schema_version, damaged pt and DD-Ranking exports, a set's and a store's recorded bytes and pixel range, a set saved
after its tensors were edited, an image-folder export of a set with an empty class or fewer images than its ipc, a
`ddkit run` folder given to export/evaluate/relabel, a recorded dataset_config with an unknown key, and bench and
report folders whose files are gone."""

import json
import shutil

import pytest
import torch

import ddkit
from conftest import refused, run_cli
from ddkit.cli import main
from ddkit.distilled import DistilledSet
from ddkit.errors import DDKitError


def _float_set(made) -> DistilledSet:
    """The set ``made/s`` as float pixels in [-1, 2] (not yet saved), its manifest's images and bytes to match."""
    ds = ddkit.load(made / "s")
    ds.images = ds.images.float() / 255 * 3 - 1
    ds.manifest = {**ds.manifest, "images": {"dtype": "float32", "pixel_range": [float(ds.images.min()),
                                                                                 float(ds.images.max())]},
                   "bytes": {**ds.manifest["bytes"], "images": 4 * ds.images.numel()}}
    return ds


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A teacher, a set with soft labels, its three exports and an FKD store of it (seconds, synthetic data)."""
    root = tmp_path_factory.mktemp("made")
    t, s = str(root / "t"), str(root / "s")
    assert main(["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", "1", "--out", t,
                 "-q"]) == 0
    assert main(["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--teacher", t,
                 "--soft-labels", "--out", s, "-q"]) == 0
    for fmt, out in (("pt", "s.pt"), ("ddranking", "s_ddr"), ("imagefolder", "s_if")):
        assert main(["export", s, "--format", fmt, "--out", str(root / out), "-q"]) == 0
    assert main(["relabel", s, "--teacher", t, "--epochs", "1", "--out", str(root / "s.fkd"), "-q"]) == 0
    return root


def _copy(made, name, tmp_path):
    src, dst = made / name, tmp_path / name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def test_exports_of_a_newer_schema_version_are_refused_by_show_and_by_export(made, tmp_path, capsys):
    """Exports record a schema_version like every artifact, but `show` summarised one of version 99 and `export`
    replaced it (QA 22e F1)."""
    for name, record in (("s_if", "classes.json"), ("s_ddr", "meta.json")):
        path = _copy(made, name, tmp_path)
        meta = json.loads((path / record).read_text())
        (path / record).write_text(json.dumps({**meta, "schema_version": 99}))
        newer = (f"{str(path / record)!r} has schema_version 99, newer than this ddkit understands (1); "
                 "upgrade ddkit")
        assert refused(["show", "-q", str(path)], capsys) == newer
        fmt = "imagefolder" if name == "s_if" else "ddranking"
        assert refused(["export", str(made / "s"), "--format", fmt, "--out", str(path)], capsys) == newer
        assert json.loads((path / record).read_text())["schema_version"] == 99  # not replaced
    pt = tmp_path / "fut.pt"
    torch.save({**torch.load(made / "s.pt", weights_only=True), "schema_version": 99}, pt)
    newer = f"{str(pt)!r} has schema_version 99, newer than this ddkit understands (1); upgrade ddkit"
    assert refused(["show", str(pt)], capsys) == newer
    assert refused(["export", str(made / "s"), "--format", "pt", "--out", str(pt)], capsys) == newer
    assert torch.load(pt, weights_only=True)["schema_version"] == 99


def test_show_checks_the_tensors_of_pt_and_ddranking_exports(made, tmp_path, capsys):
    """`show -q` exited 0 on a pt export with 5 labels for 8 images, a NaN pixel, labels out of range, soft labels
    of the wrong shape, and a DD-Ranking export with a NaN pixel or an infinite logit (QA 22e F2); they are checked
    as a set's tensors are, and a pt export's recorded pixel_range (which `show` prints) against its pixels."""
    assert run_cli(["show", "-q", str(made / "s.pt")], capsys)[0] == 0
    record = torch.load(made / "s.pt", weights_only=True)
    pt, fix = tmp_path / "bad.pt", "the pt-export is incomplete or damaged; export the distilled set again"
    nan = record["images"].clone()
    nan[0, 0, 0, 0] = float("nan")
    for change, problem in (
            ({"labels": record["labels"][:5]}, "holds 8 images but 5 labels"),
            ({"images": nan}, "holds NaN or infinite pixels"),
            ({"labels": record["labels"] + 50}, "has labels outside 0..3 (found 50..53)"),
            ({"pixel_range": [0.0, 0.5]}, f"records pixel_range [0.0, 0.5] but its pixels lie in "
                                          f"{[float(record['images'].min()), float(record['images'].max())]}")):
        torch.save({**record, **change}, pt)
        assert refused(["show", "-q", str(pt)], capsys) == f"{str(pt)!r} {problem}; {fix}"
    torch.save({**record, "soft_labels": record["soft_labels"][:, :3]}, pt)
    assert refused(["show", str(pt)], capsys) == (f"the soft labels in {str(pt)!r} have shape [8, 3] but the set "
                                                   f"has 8 images of 4 classes; {fix}")

    fix = fix.replace("pt-export", "ddranking-export")
    path = _copy(made, "s_ddr", tmp_path)
    assert run_cli(["show", "-q", str(path)], capsys)[0] == 0
    images = torch.load(path / "images.pt", weights_only=True)
    images[0, 0, 0, 0] = float("nan")
    torch.save(images, path / "images.pt")
    assert refused(["show", "-q", str(path)], capsys) == (f"{str(path / 'images.pt')!r} holds NaN or infinite "
                                                           f"pixels; {fix}")
    shutil.copy(made / "s_ddr" / "images.pt", path / "images.pt")
    soft = torch.load(path / "soft_labels.pt", weights_only=True)
    soft[0, 0] = float("inf")
    torch.save(soft, path / "soft_labels.pt")
    assert refused(["show", "-q", str(path)], capsys) == (f"the soft labels in {str(path / 'soft_labels.pt')!r} hold "
                                                           f"NaN or infinite logits; {fix}")


def _edit(path, change):
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_a_recorded_bytes_or_pixel_range_that_is_not_the_tensors_is_refused(made, tmp_path, capsys):
    """`show` printed a set's and a store's `bytes` and a set's pixel range from the manifest, and `show -q` and
    ddkit.load passed them edited (QA 22e F3)."""
    s = _copy(made, "s", tmp_path)
    held = json.loads((s / "manifest.json").read_text())["bytes"]
    assert held == {"images": 8 * 256, "labels": 8 * 8 + 8 * 4 * 4}  # uint8 pixels; int64 labels, float32 logits
    _edit(s, lambda m: m.update(bytes={"images": 1, "labels": 2}))
    damaged = (f"{str(s / 'manifest.json')!r} records bytes {{'images': 1, 'labels': 2}} but the set holds 2048 "
               "image bytes and 192 label bytes; the manifest is damaged: re-create the distilled set")
    assert refused(["show", "-q", str(s)], capsys) == damaged
    with pytest.raises(DDKitError) as err:
        ddkit.load(s)
    assert str(err.value) == damaged
    _edit(s, lambda m: m.update(bytes=held, images={**m["images"], "pixel_range": [0.0, 1.0]}))
    assert refused(["show", str(s)], capsys) == (f"{str(s / 'manifest.json')!r} records pixel_range [0.0, 1.0] but "
                                                  "the set's pixels lie in [0, 255]; the manifest is damaged: "
                                                  "re-create the distilled set")
    # a float set's range is its pixels' min and max, to the bit
    f = _float_set(made).save(tmp_path / "f")
    assert run_cli(["show", "-q", str(f)], capsys)[0] == 0
    _edit(f, lambda m: m["images"].update(pixel_range=[0.0, 1.0]))
    assert "records pixel_range [0.0, 1.0] but the set's pixels lie in [-1.0, 2.0" in refused(["show", str(f)],
                                                                                                 capsys)
    store = _copy(made, "s.fkd", tmp_path)
    _edit(store, lambda m: m.update(bytes={"total": 5, "logits": 1}))
    total = ddkit.load(made / "s.fkd").nbytes
    assert refused(["show", "-q", str(store)], capsys) == (
        f"{str(store / 'manifest.json')!r} records bytes {{'total': 5, 'logits': 1}} but the store holds {total} "
        f"bytes, {1 * 8 * 4 * 2} of them logits; the manifest is damaged: re-create the store with `ddkit relabel`")


def test_a_set_recorded_before_2026_12_06_or_with_narrower_labels_still_loads(made, tmp_path):
    """Sets made before 2026-12-06 recorded a float set's pixel_range as [0.0, 1.0] whatever it held (and no
    files_sha256); a plugin method's int32 labels were counted at 4 bytes, though saved as int64: both load."""
    old = _float_set(made).save(tmp_path / "old")
    _edit(old, lambda m: (m.pop("files_sha256"), m["images"].update(pixel_range=[0.0, 1.0]),
                          m["bytes"].update(labels=8 * 4 + 8 * 4 * 4)))
    assert len(ddkit.load(old)) == 8
    # saved again unedited, it records files_sha256, and with them the range of its pixels, which load compares
    again = ddkit.load(old).save(tmp_path / "again")
    assert json.loads((again / "manifest.json").read_text())["images"]["pixel_range"] == [-1.0, 2.0]
    assert len(ddkit.load(again)) == 8


def test_save_refuses_tensors_that_disagree_with_the_manifest_and_writes_nothing(made, tmp_path):
    """DistilledSet.save wrote edited tensors under the manifest of the set they came from, which its loader then
    refused (QA 22e F4): it refuses them first, naming what disagrees, and writes nothing (onto the set's own folder:
    the set stays whole)."""
    fix = ("the manifest records the set its config made: save the set unedited, or make the manifest say what the "
           "tensors hold; nothing was saved")
    ds = ddkit.load(made / "s")
    ds.images, ds.labels, ds.soft_labels = ds.images[:4], ds.labels[:4], ds.soft_labels[:4]
    with pytest.raises(DDKitError) as err:
        ds.save(tmp_path / "cut")
    assert str(err.value) == f"the set holds 4 images but the manifest says num_images 8; {fix}"
    assert not (tmp_path / "cut").exists() and list(tmp_path.iterdir()) == []
    s = _copy(made, "s", tmp_path)
    before = {p.name: p.read_bytes() for p in s.iterdir()}
    ds = ddkit.load(s)
    ds.images = ds.images.float() / 255
    with pytest.raises(DDKitError) as err:
        ds.save(s)
    assert str(err.value) == f"the set holds float32 images but the manifest says uint8; {fix}"
    assert {p.name: p.read_bytes() for p in s.iterdir()} == before and len(ddkit.load(s)) == 8
    ds = ddkit.load(s)
    ds.soft_labels = ds.soft_labels[:, :3]
    with pytest.raises(DDKitError, match=r"^the set's soft labels have shape \[8, 3\] but the set has 8 images of 4 "
                                         "classes; the manifest records"):
        ds.save(tmp_path / "soft")
    ds = ddkit.load(s)
    ds.labels = ds.labels.roll(1)  # as many images, other classes: class counts agree, bytes too
    ds.labels[0] = ds.labels[1]
    with pytest.raises(DDKitError, match=r"^the set holds \[3, 2, 2, 1\] images per class but the manifest says "
                                         r"\[2, 2, 2, 2\]"):
        ds.save(tmp_path / "counts")
    ds = ddkit.load(s)  # unedited: saved, and read back the same
    again = ds.save(tmp_path / "again")
    assert json.loads((again / "manifest.json").read_text()) == json.loads((s / "manifest.json").read_text())


def test_an_imagefolder_export_of_a_set_with_an_empty_class_reads_back_whole(made, tmp_path, capsys):
    """A set without an ipc may hold no image of a class: its export wrote no folder for it but listed it, and `show`
    called the fresh export damaged (QA 22e F5). The class's folder is written empty (folder order stays label
    order); a set with an ipc still needs images in every folder."""
    ds = ddkit.load(made / "s")
    keep = ds.labels != 3
    n = int(keep.sum())
    manifest = {**ds.manifest, "ipc": None, "num_images": n, "class_counts": [2, 2, 2, 0],
                "bytes": {"images": n * 256, "labels": n * 8 + n * 4 * 4}}
    zero = DistilledSet(ds.images[keep], ds.labels[keep], manifest, ds.soft_labels[keep]).save(tmp_path / "zero")
    out = DistilledSet.load(zero).export(tmp_path / "zero_if", "imagefolder")
    assert sorted(p.name for p in out.iterdir()) == ["000_class0", "001_class1", "002_class2", "003_class3",
                                                     "classes.json"]
    assert list((out / "003_class3").iterdir()) == [] and len(list((out / "000_class0").iterdir())) == 2
    assert run_cli(["show", "-q", str(out)], capsys)[0] == 0
    (out / "003_class3").rmdir()
    assert "holds no images of class folder '003_class3'" in refused(["show", "-q", str(out)], capsys)


def test_an_imagefolder_export_holding_fewer_images_than_its_ipc_is_refused(made, tmp_path, capsys):
    """`show` printed an image-folder export's recorded ipc, and passed one whose every folder had lost an image or
    whose ipc was edited (QA 22e F8)."""
    fix = "the imagefolder-export is incomplete or damaged; export the distilled set again"
    path = _copy(made, "s_if", tmp_path)
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        (folder / "00001.png").unlink()
    assert refused(["show", str(path)], capsys) == (f"export {str(path)!r} holds 1 images in each class folder, but "
                                                     f"{str(path / 'classes.json')!r} says ipc 2; {fix}")
    shutil.rmtree(path)
    path = _copy(made, "s_if", tmp_path)
    meta = json.loads((path / "classes.json").read_text())
    (path / "classes.json").write_text(json.dumps({**meta, "ipc": 7}))
    assert refused(["show", "-q", str(path)], capsys) == (f"export {str(path)!r} holds 2 images in each class folder, "
                                                           f"but {str(path / 'classes.json')!r} says ipc 7; {fix}")


def test_export_evaluate_and_relabel_follow_a_run_folder_to_its_set(made, tmp_path, capsys):
    """`ddkit export|evaluate|relabel RUN` refused a run folder that ddkit.load reads as its distilled set (QA 22e
    F6, QA 22b F9); they follow its stages.distilled as ddkit.load does, and name the stage folder of a run that
    has no manifest yet."""
    run = tmp_path / "run"
    shutil.copytree(made / "s", run / "distilled")
    (run / "manifest.json").write_text(json.dumps({"schema_version": 1, "kind": "pipeline-run",
                                                   "stages": {"distilled": "distilled"}}))
    assert run_cli(["export", str(run), "--format", "pt", "--out", str(tmp_path / "run.pt"), "-q"], capsys)[0] == 0
    assert torch.equal(torch.load(tmp_path / "run.pt", weights_only=True)["labels"],
                       torch.load(made / "s.pt", weights_only=True)["labels"])
    assert run_cli(["relabel", str(run), "--teacher", str(made / "t"), "--epochs", "1", "--out",
                 str(tmp_path / "run.fkd"), "-q"], capsys)[0] == 0
    assert (ddkit.load(tmp_path / "run.fkd").manifest["distilled"]["fingerprint"]
            == ddkit.load(made / "s.fkd").manifest["distilled"]["fingerprint"])
    # evaluate reads the set (then stops at its own check, before training)
    assert refused(["evaluate", str(run), "--label-mode", "fkd"], capsys) == (
        "label mode fkd replays a `ddkit relabel` store; pass --set fkd_store=DIR")
    (run / "manifest.json").unlink()  # a run killed before its last stage
    for args in (["export", str(run), "--format", "pt", "--out", str(tmp_path / "x.pt")],
                 ["evaluate", str(run)], ["relabel", str(run), "--teacher", str(made / "t")]):
        assert refused(args, capsys) == (f"{str(run)!r} is an unfinished `ddkit run` folder (stages done: distilled; "
                                          "no manifest.json: killed before its last stage, or from before run folders "
                                          "had a manifest.json); run its config again with the same --out to finish "
                                          "it (finished stages are reused, though stages an older ddkit made may be "
                                          "made again), or pass its stage folder "
                                          f"{str(run / 'distilled')!r}")
    # show says the same (it said other words before)
    assert refused(["show", str(run)], capsys).startswith(f"{str(run)!r} is an unfinished `ddkit run` folder (stages "
                                                           "done: distilled; no manifest.json: killed before its ")
    assert not (tmp_path / "x.pt").exists()


def test_show_refuses_a_run_manifest_that_names_no_distilled_stage_as_its_readers_do(made, tmp_path, capsys):
    """QA 23b F2: `show -q RUN` exited 0 for a run manifest without stages.distilled (or with a non-name there),
    which ddkit.load, export, evaluate and relabel refuse as damaged; one rule (describe.run_stage) now reads both."""
    run = tmp_path / "run"
    shutil.copytree(made / "s", run / "distilled")
    for stages in ({}, {"distilled": []}, {"distilled": None, "teacher": None}):
        (run / "manifest.json").write_text(json.dumps({"schema_version": 1, "kind": "pipeline-run",
                                                       "stages": stages}))
        want = (f"{str(run / 'manifest.json')!r} names no distilled stage (stages.distilled); the manifest is "
                "damaged: run the run's config again to rewrite it")
        assert refused(["show", "-q", str(run)], capsys) == want, stages
        assert refused(["export", str(run), "--format", "pt", "--out", str(tmp_path / "x.pt")], capsys) == want
        with pytest.raises(DDKitError) as e:
            ddkit.load(run)
        assert str(e.value) == want
    assert not (tmp_path / "x.pt").exists()


def test_a_recorded_dataset_config_with_an_unknown_key_is_refused_on_load(made, tmp_path, capsys):
    """A set whose dataset_config held an unknown key loaded and showed as whole, and `evaluate` then failed naming
    a `dataset.bogus` the user never gave (QA 22e F7)."""
    s = _copy(made, "s", tmp_path)
    _edit(s, lambda m: m["dataset_config"].update(bogus=1))
    message = refused(["show", "-q", str(s)], capsys)
    assert message.startswith(f"{str(s / 'manifest.json')!r} holds a dataset_config this ddkit does not read (unknown "
                              "config key 'dataset_config.bogus'; valid keys: name, path,")
    assert message.endswith("); the manifest is damaged: re-create the distilled set")
    with pytest.raises(DDKitError, match="dataset_config.bogus"):
        ddkit.load(s)


def test_show_checks_the_files_a_report_and_a_bench_folder_name(made, tmp_path, capsys):
    """`show -q` of a bench folder whose sets were gone, or of a report folder without the files its manifest
    lists, exited 0 (QA 22b F2). A report's files are checked to exist, a bench's sets to hold their manifest and
    tensor files (not loaded: `show -q SET` does that)."""
    report = tmp_path / "report"
    files = ["report.md", "report.html", "acc_vs_ipc.png", "grids/s.png"]
    for name in files:
        (report / name).parent.mkdir(parents=True, exist_ok=True)
        (report / name).write_text("x")
    (report / "manifest.json").write_text(json.dumps({"schema_version": 1, "kind": "bench-report", "rows": 1,
                                                      "run_dir": "runs/b", "files": files}))
    assert run_cli(["show", "-q", str(report)], capsys)[0] == 0
    (report / "grids" / "s.png").unlink()
    (report / "report.html").unlink()
    assert refused(["show", "-q", str(report)], capsys) == (
        f"report {str(report)!r} lacks 2 of the files its manifest lists (report.html, grids/s.png); run `ddkit "
        f"report runs/b --out {str(report)}` again to write it whole")

    bench = tmp_path / "bench"
    shutil.copytree(made / "s", bench / "distilled" / "synthetic-random-ipc2")
    row = {"dataset": "synthetic", "method": "random", "ipc": 2, "student": "tiny_convnet", "label_mode": "hard",
           "acc": {"per_seed": [0.5], "mean": 0.5, "std": 0.0, "n": 1}, "random": None, "bytes": {"total": 10},
           "synthesis": {"seconds": 1.5}, "distilled_path": "elsewhere/distilled/synthetic-random-ipc2"}
    (bench / "bench.json").write_text(json.dumps({"kind": "bench-table", "rows": [row, row]}))
    assert run_cli(["show", "-q", str(bench)], capsys)[0] == 0
    (bench / "distilled" / "synthetic-random-ipc2" / "soft_labels.safetensors").unlink()
    assert refused(["show", "-q", str(bench)], capsys) == (
        f"bench {str(bench)!r}: the distilled set 'synthetic-random-ipc2' lacks its file 'soft_labels.safetensors'; "
        "re-run `ddkit bench` with its config (finished cells are reused) to make it again")
    shutil.rmtree(bench / "distilled" / "synthetic-random-ipc2")
    assert refused(["show", "-q", str(bench)], capsys) == (
        f"bench {str(bench)!r} lacks the distilled set 'synthetic-random-ipc2' its table names "
        f"({str(bench / 'distilled' / 'synthetic-random-ipc2')!r}); re-run `ddkit bench` with its config (finished "
        "cells are reused) to make it again")
    (bench / "distilled").rmdir()  # the table alone (QA 23a F3: kept to write its report again): read from its rows
    assert run_cli(["show", "-q", str(bench)], capsys)[0] == 0
    code, out, _ = run_cli(["show", str(bench / "bench.json")], capsys)
    assert code == 0 and "synthetic" in out
