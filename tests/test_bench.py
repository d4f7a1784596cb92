"""``ddkit bench``: the matrix runner (reuse, resume, atomic cells) and the DD-Ranking metrics."""

import dataclasses
import json
import math
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import ddkit
from conftest import REPO, cuda_settings_kept, fake_cuda, twice_at_once
from ddkit.bench import (
    BenchConfig,
    cells_of,
    load_bench_config,
    load_table,
    run_bench,
    shared_seconds,
    synthesis_seconds,
)
from ddkit.cli import main
from ddkit.config import from_dict
from ddkit.errors import ConfigError, DDKitError
from ddkit.evaluate import metrics
from ddkit.methods import METHODS
from ddkit.teacher import Teacher

TINY = {
    "datasets": ["synthetic"], "methods": ["random"], "ipcs": [1, 2], "students": ["tiny_convnet"],
    "label_modes": ["hard"], "seeds": [0, 1], "protocol": "dc-protocol",
    "overrides": {"full_epochs": 1, "train": {"epochs": 3, "batch_size": 32, "lr": 0.05}},
    "teacher": {"model": "tiny_convnet", "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}},
}


def tiny_cfg(out, **kw) -> BenchConfig:
    return from_dict(BenchConfig, {**TINY, **kw, "out": str(out), "device": "cpu"})


def assert_numbers_from_own_evaluations(out, row):
    """A row's acc and random are its own evaluation's (``eval_keys[0]``), hard_acc and full_hard the
    hard-label one's (``eval_keys[1]``): a row that took another cell's numbers reports them as its own."""
    own, hard = (json.loads((out / "evals" / f"{k}.json").read_text()) for k in row["eval_keys"][:2])
    assert own["eval_key"] == row["eval_keys"][0] and own["protocol_hash"] == row["protocol_hash"]
    assert row["acc"] == own["results"]["distilled"] and row["random"] == own["results"].get("random")
    assert row["hard_acc"] == hard["results"]["distilled"] and row["full_hard"] == hard["results"].get("full")


def strip(rows):
    """Rows without what legitimately differs between two run directories."""
    return [{k: v for k, v in r.items() if k not in ("distilled_path", "synthesis")} for r in rows]


# --- metrics against hand-computed values ---------------------------------------------------------

E, EM1 = math.e, math.exp(-1)


def test_ior_hlr_hand_values():
    assert metrics.ior(0.62, 0.50) == pytest.approx(0.12)
    assert metrics.hlr(0.90, 0.62) == pytest.approx(0.28)
    with pytest.raises(DDKitError, match="percentage"):
        metrics.ior(62.0, 50.0)


def test_lrs_hand_values():
    # alpha = 0.5*0.12 - 0.5*0.28 = -0.08
    assert metrics.lrs(0.12, 0.28) == pytest.approx((math.exp(-0.08) - EM1) / (E - EM1))
    assert metrics.lrs(0.0, 0.0) == pytest.approx((1 - EM1) / (E - EM1))  # 0.26894...
    assert metrics.lrs(0.0, 0.0) == pytest.approx(0.268941, abs=1e-6)
    assert metrics.lrs(1.0, -1.0) == pytest.approx(1.0)
    assert metrics.lrs(-1.0, 1.0) == pytest.approx(0.0)
    assert metrics.lrs(0.2, 0.1, lam=1.0) == pytest.approx((math.exp(0.2) - EM1) / (E - EM1))


def test_ars_hand_values():
    # beta = 0.5*0.10 + 0.5*0.04 = 0.07
    assert metrics.ars(0.10, 0.04) == pytest.approx((math.exp(0.07) - EM1) / (E - EM1))
    assert metrics.ars(0.10, 0.04, gamma=0.0) == pytest.approx((math.exp(0.04) - EM1) / (E - EM1))


@pytest.mark.parametrize("a", [0.0, 0.1, 0.5, 0.93, 1.0])
@pytest.mark.parametrize("b", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("c", [0.0, 0.8, 1.0])
def test_scores_in_unit_interval_for_fractions(a, b, c):
    lrs = metrics.lrs(metrics.ior(a, b), metrics.hlr(c, a))
    ars = metrics.ars(a - b, c - b)
    assert 0.0 <= lrs <= 1.0 and 0.0 <= ars <= 1.0


def test_percentages_break_the_score():
    with pytest.raises(DDKitError, match=r"\[-1, 1\]"):
        metrics.normalized_exp(12.0)


def test_mean_std():
    s = metrics.mean_std([0.5, 0.7])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1) and s["n"] == 2


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "bench").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_bench_configs_validate(path):
    cfg = load_bench_config(path)
    assert cells_of(cfg)


def test_bench_refuses_datasets_and_methods_whose_cells_share_a_name():
    """Dataset 'fashion' with method 'mnist-random' and dataset 'fashion-mnist' with method 'random' would share
    every cell file and set folder (fashion-mnist-random-ipc...): refused at load, naming both pairs and the fix."""
    from ddkit.data import DATASETS

    DATASETS.add("fashion", DATASETS.get("synthetic"))
    try:
        with pytest.raises(ConfigError, match=r"^dataset 'fashion-mnist' with method 'random' and dataset 'fashion' "
                                              r"with method 'mnist-random' would file their cells and sets under one "
                                              r"name \(fashion-mnist-random-ipc...\); give one of the methods a label"):
            from_dict(BenchConfig, {"datasets": ["fashion-mnist", "fashion"], "ipcs": [1],
                                    "methods": ["random", {"name": "random", "label": "mnist-random"}]})
        cfg = from_dict(BenchConfig, {"datasets": ["fashion-mnist", "fashion"], "ipcs": [1],
                                      "methods": ["random", {"name": "random", "label": "mnist_random"}]})
        assert len({c.id for c in cells_of(cfg)}) == len(cells_of(cfg)) == 4
    finally:
        DATASETS._entries.pop("fashion")
        DATASETS.declared.pop("fashion", None)


def test_bench_config_base_states_only_what_differs(tmp_path):
    shipped = REPO / "configs" / "bench" / "fashion-mnist-decoupled-cpu.yaml"
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {shipped}\nipcs: [10]\nipc_overrides: {{10: {{train: {{epochs: 80}}}}}}\nmethod_ipcs: "
                     "{}\nmethods: [random, rded]\nout: elsewhere\n")
    base, cfg = load_bench_config(shipped), load_bench_config(child, ["seeds=[4]"])
    assert cfg.ipcs == [10] and [m.key for m in cfg.methods] == ["random", "rded"] and cfg.seeds == [4]
    assert cfg.teacher == base.teacher and cfg.teacher_pool == base.teacher_pool and cfg.students == base.students
    assert (cfg.protocol_for("resnet18_cifar", "teacher", ipc=10).hash
            == base.protocol_for("resnet18_cifar", "teacher", ipc=10).hash)
    child.write_text(f"base: {shipped}\nmethods: [random]\n")  # the base's method_ipcs name methods this file dropped
    with pytest.raises(ConfigError, match="method_ipcs names 'edc-A'"):
        load_bench_config(child)


def test_set_changes_one_setting_of_an_ipc_override(tmp_path):
    """`--set ipc_overrides.10.train.epochs=2` looked up the text key "10", missed the YAML's `10:` and made a
    second entry that replaced it whole: the s05 bench then evaluated with the default scale_min 0.08, not 0.5.
    It merges into the entry, as the same edit to the file does."""
    shipped = REPO / "configs" / "bench" / "fashion-mnist-softkl-s05-cpu.yaml"
    cfg = load_bench_config(shipped, ["ipc_overrides.10.train.epochs=2"])
    assert cfg.ipc_overrides == {10: {"train": {"epochs": 2, "augment_options": {"scale_min": 0.5}}}}
    protocol = cfg.protocol_for(cfg.students[0], cfg.label_modes[0], ipc=10)
    assert (protocol.train.epochs, protocol.train.augment_options) == (2, {"scale_min": 0.5})
    edited = tmp_path / "edited.yaml"
    edited.write_text(shipped.read_text().replace("epochs: 80", "epochs: 2")
                      .replace("base: fashion-mnist", f"base: {shipped.parent}/fashion-mnist"))
    assert (protocol.hash == load_bench_config(edited).protocol_for(cfg.students[0], cfg.label_modes[0], ipc=10).hash
            != load_bench_config(shipped).protocol_for(cfg.students[0], cfg.label_modes[0], ipc=10).hash)
    # a whole entry given merges into the entry key by key too (the file's other settings stay); an IPC with
    # none yet gets one
    cfg = load_bench_config(shipped, ["ipcs=[10, 20]", "ipc_overrides.10={train: {epochs: 3}}",
                                      "ipc_overrides.20.train.epochs=4"])
    assert cfg.ipc_overrides == {10: {"train": {"epochs": 3, "augment_options": {"scale_min": 0.5}}},
                                 20: {"train": {"epochs": 4}}}


def test_fashion_mnist_config_matrix():
    cfg = load_bench_config(REPO / "configs" / "bench" / "fashion-mnist-random.yaml")
    assert [c.id for c in cells_of(cfg)][:2] == ["fashion-mnist-random-ipc1-convnet3-hard",
                                                 "fashion-mnist-random-ipc1-convnet3-teacher"]
    assert len(cells_of(cfg)) == 6 and cfg.seeds == [0, 1, 2] and cfg.needs_teacher()


def test_config_errors_all_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        tiny_cfg(tmp_path, ipcs=[], label_modes=["soft"], methods=["random", "random"])
    msg = str(err.value)
    assert "ipcs is empty" in msg and "unknown label mode" in msg and "distinct label" in msg
    with pytest.raises(ConfigError, match="did you mean"):
        tiny_cfg(tmp_path, method=["random"])



CELL = "protocol 'dc-protocol' for student 'tiny_convnet', IPC 2, label mode 'hard': "


@pytest.mark.parametrize(("sets", "message"), [
    # a student or label mode in overrides was recorded (and stated in the report) while every cell used its own
    (["overrides.student=tiny_mlp", "overrides.label_mode=teacher"],
     "overrides.student is not used: each cell's student comes from students; list it there instead; "
     "overrides.label_mode is not used: each cell's label mode comes from label_modes; list it there instead"),
    (["ipc_overrides.2.student=tiny_mlp"], "ipc_overrides.2.student is not used: each cell's student comes from "
     "students; list it there instead (student_ipcs limits a student to some IPCs)"),
    (["ipc_overrides.2.label_mode=teacher"], "ipc_overrides.2.label_mode is not used: each cell's label mode comes "
     "from label_modes; list it there instead"),
    # a bad value of an IPC's entry was named overrides.…, where the file holds a valid one
    (["ipc_overrides.2.train.epochs=3.0"], CELL + "ipc_overrides.2.train.epochs: expected an integer, got 3.0"),
    (["ipc_overrides.2.trian.epochs=3"], CELL + "unknown config key 'ipc_overrides.2.trian'; did you mean 'train'?"),
    (["overrides.train.batch_size=0.5", "ipc_overrides.2.train.epochs=4"],  # overrides' own stay named so
     "protocol 'dc-protocol' for student 'tiny_convnet', IPC 1, label mode 'hard': overrides.train.batch_size: "
     "expected an integer, got 0.5"),
])
def test_overrides_errors_name_the_key_given(tmp_path, capsys, sets, message):
    import yaml

    cfg, out = tmp_path / "b.yaml", tmp_path / "b"
    cfg.write_text(yaml.safe_dump({**TINY, "seeds": [0], "out": str(out)}))
    code = main(["bench", str(cfg), "--device", "cpu", "-q", *[a for s in sets for a in ("--set", s)]])
    assert (code, capsys.readouterr().err) == (2, f"error: {message}\n")
    assert not out.exists()


REPLACED_STORE = ("is not used: a bench makes one FKD store per distilled set from its relabel section; remove it (to "
                  "replay a given store, evaluate its set with `ddkit evaluate SET --teacher T --label-mode fkd --set "
                  "fkd_store=DIR`)")


