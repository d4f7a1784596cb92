"""The CLI end to end, as a user runs it, on generated data and tiny models."""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import run_cli
from ddkit.cli import main

FAST = ["--set", "student=tiny_convnet", "--set", "full_epochs=2", "--set", "train.epochs=20",
        "--set", "train.batch_size=32", "--set", "train.lr=0.05"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding a tiny teacher (``teacher``, 6 epochs) and a soft-labelled random set (``r5``,
    IPC 5, seed 1), made with the CLI, for the tests that use them (each used to rely on the test that
    made them running first); ``outputs.json`` holds what the two commands printed."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("cli")
    commands = {
        "teacher": ["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", "6",
                    "--set", "teacher.train.lr=0.05", "--out", str(root / "teacher"), "-q"],
        "distill": ["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "5", "--seed", "1",
                    "--teacher", str(root / "teacher"), "--soft-labels", "--out", str(root / "r5"), "-q"],
    }
    outputs = {}
    for name, args in commands.items():
        with contextlib.redirect_stdout(io.StringIO()) as buf:
            assert main(args) == 0, name
        outputs[name] = buf.getvalue()
    (root / "outputs.json").write_text(json.dumps(outputs))
    return root


def test_list(capsys):
    code, out, _ = run_cli(["list", "methods"], capsys)
    assert (code == 0 and {"full", "random", "dc", "dsa", "dm", "mtt", "tesla", "datm", "sre2l", "edc", "rded"}
            <= set(out.split()))
    code, out, _ = run_cli(["list", "methods", "d*"], capsys)
    assert out.split() == sorted(m for m in out.split() if m.startswith("d")) and "random" not in out
    code, out, _ = run_cli(["list", "models", "convnet3*"], capsys)
    assert "convnet3" in out.split() and "resnet18_cifar" not in out
    # the README's order, the glob after -l (argparse alone refused it: "unrecognized arguments: d*")
    long = [run_cli(argv, capsys)[:2] for argv in (["list", "methods", "-l", "d*"], ["list", "-l", "methods", "d*"])]
    assert long[0] == long[1] and long[0][0] == 0 and long[0][1].startswith("datadam  DataDAM (Sajedi")
    assert "random" not in long[0][1]
    # `--` keeps its meaning: what follows is positional (the reordering moved it behind the glob, refused)
    dashed = [run_cli(argv, capsys)[:2] for argv in (["list", "methods", "-l", "--", "d*"],
                                                      ["list", "-l", "--", "methods", "d*"])]
    assert dashed == long
    assert run_cli(["list", "methods", "--", "d*"], capsys)[:2] == run_cli(["list", "methods", "d*"], capsys)[:2]
    with pytest.raises(SystemExit, match="2"):  # an option after `--` is a positional: `-l` is no registry
        run_cli(["list", "--", "-l", "methods"], capsys)
    with pytest.raises(SystemExit, match="2"):
        run_cli(["list", "methods", "-l", "d*", "e*"], capsys)
    code, out, _ = run_cli(["list", "datasets"], capsys)
    assert {"fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "tensors", "synthetic"} <= set(out.split())
    code, out, _ = run_cli(["list", "protocols"], capsys)
    assert {"dc-protocol", "dsa-protocol", "edc", "soft-kl", "demo"} <= set(out.split())
    # a ConvNet name of the grammar the README and presets use is no registered name but builds
    code, out, _ = run_cli(["list", "models", "convnet3-p3"], capsys)
    assert code == 0 and out == "convnet3-p3  (options {'depth': 3, 'first_padding': 3})\n"
    code, _, err = run_cli(["list", "models", "convnet3-zz"], capsys)
    assert code == 2 and "(ConvNets also read any name of the grammar convnet[d<N>]" in err


def test_teacher_distill_evaluate_show_export(workdir, capsys, tmp_path):
    t, d = workdir / "teacher", workdir / "r5"
    printed = json.loads((workdir / "outputs.json").read_text())
    assert "test accuracy" in printed["teacher"] and "20 images" in printed["distill"]
    assert json.loads((t / "manifest.json").read_text())["config"]["train"]["epochs"] == 6
    man = json.loads((d / "manifest.json").read_text())
    assert man["seed"] == 1 and man["files"]["soft_labels"] == "soft_labels.safetensors"
    # the resolved config: defaults filled in, not just what was typed
    assert man["config"]["distill"] == {**man["config"]["distill"], "method": "random", "ipc": 5, "seed": 1,
                                        "soft_labels": True, "options": {}}
    assert man["config"]["distill"]["soft_labels_bn"] == "running" and man["config"]["dataset"]["name"] == "synthetic"
    assert "subset_seed" in man["config"]["dataset"]
    ev = tmp_path / "ev.json"
    code, out, _ = run_cli(["evaluate", str(d), "--seeds", "0,1", "--teacher", str(t), "--label-mode", "teacher",
                            "--out", str(ev), "-q", *FAST], capsys)
    assert code == 0, out
    rep = json.loads(ev.read_text())
    assert rep["config"]["label_mode"] == "teacher" and rep["config"]["loss"] == "kl"
    assert rep["config"]["train"]["epochs"] == 20 and len(rep["results"]["distilled"]["per_seed"]) == 2
    assert "random ipc=5" in out and "label bytes" in out
    code, out, _ = run_cli(["show", str(d)], capsys)
    assert code == 0 and "random ipc=5 on synthetic" in out
    code, out, _ = run_cli(["show", str(ev)], capsys)
    assert code == 0 and "teacher" in out
    code, out, _ = run_cli(["export", str(d), "--format", "imagefolder", "--out", str(tmp_path / "png")], capsys)
    assert code == 0 and len(list((tmp_path / "png").rglob("*.png"))) == 20


def test_run_writes_the_same_numbers_in_a_fresh_process(tmp_path, capsys, monkeypatch):
    """torch seeds its global generator from the OS in every new process (this one's: the test seed); a run
    draws the initial weights and dropout of its teacher, synthesis nets and students from its own seeds,
    so a fresh process writes the same weights, images and accuracies, to the byte."""
    from conftest import run_ddkit

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "dataset: {name: synthetic}\n"
        "teacher: {model: tiny_convnet, train: {epochs: 1, batch_size: 32}}\n"
        "distill: {method: dm, ipc: 2, options: {model: tiny_convnet, iterations: 2}}\n"
        "evaluate:\n  protocol: dc-protocol\n  overrides: {student: tiny_convnet, random_baseline: false, "
        "full_reference: false, train: {epochs: 2, batch_size: 32}}\n  label_modes: [teacher]\n  seeds: [0, 1]\n"
        "out: run\n"
    )
    here, fresh = tmp_path / "here", tmp_path / "fresh"
    here.mkdir()
    fresh.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setenv("DDKIT_CACHE", str(here / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as run_ddkit's process (the CPU's float sums depend on the thread count)
    try:
        assert run_cli(["run", str(cfg), "-q"], capsys)[0] == 0
    finally:
        torch.set_num_threads(threads)
    run_ddkit(fresh, "run", str(cfg))
    for name in ("teacher/model.safetensors", "distilled/images.safetensors"):
        assert (here / "run" / name).read_bytes() == (fresh / "run" / name).read_bytes(), name
    runs = [json.loads((d / "run" / "eval-teacher.json").read_text())["results"]["distilled"] for d in (here, fresh)]
    assert len(runs[0]["per_seed"]) == 2 and runs[0]["per_seed"] == runs[1]["per_seed"]


def test_run_reuses_finished_stages(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "dataset: {name: synthetic}\n"
        "teacher: {model: tiny_convnet, train: {epochs: 4, batch_size: 32}}\n"
        "distill: {method: random, ipc: 3}\n"
        "evaluate:\n  protocol: dc-protocol\n  overrides: {student: tiny_convnet, full_epochs: 1, train: {epochs: 10, "
        "batch_size: 32}}\n  label_modes: [hard, teacher]\n  seeds: [0]\n"
        f"out: {tmp_path / 'run'}\n"
    )
    code, out, _ = run_cli(["run", str(cfg), "-q"], capsys)
    assert code == 0 and "reused" not in out
    files = {p.relative_to(tmp_path / "run").as_posix() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert {"teacher/manifest.json", "distilled/manifest.json", "eval-hard.json", "eval-teacher.json", "config.json",
            "report/summary.md", "report/eval.json", "report/distilled-grid.png"} <= files
    first = json.loads((tmp_path / "run/eval-teacher.json").read_text())
    code, out, _ = run_cli(["run", str(cfg), "-q"], capsys)
    assert code == 0 and "reused: teacher, distilled, eval-hard.json, eval-teacher.json" in out
    assert json.loads((tmp_path / "run/eval-teacher.json").read_text()) == first
    # changing the distillation seed re-runs distill and evaluation, but reuses the teacher
    code, out, _ = run_cli(["run", str(cfg), "-q", "--set", "distill.seed=1"], capsys)
    assert code == 0 and "reused: teacher\n" in out


def test_a_run_stopped_after_replacing_a_stage_does_not_show_as_finished(tmp_path, capsys, monkeypatch):
    """A finished run re-run with another distillation seed and stopped (Ctrl-C) before its evaluations
    kept the previous run's manifest.json beside the new distilled set: `ddkit show -q` exited 0 and
    showed the old seed's accuracies for a set no longer on disk."""
    import ddkit.pipeline

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "dataset: {name: synthetic}\nteacher: null\n"
        "distill: {method: random, ipc: 2}\n"
        "evaluate:\n  protocol: dc-protocol\n  overrides: {student: tiny_mlp, full_reference: false, train: "
        "{epochs: 2}}\n  label_modes: [hard]\n  seeds: [0]\n"
        f"out: {tmp_path / 'run'}\n"
    )
    assert run_cli(["run", str(cfg), "-q"], capsys)[0] == 0
    assert run_cli(["show", "-q", str(tmp_path / "run")], capsys)[0] == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ddkit.pipeline, "evaluate", interrupted)
    code, _, err = run_cli(["run", str(cfg), "-q", "--set", "distill.seed=1"], capsys)
    assert code == 130 and err == "interrupted; run the same command again to resume\n"  # reuses finished stages
    assert json.loads((tmp_path / "run/distilled/manifest.json").read_text())["seed"] == 1
    assert not (tmp_path / "run/manifest.json").exists()
    code, _, err = run_cli(["show", "-q", str(tmp_path / "run")], capsys)
    assert code == 2 and "is an unfinished `ddkit run` folder (stages done: " in err
    monkeypatch.undo()
    assert run_cli(["run", str(cfg), "-q", "--set", "distill.seed=1"], capsys)[0] == 0
    assert json.loads((tmp_path / "run/manifest.json").read_text())["seed"] == 1


@pytest.mark.parametrize("stage", ["teacher", "distilled"])
def test_a_stage_reused_after_a_kill_between_its_save_and_cleanup_removes_its_checkpoints(tmp_path, capsys,
                                                                                          monkeypatch, stage):
    """A run stopped right after a stage saved its artifact, before it removed its checkpoints (the
    teacher's resume file, distill's work folder), reused the stage in every later run, and nothing
    ever removed them."""
    from ddkit.distilled import DistilledSet
    from ddkit.teacher import Teacher

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "dataset: {name: synthetic}\n"
        "teacher: {model: tiny_convnet, train: {epochs: 2, batch_size: 32}}\n"
        "distill: {method: dm, ipc: 2, options: {model: tiny_convnet, iterations: 4, batch_real: 8, "
        "checkpoint_every: 2}}\nevaluate:\n  protocol: dc-protocol\n  overrides: {student: tiny_mlp, full_reference: "
        "false, train: {epochs: 2}}\n  label_modes: [hard]\n  seeds: [0]\n"
        f"out: {tmp_path / 'run'}\n"
    )
    cls = Teacher if stage == "teacher" else DistilledSet
    real_save = cls.save

    def killed_after_save(self, path, *args, **kwargs):
        real_save(self, path, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(cls, "save", killed_after_save)
    assert run_cli(["run", str(cfg), "-q"], capsys)[0] == 130
    pattern = ".teacher.resume-*.pt" if stage == "teacher" else ".distilled.work"
    assert len(list((tmp_path / "run").glob(pattern))) == 1 and (tmp_path / "run" / stage / "manifest.json").is_file()
    monkeypatch.undo()
    code, out, _ = run_cli(["run", str(cfg), "-q"], capsys)
    assert code == 0 and re.search(rf"reused: (teacher, )?{stage}\b", out)
    assert list((tmp_path / "run").glob(".*")) == []


def test_run_retrains_when_the_data_normalisation_changes(tmp_path, capsys):
    """A tensors file's stored mean/std normalise every input; the same pixels under new ones used to
    reuse the teacher and the distilled set made under the old ones (both were keyed by the pixels only)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {"train_images": torch.randint(0, 256, (40, 1, 8, 8), generator=gen, dtype=torch.uint8),
               "train_labels": torch.arange(40) % 4, "test_images": torch.randint(0, 256, (8, 1, 8, 8), generator=gen,
                                                                                dtype=torch.uint8),
               "test_labels": torch.arange(8) % 4, "mean": torch.tensor([0.5]), "std": torch.tensor([0.3])}
    file = tmp_path / "d.safetensors"
    save_file(tensors, str(file))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"dataset: {{name: tensors, path: {file}}}\n"
        "teacher: {model: tiny_convnet, train: {epochs: 1, batch_size: 16}}\n"
        "distill: {method: random, ipc: 2}\n"
        "evaluate: {label_modes: [teacher], seeds: [0], overrides: {student: tiny_convnet, full_epochs: 1, train: "
        "{epochs: 1}}}\n"
        f"out: {tmp_path / 'run'}\n"
    )
    assert run_cli(["run", str(cfg), "-q"], capsys)[0] == 0
    code, out, _ = run_cli(["run", str(cfg), "-q"], capsys)
    assert code == 0 and "reused: teacher, distilled, eval-teacher.json" in out
    save_file({**tensors, "mean": torch.tensor([0.1]), "std": torch.tensor([0.6])}, str(file))
    code, out, _ = run_cli(["run", str(cfg), "-q"], capsys)
    assert code == 0 and "reused" not in out
    manifest = json.loads((tmp_path / "run/teacher/manifest.json").read_text())
    assert manifest["dataset"]["mean"] == [pytest.approx(0.1)] and manifest["dataset"]["std"] == [pytest.approx(0.6)]


def test_a_run_does_not_relabel_into_a_store_a_relabel_is_writing(tmp_path, capsys):
    """`ddkit run` in label mode fkd makes its store under `RUN/labels` as `ddkit relabel --out RUN/labels` does, in
    the same hidden work folder: it takes that folder's lock too, so it refuses in one line while a relabel writes
    there (it used to finish, and the relabel then failed on the folder the run had removed)."""
    from ddkit.artifacts import hidden_path, writing

    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: {name: synthetic}\n"
                   "teacher: {model: tiny_convnet, train: {epochs: 1, batch_size: 32}}\n"
                   "distill: {method: random, ipc: 2}\nrelabel: {epochs: 2}\n"
                   "evaluate: {label_modes: [fkd], seeds: [0], overrides: {student: tiny_convnet, "
                   "random_baseline: false, full_reference: false, train: {epochs: 2, batch_size: 16}}}\n"
                   f"out: {tmp_path / 'run'}\n")
    labels = tmp_path / "run" / "labels"
    with writing(hidden_path(labels, ".partial"), labels):  # a `ddkit relabel --out run/labels` meanwhile
        code, out, err = run_cli(["run", str(cfg), "-q"], capsys)
    assert code == 2 and err == (f"error: another ddkit call (in this process or another) is writing {str(labels)!r}; "
                                 "wait for it or choose another --out\n")
    assert not labels.exists()
    assert run_cli(["run", str(cfg), "-q"], capsys)[0] == 0  # once it is done
    assert (labels / "manifest.json").is_file() and not hidden_path(labels, ".partial").exists()


def test_run_keys_an_fkd_evaluation_by_the_store_not_its_path(tmp_path, capsys):
    """Label mode fkd: `run` keys the evaluation by what the FKD store holds. A store re-made in place
    with other settings used to reuse the old store's evaluation (the key named the path); a copy of
    the store under another path reuses it."""
    import shutil

    base = ("dataset: {name: synthetic}\n"
            "teacher: {model: tiny_convnet, train: {epochs: 1, batch_size: 32}}\n"
            "distill: {method: random, ipc: 2}\n"
            f"out: {tmp_path / 'run'}\n")
    cfg = tmp_path / "run.yaml"

    def run(mode: str, store=None) -> str:
        extra = f"fkd_store: {store}, " if store else ""
        cfg.write_text(base + f"evaluate: {{label_modes: [{mode}], seeds: [0], overrides: {{student: tiny_convnet, "
                       f"{extra}random_baseline: false, full_reference: false, train: {{epochs: 2, "
                       "batch_size: 16}}}\n")
        code, out, err = run_cli(["run", str(cfg), "-q"], capsys)
        assert code == 0, err
        return out

    run("hard")
    labels = tmp_path / "labels"
    relabel = ["relabel", str(tmp_path / "run/distilled"), "--teacher", str(tmp_path / "run/teacher"), "--epochs", "2",
               "--out", str(labels), "-q"]
    assert run_cli(relabel, capsys)[0] == 0
    assert "reused: teacher, distilled\n" in run("fkd", labels)
    first = json.loads((tmp_path / "run/eval-fkd.json").read_text())["run_hash"]
    assert "reused: teacher, distilled, eval-fkd.json" in run("fkd", labels)
    assert run_cli([*relabel, "--seed", "1"], capsys)[0] == 0  # other views and logits, same path
    assert "reused: teacher, distilled\n" in run("fkd", labels)
    second = json.loads((tmp_path / "run/eval-fkd.json").read_text())["run_hash"]
    assert second != first
    shutil.copytree(labels, tmp_path / "copied")
    assert "reused: teacher, distilled, eval-fkd.json" in run("fkd", tmp_path / "copied")
    assert json.loads((tmp_path / "run/eval-fkd.json").read_text())["run_hash"] == second


def test_run_makes_its_own_fkd_store_when_none_is_named(tmp_path, capsys, caplog, monkeypatch):
    """Label mode fkd without evaluate.overrides.fkd_store: `run` relabels its own set into labels/
    (with the relabel: section's settings), reuses the store while the settings hold, and makes it
    again (and evaluates again) when they change. Before, run refused fkd without a store."""
    cfg = tmp_path / "run.yaml"

    def run(relabel: str) -> str:
        cfg.write_text(
            "dataset: {name: synthetic}\n"
            "teacher: {model: tiny_convnet, train: {epochs: 1, batch_size: 32}}\n"
            "distill: {method: random, ipc: 2}\n"
            "evaluate: {label_modes: [hard, fkd], seeds: [0], overrides: {student: tiny_convnet, "
            "random_baseline: false, full_reference: false, train: {epochs: 2, batch_size: 16}}}\n"
            f"relabel: {relabel}\n"
            f"out: {tmp_path / 'run'}\n")
        code, out, err = run_cli(["run", str(cfg), "-q"], capsys)
        assert code == 0, err
        return out

    run("{seed: 0}")
    store = json.loads((tmp_path / "run/labels/manifest.json").read_text())
    assert store["kind"] == "fkd-soft-labels" and store["epochs"] == 2 and store["num_images"] == 8  # protocol's epochs
    assert store["distilled"]["path"] == str(tmp_path / "run/distilled") and store["config"]["seed"] == 0
    report = json.loads((tmp_path / "run/eval-fkd.json").read_text())
    assert report["bytes"]["fkd_labels"] == store["bytes"]["total"] > 0
    assert json.loads((tmp_path / "run/manifest.json").read_text())["stages"]["labels"] == "labels"
    assert not list(tmp_path.glob("run/.labels*"))  # the finished epochs are gone once the store is saved
    assert "reused: teacher, distilled, labels, eval-hard.json, eval-fkd.json" in run("{seed: 0}")
    # the store is read once: the evaluation replays the store the run made or checked (it read it twice)
    from ddkit.labels import SoftLabelStore

    loads, load = [], SoftLabelStore.load
    monkeypatch.setattr(SoftLabelStore, "load", classmethod(lambda cls, path: loads.append(path) or load(path)))
    (tmp_path / "run/eval-fkd.json").unlink()
    assert "reused: teacher, distilled, labels, eval-hard.json\n" in run("{seed: 0}")
    assert len(loads) == 1  # replayed from memory: the same numbers as the first run's, made from a fresh store
    assert json.loads((tmp_path / "run/eval-fkd.json").read_text())["results"] == report["results"]
    out = run("{seed: 1, epochs: 3}")  # other views: a new store, and the fkd evaluation again
    # the old store, read to check its settings; the new one, streamed to disk epoch by epoch and read back from
    # there (memory-mapped) once, for the evaluation to replay
    assert len(loads) == 3
    assert "reused: teacher, distilled, eval-hard.json\n" in out
    again = json.loads((tmp_path / "run/labels/manifest.json").read_text())
    assert (again["epochs"], again["config"]["seed"]) == (3, 1)
    assert json.loads((tmp_path / "run/eval-fkd.json").read_text())["run_hash"] != report["run_hash"]
    # a damaged store was reused (the run exited 0) and failed only at an evaluation: it is labelled again
    store_file = tmp_path / "run/labels/fkd_labels.safetensors"
    whole = store_file.read_bytes()
    store_file.write_bytes(whole[:100])
    assert "reused: teacher, distilled, eval-hard.json, eval-fkd.json\n" in run("{seed: 1, epochs: 3}")
    assert store_file.read_bytes() == whole
    # a labels folder that is no store fails before any epoch is labelled, naming the folder to remove
    (tmp_path / "run/labels/manifest.json").unlink()
    cfg.write_text(cfg.read_text().replace("seed: 1", "seed: 2"))
    code, _, err = run_cli(["run", str(cfg), "-q"], capsys)
    assert code == 2 and err == (f"error: output {str(tmp_path / 'run/labels')!r} exists and is not a ddkit output (no "
                                 "manifest); the run writes its FKD labels there: remove it, or give the run "
                                 "another out\n")
    assert not list(tmp_path.glob("run/.labels*"))
    # a relabel: section without the fkd label mode it configures is named as unused
    cfg.write_text(cfg.read_text().replace("[hard, fkd]", "[hard]"))
    with caplog.at_level("WARNING", logger="ddkit.pipeline"):
        assert run_cli(["run", str(cfg), "-q"], capsys)[0] == 0
    assert "the relabel: section is unused" in caplog.text


def test_run_makes_a_damaged_stage_again(tmp_path, capsys, caplog):
    """A truncated teacher or set file, or a broken eval JSON, stopped `run` with "is corrupt ...; re-create it"
    (exit 2) while a damaged FKD store was labelled again; every stage is now made again, with a warning."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: {name: synthetic}\nteacher: {model: tiny_convnet, train: {epochs: 1, batch_size: 32}}\n"
                   "distill: {method: random, ipc: 2, soft_labels: true}\nevaluate: {label_modes: "
                   "[stored], seeds: [0], overrides: {student: tiny_convnet, random_baseline: false, full_reference: "
                   "false, train: {epochs: 1}}}\n"
                   f"out: {tmp_path / 'run'}\n")
    assert run_cli(["run", str(cfg), "-q"], capsys)[0] == 0
    files = {name: (tmp_path / "run" / name).read_bytes() for name in
             ("teacher/model.safetensors", "distilled/images.safetensors", "eval-stored.json")}
    for name, whole in files.items():
        (tmp_path / "run" / name).write_bytes(whole[:60])
        caplog.clear()
        with caplog.at_level("WARNING"):
            code, out, err = run_cli(["run", str(cfg), "-q"], capsys)
        assert code == 0, err
        assert (tmp_path / "run" / name).read_bytes() == whole or name.endswith(".json")
        redo = {"teacher/model.safetensors": "training the teacher again", "distilled/images.safetensors":
                "distilling again", "eval-stored.json": "evaluating again"}[name]
        assert redo in caplog.text and name.split("/")[0] not in out.split("reused:")[-1]
    evaluation = json.loads((tmp_path / "run/eval-stored.json").read_text())
    assert (evaluation["results"]["distilled"]["per_seed"]
            == json.loads(files["eval-stored.json"])["results"]["distilled"]["per_seed"])


def tiny_run(tmp_path, capsys, overrides: str = "student: tiny_convnet, random_baseline: false, "
                                                 "full_reference: false, train: {epochs: 1}"):
    """``ddkit run`` of a random IPC-2 set on synthetic data, hard labels, one student seed with the protocol
    ``overrides`` (default: one 1-epoch student, no baselines), into ``tmp_path / 'run'``; returns its config file."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: {name: synthetic}\nteacher: null\ndistill: {method: random, ipc: 2}\n"
                   f"evaluate: {{label_modes: [hard], seeds: [0], overrides: {{{overrides}}}}}\n"
                   f"out: {tmp_path / 'run'}\n")
    assert run_cli(["run", str(cfg), "-q"], capsys)[0] == 0
    return cfg


def test_run_summary_marks_diverged_students_and_gives_no_ior_from_them(tmp_path, capsys):
    """summary.md printed "IOR +0.00" computed from students that diverged (NaN/inf outputs count as wrong),
    unmarked; it marks their accuracies "(N diverged)" and leaves the IOR out (–), as the bench does."""
    tiny_run(tmp_path, capsys, "student: tiny_mlp, full_reference: false, train: {epochs: 3, lr: 1.0e+30}")
    line = next(x for x in (tmp_path / "run/report/summary.md").read_text().splitlines() if "IOR" in x)
    assert line.endswith(": distilled 0.00% (1 diverged), random subset 0.00% (1 diverged) (IOR –)"), line


def test_run_drops_the_report_of_the_previous_settings(tmp_path, capsys, monkeypatch):
    """A run killed after redoing a stage left the previous run's report/ (naming the old IPC) beside
    the new stages; the report is removed when a run starts and written again when it finishes."""
    cfg = tiny_run(tmp_path, capsys)
    assert "IPC 2" in (tmp_path / "run/report/summary.md").read_text()
    cfg.write_text(cfg.read_text().replace("ipc: 2", "ipc: 3"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ddkit.pipeline.evaluate", killed)  # a kill after the new set is made
    assert run_cli(["run", str(cfg), "-q"], capsys)[0] == 130
    assert json.loads((tmp_path / "run/distilled/manifest.json").read_text())["ipc"] == 3
    assert not (tmp_path / "run/report").exists() and not (tmp_path / "run/manifest.json").exists()
    # `show` on a killed first run (no config.json yet) says what it is ("holds no ddkit record" before)
    (tmp_path / "run/config.json").unlink()
    code, _, err = run_cli(["show", str(tmp_path / "run")], capsys)
    assert code == 2 and err == (f"error: {str(tmp_path / 'run')!r} is an unfinished `ddkit run` folder (stages done: "
                                 "distilled; no manifest.json: killed before its last stage, or from before run "
                                 "folders had a manifest.json); run its config again with the same --out to "
                                 "finish it (finished stages are reused, though stages an older ddkit made may be "
                                 "made again), or show a stage folder, e.g. "
                                 f"{str(tmp_path / 'run' / 'distilled')!r}\n")


@pytest.mark.parametrize(("relabel", "overrides", "message"), [
    ("{top_k: 9}", "",
     "relabel.top_k must lie in [1, 4] (dataset 'synthetic' has 4 classes) or be null (all logits), got 9"),
    ("{top_k: 2}", "loss: mse_ce, ",
     "relabel.top_k = 2 stores top-k logits, which only train with loss 'kl', but the fkd "
     "protocol uses loss 'mse_ce'; set relabel.top_k: null (dense labels) or evaluate.overrides.loss: kl"),
    ("{augment: rrc_flip, augment_options: {bogus: 1}}", "", "relabel.augment_options"),
    ("{}", "fkd_store: MISSING, ", "evaluate.overrides.fkd_store: "),
])
def test_run_checks_its_fkd_labels_before_any_stage(tmp_path, capsys, relabel, overrides, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "dataset: {name: synthetic}\n"
        "teacher: {model: tiny_convnet, train: {epochs: 1, batch_size: 32}}\n"
        "distill: {method: random, ipc: 2}\n"
        "evaluate: {label_modes: [fkd], seeds: [0], overrides: "
        f"{{{overrides.replace('MISSING', str(tmp_path / 'none'))}"
        "student: tiny_convnet, train: {epochs: 1}}}\n"
        f"relabel: {relabel}\n"
        f"out: {tmp_path / 'run'}\n")
    code, _, err = run_cli(["run", str(cfg), "-q"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before the teacher stage


def test_outputs_that_would_destroy_a_users_files_are_refused(workdir, tmp_path, capsys, monkeypatch):
    """`evaluate --out` used to overwrite any file (a user's notes, a teacher's manifest.json) and
    `--out .` failed after the work (a rename of the current folder), leaving a hidden temp folder
    with a whole artifact in it, or a teacher's resume file."""
    d = tmp_path / "set"
    assert run_cli(["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--out", str(d), "-q"],
                   capsys)[0] == 0
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    manifest = d / "manifest.json"
    before = manifest.read_text()
    for target in (notes, manifest):
        code, _, err = run_cli(["evaluate", str(d), "--seeds", "0", "--out", str(target), "-q", *FAST], capsys)
        assert code == 2 and "exists and is not a ddkit evaluation report; choose another --out" in err
    assert notes.read_text() == "precious" and manifest.read_text() == before
    ev = tmp_path / "ev.json"  # an evaluation report is replaced by the next one
    args = ["evaluate", str(d), "--seeds", "0", "--out", str(ev), "-q", *FAST, "--set", "train.epochs=1"]
    assert run_cli(args, capsys)[0] == 0 and run_cli(args, capsys)[0] == 0
    assert json.loads(ev.read_text())["kind"] == "evaluation"
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for cmd in (["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "1"],
                ["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", "1"]):
        for out in (".", str(here), str(tmp_path)):
            code, _, err = run_cli([*cmd, "--out", out, "-q"], capsys)
            assert code == 2 and "is the current folder or holds it" in err, err
    assert list(here.iterdir()) == [] and not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_diverged_teacher_and_experts_fail_and_save_nothing(tmp_path, capsys):
    """A teacher or expert buffer whose training diverged used to be saved (every weight NaN, exit 0),
    and failed only later, in distill or in the method that read it, blaming another setting."""
    # it stops at the first epoch that leaves a non-finite weight, not after all of them
    code, _, err = run_cli(["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", "40",
                            "--set", "teacher.train.lr=1e30", "--out", str(tmp_path / "t"), "-q"], capsys)
    import re

    stop = re.search(r"teacher training diverged at epoch (\d+) of 40 \(non-finite weights\); nothing was saved", err)
    assert code == 2 and stop is not None and int(stop.group(1)) <= 3, err
    assert "lower teacher.train.lr (now 1e+30)" in err and err.count("\n") == 1
    code, _, err = run_cli(["experts", "--dataset", "synthetic", "--model", "tiny_convnet", "--num-experts", "1",
                            "--epochs", "40", "--set", "experts.lr=1e30", "--out", str(tmp_path / "e"), "-q"], capsys)
    stop = re.search(r"expert 0: training diverged at epoch (\d+) of 40", err)
    assert code == 2 and stop is not None and int(stop.group(1)) <= 3 and "lower experts.lr (now 1e+30)" in err
    assert list(tmp_path.iterdir()) == []  # no artifact, no resume file, no partial folder


def test_distill_full_refuses_ipc(tmp_path, capsys):
    """--method full --ipc 3 silently kept all the data, as if --ipc had not been given."""
    out = tmp_path / "full"
    code, _, err = run_cli(["distill", "--dataset", "synthetic", "--method", "full", "--ipc", "3", "--out",
                            str(out), "-q"],
                           capsys)
    assert code == 2 and err == ("error: --ipc 3 does not apply to method 'full', which keeps every training image; "
                                 "drop --ipc (or pick another method)\n")
    assert list(tmp_path.iterdir()) == []
    code, _, err = run_cli(["distill", "--dataset", "synthetic", "--method", "full", "--out", str(out), "-q"], capsys)
    man = json.loads((out / "manifest.json").read_text())
    assert code == 0 and man["ipc"] is None and man["num_images"] == 96, err


def test_a_failed_distill_leaves_no_checkpoints_in_the_way(tmp_path, capsys):
    """A method that diverged left its checkpoints in the hidden work folder, and the corrected re-run
    then stopped on them ("written by a run with other settings")."""
    out = tmp_path / "dm"
    cmd = ["distill", "--dataset", "synthetic", "--method", "dm", "--ipc", "1", "--set", "distill.options.iterations=3",
           "--out", str(out), "-q"]
    code, _, err = run_cli([*cmd, "--set", "distill.options.lr_img=1e30"], capsys)
    assert code == 2 and err == ("error: method 'dm' produced non-finite pixels (its images diverged); lower "
                                 "distill.options.lr_img (now 1e+30), or undo another option that makes the updates "
                                 "larger (a network's lr, a loss weight)\n")
    assert list(tmp_path.iterdir()) == []
    assert run_cli(cmd, capsys)[0] == 0 and json.loads((out / "manifest.json").read_text())["method"]["name"] == "dm"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dm"]


def test_sigterm_unwinds_like_ctrl_c(tmp_path, capsys, monkeypatch):
    """SIGTERM (kill, a scheduler's limit, torchrun stopping other ranks) killed a command on the spot:
    no message, and a set being saved left its hidden temporary folder. It now unwinds as Ctrl-C does."""
    import signal

    import ddkit.distilled

    save, sent = ddkit.distilled.save_tensors, []

    def terminated_while_saving(*args, **kwargs):
        if not sent:
            sent.append(os.getpid())
            os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode, inside the atomic write
        return save(*args, **kwargs)

    monkeypatch.setattr(ddkit.distilled, "save_tensors", terminated_while_saving)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "dm"
    cmd = ["distill", "--dataset", "synthetic", "--method", "dm", "--ipc", "1", "--set", "distill.options.iterations=3",
           "--set", "distill.options.checkpoint_every=1", "--out", str(out), "-q"]
    code, _, err = run_cli(cmd, capsys)
    assert (code, err, sent) == (143, "terminated; run the same command again to resume\n", [os.getpid()])
    assert signal.getsignal(signal.SIGTERM) is before
    assert [p.name for p in tmp_path.iterdir()] == [".dm.work"]  # no half-written set; checkpoints kept to resume
    assert run_cli(cmd, capsys)[0] == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["dm"]


def test_a_stop_while_torch_imports_is_handled_once_it_is_imported(tmp_path, capsys, monkeypatch):
    """SIGTERM during a command's start-up imports once ended in SIGABRT and a stack dump instead of `terminated`,
    exit 143: the handler's exception, raised while torch's C++ initialisation called back into Python, cannot be
    caught on its way out through C++. The CLI imports torch first, with SIGTERM and SIGINT held back: a stop that
    comes meanwhile lets the import finish, then ends the command in one line."""
    import builtins
    import signal

    real, events, sigint = builtins.__import__, [], signal.getsignal(signal.SIGINT)

    def importing(name, *args, **kw):
        if name == "torch" and not events:
            os.kill(os.getpid(), signal.SIGTERM)  # while torch imports
            events.append("import went on")
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", importing)
    code, out, err = run_cli(["teacher", "--dataset", "synthetic", "--model", "tiny_mlp", "--epochs", "1", "--out",
                              str(tmp_path / "t"), "-q"], capsys)
    assert (code, out, err) == (143, "", "terminated; run the same command again to resume\n")
    assert events == ["import went on"] and os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is sigint  # Ctrl-C is handled as before once torch is imported


def test_an_ignored_sigint_stays_ignored_while_torch_imports(tmp_path, capsys, monkeypatch):
    """A command started with SIGINT ignored (a `ddkit ... &` job in a non-interactive script) is not stopped by a
    SIGINT that comes while the CLI imports torch with the stop signals held back."""
    import builtins
    import signal

    real, events = builtins.__import__, []

    def importing(name, *args, **kw):
        if name == "torch" and not events:
            os.kill(os.getpid(), signal.SIGINT)
            events.append("sent")
        return real(name, *args, **kw)

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        monkeypatch.setattr(builtins, "__import__", importing)
        code, _, err = run_cli(["teacher", "--dataset", "synthetic", "--model", "tiny_mlp", "--epochs", "1", "--out",
                                str(tmp_path / "t"), "-q"], capsys)
        monkeypatch.undo()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert (code, err, events) == (0, "", ["sent"]) and (tmp_path / "t" / "manifest.json").is_file()


def test_sigterm_to_a_running_command(tmp_path):
    """The handler is installed in a real process: SIGTERM during synthesis ends in one line, exit 143."""
    import signal
    import time

    out = tmp_path / "dm"
    proc = subprocess.Popen([sys.executable, "-m", "ddkit", "distill", "--dataset", "synthetic", "--method", "dm",
                             "--ipc", "1", "--set", "distill.options.iterations=100000", "--set",
                             "distill.options.checkpoint_every=1", "--out", str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any((tmp_path / ".dm.work").rglob("*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (143, "terminated; run the same command again to resume\n")
    assert [p.name for p in tmp_path.iterdir()] == [".dm.work"]


def test_teacher_checkpoint_refuses_training_flags(tmp_path, capsys):
    """--checkpoint imports a trained teacher: --epochs/--precision/--seed would be recorded but never used."""
    code, _, err = run_cli(["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--checkpoint",
                            str(tmp_path / "ck.safetensors"), "--epochs", "5", "--seed", "7", "--out",
                            str(tmp_path / "t"), "-q"],
                           capsys)
    assert code == 2 and "--epochs, --seed set how a teacher trains, but --checkpoint imports a trained one" in err
    assert not (tmp_path / "t").exists()


def test_run_reads_an_imported_checkpoint_again(tmp_path, capsys):
    import shutil

    from ddkit.data.base import make_synthetic
    from ddkit.teacher import TeacherConfig, train_teacher
    from ddkit.training import TrainConfig

    data = make_synthetic()
    made = [train_teacher(data, TeacherConfig(model="tiny_convnet", seed=s, train=TrainConfig(epochs=1, batch_size=32)),
                          tmp_path / f"t{s}") for s in (0, 1)]
    assert made[0].fingerprint != made[1].fingerprint
    ck = tmp_path / "ck.safetensors"
    shutil.copy(made[0].path / "model.safetensors", ck)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "dataset: {name: synthetic}\n"
        f"teacher: {{model: tiny_convnet, checkpoint: {ck}}}\n"
        "distill: {method: random, ipc: 2}\n"
        "evaluate: {label_modes: [teacher], seeds: [0], overrides: {student: tiny_convnet, full_epochs: 1, train: "
        "{epochs: 1}}}\n"
        f"out: {tmp_path / 'run'}\n"
    )

    def run_teacher_sha():
        code, out, _ = run_cli(["run", str(cfg), "-q"], capsys)
        assert code == 0
        return json.loads((tmp_path / "run/teacher/manifest.json").read_text())["weights_sha"], out

    assert run_teacher_sha()[0] == made[0].fingerprint
    shutil.copy(made[1].path / "model.safetensors", ck)  # new weights under the same file name
    sha, out = run_teacher_sha()
    assert sha == made[1].fingerprint and "reused: teacher" not in out
    # the same weights again: the teacher is re-read, the distilled set and the evaluation are reused
    sha, out = run_teacher_sha()
    assert sha == made[1].fingerprint and "reused: distilled, eval-teacher.json" in out


def test_set_wins_over_the_yaml_and_flags_over_it(tmp_path, capsys, monkeypatch):
    """YAML, then flags, then --set: `--ipc 1 --set distill.ipc=2` used to make IPC 1 (the flag silently won); a flag
    and a --set of the same key are refused now (test_a_flag_and_a_set_of_the_same_key_are_refused), each over the
    YAML is taken."""
    import ddkit.evaluate
    import ddkit.teacher

    (tmp_path / "d.yaml").write_text("distill: {method: random, ipc: 3, seed: 7}\n")
    d = tmp_path / "d"
    code, out, _ = run_cli(["distill", "--config", str(tmp_path / "d.yaml"), "--dataset", "synthetic", "--ipc", "1",
                            "--set", "distill.seed=5", "--out", str(d), "-q"], capsys)
    man = json.loads((d / "manifest.json").read_text())
    assert code == 0 and man["ipc"] == 1 and man["seed"] == 5 and man["config"]["distill"]["ipc"] == 1

    class Stop(Exception):
        pass

    seen = {}

    def capture(key):
        def stop(*a, **k):
            seen[key] = a
            raise Stop
        return stop

    monkeypatch.setattr(ddkit.teacher, "train_teacher", capture("teacher"))
    monkeypatch.setattr(ddkit.evaluate, "evaluate", capture("evaluate"))
    with pytest.raises(Stop):
        main(["teacher", "--dataset", "synthetic", "--epochs", "3", "--set", "teacher.model=tiny_convnet", "--out",
              str(tmp_path / "t"), "-q"])
    assert seen["teacher"][1].model == "tiny_convnet" and seen["teacher"][1].train.epochs == 3
    with pytest.raises(Stop):
        main(["evaluate", str(d), "--label-mode", "hard", "--set", "train.epochs=4", "-q"])
    assert seen["evaluate"][1].train.epochs == 4

    import ddkit.bench

    monkeypatch.setattr(ddkit.bench, "run_bench", capture("bench"))
    bench = tmp_path / "bench.yaml"
    bench.write_text(f"datasets: [synthetic]\nmethods: [random]\nipcs: [1]\nstudents: [tiny_convnet]\nout: "
                     f"{tmp_path / 'b1'}\n")
    with pytest.raises(Stop):
        main(["bench", str(bench), "--device", "cpu", "--set", f"out={tmp_path / 'b2'}", "-q"])
    assert seen["bench"][0].out == str(tmp_path / "b2") and seen["bench"][0].device == "cpu"


@pytest.mark.parametrize(
    "args, message",
    [
        (["distill", "--dataset", "synthetic", "--method", "randon", "--ipc", "2"],
         "unknown method 'randon'; did you mean 'random'?"),
        (["distill", "--dataset", "synthetc", "--method", "random", "--ipc", "2"],
         "unknown dataset 'synthetc'; did you mean 'synthetic'?"),
        (["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "99"],
         "ipc 99 is larger than the smallest class"),
        (["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--set", "distill.ipcc=3"],
         "unknown config key 'distill.ipcc'; did you mean 'ipc'?"),
        (["distill", "--dataset", "fashion-mnist", "--data-path", "/nonexistent/fm", "--method", "random", "--ipc",
          "2"], "--data-path /nonexistent/fm does not exist; fix --data-path"),
        (["teacher", "--dataset", "synthetic", "--model", "convnet33"], "unknown model 'convnet33'; did you mean"),
        (["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--device", "tpu"],
         "unknown device 'tpu'"),
        (["teacher", "--set", "dataset=foo", "--model", "tiny_convnet"],
         "dataset: expected a mapping of settings, got 'foo'"),
        (["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--set", "distill.options=foo"],
         "distill.options: expected a mapping, got 'foo'"),
        (["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--set", "teacher.train.lr=.nan"],
         "teacher.train.lr: expected a finite number, got nan"),
        (["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--set", "teacher.train.lr=1e39"],
         "teacher.train.lr: 1e+39 is beyond float32's range"),
        (["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--seed", str(2**64)],
         "distill.seed: seeds must lie in [0, 2^32)"),
        # no CUDA here: "not available"; with CUDA: no device 99
        (["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--device", "cuda:99"], "cuda:99"),
    ],
)
def test_bad_input_one_line_exit_2_no_output(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DDKIT_DATA", raising=False)
    out = tmp_path / "out"
    code, _, err = run_cli([*args, "--out", str(out), "-q"], capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # no partial artifact, no temp dirs


def test_bad_output_and_ipc_fail_before_any_work(tmp_path, capsys, monkeypatch):
    import ddkit.methods.dm
    import ddkit.methods.trajectory
    import ddkit.teacher.squeeze

    def no_training(*a, **k):
        raise AssertionError("trained before checking the output")

    monkeypatch.setattr(ddkit.teacher.squeeze, "train_classifier", no_training)
    monkeypatch.setattr(ddkit.methods.dm.DM, "fit", no_training)
    monkeypatch.setattr(ddkit.methods.trajectory, "train_one_expert", no_training)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for args in (["teacher", "--dataset", "synthetic", "--model", "tiny_convnet"],
                 ["distill", "--dataset", "synthetic", "--method", "dm", "--ipc", "2"],
                 ["experts", "--dataset", "synthetic", "--model", "tiny_convnet", "--num-experts", "1",
                  "--epochs", "1"]):
        code, _, err = run_cli([*args, "--out", str(mine), "-q"], capsys)
        assert code == 2 and "exists and is not a ddkit output" in err, args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"] and [p.name for p in mine.iterdir()] == ["notes.txt"]
    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: {name: synthetic}\nteacher: {model: tiny_convnet}\ndistill: {method: random, ipc: 100}\n"
                   f"out: {tmp_path / 'run'}\n")
    code, _, err = run_cli(["run", str(cfg), "-q"], capsys)
    assert code == 2 and "ipc 100 is larger than the smallest class" in err and not (tmp_path / "run").exists()
    code, _, err = run_cli(["experts", "--dataset", "synthetic", "--model", "nope", "--out",
                            str(tmp_path / "ex"), "-q"], capsys)
    assert code == 2 and "unknown model 'nope'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "run.yaml"]


def test_distill_with_mismatched_teacher(workdir, tmp_path, capsys):
    code, _, err = run_cli(["distill", "--dataset", "synthetic", "--set", "dataset.options={num_classes: 5}",
                            "--method", "random", "--ipc", "2", "--teacher", str(workdir / "teacher"),
                            "--out", str(tmp_path / "o"), "-q"], capsys)
    assert code == 2 and f"teacher '{workdir / 'teacher'}' has 4 classes but dataset 'synthetic' has 5" in err
    assert not (tmp_path / "o").exists()


def test_ctrl_c_while_torch_loads_ends_in_one_line(tmp_path, capsys, monkeypatch):
    """main() imported torch (through ddkit.distributed) before its error handling: a Ctrl-C in the
    seconds that takes printed a long traceback through torch's import machinery instead of one line.
    (The commands that need torch import it now, inside that handling.)"""
    import importlib.abc

    import ddkit

    class Interrupting(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ddkit.distributed":
                raise KeyboardInterrupt
            return None

    monkeypatch.delattr(ddkit, "distributed", raising=False)  # whichever test ran before, if any, imported it
    monkeypatch.delitem(sys.modules, "ddkit.distributed", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    try:
        code, out, err = run_cli(["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", "1",
                                  "--out", str(tmp_path / "t")], capsys)
    except KeyboardInterrupt:  # escaping, it would end the whole pytest session as a user's Ctrl-C
        pytest.fail("a Ctrl-C while torch loads escaped main() instead of ending in one line")
    assert (code, out, err) == (130, "", "interrupted; run the same command again to resume\n")
    assert not (tmp_path / "t").exists()


def test_console_entry_point_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ddkit", "list", "methodz"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ddkit", "show", str(tmp_path / "nothing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ") and "not found" in proc.stderr


def test_relabel_experts_and_ddranking_export(workdir, tmp_path, capsys):
    import torch

    t, d = workdir / "teacher", workdir / "r5"
    code, out, _ = run_cli(["relabel", str(d), "--teacher", str(t), "--epochs", "3", "--top-k", "2",
                            "--out", str(tmp_path / "fkd"), "-q"], capsys)
    assert code == 0 and "3 epochs x 20 images" in out and "--label-mode fkd" in out
    man = json.loads((tmp_path / "fkd/manifest.json").read_text())
    assert man["kind"] == "fkd-soft-labels" and man["top_k"] == 2 and man["epochs"] == 3
    assert man["teacher_batch_size"] == 256  # --batch-size left out: relabel's default, recorded (QA 20b F3)
    code, out, _ = run_cli(["relabel", str(d), "--teacher", str(t), "--epochs", "1", "--batch-size", "7",
                            "--out", str(tmp_path / "fkd7"), "-q"], capsys)
    assert code == 0 and json.loads((tmp_path / "fkd7/manifest.json").read_text())["teacher_batch_size"] == 7
    code, out, _ = run_cli(["show", str(tmp_path / "fkd7")], capsys)
    assert code == 0 and "teacher BatchNorm running, teacher batches of 7," in out
    code, out, _ = run_cli(["show", str(tmp_path / "fkd")], capsys)
    assert code == 0 and "teacher BatchNorm running, " in out and "teacher batches" not in out
    # evaluate's --set keys are the protocol's own: an error named 'protocol.train.epochz', a key no one can type
    code, _, err = run_cli(["evaluate", str(d), "--set", "train.epochz=2"], capsys)
    assert code == 2 and err == "error: unknown config key 'train.epochz'; did you mean 'epochs'?\n"
    # the default store goes beside the set's folder: `set/.` wrote `set/..fkd` inside it
    for given in (f"{d}/.", str(d / "manifest.json")):
        code, out, _ = run_cli(["relabel", given, "--teacher", str(t), "--epochs", "1", "-q"], capsys)
        assert code == 0 and f"--set fkd_store={workdir / 'r5.fkd'}" in out
        assert ((workdir / "r5.fkd/manifest.json").is_file()
                and sorted(p.name for p in d.iterdir() if "fkd" in p.name) == [])
        shutil.rmtree(workdir / "r5.fkd")
    code, out, _ = run_cli(["experts", "--dataset", "synthetic", "--model", "tiny_convnet", "--num-experts", "2",
                            "--epochs", "2", "--out", str(tmp_path / "experts"), "-q"], capsys)
    assert code == 0 and "2 expert trajectories" in out
    man = json.loads((tmp_path / "experts/manifest.json").read_text())
    assert man["kind"] == "expert-buffer" and man["config"]["num_experts"] == 2
    code, out, _ = run_cli(["export", str(d), "--format", "ddranking", "--out", str(tmp_path / "ddr")], capsys)
    assert code == 0
    images = torch.load(tmp_path / "ddr/images.pt", weights_only=True)
    labels = torch.load(tmp_path / "ddr/labels.pt", weights_only=True)
    assert images.shape == (20, 1, 16, 16) and labels.tolist() == sorted(labels.tolist())


def test_precision_flag_reaches_teacher_and_protocol(tmp_path, capsys):
    t = tmp_path / "teacher"
    code, _, _ = run_cli(["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", "2",
                          "--precision", "bf16", "--out", str(t), "-q"], capsys)
    assert code == 0 and json.loads((t / "manifest.json").read_text())["config"]["train"]["precision"] == "bf16"
    d = tmp_path / "r2"
    assert run_cli(["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--out", str(d), "-q"],
                   capsys)[0] == 0
    reports = {}
    for precision in ("fp32", "bf16"):
        # FAST but its full_epochs, which nothing reads without the reference
        code, _, _ = run_cli(["evaluate", str(d), "--seeds", "0", "--precision", precision, "-q", *FAST[:2],
                              *FAST[4:], "--set", "random_baseline=false", "--set", "full_reference=false"], capsys)
        assert code == 0
        reports[precision] = [json.loads(p.read_text()) for p in sorted(d.glob("eval-hard-*.json"))]
    # fp32 keeps the protocol hash (and file name) of before the option; bf16 is another protocol, another file
    assert len(reports["fp32"]) == 1 and len(reports["bf16"]) == 2
    assert sorted(r["config"]["train"]["precision"] for r in reports["bf16"]) == ["bf16", "fp32"]


def test_out_never_deletes_a_users_folder_and_evaluate_takes_fkd(tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    code, _, err = run_cli(["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--out",
                            str(precious), "-q"], capsys)
    assert code == 2 and "exists and is not a ddkit output" in err and err.count("\n") == 1
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
    code, _, _ = run_cli(["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--out",
                          str(tmp_path / "r2"), "-q"], capsys)
    assert code == 0
    code, _, err = run_cli(["evaluate", str(tmp_path / "r2"), "--out", str(precious), "--seeds", "0,0", "-q"], capsys)
    assert code == 2 and err == ("error: evaluation seeds: [0, 0] repeats a seed (the same run twice would inflate n); "
                                 "give distinct seeds\n")
    # the set's data moved: evaluate's hint names its --data-path, not the config key it cannot set
    man = json.loads((tmp_path / "r2" / "manifest.json").read_text())
    (tmp_path / "r2" / "manifest.json").write_text(json.dumps(
        {**man, "dataset_config": {**man["dataset_config"], "name": "imagefolder", "path": str(tmp_path / "gone")}}))
    for extra in ([], ["--data-path", str(tmp_path / "elsewhere")]):
        code, _, err = run_cli(["evaluate", str(tmp_path / "r2"), "--seeds", "0", "-q", *extra], capsys)
        assert code == 2 and "is not a folder; set --data-path to root/<split>/<class>/<image>" in err, err
        assert "dataset.path" not in err and err.count("\n") == 1
    # a fix naming another dataset setting cannot be followed: the set records them all but the path
    (tmp_path / "elsewhere").mkdir()
    code, _, err = run_cli(["evaluate", str(tmp_path / "r2"), "--seeds", "0", "-q", "--data-path",
                            str(tmp_path / "elsewhere")],
                           capsys)
    assert code == 2 and "no train split folder" in err and "dataset.train_split" not in err, err
    assert err.endswith("the set records its dataset settings: point --data-path at the data it was made from (and "
                        "--teacher at a teacher trained on it)\n")
    # demo has no --set: its data hint must name the flag it has
    code, _, err = run_cli(["demo", "--data-path", str(tmp_path / "nosuch"), "--out", str(tmp_path / "demo"), "-q"],
                           capsys)
    assert code == 2 and err == (f"error: --data-path {tmp_path / 'nosuch'} does not exist; fix --data-path or unset "
                                 "it to search DDKIT_DATA\n")
    assert not (tmp_path / "demo").exists()
    # `ddkit relabel` prints an evaluate command with --label-mode fkd: the flag takes it
    from ddkit.cli import build_parser

    assert build_parser().parse_args(["evaluate", "x", "--label-mode", "fkd"]).label_mode == "fkd"


@pytest.mark.parametrize("setting, message", [
    ("evaluate.overrides.student=nosuchmodel", "unknown model 'nosuchmodel'"),
    ("evaluate.protocol=nosuch", "unknown protocol 'nosuch'"),
    ("evaluate.label_modes=[teacher]", "label mode 'teacher' needs a teacher but teacher is null"),
    ("distill.options.iterations=3", "unknown config key 'distill.options.iterations'"),
])
def test_run_checks_the_whole_config_before_any_stage(setting, message, tmp_path, capsys):
    from conftest import REPO

    out = tmp_path / "run"
    code, _, err = run_cli(["run", str(REPO / "configs/fashion-mnist/random/ipc10.yaml"), "--out", str(out), "-q",
                            "--set", "dataset.name=synthetic", "--set", "distill.ipc=2", "--set", setting], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # not even the distilled set


@pytest.mark.parametrize("setting, message", [
    ("distill.options.extra_teachers=[no/such/teacher]", "'no/such/teacher' not found"),
    ("evaluate.overrides.extra_teachers=[no/such/teacher]", "'no/such/teacher' not found"),
])
def test_run_checks_extra_teachers_before_training_the_teacher(setting, message, tmp_path, capsys):
    """The README's `ddkit run configs/fashion-mnist/edc/ipc10.yaml` names extra teachers that must exist
    first: a missing one fails before the (long) teacher stage, not after it."""
    from conftest import REPO

    out = tmp_path / "run"
    code, _, err = run_cli(["run", str(REPO / "configs/fashion-mnist/edc/ipc10.yaml"), "--out", str(out), "-q",
                            "--set", "dataset.name=synthetic", "--set", "distill.ipc=1",
                            "--set", "teacher.model=tiny_convnet", "--set", "teacher.train.epochs=1",
                            "--set", "distill.options.extra_teachers=[]", "--set", setting], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # no teacher trained


@pytest.mark.parametrize("other_data, setting, message", [
    ({"num_classes": 3}, "evaluate.overrides.extra_teachers=[{x}]",
     "evaluate.overrides.extra_teachers: teacher '{x}' has 3 classes but dataset 'synthetic' has 4; use a teacher "
     "trained on this dataset"),
    ({"image_size": 12}, "evaluate.overrides.extra_teachers=[{x}]",
     "evaluate.overrides.extra_teachers: teacher '{x}' expects images [1, 12, 12] but dataset 'synthetic' has "
     "[1, 16, 16]; use the same image size"),
    ({"num_classes": 3}, "distill.options.extra_teachers=[{x}]",
     "distill.options.extra_teachers: teacher '{x}' has 3 classes but dataset 'synthetic' has 4; use a teacher "
     "trained on this dataset"),
])
def test_run_refuses_extra_teachers_of_other_data_before_any_stage(other_data, setting, message, tmp_path, capsys):
    """An extra teacher trained on other data (classes, image size) was refused only where it labelled or
    synthesised: after the run had trained its teacher (and, for the protocol's, distilled its set). Its manifest is
    now checked against the data before any stage, in one line naming the setting."""
    from conftest import REPO
    from ddkit.data.base import make_synthetic
    from ddkit.teacher import TeacherConfig, train_teacher
    from ddkit.training import TrainConfig

    extra = tmp_path / "other"
    train_teacher(make_synthetic(**other_data), TeacherConfig(model="tiny_convnet",
                                                             train=TrainConfig(epochs=1, batch_size=32)), extra)
    code, _, err = run_cli(["run", str(REPO / "configs/fashion-mnist/edc/ipc10.yaml"), "--out", str(tmp_path / "run"),
                            "-q", "--set", "dataset.name=synthetic", "--set", "distill.ipc=1",
                            "--set", "teacher.model=tiny_convnet", "--set", "teacher.train.epochs=1",
                            "--set", "distill.options.extra_teachers=[]", "--set", setting.format(x=extra)], capsys)
    assert code == 2 and err == f"error: {message.format(x=extra)}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["other"]  # no teacher trained, no set


def test_relabel_with_extra_teachers_makes_the_ensembles_store(workdir, tmp_path, capsys):
    """`ddkit relabel` took one --teacher, so the FKD store of an ensemble (the protocol's extra_teachers) could
    only be made by `ddkit run` or `ddkit bench`. --extra-teacher (repeatable) labels with the ensemble that an
    evaluation with those extra_teachers labels with: the store a bench makes (same identity, same accuracy),
    which `ddkit evaluate --set extra_teachers=[...]` replays."""
    from ddkit.distilled import DistilledSet
    from ddkit.evaluate import resolve_protocol
    from ddkit.evaluate.runner import evaluate, labelling_teacher
    from ddkit.labels import RelabelSpec, SoftLabelStore
    from ddkit.labels.fkd import store_identity
    from ddkit.teacher import Teacher, teacher_ensemble

    t, d, extra = workdir / "teacher", workdir / "r5", tmp_path / "extra"
    assert run_cli(["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", "1", "--seed", "3",
                    "--out", str(extra), "-q"], capsys)[0] == 0
    code, out, err = run_cli(["relabel", str(d), "--teacher", str(t), "--extra-teacher", str(extra), "--epochs", "2",
                              "--out", str(tmp_path / "ens.fkd"), "-q"], capsys)
    assert code == 0, err
    assert f"--set fkd_store={tmp_path / 'ens.fkd'} --set 'extra_teachers=[{extra}]'" in out
    store = SoftLabelStore.load(tmp_path / "ens.fkd")
    both = teacher_ensemble([Teacher.load(t), Teacher.load(extra)])
    assert store.manifest["teacher"] == {"fingerprint": both.fingerprint, "path": str(t),
                                         "extra_teachers": [str(extra)]}
    # the store a bench (or a run, which adds its stage key) makes for a protocol with these extra_teachers
    fkd = {"student": "tiny_convnet", "label_mode": "fkd", "random_baseline": False, "full_reference": False,
           "extra_teachers": [str(extra)], "train": {"epochs": 2, "batch_size": 16, "lr": 0.05}}
    made = RelabelSpec(epochs=2).make(DistilledSet.load(d), labelling_teacher(resolve_protocol("dc-protocol", fkd),
                                      Teacher.load(t), "cpu"), out=tmp_path / "bench.fkd")
    assert store_identity(made) == store_identity(store)
    code, out, err = run_cli(["evaluate", str(d), "--teacher", str(t), "--label-mode", "fkd", "--seeds", "0",
                              "--set", f"fkd_store={tmp_path / 'ens.fkd'}", "--set", f"extra_teachers=[{extra}]",
                              "--set", "student=tiny_convnet", "--set", "random_baseline=false",
                              "--set", "full_reference=false", "--set", "train.epochs=2", "--set",
                              "train.batch_size=16", "--set", "train.lr=0.05", "--out", str(tmp_path / "ev.json"),
                              "-q"], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "ev.json").read_text())
    assert rep["teacher"]["weights_sha"] == both.fingerprint
    bench = evaluate(d, resolve_protocol("dc-protocol", {**fkd, "fkd_store": str(tmp_path / "bench.fkd")}), [0],
                     teacher=t)
    assert rep["results"] == bench["results"]
    # a store of another teacher alone: the advice names the flag that makes the ensemble's store
    assert run_cli(["relabel", str(d), "--teacher", str(extra), "--epochs", "2", "--out", str(tmp_path / "x.fkd"),
                    "-q"], capsys)[0] == 0
    code, _, err = run_cli(["evaluate", str(d), "--teacher", str(t), "--label-mode", "fkd", "--seeds", "0",
                            "--set", f"fkd_store={tmp_path / 'x.fkd'}", "--set", f"extra_teachers=[{extra}]",
                            "--set", "random_baseline=false", "--set", "full_reference=false", "-q"], capsys)
    assert code == 2 and err == (f"error: soft-label store was made by teacher {Teacher.load(extra).fingerprint}, not "
                                 f"{both.fingerprint}; pass the same teacher or re-run `ddkit relabel` with "
                                 "--extra-teacher DIR for each of the protocol's extra_teachers\n")


def test_bench_bar_rate_leaves_out_reused_cells():
    """Finished cells of a resumed bench count toward the bar, not toward its rate and ETA."""
    from ddkit.cli import BenchBars

    bars = BenchBars(True)
    try:
        for done in (1, 2, 3):
            bars.cell(done, 5, {"cell": f"c{done}", "reused": True})
        meter = bars._cells.format_dict
        assert (meter["n"], meter["initial"], meter["total"], meter["rate"]) == (3, 3, 5, None)
        bars.cell(4, 5, {"cell": "c4"})
        meter = bars._cells.format_dict
        assert (meter["n"], meter["initial"]) == (4, 3)  # the rate is taken over one computed cell
        bars.stage(2, 4, {"stage": "teacher synthetic", "loss": 0.5})  # run_bench's (step, total, record) form
        assert (bars._stage.desc, bars._stage.n, bars._stage.total) == ("teacher synthetic", 2, 4)
    finally:
        bars.close()


def test_evaluate_refuses_a_folder_as_out_before_training(tmp_path, capsys):
    d = tmp_path / "r2"
    code, _, _ = run_cli(["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--out",
                          str(d), "-q"], capsys)
    assert code == 0
    (tmp_path / "outdir").mkdir()
    code, _, err = run_cli(["evaluate", str(d), "--seeds", "0", "--out", str(tmp_path / "outdir"),
                            "--cache-dir", str(tmp_path / "cache"), "-q", *FAST], capsys)
    assert code == 2 and "is a folder; give a file path" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()  # no student (random baseline, full reference) was trained
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(["evaluate", str(d), "--seeds", "0", "--out", str(tmp_path / "afile" / "ev.json"),
                            "--cache-dir", str(tmp_path / "cache"), "-q", *FAST], capsys)
    assert code == 2 and "which is a file" in err and not (tmp_path / "cache").exists()


def test_run_evaluates_again_when_a_protocol_extra_teacher_changes(tmp_path, capsys):
    """evaluate.overrides.extra_teachers enter evaluation keys by their weights (the protocol's hash
    counts them only): an extra teacher retrained in place must give a new evaluation, not the one made
    with the old weights."""
    from ddkit.data.base import make_synthetic
    from ddkit.teacher import TeacherConfig, train_teacher
    from ddkit.training import TrainConfig

    extra = tmp_path / "extra"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "dataset: {name: synthetic}\n"
        "teacher: {model: tiny_convnet, train: {epochs: 1, batch_size: 32}}\n"
        "distill: {method: random, ipc: 2}\n"
        "evaluate: {label_modes: [teacher], seeds: [0], overrides: {student: tiny_convnet, full_epochs: 1, "
        f"train: {{epochs: 1}}, extra_teachers: [{extra}]}}}}\n"
        f"out: {tmp_path / 'run'}\n"
    )
    outs = []
    for seed in (0, 1):
        train_teacher(make_synthetic(), TeacherConfig(model="tiny_convnet", seed=seed,
                                                      train=TrainConfig(epochs=1, batch_size=32)), extra)
        code, out, _ = run_cli(["run", str(cfg), "-q"], capsys)
        assert code == 0
        outs.append(out)
    assert "reused: teacher, distilled\n" in outs[1]
    code, out, _ = run_cli(["run", str(cfg), "-q"], capsys)
    assert code == 0 and "reused: teacher, distilled, eval-teacher.json" in out


def test_config_files_that_are_not_utf8_text_or_are_folders_fail_in_one_line(tmp_path, capsys):
    """Every command that reads a YAML config used to print a UnicodeDecodeError traceback for one in
    another encoding (or a PNG), and `ddkit run FOLDER` said the folder was not found."""
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"# caf\xe9\ndataset: {name: synthetic}\n")
    png = tmp_path / "grid.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (tmp_path / "bench.yaml").write_text("base: latin.yaml\n")
    d = tmp_path / "r2"
    assert run_cli(["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--out", str(d), "-q"],
                   capsys)[0] == 0
    out = tmp_path / "out"
    for args, bad in ((["run", str(latin)], latin), (["run", str(png)], png),
                      (["bench", str(tmp_path / "bench.yaml")], latin),
                      (["teacher", "--config", str(latin)], latin),
                      (["evaluate", str(d), "--protocol", str(latin), "--seeds", "0"], latin)):
        code, _, err = run_cli([*args, "--out", str(out), "-q"], capsys)
        assert code == 2 and err.count("\n") == 1, args
        assert err.startswith(f"error: config file '{bad}' is not UTF-8 text (byte 0x"), args
        assert "save it as UTF-8" in err, args
    folder = tmp_path / "configs"
    folder.mkdir()
    code, _, err = run_cli(["run", str(folder), "--out", str(out), "-q"], capsys)
    assert code == 2 and err == f"error: config file '{folder}' is a folder; pass a YAML file (see configs/)\n"
    assert not out.exists() and not list(d.glob("eval-*"))


@pytest.mark.parametrize(("command", "yaml", "flags", "message"), [
    ("distill", "evaluate: {seeds: [0]}\n", ["--method", "random", "--ipc", "1"],
     "unknown config section(s) ['evaluate'] for `ddkit distill`; use dataset and distill"),
    ("teacher", "teacher: {train: [1]}\n", ["--epochs", "1"], "teacher.train: expected a mapping of settings, got [1]"),
    ("experts", "experts: {epochs: 2}\nteacher: {}\n", ["--num-experts", "1"],
     "unknown config section(s) ['teacher'] for `ddkit experts`; use dataset and experts"),
])
def test_stage_commands_refuse_what_they_do_not_read(tmp_path, capsys, command, yaml, flags, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml)
    code, _, err = run_cli([command, "--config", str(cfg), "--dataset", "synthetic", *flags, "--out",
                            str(tmp_path / "o"), "-q"],
                           capsys)
    assert code == 2 and err == f"error: {message}\n" and not (tmp_path / "o").exists()


def test_stage_command_flags_fill_nested_settings_over_the_yaml(tmp_path, capsys):
    """`ddkit teacher --epochs/--precision` set teacher.train.* over the YAML's values, which stay otherwise."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("teacher: {model: tiny_mlp, train: {epochs: 5, batch_size: 16, lr: 0.02}}\n")
    code, _, _ = run_cli(["teacher", "--config", str(cfg), "--dataset", "synthetic", "--epochs", "1", "--seed", "3",
                          "--out", str(tmp_path / "t"), "-q"], capsys)
    man = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert code == 0 and man["seed"] == 3 and man["model"]["name"] == "tiny_mlp"
    assert ((man["config"]["train"]["epochs"], man["config"]["train"]["batch_size"], man["config"]["train"]["lr"])
            == (1, 16, 0.02))


def test_system_errors_name_the_output_not_its_hidden_temporaries(tmp_path, capsys):
    """A refused write used to name ddkit's hidden temporary ('/proc/..t.resume-<hash>.pt.tmp-<host>-<pid>-…'),
    or no path at all (a full disk), or call a file in the way 'File exists'."""
    import errno

    from ddkit.cli import _os_error

    hidden = str(tmp_path / "..t.resume-5a99ab.pt.tmp-host_1-6472-0123abcd")
    assert _os_error(OSError(errno.ENOENT, "No such file or directory", hidden)) == (
        f"cannot use {str(tmp_path / 't')!r}: No such file or directory; check the path and its permissions")
    assert _os_error(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".d.work" / "k" / "dm.pt"))) == (
        f"cannot write {str(tmp_path / 'd')!r}: No space left on device; free space on that disk or choose "
        "another --out")
    assert _os_error(OSError(errno.ENOSPC, "No space left on device")) == (
        "cannot write: No space left on device; free space on that disk or choose another --out")
    # a failed write() names no file: the command's --out is named; a file-size limit is no permission problem
    assert _os_error(OSError(errno.EFBIG, "File too large"), "p/e.json") == (
        "cannot write 'p/e.json': File too large; a limit on file size (ulimit -f) or a quota stops this file; raise "
        "the limit or choose another --out")
    assert _os_error(OSError(errno.ENOSPC, "No space left on device"), "p/e.json") == (
        "cannot write 'p/e.json': No space left on device; free space on that disk or choose another --out")
    assert _os_error(OSError(errno.EIO, "Input/output error"), "p/x") == (
        "cannot use 'p/x': Input/output error; check the path and its permissions")
    (tmp_path / "afile").write_text("mine")
    code, _, err = run_cli(["teacher", "--dataset", "synthetic", "--model", "tiny_mlp", "--epochs", "1",
                            "--out", str(tmp_path / "afile" / "sub"), "-q"], capsys)
    assert code == 2 and err == (f"error: output {str(tmp_path / 'afile' / 'sub')!r} lies inside "
                                 f"{str(tmp_path / 'afile')!r}, which is a file; give another path\n")
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize(("sets", "message"), [
    (["evaluate.overrides.trian.epochs=1"], "unknown config key 'evaluate.overrides.trian'; did you mean 'train'?"),
    (["evaluate.overrides.student=convnet", "evaluate.overrides.student_options.width=0"],
     "student_options: ConvNet width must be a positive integer, got 0"),
    (["teacher.model=tiny_convnet", "teacher.model_options.width=0"],
     "teacher.model_options: ConvNet width must be a positive integer, got 0"),
    (["teacher.model=nonexist"], "teacher.model: unknown model 'nonexist'; see `ddkit list models` (one of your own: "
     "import the module that registers it first; the CLI imports those named in DDKIT_PLUGINS)"),
    # recorded in config.json while each evaluation took its mode from label_modes
    (["evaluate.overrides.label_mode=teacher"], "evaluate.overrides.label_mode is not used: the run evaluates every "
     "mode in evaluate.label_modes; list it there instead\n"),
])
def test_run_errors_name_the_config_key(tmp_path, capsys, sets, message):
    """Errors in a run config's protocol overrides named 'protocol.…' (a key no run config has), and a
    bad model option did not say which model's option it was."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "dataset: {name: synthetic}\nteacher: {model: tiny_mlp, train: {epochs: 1}}\n"
        "distill: {method: random, ipc: 2}\n"
        "evaluate:\n  protocol: dc-protocol\n  overrides: {student: tiny_mlp, full_reference: false, train: "
        "{epochs: 2}}\n  label_modes: [hard]\n  seeds: [0]\n"
        f"out: {tmp_path / 'run'}\n"
    )
    code, _, err = run_cli(["run", str(cfg), "-q", *[a for s in sets for a in ("--set", s)]], capsys)
    assert code == 2 and err.startswith(f"error: {message}") and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--dataset", ""], "dataset.name is empty; give a dataset key (`ddkit list datasets`)"),
    (["--dataset", "synthetic", "--data-path", ""], "--data-path is empty; give the data's folder or file, or leave "
                                                     "it out to search for it"),
    (["--dataset", "synthetic", "--checkpoint", ""], "teacher.checkpoint is empty; give the weights file to import, or "
                                                     "leave it out (null) to train"),
])
def test_empty_flags_are_refused_not_dropped(tmp_path, capsys, flags, message):
    """An empty --dataset fell back to fashion-mnist, an empty --checkpoint trained a teacher instead."""
    code, _, err = run_cli(["teacher", *flags, "--model", "tiny_mlp", "--out", str(tmp_path / "t"), "-q"], capsys)
    assert code == 2 and err == f"error: {message}\n" and not (tmp_path / "t").exists()


def test_evaluate_refuses_a_data_path_for_a_generated_set(tmp_path, capsys):
    """The message used to say the path does not apply, then to point --data-path at the data."""
    assert run_cli(["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "1", "--out",
                    str(tmp_path / "d"), "-q"], capsys)[0] == 0
    code, _, err = run_cli(["evaluate", str(tmp_path / "d"), "--data-path", str(tmp_path), "--seeds", "0", "-q"],
                           capsys)
    assert code == 2 and err == ("error: the set was distilled from the generated dataset 'synthetic', which "
                                 "has no files; drop --data-path\n")


@pytest.mark.parametrize(("evaluate", "message"), [
    ("{protocol: mtt-protocol, overrides: {student: tiny_mlp, full_reference: false, train: {epochs: 1}}, "
     "label_modes: [hard], seeds: [0]}",
     "evaluate: the protocol trains students with the set's learned lr (learned_lr: true), but method "
     "'random' learns none; use a trajectory method (mtt, tesla, ftd, datm, shq) or set learned_lr: false"),
    ("{label_modes: [], seeds: [0]}",
     "evaluate.label_modes is empty; list at least one (hard, teacher, stored or fkd)"),
    ("{label_modes: [hard, hard], seeds: [0]}",
     "evaluate.label_modes ['hard', 'hard'] repeat a mode (the same evaluation twice); list each once"),
])
def test_run_refuses_evaluations_it_cannot_or_need_not_make(tmp_path, capsys, evaluate, message):
    """A learned-lr protocol for a set without a learned lr failed after the teacher and the set were made
    (leaving them); no label mode gave an empty report, a repeated one every result twice."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: {name: synthetic}\nteacher: null\ndistill: {method: random, ipc: "
                   f"2}}\nevaluate: {evaluate}\nout: {tmp_path / 'run'}\n")
    code, _, err = run_cli(["run", str(cfg), "-q"], capsys)
    assert code == 2 and err == f"error: {message}\n" and not (tmp_path / "run").exists()


def test_error_lines_of_other_ranks_name_the_rank(tmp_path, monkeypatch, capsys):
    """Under torchrun every rank printed the same error, in two writes that could interleave into one
    garbled line; each is one write, and ranks other than 0 name themselves."""
    monkeypatch.setenv("RANK", "1")
    code, _, err = run_cli(["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "1", "--set",
                            "distill.bogus=1", "--out", str(tmp_path / "d"), "-q"], capsys)
    assert code == 2 and err.startswith("rank 1: error: unknown config key 'distill.bogus'") and err.count("\n") == 1
    import ddkit.cli as ddkit_cli

    monkeypatch.setenv("RANK", "0")  # rank 0 of a job of several names itself too; a single process does not
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ddkit_cli._error("x") is None and capsys.readouterr().err == "rank 0: error: x\n"
    monkeypatch.setenv("WORLD_SIZE", "1")
    ddkit_cli._error("x")
    assert capsys.readouterr().err == "error: x\n"


@pytest.mark.parametrize("argv", [["export", "SET", "--format", "pt", "--out", "OUT"], ["report", "SET"], ["cache"]],
                         ids=["export", "report", "cache"])
def test_one_process_commands_refuse_torchrun(tmp_path, monkeypatch, capsys, argv):
    """export, report and cache wrote their output (or pruned) once per torchrun rank, printing it twice: refused
    under a job of several processes in one line, nothing written; a single process runs them."""
    argv = [str(tmp_path / a) if a in ("SET", "OUT") else a for a in argv]
    monkeypatch.setenv("DDKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err == (f"rank 1: error: ddkit {argv[0]} runs in one process (under torchrun every rank "
                                 "would write its output again); run it without torchrun\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    code, _, err = run_cli(argv, capsys)
    assert "torchrun" not in err and (code == 0) == (argv[0] == "cache")


def test_cli_details_from_qa_round_4(tmp_path, capsys, caplog):
    """-v only worked before the subcommand; --seeds 0,,1 ran as 0,1; a rerun replaced the earlier output
    without a word; label mode stored on a set without soft labels first asked for a teacher it would not
    use; --teacher with label mode hard was ignored silently."""
    from ddkit.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["distill", "--method", "random", "--out", "x", "-v"]).verbose is True
    assert parser.parse_args(["-v", "distill", "--method", "random", "--out", "x"]).verbose is True
    assert parser.parse_args(["distill", "--method", "random", "--out", "x"]).verbose is False
    out = tmp_path / "set"
    args = ["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--out", str(out), "-q"]
    assert run_cli(args, capsys)[0] == 0
    with caplog.at_level("WARNING", logger="ddkit"):
        assert run_cli(args, capsys)[0] == 0
    assert f"replaced the earlier distilled-set in {out}" in caplog.text
    code, _, err = run_cli(["evaluate", str(out), "--seeds", "0,,1"], capsys)
    assert code == 2 and err == "error: --seeds must be comma-separated integers like 0,1,2, got '0,,1'\n"
    code, _, err = run_cli(["evaluate", str(out), "--label-mode", "stored"], capsys)
    assert code == 2 and err.startswith("error: label_mode 'stored' needs soft labels in the distilled set;")
    caplog.clear()
    teacher = tmp_path / "t"
    assert run_cli(["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", "1",
                    "--out", str(teacher), "-q"], capsys)[0] == 0
    with caplog.at_level("WARNING", logger="ddkit"):
        code, _, err = run_cli(["evaluate", str(out), "--teacher", str(teacher), "--label-mode", "hard", "--seeds", "0",
                                "--set", "student=tiny_convnet", "--set", "train.epochs=1", "--set",
                                "full_reference=false", "--set", "random_baseline=false", "--set",
                                "fkd_store=nowhere", "-q"], capsys)
    assert code == 0, err
    assert "label mode hard trains on the set's own labels: --teacher is not used" in caplog.text
    assert "label mode hard replays no FKD store: fkd_store is not used" in caplog.text


def test_only_rank_0_of_a_torchrun_job_prints_warnings(tmp_path, monkeypatch):
    """Every rank of a torchrun job printed the same warnings (datm's, cvdd's, a replaced output's);
    ranks other than 0 now print errors only, unless -v asks for every rank's messages. export, report
    and show -q print nothing but errors (export's replaced-output warning was printed)."""
    import logging

    from ddkit.cli import _log_level, build_parser

    cases = {  # (RANK, arguments): the level
        ("0", "distill --method random --out x"): logging.WARNING,
        ("1", "distill --method random --out x"): logging.ERROR,
        ("1", "distill --method random --out x -v"): logging.INFO,
        ("0", "export s --format pt --out x"): logging.WARNING,
        ("0", "export s --format pt --out x -q"): logging.ERROR,
        ("0", "show s -q"): logging.ERROR,
        ("0", "distill --method random --out x -q"): logging.WARNING,  # -q of a training command: no bars
    }
    for (rank, argv), level in cases.items():
        monkeypatch.setenv("RANK", rank)
        assert _log_level(build_parser().parse_args(argv.split())) == level, (rank, argv)
    # end to end, in the processes whose logging main() configures: rank 1 prints none of rank 0's warning
    out = tmp_path / "set"
    cmd = [sys.executable, "-m", "ddkit", "distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2",
           "--out", str(out), "-q"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    assert subprocess.run(cmd, capture_output=True, text=True, env=env).returncode == 0
    rank0 = subprocess.run(cmd, capture_output=True, text=True, env={**env, "RANK": "0"})
    rank1 = subprocess.run(cmd, capture_output=True, text=True, env={**env, "RANK": "1"})
    assert (rank0.returncode, rank1.returncode) == (0, 0)
    assert (f"WARNING ddkit.artifacts: replaced the earlier distilled-set in {out}" in rank0.stderr
            and rank1.stderr == "")


def test_a_lost_torchrun_peer_is_one_line_per_rank(capsys, monkeypatch):
    """A rank whose peer was killed mid-collective printed gloo's 30-line traceback ("Connection closed by
    peer"); it now says in one line that another process stopped, and exits non-zero. Any other
    RuntimeError (a bug) keeps its traceback."""
    import ddkit.cli as cli
    import ddkit.distributed as ddist

    monkeypatch.setattr(ddist, "current", lambda: ddist.DistInfo(rank=1, world_size=2))
    monkeypatch.setattr(ddist, "shutdown", lambda barrier=True: None)
    monkeypatch.setenv("RANK", "1")
    args = cli.build_parser().parse_args(["list", "methods"])

    def lost(_):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by "
                           "peer [10.0.0.1]:1")

    args.func = lost
    assert cli._main(args) == 1
    assert capsys.readouterr().err == (
        "rank 1: error: another process of this torchrun job stopped "
        "([../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.0.0.1]:1); its own output "
        "says why: rerun the command, which resumes where the job got to\n")

    def bug(_):
        raise RuntimeError("shape mismatch")

    args.func = bug
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli._main(args)


def test_plugins_let_the_cli_train_and_load_a_users_model(tmp_path):
    """A model registered from Python trained and evaluated there, but every CLI use of its teacher
    called the artifact damaged, and the CLI had no way to import the user's code. DDKIT_PLUGINS names
    the modules to import first."""
    (tmp_path / "myplug.py").write_text(
        "from functools import partial\n"
        "from ddkit.models import MODELS\n"
        "from ddkit.models.convnet import convnet\n"
        "MODELS.add('my_net', partial(convnet, depth=1, width=4))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "DDKIT_PLUGINS")}

    def ddkit(*args, plugins=None):
        extra = {"DDKIT_PLUGINS": plugins} if plugins is not None else {}
        return subprocess.run([sys.executable, "-m", "ddkit", *args], capture_output=True, text=True, cwd=tmp_path,
                              env={**env, **extra})

    made = ddkit("teacher", "--dataset", "synthetic", "--model", "my_net", "--epochs", "1", "--out", "t", "-q",
                 plugins="myplug")
    assert made.returncode == 0, made.stderr
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["model"]["name"] == "my_net"
    shown = ddkit("show", "-q", "t", plugins=" myplug ,")
    assert (shown.returncode, shown.stderr) == (0, "")
    alone = ddkit("show", "-q", "t")
    assert alone.returncode == 2 and "a model of your own: import the module that registers it first (the CLI " \
                                      "imports those named in DDKIT_PLUGINS)" in alone.stderr
    broken = ddkit("list", "models", plugins="myplug,nosuchplug")
    assert broken.returncode == 2 and broken.stderr == (
        "error: DDKIT_PLUGINS: cannot import 'nosuchplug' (ModuleNotFoundError: No module named 'nosuchplug'); fix the "
        "module or remove it from DDKIT_PLUGINS (-v shows the traceback)\n")
    # an error inside the module: where it is, in the one line; the traceback with -v
    (tmp_path / "badplug.py").write_text("def helper():\n    return undefined_name\n\n\nhelper()\n")
    bad = ddkit("list", "models", plugins="badplug")
    assert bad.returncode == 2 and bad.stderr == (
        "error: DDKIT_PLUGINS: cannot import 'badplug' (NameError: name 'undefined_name' is not defined, at "
        f"{tmp_path / 'badplug.py'}:2); fix the module or remove it from DDKIT_PLUGINS (-v shows the traceback)\n")
    verbose = ddkit("-v", "list", "models", plugins="badplug")
    assert verbose.returncode == 2 and "Traceback (most recent call last)" in verbose.stderr
    assert f'File "{tmp_path / "badplug.py"}", line 5, in <module>' in verbose.stderr
    (tmp_path / "synplug.py").write_text("x = 1\ny = (\n")
    syntax = ddkit("list", "models", plugins="synplug")
    assert f", at {tmp_path / 'synplug.py'}:2); fix the module" in syntax.stderr
    file = ddkit("list", "models", plugins="myplug.py")
    assert file.returncode == 2 and file.stderr == ("error: DDKIT_PLUGINS names modules, not files: use 'myplug', not "
                                                    "'myplug.py'\n")
    listed = ddkit("list", "models", "my_*", plugins="myplug")
    assert listed.returncode == 0 and listed.stdout.split() == ["my_net"]


def _help(command: str) -> str:
    """``ddkit COMMAND --help``'s text, with argparse's line wrapping undone."""
    from ddkit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return " ".join(sub.choices[command].format_help().split())


def test_help_names_ddkit_plugins_and_where_methods_are_listed(capsys):
    """No --help named DDKIT_PLUGINS, and `distill --method` had no help text; `list methods` printed keys only."""
    from ddkit.cli import build_parser

    top = " ".join(build_parser().format_help().split())
    assert ("Your own methods, models and datasets: DDKIT_PLUGINS=mymodule[,other] imports those modules (from the "
            "current folder or sys.path) before any command") in top
    assert ("--method METHOD registered method key (`ddkit list methods -l`; its options: `ddkit show METHOD`, set "
            "with --set distill.options.OPTION=VALUE)") in _help("distill")
    code, out, _ = run_cli(["list", "methods", "d*", "-l"], capsys)
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == ["datadam", "datm", "dc", "dm", "dsa", "dwa"]
    assert out.splitlines()[3] == ('dm       Distribution Matching (Zhao & Bilen, "Dataset Condensation with '
                                   'Distribution Matching", WACV 2023).')
    code, out, _ = run_cli(["list", "models", "tiny_*", "--long"], capsys)
    assert out.splitlines()[1] == "tiny_mlp      flatten -> Linear(hidden) -> ReLU -> Linear."


def test_evaluate_teacher_help_names_every_case_that_needs_one():
    """--teacher's help named label modes teacher/stored only: the presets with label mode teacher and
    fkd (with the random baseline on) need one too."""
    from ddkit.cli import TEACHER_PRESETS
    from ddkit.evaluate import PROTOCOLS

    assert tuple(n for n in PROTOCOLS.list() if PROTOCOLS.get(n)().label_mode == "teacher") == TEACHER_PRESETS
    text = _help("evaluate")
    assert ("needed for label mode teacher (the presets cvdd, edc, soft-kl), and for stored and fkd while the random "
            "baseline is on") in text


def test_evaluate_epochs_help_names_the_full_reference_epochs():
    assert ("the full-data reference keeps its own full_epochs: change them with --set full_epochs=N, or skip it "
            "with --set full_reference=false") in _help("evaluate")


def test_show_quiet_help_says_errors_are_printed():
    assert "-q, --quiet print nothing but an error; exit 0" in _help("show")


def test_interrupt_line_offers_a_rerun_only_where_it_resumes(monkeypatch, capsys):
    """`ddkit evaluate` starts its students afresh: its line says only that it was interrupted."""
    import ddkit.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ddkit.cli, "cmd_evaluate", interrupted)
    monkeypatch.setattr(ddkit.cli, "cmd_relabel", interrupted)
    assert run_cli(["evaluate", "somewhere"], capsys) == (130, "", "interrupted\n")
    assert run_cli(["relabel", "somewhere", "--teacher", "t"], capsys) == (
        130, "", "interrupted; run the same command again to resume\n")


def test_run_and_bench_name_the_command_a_config_of_the_other_belongs_to(tmp_path, capsys):
    """A bench config given to `ddkit run` gave eight unknown-key errors (one with a did-you-mean 'dataset'
    for 'datasets'), and a run config given to `ddkit bench` a misleading did-you-mean 'distill_seed'."""
    bench = tmp_path / "bench.yaml"
    bench.write_text("datasets: [synthetic]\nmethods: [random]\nipcs: [1]\nstudents: [tiny_convnet]\n"
                     f"out: {tmp_path / 'b'}\n")
    run = tmp_path / "run.yaml"
    run.write_text(f"dataset: {{name: synthetic}}\ndistill: {{method: random, ipc: 1}}\nout: {tmp_path / 'r'}\n")
    assert run_cli(["run", str(bench)], capsys) == (
        2, "", f"error: '{bench}' looks like a `ddkit bench` config (keys datasets, ipcs, methods, students); run it "
               f"with `ddkit bench {bench}`\n")
    assert run_cli(["bench", str(run)], capsys) == (
        2, "", f"error: '{run}' looks like a `ddkit run` config (keys dataset, distill); run it with `ddkit run "
               f"{run}`\n")
    # a run config with one bench-like typo is still told its own key errors
    run.write_text("datasets: {name: synthetic}\ndistill: {method: random, ipc: 1}\nevaluate: {}\n")
    code, _, err = run_cli(["run", str(run)], capsys)
    assert code == 2 and "unknown config key 'datasets'; did you mean 'dataset'?" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.yaml", "run.yaml"]


def test_augment_option_error_names_the_fix(capsys):
    """`--protocol edc --set train.augment=flip` kept edc's scale_min: the error named no way out."""
    from ddkit.errors import ConfigError
    from ddkit.evaluate import resolve_protocol

    with pytest.raises(ConfigError) as exc:
        resolve_protocol("edc", {"train": {"augment": "flip"}}, where="")
    assert str(exc.value) == ("train: augmentation 'flip' has no option(s) ['scale_min']; valid: prob; the protocol's "
                              "train.augment_options are kept when train.augment changes: add --set "
                              "train.augment_options={}")
    with pytest.raises(ConfigError, match=r"changes: add evaluate\.overrides\.train\.augment_options: \{\}$"):
        resolve_protocol("edc", {"train": {"augment": "flip"}}, where="evaluate.overrides")
    with pytest.raises(ConfigError, match=r"valid: prob$"):  # the options given with it: they are what is wrong
        resolve_protocol("edc", {"train": {"augment": "flip", "augment_options": {"scale_min": 0.5}}}, where="")
    fixed = resolve_protocol("edc", {"train": {"augment": "flip", "augment_options": {}}}, where="")
    assert (fixed.train.augment, fixed.train.augment_options) == ("flip", {})


def test_evaluate_bars_read_the_stage_from_the_record_and_fkd_needs_its_store_first(tmp_path, capsys, monkeypatch):
    """evaluate's progress callback is now progress(step, total, record) with the student in record["stage"],
    as every other stage calls it; the CLI's bars name each student from it. A protocol may leave
    fkd_store out (a library call passes the store), so `evaluate --label-mode fkd` without --set
    fkd_store says so before the data and teacher are loaded."""
    import ddkit.cli as cli
    import ddkit.data.base as base

    bars = cli.Progress(True)
    seen = []
    callback = bars.students()
    monkeypatch.setattr(cli.Progress, "__call__", lambda self, label, done, total, record=None, unit="ep":
                        seen.append((label, done, total, record)))
    callback(2, 5, {"stage": "random subset, seed 1", "loss": 0.5})
    assert seen == [("random subset, seed 1", 2, 5, {"stage": "random subset, seed 1", "loss": 0.5})]
    assert cli.Progress(False).students() is None  # -q: no callback, as Progress.stage gives

    out = tmp_path / "set"
    assert run_cli(["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--out", str(out), "-q"],
                   capsys)[0] == 0
    monkeypatch.setattr(base, "load_dataset", lambda *a, **k: pytest.fail("loaded the data before the check"))
    code, _, err = run_cli(["evaluate", str(out), "--label-mode", "fkd"], capsys)
    assert code == 2 and err == "error: label mode fkd replays a `ddkit relabel` store; pass --set fkd_store=DIR\n"


def test_output_names_up_to_name_max_are_accepted(tmp_path, capsys):
    """ddkit's hidden names beside an output (``.<name>.tmp-<host>_<pidns>-<pid>-<hex>``, the teacher's
    ``.<name>.resume-<hash>.pt``, ``.<name>.work``) made output names of about 200-255 bytes fail with
    'File name too long'; a long name is now embedded shortened, and ordinary names are unchanged."""
    import errno

    from ddkit.artifacts import hidden_path, output_for, sweep_leftovers, temp_path, work_name
    from ddkit.cli import _os_error

    assert work_name("t") == "t" and hidden_path(tmp_path / "d", ".work") == tmp_path / ".d.work"
    long = "t" * 250 + "é"  # 252 bytes
    hidden = [temp_path(tmp_path / long), temp_path(tmp_path / long, "old"), hidden_path(tmp_path / long, ".partial"),
              hidden_path(tmp_path / long, ".resume-5a9921420fb83ac1.pt")]
    hidden.append(temp_path(hidden[-1]))  # the checkpoint's own temporary
    assert all(len(os.fsencode(p.name)) <= 255 for p in hidden)
    assert all(output_for(p) == tmp_path / long for p in hidden)
    assert repr(str(tmp_path / long)) in _os_error(OSError(errno.ENOSPC, "No space left on device", str(hidden[-1])))
    dead = hidden[0].with_name(hidden[0].name.replace(f"-{os.getpid()}-", "-999999999-"))
    dead.mkdir()
    assert sweep_leftovers(tmp_path / long) == [dead] and not dead.exists()
    for cmd in (["teacher", "--dataset", "synthetic", "--model", "tiny_mlp", "--epochs", "1"],
                ["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2"]):
        out = tmp_path / cmd[0] / ("x" * 255)
        code, _, err = run_cli([*cmd, "--out", str(out), "-q"], capsys)
        assert code == 0 and err == "" and (out / "manifest.json").is_file()
        assert os.listdir(out.parent) == [out.name]  # nothing hidden left beside it


def test_a_second_writer_to_the_same_out_refuses_at_once(workdir, tmp_path, capsys):
    """Two `relabel` (or `distill`) runs to one --out shared its hidden work folder, and the first to finish
    deleted it under the other: 'relabel epoch ... not found; the artifact is incomplete, re-create it'. The
    second now refuses at once; a killed writer's lock (an flock) dies with it and blocks nothing."""
    import signal

    from ddkit.artifacts import hidden_path, writing

    t, d = workdir / "teacher", workdir / "r5"
    runs = {"relabel": (tmp_path / "f", ".partial", ["relabel", str(d), "--teacher", str(t), "--epochs", "1"]),
            "distill": (tmp_path / "s", ".work", ["distill", "--dataset", "synthetic", "--method", "random",
                                                  "--ipc", "2"])}
    for out, suffix, args in runs.values():
        with writing(hidden_path(out, suffix), out):  # another process writing the same --out
            code, _, err = run_cli([*args, "--out", str(out), "-q"], capsys)
            assert code == 2 and err == (f"error: another ddkit call (in this process or another) is writing "
                                         f"{str(out)!r}; wait for it or choose another --out\n")
            assert not out.exists()
        assert os.listdir(tmp_path) == []  # the lock's folder goes with it
    out, suffix, args = runs["relabel"]
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time, fcntl; os.makedirs(sys.argv[1]); "
                               "fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print(1, "
                               "flush=True); time.sleep(60)", str(hidden_path(out, suffix))], stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"1\n"
    assert run_cli([*args, "--out", str(out), "-q"], capsys)[0] == 2
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    code, _, err = run_cli([*args, "--out", str(out), "-q"], capsys)
    assert code == 0 and err == "" and sorted(os.listdir(tmp_path)) == ["f"]


def test_run_report_grid_that_cannot_be_written_names_it_and_leaves_nothing(workdir, tmp_path):
    """``ddkit run``'s report step copied the set's preview with shutil.copyfile: under a file-size limit (a
    full disk alike) the error named the preview it read, and a truncated distilled-grid.png stayed."""
    import errno
    import resource
    import signal

    from ddkit.cli import _os_error
    from ddkit.distilled import DistilledSet
    from ddkit.pipeline import write_report

    ds = DistilledSet.load(workdir / "r5")
    size = (workdir / "r5" / "preview.png").stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, hard))
    try:
        with pytest.raises(OSError) as info:
            write_report(tmp_path / "run", ds, [], None)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert info.value.errno == errno.EFBIG
    assert _os_error(info.value).startswith(f"cannot write {str(tmp_path / 'run' / 'report' / 'distilled-grid.png')!r}"
                                            ": File too large")
    assert os.listdir(tmp_path / "run" / "report") == []


def test_refused_relabel_leaves_no_new_parent_folders(workdir, tmp_path, capsys):
    """The work folder's lock made --out's missing parents before relabel checked its options: a refused
    `--seed -5 --out nd3/nd4/f` left nd3/nd4 behind."""
    code, _, err = run_cli(["relabel", str(workdir / "r5"), "--teacher", str(workdir / "teacher"), "--epochs", "2",
                            "--seed", "-5", "--out", str(tmp_path / "nd3" / "nd4" / "f"), "-q"], capsys)
    assert code == 2 and "relabel seed must be an integer" in err
    assert os.listdir(tmp_path) == []
    # a finished one keeps the parents it made, its output in them
    code, _, _ = run_cli(["relabel", str(workdir / "r5"), "--teacher", str(workdir / "teacher"), "--epochs", "2",
                          "--out", str(tmp_path / "nd3" / "nd4" / "f"), "-q"], capsys)
    assert code == 0 and os.listdir(tmp_path / "nd3" / "nd4") == ["f"]


def test_a_run_whose_distilled_folder_is_being_written_names_the_runs_out(tmp_path, capsys):
    """Inside `ddkit run` the lock's refusal named the run's own `distilled` folder and said to choose another
    --out for it, which is no --out the user gave: it names the run's --out."""
    from ddkit.artifacts import hidden_path, writing

    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: {name: synthetic}\nteacher: null\ndistill: {method: random, ipc: 2}\n"
                   "evaluate:\n  protocol: dc-protocol\n  overrides: {student: tiny_mlp, full_reference: false, "
                   "train: {epochs: 1}}\n  label_modes: [hard]\n  seeds: [0]\n"
                   f"out: {tmp_path / 'run'}\n")
    ddir = tmp_path / "run" / "distilled"
    with writing(hidden_path(ddir, ".work"), ddir):  # another process distilling into the run's folder
        code, _, err = run_cli(["run", str(cfg), "-q"], capsys)
    assert code == 2 and err == (f"error: another ddkit call (in this process or another) is writing "
                                 f"{str(tmp_path / 'run')!r}; wait for it or choose another --out\n")


def test_a_second_run_to_the_same_out_refuses_before_writing_anything(tmp_path, capsys):
    """Two `ddkit run` to one out: the second trained its own teacher and wrote it over the first's `teacher/`
    ('replaced the earlier teacher') before it reached the distill stage's lock and refused, and the finished run
    recorded evaluations of a teacher it no longer held. Now a second run (the CLI, or the library call) refuses
    at once while the first trains its teacher, writes nothing, and leaves the first's run whole."""
    import yaml

    import ddkit
    from ddkit.artifacts import OutputBusy

    out = tmp_path / "run"
    first = {"dataset": {"name": "synthetic"},
             "teacher": {"model": "tiny_convnet", "train": {"epochs": 2, "batch_size": 32}},
             "distill": {"method": "random", "ipc": 2},
             "evaluate": {"overrides": {"student": "tiny_convnet", "random_baseline": False, "full_reference": False,
                                        "train": {"epochs": 1}}, "label_modes": ["teacher"], "seeds": [0]},
             "out": str(out)}
    second = tmp_path / "second.yaml"  # another teacher, which it would have written over the first's
    second.write_text(yaml.safe_dump({**first, "teacher": {"model": "tiny_convnet", "train": {"epochs": 1}}}))
    busy = (f"another ddkit call (in this process or another) is writing {str(out)!r}; wait for it or choose "
            "another --out")
    seen = {}

    def teacher_epoch(step, total, record):  # the first run is training its teacher
        if seen:
            return
        seen["before"] = sorted(os.listdir(out)) if out.exists() else None
        seen["cli"] = run_cli(["run", str(second), "-q"], capsys)
        with pytest.raises(OutputBusy) as info:
            ddkit.run(yaml.safe_load(second.read_text()))
        seen["library"] = str(info.value)
        seen["after"] = sorted(os.listdir(out)) if out.exists() else None

    summary = ddkit.run(first, progress_factory=lambda stage: teacher_epoch if stage == "teacher" else None)
    assert seen["cli"] == (2, "", f"error: {busy}\n") and seen["library"] == busy
    assert seen["after"] == seen["before"]
    assert not any(n.startswith(("teacher", "distilled", ".teacher.tmp")) for n in seen["after"] or ())
    teacher = json.loads((out / "teacher" / "manifest.json").read_text())
    assert teacher["config"]["train"]["epochs"] == 2  # the first run's own teacher, which its report records
    assert summary["teacher_accuracy"] == teacher["test_accuracy"]
    assert json.loads((out / "manifest.json").read_text())["teacher_accuracy"] == teacher["test_accuracy"]


def test_a_failed_run_leaves_no_empty_run_folder(tmp_path, capsys):
    """A `ddkit run` that failed to write (a file-size limit: 'cannot write ...: File too large') left the empty
    run folder it had made (`teacher` and `distill` leave nothing). The folder goes, with the parents the run made;
    one that was there before the run stays."""
    import resource
    import signal

    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: {name: synthetic}\nteacher: {model: tiny_convnet, train: {epochs: 1}}\n"
                   "distill: {method: random, ipc: 2}\n"
                   "evaluate: {label_modes: [hard], seeds: [0], overrides: {student: tiny_convnet, "
                   "random_baseline: false, full_reference: false, train: {epochs: 1}}}\n")
    given = tmp_path / "given"
    given.mkdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))  # the teacher's weights cannot be written
    try:
        made = run_cli(["run", str(cfg), "--out", str(tmp_path / "new" / "run"), "-q"], capsys)
        there = run_cli(["run", str(cfg), "--out", str(given), "-q"], capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    for (code, _, err), out in ((made, tmp_path / "new" / "run"), (there, given)):
        assert code == 2 and err.startswith(f"error: cannot write {str(out / 'teacher')!r}: File too large; ")
    assert sorted(os.listdir(tmp_path)) == ["given", "run.yaml"] and os.listdir(given) == []


def test_evaluate_into_a_folder_it_cannot_write_fails_before_training(workdir, tmp_path, monkeypatch, capsys):
    """`ddkit evaluate SET` of a set in a read-only folder trained every student, then failed to write its
    eval-*.json: the accuracies were lost. The report's folder is now checked first, in one line."""
    import ddkit.evaluate.runner as runner
    from test_data_cache import read_only

    ro = tmp_path / "set"
    shutil.copytree(workdir / "r5", ro)
    held = sorted(os.listdir(ro))
    read_only(monkeypatch, ro)
    monkeypatch.setattr(runner, "_train_student", lambda *a, **k: pytest.fail("trained a student first"))
    code, _, err = run_cli(["evaluate", str(ro), "--seeds", "0", *FAST, "-q"], capsys)
    assert code == 2
    assert re.fullmatch(rf"error: cannot write '{re.escape(str(ro))}/eval-hard-[0-9a-f]{{16}}\.json': "
                        r"(Permission denied; check the path and its permissions, or|Read-only file system;) "
                        r"choose another --out\n", err), err
    assert sorted(os.listdir(ro)) == held


def test_cache_and_show_of_json_records_import_no_torch(tmp_path, capsys):
    """`ddkit cache -l` took 4.4 s and `ddkit show` of an evaluation JSON 2.9 s, nearly all of it importing torch
    (main() imported ddkit.distributed for every command; ddkit.artifacts, .describe and .evaluate imported it too)
    to read JSON manifests and list folders. These commands import none now (a fresh process: this one has torch)."""
    from pathlib import Path

    import ddkit

    tiny_run(tmp_path, capsys)
    root = Path(os.environ["DDKIT_CACHE"])
    for kind, manifest in (("statistics", {"kind": "statistics", "statistics_schema": 1}),
                           ("imagefolder", {"kind": "imagefolder-decoded", "schema_version": 1,
                                            "settings": {"root": "/data", "image_size": 8}})):
        (root / kind / "old").mkdir(parents=True)
        (root / kind / "old" / "manifest.json").write_text(json.dumps(manifest))
    (root / "random-baseline").mkdir()
    (root / "random-baseline" / "old.json").write_text(json.dumps({"schema_version": 1}))  # an older key
    run = tmp_path / "run"
    # `show --json` of a bench's config.json imported torch to count its cells, which it does not print (plain `show`
    # prints the count, and imports torch for it: see describe.describe)
    bench = tmp_path / "bench.yaml"
    bench.write_text("datasets: [synthetic]\nipcs: [1]\nstudents: [tiny_mlp]\nseeds: [0]\nmethods: [random]\n"
                     "overrides: {full_reference: false, random_baseline: false, train: {epochs: 1}}\n"
                     f"out: {tmp_path / 'bench'}\n")
    assert main(["bench", str(bench), "-q"]) == 0
    commands = [["cache", "-l"], ["cache", "prune", "--dry-run", "--all"], ["show", str(run / "eval-hard.json")],
                ["show", str(run / "report")], ["show", "--json", str(run)], ["show", "--json", str(run / "distilled")],
                ["show", "--json", str(tmp_path / "bench" / "config.json")], ["cache", "prune", "--stale"]]
    script = ("import json, sys\nfrom ddkit.cli import main\n"
              "codes = [main(args) for args in json.loads(sys.argv[1])]\n"
              "print(json.dumps([codes, sorted(m for m in sys.modules if m.split('.')[0] == 'torch')]))")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(ddkit.__file__).parents[1])})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    *out, last = proc.stdout.splitlines()
    assert json.loads(last) == [[0] * len(commands), []]
    assert "statistics/old  " in "\n".join(out) and "random ipc=2" in "\n".join(out)
    assert "removed 3 item(s)" in "\n".join(out) and not (root / "statistics" / "old").exists()
    assert '"kind": "bench-config"' in "\n".join(out)


