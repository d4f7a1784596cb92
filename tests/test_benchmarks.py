"""Benchmark scripts: the results tables benchmarks/fashion_mnist.py writes from bench JSON (no
training here) and benchmarks/unroll_memory.py end to end on a tiny student."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from ddkit.data.base import SYSTEM_DATA_DIR


def _script(name):
    if str(REPO / "benchmarks") not in sys.path:  # as when run as a script: scripts import their helper _cli
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fm():
    return _script("fashion_mnist")


def _row(label, method, ipc, acc, rand, mode="hard", student="convnet3-w32"):
    stat = lambda m: {"mean": m, "std": 0.01, "per_seed": [m, m, m], "n": 3}
    return {"method": label, "method_name": method, "ipc": ipc, "label_mode": mode, "student": student,
            "acc": stat(acc), "random": stat(rand), "ior": stat(acc - rand)}


def test_best_sets_keeps_runs_built_on_the_tier(fm, tmp_path, monkeypatch):
    configs, results = tmp_path / "configs", tmp_path / "results"
    configs.mkdir()
    results.mkdir()
    (configs / "fashion-mnist-matching-cpu.yaml").write_text("ipcs: [1, 10]\n")
    (configs / "fashion-mnist-child-cpu.yaml").write_text("base: fashion-mnist-matching-cpu.yaml\n")
    (configs / "fashion-mnist-grandchild-cpu.yaml").write_text("base: fashion-mnist-child-cpu.yaml\n")
    (configs / "fashion-mnist-other-cpu.yaml").write_text("ipcs: [10]\n")  # not built on the tier
    # built on the tier but training students otherwise: at IPC 10 only, and at every IPC
    (configs / "fashion-mnist-longer-cpu.yaml").write_text(
        "base: fashion-mnist-matching-cpu.yaml\nipc_overrides: {10: {train: {epochs: 600}}}\n")
    (configs / "fashion-mnist-augmented-cpu.yaml").write_text(
        "base: fashion-mnist-matching-cpu.yaml\noverrides: {train: {augment: dsa}}\n")
    (configs / "fashion-mnist-otherstudent-cpu.yaml").write_text("base: fashion-mnist-matching-cpu.yaml\n")
    (configs / "fashion-mnist-learned-cpu.yaml").write_text(
        "base: fashion-mnist-matching-cpu.yaml\noverrides: {learned_lr: true}\n")
    monkeypatch.setattr(fm, "EXTRAS", {"child": "", "grandchild": "", "other": "", "longer": "", "augmented": "",
                                       "learned": "", "otherstudent": ""})

    def write(name, rows):
        (results / f"{name}-fashion-mnist-cpu.json").write_text(json.dumps({"rows": rows}))

    write("matching", [_row("random", "random", 1, 0.55, 0.53), _row("mtt", "mtt", 1, 0.60, 0.53),
                       _row("mtt", "mtt", 10, 0.70, 0.74), _row("dm", "dm", 10, 0.76, 0.74)])
    write("child", [_row("mtt-e8", "mtt", 10, 0.80, 0.745), _row("mtt-e8", "mtt", 10, 0.90, 0.745, mode="stored"),
                    _row("random", "random", 10, 0.749, 0.745)])
    write("grandchild", [_row("mtt-x1", "mtt", 10, 0.82, 0.74), _row("dm-big", "dm", 1, 0.65, 0.53),
                         _row("mtt-r18", "mtt", 10, 0.95, 0.74, student="resnet18")])
    write("other", [_row("mtt-other", "mtt", 10, 0.99, 0.74), _row("dm-other", "dm", 1, 0.99, 0.53)])
    write("longer", [_row("mtt-long", "mtt", 10, 0.99, 0.70), _row("dm-long", "dm", 1, 0.64, 0.53),
                     _row("random", "random", 10, 0.70, 0.70)])
    write("augmented", [_row("mtt-aug", "mtt", 10, 0.99, 0.74), _row("dm-aug", "dm", 1, 0.99, 0.53)])
    write("learned", [_row("mtt-learned", "mtt", 10, 0.99, 0.74)])
    write("otherstudent", [{**_row("mtt-p3", "mtt", 10, 0.99, 0.74), "student": "convnet3-w32-p3"}])

    text = "\n".join(fm.best_sets(results, configs=configs))
    assert "matching tier, child, grandchild, longer (" in text and "other" not in text and "augmented" not in text
    assert "mtt-long" not in text and "-aug`" not in text and "learned" not in text and "otherstudent" not in text
    table = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in text.splitlines()
             if line.startswith("| ")}
    # mtt at IPC 10: the grandchild's 82.00 beats the tier's and the child's; stored and ResNet rows never count
    assert table["mtt"][1].startswith("82.00 ± 1.00 (+8.00; `mtt-x1`, grandchild; 3)")
    assert table["mtt"][0].startswith("60.00 ± 1.00 (+7.00; `mtt`, matching tier; 1)")
    # dm at IPC 1: longer trains as the tier there, so its set counts (a 2nd try) without beating dm-big
    assert table["dm"][0].startswith("65.00 ± 1.00 (+12.00; `dm-big`, grandchild; 2)")
    assert "- IPC 10: mtt 82.00 > dm 76.00; random rows of these runs 74.90-74.90." in text
    assert "- IPC 1: dm 65.00 > mtt 60.00; random rows of these runs 55.00-55.00." in text
    (results / "matching-fashion-mnist-cpu.json").unlink()
    assert fm.best_sets(results, configs=configs) == []


def test_single_protocol_table_per_student_and_ipc(fm, tmp_path):
    """The decoupled family's one-protocol table gathers one run per IPC; findings name the best set and
    whether the best EDC configuration leads its family and beats random by more than the stds."""
    def write(name, rows):
        (tmp_path / f"{name}-fashion-mnist-cpu.json").write_text(json.dumps({"rows": rows}))

    r18 = "resnet18_cifar"
    write("long1", [_row("random", "random", 1, 0.50, 0.50, "teacher"), _row("rded", "rded", 1, 0.60, 0.50, "teacher"),
                    _row("edc", "edc", 1, 0.55, 0.50, "teacher"), _row("edc-s05", "edc", 1, 0.605, 0.50, "teacher"),
                    _row("rded", "rded", 1, 0.40, 0.45, "teacher", r18),
                    _row("edc", "edc", 1, 0.46, 0.45, "teacher", r18)])
    write("long50", [_row("rded", "rded", 50, 0.80, 0.82, "teacher"), _row("edc", "edc", 50, 0.81, 0.82, "teacher"),
                     _row("edc-A", "edc", 50, 0.99, 0.82, "teacher")])  # an ablation row: left out
    assert fm.single_protocol(tmp_path, ("nothing",)) == []
    text = "\n".join(fm.single_protocol(tmp_path, ("long1", "long10", "long50")))
    assert "[long1](long1-fashion-mnist-cpu.md), [long50](long50-fashion-mnist-cpu.md)" in text and "long10" not in text
    assert "| random subset (baseline) | 50.00 ± 1.00 | 82.00 ± 1.00 |" in text
    assert "| edc-s05 | 60.50 ± 1.00 (+10.50) | – |" in text and "edc-A" not in text
    assert ("- IPC 1: best set edc-s05 (60.50 ± 1.00); best EDC `edc-s05` 60.50 ± 1.00, leads the family, beats random "
            "by more than the stds together (+10.50 against 50.00 ± 1.00).") in text
    assert ("- IPC 50: best set edc (81.00 ± 1.00); best EDC `edc` 81.00 ± 1.00, leads the family, does not beat "
            "random (-1.00 against 82.00 ± 1.00).") in text
    r18_part = text.split(f"Student {r18}:")[1]
    assert "| random subset (baseline) | 45.00 ± 1.00 | – |" in r18_part
    assert "best EDC `edc` 46.00 ± 1.00, leads the family, above random, inside the stds (+1.00" in r18_part
    write("long1", [_row("rded", "rded", 1, 0.62, 0.50, "teacher"), _row("edc", "edc", 1, 0.55, 0.50, "teacher")])
    assert "is behind rded (62.00 ± 1.00)" in "\n".join(fm.single_protocol(tmp_path, ("long1",)))


def test_edc_steps_table_shows_each_step_against_the_row_it_adds_to(fm, tmp_path):
    def write(name, rows):
        (tmp_path / f"{name}-fashion-mnist-cpu.json").write_text(json.dumps({"rows": rows}))

    assert fm.edc_steps(tmp_path, ("b1", "b10")) == []
    write("b10", [_row("edc-A", "edc", 10, 0.40, 0.78, "teacher"), _row("edc-AB", "edc", 10, 0.72, 0.78, "teacher"),
                  _row("edc-ABD", "edc", 10, 0.723, 0.78, "teacher"), _row("sre2l", "sre2l", 10, 0.3, 0.78, "teacher")])
    write("b1", [_row("edc-A", "edc", 1, 0.30, 0.50, "teacher"), _row("edc-AB", "edc", 1, 0.35, 0.50, "teacher")])
    text = "\n".join(fm.edc_steps(tmp_path, ("b1", "b10")))
    assert "| random subset (baseline) | 50.00 ± 1.00 | 78.00 ± 1.00 |" in text
    assert ("| `edc-A`: A: G-VBSM's core in EDC's loop (noise init; unlike `gvbsm`, no logit matching, conv dropout, "
            "densification or all-slot batches) | 30.00 ± 1.00 | 40.00 ± 1.00 |" in text)
    assert ("| `edc-AB`: + B: real-image init (RDED's output; iterations not halved) | 35.00 ± 1.00 (+5.00) | "
            "72.00 ± 1.00 (+32.00) |" in text)
    assert "| `edc-ABD`: + D: flatness regularisation | – | 72.30 ± 1.00 (+0.30) |" in text
    assert "sre2l" not in text  # not a step
    assert ("- IPC 10: largest step + B: real-image init (RDED's output; iterations not halved) (+32.00); "
            "steps within 0.5 "
            "point: 1 of 2." in text)


def test_family_markdown_names_each_students_full_data_reference(fm):
    """A bench with two students printed the first row's reference as "same student" for both."""
    full = lambda m: {"mean": m, "std": 0.0, "per_seed": [m, m, m], "n": 3, "epochs": 2}
    base = {"label_mode": "hard", "ior": None, "hlr": None, "bytes": {"images": 1, "labels": 1},
            "synthesis": {"seconds": 1.0, "peak_memory_bytes": None}, "versions": {}, "protocol_hash": "abc",
            "method": "sre2l", "method_name": "sre2l", "acc": full(0.5), "random": full(0.4)}
    rows = [{**base, "ipc": 1, "student": "resnet18_cifar", "full_hard": full(0.8235)},
            {**base, "ipc": 1, "student": "convnet3-w32", "full_hard": full(0.8183)},
            {**base, "ipc": 10, "student": "resnet18_cifar", "full_hard": full(0.8235)}]
    cfg = {"label_modes": ["hard"], "seeds": [0], "protocol": "p", "overrides": {}}
    line = lambda rows: [x for x in fm.family_markdown("x", "cpu", {"rows": rows, "config": cfg}).splitlines()
                         if x.startswith("Full-data")]
    pub = "(published whole-dataset ConvNet-3, 300 epochs: 93.5)."
    assert line(rows) == ["Full-data reference (each row's own student, hard labels, 2 epochs): "
                          f"resnet18_cifar 82.35 %, convnet3-w32 81.83 % {pub}"]
    assert line([rows[0], rows[2]]) == [f"Full-data reference (same student, hard labels, 2 epochs): 82.35 % {pub}"]
    rows[1]["full_hard"]["epochs"] = 5
    assert line(rows) == ["Full-data reference (each row's own student, hard labels): "
                          f"resnet18_cifar 82.35 % (2 epochs), convnet3-w32 81.83 % (5 epochs) {pub}"]
    assert line([{k: v for k, v in r.items() if k != "full_hard"} for r in rows]) == []