@pytest.mark.parametrize(("sets", "message"), [
    # the full set has no ipc: the bench made the sets before it, then stopped with advice for a run ("remove ipc");
    # at the default ipc (10) it is made once and filed there (QA 21a F1: that ran, and still does)
    (["methods=[random,full]"], "method 'full' (full) keeps every training image: a bench makes its one set at ipc 10 "
     "alone (its rows are filed there), not at ipcs [1, 2]; limit it with method_ipcs: {full: [10]} (10 among ipcs), "
     "or remove it from methods: every cell trains the full-data reference behind its HLR (full_hard) already, set by "
     "the protocol's full_reference / full_epochs (e.g. overrides: {full_epochs: 20})"),
    # a plugin method without an ipc (registered by the test) likewise, with advice for its own set
    (["methods=[random,budget]", "ipcs=[2,10]"], "method 'budget' (budget) makes no ipc images per class (uses_ipc = "
     "False): a bench makes its one set at ipc 10 alone (its rows are filed there), not at ipcs [2]; limit it with "
     "method_ipcs: {budget: [10]} (10 among ipcs), or remove it from methods and make its set with `ddkit run` or "
     "`ddkit distill`"),
    # every fkd cell replayed the given store, while the bench relabelled its sets and recorded its relabel section
    (["label_modes=[fkd]", "overrides.fkd_store=elsewhere"], "overrides.fkd_store " + REPLACED_STORE),
    (["label_modes=[fkd]", "ipc_overrides.2.fkd_store=elsewhere"], "ipc_overrides.2.fkd_store " + REPLACED_STORE),
    # a listed student's options replaced the overrides' wholesale, which the config and report still stated; the
    # students that do read them are named (QA 21a F3)
    (["student_options.tiny_convnet.width=8", "overrides.student_options.width=4"],
     "overrides.student_options is not used by ['tiny_convnet'], whose options come from student_options alone; give "
     "them there: student_options: {tiny_convnet: {...}}"),
    (["students=[tiny_convnet,tiny_mlp]", "student_options.tiny_convnet.width=8",
      "ipc_overrides.2.student_options.width=16"],
     "ipc_overrides.2.student_options is not used by ['tiny_convnet'], whose options come from student_options alone "
     "(the same at every IPC); give them there: student_options: {tiny_convnet: {...}, tiny_mlp: {...}} (tiny_mlp "
     "read it now: list them there too)"),
])
def test_settings_a_bench_would_replace_are_refused_before_any_output(tmp_path, capsys, monkeypatch, sets, message):
    """Each of these ran (part of) the bench and recorded a setting that no cell used: refused in one line when the
    config loads, before the teacher, any set or the output folder."""
    import yaml

    from ddkit.config import Checked
    from ddkit.methods import Method

    @dataclasses.dataclass
    class NoOptions(Checked):
        pass

    class Budget(Method):  # a plugin's method that makes a set without an ipc (a fixed image budget)
        Config = NoOptions
        uses_ipc = False

        def fit(self, real, teachers, ctx):
            raise AssertionError("a refused bench makes no set")

    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))  # the registration is undone after the test
    METHODS.register("budget")(Budget)
    cfg, out = tmp_path / "b.yaml", tmp_path / "b"
    cfg.write_text(yaml.safe_dump({**TINY, "seeds": [0], "out": str(out)}))
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_bench_config(cfg, sets)
    code = main(["bench", str(cfg), "--device", "cpu", "-q", *[a for s in sets for a in ("--set", s)]])
    assert (code, capsys.readouterr().err) == (2, f"error: {message}\n")
    assert not out.exists()


def test_full_in_a_bench_makes_its_one_set_at_the_default_ipc(tmp_path):
    """QA 21a F1: a bench with `full` limited to IPC 10 (the IPC DistillConfig takes for a set without one) ran before
    `full` was refused in benches; it runs again, its rows filed at IPC 10, in every label mode, with the whole
    training split as its set."""
    out = tmp_path / "b"
    rows = run_bench(tiny_cfg(out, methods=["random", "full"], ipcs=[2, 10], method_ipcs={"full": [10]},
                              label_modes=["hard", "teacher"], seeds=[0]))
    full = [r for r in rows if r["method"] == "full"]
    assert sorted((r["ipc"], r["label_mode"]) for r in full) == [(10, "hard"), (10, "teacher")]
    manifest = json.loads((Path(full[0]["distilled_path"]) / "manifest.json").read_text())
    assert manifest["num_images"] == 96 and manifest["ipc"] is None  # synthetic's whole training split
    assert all(0 <= r["acc"]["mean"] <= 1 for r in full)


def test_student_options_apply_where_no_listed_student_replaces_them(tmp_path):
    """The overrides' student_options still apply to a student not listed in student_options, and an IPC's to a
    listed student that does not train at that IPC; a listed student has its own options at every IPC. What a cell's
    protocol says is what its students are built with (``check_students`` builds them from it)."""
    cfg = tiny_cfg(tmp_path, students=["tiny_convnet", "tiny_mlp"], ipcs=[1, 2],
                   student_options={"tiny_convnet": {"width": 8}}, student_ipcs={"tiny_convnet": [1]},
                   ipc_overrides={2: {"student_options": {"hidden": 16}}})
    assert [cfg.protocol_for("tiny_convnet", "hard", ipc=1).student_options,
            cfg.protocol_for("tiny_mlp", "hard", ipc=1).student_options,
            cfg.protocol_for("tiny_mlp", "hard", ipc=2).student_options] == [{"width": 8}, {}, {"hidden": 16}]

# --- the runner -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "full"
    seen = []
    rows = run_bench(tiny_cfg(out, label_modes=["hard", "teacher"]),
                     progress=lambda d, n, r: seen.append((d, n, r["reused"])))
    return out, rows, seen


def test_tiny_matrix_end_to_end(full_run):
    out, rows, seen = full_run
    assert seen == [(1, 4, False), (2, 4, False), (3, 4, False), (4, 4, False)]
    assert [r["cell"] for r in rows] == ["synthetic-random-ipc1-tiny_convnet-hard",
                                         "synthetic-random-ipc1-tiny_convnet-teacher",
                                         "synthetic-random-ipc2-tiny_convnet-hard",
                                         "synthetic-random-ipc2-tiny_convnet-teacher"]
    for r in rows:
        assert r["acc"]["n"] == 2
        assert_numbers_from_own_evaluations(out, r)
        assert r["ior"]["mean"] == pytest.approx(r["acc"]["mean"] - r["random"]["mean"])
        assert r["hlr"]["mean"] == pytest.approx(r["full_hard"]["mean"] - r["hard_acc"]["mean"])
        assert 0 <= r["lrs"]["mean"] <= 1 and r["ars"] is None
        assert r["protocol_hash"] and r["versions"]["torch"] and r["synthesis"]["wall_seconds"] >= 0
        assert r["bytes"]["images"] == 4 * r["ipc"] * 256
        assert r["teacher_sha"] == Teacher.load(out / "teachers" / "synthetic").fingerprint
        assert r["torch_threads"] == torch.get_num_threads()
    hard, teacher = rows[0], rows[1]
    # HLR of the teacher cell reuses the hard cell's evaluation
    assert teacher["hard_acc"] == hard["acc"] and teacher["eval_keys"][1] == hard["eval_keys"][0]
    # ... and its acc is its own soft-label students', not the hard cell's
    assert teacher["acc"]["per_seed"] != hard["acc"]["per_seed"]
    assert teacher["protocol_hash"] != hard["protocol_hash"] == teacher["hard_protocol_hash"]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and "teachers" not in p.parts
                   and p.parent.name not in ("synthetic-random-ipc1", "synthetic-random-ipc2"))
    assert files[:3] == ["bench.json", "cells/synthetic-random-ipc1-tiny_convnet-hard.json",
                         "cells/synthetic-random-ipc1-tiny_convnet-teacher.json"]
    assert "distilled/synthetic-random-ipc1.synthesis.json" in files
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp files left
    table = json.loads((out / "bench.json").read_text())
    assert table["kind"] == "bench-table" and table["rows"] == rows


def test_second_run_reuses_everything(full_run, monkeypatch):
    import ddkit.bench as bench

    out, rows, _ = full_run
    monkeypatch.setattr(bench, "evaluate", lambda *a, **k: pytest.fail("a finished cell was recomputed"))
    monkeypatch.setattr(bench, "distill", lambda *a, **k: pytest.fail("a distilled set was recomputed"))
    monkeypatch.setattr(bench, "train_teacher", lambda *a, **k: pytest.fail("the teacher was retrained"))
    seen = []
    again = run_bench(tiny_cfg(out, label_modes=["hard", "teacher"]), progress=lambda d, n, r: seen.append(r["reused"]))
    assert seen == [True] * 4 and again == rows


def test_label_modes_that_need_a_teacher_or_not_keep_teacher_free_sets(tmp_path, monkeypatch):
    """A bench trains a teacher only for label modes (or methods) that need one, and the teacher was part of every
    set's identity: adding a teacher column to a hard-label bench, or narrowing it back to hard labels, synthesised
    every dm set again (same images). Sets of methods that read no teacher are now kept, and so are the hard-label
    evaluations (whose keys never named the teacher)."""
    import ddkit.bench as bench

    dm = {"name": "dm", "options": {"iterations": 2, "model": "tiny_convnet", "batch_real": 8}}
    hard = run_bench(tiny_cfg(tmp_path, methods=[dm], ipcs=[1]))
    record = (tmp_path / "distilled/synthetic-dm-ipc1.synthesis.json").read_text()
    images = (tmp_path / "distilled/synthetic-dm-ipc1/images.safetensors").read_bytes()
    monkeypatch.setattr(bench, "distill", lambda *a, **k: pytest.fail("the dm set was synthesised again"))
    both = run_bench(tiny_cfg(tmp_path, methods=[dm], ipcs=[1], label_modes=["hard", "teacher"]))
    trained = []
    monkeypatch.setattr(bench, "evaluate", lambda *a, **k: trained.append(a) or pytest.fail("evaluated again"))
    again = run_bench(tiny_cfg(tmp_path, methods=[dm], ipcs=[1]))
    assert trained == [] and [r["acc"] for r in again] == [r["acc"] for r in hard] == [both[0]["acc"]]
    assert (tmp_path / "distilled/synthetic-dm-ipc1.synthesis.json").read_text() == record
    assert (tmp_path / "distilled/synthetic-dm-ipc1/images.safetensors").read_bytes() == images


def test_method_revision_remakes_only_its_sets(full_run, tmp_path, monkeypatch):
    """Bumping a method's ``revision`` (a changed default) remakes its sets and cells, not the teacher."""
    import shutil

    import ddkit.bench as bench
    from ddkit.methods import METHODS

    src, rows, _ = full_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    made = []
    real_distill = bench.distill
    monkeypatch.setattr(bench, "distill", lambda *a, **k: made.append(a[1].ipc) or real_distill(*a, **k))
    monkeypatch.setattr(bench, "train_teacher", lambda *a, **k: pytest.fail("the teacher was retrained"))
    monkeypatch.setattr(METHODS.get("random"), "revision", 1)
    seen = []
    again = run_bench(tiny_cfg(out, label_modes=["hard", "teacher"]), progress=lambda d, n, r: seen.append(r["reused"]))
    assert made == [1, 2] and seen == [False] * 4
    assert [r["eval_keys"] for r in again] != [r["eval_keys"] for r in rows]
    # each row names the revision that made its set, in the cell files and the table alike
    assert [r["method_revision"] for r in rows] == [0] * 4 and [r["method_revision"] for r in again] == [1] * 4
    assert [json.loads(p.read_text())["method_revision"] for p in sorted((out / "cells").glob("*.json"))] == [1] * 4
    assert [r["method_revision"] for r in json.loads((out / "bench.json").read_text())["rows"]] == [1] * 4
    # same seed, same algorithm: the remade sets hold the same images, so accuracies are unchanged
    assert [r["acc"] for r in again] == [r["acc"] for r in rows]


def test_rows_of_cells_and_tables_made_before_method_revisions_were_recorded(full_run, tmp_path, monkeypatch):
    """Cells finished before rows recorded ``method_revision`` are reused, their rows in the table given the revision
    their key holds (the set's, as of the method's class); a table assembled before loads and renders as it did."""
    import ddkit.bench as bench
    from ddkit.bench import format_bench_table

    src, rows, _ = full_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    monkeypatch.setattr(METHODS.get("random"), "revision", 3)  # the revision of every set, made again, and cell
    made = run_bench(tiny_cfg(out, label_modes=["hard", "teacher"]))
    assert [r["method_revision"] for r in made] == [METHODS.get("random").revision] * 4 == [3] * 4
    for path in [*(out / "cells").glob("*.json"), out / "bench.json"]:  # as ddkit wrote them before
        record = json.loads(path.read_text())
        for r in record.get("rows", [record]):
            del r["method_revision"]
        path.write_text(json.dumps(record))
    old = load_table(out)["rows"]
    assert all("method_revision" not in r for r in old) and format_bench_table(old) == format_bench_table(made)
    monkeypatch.setattr(bench, "evaluate", lambda *a, **k: pytest.fail("a finished cell was recomputed"))
    again = run_bench(tiny_cfg(out, label_modes=["hard", "teacher"]))
    assert again == made
    assert [r["method_revision"] for r in json.loads((out / "bench.json").read_text())["rows"]] == [3] * 4


def test_resume_after_interrupt_gives_same_table(full_run, tmp_path):
    _, rows, _ = full_run
    out = tmp_path / "resumed"

    def stop_after_two(done, total, row):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(tiny_cfg(out, label_modes=["hard", "teacher"]), progress=stop_after_two)
    assert len(list((out / "cells").glob("*.json"))) == 2 and not (out / "bench.json").exists()
    seen = []
    resumed = run_bench(tiny_cfg(out, label_modes=["hard", "teacher"]),
                        progress=lambda d, n, r: seen.append(r["reused"]))
    assert seen == [True, True, False, False]
    diff = [(k, a[k], b[k]) for a, b in zip(resumed, rows) for k in a
            if a[k] != b[k] and k not in ("distilled_path", "synthesis")]
    assert not diff
    assert strip(resumed) == strip(rows)