def test_run_records_its_relative_paths_absolute(tmp_path, capsys, monkeypatch):
    """A run's config.json recorded a protocol YAML, extra_teachers and a teacher checkpoint as the relative paths
    it was given (read against the working folder), so the recorded config failed from another folder ("config
    file 'proto.yaml' not found") or read other files; the eval JSON and the imported teacher's manifest named
    them relative too. They are recorded absolute, and the record re-runs from anywhere, reusing every stage."""
    from safetensors.torch import save_file

    from ddkit.evaluate.protocol import resolve_protocol
    from ddkit.teacher import Teacher

    monkeypatch.chdir(tmp_path)
    assert run_cli(["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", "1", "--out", "tsyn",
                    "-q"], capsys)[0] == 0
    save_file(Teacher.load("tsyn").model.state_dict(), "ck.safetensors")  # weights to import as the run's teacher
    (tmp_path / "proto.yaml").write_text("student: tiny_convnet\nfull_reference: false\nrandom_baseline: false\n"
                                         "train: {epochs: 1, batch_size: 32}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/run.yaml").write_text(
        "dataset: {name: synthetic}\nteacher: {model: tiny_convnet, checkpoint: ck.safetensors}\n"
        "distill: {method: random, ipc: 2}\nevaluate: {protocol: proto.yaml, overrides: {extra_teachers: [tsyn]}, "
        "label_modes: [teacher], seeds: [0]}\nout: run\n")
    assert run_cli(["run", "sub/run.yaml", "-q"], capsys)[0] == 0
    recorded = json.loads((tmp_path / "run/config.json").read_text())
    assert recorded["teacher"]["checkpoint"] == str(tmp_path / "ck.safetensors")
    assert recorded["evaluate"]["protocol"] == str(tmp_path / "proto.yaml")
    assert recorded["evaluate"]["overrides"]["extra_teachers"] == [str(tmp_path / "tsyn")]
    teacher = json.loads((tmp_path / "run/teacher/manifest.json").read_text())
    assert teacher["config"]["checkpoint"] == teacher["imported_from"] == str(tmp_path / "ck.safetensors")
    report = json.loads((tmp_path / "run/eval-teacher.json").read_text())
    assert report["config"]["extra_teachers"] == [str(tmp_path / "tsyn")]
    # from another folder the record reads the same files: the same teacher weights, set and evaluation
    monkeypatch.chdir(tmp_path / "sub")
    assert run_cli(["run", str(tmp_path / "run/config.json"), "--out", str(tmp_path / "run"), "-q"], capsys)[0] == 0
    assert json.loads((tmp_path / "run/manifest.json").read_text())["reused"] == ["distilled", "eval-teacher.json"]
    # an FKD store is recorded absolute as well; the protocol's hash reads neither path
    rel = resolve_protocol(str(tmp_path / "proto.yaml"),
                           {"label_mode": "fkd", "loss": "kl", "fkd_store": "s.fkd", "extra_teachers": ["../tsyn"]})
    assert (rel.record()["fkd_store"], rel.record()["extra_teachers"]) == (str(tmp_path / "sub/s.fkd"),
                                                                         [str(tmp_path / "sub/../tsyn")])
    absolute = resolve_protocol(rel, {"fkd_store": str(tmp_path / "s.fkd"), "extra_teachers": [str(tmp_path / "t")]})
    assert absolute.hash == rel.hash


