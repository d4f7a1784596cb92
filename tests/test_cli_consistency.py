"""QA 22b: the CLI, its records and its descriptions agree with what the commands do (findings F1, F3-F8)."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from ddkit.cli import build_parser, main
from ddkit.config import from_dict
from ddkit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A 1-epoch tiny teacher ``t`` and a random set ``r2`` (IPC 2) on the generated data."""
    root = tmp_path_factory.mktemp("qa22b")
    assert main(["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", "1",
                 "--out", str(root / "t"), "-q"]) == 0
    assert main(["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--out", str(root / "r2"),
                 "-q"]) == 0
    return root


def test_a_checkpoint_import_refuses_training_settings_however_given(made, tmp_path, capsys):
    """F1: --epochs/--seed/--precision were refused with --checkpoint, but --set teacher.train.epochs=7 (or a
    --config teacher.train section) was taken and recorded in the imported teacher's manifest, which trained 0 epochs.
    The teacher's own recipe that a config merely carries (a run's teacher section) is taken."""
    from ddkit.pipeline import RunConfig
    from ddkit.teacher import TeacherConfig

    ck = str(made / "t" / "model.safetensors")
    with pytest.raises(ConfigError, match=r"^checkpoint imports a trained teacher, but train\.epochs=7 sets how one "
                                          r"trains; drop it \(or drop checkpoint to train\)$"):
        TeacherConfig(model="tiny_convnet", checkpoint=ck, train={"epochs": 7})
    with pytest.raises(ConfigError, match=r"^teacher\.checkpoint imports a trained teacher, but "
                                          r"train\.precision='bf16', seed=3 set how one trains; drop them "):
        from_dict(RunConfig, {"dataset": {"name": "synthetic"}, "out": str(tmp_path / "run"),
                              "teacher": {"model": "tiny_convnet", "checkpoint": ck, "seed": 3,
                                          "train": {"precision": "bf16"}}})
    # the defaults, merged or given again, decide nothing: taken
    run = from_dict(RunConfig, {"dataset": {"name": "synthetic"}, "out": str(tmp_path / "run"),
                                "teacher": {"model": "tiny_convnet", "checkpoint": ck, "train": {"epochs": 20}}})
    assert run.teacher.checkpoint == ck and run.teacher.train == TeacherConfig().train

    base = ["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--checkpoint", ck, "-q"]
    code, out, err = run_cli([*base, "--set", "teacher.train.epochs=7", "--out", str(tmp_path / "a")], capsys)
    assert (code, out, err) == (2, "", "error: teacher.checkpoint imports a trained teacher, but train.epochs=7 sets "
                                       "how one trains; drop it (or drop checkpoint to train)\n")
    (tmp_path / "t.yaml").write_text("teacher:\n  train: {lr: 0.1}\n")
    code, _, err = run_cli([*base, "--config", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and err.startswith("error: teacher.checkpoint imports a trained teacher, but train.lr=0.1 sets ")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # the flags keep their own message
    code, _, err = run_cli([*base, "--epochs", "2", "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and err.startswith("error: --epochs set how a teacher trains, but --checkpoint imports")
    # a --set of the default recipe imports, and records the recipe it always recorded
    assert run_cli([*base, "--set", "teacher.train.epochs=20", "--out", str(tmp_path / "d")], capsys)[0] == 0
    recorded = json.loads((tmp_path / "d" / "manifest.json").read_text())["config"]
    assert recorded["train"]["epochs"] == 20 and recorded["checkpoint"] == ck


@pytest.mark.parametrize("argv", [["list", "models"], ["show", "dm"], ["report", "runs/x"],
                                  ["export", "set", "--format", "pt", "--out", "x"], ["cache"], ["cache", "list"],
                                  ["cache", "prune", "--all"], ["teacher", "--out", "x"]])
def test_v_is_taken_after_every_subcommand(argv):
    """F3: -v after list/show/report/export/cache was a usage error, though their errors say "-v shows the
    traceback"."""
    parser = build_parser()
    assert parser.parse_args([*argv, "-v"]).verbose is True
    assert parser.parse_args(["-v", *argv]).verbose is True
    assert parser.parse_args(argv).verbose is False


def test_v_after_list_shows_a_plugins_traceback(tmp_path):
    (tmp_path / "badplug.py").write_text("raise ValueError('boom')\n")
    import ddkit

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    path = os.pathsep.join([str(Path(ddkit.__file__).parents[1]), env.get("PYTHONPATH", "")])  # this ddkit
    done = subprocess.run([sys.executable, "-m", "ddkit", "list", "models", "-v"], capture_output=True, text=True,
                          cwd=tmp_path, env={**env, "DDKIT_PLUGINS": "badplug", "PYTHONPATH": path})
    assert done.returncode == 2 and "Traceback (most recent call last)" in done.stderr
    assert done.stderr.rstrip().endswith("fix the module or remove it from DDKIT_PLUGINS (-v shows the traceback)")


def _evaluate_printed(out: str) -> list[str]:
    """The `ddkit evaluate ...` command relabel printed, as arguments."""
    line = next(x for x in out.splitlines() if x.startswith("evaluate with: "))
    argv = shlex.split(line.removeprefix("evaluate with: "))
    assert argv[0] == "ddkit"
    return argv[1:]


def test_relabel_prints_an_evaluation_of_the_stores_views(made, tmp_path, capsys, caplog):
    """F4: the printed command named no protocol: dc-protocol (no augmentation) then warned every time that the
    store's rrc_flip views replace the protocol's. It names soft-kl for relabel's defaults (README's pairing), the
    store's epochs, and a preset or the augmentation for other views; run as printed it warns of neither."""
    quick = ["--seeds", "0", "--set", "full_reference=false", "--set", "random_baseline=false",
             "--set", "student=tiny_convnet", "-q"]
    for augment, want in ((None, "--protocol soft-kl --epochs 1 --label-mode fkd"),
                          ("none", "--protocol dc-protocol --epochs 1 --label-mode fkd"),
                          ("crop_flip", "--protocol soft-kl --set train.augment=crop_flip --set "
                                        "'train.augment_options={}' --epochs 1 --label-mode fkd")):
        store = tmp_path / f"{augment}.fkd"
        args = ["relabel", str(made / "r2"), "--teacher", str(made / "t"), "--epochs", "1", "--out", str(store), "-q"]
        code, out, _ = run_cli([*args, *(["--augment", augment] if augment else [])], capsys)
        assert code == 0 and want in out
        printed = _evaluate_printed(out)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main([*printed, *quick, "--out", str(tmp_path / f"{augment}.json")]) == 0
        assert not [r.getMessage() for r in caplog.records if "store" in r.getMessage()], augment


def test_relabel_refuses_a_broken_plugin_protocol_before_writing_its_store(made, tmp_path, monkeypatch, capsys):
    """QA 23b F1: relabel's printed evaluation looked protocols up without preset()'s check, so a plugin protocol that
    returns no ProtocolConfig crashed with a traceback after the store was written. It is refused in one line, as
    every protocol reader refuses it, before any labelling."""
    from ddkit.evaluate import PROTOCOLS

    monkeypatch.setattr(PROTOCOLS, "_entries", {**PROTOCOLS._entries})
    PROTOCOLS.add("broken", lambda: None)
    store = tmp_path / "s.fkd"
    code, out, err = run_cli(["relabel", str(made / "r2"), "--teacher", str(made / "t"), "--epochs", "1",
                              "--augment", "crop_flip", "--out", str(store), "-q"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: protocol 'broken': its function (") and err.count("\n") == 1
    assert "returned None (no `return`?), not a ProtocolConfig; make it `return ProtocolConfig(...)`" in err
    assert not store.exists() and list(tmp_path.iterdir()) == []


def test_a_sets_method_config_records_paths_as_its_config_does(made, tmp_path, monkeypatch, capsys):
    """F5: method.config (`ddkit show --json SET`'s resolved method config) held the experts and extra_teachers paths
    as given (relative to the folder the command ran in) where config.distill.options holds them absolute; and the
    on-the-fly expert recipe `buffer` that a given experts buffer replaced, as if it had been used."""
    monkeypatch.chdir(tmp_path)
    assert main(["experts", "--dataset", "synthetic", "--model", "tiny_convnet", "--num-experts", "1", "--epochs",
                 "2", "--out", "e", "-q"]) == 0
    assert main(["distill", "--dataset", "synthetic", "--method", "mtt", "--ipc", "1", "--set",
                 "distill.options.experts=e", "--set", "distill.options.iterations=2", "--set",
                 "distill.options.expert_epochs=1", "--out", "mtt", "-q"]) == 0
    m = json.loads((tmp_path / "mtt" / "manifest.json").read_text())
    assert m["method"]["config"]["experts"] == m["config"]["distill"]["options"]["experts"] == str(tmp_path / "e")
    assert m["method"]["config"]["buffer"] is None
    (tmp_path / "x").symlink_to(made / "t")
    assert main(["distill", "--dataset", "synthetic", "--method", "sre2l", "--ipc", "1", "--teacher", "x",
                 "--set", "distill.options.iterations=2", "--set", "distill.options.stats=conv",
                 "--set", "distill.options.extra_teachers=[x]",
                 "--out", "sre", "-q"]) == 0
    m = json.loads((tmp_path / "sre" / "manifest.json").read_text())
    assert m["method"]["config"]["extra_teachers"] == m["config"]["distill"]["options"]["extra_teachers"] == [
        str(tmp_path / "x")]
    capsys.readouterr()


def test_list_long_tells_presets_apart_and_says_full_takes_no_ipc(capsys):
    """F6: every ConvNet preset printed the family's line, every torchvision one a literal ``arch``; `full` said
    "IPC is ignored" while an ipc is refused."""
    code, out, _ = run_cli(["list", "models", "-l"], capsys)
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert code == 0 and "``arch``" not in out
    assert lines["convnet3-w32"].endswith("Preset: depth=3, width=32.")
    assert lines["tiny_convnet"].endswith("Preset: depth=2, width=8.")
    assert lines["tv_resnet18"].endswith("Preset: arch='resnet18'.")
    presets = [n for n in lines if n.startswith(("convnet", "tv_", "tiny_convnet"))]
    assert len({lines[n] for n in presets}) == len(presets)  # each its own line
    code, out, _ = run_cli(["list", "methods", "-l", "full"], capsys)
    assert "IPC is ignored" not in out and "It takes no ipc (an ipc given is refused)." in out


def test_distill_says_when_its_teacher_is_not_used(made, tmp_path, capsys, caplog):
    """F7: `distill --teacher DIR` with a method that reads no teacher and no --soft-labels ignored it silently;
    evaluate warns in the same case."""
    args = ["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--teacher", str(made / "t")]
    with caplog.at_level(logging.WARNING, logger="ddkit"):
        assert run_cli([*args, "--out", str(tmp_path / "a"), "-q"], capsys)[0] == 0
        warned = [r.getMessage() for r in caplog.records]
        caplog.clear()
        assert run_cli([*args, "--soft-labels", "--out", str(tmp_path / "b"), "-q"], capsys)[0] == 0
        assert not [r for r in caplog.records if "teacher" in r.getMessage()]
    assert warned == ["method 'random' reads no teacher: --teacher is not used (--soft-labels stores its logits on "
                      "the images)"]
    with caplog.at_level(logging.WARNING, logger="ddkit"):  # a teacher that is not there: the error alone (QA 23a)
        caplog.clear()
        code, _, err = run_cli([*args[:-1], str(tmp_path / "nope"), "--out", str(tmp_path / "c"), "-q"], capsys)
        assert code == 2 and err.count("\n") == 1 and "nope" in err and not caplog.records


def test_full_reference_off_over_a_config_with_full_epochs_names_a_command_line_fix():
    """F8: `ddkit bench configs/bench/smoke.yaml --set overrides.full_reference=false` (the README's quick setting) was
    refused with "drop it" for the file's full_epochs, which no --set can remove; the error names the --set of the
    protocol's own value, which is taken (and gives the protocol the hash of one without full_epochs)."""
    from ddkit.bench import load_bench_config
    from ddkit.evaluate import resolve_protocol

    smoke = ROOT / "configs" / "bench" / "smoke.yaml"
    with pytest.raises(ConfigError) as refused:
        load_bench_config(smoke, ["overrides.full_reference=false"])
    assert str(refused.value) == (
        "overrides.full_epochs=4 does nothing under full_reference false (only the full-data reference reads it); "
        "drop it (it would only give the protocol another hash; from the command line: --set "
        "overrides.full_epochs=20, the protocol's own) or set full_reference=true")
    cfg = load_bench_config(smoke, ["overrides.full_reference=false", "overrides.full_epochs=20"])
    alone = resolve_protocol("dc-protocol", {"full_reference": False, "student": "tiny_convnet",
                                             "train": {"epochs": 15, "batch_size": 32, "lr": 0.05}})
    assert cfg.protocol_for("tiny_convnet", "hard").hash == alone.hash