def test_a_bench_stopped_after_a_config_change_leaves_no_earlier_table(tmp_path, monkeypatch):
    """A finished bench re-run with other method options and stopped before its cells kept the earlier
    run's bench.json: `ddkit report` published that table with the new run's distilled-set grids."""
    import ddkit.bench as bench
    from ddkit.report import write_report

    out = tmp_path / "b"
    options = {"methods": [{"name": "dm", "options": {**METHODS.get("dm").smoke_options, "iterations": 1}}],
               "ipcs": [1], "seeds": [0],
               "overrides": {"full_reference": False, "random_baseline": False, "train": {"epochs": 1}}}
    run_bench(tiny_cfg(out, **options))
    assert (out / "bench.json").is_file()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "evaluate", interrupted)
    options["methods"][0]["options"]["iterations"] = 2
    with pytest.raises(KeyboardInterrupt):
        run_bench(tiny_cfg(out, **options))
    assert json.loads(
        (out / "distilled/synthetic-dm-ipc1/manifest.json").read_text())["method"]["config"]["iterations"] == 2
    assert not (out / "bench.json").exists()
    with pytest.raises(DDKitError, match="bench.json' not found"):
        write_report(out)


def test_a_second_bench_in_the_same_folder_refuses_at_once(tmp_path):
    """Two `ddkit bench` in one folder: nothing locked it, both finished, and the last one's bench.json held a cell
    made with the other bench's teacher (17.7 points off). A second bench now refuses at once, naming the bench's
    out (not one of its internal folders), while the first trains its teacher, and writes nothing there."""
    from ddkit.artifacts import OutputBusy

    out, settings = tmp_path / "b", {"ipcs": [1], "label_modes": ["hard", "teacher"]}
    seen = {}

    def listing() -> list[str]:
        return sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    def stage(step, total, record):  # the first bench is training its teacher
        if seen or not record["stage"].startswith("teacher"):
            return
        seen["before"] = listing()
        with pytest.raises(OutputBusy) as info:  # another teacher, which it would have written over the first's
            run_bench(tiny_cfg(out, **settings,
                               teacher={**TINY["teacher"], "train": {**TINY["teacher"]["train"], "epochs": 2}}))
        seen["busy"], seen["after"] = str(info.value), listing()

    rows = run_bench(tiny_cfg(out, **settings), stage_progress=stage)
    assert seen["busy"] == (f"another ddkit call (in this process or another) is writing {str(out)!r}; wait for it "
                            "or choose another --out")
    assert seen["after"] == seen["before"]
    teacher = Teacher.load(out / "teachers" / "synthetic")
    assert teacher.manifest["config"]["train"]["epochs"] == 1
    assert [r["teacher_sha"] for r in rows] == [teacher.fingerprint] * 2


def test_a_bench_publishes_only_cells_of_its_own_settings(tmp_path):
    """The table was read back from the cell files without checking their key: a cell that another process (a
    bench with another teacher) wrote there meanwhile was published as this bench's. It is now an error naming the
    cell, no table is written, and a re-run makes that cell again with this bench's settings."""
    out = tmp_path / "b"
    first = out / "cells" / f"{cells_of(tiny_cfg(out))[0].id}.json"
    theirs = {}

    def cell_done(done, total, row):
        if done == total:  # the other process writes this bench's first cell, with its own key and numbers
            theirs.update(json.loads(first.read_text()), key="0" * 16, acc={"mean": 0.0, "std": 0.0, "n": 2,
                                                                           "per_seed": [0.0, 0.0]})
            first.write_text(json.dumps(theirs))

    with pytest.raises(DDKitError) as info:
        run_bench(tiny_cfg(out), progress=cell_done)
    assert str(info.value) == (f"bench cell {str(first)!r} was written with other settings than this bench's (its "
                               "key differs) by another process while this bench ran; run one bench at a time in "
                               f"{str(out)!r}, and this one again")
    assert not (out / "bench.json").exists()
    seen = []
    rows = run_bench(tiny_cfg(out), progress=lambda d, n, r: seen.append(r["reused"]))
    assert seen == [False, True] and rows[0]["key"] != theirs["key"] and rows[0]["acc"] != theirs["acc"]
    assert json.loads((out / "bench.json").read_text())["rows"][0]["key"] == rows[0]["key"]


def test_a_resumed_synthesis_is_marked(tmp_path):
    """A set whose synthesis resumed from an interrupted run's checkpoints is timed from the resume: its
    record and table cells say so (the time used to read as the whole synthesis')."""
    from ddkit.bench import _distill_stage, synthesis_cell
    from ddkit.data.base import DatasetConfig, make_synthetic
    from ddkit.methods import METHODS
    from ddkit.pipeline import DistillConfig, work_dir

    data, dcfg = make_synthetic(), DatasetConfig(name="synthetic")
    cfg = DistillConfig(method="dm", ipc=2, options=dict(METHODS.get("dm").smoke_options))
    (tmp_path / "distilled").mkdir()
    ddir, calls = tmp_path / "distilled" / "set", []

    def kill(label, done, total):
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _distill_stage(data, dcfg, cfg, ddir, None, "cpu", kill)
    assert any(work_dir(ddir).iterdir()) and not ddir.exists()
    resumed = _distill_stage(data, dcfg, cfg, ddir, None, "cpu")
    fresh = _distill_stage(data, dcfg, cfg, tmp_path / "distilled" / "fresh", None, "cpu")
    assert resumed["resumed"] is True and fresh["resumed"] is False and not work_dir(ddir).exists()
    assert synthesis_cell({"synthesis": resumed}) == f"{resumed['seconds']:.2f} (resumed)"
    assert synthesis_cell({"synthesis": fresh}, 1) == f"{fresh['seconds']:.1f}"
    assert json.loads((tmp_path / "distilled" / "set.synthesis.json").read_text())["resumed"] is True


def test_a_damaged_set_or_cached_evaluation_is_made_again(tmp_path, caplog):
    """A set whose images file was truncated was reused and failed at its first evaluation ("is corrupt;
    re-create it"); a broken cached evaluation stopped the bench. Both are made again, with a warning."""
    from ddkit.bench import _Bench, _distill_stage
    from ddkit.data.base import DatasetConfig, make_synthetic
    from ddkit.pipeline import DistillConfig

    data, dcfg = make_synthetic(), DatasetConfig(name="synthetic")
    cfg = DistillConfig(method="random", ipc=2)
    (tmp_path / "distilled").mkdir()
    ddir = tmp_path / "distilled" / "set"
    _distill_stage(data, dcfg, cfg, ddir, None, "cpu")
    whole = (ddir / "images.safetensors").read_bytes()
    (ddir / "images.safetensors").write_bytes(whole[:50])
    with caplog.at_level("WARNING"):
        _distill_stage(data, dcfg, cfg, ddir, None, "cpu")
    assert "distilling again" in caplog.text and (ddir / "images.safetensors").read_bytes() == whole
    broken = tmp_path / "eval.json"
    broken.write_text("{not json")
    with caplog.at_level("WARNING"):
        assert _Bench._cached_eval(broken) is None
    assert "evaluating again" in caplog.text


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_set_killed_around_its_save_is_not_made_again(tmp_path, monkeypatch, when):
    """A kill between saving a set and writing its synthesis record made the next run distil the set
    again. The record is now written first: killed after the save, the set is reused (and the
    checkpoints the kill left are removed); killed before it, the set is made again from them and the
    record of the finished synthesis keeps its timing."""
    import ddkit.bench as bench
    from ddkit.bench import _distill_stage
    from ddkit.data.base import DatasetConfig, make_synthetic
    from ddkit.distilled import DistilledSet
    from ddkit.methods import METHODS
    from ddkit.pipeline import DistillConfig, work_dir

    data, dcfg = make_synthetic(), DatasetConfig(name="synthetic")
    cfg = DistillConfig(method="dm", ipc=2, options=dict(METHODS.get("dm").smoke_options))
    (tmp_path / "distilled").mkdir()
    ddir, real_save = tmp_path / "distilled" / "set", DistilledSet.save

    def killed(self, path, *args, **kwargs):
        if when == "after":
            real_save(self, path, *args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(DistilledSet, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            _distill_stage(data, dcfg, cfg, ddir, None, "cpu")
    first = json.loads((tmp_path / "distilled" / "set.synthesis.json").read_text())
    assert first["resumed"] is False and first["seconds"] > 0 and work_dir(ddir).is_dir()
    assert (ddir / "manifest.json").is_file() == (when == "after")
    made = []
    real_distill = bench.distill
    monkeypatch.setattr(bench, "distill", lambda *a, **k: made.append(1) or real_distill(*a, **k))
    again = _distill_stage(data, dcfg, cfg, ddir, None, "cpu")
    assert made == ([1] if when == "before" else []) and again == first
    assert (ddir / "manifest.json").is_file() and not work_dir(ddir).exists()
    fresh = _distill_stage(data, dcfg, cfg, tmp_path / "distilled" / "fresh", None, "cpu")
    images = [DistilledSet.load(d).images for d in (ddir, tmp_path / "distilled" / "fresh")]
    assert torch.equal(*images) and fresh["bytes"] == first["bytes"]


def test_killed_cell_leaves_no_corrupt_files(full_run, tmp_path, monkeypatch):
    import ddkit.bench as bench

    out = tmp_path / "killed"
    real = bench.evaluate
    calls = []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second cell dies mid-evaluation
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(bench, "evaluate", dying)
    with pytest.raises(KeyboardInterrupt):
        run_bench(tiny_cfg(out), progress=None)
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert cells == ["synthetic-random-ipc1-tiny_convnet-hard.json"]  # only the finished cell, no temp file
    for p in out.rglob("*.json"):
        json.loads(p.read_text())
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]
    # a stale (wrong-key) or corrupt cell file is recomputed, not trusted
    (out / "cells" / "synthetic-random-ipc1-tiny_convnet-hard.json").write_text("{not json")
    monkeypatch.setattr(bench, "evaluate", real)
    rows = run_bench(tiny_cfg(out))
    assert ([r["cell"] for r in rows]
            == ["synthetic-random-ipc1-tiny_convnet-hard", "synthetic-random-ipc2-tiny_convnet-hard"])


def test_robust_scores_and_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    cfg = tmp_path / "b.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({**TINY, "ipcs": [1], "seeds": [0], "robust_scores": True, "out": str(out)}))
    code = main(["bench", str(cfg), "--device", "cpu", "-q"])
    captured = capsys.readouterr().out
    assert code == 0 and "synthetic" in captured and "ARS" in captured
    row = json.loads((out / "bench.json").read_text())["rows"][0]
    assert 0 <= row["ars"]["mean"] <= 1 and set(row["ars_protocol_hashes"]) == {"with_aug", "without_aug"}
    assert row["ars"]["mean"] == pytest.approx(metrics.ars(row["aug_gap"]["mean"], row["noaug_gap"]["mean"]))
    for name in ("aug", "noaug"):  # each gap is its accuracies' difference, per seed
        gaps = [a - r for a, r in zip(row[f"{name}_acc"]["per_seed"], row[f"{name}_random"]["per_seed"])]
        assert row[f"{name}_gap"]["per_seed"] == pytest.approx(gaps)
    # the protocol has no augmentation: the row's accuracy is the one without; the other trains with DSA
    hashes = row["ars_protocol_hashes"]
    assert row["noaug_acc"] == row["acc"] and hashes["without_aug"] == row["protocol_hash"] != hashes["with_aug"]
    assert main(["bench", str(tmp_path / "missing.yaml")]) == 2


def test_scores_of_students_that_diverged_are_left_out(tmp_path, capsys):
    """Students that diverge (NaN/inf outputs, counted as wrong) score 0.00 "(N diverged)": IOR, HLR, LRS and ARS
    computed from those zeros used to be printed and published as ordinary numbers (HLR 0.00, LRS 0.269). They
    are left out now (null, –), also where a cell made before is reused; the table's columns stay aligned."""
    import yaml

    out, cfg = tmp_path / "b", tmp_path / "b.yaml"
    over = {"full_epochs": 1, "train": {"epochs": 1, "batch_size": 32, "lr": 1e20}}
    cfg.write_text(yaml.safe_dump({**TINY, "ipcs": [1], "seeds": [0], "students": ["tiny_mlp"], "overrides": over,
                                   "robust_scores": True, "out": str(out)}))
    assert main(["bench", str(cfg), "--device", "cpu", "-q"]) == 0
    printed = capsys.readouterr().out
    row = json.loads((out / "bench.json").read_text())["rows"][0]
    assert row["acc"]["diverged"] == row["full_hard"]["diverged"] == 1
    for score, inputs in metrics.SCORE_INPUTS.items():  # left out exactly where a student behind it diverged
        assert (row[score] is None) == any(row[k].get("diverged") for k in inputs), score
    assert row["ior"] is row["hlr"] is row["lrs"] is row["ars"] is None
    lines = printed.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("dataset "))
    table = lines[head : head + 3]
    assert f" {100 * row['acc']['mean']:.2f} (1 diverged) " in table[2] and "±" not in table[2]  # one seed: no spread
    assert "       –       –      –      – " in table[2]
    assert len({len(line) for line in table}) == 1 and table[0].index("IOR") == table[2].index("–") + 1 - len("IOR")
    # a cell made before scored them: its scores are left out of the table all the same
    cell = next((out / "cells").glob("*.json"))
    made = json.loads(cell.read_text())
    cell.write_text(json.dumps({**made, "ior": metrics.mean_std([0.0]), "hlr": metrics.mean_std([0.0]),
                                "lrs": metrics.mean_std([metrics.lrs(0.0, 0.0)])}))
    assert main(["bench", str(cfg), "--device", "cpu", "-q"]) == 0
    assert json.loads((out / "bench.json").read_text())["rows"][0] == row
    assert json.loads(cell.read_text())["ior"] is not None  # reused, not made again
    capsys.readouterr()
    assert main(["show", str(out)]) == 0 and "(1 diverged)" in capsys.readouterr().out
    assert main(["report", str(out), "--out", str(tmp_path / "rep"), "-q"]) == 0
    # shown and reported from files made before: the reused cell, and a table that kept the scores
    assert main(["show", str(cell)]) == 0 and "       –       –      –      – " in capsys.readouterr().out
    table, scored = json.loads((out / "bench.json").read_text()), json.loads(cell.read_text())
    old_row = {**row, **{k: scored[k] for k in ("ior", "hlr", "lrs")}}
    (out / "bench.json").write_text(json.dumps({**table, "rows": [old_row]}))
    assert main(["show", str(out)]) == 0 and "       –       –      –      – " in capsys.readouterr().out
    assert load_table(out)["rows"][0]["ior"] is None
    assert main(["report", str(out), "--out", str(tmp_path / "rep2"), "-q"]) == 0
    assert (tmp_path / "rep2/report.md").read_text() == (tmp_path / "rep/report.md").read_text()