def test_a_recorded_run_finds_the_extra_teachers_its_protocol_file_names_from_any_folder(tmp_path, capsys,
                                                                                           monkeypatch):
    """A run's config.json recorded its protocol YAML absolute, but the `extra_teachers: [T4]` inside that file
    stayed relative to the working folder: from another folder the recorded config failed ("teacher artifact 'T4'
    not found"), or labelled with another folder's T4. The record names the file's teachers absolute in
    evaluate.overrides; from anywhere it reuses every stage (the same keys: hashes count and weigh the teachers)."""
    monkeypatch.chdir(tmp_path)
    assert run_cli(["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", "1", "--out", "T4",
                    "-q"], capsys)[0] == 0
    (tmp_path / "p.yaml").write_text("student: tiny_convnet\nextra_teachers: [T4]\nfull_reference: false\n"
                                     "random_baseline: false\ntrain: {epochs: 1}\n")
    (tmp_path / "run.yaml").write_text(
        f"out: {tmp_path / 'run'}\ndataset: {{name: synthetic}}\n"
        "teacher: {model: tiny_convnet, train: {epochs: 1, batch_size: 32}}\ndistill: {method: random, ipc: 1}\n"
        "evaluate: {protocol: p.yaml, label_modes: [teacher], seeds: [0]}\n")
    assert run_cli(["run", "run.yaml", "-q"], capsys)[0] == 0
    recorded = json.loads((tmp_path / "run/config.json").read_text())["evaluate"]
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, _, err = run_cli(["run", str(tmp_path / "run/config.json"), "-q"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "run/manifest.json").read_text())["reused"] == [
        "teacher", "distilled", "eval-teacher.json"]
    assert (recorded["protocol"], recorded["overrides"]) == (str(tmp_path / "p.yaml"),
                                                             {"extra_teachers": [str(tmp_path / "T4")]})


