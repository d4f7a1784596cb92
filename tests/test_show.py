"""`ddkit show` over everything ddkit writes, the pipeline run's manifest, and records that stay valid
from another working folder."""

import json
import shutil

import pytest

import ddkit
from ddkit.cli import main
from ddkit.data.base import DatasetConfig, load_dataset
from ddkit.describe import describe
from ddkit.errors import DDKitError
from ddkit.evaluate import evaluate, resolve_protocol
from ddkit.pipeline import DistillConfig, distill
from test_cli import run_cli
from test_data import write_imagefolder

FAST = {"student": "tiny_convnet", "full_reference": False, "random_baseline": False, "train": {"epochs": 2, "batch_size": 8}}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A finished `ddkit run` (teacher, soft-labelled random set, hard and teacher evaluations), FKD store."""
    root = tmp_path_factory.mktemp("show")
    cfg = root / "run.yaml"
    cfg.write_text(
        "dataset: {name: synthetic}\n"
        "teacher: {model: tiny_convnet, train: {epochs: 2, batch_size: 16}}\n"
        "distill: {method: random, ipc: 2, seed: 3, soft_labels: true}\n"
        "evaluate: {protocol: dc-protocol, label_modes: [hard, teacher], seeds: [0],\n"
        "           overrides: {student: tiny_convnet, full_epochs: 1, train: {epochs: 2, batch_size: 8}}}\n"
        f"out: {root / 'run'}\n")
    assert main(["run", str(cfg), "-q"]) == 0
    assert main(["relabel", str(root / "run" / "distilled"), "--teacher", str(root / "run" / "teacher"),
                 "--epochs", "2", "--top-k", "2", "--out", str(root / "fkd"), "-q"]) == 0
    return root


def test_show_summarises_every_record_of_a_run(demo_run, capsys):
    run = demo_run / "run"
    man = json.loads((run / "manifest.json").read_text())
    assert man["kind"] == "pipeline-run" and man["seed"] == 3 and man["versions"]["ddkit"] == ddkit.__version__
    assert man["stages"]["evaluations"] == ["eval-hard.json", "eval-teacher.json"]
    assert [e["config"]["label_mode"] for e in man["evaluations"]] == ["hard", "teacher"]
    assert man["config"]["distill"]["ipc"] == 2 and man["teacher_accuracy"] == pytest.approx(
        json.loads((run / "teacher" / "manifest.json").read_text())["test_accuracy"])

    expected = {
        run: ["pipeline run: random ipc=2 on synthetic, seed 3, teacher test accuracy", "random ipc=2", "teacher"],
        run / "teacher": ["teacher: tiny_convnet on synthetic"],
        run / "distilled": ["distilled set: random ipc=2 on synthetic", "8 images"],
        run / "eval-teacher.json": ["random ipc=2", "teacher"],
        run / "report" / "eval.json": ["hard", "teacher"],
        demo_run / "fkd": ["FKD soft labels: 2 epochs x 8 images, 4 classes, top-2 logits", "CutMix p=1.0"],
    }
    for path, parts in expected.items():
        code, out, err = run_cli(["show", str(path)], capsys)
        assert code == 0, err
        for part in parts:
            assert part in out, (path, out)
        assert describe(path) == out.rstrip("\n")
    for fmt, kind in (("imagefolder", "imagefolder-export"), ("ddranking", "ddranking-export")):
        dest = demo_run / f"export-{fmt}"
        assert run_cli(["export", str(run / "distilled"), "--format", fmt, "--out", str(dest), "-q"], capsys)[:2] == (0, "")
        assert describe(dest).startswith(f"{kind}: 4 classes, 2 images per class, from set ")
    code, out, _ = run_cli(["show", str(demo_run / "fkd"), "--json"], capsys)
    assert json.loads(out)["kind"] == "fkd-soft-labels"  # --json alone is machine-readable
    code, out, _ = run_cli(["show", str(run / "teacher"), "-q"], capsys)
    assert code == 0 and out == ""
    old = demo_run / "old-run"  # a run folder from before run manifests: named as such, with the fix
    shutil.copytree(run, old)
    (old / "manifest.json").unlink()
    code, out, err = run_cli(["show", str(old)], capsys)
    assert code == 2 and out == "" and "from before run folders had a manifest.json" in err and "ddkit run" in err


def test_show_refuses_what_ddkit_did_not_write(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "other.json").write_text('{"kind": "something-else"}')
    (tmp_path / "cut.json").write_text('{"kind": "teacher", "model": {"name": "x"}}')
    for target, words in [("mine", "holds no ddkit record"), ("list.json", "not a ddkit record"),
                          ("other.json", "kind 'something-else'"), ("cut.json", "damaged, re-create it"),
                          ("missing", "not found")]:
        code, _, err = run_cli(["show", str(tmp_path / target)], capsys)
        assert code == 2 and words in err and err.count("\n") == 1, err
    with pytest.raises(DDKitError, match="holds no ddkit record"):
        describe(tmp_path / "mine")


def test_show_names_a_wrongly_typed_field_as_such(tmp_path, capsys):
    """A field of the wrong type used to read "record without the field 'int' object is not subscriptable"."""
    (tmp_path / "t.json").write_text('{"kind": "teacher", "model": 3}')
    (tmp_path / "cut.json").write_text('{"kind": "teacher"}')
    code, _, err = run_cli(["show", str(tmp_path / "t.json")], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "'teacher' record with a field of the wrong type ('int' object is not subscriptable)" in err
    code, _, err = run_cli(["show", str(tmp_path / "cut.json")], capsys)
    assert code == 2 and "'teacher' record without the field 'model'; it is damaged" in err


def test_show_bench_folder_cell_and_synthesis(tmp_path, capsys):
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(
        "datasets: [synthetic]\nipcs: [1]\nstudents: [tiny_convnet]\nlabel_modes: [hard]\nseeds: [0]\n"
        "methods: [random]\noverrides: {full_reference: false, random_baseline: false, train: {epochs: 2, batch_size: 8}}\n"
        f"out: {tmp_path / 'bench'}\n")
    assert main(["bench", str(cfg), "-q"]) == 0
    capsys.readouterr()
    bench = tmp_path / "bench"
    for path, part in [(bench, "synthetic      random"), (bench / "cells" / "synthetic-random-ipc1-tiny_convnet-hard.json",
                                                           "tiny_convnet"),
                       (bench / "config.json", "bench config: datasets ['synthetic'], methods ['random'], IPC [1]"),
                       (bench / "distilled" / "synthetic-random-ipc1.synthesis.json", "synthesis: ")]:
        code, out, err = run_cli(["show", str(path)], capsys)
        assert code == 0 and part in out, (path, out, err)
    assert describe(bench / "config.json").endswith("\n1 of 1 cells finished; bench.json holds the table")
    (bench / "cells" / "synthetic-random-ipc1-tiny_convnet-hard.json").rename(bench / "cell.json")
    assert describe(bench / "config.json").endswith("\n0 of 1 cells finished; bench.json holds an earlier run's table")
    (bench / "cell.json").rename(bench / "cells" / "synthetic-random-ipc1-tiny_convnet-hard.json")
    # a changed config (other student seeds, another protocol) leaves its cell files stale, not finished
    record = json.loads((bench / "config.json").read_text())
    for change in ({"seeds": [0, 1]}, {"overrides": {**record["config"]["overrides"], "train": {"epochs": 3, "batch_size": 8}}}):
        (bench / "config.json").write_text(json.dumps({**record, "config": {**record["config"], **change}}))
        assert describe(bench / "config.json").endswith(
            "\n0 of 1 cells finished (1 cell file(s) from another config or seeds, recomputed by the next `ddkit bench`); "
            "bench.json holds an earlier run's table"), change
    (bench / "config.json").write_text(json.dumps(record))
    (bench / "bench.json").unlink()  # a bench folder before its table: the config and how far it got
    assert describe(bench).endswith("\n1 of 1 cells finished; no table yet (bench.json)")
    (bench / "cells" / "synthetic-random-ipc1-tiny_convnet-hard.json").unlink()
    assert describe(bench).startswith("bench config:") and describe(bench).endswith("\n0 of 1 cells finished; no table yet (bench.json)")
    for name, content in (("notes.txt", "mine"), ("config.json", "[1]")):  # not a bench folder: left alone
        mine = tmp_path / f"mine-{name}"
        mine.mkdir()
        (mine / name).write_text(content)
        code, _, err = run_cli(["bench", str(cfg), "--out", str(mine), "-q"], capsys)
        assert code == 2 and "is not a ddkit bench folder" in err and [p.name for p in mine.iterdir()] == [name]
        assert (mine / name).read_text() == content
    synthesis = json.loads((bench / "distilled" / "synthetic-random-ipc1.synthesis.json").read_text())
    assert synthesis["seed"] == 0 and synthesis["versions"]["ddkit"] == ddkit.__version__


def test_relative_dataset_path_is_recorded_absolute(tmp_path, monkeypatch):
    """A set made with a relative dataset path evaluates from any working folder."""
    write_imagefolder(tmp_path / "work" / "pics", {"a": 3, "b": 3}, size=8)
    monkeypatch.chdir(tmp_path / "work")
    dcfg = DatasetConfig(name="imagefolder", path="pics")
    assert dcfg.absolute().path == str(tmp_path / "work" / "pics") and DatasetConfig().absolute().path is None
    data = load_dataset(dcfg)
    ds = distill(data, DistillConfig(method="random", ipc=2), dcfg, tmp_path / "set")
    assert ds.manifest["dataset_config"]["path"] == str(tmp_path / "work" / "pics")
    monkeypatch.chdir(tmp_path)  # "pics" does not exist here
    report = evaluate(tmp_path / "set", resolve_protocol("dc-protocol", FAST), [0])
    assert 0.0 <= report["results"]["distilled"]["mean"] <= 1.0 and report["results"]["distilled"]["n"] == 1


def test_run_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    """`ddkit run` writes config.json, report/ and eval-*.json into out: never over a user's files."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: {name: synthetic}\nteacher: null\ndistill: {method: random, ipc: 1}\n"
                   "evaluate: {seeds: [0], overrides: {student: tiny_convnet, full_reference: false, random_baseline: false,"
                   " train: {epochs: 1, batch_size: 8}}}\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')
    code, _, err = run_cli(["run", str(cfg), "--out", str(mine), "-q"], capsys)
    assert code == 2 and "is not a ddkit run folder (it holds config.json)" in err
    assert sorted(p.name for p in mine.iterdir()) == ["config.json"] and (mine / "config.json").read_text() == '{"mine": true}'
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(["run", str(cfg), "--out", str(tmp_path / "file"), "-q"], capsys)
    assert code == 2 and "is a file, not a folder" in err
    # a run killed after its distilled set (no manifest yet) resumes; a finished one re-runs in place
    run = tmp_path / "run"
    assert run_cli(["run", str(cfg), "--out", str(run), "-q"], capsys)[0] == 0
    (run / "manifest.json").unlink()
    (run / "eval-hard.json").unlink()
    code, out, _ = run_cli(["run", str(cfg), "--out", str(run), "-q"], capsys)
    assert code == 0 and "reused: distilled" in out and (run / "manifest.json").is_file()
    assert run_cli(["run", str(cfg), "--out", str(run), "-q"], capsys)[0] == 0