def test_robust_score_protocols_are_with_and_without_augmentation(tmp_path):
    """ARS's "without augmentation" run drops the preset's augmentation options and CutMix (CV-DD's
    protocol has both); its "with" run keeps the preset's own augmentation as it is."""
    cfg = tiny_cfg(tmp_path / "b", protocol="cvdd", label_modes=["teacher"])
    own = cfg.protocol_for("tiny_convnet", "teacher").train
    assert own.augment == "rrc_flip" and own.augment_options and own.cutmix_prob > 0
    without = cfg.protocol_for("tiny_convnet", "teacher", "none").train
    assert without.augment == "none" and without.augment_options == {} and without.cutmix_prob == 0
    same = cfg.protocol_for("tiny_convnet", "teacher", own.augment).train
    assert (same.augment_options, same.cutmix_prob) == (own.augment_options, own.cutmix_prob)
    other = cfg.protocol_for("tiny_convnet", "teacher", "dsa").train
    assert other.augment == "dsa" and other.augment_options == {}
    with pytest.raises(ConfigError, match="robust_scores .* label mode fkd"):
        tiny_cfg(tmp_path / "c", label_modes=["fkd"], robust_scores=True)
    # a protocol without augmentation but with CutMix: the "without" run still drops CutMix
    plain_mix = tiny_cfg(tmp_path / "d", protocol="dc-protocol", label_modes=["hard"],
                         overrides={"train": {"cutmix_prob": 0.5}})
    assert plain_mix.protocol_for("tiny_convnet", "hard").train.cutmix_prob == 0.5
    assert plain_mix.protocol_for("tiny_convnet", "hard", "none").train.cutmix_prob == 0


def test_config_checks_every_label_modes_protocol_and_the_hard_one(tmp_path):
    """Each cell trains its label mode's protocol and, for HLR, the hard-label one: a combination that
    cannot resolve is refused when the config loads, not after the teacher and the first cells."""
    with pytest.raises(ConfigError, match="label mode 'hard'.*"):
        tiny_cfg(tmp_path / "a", protocol="soft-kl", label_modes=["teacher"], overrides={"loss": "kl"})
    with pytest.raises(ConfigError, match="label mode 'hard'"):
        tiny_cfg(tmp_path / "b", protocol="soft-kl", label_modes=["teacher", "hard"], overrides={"loss": "kl"})
    assert tiny_cfg(tmp_path / "c", protocol="soft-kl", label_modes=["teacher"]).label_modes == ["teacher"]