def test_family_markdown_shows_accuracy_with_and_without_augmentation(fm):
    stat = lambda *xs: {"mean": sum(xs) / len(xs), "std": 0.0, "per_seed": list(xs), "n": len(xs)}
    base = {"student": "convnet3-w32", "label_mode": "hard", "ior": None, "hlr": None,
            "bytes": {"images": 1, "labels": 1}, "synthesis": {"seconds": 1.0, "peak_memory_bytes": None},
            "versions": {}, "protocol_hash": "abc"}
    rows = [{**base, "method": "dsa", "method_name": "dsa", "ipc": 10, "acc": stat(0.80), "random": stat(0.76),
             "aug_acc": stat(0.80, 0.82), "aug_random": stat(0.76), "noaug_acc": stat(0.75), "noaug_random": stat(0.74),
             "ars": {"mean": 0.5123}},
            {**base, "method": "dm", "method_name": "dm", "ipc": 10, "acc": stat(0.7), "random": stat(0.76)}]
    cfg = {"label_modes": ["hard"], "seeds": [0, 1], "protocol": "dsa-protocol", "overrides": {}}
    text = fm.family_markdown("dsa-eval", "cpu", {"rows": rows, "config": cfg})
    section = text.split("### With and without augmentation")[1].split("\n\n")[1].splitlines()
    # only the robust row; gain from augmentation = 81.00 - 75.00 points; one seed's value without ±
    assert section[2:] == ["| dsa | 10 | convnet3-w32 | hard | 81.00 ± 0.00 | 76.00 | 75.00 | 74.00 | +6.00 | 0.512 |"]
    assert "With and without" not in fm.family_markdown("x", "cpu", {"rows": rows[1:], "config": cfg})
    # students that diverged: the bench leaves ARS out (None), which the table used to index (TypeError)
    rows[0] = {**rows[0], "ars": None, "aug_acc": {**stat(0.0, 0.0), "diverged": 2}}
    text = fm.family_markdown("dsa-eval", "cpu", {"rows": rows, "config": cfg})
    # their accuracies carry the bench's "(N diverged)" mark, and no gain from augmentation is computed from them
    assert text.split("### With and without augmentation")[1].split("\n\n")[1].splitlines()[2] == (
        "| dsa | 10 | convnet3-w32 | hard | 0.00 ± 0.00 (2 diverged) | 76.00 | 75.00 | 74.00 | – | – |")


def _published_column(fm, rows, cfg):
    """(method, student) -> the published column of family_markdown's table of ``rows`` under bench ``cfg``."""
    text = fm.family_markdown("x", "cpu", {"rows": rows, "config": cfg})
    cells = [line.split("|") for line in text.splitlines() if line.startswith("| ") and line.count("|") == 15]
    return {(c[1].strip(), c[3].strip()): c[9].strip() for c in cells[1:]}


def test_family_markdown_shows_published_numbers_only_beside_the_papers_evaluation(fm):
    """The published column stood beside any hard-label dc/dsa/random row: DSA-augmented dc, ZCA-whitened
    random, a ResNet student; now only where the students train as the paper's (its epochs and the
    ConvNet-3's width and padding aside)."""
    stat = {"mean": 0.8, "std": 0.01, "per_seed": [0.8, 0.8, 0.8], "n": 3}
    base = {"label_mode": "hard", "ipc": 10, "acc": stat, "random": stat, "ior": None, "hlr": None,
            "bytes": {"images": 1, "labels": 1}, "synthesis": {"seconds": 1.0, "peak_memory_bytes": None},
            "versions": {}, "protocol_hash": "abc"}
    rows = [{**base, "method": m, "method_name": m, "student": s}
            for m, s in (("dc", "convnet3-w32"), ("dsa", "convnet3-w32"), ("random", "convnet3-w32"),
                         ("random", "resnet18_cifar"), ("dc", "convnet3-w32-p3"), ("dc", "convnet3-w32-bn"))]
    cfg = {"label_modes": ["hard"], "seeds": [0], "ipcs": [10], "protocol": "dc-protocol",
           "students": ["convnet3-w32", "resnet18_cifar", "convnet3-w32-p3", "convnet3-w32-bn"],
           "overrides": {"train": {"epochs": 150}}}
    assert _published_column(fm, rows, cfg) == {
        ("dc", "convnet3-w32"): "82.3 ± 0.4", ("dsa", "convnet3-w32"): "–",  # DSA's number is with augmentation
        ("random", "convnet3-w32"): "73.8 ± 0.7", ("random", "resnet18_cifar"): "–",
        ("dc", "convnet3-w32-p3"): "82.3 ± 0.4", ("dc", "convnet3-w32-bn"): "–"}
    got = _published_column(fm, rows, {**cfg, "protocol": "dsa-protocol", "overrides": {}})
    assert (got["dc", "convnet3-w32"], got["dsa", "convnet3-w32"], got["random", "convnet3-w32"]) == (
        "–", "84.6 ± 0.3", "–")
    got = _published_column(fm, rows, {**cfg, "overrides": {"zca": True}})
    assert got["dc", "convnet3-w32"] == got["random", "convnet3-w32"] == "–"
    # a student option counts as the student's name does
    got = _published_column(fm, rows, {**cfg, "student_options": {"convnet3-w32": {"norm": "batchnorm"}}})
    assert got["dc", "convnet3-w32"] == "–" and got["dc", "convnet3-w32-p3"] == "82.3 ± 0.4"


def test_family_markdown_states_student_options_and_peak_memory_in_mib(fm):
    """The header never named the bench's student_options (a width-8 ResNet-18 read as `resnet18_cifar`),
    and the memory column said MB of a value in 2^20 bytes."""
    stat = {"mean": 0.8, "std": 0.01, "per_seed": [0.8, 0.8, 0.8], "n": 3}
    row = {"method": "sre2l", "method_name": "sre2l", "ipc": 1, "student": "resnet18_cifar", "label_mode": "teacher",
           "acc": stat, "random": stat, "ior": None, "hlr": None, "bytes": {"images": 1, "labels": 1},
           "synthesis": {"seconds": 1.0, "peak_memory_bytes": 3 * 2**20}, "versions": {}, "protocol_hash": "abc"}
    cfg = {"label_modes": ["teacher"], "seeds": [0], "protocol": "soft-kl", "overrides": {},
           "student_options": {"resnet18_cifar": {"width": 8}}}
    lines = fm.family_markdown("x", "cpu", {"rows": [row], "config": cfg}).splitlines()
    assert "student seeds [0]; student options `{'resnet18_cifar': {'width': 8}}`; protocol `soft-kl`" in lines[2]
    header, _, cells = (line.split("|") for line in lines[4:7])
    assert header[12].strip() == "peak MiB" and cells[12].strip() == "3.0"
    assert "student options" not in fm.family_markdown("x", "cpu", {"rows": [row], "config": {
        **cfg, "student_options": {}}})


def test_findings_name_the_test_they_apply_to_a_tie_with_random(fm):
    """A set 1.5 of either std from random (0.01 each) was listed "within one std of random"."""
    rows = [_row("a", "a", 1, 0.600, 0.585), _row("b", "b", 1, 0.700, 0.585), _row("c", "c", 1, 0.560, 0.585)]
    assert fm.findings(rows, [1])[1] == ("- IPC 1: best b (70.00 ± 1.00 %); below the random subset: c; within the sum "
                                         "of their stds of random: a.")


def test_derives_from_stops_on_a_loop(fm, tmp_path):
    a, b, c = (tmp_path / f"{n}.yaml" for n in "abc")
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    c.write_text("ipcs: [1]\n")
    assert not fm._derives_from(a, c) and fm._derives_from(a, b) and fm._derives_from(c, c)


