"""Plain-text tables (``ddkit show``, the terminal, report.md's plain-text section): columns that stay under their
headers whatever the names, and no spread printed for a value of one seed. Reads JSON only: seconds."""

import copy
import json

from conftest import REPO
from ddkit.evaluate.tables import format_bench_table, format_table, summary_text, synthesis_seconds

BENCH = REPO / "docs" / "results" / "ast50-e8-fashion-mnist-cpu.json"  # rows of short names: random, shq-e8
DEMO = REPO / "docs" / "results" / "demo-cpu.json"  # the README's demo table
BENCH_COLUMNS = [("dataset", "<"), ("method", "<"), ("ipc", ">"), ("student", "<"), ("labels", "<"), ("acc %", "<"),
                 ("random %", "<"), ("IOR", ">"), ("HLR", ">"), ("LRS", ">"), ("ARS", ">"), ("bytes", ">"),
                 ("synth s", ">")]


def _columns_line_up(table: str, columns: list[tuple[str, str]], cells: list[list[str]]) -> None:
    """Each row's cell starts where its (left-aligned) header starts, or ends where its (right-aligned) header ends."""
    head, rule, *lines = table.splitlines()
    assert set(rule) == {"-"} and len(rule) == len(head) and len(lines) == len(cells)
    spans, at = [], 0
    for name, align in columns:
        start = head.index(name, at)
        spans.append((start, start + len(name), align))
        at = start + len(name)
    for line, row in zip(lines, cells):
        for (start, end, align), cell in zip(spans, row, strict=True):
            if align == "<":
                assert line[start:start + len(cell)] == cell and line[start - 1:start] in ("", " "), (cell, line)
            else:
                assert line[:end].endswith(" " + cell) or line[:end] == cell, (cell, line)


def _bench_cells(r: dict) -> list[str]:
    mean = lambda k, s=100, d=2: f"{s * r[k]['mean']:.{d}f}" if r.get(k) else "–"
    return [r["dataset"], r["method"], str(r["ipc"]), r["student"], r["label_mode"], summary_text(r["acc"]),
            summary_text(r["random"]), mean("ior"), mean("hlr"), mean("lrs", 1, 3), mean("ars", 1, 3),
            f"{r['bytes']['total']:,}", f"{synthesis_seconds(r):.2f}"]


def test_bench_table_columns_stay_under_their_headers_with_long_names():
    """Method labels over 10 characters (the committed benches' `edc-real-lr002-r18-nogvbsm`), students over 14
    (`convnet3-w32-p3`) or 1e9+ bytes pushed every later column of their rows out from under its header."""
    rows = json.loads(BENCH.read_text())["rows"]
    short = format_bench_table(rows)
    assert short.splitlines()[0] == ("dataset        method      ipc student        labels   acc %          random %  "
                                     "         IOR     HLR    LRS    ARS       bytes  synth s")  # as before: minimums
    _columns_line_up(short, BENCH_COLUMNS, [_bench_cells(r) for r in rows])
    long = copy.deepcopy(rows)
    long[0].update(method="dm-with-a-very-long-method-label", student="convnet3-w32-p3")
    long[1]["bytes"]["total"] = 6_021_120_000  # ImageNet-1K IPC 10 at 224 px, float32
    table = format_bench_table(long)
    _columns_line_up(table, BENCH_COLUMNS, [_bench_cells(r) for r in long])
    assert table.splitlines()[0].index("ipc") == short.splitlines()[0].index("ipc") + len(long[0]["method"]) - 10


def test_evaluation_table_columns_stay_under_their_headers_with_a_long_student():
    """`format_table`'s student column was a fixed 14 characters: `convnet3-w32-p3` shifted the accuracy, seeds and
    bytes of its rows. A table of short names prints as before (the README's demo table, character for character)."""
    sets = json.loads(DEMO.read_text())
    readme = (REPO / "README.md").read_text().splitlines()
    start = readme.index("$ ddkit demo") + 3
    assert [line.rstrip() for line in format_table(sets).splitlines()] == readme[start:start + 8]
    for rep in sets["evaluations"]:
        rep["config"]["student"] = "convnet3-w32-p3"
    table = format_table(sets)
    cells = []
    for rep in sets["evaluations"]:
        res, mode = rep["results"], rep["config"]["label_mode"]
        cells += [[f"dm ipc={rep['distilled']['ipc']}", mode, "convnet3-w32-p3", summary_text(res["distilled"]),
                   str(res["distilled"]["n"]), f"{rep['bytes']['total']:,}"],
                  [f"  baseline: random ipc={rep['distilled']['ipc']}", mode, "convnet3-w32-p3",
                   summary_text(res["random"]), str(res["random"]["n"]), ""],
                  [f"  baseline: full data ({res['full']['epochs']} ep)", "hard", "convnet3-w32-p3",
                   summary_text(res["full"]), "1", ""]]
    columns = [("set", "<"), ("labels", "<"), ("student", "<"), ("top-1 % (mean ± std)", "<"), ("seeds", ">")]
    _columns_line_up(table, columns, [c[:5] for c in cells])  # bytes: right-aligned, "" on baseline rows
    assert all(line.endswith("314,400") for line in table.splitlines()[2::3])


def test_a_value_of_one_seed_is_printed_without_a_spread():
    """One student seed printed "62.50 ± 0.00" (and the full-data reference "85.55 ± 0.00"), as if 0.00 were a
    measured spread; several seeds print as before."""
    one = {"per_seed": [0.625], "mean": 0.625, "std": 0.0, "n": 1}
    assert summary_text(one) == "62.50" and summary_text({**one, "diverged": 1}) == "62.50 (1 diverged)"
    assert summary_text({"per_seed": [0.5, 0.6], "mean": 0.55, "std": 0.05, "n": 2}) == "55.00 ± 5.00"
    assert summary_text({"per_seed": [0.5, 0.5], "mean": 0.5, "std": 0.0, "n": 2}) == "50.00 ± 0.00"
    assert summary_text(None) == "–" and summary_text({**one, "mean": 0.2}, 1, 3) == "0.200"
    rows = json.loads(BENCH.read_text())["rows"]
    several = format_bench_table(rows)
    assert "78.37 ± 0.18   78.00 ± 0.24" in several
    for r in rows:
        for key in ("acc", "random"):
            r[key] = {"per_seed": r[key]["per_seed"][:1], "mean": r[key]["per_seed"][0], "std": 0.0, "n": 1}
    single = format_bench_table(rows)
    assert "±" not in single and f"{100 * rows[0]['acc']['mean']:.2f}   " in single
    demo = format_table(json.loads(DEMO.read_text()))
    assert "85.55 ± 0.00" not in demo and "78.22 ± 0.43" in demo
    assert [line.split()[-2:] for line in demo.splitlines() if "full data" in line] == [["85.55", "1"]] * 2


def test_cached_full_reference_of_one_seed_is_shown_without_a_spread():
    from ddkit.describe import _full_cache

    result = {"per_seed": [0.8555], "mean": 0.8555, "std": 0.0, "n": 1, "epochs": 3}
    assert _full_cache({"result": result}).startswith(
        "cached full-data reference: test accuracy 85.55% over 1 student seed(s), 3 epochs")
    two = {"per_seed": [0.8, 0.9], "mean": 0.85, "std": 0.05, "n": 2, "epochs": 3}
    assert _full_cache({"result": two}).startswith("cached full-data reference: test accuracy 85.00% ± 5.00% over 2 ")