def test_torchrun_spreads_cells_and_matches_single_process(tmp_path):
    """2 gloo ranks share the cells, rank 0 assembles; numbers equal one process."""
    import os
    import subprocess
    import sys

    import yaml

    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "label_modes": ["hard", "teacher"]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, launcher in (("two", ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]),
                           ("one", [])):
        env["DDKIT_CACHE"] = str(tmp_path / f"cache-{name}")
        proc = subprocess.run([sys.executable, *launcher, "-m", "ddkit", "bench", str(cfg), "--out", name,
                               "--device", "cpu", "-q"],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        runs[name] = json.loads((tmp_path / name / "bench.json").read_text())["rows"]
    assert len(runs["two"]) == 4
    # the ranks' locks on the evaluations they shared were left behind as empty files; the cache keeps its own
    assert not list((tmp_path / "two").rglob("*.lock"))
    for a, b in zip(runs["two"], runs["one"]):
        assert ((a["cell"], a["acc"], a["random"], a["hard_acc"], a["lrs"])
                == (b["cell"], b["acc"], b["random"], b["hard_acc"], b["lrs"]))


def test_torchrun_ranks_build_a_shared_expert_buffer_once(tmp_path):
    """Two gloo ranks each make a set needing the same expert buffer at the same time: one trains it,
    the other waits and reuses it (before the build lock both trained it into one hidden folder, and
    the first to finish deleted it under the other)."""
    import os
    import subprocess
    import sys

    import yaml

    from ddkit.methods.mtt import MTT

    # a buffer that takes a few seconds to train, so that both ranks ask for it while it is being built
    # log_lr: learned plainly, these sets' lr goes below zero in 2 iterations, which learned_lr refuses
    mtt = {**MTT.smoke_options, "iterations": 2, "log_lr": True,
           "buffer": {**MTT.smoke_options["buffer"], "num_experts": 2, "epochs": 8}}
    cfg = tmp_path / "b.yaml"
    cfg.write_text(
        yaml.safe_dump({**TINY, "ipcs": [1], "seeds": [0], "overrides": {**TINY["overrides"], "learned_lr": True},
                        "methods": [{"name": "mtt", "options": mtt},
                                    {"name": "mtt", "label": "mtt-b", "options": {**mtt, "lr_img": 10.0}}]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDKIT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "ddkit", "bench", str(cfg), "--out", "run", "--device", "cpu", "-q"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    buffers = [p for p in (tmp_path / "cache" / "experts").iterdir() if not p.name.startswith(".")]
    assert len(buffers) == 1 and (buffers[0] / "manifest.json").is_file()
    assert not [p for p in (tmp_path / "cache" / "experts").iterdir() if ".partial-" in p.name]
    uses = [c for name in ("mtt", "mtt-b")
            for c in json.loads((tmp_path / "run" / "distilled"
                                 / f"synthetic-{name}-ipc1.synthesis.json").read_text())["shared"]]
    assert [c["key"] for c in uses] == [buffers[0].name] * 2
    built = sorted(c["seconds_here"] > 0 for c in uses)
    assert built == [False, True], uses  # one rank built it, the other reused it
    # the rank that waited for the build is not charged for the wait (its synthesis time read ~100 s
    # for a 4 s synthesis): neither set's time holds the build or the wait for it
    waiter = next(c for c in uses if c["seconds_here"] == 0)
    assert 0 <= waiter["waited_seconds"] <= waiter["build_seconds"] + 1.0  # 0 if it came after the build
    for name in ("mtt", "mtt-b"):
        syn = json.loads((tmp_path / "run" / "distilled" / f"synthetic-{name}-ipc1.synthesis.json").read_text())
        off = sum(c["seconds_here"] + c["waited_seconds"] for c in syn["shared"])
        assert syn["seconds"] == pytest.approx(syn["wall_seconds"] - off, abs=1e-3), syn
    assert uses[0]["build_seconds"] == uses[1]["build_seconds"] > 0
    # protocol learned_lr: each cell records the lr its students trained with, the set's learned one
    rows = [json.loads(p.read_text()) for p in (tmp_path / "run" / "cells").glob("*.json")]
    assert sorted(row["method"] for row in rows) == ["mtt", "mtt-b"]
    for row in rows:
        name = row["method"]
        syn_lr = json.loads((tmp_path / "run" / "distilled" / f"synthetic-{name}-ipc1" / "manifest.json").read_text())
        assert row["learned_lr"] == syn_lr["meta"]["syn_lr"] != TINY["overrides"]["train"]["lr"]
        # and the accuracies of the experts its set matched, from the buffer both sets used
        experts = [e["test_accuracy"] for e in json.loads((buffers[0] / "manifest.json").read_text())["experts"]]
        assert row["synthesis"]["expert_test_accuracy"] == syn_lr["meta"]["expert_test_accuracy"] == experts
        assert len(experts) >= 1 and all(0 < a <= 1 for a in experts)


def test_ddranking_export(full_run, tmp_path):
    import torch

    from ddkit.bench import export_for_ddranking
    from ddkit.distilled import DistilledSet

    out, _, _ = full_run
    src = DistilledSet.load(out / "distilled" / "synthetic-random-ipc2")
    folder = export_for_ddranking(src, tmp_path / "ddr")
    assert sorted(p.name for p in folder.iterdir()) == ["images.pt", "labels.pt", "meta.json"]
    x, y = torch.load(folder / "images.pt"), torch.load(folder / "labels.pt")
    assert x.shape == (8, 1, 16, 16) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # what DD-Ranking rebuilds as its hard labels
    order = torch.argsort(src.labels, stable=True)
    raw = src.images[order].float()
    raw = raw / 255.0 if src.images.dtype == torch.uint8 else raw
    assert torch.allclose(x, (raw - src.mean[0]) / src.std[0], atol=1e-6)
    assert json.loads((folder / "meta.json").read_text())["ipc"] == 2


def test_per_ipc_options_pool_teachers_restricted_cells_and_stage_progress(tmp_path):
    """ipc_options / ipc_overrides change one IPC only; '@name' resolves to a pool teacher; a
    student or method limited to some IPCs gets only those cells; stages report progress."""
    cfg = tiny_cfg(
        tmp_path / "run", ipcs=[1, 2], students=["tiny_convnet", "tiny_mlp"], label_modes=["hard"], seeds=[0],
        student_ipcs={"tiny_mlp": [2]}, method_ipcs={"b": [1]},
        ipc_overrides={2: {"train": {"epochs": 4}}},
        teacher_pool={"other": {"model": "tiny_convnet", "seed": 3,
                                "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}}},
        methods=[{"name": "sre2l", "label": "a",
                  "options": {"iterations": 2, "stats": "conv", "extra_teachers": ["@other"]},
                  "ipc_options": {2: {"iterations": 3}}},
                 {"name": "random", "label": "b"}],
    )
    assert [c.id for c in cells_of(cfg)] == [
        "synthetic-a-ipc1-tiny_convnet-hard", "synthetic-a-ipc2-tiny_convnet-hard", "synthetic-a-ipc2-tiny_mlp-hard",
        "synthetic-b-ipc1-tiny_convnet-hard"]
    assert cfg.protocol_for("tiny_convnet", "hard", ipc=2).train.epochs == 4
    assert cfg.protocol_for("tiny_convnet", "hard", ipc=1).train.epochs == 3
    stages, records = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the (step, total, record) form is the current one
        rows = run_bench(cfg, stage_progress=lambda d, n, r: (stages.append((r["stage"], d, n)), records.append(r)))
    assert len(rows) == 4 and rows[2]["cross_arch"] is not None and rows[0]["cross_arch"] is None
    pool = tmp_path / "run" / "teachers" / "synthetic@other"
    assert (pool / "manifest.json").is_file()
    a2 = json.loads((tmp_path / "run" / "distilled" / "synthetic-a-ipc2" / "manifest.json").read_text())
    assert a2["method"]["config"]["iterations"] == 3 and a2["method"]["config"]["extra_teachers"] == [str(pool)]
    a1 = json.loads((tmp_path / "run" / "distilled" / "synthetic-a-ipc1" / "manifest.json").read_text())
    assert a1["method"]["config"]["iterations"] == 2 and len(a2["meta"]["teachers"]) == 2
    assert not (tmp_path / "run" / "distilled" / "synthetic-b-ipc2").exists()
    # synthesis time leaves out building the teachers' statistics, charged once to the first set
    # that needs them and reported as shared_seconds by every set that uses them
    syn = [json.loads((tmp_path / "run" / "distilled" / f"synthetic-{s}.synthesis.json").read_text())
           for s in ("a-ipc1", "a-ipc2", "b-ipc1")]
    assert [len(s["shared"]) for s in syn] == [2, 2, 0] and syn[0]["shared_seconds"] > 0
    assert [c["key"] for c in syn[0]["shared"]] == [c["key"] for c in syn[1]["shared"]]
    assert (syn[1]["shared_seconds"] == syn[0]["shared_seconds"]
            and all(c["seconds_here"] == 0 for c in syn[1]["shared"]))
    for s in syn:
        here = sum(c["seconds_here"] + c["waited_seconds"] for c in s["shared"])
        assert s["seconds"] == pytest.approx(s["wall_seconds"] - here, abs=1e-3) and s["seconds"] > 0
    assert syn[2]["shared_seconds"] == 0 and syn[2]["seconds"] == syn[2]["wall_seconds"]
    assert rows[1]["synthesis"]["seconds"] == syn[1]["seconds"] and synthesis_seconds(rows[1]) == syn[1]["seconds"]
    assert synthesis_seconds({"synthesis": {"wall_seconds": 2.5}}) == 2.5  # a cell from before the split
    use = [{"key": "a", "build_seconds": 2.0}, {"key": "b", "build_seconds": 0.5}, {"key": "a", "build_seconds": 2.0}]
    assert shared_seconds(use) == 2.5 and shared_seconds([*use, {"key": "c", "build_seconds": None}]) is None
    whats = {w.split(" ")[0] for w, _, _ in stages}
    assert {"teacher", "distill"} <= whats and any(": distilled, seed 0" in w for w, _, _ in stages)
    assert any(w == "distill synthetic-a-ipc2" and (d, n) == (6, 6) for w, d, n in stages)  # 2 slots x 3 steps
    # the stage's own record comes along, named in record["stage"] as evaluate names its students
    assert any(r["stage"] == "teacher synthetic" and "loss" in r for r in records)
    assert any(r["stage"].endswith(": distilled, seed 0") and "loss" in r for r in records)
    # a moved bench folder keeps its sets and cells: '@other' resolves to another path, the same weights
    # (the path used to be in the sets' keys, so every set that names a pool teacher was made again)
    shutil.move(tmp_path / "run", tmp_path / "moved")
    reused = []
    moved = run_bench(dataclasses.replace(cfg, out=str(tmp_path / "moved")),
                      progress=lambda d, n, r: reused.append(r["reused"]))
    assert reused == [True] * 4 and strip(moved) == strip(rows)
    with pytest.raises(ConfigError, match="not in teacher_pool"):
        tiny_cfg(tmp_path, methods=[{"name": "sre2l", "options": {"extra_teachers": ["@nope"]}}])
    with pytest.raises(ConfigError, match="must be a non-empty subset of ipcs"):
        tiny_cfg(tmp_path, student_ipcs={"tiny_convnet": [7]})
    # a repeated IPC made the same cells (and, under torchrun, the same set on two ranks at once) twice
    for table, name in (("student_ipcs", "tiny_convnet"), ("method_ipcs", "random")):
        with pytest.raises(ConfigError, match=rf"{table}\[{name}\] = \[2, 2\] repeats an entry"):
            tiny_cfg(tmp_path, **{table: {name: [2, 2]}})
    # cells follow the order of ipcs, whatever the order of a method's or student's own list
    cells = cells_of(tiny_cfg(tmp_path, method_ipcs={"random": [2, 1]}, student_ipcs={"tiny_convnet": [2, 1]}))
    assert [c.ipc for c in cells] == [1, 2]


def test_fkd_label_mode_relabels_each_set_once(tmp_path):
    """Label mode fkd: the bench stores per-epoch soft labels for every set (and the random subset is
    relabelled the same way inside evaluate); label bytes count the store; a re-run reuses it."""
    cfg = tiny_cfg(tmp_path / "run", ipcs=[2], label_modes=["fkd"], seeds=[0],
                   relabel={"epochs": 2, "cutmix_prob": 0.5, "top_k": 2},
                   overrides={"full_epochs": 1, "train": {"epochs": 3, "batch_size": 32, "lr": 0.05}})
    old = []

    def old_form(what, done, total):  # stage_progress before 2026-12-07, still called so for one release
        old.append((what, done, total))

    with pytest.warns(DeprecationWarning, match=r"now calls stage_progress\(step, total, record\)"):
        rows = run_bench(cfg, stage_progress=old_form)
    assert all(isinstance(w, str) and isinstance(d, int) and isinstance(n, int) for w, d, n in old)
    assert {w.split(" ")[0] for w, _, _ in old} >= {"teacher", "relabel"}
    assert any(w.endswith(": distilled, seed 0") for w, _, _ in old)
    assert [(d, n) for w, d, n in old if w.startswith("relabel synthetic-")] == [(1, 2), (2, 2)]  # per epoch
    stores = [p for p in (tmp_path / "run" / "labels").iterdir() if not p.name.startswith(".")]
    assert len(stores) == 1 and (stores[0] / "manifest.json").is_file()
    man = json.loads((stores[0] / "manifest.json").read_text())
    assert man["epochs"] == 2 and man["top_k"] == 2 and man["cutmix"]["prob"] == 0.5
    r = rows[0]
    assert r["label_mode"] == "fkd" and r["random"] is not None
    assert_numbers_from_own_evaluations(tmp_path / "run", r)
    assert r["acc"] != r["hard_acc"]  # the fkd students', not the hard-label ones'
    # 2 epochs x 8 images x top-2 (fp16 values + uint8 indices) at least, plus the set's hard labels
    assert r["bytes"]["fkd_labels"] >= 2 * 8 * 2 * 3 and r["bytes"]["labels"] > r["bytes"]["fkd_labels"]
    assert r["hard_acc"] is not None
    before = stores[0].stat().st_mtime_ns
    again = run_bench(cfg)
    assert strip(again) == strip(rows) and stores[0].stat().st_mtime_ns == before
    # a damaged store is labelled again when a cell must be evaluated (it failed every fkd cell of the
    # set, where `ddkit run` labels it again), and gives the same numbers
    labels = stores[0] / "fkd_labels.safetensors"
    whole = labels.read_bytes()
    labels.write_bytes(whole[:100])
    for folder in ("cells", "evals"):
        shutil.rmtree(tmp_path / "run" / folder)
    remade = run_bench(cfg)
    assert strip(remade) == strip(rows) and labels.read_bytes() == whole



def test_fkd_store_reused_after_a_kill_removes_its_finished_epochs(tmp_path, monkeypatch):
    """A bench stopped between saving a set's FKD store and removing the store's finished epochs (its
    hidden .partial folder) reused the store ever after and left the folder for good."""
    import ddkit.labels.fkd

    cfg = tiny_cfg(tmp_path / "run", ipcs=[1], label_modes=["fkd"], seeds=[0], methods=["random"],
                   relabel={"epochs": 2}, overrides={"full_epochs": 1, "train": {"epochs": 2, "batch_size": 32}})
    real_write = ddkit.labels.fkd._write_store

    def killed_after_save(*args):
        real_write(*args)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ddkit.labels.fkd, "_write_store", killed_after_save)
        with pytest.raises(KeyboardInterrupt):
            run_bench(cfg)
    labels = tmp_path / "run" / "labels"
    assert [p.name for p in labels.glob(".*.partial")] and [p for p in labels.glob("*/manifest.json")]
    rows = run_bench(cfg)
    assert rows[0]["label_mode"] == "fkd" and not list(labels.glob(".*.partial"))


def test_fkd_store_is_built_once_by_concurrent_builders(tmp_path, monkeypatch):
    """Two torchrun ranks may run cells of the same set (other students) at once: the first builds the
    FKD store, the second waits for it and reuses it instead of relabelling into the same partial folder."""
    import threading
    import time

    import ddkit.labels.fkd
    from ddkit.bench import _Bench

    cfg = tiny_cfg(tmp_path / "run", ipcs=[2], label_modes=["fkd"], seeds=[0], methods=["random"],
                   relabel={"epochs": 2}, overrides={"full_epochs": 1, "train": {"epochs": 2, "batch_size": 32}})
    bench = _Bench(cfg, None)
    bench.prepare()
    calls, real = [], ddkit.labels.fkd.relabel

    def slow_relabel(*args, **kw):
        calls.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the other builder to arrive while this one works
        return real(*args, **kw)

    monkeypatch.setattr(ddkit.labels.fkd, "relabel", slow_relabel)
    key3, protocol = ("synthetic", "random", 2), cfg.protocol_for("tiny_convnet", "fkd", ipc=2)  # 2 epochs
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(bench._fkd_store(key3, protocol))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(paths) == 2 and paths[0] == paths[1] and (paths[0] / "manifest.json").is_file()
    assert [p.name for p in (tmp_path / "run" / "labels").iterdir() if not p.name.startswith(".")] == [paths[0].name]


def test_stored_label_mode_uses_a_methods_own_labels(tmp_path, monkeypatch):
    """Label mode stored with DATM: its learned logits are the stored labels (it cannot take the
    teacher's), the random row needs soft_labels: true, and a set without soft labels is refused."""
    from ddkit.distilled import DistilledSet
    from ddkit.evaluate.runner import teacher_logits
    from ddkit.methods.mtt import DATM

    monkeypatch.setenv("DDKIT_CACHE", str(tmp_path / "cache"))
    datm = {"name": "datm", "options": DATM.smoke_options}
    with pytest.raises(ConfigError, match=r"label mode 'stored' needs soft labels in every set; \['random'\]"):
        tiny_cfg(tmp_path / "bad", ipcs=[1], label_modes=["stored"], methods=["random", datm])
    with pytest.raises(ConfigError, match=r"\['datm'\] store none"):
        tiny_cfg(tmp_path / "bad", ipcs=[1], label_modes=["stored"],
                 methods=[{"name": "random", "soft_labels": True},
                          {**datm, "options": {**DATM.smoke_options, "learn_labels": False}}])
    with pytest.raises(ConfigError,
                       match=r"methods \['datm'\] label their images themselves \(datm: options.learn_labels: "
                             r"true\), and their soft_labels: true would overwrite that with the teacher's logits; "
                             r"drop soft_labels: true on them, or set methods\[datm\].options.learn_labels: false$"):
        tiny_cfg(tmp_path / "bad", ipcs=[1], label_modes=["hard"], methods=["random", {**datm, "soft_labels": True}])
    assert not (tmp_path / "bad").exists()  # refused at load, before any cell ran
    cfg = tiny_cfg(tmp_path / "run", ipcs=[1], seeds=[0], label_modes=["hard", "stored"], overrides={
        "full_epochs": 1, "temperature": 1.0, "train": {"epochs": 3, "batch_size": 32, "lr": 0.05}},
        methods=[{"name": "random", "soft_labels": True}, datm])
    rows = {(r["method"], r["label_mode"]): r for r in run_bench(cfg)}
    assert sorted(rows) == [("datm", "hard"), ("datm", "stored"), ("random", "hard"), ("random", "stored")]
    ds = DistilledSet.load(tmp_path / "run" / "distilled" / "synthetic-datm-ipc1")
    teacher = Teacher.load(tmp_path / "run" / "teachers" / "synthetic")
    from_teacher = teacher_logits(teacher, ds.images, ds.mean, ds.std, torch.device("cpu"))
    assert ds.soft_labels is not None and ds.soft_labels.shape == from_teacher.shape == (4, 4)
    assert not torch.allclose(ds.soft_labels.float(), from_teacher, atol=1e-2)  # DATM's own logits, not the teacher's
    stored, hard = rows[("datm", "stored")], rows[("datm", "hard")]
    assert stored["bytes"]["labels"] == ds.label_bytes > 4 * 8  # hard + soft labels
    assert hard["bytes"]["labels"] == 4 * 8  # a hard-label student uses no soft labels
    assert rows[("random", "stored")]["bytes"]["labels"] > rows[("random", "hard")]["bytes"]["labels"] == 4 * 8
    assert stored["hard_acc"] == hard["acc"] and stored["acc"] != hard["acc"]
    for r in rows.values():
        assert_numbers_from_own_evaluations(tmp_path / "run", r)
    assert stored["protocol_hash"] != hard["protocol_hash"]
    assert rows[("random", "stored")]["random"] == stored["random"]  # the random subset labelled by the teacher


def test_unfinished_cells_are_dealt_per_student():
    from ddkit.bench import Cell, _my_cells
    from ddkit.distributed import DistInfo

    cells = [Cell(i, "d", f"m{i // 2}", 1, ("small", "big")[i % 2], "hard") for i in range(8)]
    fresh = {c.index: None for c in cells}
    ranks = [_my_cells(cells, fresh, DistInfo(rank=r, world_size=2, local_rank=r)) for r in range(2)]
    for mine in ranks:  # i % 2 would give one rank every "big" cell
        assert sorted(c.student for c in mine) == ["big", "big", "small", "small"]
    assert sorted(c.index for m in ranks for c in m) == list(range(8))
    resumed = {**fresh, 0: {"acc": 1}, 2: {"acc": 1}, 4: {"acc": 1}}  # three "small" cells finished
    ranks = [_my_cells(cells, resumed, DistInfo(rank=r, world_size=2, local_rank=r)) for r in range(2)]
    todo = [[c.index for c in m if resumed[c.index] is None] for m in ranks]
    assert sorted(todo[0] + todo[1]) == [1, 3, 5, 6, 7] and not set(todo[0]) & set(todo[1])
    assert sorted(len(t) for t in todo) == [2, 3]
    assert [c.index for c in ranks[0] if resumed[c.index] is not None] == [0, 2, 4]  # reported by index % world


@pytest.mark.parametrize("over, message", [
    ({"ipc_overrides": {"ten": {"train": {"epochs": 3}}}}, "ipc_overrides: key 'ten' must be an integer"),
    ({"ipc_overrides": {1: 5}}, r"ipc_overrides.1: expected a mapping"),
    ({"student_ipcs": {"tiny_convnet": 1}}, r"student_ipcs.tiny_convnet: expected a list"),
    ({"student_options": {"tiny_convnet": 3}}, r"student_options.tiny_convnet: expected a mapping"),
    ({"methods": [{"name": "random", "ipc_options": {"x": {}}}]},
     r"methods\[0\].ipc_options: key 'x' must be an integer"),
    ({"methods": [{"name": "random", "optins": {}}]}, r"methods\[0\].optins'; did you mean 'options'"),
    ({"seeds": [1, 1]}, r"seeds: \[1, 1\] repeats a seed"),
    # two spellings of one IPC: the second silently replaced the first
    ({"ipc_overrides": {2: {"train": {"lr": 0.1}}, "2": {"train": {"epochs": 3}}}},
     r"^ipc_overrides: keys 2 and '2' both mean 2; keep one of them$"),
    ({"ipc_overrides": {"+2": {}, "02": {}}}, r"^ipc_overrides: keys '\+2' and '02' both mean 2; keep one of them$"),
])
def test_badly_typed_mappings_and_repeated_seeds_are_config_errors(tmp_path, over, message):
    """Typed mappings used to pass unchecked and crash later with a ValueError/TypeError traceback."""
    with pytest.raises(ConfigError, match=message):
        tiny_cfg(tmp_path, **over)
    assert (tiny_cfg(tmp_path, ipc_overrides={"2": {"train": {"epochs": 2}}}).ipc_overrides
            == {2: {"train": {"epochs": 2}}})


def test_ipc_larger_than_a_class_fails_before_any_teacher_or_set(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(DDKitError, match="ipc 99 is larger than the smallest class"):
        run_bench(tiny_cfg(out, ipcs=[1, 99], label_modes=["hard", "teacher"]))
    assert not out.exists()


def test_cells_and_evaluations_are_recomputed_under_a_new_revision_of_student_training(full_run, tmp_path,
                                                                                       monkeypatch):
    """A bench re-run reused its cells and evaluations whole, so a new STUDENT_REVISION (a fix to student training)
    never reached their students. The revision keys both (from 2 on: at 1 they are reused as before)."""
    import ddkit.cache

    out, rows, _ = full_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    cfg, seen = tiny_cfg(copy, label_modes=["hard", "teacher"]), []
    evals = sorted(p.name for p in (copy / "evals").glob("*.json"))
    monkeypatch.setenv("DDKIT_CACHE", str(tmp_path / "cache"))  # no student cached: each one trains again
    monkeypatch.setattr(ddkit.cache, "STUDENT_REVISION", 2)
    again = run_bench(cfg, progress=lambda d, n, r: seen.append(r["reused"]))
    assert seen == [False] * 4 and [r["acc"] for r in again] == [r["acc"] for r in rows]
    made = sorted(p.name for p in (copy / "evals").glob("*.json") if p.name not in evals)
    assert len(made) == len(evals)  # every evaluation made again, beside the old ones
    assert {k for r in again for k in r["eval_keys"]} == {m.removesuffix(".json") for m in made}
    seen.clear()
    run_bench(cfg, progress=lambda d, n, r: seen.append(r["reused"]))
    assert seen == [True] * 4


def test_show_counts_cells_of_an_older_revision_of_student_training_as_not_finished(full_run, tmp_path, monkeypatch):
    """After a new STUDENT_REVISION `ddkit show` of an unfinished bench still said "4 of 4 cells finished" (it counted
    a cell by its seeds and protocols) while `ddkit bench` recomputed all four (their key names the revision; QA 17c
    F9). Cells record the revision their key names (from 2 on), and show counts them as bench does."""
    import ddkit.cache
    from ddkit.bench import _Bench
    from ddkit.describe import describe

    out, _, _ = full_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "bench.json").unlink()  # a bench folder before its table
    cfg = tiny_cfg(copy, label_modes=["hard", "teacher"])

    def finished() -> int:
        bench = _Bench(cfg)
        bench.prepare()
        return sum(bench.finished(c) is not None for c in cells_of(cfg))

    assert describe(copy).endswith("\n4 of 4 cells finished; no table yet (bench.json)") and finished() == 4
    assert not any("revision" in json.loads(p.read_text()) for p in (copy / "cells").glob("*.json"))
    monkeypatch.setattr(ddkit.cache, "STUDENT_REVISION", 2)
    assert describe(copy).endswith(
        "\n0 of 4 cells finished (4 made by revision 1 of ddkit's student training (this ddkit's is 2), recomputed by "
        "the next `ddkit bench`); no table yet (bench.json)") and finished() == 0
    monkeypatch.setenv("DDKIT_CACHE", str(tmp_path / "cache"))
    run_bench(cfg)
    assert {json.loads(p.read_text())["revision"] for p in (copy / "cells").glob("*.json")} == {2}
    assert describe(copy / "config.json").endswith("\n4 of 4 cells finished; bench.json holds the table")
    assert finished() == 4
    # one cell of another config too: both reasons are named
    cell = copy / "cells" / "synthetic-random-ipc1-tiny_convnet-hard.json"
    cell.write_text(json.dumps({**json.loads(cell.read_text()), "seeds": [5]}))
    monkeypatch.setattr(ddkit.cache, "STUDENT_REVISION", 1)
    assert describe(copy / "config.json").endswith(
        "\n0 of 4 cells finished (1 cell file(s) from another config or seeds, 3 made by revision 2 of ddkit's student "
        "training (this ddkit's is 1), recomputed by the next `ddkit bench`); bench.json holds an earlier run's table")
    assert finished() == 0


def test_cells_and_evaluations_made_under_other_cuda_settings_are_recomputed(full_run, tmp_path, monkeypatch, caplog):
    """A bench's cells and cached evaluations were reused whatever CUDA settings, GPU or libraries (or device type)
    their students were trained under, while those key the students themselves (QA 17c F10): a bench made with TF32 on
    was reused whole with TF32 off, or on another GPU. Made on CUDA, evaluations record them (``run.cuda``) and so do
    cells (``cuda``); under others both are recomputed. On the CPU nothing changes (no GPU asked, all reused)."""
    import ddkit.evaluate.runner as runner
    from ddkit.artifacts import write_json
    from ddkit.bench import _Bench

    out, _, _ = full_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    cfg = tiny_cfg(copy, label_modes=["hard", "teacher"])
    bench = _Bench(cfg)
    bench.prepare()
    cells = cells_of(cfg)
    cpu_made = [json.loads(bench.cell_path(c).read_text()) for c in cells]
    assert not any("cuda" in r for r in cpu_made)
    fake_cuda(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: pytest.fail("asked a GPU on the CPU"))
    assert [bench.finished(c) for c in cells] == cpu_made  # on the CPU: reused as before
    fake_cuda(monkeypatch)
    bench.device = torch.device("cuda:0")  # a bench on a GPU: its students are faked (no GPU here)
    assert [bench.finished(c) for c in cells] == [None] * 4  # made on the CPU: not what the GPU trains
    monkeypatch.setattr(runner, "_train_student", lambda *a, **k: 0.5)
    monkeypatch.setattr(runner, "_random_baseline", lambda *a, **k: 0.25)
    with cuda_settings_kept():
        torch.backends.cuda.matmul.allow_tf32 = True
        for c in cells:
            write_json(bench.cell_path(c), bench.compute(c))  # as run_bench writes a finished cell
        made = [json.loads(bench.cell_path(c).read_text()) for c in cells]
        on = runner.trained_on("cuda")["cuda"]
        assert on["tf32_matmul"] and all(r["cuda"] == on and r["acc"]["mean"] == 0.5 for r in made)
        evals = [copy / "evals" / f"{k}.json" for k in sorted({k for r in made for k in r["eval_keys"]})]
        assert len(evals) == 4 and all(json.loads(p.read_text())["run"]["cuda"] == on for p in evals)
        assert [bench.finished(c) for c in cells] == made  # the same settings: reused
        torch.backends.cuda.matmul.allow_tf32 = False
        assert [bench.finished(c) for c in cells] == [None] * 4
        with caplog.at_level("INFO", logger="ddkit.bench"):
            assert all(bench._cached_eval(p, bench.device) is None for p in evals)  # an evaluation alone too
        assert (f"recomputing {evals[0].name}: it was made under other CUDA settings (tf32_matmul True, now False; "
                "float32_matmul_precision 'high', now 'highest')") in caplog.text
        torch.backends.cuda.matmul.allow_tf32 = True
        assert [bench.finished(c) for c in cells] == made
        fake_cuda(monkeypatch, "NVIDIA H200")
        assert [bench.finished(c) for c in cells] == [None] * 4  # another GPU
        assert all(bench._cached_eval(p, bench.device) is None for p in evals)
        fake_cuda(monkeypatch)
        bench.device = torch.device("cpu")
        assert [bench.finished(c) for c in cells] == [None] * 4  # made on CUDA: not what the CPU trains
        assert all(bench._cached_eval(p, "cpu") is None for p in evals)


def test_cells_and_evaluations_made_with_another_thread_count_are_recomputed(full_run, monkeypatch, tmp_path):
    """A cached evaluation used to be reused whatever thread count made it (float sums, so other students):
    a table then mixed numbers that no single run gives."""
    out, rows, _ = full_run
    made = torch.get_num_threads()
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    cfg = tiny_cfg(copy, label_modes=["hard", "teacher"])
    seen = []
    assert strip(run_bench(cfg, progress=lambda d, n, r: seen.append(r["reused"]))) == strip(rows)
    assert seen == [True] * 4  # the same thread count: every cell reused
    evals = sorted((copy / "evals").glob("*.json"))
    before = {p.name: p.stat().st_mtime_ns for p in evals}
    monkeypatch.setattr(torch, "get_num_threads", lambda: made + 96)
    seen.clear()
    again = run_bench(cfg, progress=lambda d, n, r: seen.append(r["reused"]))
    assert seen == [False] * 4
    assert {r["torch_threads"] for r in again} == {made + 96}
    assert all(json.loads(p.read_text())["run"]["torch_threads"] == made + 96 for p in evals)
    assert all(p.stat().st_mtime_ns != before[p.name] for p in evals)
    assert [r["acc"] for r in again] == [r["acc"] for r in rows]  # (set_num_threads is untouched: same floats)
    # a cell whose own record says this thread count but whose evaluations were made with another (cells
    # recorded their run's count, not their evaluations', before 2026-12-05) is recomputed too
    first = sorted((copy / "cells").glob("*.json"))[0]
    rec = json.loads(first.read_text())
    e = copy / "evals" / f"{rec['eval_keys'][0]}.json"
    e.write_text(json.dumps({**json.loads(e.read_text()), "run": {"torch_threads": made + 5, "world_size": 1}}))
    seen.clear()
    run_bench(cfg, progress=lambda d, n, r: seen.append(r["reused"]))
    assert seen.count(False) >= 1 and json.loads(e.read_text())["run"]["torch_threads"] == made + 96


def test_teacher_checkpoint_replaced_in_place_is_imported_again(tmp_path):
    """A teacher imported from ``teacher.checkpoint`` is keyed by the file's path, not its weights: a
    checkpoint rewritten at the same path must give the bench the new weights (as ``ddkit run`` does),
    not the teacher imported from the old file."""
    from safetensors.torch import save_file

    from ddkit.bench import _teacher_stage
    from ddkit.data.base import make_synthetic
    from ddkit.models import create_model
    from ddkit.teacher import TeacherConfig

    data = make_synthetic()
    c, h, _ = data.image_shape
    ckpt = tmp_path / "weights.safetensors"
    cfg = TeacherConfig(model="tiny_convnet", checkpoint=str(ckpt))
    shas = []
    for seed in (0, 1):  # the user retrains and overwrites the checkpoint file
        torch.manual_seed(seed)
        save_file(create_model("tiny_convnet", c, data.num_classes, h).state_dict(), str(ckpt))
        shas.append(_teacher_stage(data, cfg, tmp_path / "teachers" / "synthetic", "cpu").fingerprint)
    assert shas[0] != shas[1]
    assert Teacher.load(tmp_path / "teachers" / "synthetic").fingerprint == shas[1]


def test_protocol_extra_teachers_retrained_in_place_recompute_their_cells(tmp_path):
    """A protocol's extra_teachers (an ensemble with the teacher): a cell and its evaluations follow
    their weights, not their paths. Retraining one in place recomputes them (the protocol's hash used to
    name the path only); the same teacher copied elsewhere reuses them (the path used to be in the keys)."""
    from ddkit.data.base import make_synthetic
    from ddkit.teacher import TeacherConfig, train_teacher
    from ddkit.training import TrainConfig

    extra = tmp_path / "extra"
    cfg = tiny_cfg(tmp_path / "run", ipcs=[1], seeds=[0], label_modes=["teacher"],
                   overrides={**TINY["overrides"], "extra_teachers": [str(extra)]})
    seen = []
    for seed in (0, 1, 1):  # the extra teacher retrained in place, then left alone
        if not seen or seed != seen[-1][0]:
            train_teacher(make_synthetic(), TeacherConfig(model="tiny_convnet", seed=seed,
                                                          train=TrainConfig(epochs=1, batch_size=32)), extra)
        rows = run_bench(cfg, progress=lambda d, n, r, s=seed: seen.append((s, r["reused"], r["eval_keys"][0])))
    assert [(s, reused) for s, reused, _ in seen] == [(0, False), (1, False), (1, True)]
    assert seen[0][2] != seen[1][2] == seen[2][2] == rows[0]["eval_keys"][0]
    shutil.copytree(extra, tmp_path / "moved")
    moved = tiny_cfg(tmp_path / "run", ipcs=[1], seeds=[0], label_modes=["teacher"],
                     overrides={**TINY["overrides"], "extra_teachers": [str(tmp_path / "moved")]})
    again = []
    assert run_bench(moved, progress=lambda d, n, r: again.append((r["reused"], r["eval_keys"][0]))) == rows
    assert again == [(True, seen[2][2])]


def test_fkd_with_protocol_extra_teachers_relabels_with_their_ensemble(tmp_path):
    """Label mode fkd with a protocol's extra_teachers: the bench made each set's store with the teacher alone and
    every fkd cell then failed, as the evaluation labels with the ensemble. The store is now made by the ensemble
    (named by it: another store than the teacher's alone) and the cells evaluate."""
    from ddkit.data.base import make_synthetic
    from ddkit.labels import SoftLabelStore
    from ddkit.teacher import TeacherConfig, teacher_ensemble, train_teacher
    from ddkit.training import TrainConfig

    extra = tmp_path / "extra"
    train_teacher(make_synthetic(), TeacherConfig(model="tiny_convnet", seed=1,
                                                  train=TrainConfig(epochs=1, batch_size=32)), extra)
    cfg = tiny_cfg(tmp_path / "run", ipcs=[1], seeds=[0], label_modes=["fkd"], relabel={"epochs": 2},
                   overrides={**TINY["overrides"], "extra_teachers": [str(extra)]})
    rows = run_bench(cfg)
    own = Teacher.load(tmp_path / "run" / "teachers" / "synthetic")
    both = teacher_ensemble([own, Teacher.load(extra)])
    stores = [p for p in (tmp_path / "run" / "labels").iterdir() if not p.name.startswith(".")]
    assert len(stores) == 1
    assert SoftLabelStore.load(stores[0]).manifest["teacher"]["fingerprint"] == both.fingerprint != own.fingerprint
    assert [(r["label_mode"], r["random"] is not None) for r in rows] == [("fkd", True)]
    rep = json.loads((tmp_path / "run" / "evals" / f"{rows[0]['eval_keys'][0]}.json").read_text())
    assert rep["teacher"]["weights_sha"] == both.fingerprint and rep["fkd_store"]["path"] == str(stores[0])
    seen = []
    assert run_bench(cfg, progress=lambda d, n, r: seen.append(r["reused"])) == rows and seen == [True]


def test_an_evaluation_is_made_once_by_concurrent_ranks(tmp_path, monkeypatch):
    """Under torchrun the hard cell and the teacher cell of one set and student run on two ranks, and
    both need the hard evaluation (the teacher cell for HLR): one makes it, the other waits and reuses
    it instead of training the same students (and full-data reference) a second time."""
    import ddkit.bench as bench_mod
    from ddkit.bench import Cell, _Bench

    cfg = tiny_cfg(tmp_path / "run", ipcs=[1], seeds=[0], label_modes=["hard", "teacher"])
    bench = _Bench(cfg, None)
    bench.prepare()
    bench.world = 2  # as made under a 2-rank torchrun; each cell then runs whole on its rank
    cell = Cell(0, "synthetic", "random", 1, "tiny_convnet", "hard")
    protocol = cfg.protocol_for("tiny_convnet", "hard", ipc=1)
    calls, reports = twice_at_once(monkeypatch, bench_mod, "evaluate", lambda: bench._evaluate(cell, protocol))
    assert len(calls) == 1 and len(reports) == 2 and reports[0] == reports[1]


@pytest.mark.parametrize("over, message", [
    ({"students": ["tiny_convnet", "nosuch"]}, "student 'nosuch' on dataset 'synthetic': unknown model 'nosuch'"),
    ({"student_options": {"tiny_convnet": {"bogus": 1}}},
     "student 'tiny_convnet' on dataset 'synthetic': model 'tiny_convnet' has no option 'bogus'"),
    ({"student_options": {"tiny_convnet": {"width": 0}}}, "student 'tiny_convnet' on dataset 'synthetic': "),
    ({"ipc_overrides": {2: {"student_options": {"bogus": 1}}}}, "model 'tiny_convnet' has no option 'bogus'"),
])
def test_students_are_checked_before_any_stage_or_output(tmp_path, monkeypatch, capsys, over, message):
    """A bad student (or student option) used to fail only at its first cell: after the teacher, the
    distilled sets and the other students' cells, leaving the output folder full."""
    import ddkit.bench

    def no_stage(*a, **k):
        raise AssertionError("a stage ran before the students were checked")

    monkeypatch.setattr(ddkit.bench, "train_teacher", no_stage)
    monkeypatch.setattr(ddkit.bench, "distill", no_stage)
    out = tmp_path / "b"
    cfg = tiny_cfg(out, label_modes=["hard", "teacher"], **over)
    with pytest.raises(ConfigError, match=message):
        run_bench(cfg)
    assert not out.exists()
    path = tmp_path / "bench.yaml"
    path.write_text(json.dumps({**TINY, "label_modes": ["hard", "teacher"], **over, "out": str(out), "device": "cpu"}))
    assert main(["bench", str(path), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


_UNKNOWN_AUG = "unknown augmentation 'bogus'; valid: none, dsa, rrc_flip, flip, crop_flip"


@pytest.mark.parametrize("over, message", [
    ({"label_modes": ["fkd"], "relabel": {"top_k": 99}},
     "relabel.top_k must lie in [1, 4] (dataset 'synthetic' has 4 classes) or be null (all logits), got 99"),
    ({"label_modes": ["fkd"], "protocol": "edc", "relabel": {"top_k": 2}},
     "relabel.top_k = 2 stores top-k logits, which only train with loss 'kl', but the fkd protocol of student "
     "'tiny_convnet' at IPC 1 uses loss 'mse_ce'; set relabel.top_k: null (dense labels) or use a protocol whose "
     "soft-label loss is kl"),
    ({"label_modes": ["fkd"], "relabel": {"augment": "bogus"}}, f"relabel.augment: {_UNKNOWN_AUG}"),
    ({"label_modes": ["fkd"], "relabel": {"augment_options": {"zz": 1}}},
     "relabel.augment_options: augmentation 'rrc_flip' has no option(s) ['zz']; valid: scale_min, scale_max, "
     "ratio, flip_prob"),
    ({"label_modes": ["fkd"], "relabel": {"augment_options": {"scale_min": "x"}}},
     "relabel.augment_options.scale_min: expected a number, got 'x'"),
    ({"robust_scores": True, "ars_augment": "bogus"}, f"ars_augment: {_UNKNOWN_AUG}"),
    ({"label_modes": ["teacher"], "teacher": {"model": "nonexist"}},
     "teacher.model: unknown model 'nonexist'; see `ddkit list models` (one of your own: import the module that "
     "registers it first; the CLI imports those named in DDKIT_PLUGINS)"),
    ({"label_modes": ["teacher"], "teacher": {"model": "tiny_convnet", "model_options": {"width": 0}}},
     "teacher.model_options: ConvNet width must be a positive integer, got 0"),
    ({"teacher_pool": {"a": {"model": "nonexist"}}},
     "teacher_pool.a.model: unknown model 'nonexist'; see `ddkit list models` (one of your own: import the module "
     "that registers it first; the CLI imports those named in DDKIT_PLUGINS)"),
    ({"label_modes": ["teacher"], "teacher": {"model": "tiny_convnet", "checkpoint": "{tmp}/nofile.pt"}},
     "teacher.checkpoint: checkpoint '{tmp}/nofile.pt' not found; check --checkpoint (teacher.checkpoint in a config)"),
    ({"methods": [{"name": "sre2l", "options": {"extra_teachers": ["{tmp}/nope"]}}]},
     "methods[sre2l].options.extra_teachers: teacher artifact '{tmp}/nope' not found; check the path or "
     "create it first"),
    ({"label_modes": ["teacher"], "overrides": {**TINY["overrides"], "extra_teachers": ["{tmp}/nope"]}},
     "extra_teachers of protocol 'dc-protocol' for student 'tiny_convnet', IPC 1, label mode 'teacher': teacher "
     "artifact '{tmp}/nope' not found; check the path or create it first"),
])
def test_late_used_values_are_checked_before_any_stage_or_output(tmp_path, monkeypatch, over, message):
    """Relabel's, ARS's and the teachers' settings (and artifacts named by path) used to be refused only
    when the bench reached them: after teachers were trained and/or sets distilled, leaving config.json,
    teachers/, distilled/, labels/ or evals/ behind, with a message that did not name the config key."""
    import re

    import ddkit.bench

    def no_stage(*a, **k):
        raise AssertionError("a stage ran before the config was checked")

    monkeypatch.setattr(ddkit.bench, "train_teacher", no_stage)
    monkeypatch.setattr(ddkit.bench, "distill", no_stage)
    over = json.loads(json.dumps(over).replace("{tmp}", str(tmp_path)))
    message = message.replace("{tmp}", str(tmp_path))
    out = tmp_path / "b"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        run_bench(tiny_cfg(out, **{"ipcs": [1], **over}))
    assert not out.exists()


def test_late_used_values_fail_the_cli_in_one_line(tmp_path, capsys):
    out = tmp_path / "bo"
    path = tmp_path / "bc.yaml"
    path.write_text(json.dumps({**TINY, "ipcs": [1], "label_modes": ["fkd"], "relabel": {"top_k": 99}, "out": str(out),
                                "device": "cpu"}))
    assert main(["bench", str(path), "-q"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: relabel.top_k must lie in [1, 4] (dataset 'synthetic' has 4 classes) or be null (all "
                   "logits), got 99\n")
    assert not out.exists()


@pytest.mark.parametrize(("other_data", "over", "message"), [
    ({"num_classes": 3}, {"label_modes": ["teacher"], "overrides": {**TINY["overrides"], "extra_teachers": ["{x}"]}},
     "extra_teachers of protocol 'dc-protocol' for student 'tiny_convnet', IPC 1, label mode 'teacher': teacher "
     "'{x}' has 3 classes but dataset 'synthetic' has 4; use a teacher trained on this dataset"),
    ({"image_size": 12}, {"label_modes": ["fkd"], "overrides": {**TINY["overrides"], "extra_teachers": ["{x}"]}},
     "extra_teachers of protocol 'dc-protocol' for student 'tiny_convnet', IPC 1, label mode 'fkd': teacher "
     "'{x}' expects images [1, 12, 12] but dataset 'synthetic' has [1, 16, 16]; use the same image size"),
    ({"num_classes": 3}, {"methods": [{"name": "sre2l", "options": {"extra_teachers": ["{x}"]}}]},
     "methods[sre2l].options.extra_teachers: teacher '{x}' has 3 classes but dataset 'synthetic' has 4; use a "
     "teacher trained on this dataset"),
])
def test_extra_teachers_of_other_data_are_refused_before_any_stage(tmp_path, monkeypatch, other_data, over, message):
    """An extra teacher trained on other data (classes, image size) was refused only where it labelled or
    synthesised: after the bench had trained its teacher and distilled its sets (a protocol's, at its first cell).
    Its manifest is now checked against each dataset before any stage, naming the setting."""
    import ddkit.bench
    from ddkit.data.base import make_synthetic
    from ddkit.teacher import TeacherConfig, train_teacher
    from ddkit.training import TrainConfig

    extra = tmp_path / "other"
    train_teacher(make_synthetic(**other_data), TeacherConfig(model="tiny_convnet",
                                                             train=TrainConfig(epochs=1, batch_size=32)), extra)

    def no_stage(*a, **k):
        raise AssertionError("a stage ran before the extra teachers were checked")

    monkeypatch.setattr(ddkit.bench, "train_teacher", no_stage)
    monkeypatch.setattr(ddkit.bench, "distill", no_stage)
    over = json.loads(json.dumps(over).replace("{x}", str(extra)))
    out = tmp_path / "b"
    with pytest.raises(ConfigError, match=f"^{re.escape(message.replace('{x}', str(extra)))}$"):
        run_bench(tiny_cfg(out, **{"ipcs": [1], **over}))
    assert not out.exists()


def test_hard_cells_are_reused_when_only_extra_teachers_change(tmp_path):
    """Hard labels do not use the protocol's extra_teachers, but their count entered the cell's and the
    evaluation's keys: adding them to a bench trained its hard cells (and the hard evaluation behind every
    cell's HLR) again. They are now reused, with the same numbers."""
    from ddkit.data.base import make_synthetic
    from ddkit.teacher import TeacherConfig, train_teacher
    from ddkit.training import TrainConfig

    cfg = tiny_cfg(tmp_path / "run", ipcs=[1], seeds=[0])
    seen = []
    rows = run_bench(cfg, progress=lambda d, n, r: seen.append(r["reused"]))
    extra = str(tmp_path / "extra")
    train_teacher(make_synthetic(), TeacherConfig(model="tiny_convnet", train=TrainConfig(epochs=1, batch_size=32)),
                  extra)
    more = tiny_cfg(tmp_path / "run", ipcs=[1], seeds=[0],
                    overrides={**TINY["overrides"], "extra_teachers": [extra]})
    assert run_bench(more, progress=lambda d, n, r: seen.append(r["reused"])) == rows
    assert seen == [False, True]


def test_relabel_settings_that_fit_pass_the_early_checks(tmp_path, monkeypatch):
    """top_k equal to the class count is stored dense, so it needs no kl loss; relabel settings are not
    asked of a bench without label mode fkd; a hard-label bench trains no teacher, so its model is not built."""
    from ddkit.bench import _Bench

    _Bench(tiny_cfg(tmp_path / "a", label_modes=["fkd"], protocol="edc", relabel={"top_k": 4}))
    _Bench(tiny_cfg(tmp_path / "b", relabel={"top_k": 99}))
    _Bench(tiny_cfg(tmp_path / "c", teacher={"model": "nonexist"}))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("over", "message"), [
    ({"ipcs": [1, 1]}, r"ipcs \[1, 1\] repeat an entry \(the same cells twice\); list each once"),
    ({"label_modes": ["hard", "hard"]}, r"label_modes \['hard', 'hard'\] repeat an entry"),
    ({"students": ["tiny_convnet", "tiny_convnet"]}, r"students \['tiny_convnet', 'tiny_convnet'\] repeat an entry"),
])
def test_repeated_matrix_entries_are_refused(tmp_path, over, message):
    """ipcs: [1, 1] or label_modes: [hard, hard] wrote every row twice."""
    with pytest.raises(ConfigError, match=message):
        tiny_cfg(tmp_path / "b", **over)


def test_learned_lr_protocol_for_a_method_without_one_is_refused_before_any_output(tmp_path):
    """mtt-protocol (learned_lr) with a method that learns no lr failed after the teacher and sets were made."""
    cfg = tiny_cfg(tmp_path / "b", protocol="mtt-protocol")
    with pytest.raises(ConfigError, match=r"^method 'random': the protocol trains students with the set's learned lr "
                                          r"\(learned_lr: true\), but method 'random' learns none"):
        run_bench(cfg)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"nope": 1}, "unknown config key 'overrides.nope'"),
    ({"train": {"epochs": "abc"}}, "overrides.train.epochs: expected an integer, got 'abc'"),
])
def test_bench_override_errors_name_the_overrides_key(tmp_path, overrides, message):
    """Errors in a bench's overrides named them `protocol.*`, a key the bench config does not have."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny_cfg(tmp_path / "run", overrides=overrides)


def test_bench_method_errors_name_the_methods_options_key(tmp_path, monkeypatch):
    """An error a method raises while it synthesises (a network too deep for the images, experts trained on
    the fly too) named distill.options.*, a key a bench config does not have."""
    monkeypatch.setenv("DDKIT_CACHE", str(tmp_path / "cache"))
    deep = {"name": "dm", "label": "deep",
            "options": {"model": "convnet3", "model_options": {"depth": 5}, "iterations": 1}}
    with pytest.raises(ConfigError, match=r"^methods\[deep\]\.options\.model_options: image size 16 is too small"):
        run_bench(tiny_cfg(tmp_path / "a", methods=[deep], ipcs=[1], label_modes=["hard"]))
    experts = {"name": "mtt", "options": {"buffer": {"model": "convnetd5", "num_experts": 1, "epochs": 2},
                                          "expert_epochs": 1, "max_start_epoch": 1}}
    with pytest.raises(ConfigError,
                       match=r"^methods\[mtt\]\.options\.buffer\.model_options: image size 16 is too small"):
        run_bench(tiny_cfg(tmp_path / "b", methods=[experts], ipcs=[1], label_modes=["hard"]))


def test_method_image_dtype_stores_the_bench_set_as_uint8(tmp_path):
    """methods[].image_dtype reaches the set: the same sre2l set stored as uint8 holds the float
    one's pixels rounded, in a quarter of the image bytes, and the table's rows say so."""
    opts = {"iterations": 2, "stats": "conv"}
    cfg = tiny_cfg(tmp_path / "run", ipcs=[2], seeds=[0], overrides={"full_epochs": 1, "train": {"epochs": 1}},
                   methods=[{"name": "sre2l", "label": "f32", "options": opts},
                            {"name": "sre2l", "label": "u8", "options": opts, "image_dtype": "uint8"}])
    assert from_dict(BenchConfig, {**TINY, "out": "x", "methods": ["random"]}).methods[0].image_dtype == "float32"
    rows = {r["method"]: r for r in run_bench(cfg)}
    sets = {m: ddkit.load(tmp_path / "run" / "distilled" / f"synthetic-{m}-ipc2") for m in ("f32", "u8")}
    assert sets["f32"].images.dtype == torch.float32 and sets["u8"].images.dtype == torch.uint8
    assert torch.equal(sets["u8"].images, (sets["f32"].images.clamp(0, 1) * 255).round().to(torch.uint8))
    assert rows["u8"]["bytes"]["images"] * 4 == rows["f32"]["bytes"]["images"] == sets["f32"].images.numel() * 4
    with pytest.raises(ConfigError, match="image_dtype"):
        tiny_cfg(tmp_path / "bad", methods=[{"name": "random", "image_dtype": "float16"}])


def test_edited_numbers_in_cells_cached_evaluations_and_the_full_reference_are_not_republished(tmp_path, caplog):
    """A cell, a cached evaluation or a full-data reference cache entry whose mean was edited (its per_seed
    left as it was) was reused as it stood: the table said 99.00 next to an IOR computed from the seeds. Each
    is made again, with a warning naming the file, and the table holds the seeds' own numbers."""
    import os
    from pathlib import Path

    out = tmp_path / "b"
    cfg = tiny_cfg(out, ipcs=[1])
    (row,) = run_bench(cfg)
    cell = out / "cells" / f"{row['cell']}.json"
    edited = json.loads(cell.read_text())
    edited["acc"]["mean"] = 0.99
    cell.write_text(json.dumps(edited))
    with caplog.at_level("WARNING"):
        (again,) = run_bench(cfg)
    assert again["acc"] == row["acc"]
    assert (f"bench cell {cell} holds acc mean 0.99, not the mean of its per_seed {row['acc']['per_seed']} "
            f"({row['acc']['mean']!r}); the cell is damaged: computing it again") in caplog.text

    (ev,) = (out / "evals").glob("*.json")
    report = json.loads(ev.read_text())
    report["results"]["distilled"]["n"] = 5
    ev.write_text(json.dumps(report))
    (reference,) = (Path(os.environ["DDKIT_CACHE"]) / "full-reference").glob("*.json")
    entry = json.loads(reference.read_text())
    entry["result"]["mean"] = 0.01
    reference.write_text(json.dumps(entry))
    cell.unlink()
    caplog.clear()
    with caplog.at_level("WARNING"):
        (again,) = run_bench(cfg)
    assert strip([again]) == strip([row])
    assert (f"evaluation report {str(ev)!r} holds results.distilled n 5 for 2 per_seed values; evaluating again"
            in caplog.text)
    assert (f"cache entry {reference} is damaged (result mean 0.01, not the mean of its per_seed "
            f"{row['full_hard']['per_seed']} ({row['full_hard']['mean']!r})); computing it again") in caplog.text
    assert json.loads(reference.read_text())["result"]["mean"] == row["full_hard"]["mean"]


def test_old_form_stage_progress_warning_names_the_callers_line(monkeypatch):
    """run_bench's DeprecationWarning for an old-form stage_progress names the line that called run_bench (through
    run_bench's wrapper, which puts the stage in its own numeric modes), not ddkit's."""
    import ddkit.bench

    def stop(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ddkit.bench, "_Bench", stop)
    with pytest.warns(DeprecationWarning, match="now calls stage_progress") as warned, pytest.raises(KeyboardInterrupt):
        run_bench(None, stage_progress=lambda what, done, total: None)
    assert [w.filename for w in warned] == [__file__]


@pytest.mark.parametrize("first", ["what", "label", "stage", "name", "desc"])
def test_old_form_stage_progress_is_told_by_its_first_parameters_name(first):
    """A (stage, done, total) callback was taken for the new form and called with (int, int, dict)."""
    import inspect

    from ddkit.evaluate.runner import progress_form

    seen = []

    def old(*args):
        seen.append(args)

    old.__signature__ = inspect.Signature(  # (first, done, total), as the user named them
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in (first, "done", "total")])
    with pytest.warns(DeprecationWarning, match=r"now calls stage_progress\(step, total, record\)"):
        wrapped = progress_form(old, "run_bench", "stage_progress")
    wrapped(2, 5, {"stage": "teacher synthetic", "loss": 0.5})
    assert seen == [("teacher synthetic", 2, 5)]

    def new(step, total, record):
        seen.append((step, total, record["stage"]))

    assert progress_form(new, "run_bench", "stage_progress") is new


def test_bench_records_its_relative_paths_absolute(tmp_path, monkeypatch):
    """A bench's config.json and bench.json recorded `protocol: proto.yaml` as given, read against the working
    folder: from another folder the recorded config read another file or none. Recorded absolute, it re-runs from
    anywhere and reuses every cell; "@name" references to the teacher pool stay as they are."""
    import yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "proto.yaml").write_text("student: tiny_convnet\nfull_reference: false\ntrain: {epochs: 1}\n")
    cfg = {**TINY, "ipcs": [1], "seeds": [0], "protocol": "proto.yaml", "out": "b",  # no reference: no full_epochs
           "overrides": {k: v for k, v in TINY["overrides"].items() if k != "full_epochs"}}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["bench", "b.yaml", "--device", "cpu", "-q"]) == 0
    for name in ("config.json", "bench.json"):
        assert json.loads((tmp_path / "b" / name).read_text())["config"]["protocol"] == str(tmp_path / "proto.yaml")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "elsewhere/again.json").write_text(json.dumps(
        {**json.loads((tmp_path / "b/config.json").read_text())["config"], "out": str(tmp_path / "b")}))
    seen = []
    run_bench(load_bench_config("again.json"), progress=lambda d, n, row: seen.append(row))
    assert [r["reused"] for r in seen] == [True]
    seen.clear()  # the bench folder's own record runs again as it is (README), not refused as a record
    run_bench(load_bench_config(tmp_path / "b/config.json"), progress=lambda d, n, row: seen.append(row))
    assert [r["reused"] for r in seen] == [True]
    pooled = tiny_cfg(tmp_path / "p", methods=[{"name": "gvbsm", "options": {"extra_teachers": ["@d2", "t2"]}}],
                      teacher_pool={"d2": {"model": "tiny_convnet"}}, overrides={"extra_teachers": ["t3"]})
    record = pooled.record()
    assert record["methods"][0]["options"]["extra_teachers"] == ["@d2", str(tmp_path / "elsewhere/t2")]
    assert record["overrides"]["extra_teachers"] == [str(tmp_path / "elsewhere/t3")]