# ------------------------------------------------------------------------------------------------
# benchmarks/unroll_memory.py


def test_unroll_memory_graph_grows_for_mtt_only(tmp_path):
    out = tmp_path / "um.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "unroll_memory.py"), "--models", "tiny_convnet",
           "--steps", "2", "6", "--ipc", "2", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {(r["mode"], r["steps"]): r for r in result["rows"]}
    assert len(rows) == 6 and all(r["params"] > 0 and r["seconds"] > 0 for r in rows.values())
    # MTT keeps every step's graph; TESLA one step's (its size varies with the DSA operation drawn)
    assert rows["unroll", 6]["graph_mb"] > 2.5 * rows["unroll", 2]["graph_mb"]
    for mode in ("exact", "first_order"):
        assert rows[mode, 6]["graph_mb"] < 1.2 * rows[mode, 2]["graph_mb"]
        assert rows[mode, 6]["graph_mb"] < rows["unroll", 6]["graph_mb"] / 2
    # TESLA's exact pass is MTT's gradient; first order is an approximation, near but not equal
    assert rows["exact", 6]["rel_err"] < 1e-4
    assert 1e-6 < rows["first_order", 6]["rel_err"] < 0.5
    (check,) = result["precision"]
    err = {(e["dtype"], e["mode"]): e["rel_err"] for e in check["errors"]}
    assert check["steps"] == 2 and len(err) == 5
    assert err["float64", "exact"] < 1e-12 < err["float32", "unroll"] < 1e-4
    assert err["float64", "first_order"] > 1e-6
    assert rows["exact", 2]["loss"] == pytest.approx(rows["unroll", 2]["loss"], rel=1e-5)
    growth = {g["mode"]: g for g in result["growth"]}
    assert growth["exact"]["graph_ratio"] < 1.2 and growth["unroll"]["graph_ratio"] > 2.5
    md = out.with_suffix(".md").read_text()
    assert result["command"] == "python benchmarks/unroll_memory.py " + " ".join(cmd[2:])
    assert f"`{result['command']}` on cpu" in md and "![memory against steps](um.png)" in md
    assert "| tiny_convnet |" in md and "TESLA (exact)" in md and "| tiny_convnet | 2 | MTT (unrolled) |" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))


def test_tier_cost_clock_extrapolates_from_the_reported_steps(monkeypatch):
    tc = _script("tier_cost")
    clock = tc.Clock(__import__("torch").device("cpu"), budget=None)
    times = iter([10.0, 12.0, 12.5, 13.0, 13.5, 14.0])  # start; steps 1..4 each 0.5 s after 2 s of set-up; end
    monkeypatch.setattr(tc.time, "perf_counter", lambda: next(times))
    with clock:
        clock(1, 100, {"statistics_pass": 1.0})  # a set-up report: not a step
        for step in range(1, 5):
            clock(step, 100, {"loss": 1.0})
    est = clock.estimate()
    assert est["per_unit_s"] == pytest.approx(0.5) and est["setup_s"] == pytest.approx(1.5)
    assert est["units"] == 100 and est["total_s"] == pytest.approx(1.5 + 0.5 * 100) and est["measured_s"] == 4.0
    assert clock.estimate(units=10)["total_s"] == pytest.approx(1.5 + 5.0)


def test_tier_cost_times_every_stage_of_a_bench_config(tmp_path):
    tc = _script("tier_cost")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "datasets: [synthetic]\nipcs: [1, 2]\nstudents: [tiny_convnet]\nlabel_modes: [teacher]\nseeds: [0, 1]\n"
        "protocol: soft-kl\noverrides: {full_epochs: 3}\n"
        "teacher: {model: tiny_convnet, train: {epochs: 4, batch_size: 32}}\n"
        "methods:\n  - random\n  - name: sre2l\n    options: {iterations: 6, stats: conv}\n"
        "  - name: mtt\n    options: {iterations: 5, syn_steps: 2, buffer: {model: tiny_convnet, num_experts: "
        "3, epochs: 6}}\n    ipc_options: {2: {iterations: 7}}\n"
        "method_ipcs: {sre2l: [2]}\n")
    out = tmp_path / "cost.json"
    result = tc.main([str(cfg), "--device", "cpu", "--budget", "0.05", "--out", str(out)])
    rows = {(r["stage"], r["item"]): r for r in result["rows"]}
    assert not [r for r in result["rows"] if r["error"]], result["rows"]
    assert rows[("teacher", "teacher tiny_convnet")]["units"] == 4
    assert rows[("experts", "tiny_convnet x3x6")]["units"] == 18
    assert rows[("synthesis", "mtt ipc1")]["units"] == 5 and rows[("synthesis", "mtt ipc2")]["units"] == 7
    assert ("synthesis", "sre2l ipc1") not in rows and rows[("synthesis", "sre2l ipc2")]["units"] % 6 == 0
    # random, mtt and the random baseline at IPC 1, sre2l too at IPC 2; 2 seeds of soft-kl's 300 epochs each
    assert rows[("evaluate", "tiny_convnet teacher ipc1 (3 sets x 2 seeds)")]["units"] == 3 * 2 * 300
    assert rows[("evaluate", "tiny_convnet teacher ipc2 (4 sets x 2 seeds)")]["units"] == 4 * 2 * 300
    # and the hard-label students behind each cell's HLR / hard_acc (hard-label dc-protocol: 300 epochs too)
    assert rows[("evaluate", "tiny_convnet hard ipc1 (3 sets x 2 seeds)")]["units"] == 3 * 2 * 300
    assert rows[("evaluate", "tiny_convnet full data (1 seeds)")]["units"] == 3
    for r in result["rows"]:
        assert (r["per_unit_s"] > 0
                and r["total_s"] == pytest.approx(r["setup_s"] + r["per_unit_s"] * (r["units"] or r["units_measured"])))
    saved = json.loads(out.read_text())
    assert saved["kind"] == "tier-cost" and len(saved["rows"]) == len(result["rows"])
    assert saved["command"].endswith(f"python benchmarks/tier_cost.py {cfg} --device cpu --budget 0.05 --out {out}")
    assert saved["cuda_deterministic"]["wanted"] == (os.environ.get("DDKIT_CUDA_DETERMINISTIC", "1") != "0")
    assert "CUDA deterministic algorithms" in out.with_suffix(".md").read_text()
    stages = saved["summary"][0]["stages_h"]
    assert set(stages) == {"teacher", "experts", "synthesis", "evaluate"}
    assert saved["summary"][0]["total_h"] == pytest.approx(sum(stages.values()))
    assert "| tiny | synthesis | mtt ipc2 |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("modes", [["teacher"], ["hard", "teacher"]])
def test_tier_cost_counts_the_student_epochs_a_bench_trains(tmp_path, modes):
    """The evaluation stage counts every student epoch ``ddkit bench`` trains on the same config: the hard-label
    students behind HLR / hard_acc of a soft-label cell, and one full-data reference for both label modes."""
    from ddkit.bench import run_bench

    tc = _script("tier_cost")
    sets = [f"label_modes={json.dumps(modes)}", "ipcs=[2]", "overrides.train.epochs=2", "overrides.full_epochs=3",
            "teacher.train.epochs=1"]
    cfg = tc.load_bench_config(str(REPO / "configs" / "bench" / "smoke.yaml"), [*sets, f"out={tmp_path / 'b'}"],
                               device="cpu")
    epochs = {"student": 0, "full": 0}

    def seen(done, total, record):  # each student's last epoch: its epoch count
        if done == total and ", seed " in record["stage"]:
            epochs["full" if "full data" in record["stage"] else "student"] += total

    run_bench(cfg, stage_progress=seen)
    result = tc.main([str(REPO / "configs" / "bench" / "smoke.yaml"), *[a for s in sets for a in ("--set", s)],
                      "--device", "cpu", "--budget", "0.05", "--out", str(tmp_path / "cost.json")])
    rows = [r for r in result["rows"] if r["stage"] == "evaluate"]
    assert not [r for r in rows if r["error"]], rows
    full = [r["units"] for r in rows if "full data" in r["item"]]
    assert full == [3] and epochs["full"] == 3
    # per label mode (and hard): 2 sets (random's, the random subset) x 2 seeds x 2 epochs
    assert sum(r["units"] for r in rows if "full data" not in r["item"]) == epochs["student"] == 2 * 2 * 2 * 2
    assert {r["item"].split(" ipc")[0] for r in rows if "ipc2" in r["item"]} == {"tiny_convnet hard",
                                                                                  "tiny_convnet teacher"}


def test_tier_cost_trains_the_same_student_whatever_the_global_random_state(tmp_path, monkeypatch):
    """The students timed start from seed 0's weights (their batches already came from seed 0): a
    fresh process (torch seeds its global generator from the OS) trains the same network."""
    tc = _script("tier_cost")
    cfg = tc.load_bench_config(str(REPO / "configs" / "bench" / "smoke.yaml"), [], device="cpu")
    probe = tc.TierProbe(cfg, "smoke", torch.device("cpu"), 0.05, tmp_path)
    protocol = cfg.protocol_for("tiny_convnet", "hard", ipc=2)
    starts = []
    monkeypatch.setattr(tc, "train_classifier", lambda model, *a, **k: starts.append(
        torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()))
    for state in (1, 2):  # the global generator as two fresh processes might leave it
        torch.manual_seed(state)
        probe._train(protocol, probe.data.train, protocol.train, 1)
    c, h, _ = probe.data.image_shape
    torch.manual_seed(0)
    seed0 = torch.nn.utils.parameters_to_vector(
        tc.create_model("tiny_convnet", c, probe.data.num_classes, h).parameters())
    assert len(starts) == 2 and torch.equal(starts[0], seed0) and torch.equal(starts[1], seed0)