def test_relabels_suggested_evaluate_works_on_manifest_paths(workdir, tmp_path, capsys):
    """A set (and teacher) given as its manifest.json: `relabel` prints them back in its "evaluate with:" line, and
    that command, pasted, evaluated nothing: evaluate built its default report path inside the manifest file
    (QA 18d F3)."""
    import shlex

    d = tmp_path / "r5"
    shutil.copytree(workdir / "r5", d)
    code, out, err = run_cli(["relabel", str(d / "manifest.json"), "--teacher", str(workdir / "teacher/manifest.json"),
                              "--epochs", "2", "--out", str(tmp_path / "fkd"), "-q"], capsys)
    assert code == 0, err
    suggested = shlex.split(out.split("evaluate with: ddkit ", 1)[1].splitlines()[0])
    assert suggested[:2] == ["evaluate", str(d / "manifest.json")]
    code, out, err = run_cli([*suggested, "--seeds", "0", "--set", "student=tiny_convnet", "--set", "train.epochs=2",
                              "--set", "full_reference=false", "--set", "random_baseline=false", "-q"], capsys)
    assert code == 0, err
    written = sorted(p.name for p in d.glob("eval-fkd-*.json"))
    assert len(written) == 1 and f"report -> {d / written[0]}" in out
    assert json.loads((d / written[0]).read_text())["config"]["label_mode"] == "fkd"