def test_a_recorded_bench_finds_the_extra_teachers_its_protocol_file_names_from_any_folder(tmp_path, monkeypatch):
    """A bench's config.json recorded its protocol YAML absolute, but the `extra_teachers: [T4]` inside that file
    stayed relative to the working folder: from another folder the recorded config failed ("teacher artifact 'T4'
    not found"), or labelled with another folder's T4. The record names the file's teachers absolute in
    overrides; from anywhere it reuses every cell (the same keys: hashes count and weigh the teachers)."""
    import yaml

    monkeypatch.chdir(tmp_path)
    assert main(["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", "1", "--out", "T4",
                 "-q"]) == 0
    (tmp_path / "p.yaml").write_text("student: tiny_convnet\nextra_teachers: [T4]\nfull_reference: false\n"
                                     "random_baseline: false\ntrain: {epochs: 1}\n")
    cfg = {**TINY, "ipcs": [1], "seeds": [0], "label_modes": ["teacher"], "protocol": "p.yaml", "out": "b",
           "overrides": {"train": {"epochs": 1, "batch_size": 32}}}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["bench", "b.yaml", "--device", "cpu", "-q"]) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    recorded = {**json.loads((tmp_path / "b/config.json").read_text())["config"], "out": str(tmp_path / "b")}
    seen = []
    run_bench(from_dict(BenchConfig, recorded), progress=lambda d, n, row: seen.append(row))
    assert [(r["label_mode"], r["reused"]) for r in seen] == [("teacher", True)]
    assert recorded["overrides"] == {"extra_teachers": [str(tmp_path / "T4")], "train": {"batch_size": 32, "epochs": 1}}