def test_tier_cost_refuses_a_bad_config_in_one_line(tmp_path):
    out = tmp_path / "cost.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tier_cost.py"),
                           str(REPO / "configs" / "bench" / "smoke.yaml"), "--set", "ipcs=[0]", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == ["error: ipcs must be >= 1, got [0]"]
    assert not out.exists()


def test_stats_pass_measures_a_mean_near_zero_against_its_spread():
    sp = _script("stats_pass")
    f64 = torch.float64
    ref = {"a/mean": torch.tensor([5e-8, 2.0], dtype=f64), "a/var": torch.tensor([1.0, 3.0], dtype=f64),
           "logits/class_mean": torch.tensor([[-4.0, 1.0]], dtype=f64)}
    ours = {k: v.clone() for k, v in ref.items()}
    ours["a/mean"][0] += 1e-9  # float32 rounding of a mean that is ~0: 2% of its value, 1.4e-10 of its RMS
    assert sp.max_rel_diff(ours, ref) == pytest.approx(1e-9 / 7 ** 0.5, rel=1e-6)
    ours["a/var"][1] += 0.3
    assert sp.max_rel_diff(ours, ref) == pytest.approx(0.1)
    ours["logits/class_mean"][0, 1] += 2.0
    assert sp.max_rel_diff(ours, ref) == pytest.approx(0.5)


def test_stats_pass_equals_the_float64_reference_and_writes_its_table(tmp_path):
    out = tmp_path / "sp.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "stats_pass.py"), "--dataset", "synthetic", "--per-class", "30",
           "--models", "convnet3-w32-bn", "resnet18_cifar-w8", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["command"] == "python benchmarks/stats_pass.py " + " ".join(cmd[2:])  # every argument, as given
    rows = {r["model"]: r for r in result["rows"]}
    assert rows["convnet3-w32-bn"]["layers"] == 6 and rows["resnet18_cifar-w8"]["layers"] == 40
    for r in rows.values():
        assert (r["images"] == result["images"] > 0
                and min(r["forward_s"], r["stats_s"], r["patch_s"], r["reference_s"]) > 0)
        # ddkit's float32 per-image sums vs float64 feature maps: <= 3e-7 over 40 weight seeds; a wrong
        # statistic differs by ~1 (a mean near 0 is measured against its RMS, so rounding cannot blow up)
        assert r["max_rel_diff"] < 1e-5
    md = out.with_suffix(".md").read_text()
    assert "| resnet18_cifar-w8 | 40 |" in md and not list(tmp_path.glob("*.tmp"))


def test_stats_pass_gives_the_same_numbers_in_another_process(tmp_path):
    """Each process seeds torch's global generator from the OS: the models' weights are drawn from seed 0,
    so a second run repeats the first's numbers (built unseeded, each run measured other weights)."""
    rows = []
    for run in (1, 2):
        out = tmp_path / f"sp{run}.json"
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "stats_pass.py"), "--dataset", "synthetic",
                               "--per-class", "10", "--models", "convnet3-w32-bn", "--threads", "1", "--out", str(out)],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows.append([{k: r[k] for k in ("model", "layers", "images", "max_rel_diff")}
                     for r in json.loads(out.read_text())["rows"]])
    assert rows[0] == rows[1] and rows[0][0]["max_rel_diff"] > 0  # float32 against float64: not exactly 0


def test_stats_pass_names_missing_data_in_one_line(tmp_path):
    out = tmp_path / "sp.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "stats_pass.py"), "--dataset", "no-such-set",
                           "--out", str(out)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "no-such-set" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_dc_dsa_table_compares_each_ipc_with_its_published_numbers():
    dd = _script("dc_dsa")
    stat = lambda m: {"mean": m, "std": 0.004, "per_seed": [m, m, m], "n": 3}
    rows = [{"method": m, "iterations": 250, "protocol": dd.PROTOCOL[m], "distilled": stat(acc), "random": stat(0.74),
             "published": dd.PUBLISHED[10][m], "published_random": dd.PUBLISHED[10]["random"],
             "synthesis_seconds": 12.0}
            for m, acc in (("dc", 0.8130), ("dsa", 0.8500))]
    md = dd.markdown({"ipc": 10, "device": "cuda", "iterations": 250, "seeds": [0], "rows": rows,
                      "command": "python benchmarks/dc_dsa.py --ipc 10", "machine": "m", "versions": {}})
    assert "## DC and DSA at IPC 10" in md and "(outer 10, inner 50)" in md
    assert "| dc | 250 | `dc-protocol` | 81.30 ± 0.40 | 82.3 ± 0.4 | -1.00 | 74.00 ± 0.40 | 73.8 ± 0.7 | 12 |" in md
    assert "| dsa | 250 | `dsa-protocol` | 85.00 ± 0.40 | 84.6 ± 0.3 | +0.40 |" in md


def test_precision_benchmark_compares_each_precision_with_fp32(tmp_path):
    out = tmp_path / "prec.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "precision.py"), "--dataset", "synthetic", "--students",
           "tiny_convnet", "--precisions", "fp32", "bf16", "--steps", "1", "--ipc", "20", "--epochs", "15",
           "--seeds", "0", "1", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {r["precision"]: r for r in result["rows"]}
    assert set(rows) == {"fp32", "bf16"} and rows["fp32"]["speedup"] == 1.0
    for r in rows.values():
        assert r["images_per_s"] > 0 and len(r["accuracy"]) == 2
        assert r["accuracy_mean"] > 0.5  # 4 classes: well above chance after 15 epochs
    bf = rows["bf16"]
    assert bf["speedup"] == round(bf["images_per_s"] / rows["fp32"]["images_per_s"], 2)
    assert bf["diff_points"] == round(100 * (bf["accuracy_mean"] - rows["fp32"]["accuracy_mean"]), 2)
    md = out.with_suffix(".md").read_text()
    assert "| tiny_convnet | fp32 |" in md and "| 1.00x |" in md and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("args, words", [(["--dataset", "no-such-set"], "no-such-set"),
                                         (["--dataset", "synthetic", "--ipc", "500"], "--ipc 500")])
def test_precision_benchmark_names_bad_input_in_one_line(tmp_path, args, words):
    out = tmp_path / "prec.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "precision.py"), *args, "--out", str(out)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and words in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_decoupled_one_protocol_group_runs_its_runs_in_order(fm, tmp_path, monkeypatch):
    """`decoupled.py --family one-protocol` runs every run behind the one-protocol and EDC-steps tables,
    each after the run whose folder (and teachers) it reuses; a group is a cpu-tier thing."""
    from ddkit.bench import load_bench_config

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as when run as a script: it imports fashion_mnist
    dec = _script("decoupled")
    ran = []
    monkeypatch.setattr(fm, "run_family",
                        lambda family, tier, device, quiet: (ran.append((family, tier)) or [], tmp_path))
    monkeypatch.setattr(fm, "check_data", lambda runs, tier: None)  # the runs are stand-ins: no data read
    recorded = []
    monkeypatch.setattr(fm, "write_family", lambda family, tier, run_dir, results, *rest: recorded.append(rest) or (
        results / f"{family}.md").write_text(family) and f"{family}.md")
    monkeypatch.delenv("DDKIT_DATA", raising=False)
    argv = ["--family", "grp", "--results", str(tmp_path / "res"), "--quiet"]
    fm.main(argv, families=("decoupled",), groups={"grp": ("edc-build1", "decoupled-long1")}, script="decoupled")
    assert (ran == [("edc-build1", "cpu"), ("decoupled-long1", "cpu")]
            and (tmp_path / "res" / "fashion-mnist.md").is_file())
    # each JSON records the exact command (script and every argument) and the --device given (None: the config's)
    assert recorded == [("python benchmarks/decoupled.py " + " ".join(argv), None)] * 2
    assert fm.used_device(None, "auto")["device"] == ("cuda:0" if __import__("torch").cuda.is_available() else "cpu")
    assert fm.used_device("cpu", "auto") == {"device": "cpu"}
    with pytest.raises(SystemExit) as stop:
        fm.main(["--family", "grp", "--tier", "full"], families=("decoupled",), groups={"grp": ("decoupled-long1",)})
    assert stop.value.code == 2
    assert (set(dec.ONE_PROTOCOL) == set(fm.SINGLE_PROTOCOL) | set(fm.EDC_STEP_RUNS)
            and set(dec.ONE_PROTOCOL) <= set(fm.EXTRAS))
    outs = {name: load_bench_config(fm.config_path(name, "cpu")).out for name in dec.ONE_PROTOCOL}
    for i, name in enumerate(dec.ONE_PROTOCOL):
        owner = next(n for n in dec.ONE_PROTOCOL if outs[n] == outs[name])  # the first run in that folder
        assert dec.ONE_PROTOCOL.index(owner) <= i and (owner == name or owner.startswith("decoupled-long"))