def test_run_and_bench_refuse_the_current_folder_in_one_line(tmp_path, capsys, monkeypatch):
    """`ddkit run` / `ddkit bench` with out `.` (`--out .`, `--out ""`, or `out: ""` in the YAML) in an empty folder
    ended in a ValueError traceback from naming a temporary beside a folder with no name (QA 18d F7); `--out ""`
    silently wrote to the config's out instead."""
    import yaml

    tiny = {"dataset": {"name": "synthetic"}, "teacher": {"model": "tiny_convnet", "train": {"epochs": 1}}}
    run = {**tiny, "distill": {"method": "random", "ipc": 1}, "out": str(tmp_path / "configured"),
           "evaluate": {"seeds": [0], "overrides": {"student": "tiny_convnet", "train": {"epochs": 1},
                                                    "full_reference": False, "random_baseline": False}}}
    bench = {"datasets": [{"name": "synthetic"}], "methods": ["random"], "ipcs": [1], "seeds": [0],
             "students": ["tiny_convnet"], "teacher": tiny["teacher"], "out": str(tmp_path / "configured"),
             "overrides": {"full_reference": False, "train": {"epochs": 1}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    (tmp_path / "run_here.yaml").write_text(yaml.safe_dump({**run, "out": ""}))
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(bench))
    (tmp_path / "bench_here.yaml").write_text(yaml.safe_dump({**bench, "out": ""}))
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for command in ("run", "bench"):
        given = str(tmp_path / f"{command}.yaml")
        for argv in ([given, "--out", "."], [given, "--out", ""], [str(tmp_path / f"{command}_here.yaml")]):
            code, _, err = run_cli([command, *argv, "-q"], capsys)
            assert code == 2 and err == (f"error: output '.' is the current folder or holds it, and a {command} "
                                         f"folder holds only what the {command} writes; give a subfolder, e.g. --out "
                                         "./out\n"), err
    assert list(here.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "bench.yaml", "bench_here.yaml", "here", "run.yaml", "run_here.yaml"]


def test_device_mps_where_it_is_missing_is_refused_in_one_line(workdir, tmp_path, capsys, monkeypatch):
    """`--device mps` on a machine without MPS: a RuntimeError traceback from the first generator on it (teacher,
    evaluate), or nothing at all where no tensor went there (a random set, exit 0) (QA 18d F9). It is refused as
    `--device cuda` without CUDA is, before any work."""
    from ddkit.distributed import resolve_device
    from ddkit.errors import DDKitError

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for argv in (["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", "1"],
                 ["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "1"],
                 ["evaluate", str(workdir / "r5"), "--seeds", "0", *FAST]):
        code, out, err = run_cli([*argv, "--device", "mps", "--out", str(tmp_path / "out"), "-q"], capsys)
        assert (code, out, err) == (2, "", "error: device 'mps' asked for but MPS is not available here; use --device "
                                           "cpu or auto\n")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DDKitError, match="^device 'mps' asked for but MPS is not available here"):
        resolve_device("mps")


def test_sizes_no_machine_holds_end_in_one_line(workdir, tmp_path, capsys, monkeypatch):
    """An enormous size setting ended in a traceback (torch's allocator, Python's MemoryError) or ran for hours (rded
    num_crop 10^12 built a list of 10^12 crop batches; relabel --epochs 10^12 a list of 10^12 epochs) (QA 18d F1, F5).
    A failed allocation is one line naming its size and where ddkit asked for it; the relabel store and rded's crops,
    whose sizes are known up front, are refused before any work, naming the setting to lower."""
    import ddkit.cli

    out = tmp_path / "out" / "x"
    code, _, err = run_cli(["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", "1", "--set",
                            "teacher.model_options.width=1000000000000", "--out", str(out), "-q"], capsys)
    assert code == 2 and err.count("\n") == 1 and re.match(
        r"error: out of memory allocating [\d.e+]+ GB \(at ddkit/models/convnet\.py:\d+\): a size setting is too large "
        r"for this machine; lower it \(a model's width or depth", err), err
    code, _, err = run_cli(["relabel", str(workdir / "r5"), "--teacher", str(workdir / "teacher"), "--epochs",
                            str(10**12), "--out", str(out), "-q"], capsys)
    assert code == 2 and re.fullmatch(
        r"error: the store's logits \(1000000000000 epochs x 20 images x 4 logits\) would take [\d.e+]+ GB, more than "
        rf"the [\d.]+ [kMGT]?B free on the disk of {re.escape(repr(str(out.parent)))}; lower the relabel epochs \(or "
        r"keep fewer logits with top_k\)\n", err), err
    code, _, err = run_cli(["distill", "--dataset", "synthetic", "--method", "rded", "--ipc", "1", "--teacher",
                            str(workdir / "teacher"), "--set", f"distill.options.num_crop={10**12}", "--out", str(out),
                            "-q"], capsys)
    assert code == 2 and re.fullmatch(
        r"error: rded's 1000000000000 crops of each of \d+ source images per class would take [\d.e+]+ GB, more than "
        r"the [\d.]+ [kMGT]?B of memory on this machine; lower distill.options.num_crop\n", err), err
    assert not out.exists()

    def python_out_of_memory(args):
        raise MemoryError

    monkeypatch.setattr(ddkit.cli, "cmd_list", python_out_of_memory)
    code, _, err = run_cli(["list", "models"], capsys)
    assert code == 2 and err.startswith("error: out of memory (at ddkit/cli.py:") and err.count("\n") == 1, err
    # CUDA's (no device here: the message as torch words it) and other errors
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                                  "79.19 GiB of which 1.2 GiB is free.")
    assert ddkit.cli._out_of_memory(cuda).startswith("out of memory allocating 20.00 GiB: a size setting is too large")
    assert ddkit.cli._out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def test_a_flag_and_a_set_of_the_same_key_are_refused(workdir, tmp_path, capsys):
    """A --set applied over a flag of the same key dropped the flag's value without a word, even an invalid one
    (`--ipc -1 --set distill.ipc=1`), and `--set dataset=~` loaded Fashion-MNIST instead of `--dataset synthetic`
    (QA 18d F6). The two are refused in one line; a --set that leaves the flag's value (another key of its section,
    the same value) is taken."""
    out = str(tmp_path / "out")
    ev = ["evaluate", str(workdir / "r5"), "--seeds", "0", "--set", "student=tiny_convnet", "--set",
          "full_reference=false", "--set", "random_baseline=false"]
    cases = [
        (["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "-1", "--set", "distill.ipc=1"],
         "--ipc -1 and --set distill.ipc=1 both give distill.ipc"),
        (["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "1", "--set", "dataset=~"],
         "--dataset synthetic and --set dataset=~ both give dataset.name"),
        (["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "1", "--set", "distill=null"],
         "--method random and --set distill=null both give distill.method"),
        (["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "1", "--teacher",
          str(workdir / "teacher"), "--soft-labels", "--set", "distill.soft_labels=false"],
         "--soft-labels and --set distill.soft_labels=false both give distill.soft_labels"),
        (["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", "-5", "--set",
          "teacher.train.epochs=1"], "--epochs -5 and --set teacher.train.epochs=1 both give teacher.train.epochs"),
        (["experts", "--dataset", "synthetic", "--model", "tiny_convnet", "--num-experts", "2", "--set",
          "experts={num_experts: 3}"],
         "--num-experts 2 and --set experts={num_experts: 3} both give experts.num_experts"),
        ([*ev, "--epochs", "-3", "--set", "train.epochs=1"],
         "--epochs -3 and --set train.epochs=1 both give train.epochs"),
        ([*ev, "--label-mode", "hard", "--set", "label_mode=teacher"],
         "--label-mode hard and --set label_mode=teacher both give label_mode"),
    ]
    for argv, message in cases:
        code, _, err = run_cli([*argv, "--out", out, "-q"], capsys)
        assert (code, err) == (2, f"error: {message}; give it once (a --set is applied over the flags)\n"), argv
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "run.yaml").write_text(f"dataset: {{name: synthetic}}\nout: {tmp_path / 'configured'}\n")
    (tmp_path / "bench.yaml").write_text(f"datasets: [synthetic]\nout: {tmp_path / 'configured'}\n")
    for command in ("run", "bench"):
        code, _, err = run_cli([command, str(tmp_path / f"{command}.yaml"), "--out", out, "--set", f"out={out}2",
                                "-q"], capsys)
        assert (code, err) == (2, f"error: --out {out} and --set out={out}2 both give out; give it once (a --set is "
                                  "applied over the flags)\n"), command
    # the same value, or another key of the flag's section: taken
    code, _, err = run_cli(["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "1", "--set",
                            "distill.ipc=1", "--set", "dataset={options: {num_classes: 3}}", "--out", out, "-q"],
                           capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "out/manifest.json").read_text())["num_images"] == 3


@pytest.mark.parametrize("distill, message", [
    ("{method: dm, ipc: 1, options: {iterations: 2, model: convnet3, model_options: {depth: 5}}}",
     "{at}.model_options: image size 16 is too small for a depth-5 ConvNet with pooling: 5 poolings need at least 32 "
     "px; use a smaller depth (at most 4) or pooling='none'"),
    ("{method: mtt, ipc: 1, options: {buffer: {model: convnet3, model_options: {depth: 5}}}}",
     "{at}.buffer.model_options: image size 16 is too small for a depth-5 ConvNet with pooling"),
    ("{method: rded, ipc: 2, options: {mipc: 1}}",
     "rded needs 2 source images per class (ipc 2 x factor 1^2) but mipc is 1; raise {at}.mipc to at least 2"),
])
def test_run_and_bench_check_what_the_method_refuses_of_the_data_before_any_stage(tmp_path, capsys, distill, message):
    """A method's network too deep for the images and rded's mipc below its need were refused only inside the
    method's fit, after `ddkit run` (or `ddkit bench`) had trained the teacher (QA 18d F11)."""
    import yaml

    method = yaml.safe_load(distill)
    run = tmp_path / "run.yaml"
    run.write_text(f"dataset: {{name: synthetic}}\nteacher: {{model: tiny_convnet, train: {{epochs: 1}}}}\n"
                   f"distill: {distill}\nevaluate: {{seeds: [0], overrides: {{student: tiny_convnet, "
                   f"full_reference: false, train: {{epochs: 1}}}}}}\nout: {tmp_path / 'run'}\n")
    bench = tmp_path / "bench.yaml"
    bench.write_text(yaml.safe_dump({"datasets": ["synthetic"], "ipcs": [method["ipc"]], "students": ["tiny_convnet"],
                                     "methods": [{"name": method["method"], "options": method["options"]}],
                                     "teacher": {"model": "tiny_convnet", "train": {"epochs": 1}},
                                     "out": str(tmp_path / "bench")}))
    for command, at in (("run", "distill.options"), ("bench", f"methods[{method['method']}].options")):
        code, _, err = run_cli([command, str(tmp_path / f"{command}.yaml"), "-q"], capsys)
        assert code == 2 and err.startswith(f"error: {message.format(at=at)}") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.yaml", "run.yaml"]