def test_more_seeds_train_only_the_new_seeds_students(tmp_path, monkeypatch):
    """A bench given seeds 0,1 after seed 0 trained the cell's seed-0 students again (its evaluations are keyed by
    the seed list); each student is now cached on its own: only seed 1's train, with the numbers of a bench run with
    seeds 0,1 from scratch."""
    import ddkit.evaluate.runner as runner

    monkeypatch.setenv("DDKIT_CACHE", str(tmp_path / "fresh-cache"))
    fresh = run_bench(tiny_cfg(tmp_path / "fresh", ipcs=[1], seeds=[0, 1]))
    monkeypatch.setenv("DDKIT_CACHE", str(tmp_path / "cache"))
    run_bench(tiny_cfg(tmp_path / "b", ipcs=[1], seeds=[0]))
    trained, real = [], runner._train_student
    monkeypatch.setattr(runner, "_train_student", lambda *a, **k: trained.append((len(a[0]), a[4])) or real(*a, **k))
    rows = run_bench(tiny_cfg(tmp_path / "b", ipcs=[1], seeds=[0, 1]))
    assert trained == [(4, 1), (4, 1)]  # seed 1's set and random subset (1 image of 4 classes each)
    assert strip(rows) == strip(fresh) and rows[0]["seeds"] == [0, 1] and rows[0]["acc"]["n"] == 2