def test_synthesis_seeds_table_follows_each_ipcs_race_over_seeds(fm, tmp_path):
    """Each IPC's race (best EDC set, its rival, other sets) at synthesis seed 0 from the one-protocol runs
    and at the seeds of the seed runs (labels suffixed -seedN): per-seed cells, mean ± std over seeds,
    EDC's margin; an IPC without a seed run is left out."""
    def write(name, rows):
        (tmp_path / f"{name}-fashion-mnist-cpu.json").write_text(json.dumps({"rows": rows}))

    row = lambda label, name, acc, ipc=1: _row(label, name, ipc, acc, 0.50 if ipc == 1 else 0.70, "teacher")
    write("base", [row("rded", "rded", 0.60), row("random", "random", 0.52), row("sre2l", "sre2l", 0.3),
                   row("rded", "rded", 0.9, 10), row("edc-real", "edc", 0.73, 10), row("random", "random", 0.71, 10)])
    write("lr", [row("edc-lr002-r18", "edc", 0.62)])
    races = {1: (("base", "lr"), {"s1": 1, "s2": 2}, ("edc-lr002-r18", "rded", "random")),
             10: (("base",), {"t1": 1}, ("edc-real", "random"))}
    assert fm.synthesis_seeds(tmp_path, races) == []  # no seed run yet
    write("s1", [row("rded-seed1", "rded", 0.61), row("edc-lr002-r18-seed1", "edc", 0.60),
                 row("random-seed1", "random", 0.49)])
    write("s2", [row("rded-seed2", "rded", 0.58), row("edc-lr002-r18-seed2", "edc", 0.61),
                 row("random-seed2", "random", 0.51)])
    text = "\n".join(fm.synthesis_seeds(tmp_path, races))
    assert "### IPC 1: edc-lr002-r18 against rded" in text and "### IPC 10" not in text  # no IPC-10 seed run yet
    assert "| set | seed 0 | seed 1 | seed 2 | over seeds |" in text
    assert "| random subset (baseline) | 50.00 ± 1.00 | 50.00 ± 1.00 | 50.00 ± 1.00 | |" in text
    assert "| edc-lr002-r18 | 62.00 ± 1.00 | 60.00 ± 1.00 | 61.00 ± 1.00 | 61.00 ± 0.82 |" in text
    assert "| rded | 60.00 ± 1.00 | 61.00 ± 1.00 | 58.00 ± 1.00 | 59.67 ± 1.25 |" in text
    assert "| edc-lr002-r18 − rded | +2.00 | -1.00 | +3.00 | +1.33 |" in text
    assert "sre2l" not in text and "90.00" not in text  # not in the race; IPC 10
    assert ("- edc-lr002-r18 is ahead of rded on 2 of 3 synthesis seeds (margin +1.33 ± 1.70 points over "
            "seeds) and above the random subset baseline on 3 of 3.") in text
    write("t1", [row("edc-real-seed1", "edc", 0.69, 10), row("random-seed1", "random", 0.72, 10),
                 row("edc-real-seed1", "edc", 0.5)])  # an IPC-1 row of the seed run stays out of IPC 10's race
    ipc10 = "\n".join(fm.synthesis_seeds(tmp_path, races)).split("### IPC 10: edc-real against random")[1]
    assert "| set | seed 0 | seed 1 | over seeds |" in ipc10 and ("| random subset (baseline) | 70.00 ± 1.00 | "
                                                                  "70.00 ± 1.00 | |") in ipc10
    assert "| edc-real | 73.00 ± 1.00 | 69.00 ± 1.00 | 71.00 ± 2.00 |" in ipc10
    assert "| edc-real − random | +2.00 | -3.00 | -0.50 |" in ipc10 and "rded" not in ipc10
    assert ("- edc-real is ahead of random on 1 of 2 synthesis seeds (margin -0.50 ± 2.50 points over seeds) and above "
            "the random subset baseline on 1 of 2.") in ipc10


# ------------------------------------------------------------------------------------------------
# Bad input to every script: one line `error: ...`, exit code 2, nothing written, before any training


# where each script writes: pointed inside the test's folder
OUTPUTS = {"fashion_mnist": ["--results", "res"], "matching": ["--results", "res"], "decoupled": ["--results", "res"],
           "dc_dsa": ["--work", "work", "--results", "res"], "spine": ["--work", "work", "--out", "out.json"],
           "unroll_memory": ["--out", "out.json"], "bench_overhead": ["--out", "out.json"],
           "tier_cost": ["--out", "out.json"], "stats_pass": ["--out", "out.json"], "precision": ["--out", "out.json"],
           "ddp_drift": ["--out", "out.json"]}


def _refused(tmp_path, script, *args, env=None):
    """Run ``benchmarks/<script>.py ARGS`` from an empty folder with its outputs pointed inside ``tmp_path``;
    assert exit code 2, one line ``error: ...`` on stderr and nothing written; return that line."""
    work = tmp_path / "cwd"
    work.mkdir()
    env = {**os.environ, **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    outputs = [str(tmp_path / a) if i % 2 else a for i, a in enumerate(OUTPUTS[script])]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"), *outputs, *args],
                          capture_output=True, text=True, cwd=work, env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cwd"]  # no output file, no results or work folder
    return lines[0]


no_fashion_mnist = pytest.mark.skipif((SYSTEM_DATA_DIR / "fashion-mnist").is_dir(),
                                      reason="Fashion-MNIST is installed system-wide: the run would start")


@no_fashion_mnist
@pytest.mark.parametrize("script, args, data", [
    ("fashion_mnist", ["--family", "matching", "--quiet"], None),
    ("decoupled", ["--family", "decoupled", "--quiet"], None),
    ("matching", ["--quiet"], "no-data"),
    ("dc_dsa", ["--ipc", "1"], None),
    ("spine", [], "no-data"),
    ("tier_cost", [str(REPO / "configs" / "bench" / "fashion-mnist-matching-cpu.yaml"), "--device", "cpu"], None),
])
def test_scripts_name_missing_data_in_one_line_and_write_nothing(tmp_path, script, args, data):
    env = {"DDKIT_DATA": str(tmp_path / data) if data else None}
    line = _refused(tmp_path, script, *args, env=env)
    assert "dataset 'fashion-mnist' not found" in line and "DDKIT_DATA" in line


@pytest.mark.parametrize("script, args, words", [
    ("decoupled", ["--family", "one-protocol", "--tier", "full"],
     "--family one-protocol runs supplementary runs of the cpu tier; drop --tier full"),
    ("matching", ["--family", "mtt-steps", "--tier", "full"],
     "--family mtt-steps is a supplementary run of the cpu tier; drop --tier full"),
    ("decoupled", ["--family", "mtt-steps"],
     "'mtt-steps' is a run of the matching family; run benchmarks/matching.py --family mtt-steps"),
    ("matching", ["--family", "edc-recipe"],
     "'edc-recipe' is a run of the decoupled family; run benchmarks/decoupled.py"),
    ("matching", ["--family", "one-protocol"],
     "'one-protocol' is a group of runs of the decoupled family; run benchmarks/decoupled.py --family one-protocol"),
    ("fashion_mnist", ["--family", "one-protocol"],
     "'one-protocol' is a group of runs of the decoupled family; run benchmarks/decoupled.py"),
    ("matching", ["--family", "decoupled"],
     "'decoupled' is the decoupled family; run benchmarks/decoupled.py --family decoupled"),
    ("matching", ["--family", "nope"], "invalid choice: 'nope'; see --help for the choices"),  # not ~70 names
    ("fashion_mnist", ["--device", "gpu"], "argument --device: unknown device 'gpu'; use cpu, cuda"),
])
def test_family_scripts_refuse_bad_arguments_before_making_the_results_folder(tmp_path, script, args, words):
    assert words in _refused(tmp_path, script, *args)


def test_family_scripts_offer_their_own_familys_runs(fm):
    """matching.py and decoupled.py list only their family's supplementary runs under --family; fashion_mnist.py
    all of them. Each run is its family's: built on its family's CPU tier config (dsa-eval on none: its
    protocol differs; it runs the matching family's methods)."""
    assert set(fm.MATCHING_EXTRAS) < set(fm.EXTRAS)
    for name in fm.EXTRAS:
        config = fm.config_path(name, "cpu")
        assert config.is_file(), name
        built_on = [f for f in fm.FAMILIES if fm._derives_from(config, fm.config_path(f, "cpu"))]
        assert built_on == ([] if name == "dsa-eval" else [fm.extra_family(name)]), name

    def choices(*args):
        return set(next(a.choices for a in fm.parser(*args)._actions if a.dest == "family"))

    assert choices(fm.FAMILIES) == {*fm.FAMILIES, "all", *fm.EXTRAS}


@pytest.mark.parametrize("script, args, words", [
    ("unroll_memory", ["--ipc", "0"], "argument --ipc: expected an integer >= 1, got '0'"),
    ("unroll_memory", ["--ipc", "-3"], "argument --ipc: expected an integer >= 1, got '-3'"),
    ("unroll_memory", ["--steps", "2", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    ("unroll_memory", ["--models", "tiny_convnet", "nope"], "argument --models: unknown model 'nope'"),
    ("unroll_memory", ["--threads", "0"], "argument --threads: expected an integer >= 1"),
    ("unroll_memory", ["--modes", "exact"], "--modes must include unroll"),
    ("unroll_memory", ["--device", "gpu"], "argument --device: unknown device 'gpu'"),
    ("spine", ["--ipcs", "abc"],
     "argument --ipcs: expected an integer >= 1, got 'abc' (a comma-separated list like 1,10,50)"),
    ("spine", ["--ipcs", "1,0"], "got '0' in '1,0'"),
    ("spine", ["--seeds", "-1"], "argument --seeds: expected a seed, an integer in [0, 2^32), got '-1'"),
    ("spine", ["--teacher-epochs", "0"], "argument --teacher-epochs: expected an integer >= 1"),
    ("spine", ["--teacher-augment", "nope"], "argument --teacher-augment: invalid choice: 'nope'"),
    ("bench_overhead", ["--epochs", "-1"], "argument --epochs: expected an integer >= 1, got '-1'"),
    ("ddp_drift", ["--epochs", "3,0"], "argument --epochs: expected an integer >= 1, got '0' in '3,0'"),
    ("bench_overhead", ["--repeats", "0"], "argument --repeats: expected an integer >= 1, got '0'"),
    ("tier_cost", [str(REPO / "configs" / "bench" / "smoke.yaml"), "--budget", "-1"],
     "argument --budget: expected a number > 0, got '-1'"),
    ("tier_cost", [str(REPO / "configs" / "bench" / "smoke.yaml"), "--budget", "nan"],
     "argument --budget: expected a number > 0"),
    ("tier_cost", ["no-such.yaml"], "config file 'no-such.yaml' not found"),
    ("tier_cost", [], "the following arguments are required: configs"),
    ("stats_pass", ["--per-class", "0"], "argument --per-class: expected an integer >= 1, got '0'"),
    ("stats_pass", ["--dataset", "synthetic", "--threads", "0"], "argument --threads: expected an integer >= 1"),
    ("precision", ["--dataset", "synthetic", "--epochs", "0"], "argument --epochs: expected an integer >= 1, got '0'"),
    ("precision", ["--dataset", "synthetic", "--seeds", "0", "x"], "argument --seeds: expected a seed"),
    ("dc_dsa", ["--methods", "dc,xx"], "argument --methods: expected one or more of dc, dsa"),
    ("dc_dsa", ["--iterations", "0"], "argument --iterations: expected an integer >= 1"),
    ("dc_dsa", ["--seeds", "0,a"], "argument --seeds: expected a seed"),
    ("dc_dsa", ["--model", "nope"], "argument --model: unknown model 'nope'"),
    ("dc_dsa", ["--report-only"], "--report-only: no finished method in"),
    # a repeated seed: refused before any data is read (not hours later, after the synthesis or the teacher)
    ("dc_dsa", ["--seeds", "0,1,0"], "argument --seeds: a seed is given twice in [0, 1, 0]; give each once"),
    ("spine", ["--seeds", "0,0"], "argument --seeds: a seed is given twice in [0, 0]; give each once"),
])
def test_scripts_refuse_bad_numbers_and_names_in_one_line(tmp_path, script, args, words):
    """Every numeric and name argument is checked while parsing: no NaN table, no traceback, no output."""
    assert words in _refused(tmp_path, script, *args)


# ------------------------------------------------------------------------------------------------
# benchmarks/gpu_checks.sh, run here with a stand-in for python (no GPU): the time budget and exit codes

STUB_PYTHON = """#!/usr/bin/env bash
case " $* " in
  *" demo "*) exit "${STUB_DEMO_RC:-3}" ;;   # the demo step fails
  *" -m pytest "*) sleep "${STUB_SLEEP:-0}" ;;  # the first gpu tests step may run long
esac
exit 0
"""


@pytest.mark.parametrize("env, summary, seconds, code", [
    # every step runs; the failing one is named with its exit code, the script exits 1
    ({"TOTAL_SECONDS": "300"}, "gpu_checks: 7 passed; failed: demo(3);", 60, 1),
    # the long step is cut at what is left of the budget (not its own 200 s); the others are skipped
    ({"TOTAL_SECONDS": "4", "RESERVE_SECONDS": "0", "MIN_STEP_SECONDS": "1", "STUB_SLEEP": "60"},
     "gpu_checks: 1 passed; failed: pytest-gpu(124); skipped (no time left): pytest-gpu-strict demo unroll-memory "
     "stats-pass precision tier-cost;", 15, 1),
    # nothing failed but steps were skipped: not every check ran, exit 2 (not 0)
    ({"TOTAL_SECONDS": "30", "RESERVE_SECONDS": "0", "MIN_STEP_SECONDS": "25", "STUB_SLEEP": "6", "STUB_DEMO_RC": "0"},
     "gpu_checks: 2 passed; skipped (no time left): pytest-gpu-strict demo unroll-memory stats-pass precision "
     "tier-cost;", 30, 2),
])
def test_gpu_checks_keeps_to_its_budget_and_fails_on_a_failed_step(tmp_path, env, summary, seconds, code):
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_checks.sh"), str(tmp_path / "out")],
                          env={**os.environ, "PYTHON": str(stub), **env}, capture_output=True, text=True,
                          timeout=seconds)
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == code and last.startswith(summary), proc.stdout[-2000:]
    assert (tmp_path / "out" / "checks.log").read_text().strip().splitlines()[-1] == last


# ------------------------------------------------------------------------------------------------
# Where a script writes is checked before any work (the JSON path, its folder, --results/--work)


@pytest.mark.parametrize("script, args", [
    ("stats_pass", ["--dataset", "synthetic"]), ("precision", ["--dataset", "synthetic"]), ("unroll_memory", []),
    ("bench_overhead", []), ("ddp_drift", []), ("spine", []),
    ("tier_cost", [str(REPO / "configs" / "bench" / "smoke.yaml"), "--device", "cpu"]),
])
def test_scripts_refuse_an_out_that_is_not_json_or_cannot_be_written(tmp_path, script, args):
    """`--out X.md` would have the markdown overwrite the JSON; a folder inside a file failed after the run."""
    md = tmp_path / "out.md"
    line = _refused(tmp_path, script, *args, "--out", str(md))
    assert line == f"error: --out must end in .json, got {md}; the markdown is written beside it"
    (tmp_path / "afile").write_text("")
    inside = tmp_path / "afile" / "sub" / "out.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"), *args, "--out", str(inside)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --out {inside} lies inside {tmp_path / 'afile'}, which is a file; choose another --out"]


@pytest.mark.parametrize("script, flag", [("fashion_mnist", "--results"), ("matching", "--results"),
                                          ("dc_dsa", "--results"), ("dc_dsa", "--work"), ("spine", "--work")])
def test_scripts_refuse_a_folder_inside_a_file_before_any_work(tmp_path, script, flag):
    (tmp_path / "afile").write_text("")
    inside = tmp_path / "afile" / "sub"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"), flag, str(inside)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DDKIT_DATA": str(tmp_path / "none")})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {flag} {inside} lies inside {tmp_path / 'afile'}, which is a file; choose another {flag}"]


