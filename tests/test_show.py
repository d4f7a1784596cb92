"""`ddkit show` over everything ddkit writes, the pipeline run's manifest, and records that stay valid
from another working folder."""

import json
import re
import shutil

import pytest

import ddkit
from conftest import refused, run_cli
from ddkit.cli import main
from ddkit.data.base import DatasetConfig, load_dataset
from ddkit.describe import describe
from ddkit.errors import DDKitError
from ddkit.evaluate import evaluate, resolve_protocol
from ddkit.pipeline import DistillConfig, distill
from test_data import write_imagefolder

FAST = {"student": "tiny_convnet", "full_reference": False, "random_baseline": False,
        "train": {"epochs": 2, "batch_size": 8}}


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
        run / "report": ["hard", "teacher"],  # the README's report folder: its eval.json
        # was "a run folder without its manifest"
        run / "config.json": ["pipeline run: random ipc=2 on synthetic, seed 3"],
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
        assert run_cli(["export", str(run / "distilled"), "--format", fmt, "--out", str(dest), "-q"],
                       capsys)[:2] == (0, "")
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
    # stages an older ddkit made may be made again (their keys changed on purpose): no promise they are reused
    assert "(finished stages are reused)" not in err and "stages an older ddkit made may be made again" in err


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
        "methods: [random]\noverrides: {full_reference: false, random_baseline: false, train: {epochs: 2, "
        "batch_size: 8}}\n"
        f"out: {tmp_path / 'bench'}\n")
    assert main(["bench", str(cfg), "-q"]) == 0
    capsys.readouterr()
    bench = tmp_path / "bench"
    for path, part in [(bench, "synthetic      random"),
                       (bench / "cells" / "synthetic-random-ipc1-tiny_convnet-hard.json", "tiny_convnet"),
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
    for change in ({"seeds": [0, 1]},
                   {"overrides": {**record["config"]["overrides"], "train": {"epochs": 3, "batch_size": 8}}}):
        (bench / "config.json").write_text(json.dumps({**record, "config": {**record["config"], **change}}))
        assert describe(bench / "config.json").endswith(
            "\n0 of 1 cells finished (1 cell file(s) from another config or seeds, recomputed by the next "
            "`ddkit bench`); bench.json holds an earlier run's table"), change
    (bench / "config.json").write_text(json.dumps(record))
    (bench / "bench.json").unlink()  # a bench folder before its table: the config and how far it got
    assert describe(bench).endswith("\n1 of 1 cells finished; no table yet (bench.json)")
    (bench / "cells" / "synthetic-random-ipc1-tiny_convnet-hard.json").unlink()
    assert (describe(bench).startswith("bench config:")
            and describe(bench).endswith("\n0 of 1 cells finished; no table yet (bench.json)"))
    for name, content in (("notes.txt", "mine"), ("config.json", "[1]")):  # not a bench folder: left alone
        mine = tmp_path / f"mine-{name}"
        mine.mkdir()
        (mine / name).write_text(content)
        code, _, err = run_cli(["bench", str(cfg), "--out", str(mine), "-q"], capsys)
        assert code == 2 and "is not a ddkit bench folder" in err and [p.name for p in mine.iterdir()] == [name]
        assert (mine / name).read_text() == content
    synthesis = json.loads((bench / "distilled" / "synthetic-random-ipc1.synthesis.json").read_text())
    assert synthesis["seed"] == 0 and synthesis["versions"]["ddkit"] == ddkit.__version__


def test_show_counts_the_cells_of_a_bench_whose_method_settings_no_longer_read(tmp_path):
    """An unfinished bench folder whose recorded config no longer reads as a whole (a method option or teacher
    setting this ddkit dropped) said only "(its matrix does not read with this ddkit; cannot count finished cells)"
    (QA 15i F8); its cells are counted from the matrix, which is all that names them and their protocols."""
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(
        "datasets: [synthetic]\nipcs: [1]\nstudents: [tiny_convnet]\nlabel_modes: [hard]\nseeds: [0]\n"
        "methods: [random, {name: random, label: r2}]\noverrides: {full_reference: false, random_baseline: false, "
        f"train: {{epochs: 1, batch_size: 8}}}}\nout: {tmp_path / 'bench'}\n")
    assert main(["bench", str(cfg), "-q"]) == 0
    bench = tmp_path / "bench"
    (bench / "bench.json").unlink()
    (bench / "cells" / "synthetic-r2-ipc1-tiny_convnet-hard.json").unlink()
    record = json.loads((bench / "config.json").read_text())
    record["config"]["methods"][1]["options"] = {"dropped_option": 1}
    (bench / "config.json").write_text(json.dumps(record))
    assert describe(bench).endswith(
        "\n1 of 2 cells finished; no table yet (bench.json)\n(its config does not read with this ddkit as a whole "
        "(unknown config key 'methods[r2].options.dropped_option'; methods[r2].options takes no settings; remove "
        "'methods[r2].options.dropped_option'), which `ddkit bench` refuses; cells counted from its matrix)")
    record["config"]["teacher"]["dropped_key"] = 1
    record["config"]["methods"][0] = {"name": "dropped_method", "label": "random"}  # its cells keep their names
    (bench / "config.json").write_text(json.dumps(record))
    assert "\n1 of 2 cells finished; no table yet (bench.json)\n(its config does not read" in describe(bench)
    record["config"]["students"] = 3  # the matrix itself
    (bench / "config.json").write_text(json.dumps(record))
    assert describe(bench).endswith("\n(its matrix does not read with this ddkit; cannot count finished cells)")


def test_relative_dataset_path_is_recorded_absolute(tmp_path, monkeypatch):
    """A set made with a relative dataset path evaluates from any working folder."""
    write_imagefolder(tmp_path / "work" / "pics", {"a": 3, "b": 3}, size=8)
    monkeypatch.chdir(tmp_path / "work")
    dcfg = DatasetConfig(name="imagefolder", path="pics")
    assert dcfg.absolute().path == str(tmp_path / "work" / "pics") and DatasetConfig().absolute().path is None
    data = load_dataset(dcfg)
    ds = distill(data, DistillConfig(method="random", ipc=2), dcfg, tmp_path / "set")
    assert ds.manifest["dataset_config"]["path"] == str(tmp_path / "work" / "pics")
    here = evaluate(tmp_path / "set", resolve_protocol("dc-protocol", FAST), [0])
    monkeypatch.chdir(tmp_path)  # "pics" does not exist here
    # in a cache of its own: the set's student is trained again from the data found there, not read back
    report = evaluate(tmp_path / "set", resolve_protocol("dc-protocol", FAST), [0], cache_dir=tmp_path / "elsewhere")
    assert report["results"]["distilled"]["n"] == 1
    assert report["results"] == here["results"]  # the same data found from elsewhere: the same numbers


def test_run_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    """`ddkit run` writes config.json, report/ and eval-*.json into out: never over a user's files."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: {name: synthetic}\nteacher: null\ndistill: {method: random, ipc: 1}\n"
                   "evaluate: {seeds: [0], overrides: {student: tiny_convnet, full_reference: false, "
                   "random_baseline: false, train: {epochs: 1, batch_size: 8}}}\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')
    code, _, err = run_cli(["run", str(cfg), "--out", str(mine), "-q"], capsys)
    assert code == 2 and "is not a ddkit run folder (it holds config.json)" in err
    assert (sorted(p.name for p in mine.iterdir()) == ["config.json"]
            and (mine / "config.json").read_text() == '{"mine": true}')
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


def _edit(path, change):
    """Apply ``change`` to the JSON record at ``path`` (a manifest of a folder)."""
    path = path / "manifest.json" if path.is_dir() else path
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def test_show_refuses_a_kind_that_is_not_a_name(demo_run, tmp_path, capsys):
    """A list or object as `kind` used to be a traceback (unhashable type: 'list')."""
    for kind in ([], {}):
        bad = tmp_path / f"set-{type(kind).__name__}"
        shutil.copytree(demo_run / "run" / "distilled", bad)
        _edit(bad, lambda m, kind=kind: m.update(kind=kind))
        for flags in ([], ["-q"], ["--json"]):
            assert refused(["show", str(bad), *flags], capsys) == (
                f"{str(bad / 'manifest.json')!r} is not a ddkit record ddkit can summarise (kind "
                f"{kind!r}); pass one of: bench-cell, bench-config, bench-report, bench-table, ddranking-export, "
                "distilled-set, distilled-student-cache, evaluation, evaluation-set, expert-buffer, fkd-soft-labels, "
                "full-reference-cache, imagefolder-decoded, imagefolder-export, pipeline-run, pt-export, "
                "random-baseline-cache, statistics, synthesis-stats, synthesis-timing, teacher")


def test_show_json_refuses_what_show_refuses(tmp_path, capsys):
    """`show --json` printed any JSON object; it now refuses the records plain `show` refuses."""
    for name, text, words in (("empty.json", "{}", "(kind None)"), ("eval.json", '{"kind": "eval"}', "(kind 'eval')"),
                              ("five.json", '{"kind": 5}', "(kind 5)"),
                              ("cell.json", '{"kind": "bench-cell"}', "is a 'bench-cell' record without the field")):
        (tmp_path / name).write_text(text)
        for flags in ([], ["--json"], ["--json", "-q"]):
            assert words in refused(["show", str(tmp_path / name), *flags], capsys)


def test_show_names_a_file_that_is_no_record(demo_run, tmp_path, capsys):
    """An image or weights file read "ddkit record ... is corrupt (UnicodeDecodeError); re-create it"."""
    run = demo_run / "run"
    for path, what in ((run / "distilled" / "preview.png", "a .png file"),
                       (run / "teacher" / "model.safetensors", "a .safetensors file")):
        for flags in ([], ["-q"], ["--json"]):
            assert refused(["show", str(path), *flags], capsys) == (
                f"{str(path)!r} is not a ddkit record ({what} of the ddkit output {str(path.parent)!r}); "
                "pass that folder")
    (tmp_path / "weights.bin").write_bytes(b"\x89\x00\xff binary")
    assert refused(["show", str(tmp_path / "weights.bin")], capsys) == (
        f"{str(tmp_path / 'weights.bin')!r} is not a ddkit record (a .bin file); pass a ddkit output folder, a JSON "
        "record of one, a `ddkit export --format pt` file or a protocol name")
    (tmp_path / "broken.json").write_bytes(b"\xff{")  # a damaged record stays "corrupt"
    assert "is corrupt (UnicodeDecodeError); re-create it" in refused(["show", str(tmp_path / "broken.json")], capsys)


def test_show_refuses_a_bench_table_with_a_damaged_row(tmp_path, capsys):
    """A row whose `synthesis` is null was an AttributeError from bench.synthesis_seconds (`ddkit report`
    refused it)."""
    row = {"dataset": "synthetic", "method": "random", "ipc": 1, "student": "tiny_convnet", "label_mode": "hard",
           "acc": {"per_seed": [0.5], "mean": 0.5, "std": 0.0, "n": 1}, "random": None, "bytes": {"total": 10},
           "synthesis": {"seconds": 1.5}}
    (tmp_path / "bench.json").write_text(json.dumps({"kind": "bench-table", "rows": [row]}))
    assert run_cli(["show", str(tmp_path), "-q"], capsys)[:2] == (0, "")
    (tmp_path / "bench.json").write_text(json.dumps({"kind": "bench-table", "rows": [{**row, "synthesis": None}]}))
    for flags in ([], ["-q"], ["--json"]):
        assert refused(["show", str(tmp_path), *flags], capsys) == (
            f"{str(tmp_path / 'bench.json')!r} is a 'bench-table' record with a field of the wrong type ('NoneType' "
            "object has no attribute 'get'); it is damaged: re-run `ddkit bench` with the run's config (finished cells "
            "are reused) to rebuild it")


def test_show_checks_an_expert_buffer_from_its_file_headers(tmp_path, capsys, monkeypatch):
    """`show -q` passed an expert buffer whose files existed, whatever they held; it reads their headers
    (not the trajectories: gigabytes at paper scale) and the manifest as load_experts does."""
    import safetensors.torch

    good = tmp_path / "experts"
    assert main(["experts", "--dataset", "synthetic", "--model", "tiny_convnet", "--num-experts", "1", "--epochs", "2",
                 "--out", str(good), "-q"]) == 0
    capsys.readouterr()
    man = json.loads((good / "manifest.json").read_text())
    with monkeypatch.context() as m:  # no trajectory is loaded
        m.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("show loaded a tensor file"))
        assert run_cli(["show", str(good), "-q"], capsys)[:2] == (0, "")
    params = man["num_params"]

    def truncate(folder):
        file = folder / "expert_000.safetensors"
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])

    cases = {
        "string": (lambda f: _edit(f, lambda m: m.update(experts="expert_000.safetensors")),
                   "{manifest!r} lacks 'experts' (a list) or holds 'expert_000.safetensors' there; the manifest is "
                   "damaged: re-create the expert-buffer artifact"),
        "epochs": (lambda f: _edit(f, lambda m: m.update(epochs=10)),
                   f"expert file {{file!r}} holds trajectory [3, {params}] (F32), manifest says [11, "
                   f"{params}] (floating point); the buffer is corrupt, re-create it"),
        "none": (lambda f: _edit(f, lambda m: m.update(experts=[])),
                 "expert buffer {folder!r} has no experts; re-create it"),
        "params": (lambda f: _edit(f, lambda m: m.update(params=m["params"][:-1])),
                   f"{{manifest!r}} lists params of {params - man['params'][-1]['shape'][0]} values but num_params "
                   f"{params}; the manifest is damaged: re-create the expert-buffer artifact"),
        "truncated": (truncate, "expert trajectory {file!r} is corrupt (Error while deserializing header: incomplete "
                                "metadata, file not fully covered); re-create it"),
    }
    for name, (damage, message) in cases.items():
        bad = tmp_path / name
        shutil.copytree(good, bad)
        damage(bad)
        want = message.format(folder=str(bad), manifest=str(bad / "manifest.json"),
                              file=str(bad / "expert_000.safetensors"))
        for flags in ([], ["-q"]):
            assert refused(["show", str(bad), *flags], capsys) == want, name
    # --json prints the manifest of a buffer with damaged files (to see what is there), not a damaged manifest
    assert run_cli(["show", str(tmp_path / "truncated"), "--json"], capsys)[0] == 0
    assert refused(["show", str(tmp_path / "string"), "--json"], capsys) == (
        f"{str(tmp_path / 'string' / 'manifest.json')!r} is a 'expert-buffer' record with a field of the wrong type "
        "('str' object has no attribute 'get'); it is damaged, re-create it")
    (tmp_path / "epochs" / "expert_000.safetensors").unlink()  # a file missing: named as before
    assert refused(["show", str(tmp_path / "epochs"), "-q"], capsys) == (
        f"expert-buffer {str(tmp_path / 'epochs')!r} lacks its file(s) ['expert_000.safetensors']; the artifact is "
        "incomplete, re-create it")


def test_show_checks_exports(demo_run, tmp_path, capsys):
    """`show -q` passed an image-folder export missing a class or holding a text file as a PNG, and a
    DD-Ranking export whose images.pt was cut short."""
    src = demo_run / "run" / "distilled"
    folders, ranking = tmp_path / "folders", tmp_path / "ranking"
    assert main(["export", str(src), "--format", "imagefolder", "--out", str(folders), "-q"]) == 0
    assert main(["export", str(src), "--format", "ddranking", "--out", str(ranking), "-q"]) == 0
    capsys.readouterr()
    for good in (folders, ranking):
        assert run_cli(["show", str(good), "-q"], capsys)[:2] == (0, "")
    fix = "the imagefolder-export is incomplete or damaged; export the distilled set again"
    bad = tmp_path / "no-class"
    shutil.copytree(folders, bad)
    for png in (bad / "001_class1").glob("*.png"):
        png.unlink()
    assert refused(["show", str(bad), "-q"], capsys) == (
        f"export {str(bad)!r} holds no images of class folder '001_class1'; {fix}")
    shutil.rmtree(bad / "001_class1")
    assert refused(["show", str(bad)], capsys) == (
        f"export {str(bad)!r} holds no images of class folder '001_class1'; {fix}")
    bad = tmp_path / "one-less"
    shutil.copytree(folders, bad)
    (bad / "002_class2" / "00001.png").unlink()
    assert refused(["show", str(bad), "-q"], capsys) == (
        f"export {str(bad)!r} holds 2 images in its other class folders but 1 in '002_class2'; {fix}")
    bad = tmp_path / "text"
    shutil.copytree(folders, bad)
    (bad / "000_class0" / "00000.png").write_text("not an image")
    png = bad / "000_class0" / "00000.png"
    assert refused(["show", str(bad), "-q"], capsys) == (
        f"image {str(png)!r} does not open (cannot identify image file {str(png)!r}); {fix}")
    from PIL import Image

    bad = tmp_path / "odd-size"  # a 9x5 image among the export's others passed
    shutil.copytree(folders, bad)
    first = bad / "000_class0" / "00000.png"
    with Image.open(first) as im:
        w, h, mode = *im.size, im.mode
    png = bad / "001_class1" / "00001.png"
    Image.new(mode, (9, 5)).save(png)
    assert refused(["show", str(bad), "-q"], capsys) == (
        f"image {str(png)!r} is 9x5 {mode}, but {str(first)!r} is {w}x{h} {mode}: an export's images share one "
        f"size and mode; {fix}")
    Image.new("RGB", (w, h)).save(png)
    assert refused(["show", str(bad), "-q"], capsys) == (
        f"image {str(png)!r} is {w}x{h} RGB, but {str(first)!r} is {w}x{h} {mode}: an export's images share one "
        f"size and mode; {fix}")
    bad = tmp_path / "cut"
    shutil.copytree(ranking, bad)
    (bad / "images.pt").write_bytes((bad / "images.pt").read_bytes()[:200])
    import torch

    from ddkit.artifacts import load_failure

    with pytest.raises(RuntimeError) as cut:
        torch.load(bad / "images.pt")
    # torch's reason, as a damaged `--format pt` export gives it (it named the exception class only)
    assert refused(["show", str(bad), "-q"], capsys) == (
        f"{str(bad / 'images.pt')!r} does not load ({load_failure(cut.value)}); the ddranking-export is incomplete "
        "or damaged; export the distilled set again")
    assert "failed reading zip archive" in load_failure(cut.value)
    assert refused(["show", str(bad)], capsys).endswith(
        "; the ddranking-export is incomplete or damaged; export the distilled set again")
    bad = tmp_path / "fewer"
    shutil.copytree(ranking, bad)
    torch.save(torch.load(ranking / "images.pt")[:-1].clone(), bad / "images.pt")
    assert refused(["show", str(bad), "-q"], capsys) == (
        f"{str(bad / 'images.pt')!r} holds float32 images of shape [7, 1, 16, 16], meta.json says 8 images (2 per "
        "class) of 1 channel(s); the ddranking-export is incomplete or damaged; export the distilled set again")


def test_show_refuses_an_fkd_store_evaluate_refuses(demo_run, tmp_path, capsys):
    """An FKD store recording a teacher BatchNorm mode that is neither 'running' nor 'batch' passed `show -q`."""
    bad = tmp_path / "fkd"
    shutil.copytree(demo_run / "fkd", bad)
    _edit(bad, lambda m: m.update(teacher_bn="xx"))
    for flags in ([], ["-q"]):
        assert refused(["show", str(bad), *flags], capsys) == (
            f"{str(bad / 'manifest.json')!r}: teacher_bn must be 'running' or 'batch', got 'xx'; the "
            "manifest is damaged: re-create the store with `ddkit relabel`")


def test_show_names_an_fkd_stores_teacher_batchnorm_groups(demo_run, tmp_path, capsys):
    """`show` of a store labelled with batch statistics left out its group size (`teacher_bn_batch`)."""
    expected = {("running", None): "teacher BatchNorm running,",
                ("batch", None): "teacher BatchNorm batch (all views of an epoch),",
                ("batch", 4): "teacher BatchNorm batch (groups of 4 views),"}
    for (bn, group), text in expected.items():
        store = tmp_path / f"fkd-{bn}-{group}"
        shutil.copytree(demo_run / "fkd", store)
        _edit(store, lambda m, bn=bn, group=group: m.update(teacher_bn=bn, teacher_bn_batch=group))
        code, out, err = run_cli(["show", str(store)], capsys)
        assert code == 0 and text in out, (err, out)


def test_show_checks_the_stages_of_a_run(demo_run, tmp_path, capsys):
    """`show -q RUN` exited 0 with a truncated teacher, set or FKD store in the run folder: a run's
    stages are checked as their own artifacts."""
    run = tmp_path / "run"
    shutil.copytree(demo_run / "run", run)
    assert run_cli(["show", str(run), "-q"], capsys)[:2] == (0, "")
    for stage, file in (("distilled", "images.safetensors"), ("teacher", "model.safetensors")):
        target = run / stage / file
        whole = target.read_bytes()
        target.write_bytes(whole[:50])
        code, out, err = run_cli(["show", str(run), "-q"], capsys)
        assert code == 2 and out == "" and err.startswith(f"error: the run's {stage} stage: ") and str(target) in err
        assert len(err.splitlines()) == 1
        target.write_bytes(whole)


def test_show_suggests_the_protocol_a_typo_meant(tmp_path, capsys, monkeypatch):
    """`show ecd` said only "not found": --protocol's typos got a did-you-mean, show's did not."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["show", "ecd"], capsys)
    assert (code, err) == (2, "error: 'ecd' not found (no file, folder or protocol of that name); did you mean the "
                              "protocol 'edc'?\n")
    for target in ("runs/demo", "xyzzy"):  # a path's typo, or nothing like a protocol: not found, as before
        code, _, err = run_cli(["show", target], capsys)
        assert code == 2 and err.startswith(f"error: '{target}' not found; pass a ddkit output folder"), err


def test_show_of_a_registered_name_is_not_shadowed_by_a_file_of_that_name(tmp_path, capsys, monkeypatch):
    """QA 23b F3: a file `edc` in the current folder made `show edc` read the file and ask for "a protocol name"; a
    bare registered name wins, as --protocol reads it (./edc is the file), and folders and suffixed paths stay paths."""
    monkeypatch.chdir(tmp_path)
    _, protocol, _ = run_cli(["show", "edc"], capsys)
    _, method, _ = run_cli(["show", "sre2l"], capsys)
    for name in ("edc", "sre2l"):
        (tmp_path / name).write_text("train: {epochs: 1}\n")
    assert run_cli(["show", "edc"], capsys)[:2] == (0, protocol)
    assert run_cli(["show", "sre2l"], capsys)[:2] == (0, method)
    code, out, err = run_cli(["show", "./edc"], capsys)  # the file: no record of ddkit's
    assert (code, out) == (2, "") and err.startswith("error: 'edc' is not a ddkit record (a file that is not JSON)")
    (tmp_path / "random").mkdir()  # a folder named as a method is a path
    code, _, err = run_cli(["show", "random"], capsys)
    assert code == 2 and err.startswith("error: 'random' holds no ddkit record"), err
    (tmp_path / "notes").write_text("x")  # a file of no registered name is a path
    code, _, err = run_cli(["show", "notes"], capsys)
    assert code == 2 and err.startswith("error: 'notes' is not a ddkit record"), err


def test_show_summarises_the_synthesis_records_of_a_benchmark(tmp_path, capsys):
    """`show` refused the `NAME.synthesis.json` benchmarks/dc_dsa.py writes (kind synthesis-timing)."""
    done = tmp_path / "dc-it1.synthesis.json"
    done.write_text(json.dumps({"schema_version": 1, "kind": "synthesis-timing", "wall_seconds": 12.34,
                                "chunks_resumed": True, "device": "cpu", "machine": "a box, device cpu",
                                "command": "python benchmarks/dc_dsa.py --methods dc"}))
    partial = tmp_path / "dc-it1.synthesis.partial.json"
    partial.write_text(json.dumps({"schema_version": 1, "kind": "synthesis-timing", "wall_seconds": 5.0}))
    code, out, err = run_cli(["show", str(done)], capsys)
    assert (code, err) == (0, "")
    assert out == ("synthesis (benchmarks/dc_dsa.py): 12.3 s wall on cpu, in chunks resumed from checkpoints; "
                   "machine: a box, device cpu\nmade by: python benchmarks/dc_dsa.py --methods dc\n")
    assert describe(partial) == "synthesis so far (benchmarks/dc_dsa.py, unfinished or interrupted): 5.0 s"
    partial.write_text(json.dumps({"kind": "synthesis-timing"}))
    code, _, err = run_cli(["show", "-q", str(partial)], capsys)
    assert code == 2 and "'synthesis-timing' record without the field 'wall_seconds'" in err


def test_show_a_methods_options(tmp_path, capsys, monkeypatch):
    """`ddkit show dm` said "'dm' not found ... did you mean the protocol 'demo'?": a method's options were
    only in its source. A file or folder, then a protocol keep their place before a method of that name."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["show", "dm"], capsys)
    lines = out.splitlines()
    assert code == 0 and err == ""
    assert lines[0] == ('method dm (ddkit.methods.dm.DM): Distribution Matching (Zhao & Bilen, "Dataset Condensation '
                        'with Distribution Matching", WACV 2023).')
    assert lines[2] == "options (distill.options.OPTION in a config, --set distill.options.OPTION=VALUE):"
    assert lines[3].split() == ["option", "type", "default", "help"]
    assert lines[4].split(maxsplit=3) == ["iterations", "int", "20000", "image updates, each with a freshly "
                                          "initialised network (paper: 20000)"]
    assert "  init              real | noise  real      initial images" in out
    record = json.loads(run_cli(["show", "dm", "--json"], capsys)[1])
    assert record["options"][0] == {"name": "iterations", "type": "int", "default": 20000,
                                    "help": "image updates, each with a freshly initialised network (paper: 20000)"}
    assert (record["needs_teacher"], record["uses_teacher"], record["uses_seed"], record["resumable"]) == (
        False, False, True, True)
    assert run_cli(["show", "full"], capsys)[1].splitlines()[1:] == [
        "needs a teacher: no (reads none); another seed, another set: no; resumes after an interruption: no",
        "options: none"]
    assert run_cli(["show", "dm", "-q"], capsys)[:2] == (0, "")
    # a name both protocol and method shows the protocol, as before, and says how to see the method
    code, out, err = run_cli(["show", "edc"], capsys)
    assert code == 0 and json.loads(out)["label_mode"] == "teacher"
    assert err == "note: 'edc' is also a method; `ddkit show method:edc` shows its options\n"
    code, out, err = run_cli(["show", "method:edc"], capsys)
    assert code == 0 and out.startswith("method edc (ddkit.methods.edc.EDC): Elucidating") and err == ""
    assert refused(["show", "method:edcc"], capsys) == (
        "unknown method 'edcc'; did you mean 'edc'? (or one of your own: import the module that registers it first; "
        "the CLI imports those named in DDKIT_PLUGINS)")
    # a typo: the closer of a protocol and a method, the protocol when as close
    assert refused(["show", "dmm"], capsys) == ("'dmm' not found (no file, folder, protocol or method of that name); "
                                                 "did you mean the method 'dm'?")
    assert refused(["show", "ecd"], capsys).endswith("did you mean the protocol 'edc'?")
    # a folder of a method's name is shown as the folder
    (tmp_path / "dm").mkdir()
    assert refused(["show", "dm"], capsys).startswith("'dm' holds no ddkit record")


def test_a_runs_stages_stay_inside_the_run_folder(demo_run, tmp_path, capsys):
    """A run's manifest names its stages by their folder in the run (so a moved run loads); an absolute path
    or '../' there made ddkit.load and `show -q` read a set (or teacher, store) from anywhere."""
    run = tmp_path / "moved"
    shutil.copytree(demo_run / "run", run)  # what ddkit wrote, moved: loads and shows as before
    assert ddkit.load(run).path == run / "distilled" and run_cli(["show", str(run), "-q"], capsys)[:2] == (0, "")
    good = json.loads((run / "manifest.json").read_text())
    man = str(run / "manifest.json")
    fix = "the manifest is damaged: run the run's config again to rewrite it"
    for stage, name in (("distilled", str(demo_run / "run" / "distilled")), ("distilled", "../moved/distilled"),
                        ("teacher", str(demo_run / "run" / "teacher")), ("labels", "../../fkd")):
        (run / "manifest.json").write_text(json.dumps({**good, "stages": {**good["stages"], stage: name}}))
        message = f"{man!r} names {name!r} as stages.{stage}, which leads outside the artifact's folder; {fix}"
        assert run_cli(["show", str(run), "-q"], capsys) == (2, "", f"error: {message}\n")
        if stage == "distilled":
            with pytest.raises(DDKitError) as raised:
                ddkit.load(run)
            assert str(raised.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moved"]


def test_show_json_refuses_a_record_holding_nan(demo_run, tmp_path, capsys):
    """`show --json` of a report whose mean was NaN printed `"mean": NaN`, which is not JSON; like any
    damaged record, it is now refused in one line."""
    report = json.loads((demo_run / "run" / "eval-hard.json").read_text())
    seeds = report["results"]["distilled"]["per_seed"]
    report["results"]["distilled"]["mean"] = float("nan")  # refused by the check of summaries against per_seed
    (tmp_path / "nan.json").write_text(json.dumps(report))
    assert len(seeds) == 1 and run_cli(["show", "--json", str(tmp_path / "nan.json")], capsys) == (
        2, "", f"error: evaluation report {str(tmp_path / 'nan.json')!r} holds results.distilled mean nan, not the "
               f"mean of its per_seed {seeds} ({seeds[0]!r}); the report is damaged: delete it and evaluate again\n")
    report["results"]["distilled"]["mean"] = report["results"]["distilled"]["per_seed"][0]
    report["wall_seconds"] = float("nan")  # a number no check reads
    (tmp_path / "nan.json").write_text(json.dumps(report))
    assert run_cli(["show", "--json", str(tmp_path / "nan.json")], capsys) == (
        2, "", f"error: {str(tmp_path / 'nan.json')!r} holds wall_seconds = nan, a number JSON cannot hold; "
               "the record is damaged, re-create it\n")
    code, out, _ = run_cli(["show", "--json", str(demo_run / "run" / "eval-hard.json")], capsys)
    assert code == 0 and json.loads(out) == json.loads((demo_run / "run" / "eval-hard.json").read_text())


def test_show_and_errors_escape_control_characters_read_from_artifacts(demo_run, tmp_path, capsys):
    """A received manifest's method name "ran\\x1b[2Jdom" cleared the screen in `ddkit show`, and one in an
    evaluation report set the terminal's title; newlines broke the table. Text the CLI prints is escaped
    (repr style), line breaks of its own kept."""
    from ddkit import cli

    name = "ran\x1b[2Jdom\x07\nx"
    distilled = tmp_path / "set"
    shutil.copytree(demo_run / "run" / "distilled", distilled)
    man = json.loads((distilled / "manifest.json").read_text())
    (distilled / "manifest.json").write_text(json.dumps({**man, "method": {**man["method"], "name": name}}))
    report = json.loads((demo_run / "run" / "eval-hard.json").read_text())
    (tmp_path / "eval.json").write_text(json.dumps({**report, "distilled": {**report["distilled"], "method": name}}))
    escaped = "ran\\x1b[2Jdom\\x07\\nx"
    assert main(["show", str(distilled)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"distilled set: {escaped} ipc=2 on synthetic") and "\x1b" not in out and "\x07" not in out
    assert main(["show", str(tmp_path / "eval.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith(f"{escaped} ipc=2     hard     tiny_convnet")
    assert len(lines) == 5  # header, rule, set, random, full
    cli._error("class 'a\x1b[31m' of\tteacher")
    assert capsys.readouterr().err == "error: class 'a\\x1b[31m' of\tteacher\n"


def test_escaping_keeps_real_names_and_escapes_what_moves_the_terminal():
    """Escaping every non-printable character mangled real names and paths (a no-break space, an emoji's
    zero-width joiner printed as \\xa0, \\u200d); only controls, line separators and bidi overrides are escaped."""
    from ddkit.errors import printable

    for name in ("café", "漢字", "a\u00a0b", "👩\u200d💻", "x\u200by"):
        assert printable(name) == name
    assert printable("a\x1b[2Jb\x07\x9bc") == "a\\x1b[2Jb\\x07\\x9bc"
    assert printable("evil\u202egnp.exe\u2066") == "evil\\u202egnp.exe\\u2066"
    assert printable("one\u2028two\nthree", keep="\n") == "one\\u2028two\nthree"


def test_records_of_a_newer_ddkit_are_refused_as_artifacts_are(demo_run, tmp_path, capsys):
    """An evaluation report or bench table with a future schema_version was read and shown (`show`, `show --json`,
    `ddkit.load`, `ddkit report`), where an artifact folder of one is refused: a newer ddkit may mean other things by
    its fields (QA 18d F10)."""
    report = json.loads((demo_run / "run" / "eval-hard.json").read_text())
    future = tmp_path / "eval-future.json"
    future.write_text(json.dumps({**report, "schema_version": 999}))
    newer = f"error: {str(future)!r} has schema_version 999, newer than this ddkit understands (1); upgrade ddkit\n"
    for argv in (["show", str(future)], ["show", "--json", str(future)]):
        assert run_cli(argv, capsys) == (2, "", newer)
    with pytest.raises(DDKitError, match=f"^{re.escape(newer[7:-1])}$"):
        ddkit.load(future)
    future.write_text(json.dumps({**report, "schema_version": "1"}))
    code, out, err = run_cli(["show", str(future)], capsys)
    assert code == 2 and err.startswith(f"error: {str(future)!r} holds schema_version '1', not a version number; ")
    cfg = tmp_path / "bench.yaml"
    cfg.write_text("datasets: [synthetic]\nipcs: [1]\nstudents: [tiny_convnet]\nlabel_modes: [hard]\nseeds: [0]\n"
                   "methods: [random]\noverrides: {full_reference: false, random_baseline: false, train: {epochs: 1, "
                   f"batch_size: 8}}}}\nout: {tmp_path / 'bench'}\n")
    assert main(["bench", str(cfg), "-q"]) == 0
    table = tmp_path / "bench" / "bench.json"
    table.write_text(json.dumps({**json.loads(table.read_text()), "schema_version": 999}))
    capsys.readouterr()
    newer = f"error: {str(table)!r} has schema_version 999, newer than this ddkit understands (1); upgrade ddkit\n"
    for argv in (["show", str(tmp_path / "bench")], ["show", str(table)],
                 ["report", str(tmp_path / "bench"), "--out", str(tmp_path / "report"), "-q"]):
        assert run_cli(argv, capsys) == (2, "", newer), argv
    assert not (tmp_path / "report").exists()