def test_device_spec_refuses_mps_where_it_is_missing(monkeypatch):
    import argparse

    import torch

    _script("dc_dsa")  # puts benchmarks/ on sys.path
    import _cli

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(argparse.ArgumentTypeError,
                       match="device 'mps' asked for but MPS is not available here; use cpu"):
        _cli.device_spec("mps")
    assert _cli.device_spec("cpu") == "cpu"


def test_command_records_every_argument_quoted(monkeypatch):
    _script("dc_dsa")
    import _cli

    monkeypatch.setattr(sys, "argv", ["x.py", "--seeds", "0,1", "--out", "a b.json"])
    monkeypatch.delenv("DDKIT_DATA", raising=False)
    monkeypatch.delenv("DDKIT_CUDA_DETERMINISTIC", raising=False)
    assert _cli.command("dc_dsa", data=True) == "python benchmarks/dc_dsa.py --seeds 0,1 --out 'a b.json'"
    monkeypatch.setenv("DDKIT_DATA", "../shared/data")
    assert _cli.command("spine", ["--quick"], data=True) == ("DDKIT_DATA=../shared/data python "
                                                             "benchmarks/spine.py --quick")
    monkeypatch.setenv("DDKIT_CUDA_DETERMINISTIC", "0")  # a setting that changes the numbers is part of the command
    assert _cli.command("tier_cost", ["a.yaml"]) == "DDKIT_CUDA_DETERMINISTIC=0 python benchmarks/tier_cost.py a.yaml"


class _Parsed(Exception):
    pass


SCRIPTS = ["fashion_mnist", "matching", "decoupled", "dc_dsa", "spine", "ddp_drift", "bench_overhead", "stats_pass",
           "precision", "unroll_memory", "tier_cost"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_argument_of_every_script_has_help(script, monkeypatch):
    """--help describes the script itself (matching.py and decoupled.py showed fashion_mnist.py's line) and
    every argument; the family scripts list each --family choice with what it runs."""

    module = _script(script)
    import _cli

    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(_cli.Parser, "parse_args", capture)
    monkeypatch.setattr(sys, "argv", [f"{script}.py"])
    source = (REPO / "benchmarks" / f"{script}.py").read_text()
    main = source.split('if __name__ == "__main__":')[1]
    with pytest.raises(_Parsed) as got:
        if "lambda: main(" in main:  # matching.py, decoupled.py: fashion_mnist's main with their family
            exec(main.strip().replace("run_main(", "(lambda f: f())(", 1), module.__dict__)
        else:
            module.main()
    ap = got.value.args[0]
    assert ap.description == module.__doc__.splitlines()[0]
    undocumented = [a.option_strings or a.dest for a in ap._actions if not a.help]
    assert undocumented == []
    if script in ("fashion_mnist", "matching", "decoupled"):
        fm = _script("fashion_mnist")
        choices = next(a.choices for a in ap._actions if a.dest == "family")
        assert all(f"\n  {name}: " in ap.epilog for name in choices)
        assert all(f"  {name}: {' '.join(fm.EXTRAS[name].split())}" in ap.epilog for name in choices
                   if name in fm.EXTRAS)


def test_stats_pass_names_a_key_mismatch_with_the_project_error():
    from ddkit.errors import DDKitError

    sp = _script("stats_pass")
    with pytest.raises(DDKitError, match="statistics keys differ from the reference"):
        sp.max_rel_diff({"a": __import__("torch").ones(1)}, {"b": __import__("torch").ones(1)})


# ------------------------------------------------------------------------------------------------
# benchmarks/dc_dsa.py: an evaluation counts only for the set it scored; --report-only never trains


def _dc_files(work, seeds=(0, 1), fingerprint="f1", config_hash="h1", set_hash="h1", method="dc", device="cuda"):
    dd = _script("dc_dsa")
    name = dd.set_name(method, 3)
    (work / name).mkdir(parents=True)
    (work / name / "manifest.json").write_text(
        json.dumps({"config_hash": config_hash, "dataset": {"fingerprint": fingerprint}}))
    (work / f"{name}.synthesis.json").write_text(
        json.dumps({"wall_seconds": 12.0, "device": device, "machine": f"a box, device {device}"}))
    stat = {"mean": 0.7, "std": 0.01, "per_seed": [0.7, 0.7, 0.7], "n": 3}
    report = {"protocol_hash": dd._protocol(method, dd.MODEL).hash, "seeds": list(seeds), "set_config_hash": set_hash,
              "distilled": {"dataset_fingerprint": "f1"}, "results": {"distilled": stat, "random": stat},
              "bytes": {"images": 1, "labels": 1}}
    (work / f"{name}.eval.json").write_text(json.dumps(report))
    return dd


def test_dc_dsa_report_only_reads_the_finished_files_and_refuses_a_mismatch(tmp_path):
    from ddkit.errors import DDKitError

    dd = _dc_files(tmp_path)
    row = dd.finished_row("dc", 1, 3, [0, 1], tmp_path)
    assert row["distilled"]["mean"] == 0.7 and row["synthesis_seconds"] == 12.0 and row["seeds"] == [0, 1]
    # evaluate reports the seeds sorted: --seeds 1,0 is the report of 0,1 (it was refused as another one)
    assert dd.finished_row("dc", 1, 3, [1, 0], tmp_path)["distilled"]["mean"] == 0.7
    with pytest.raises(DDKitError, match=r"scored student seeds \[0, 1\], not \[0\]; give the --seeds it scored"):
        dd.finished_row("dc", 1, 3, [0], tmp_path)
    for kw, words in (({"fingerprint": "f2"}, "made from other data"),
                      ({"config_hash": "h2"}, "another making of the set")):
        work = tmp_path / words.replace(" ", "-")
        _dc_files(work, **kw)
        with pytest.raises(DDKitError, match=words):
            dd.finished_row("dc", 1, 3, [0, 1], work)
    # the device and machine the set was made on (a GPU lease), not those of the machine assembling the table
    assert (row["device"], row["machine"]) == ("cuda", "a box, device cuda")
    (tmp_path / "dc-it3.synthesis.json").write_text(json.dumps({"wall_seconds": 12.0}))  # before ddkit recorded it
    with pytest.raises(DDKitError, match=r"dc-it3.synthesis.json does not record the device dc was made on"):
        dd.finished_row("dc", 1, 3, [0, 1], tmp_path)
    (tmp_path / "dc-it3.synthesis.json").unlink()
    with pytest.raises(DDKitError, match="the synthesis time of dc .* is missing"):
        dd.finished_row("dc", 1, 3, [0, 1], tmp_path)


def test_dc_dsa_report_only_tables_the_device_the_sets_were_made_on(tmp_path, monkeypatch, capsys):
    """--report-only labelled the table with the assembling machine's device: GPU-made sets reported on
    the CPU machine would have replaced the published CPU record."""
    from ddkit.errors import DDKitError

    dd = _dc_files(tmp_path / "work")
    _dc_files(tmp_path / "work", method="dsa")
    argv = ["dc_dsa.py", "--report-only", "--iterations", "3", "--seeds", "0,1", "--device", "cpu",
            "--work", str(tmp_path / "work"), "--results", str(tmp_path / "res")]
    monkeypatch.setattr("sys.argv", argv)
    dd.main()
    out = list((tmp_path / "res").glob("*.json"))
    assert [p.name for p in out] == ["dc-dsa-ipc1-fashion-mnist-cuda-it3-seeds0_1.json"]
    table = json.loads(out[0].read_text())
    assert table["device"] == "cuda" and table["machine"] == "a box, device cuda"
    (tmp_path / "work"
     / "dsa-it3.synthesis.json").write_text(json.dumps({"wall_seconds": 1.0, "device": "cpu", "machine": "m"}))
    with pytest.raises(DDKitError, match=r"^the sets were made on different devices \(dc: cuda, dsa: cpu\)"):
        dd.main()


def test_dc_dsa_report_only_records_the_commands_that_made_the_sets(tmp_path, monkeypatch):
    """A --report-only table recorded only its own command, which made none of its rows."""
    dd = _dc_files(tmp_path / "work")
    _dc_files(tmp_path / "work", method="dsa")
    made = {"dc": "python benchmarks/dc_dsa.py --methods dc --iterations 3", "dsa": None}  # dsa: an older record
    record = json.loads((tmp_path / "work" / "dc-it3.synthesis.json").read_text())
    (tmp_path / "work" / "dc-it3.synthesis.json").write_text(json.dumps({**record, "command": made["dc"]}))
    monkeypatch.setattr("sys.argv", ["dc_dsa.py", "--report-only", "--iterations", "3", "--seeds", "0,1", "--work",
                                     str(tmp_path / "work"), "--results", str(tmp_path / "res")])
    dd.main()
    table = json.loads((tmp_path / "res" / "dc-dsa-ipc1-fashion-mnist-cuda-it3-seeds0_1.json").read_text())
    assert table["command"].endswith("benchmarks/dc_dsa.py --report-only --iterations 3 --seeds 0,1 --work "
                                     f"{tmp_path / 'work'} --results {tmp_path / 'res'}")
    assert table["set_commands"] == made
    md = (tmp_path / "res" / "dc-dsa-ipc1-fashion-mnist-cuda-it3-seeds0_1.md").read_text()
    assert f"Sets made by: dc: `{made['dc']}`." in md


def test_dc_dsa_evaluates_again_a_set_made_again(tmp_path, monkeypatch):
    """B1: the set is made again (other data, a method revision): its old evaluation is deleted, never reused."""
    dd = _dc_files(tmp_path)
    made = type("Set", (), {"manifest": {"config_hash": "h2", "dataset": {"fingerprint": "f1"}}})()
    monkeypatch.setattr(dd, "load_dataset", lambda cfg: None)
    monkeypatch.setattr(dd, "distill_hash", lambda cfg, data, teacher: "h2")
    monkeypatch.setattr(dd.DistilledSet, "load",
                        classmethod(lambda cls, path: type("Old", (), {"manifest": {"config_hash": "h1"}})()))
    monkeypatch.setattr(dd, "distill", lambda *a, **k: made)
    evaluated = []

    def evaluate(distilled, protocol, seeds, **kw):
        evaluated.append(distilled)
        stat = {"mean": 0.8, "std": 0.0, "per_seed": [0.8, 0.8, 0.8], "n": 3}
        return {"protocol_hash": protocol.hash, "seeds": seeds, "distilled": {"dataset_fingerprint": "f1"},
                "results": {"distilled": stat, "random": stat}, "bytes": {"images": 1, "labels": 1}}

    monkeypatch.setattr(dd, "evaluate", evaluate)
    monkeypatch.setattr("sys.argv", ["dc_dsa.py", "--methods", "dc", "--iterations", "3"])
    row = dd.run_method("dc", 1, 3, [0, 1], tmp_path, "cpu")
    assert evaluated == [made] and row["distilled"]["mean"] == 0.8
    command = json.loads((tmp_path / "dc-it3.synthesis.json").read_text())["command"]
    assert command.endswith("python benchmarks/dc_dsa.py --methods dc --iterations 3")  # what made the set
    assert json.loads((tmp_path / "dc-it3.eval.json").read_text())["set_config_hash"] == "h2"


def test_dc_dsa_table_names_the_network_it_ran():
    """The recorded IPC-1 table ran `convnet3` (first conv padded by 1) under the title "papers' network"."""
    dd = _script("dc_dsa")
    table = {"ipc": 1, "device": "cpu", "iterations": 2, "seeds": [0], "rows": [], "command": "c", "machine": "m",
             "versions": {}}
    lines = dd.markdown({**table, "model": "convnet3"}).splitlines()
    assert lines[0] == "## DC and DSA at IPC 1, `convnet3` (not the papers' network) and the papers' protocols (cpu)"
    assert ("students `convnet3`, not the papers' network `convnet3-p3` (the DC/DSA code's width-128 ConvNet-3 on "
            "1x28x28 images, first conv padded by 3): it differs in first_padding 1 (theirs 3);") in lines[2]
    lines = dd.markdown({**table, "model": "convnet3-p3"}).splitlines()
    assert lines[0] == "## DC and DSA at IPC 1, the papers' network and the papers' protocols (cpu)"
    assert "students `convnet3-p3`, the papers' network (the DC/DSA code's width-128" in lines[2]
    assert "differs in width 32 (theirs 128), first_padding 1 (theirs 3)" in dd.markdown(
        {**table, "model": "convnet3-w32"})


def test_unroll_memory_table_names_mib():
    um = _script("unroll_memory")
    row = {"model": "m", "params": 1, "mode": "unroll", "steps": 5, "graph_mb": 1.0, "peak_mb": 2.0, "seconds": 0.1}
    md = um._markdown({"command": "c", "device": "cpu", "machine": {"torch_threads": 1}, "ipc": 10, "peak_kind": "rss",
                       "rows": [row], "growth": [], "precision": [], "versions": {}})
    assert "| student | params | gradient | steps | graph MiB | peak MiB | s / update | rel. err vs MTT |" in md
    assert "graph MiB = peak bytes" in md and "peak MiB = rss" in md and " MB" not in md


def test_committed_hard_label_rows_count_only_the_hard_labels():
    """Cells finished before 2026-12-05 counted a set's soft labels also under hard labels (6x on Fashion-MNIST);
    the bench corrects them only when it assembles a folder again, so the committed tables were corrected once."""
    wrong, checked = [], 0
    for path in sorted((REPO / "docs" / "results").glob("*-fashion-mnist-cpu.json")):
        for r in json.loads(path.read_text()).get("rows", []):
            if r.get("label_mode") != "hard":
                continue
            checked += 1
            if r["bytes"]["labels"] != r["ipc"] * 10 * 8:  # 10 int64 labels per IPC
                wrong.append((path.name, r["method"], r["ipc"], r["bytes"]["labels"]))
            elif r["bytes"]["total"] != r["bytes"]["images"] + r["bytes"]["labels"]:
                wrong.append((path.name, r["method"], r["ipc"], r["bytes"]))
    assert checked > 0, "no hard-label row in docs/results/*-fashion-mnist-cpu.json: nothing was checked"
    assert wrong == []


def test_dc_dsa_renders_the_first_shape_of_its_json():
    """dc-dsa-ipc1-fashion-mnist-cpu.json predates the ipc/device/model keys: it renders, numbers unchanged."""
    dd = _script("dc_dsa")
    table = json.loads((REPO / "docs" / "results" / "dc-dsa-ipc1-fashion-mnist-cpu.json").read_text())
    md = dd.markdown(table)
    assert "| dc | 250 | `dc-protocol` | 70.46 ± 0.98 | 70.5 ± 0.6 | -0.04 | 51.44 ± 5.90 | 51.4 ± 3.8 | 4904 |" in md
    assert "| dsa | 250 | `dsa-protocol` | 70.81 ± 0.41 | 70.6 ± 0.6 | +0.21 |" in md
    assert md == (REPO / "docs" / "results" / "dc-dsa-ipc1-fashion-mnist-cpu.md").read_text()


def test_committed_family_markdown_is_the_rendering_of_its_json(fm):
    """Each docs/results/<run>-fashion-mnist-cpu.md is family_markdown of its JSON (re-render after changing it)."""
    stale = []
    for path in sorted((REPO / "docs" / "results").glob("*-fashion-mnist-cpu.json")):
        family = path.name.removesuffix("-fashion-mnist-cpu.json")
        rendered = (fm.family_markdown(family, "cpu", json.loads(path.read_text()))
                    if family in {*fm.FAMILIES, *fm.EXTRAS} else None)
        if rendered is not None and rendered != path.with_suffix(".md").read_text():
            stale.append(family)
    assert stale == []


def test_overview_has_a_table_per_label_mode(fm, tmp_path):
    """A tier run with two label modes: the overview tabulated only the first row's mode."""
    rows = [{**_row("dm", "dm", 1, 0.6, 0.5), "synthesis": {"wall_seconds": 2.0}},
            {**_row("dm", "dm", 1, 0.7, 0.5, mode="teacher"), "synthesis": {"wall_seconds": 2.0}}]
    (tmp_path / "matching-fashion-mnist-cpu.json").write_text(json.dumps({"rows": rows}))
    md = fm.overview(tmp_path)
    assert "student convnet3-w32, label mode `hard`" in md and "student convnet3-w32, label mode `teacher`" in md


def test_overview_shows_published_numbers_only_beside_the_papers_evaluation(fm, tmp_path):
    """The tier table put DSA's published numbers (DSA augmentation) beside DSA sets scored without it."""
    rows = [{**_row(m, m, i, 0.6, 0.5), "synthesis": {"wall_seconds": 2.0}} for m in ("dc", "dsa") for i in (1, 10)]
    cfg = {"label_modes": ["hard"], "seeds": [0], "ipcs": [1, 10], "students": ["convnet3-w32"],
           "protocol": "dc-protocol", "overrides": {}}
    (tmp_path / "matching-fashion-mnist-cpu.json").write_text(json.dumps({"rows": rows, "config": cfg}))
    tier = fm.overview(tmp_path).split("## matching family, cpu tier")[1].split("\n\n")[1].splitlines()
    assert [line.split(" | ")[3] for line in tier[2:]] == ["70.5 ± 0.6 / 82.3 ± 0.4", "–"]  # dc, dsa


@pytest.mark.parametrize("seeds, want", [(["0,1,2"], [0, 1, 2]), (["0", "1", "2"], [0, 1, 2]),
                                         (["0,1", "5"], [0, 1, 5]), ([], [0, 1, 2])])
def test_precision_seeds_take_the_clis_comma_form_too(tmp_path, monkeypatch, seeds, want):
    """precision.py took only `--seeds 0 1 2`, where the ddkit CLI and the other scripts take `0,1,2`."""
    prec = _script("precision")

    def measure(name, real, precisions, args, device):
        raise _Parsed(args)

    monkeypatch.setattr(prec, "measure", measure)
    monkeypatch.setattr(sys, "argv", ["precision.py", "--dataset", "synthetic", "--ipc", "2",
                                      *(["--seeds", *seeds] if seeds else []), "--out", str(tmp_path / "p.json")])
    with pytest.raises(_Parsed) as got:
        prec.main()
    assert got.value.args[0].seeds == want


def test_precision_refuses_a_repeated_seed(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "precision.py"), "--seeds", "0,1", "1",
                           "--out", str(tmp_path / "p.json")], capture_output=True, text=True, check=False)
    assert (proc.returncode, proc.stderr) == (2, "error: argument --seeds: a seed is given twice in [0, 1, 1]; give "
                                                 "each once\n")


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_shows_every_default(script, monkeypatch, capsys):
    """Defaults were hidden (precision.py --steps, bench_overhead.py --repeats, ddp_drift.py --epochs "e.g.
    3,50,800"): each option with a default now names it, as typed, unless its help explains it."""
    module = _script(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--help"])
    source = (REPO / "benchmarks" / f"{script}.py").read_text()
    main = source.split('if __name__ == "__main__":')[1]
    with pytest.raises(SystemExit):
        if "lambda: main(" in main:
            exec(main.strip().replace("run_main(", "(lambda f: f())(", 1), module.__dict__)
        else:
            module.main()
    text = " ".join(capsys.readouterr().out.split())
    expected = {"precision": ["batches of 256 in the timed epoch (default: 10)",
                              "comma- or space-separated: 0,1,2 or 0 1 2 (default: 0,1,2)",
                              "student models, space-separated (default: convnet3 convnet3-w32 resnet18_cifar)"],
                "bench_overhead": ["takes the best of each (the committed docs/results/bench_overhead.json used 5) "
                                   "(default: 2)"],
                "ddp_drift": ["teacher epochs, e.g. 3,50,800 (default: 3,50,800)"],
                "stats_pass": ["images per class (6000 = all of Fashion-MNIST) (default: 1000)"],
                "fashion_mnist": ["-q, --quiet no progress bars", "cpu, cuda, cuda:N or auto (default: the config's"],
                "dc_dsa": ["outer iterations (papers: 1000) (default: 250)"]}
    for words in expected.get(script, []):
        assert words in text, (words, text)
    assert text.count("(default") >= 1


def test_spine_quick_trains_a_small_teacher_and_full_runs_keep_theirs():
    spine = _script("spine")
    cfg, name = spine.teacher_recipe(True, 10, "flip")  # --quick: the width-128 epoch on 60k images takes ~6 min
    assert (cfg.model, cfg.train.epochs, name) == ("convnet3-w32", 1, "teacher-convnet3-w32-e1-flip")
    cfg, name = spine.teacher_recipe(False, 10, "flip")  # the recorded run's teacher and folder, unchanged
    assert (cfg.model, cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.schedule) == (
        "convnet3", 10, 256, 0.05, "cosine")
    assert name == "teacher-convnet3-e10-flip"


def test_spine_records_the_machine_and_its_thread_count(tmp_path, monkeypatch):
    """spine.py's JSON holds the CPU count, torch's thread count (the students' numbers depend on it) and the
    platform, as the other scripts' do (stages faked: only the record is under test)."""
    import platform
    import types

    from ddkit.data import load_dataset

    sp = _script("spine")
    data = load_dataset(sp.DatasetConfig(name="synthetic"))
    monkeypatch.setattr(sp, "load_dataset", lambda cfg: data)
    monkeypatch.setattr(sp, "train_teacher", lambda *a, **k: types.SimpleNamespace(
        manifest={"config": {"train": {"epochs": 1, "augment": "flip"}}}, test_accuracy=0.5))
    monkeypatch.setattr(sp, "distill", lambda *a, **k: None)
    stat = {"mean": 0.5, "std": 0.0, "per_seed": [0.5]}
    monkeypatch.setattr(sp, "evaluate", lambda *a, **k: {"config": {}, "protocol_hash": "h", "results": {
        "distilled": stat}, "bytes": {"images": 1, "labels": 0}})
    out = tmp_path / "spine.json"
    monkeypatch.setattr(sys, "argv", ["spine.py", "--quick", "--ipcs", "1", "--seeds", "0", "--work",
                                      str(tmp_path / "w"), "--out", str(out)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        sp.main()
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text())["machine"] == {"cpus": os.cpu_count(), "torch_threads": 1,
                                                      "platform": platform.platform()}


def test_dc_dsa_threads_sets_the_thread_count_its_machine_line_records(tmp_path, monkeypatch):
    """--threads N runs the method with N torch threads, which the set's machine line (and the command) state:
    the recorded IPC-1 sets were made with 1 thread each, two processes side by side."""
    dd = _script("dc_dsa")
    made = []
    monkeypatch.setattr(dd, "run_method", lambda m, ipc, it, seeds, work, device, model: made.append(
        (m, dd.machine(device), dd.command("dc_dsa"))))
    monkeypatch.setattr(sys, "argv", ["dc_dsa.py", "--methods", "dc", "--threads", "1", "--device", "cpu",
                                      "--work", str(tmp_path / "w"), "--results", str(tmp_path / "r")])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        dd.main()
    finally:
        torch.set_num_threads(threads)
    assert [(m, ", 1 torch thread(s), device cpu" in line, cmd.endswith("--methods dc --threads 1 --device cpu "
                                                                          f"--work {tmp_path / 'w'} --results "
                                                                          f"{tmp_path / 'r'}"))
            for m, line, cmd in made] == [("dc", True, True)]
    assert not (tmp_path / "r").exists()  # one method: no table
