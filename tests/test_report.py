"""``ddkit report``: a self-contained folder whose HTML renders with every image loaded."""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ddkit.bench import BenchConfig, run_bench
from ddkit.cli import main
from ddkit.config import from_dict
from ddkit.errors import DDKitError
from ddkit.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    cfg = from_dict(BenchConfig, {
        "datasets": ["synthetic"], "methods": ["random"], "ipcs": [1, 2], "students": ["tiny_convnet", "tiny_mlp"],
        "label_modes": ["hard"], "seeds": [0, 1], "protocol": "dc-protocol", "device": "cpu", "out": str(out),
        "overrides": {"full_epochs": 1, "train": {"epochs": 3, "batch_size": 32, "lr": 0.05}},
    })
    run_bench(cfg)
    return out


def test_report_files(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    rdir = run_dir / "report"
    assert "report.html" in capsys.readouterr().out
    names = {p.relative_to(rdir).as_posix() for p in rdir.rglob("*") if p.is_file()}
    assert names == {"manifest.json", "report.md", "report.html", "acc_vs_ipc.png", "acc_vs_bytes.png",
                     "time_vs_acc.png", "grids/synthetic-random-ipc1.png", "grids/synthetic-random-ipc2.png"}
    for name in names:
        if name.endswith(".png"):
            assert (rdir / name).read_bytes()[:8] == PNG_MAGIC, name
    md = (rdir / "report.md").read_text()
    assert "Cross-architecture" in md and "tiny_mlp" in md and "LRS" in md
    html = (rdir / "report.html").read_text()
    srcs = re.findall(r"<img src='([^']+)'", html)
    assert len(srcs) == 5 and all((rdir / s).is_file() for s in srcs)
    assert "http://" not in html and "https://" not in html  # no network assets
    assert main(["report", str(run_dir / "nope")]) == 2


def test_report_table_cells_hold_the_rows_numbers(run_dir, tmp_path):
    """The pages were checked for file names and words only: a table whose acc % and random % cells were
    swapped (or taken from another row) passed. Each row's cells are read back here by column name."""
    from ddkit.report import COLUMNS

    rows = json.loads((run_dir / "bench.json").read_text())["rows"]
    md = (write_report(run_dir, tmp_path / "rep") / "report.md").read_text().splitlines()
    start = md.index("| " + " | ".join(COLUMNS) + " |") + 2  # past the header and its |---| line
    table = [dict(zip(COLUMNS, (c.strip() for c in line.strip("|").split("|")), strict=True))
             for line in md[start:start + len(rows)]]
    pct = lambda x: f"{100 * x['mean']:.2f} ± {100 * x['std']:.2f}"
    assert any(pct(r["acc"]) != pct(r["random"]) for r in rows)  # so swapped cells would show
    for r, cells in zip(rows, table, strict=True):
        assert (cells["IPC"], cells["student"], cells["labels"]) == (str(r["ipc"]), r["student"], r["label_mode"])
        assert cells["acc %"] == pct(r["acc"]) and cells["random %"] == pct(r["random"])
        assert cells["IOR (pts)"] == pct(r["ior"]) and cells["label bytes"] == f"{r['bytes']['labels']:,}"


def test_report_is_written_atomically_and_replaces_only_reports(run_dir, tmp_path, monkeypatch, capsys):
    import ddkit.report as report
    from ddkit.describe import describe

    out = write_report(run_dir, tmp_path / "rep")
    manifest = json.loads((out / "manifest.json").read_text())
    pages = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert manifest["kind"] == "bench-report" and manifest["rows"] == 4 and set(manifest["files"]) == pages
    assert manifest["run_dir"] == str(run_dir.resolve()) and manifest["config"]["seeds"] == [0, 1]
    assert describe(out) == (f"bench report: 4 rows of the bench run {run_dir.resolve()}, report.md and report.html "
                             "with 3 plots and 2 set grids")
    before = (out / "report.md").read_text()

    def broken(rows, where):
        (where / "half.png").write_bytes(b"x")
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report, "_plots", broken)  # a report that fails half-way leaves the last one whole
    with pytest.raises(RuntimeError, match="plotting failed"):
        write_report(run_dir, out)
    monkeypatch.undo()
    assert (out / "report.md").read_text() == before and not (out / "half.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # no temporary folder left behind
    (out / "manifest.json").unlink()  # a report an older ddkit wrote (no manifest) is replaced
    assert write_report(run_dir, out) == out and (out / "manifest.json").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("mine")
    assert main(["report", str(run_dir), "--out", str(mine)]) == 2
    assert "is not a ddkit output" in capsys.readouterr().err and [p.name for p in mine.iterdir()] == ["notes.md"]


def test_report_needs_a_finished_run(tmp_path):
    with pytest.raises(DDKitError, match="ddkit bench"):
        write_report(tmp_path)


def test_damaged_bench_table_is_a_one_line_error(run_dir, tmp_path, capsys):
    """A hand-edited or truncated bench.json used to crash `ddkit report` with a KeyError, TypeError or
    ZeroDivisionError; it is refused as `ddkit show` refuses it, naming bench.json and the fix, and
    nothing is written."""
    good = json.loads((run_dir / "bench.json").read_text())
    row = good["rows"][0]

    def rows(*edit):
        first = json.loads(json.dumps(row))
        for e in edit:
            e(first)
        return {**good, "rows": [first, *good["rows"][1:]]}

    cases = {
        "no-rows": ({k: v for k, v in good.items() if k != "rows"}, r"lacks 'rows' \(a non-empty list\) or holds None"),
        "empty-rows": ({**good, "rows": []}, r"lacks 'rows' \(a non-empty list\) or holds \[\]"),
        "int-rows": ({**good, "rows": 5}, r"lacks 'rows' \(a non-empty list\) or holds 5"),
        "list-row": ({**good, "rows": [list(row), *good["rows"][1:]]}, r"as rows\[0\], not a JSON object"),
        "no-config": ({k: v for k, v in good.items() if k != "config"}, "lacks 'config'"),
        "student-null": (rows(lambda r: r.update(student=None)), "with a field of the wrong type"),
        "acc-text": (rows(lambda r: r["acc"].update(mean="0.5")),
                     r"holds accuracy .* \(not a mean in \[0, 1\]\) in rows\[0\]"),
        "no-acc": (rows(lambda r: r.pop("acc")), r"holds accuracy None \(not a mean in \[0, 1\]\) in rows\[0\]"),
        # NaN, a text IPC and a cell twice used to give a report (with a matplotlib warning)
        "acc-nan": (rows(lambda r: r["acc"].update(mean=float("nan"))),
                    r"holds accuracy \{.*'mean': nan, .*\} \(not a mean in \[0, 1\]\)"),
        "ipc-text": (rows(lambda r: r.update(ipc="one")), r"holds ipc 'one' \(not a count\) in rows\[0\]"),
        # a mean or std that is not its seeds' (hand-edited) was published next to scores computed from the seeds
        "acc-edited": (rows(lambda r: r["acc"].update(mean=0.99)),
                       r"holds acc mean 0.99, not the mean of its per_seed \[.*\] \(.*\) in rows\[0\]"),
        "std-edited": (rows(lambda r: r["hard_acc"].update(std=0.5)),
                       r"holds hard_acc std 0.5, not the population std of its per_seed \[.*\] \(.*\) in rows\[0\]"),
        "n-edited": (rows(lambda r: r["acc"].update(n=3)), r"holds acc n 3 for 2 per_seed values in rows\[0\]"),
        "twice": ({**good, "rows": [row, row, *good["rows"][1:]]}, rf"holds cell {row['cell']!r} twice in rows\[1\]"),
        **{f"no-{key}": (rows(lambda r, key=key: r.pop(key)), f"without the field '{key}'")
           for key in ("ipc", "method", "bytes", "random")},
    }
    for name, (table, msg) in cases.items():
        bench = tmp_path / name
        bench.mkdir()
        (bench / "bench.json").write_text(json.dumps(table))
        with pytest.raises(DDKitError, match=msg + r".*re-run `ddkit bench`"):
            write_report(bench)
        assert main(["report", str(bench)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"error: {str(bench / 'bench.json')!r}") and len(err.strip().splitlines()) == 1, err
        assert sorted(p.name for p in bench.iterdir()) == ["bench.json"], name  # no report, no temporary folder


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


CHECK = """<pre id="imgcheck">pending</pre><script>
window.onload = function () {
  var out = [];
  for (const img of document.images) out.push(img.getAttribute("src") + "=" + \
(img.complete && img.naturalWidth > 0 ? "ok" : "fail"));
  document.getElementById("imgcheck").textContent = "IMGS " + out.join(" ") + " END";
};
</script></body>"""


def test_html_renders_in_headless_chromium(run_dir, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium binary found (CI installs it: apt-get install -y chromium)")
    rdir = write_report(run_dir)
    # a copy of the page, in the same folder (so relative paths resolve), that reports image loads
    page = rdir / "_imgcheck.html"
    page.write_text((rdir / "report.html").read_text().replace("</body>", CHECK))
    try:
        proc = subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        page.unlink()
    found = re.search(r"IMGS (.*?) END", proc.stdout)
    assert found, f"chromium printed no image report (rc {proc.returncode}): {proc.stderr[-500:]}"
    results = dict(item.rsplit("=", 1) for item in found.group(1).split())
    assert len(results) == 5 and set(results.values()) == {"ok"}, results


def _band_row(method, ipc, student="s", rnd=None, acc=0.9):
    return {"dataset": "d", "student": student, "label_mode": "hard", "method": method, "ipc": ipc,
            "acc": {"mean": acc, "std": 0.01}, "random": None if rnd is None else {"mean": rnd, "std": 0.01}}


def test_random_band_gathers_every_ipc_of_a_panel():
    """The methods of a panel may run at different IPCs (``method_ipcs``): the random band takes each
    IPC from whichever method holds it, not from the first method alone."""
    from ddkit.report import _random_bands, _series

    row = _band_row
    rows = [row("dm", 1, rnd=0.5), row("mtt", 10, rnd=0.7), row("mtt", 50, rnd=0.8), row("dm", 50, rnd=0.8),
            row("random", 10), row("dm", 10, student="t", rnd=0.6)]
    ((methods, band),) = _random_bands(_series(rows), ("d", "s", "hard"))
    assert methods == ["dm", "mtt"] and list(band) == [1, 10, 50]
    assert [b["mean"] for b in band.values()] == [0.5, 0.7, 0.8]
    assert [list(b) for _, b in _random_bands(_series(rows), ("d", "t", "hard"))] == [[10]]


def test_each_random_baseline_gets_its_own_band(monkeypatch, tmp_path):
    """Under learned_lr (or stored committee labels) methods have their own random baselines: the panel drew
    the first method's for all of them."""
    from matplotlib.figure import Figure

    from ddkit import report

    row = _band_row
    rows = [row("mtt", 10, rnd=0.7462), row("mtt-x1", 10, rnd=0.7456), row("mtt", 50, rnd=0.8),
            row("mtt-x1", 50, rnd=0.8), row("dm", 50, rnd=0.8)]
    bands = report._random_bands(report._series(rows), ("d", "s", "hard"))
    assert [(m, {i: b["mean"] for i, b in band.items()}) for m, band in bands] == [
        (["mtt", "dm"], {10: 0.7462, 50: 0.8}), (["mtt-x1"], {10: 0.7456, 50: 0.8})]  # dm agrees at its IPC 50

    class Saved(Exception):
        pass

    def legend(rows):  # of acc_vs_ipc.png, the first figure saved
        def save(fig, *args, **kwargs):
            raise Saved(sorted(t.get_text() for t in fig.axes[0].get_legend().get_texts()))

        monkeypatch.setattr(Figure, "savefig", save)
        with pytest.raises(Saved) as saved:
            report._plots(rows, tmp_path)
        return saved.value.args[0]

    assert legend(rows) == ["dm", "mtt", "mtt-x1", "random subset (mtt, dm)", "random subset (mtt-x1)"]
    assert legend([r for r in rows if r["method"] != "mtt-x1"]) == ["dm", "mtt", "random subset"]


def test_plots_tell_every_series_apart_and_keep_legends_off_the_data(monkeypatch, tmp_path):
    """With more than 10 series matplotlib's cycle drew e.g. random and rded in one blue with one marker, and the
    legends sat inside the axes over the points (time_vs_acc's 26 entries covered its left half)."""
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    from ddkit import report

    figures, savefig = {}, Figure.savefig

    def save(fig, path, *args, **kwargs):
        figures[Path(path).name] = fig
        return savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", save)
    rows = [{**_band_row(f"m{i}", ipc, student=student, rnd=0.5), "bytes": {"total": 1000 * ipc},
             "synthesis": {"seconds": 1.0 + i}}
            for i in range(13) for ipc in (1, 10) for student in ("s", "t")]
    assert report._plots(rows, tmp_path) == ["acc_vs_ipc.png", "acc_vs_bytes.png", "time_vs_acc.png"]
    for name in ("acc_vs_ipc.png", "acc_vs_bytes.png"):
        for ax in figures[name].axes:
            looks = [(to_hex(c.lines[0].get_color()), c.lines[0].get_marker()) for c in ax.containers
                     if c.get_label().startswith("m")]
            assert len(looks) == 13 and len(set(looks)) == 13
            assert "#7f7f7f" not in {color for color, _ in looks}  # tab10's grey: the random subset's
    (ax,) = figures["time_vs_acc.png"].axes  # 26 series: dataset / student / labels / method
    looks = {(tuple(c.get_facecolor()[0]), c.get_paths()[0].vertices.tobytes()) for c in ax.collections}
    assert len(ax.collections) == 26 and len(looks) == 26
    for fig in figures.values():
        boxes = [ax.get_window_extent() for ax in fig.axes]
        for ax in fig.axes:
            legend = ax.get_legend().get_window_extent()
            assert not any(legend.overlaps(box) for box in boxes)  # beside its panel and the next one
            assert fig.bbox.x0 <= legend.x0 and legend.x1 <= fig.bbox.x1 and fig.bbox.y0 <= legend.y0
            assert legend.y1 <= fig.bbox.y1


def test_series_at_one_ipc_are_drawn_side_by_side(monkeypatch, tmp_path):
    """A single-IPC panel drew every method's error bar and the random subset's on one vertical line."""
    from matplotlib.figure import Figure

    from ddkit import report

    def save(fig, *args, **kwargs):
        raise Saved(fig)

    class Saved(Exception):
        pass

    monkeypatch.setattr(Figure, "savefig", save)
    with pytest.raises(Saved) as saved:  # acc_vs_ipc.png, the first figure saved
        report._plots([_band_row(m, 10, rnd=0.7) for m in ("dm", "mtt", "dc")], tmp_path)
    (ax,) = saved.value.args[0].axes
    xs = [float(c.lines[0].get_xdata()[0]) for c in ax.containers]  # dm, mtt, dc, then the random subset
    assert xs == sorted(xs) and len(set(xs)) == 4 and xs[0] < 10 < xs[-1]
    assert xs == pytest.approx([10 * 10 ** (report.IPC_DODGE * (j - 1.5)) for j in range(4)])
    assert list(ax.get_xticks()) == [10]


def _first_figure(monkeypatch, rows, tmp_path):
    """acc_vs_ipc.png's figure (the first one ``report._plots`` saves), as drawn."""
    from matplotlib.figure import Figure

    from ddkit import report

    class Saved(Exception):
        pass

    def save(fig, *args, **kwargs):
        raise Saved(fig)

    with monkeypatch.context() as m:  # (not monkeypatch.undo(): it would undo the autouse cache isolation too)
        m.setattr(Figure, "savefig", save)
        with pytest.raises(Saved) as saved:
            report._plots(rows, tmp_path)
    return saved.value.args[0]


def test_a_single_ipc_panel_spans_more_than_the_dodge(monkeypatch, tmp_path):
    """The x axis autoscaled to the dodge (±3.5 %), so a single IPC's series sat at the panel's edges, away from its
    only tick, as if at different IPCs: the axis spans IPC_SPAN (a decade) around the IPC, the series close to it."""
    import math

    from ddkit import report

    (ax,) = _first_figure(monkeypatch, [_band_row(m, 10, rnd=0.7) for m in ("dm", "mtt", "dc")], tmp_path).axes
    low, high = ax.get_xlim()
    xs = [float(c.lines[0].get_xdata()[0]) for c in ax.containers]
    assert math.log10(high / low) == pytest.approx(report.IPC_SPAN) and math.sqrt(low * high) == pytest.approx(10)
    assert math.log10(max(xs) / min(xs)) < 0.1 * math.log10(high / low) and list(ax.get_xticks()) == [10]
    (ax,) = _first_figure(monkeypatch, [_band_row(m, i, rnd=0.7) for m in ("dm", "mtt") for i in (1, 2, 4)],
                          tmp_path).axes  # IPCs less than a decade apart: a decade around them too
    assert math.log10(ax.get_xlim()[1] / ax.get_xlim()[0]) == pytest.approx(report.IPC_SPAN)
    (ax,) = _first_figure(monkeypatch, [_band_row(m, i, rnd=0.7) for m in ("dm", "mtt") for i in (1, 10, 50)],
                          tmp_path).axes  # over a decade: autoscaled, as before
    low, high = ax.get_xlim()
    assert low < 1 and high > 50 and math.log10(high / low) < math.log10(50) + 0.5


def _seeds_row(method, ipc, n, rnd=0.7, acc=0.9):
    """A row whose summaries are of ``n`` seeds (std 0 for one)."""
    row = _band_row(method, ipc, rnd=rnd, acc=acc)
    for key in ("acc", "random"):
        row[key] = {**row[key], "n": n, "std": 0.0 if n == 1 else 0.01}
    return row


def test_one_seed_draws_no_error_bars_or_band_and_a_band_draws_its_mean(monkeypatch, tmp_path):
    """One seed drew error bars of no length and a random band of no height (a hairline under a grey legend patch);
    with several seeds the band never drew the random subset's mean."""
    import numpy as np
    from matplotlib.collections import PolyCollection

    def drawn(n, ipcs):
        (ax,) = _first_figure(monkeypatch, [_seeds_row(m, i, n, acc=a) for m, a in (("dm", 0.8), ("mtt", 0.9))
                                            for i in ipcs], tmp_path).axes
        bars = [len(c.lines[2][0].get_segments()) if c.has_yerr else 0 for c in ax.containers]
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        means = [(list(line.get_xdata()), list(line.get_ydata()), line.get_linestyle(), line.get_marker())
                 for line in ax.lines if line.get_linestyle() == "--"]  # the series' lines are solid
        return bars, bands, means

    bars, bands, means = drawn(3, (1, 10))
    assert bars == [2, 2] and len(bands) == 1 and means == [([1, 10], [70.0, 70.0], "--", "None")]
    bars, bands, means = drawn(1, (1, 10))  # markers only: the random subset's on its dashed line
    assert bars == [0, 0] and bands == [] and means == [([1, 10], [70.0, 70.0], "--", "s")]
    bars, bands, means = drawn(1, (10,))  # one IPC: the random subset as a marker, without a bar
    assert bars == [0, 0, 0] and bands == [] and means == []
    bars, _, _ = drawn(3, (10,))
    assert bars == [1, 1, 1]
    # one seed at one IPC, several at another (a merged table): the band spans both, of no height at the first
    # (QA 21a F4: its NaN left the whole band undrawn)
    rows = [_seeds_row(m, i, 1 if i == 1 else 3, acc=a) for m, a in (("dm", 0.8), ("mtt", 0.9)) for i in (1, 10)]
    (ax,) = _first_figure(monkeypatch, rows, tmp_path).axes
    (band,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    xs, ys = band.get_paths()[0].vertices.T
    assert {1.0, 10.0} <= set(xs.tolist()) and np.isfinite(ys).all()
    assert ys.min() == pytest.approx(69.0) and ys.max() == pytest.approx(71.0)


def test_report_tables_print_a_value_of_one_seed_without_a_spread(run_dir, tmp_path):
    """One student seed printed "62.50 ± 0.00" in the Results and cross-architecture tables, under "mean ± population
    std over seeds", as if 0.00 were a measured spread; several seeds print as before."""
    from ddkit.report import COLUMNS, _cells, _cross_arch

    table = json.loads((run_dir / "bench.json").read_text())
    many = write_report(run_dir, tmp_path / "many")
    assert "over seeds)." in (many / "report.md").read_text() and "±" in _cells(table["rows"][0])[5]
    for row in table["rows"]:
        for key in ("acc", "random", "ior", "hlr", "lrs"):
            row[key] = {**row[key], "per_seed": row[key]["per_seed"][:1], "mean": row[key]["per_seed"][0], "std": 0.0,
                        "n": 1}
    row = table["rows"][0]
    cells = dict(zip(COLUMNS, _cells(row)))
    assert cells["acc %"] == f"{100 * row['acc']['mean']:.2f}"
    assert cells["random %"] == f"{100 * row['random']['mean']:.2f}"
    assert cells["LRS"] == f"{row['lrs']['mean']:.3f}" and not any("±" in c for c in _cells(row))
    assert not any("±" in c for line in _cross_arch(table["rows"])[1] for c in line)
    table["config"]["seeds"] = [0]
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "bench.json").write_text(json.dumps(table))
    md = (write_report(tmp_path / "one") / "report.md").read_text()
    assert "(mean ± population std over seeds; a single seed's value without ±)." in md
    spread = [line for line in md.splitlines() if "±" in line]  # the notes and the plot's caption only
    assert len(spread) == 3 and spread[0].startswith("Accuracies are")
    assert all("Accuracy vs IPC" in line for line in spread[1:])


def test_report_states_the_students_options(run_dir, tmp_path):
    """`student_options` (a width-8 ResNet-18) appeared nowhere in a report: it named the student `resnet18_cifar`."""
    from ddkit.report import students_sentence

    assert students_sentence({"students": ["convnet3-w32", "resnet18_cifar"]}) == ""
    cfg = {"students": ["convnet3-w32", "resnet18_cifar"],
           "student_options": {"resnet18_cifar": {"width": 8, "norm": "bn"}}}
    assert students_sentence(cfg) == "students convnet3-w32, resnet18_cifar (width=8, norm=bn)"
    cfg = {"students": ["a\x1b[2J"], "student_options": {"a\x1b[2J": {"w": 1}}}  # a terminal escape, written out
    assert students_sentence(cfg) == "students a\\x1b[2J (w=1)"
    table = json.loads((run_dir / "bench.json").read_text())
    table["config"]["student_options"] = {"tiny_mlp": {"hidden": 16}}
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "bench.json").write_text(json.dumps(table))
    out = write_report(tmp_path / "copy", tmp_path / "rep")
    intro = "; seeds [0, 1]; students tiny_convnet, tiny_mlp (hidden=16); protocol hashes "
    assert intro in (out / "report.md").read_text().splitlines()[2] and intro in (out / "report.html").read_text()
    assert "students" not in (write_report(run_dir, tmp_path / "plain") / "report.md").read_text().splitlines()[2]


def test_report_finds_the_grids_of_a_run_made_with_a_relative_out(tmp_path, monkeypatch):
    """bench records each set's folder relative to where it ran; report must not depend on that."""
    monkeypatch.chdir(tmp_path)
    run_bench(from_dict(BenchConfig, {
        "datasets": ["synthetic"], "methods": ["random"], "ipcs": [1], "students": ["tiny_convnet"],
        "label_modes": ["hard"], "seeds": [0], "protocol": "dc-protocol", "device": "cpu", "out": "rel/run",
        "overrides": {"full_epochs": 1, "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}},
    }))
    shutil.move(tmp_path / "rel" / "run", tmp_path / "moved")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    rdir = write_report(tmp_path / "moved", tmp_path / "rep")
    assert (rdir / "grids" / "synthetic-random-ipc1.png").read_bytes()[:8] == PNG_MAGIC


def assert_refused(folder: Path, kind: str, what: str, tail: str = "", manifest: str = "manifest.json") -> None:
    """``write_report(folder)``, with ``folder/manifest`` of kind ``kind`` written first, fails with one
    DDKitError: ``what`` (a regex), then what report takes, then ``tail``."""
    (folder / manifest).parent.mkdir(parents=True, exist_ok=True)
    (folder / manifest).write_text(json.dumps({"schema_version": 1, "kind": kind}))
    with pytest.raises(DDKitError, match=rf"{what}`ddkit report` takes the folder of a `ddkit bench` run{tail}$"):
        write_report(folder)


def test_report_takes_the_bench_table_and_names_a_run_folder(run_dir, tmp_path):
    """`ddkit report RUN/bench.json` looked for RUN/bench.json/bench.json; a `ddkit run` folder was told to
    run `ddkit bench` first; a JSON file of another kind was "not a bench table" without a fix."""
    out = write_report(run_dir / "bench.json", tmp_path / "rep")
    assert (out / "report.md").is_file()
    run = tmp_path / "run"
    assert_refused(run, "pipeline-run", rf"^'{re.escape(str(run))}' is a `ddkit run` folder, whose report is "
                                        rf"'{re.escape(str(run / 'report'))}'; ")
    (run / "bench.json").write_text(json.dumps({"kind": "evaluation"}))
    with pytest.raises(DDKitError,
                       match=r"is not a bench table \(kind 'evaluation'\); pass the folder of a `ddkit bench` run$"):
        write_report(run)
    assert not (run / "report").exists()


def test_a_copied_table_takes_no_grids_from_the_path_it_records(run_dir, tmp_path, caplog):
    """A bench.json copied away from its run took the grids from the path its rows record: once that folder
    holds another run's sets, the report showed grids of sets it has no numbers for."""
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copyfile(run_dir / "bench.json", copy / "bench.json")
    rows = json.loads((copy / "bench.json").read_text())["rows"]
    assert all((run_dir / "distilled" / Path(r["distilled_path"]).name / "preview.png").is_file() for r in rows)
    with caplog.at_level("WARNING", logger="ddkit.report"):
        out = write_report(copy, tmp_path / "rep")
    assert not (out / "grids").exists() and "](grids/" not in (out / "report.md").read_text()
    assert "no preview.png for 2 of 2 sets in" in caplog.text and "synthetic-random-ipc1" in caplog.text
    (copy / "distilled").mkdir()
    shutil.copytree(run_dir / "distilled" / "synthetic-random-ipc2", copy / "distilled" / "synthetic-random-ipc2")
    out = write_report(copy, tmp_path / "rep2")
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["synthetic-random-ipc2.png"]


def test_report_names_what_it_was_given_instead_of_a_bench_folder(tmp_path):
    """A set folder or an unfinished `ddkit run` was told "'DIR/bench.json' not found; run `ddkit bench
    CONFIG` to completion first", which a `ddkit run` user had never been told to use."""
    sset = tmp_path / "r10"
    assert_refused(sset, "distilled-set", rf"^'{re.escape(str(sset))}' holds a ddkit 'distilled-set' output, not a "
                                          r"bench run; ", r" \(`ddkit show` summarises this one\)")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert_refused(run, "distilled-set", r"looks like an unfinished `ddkit run` folder \(no report yet\); run "
                                         r"`ddkit run` with its config again to finish it and write its report/; ",
                   manifest="distilled/manifest.json")
    with pytest.raises(DDKitError, match=r"bench.json' not found; run `ddkit bench CONFIG` to completion first$"):
        write_report(tmp_path)  # anything else: as before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r10", "run"]


def test_report_tables_escape_control_characters_of_rows(run_dir, tmp_path, capsys):
    """A method name with terminal escapes and a newline (a received bench.json) went raw into the plain-text
    and markdown tables (and to the terminal), the newline breaking their rows; cells are escaped, repr style."""
    from ddkit.bench import format_bench_table

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    table = json.loads((run / "bench.json").read_text())
    table["rows"] = [{**r, "method": "ran\x1b]0;T\x07\ndom"} for r in table["rows"]]
    (run / "bench.json").write_text(json.dumps(table))
    md = (write_report(run, tmp_path / "rep") / "report.md").read_text()
    text = format_bench_table(table["rows"])
    for page in (md, text):
        assert "\x1b" not in page and "\x07" not in page and "ran\\x1b]0;T\\x07\\ndom" in page
    assert len(text.splitlines()) == 2 + len(table["rows"])
    rows = [line for line in md.splitlines() if "| ran\\x1b]0;T\\x07\\ndom |" in line]
    assert len(rows) == len(table["rows"]) + 2  # the results, and the cross-architecture table's two IPCs


def test_write_report_leaves_the_callers_matplotlib_backend(run_dir, tmp_path):
    """write_report called matplotlib.use("Agg"): a notebook's inline backend was gone for the rest of the session.
    It draws on figures of its own without pyplot now, byte for byte the same PNGs."""
    import sys

    code = ("import sys, matplotlib; matplotlib.use('svg'); from ddkit.report import write_report; "
            f"write_report({str(run_dir)!r}, {str(tmp_path / 'rep')!r}); "
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["svg", "False"]
    assert write_report(run_dir, tmp_path / "again") and all(
        (tmp_path / "rep" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
        for name in ("acc_vs_ipc.png", "acc_vs_bytes.png", "time_vs_acc.png"))


def test_protocol_sentence_states_the_ipc_overrides(run_dir, tmp_path):
    """The sentence named the preset and `overrides` only: the cells of an IPC with an `ipc_overrides` entry (the
    shipped -cpu benches' per-IPC epochs) ran settings the report did not state."""
    copy = tmp_path / "copy"
    copy.mkdir()
    table = json.loads((run_dir / "bench.json").read_text())
    plain = (write_report(run_dir, tmp_path / "plain") / "report.md").read_text().splitlines()[2]
    assert plain.startswith("Protocol preset `dc-protocol` with overrides `{'full_epochs': 1, 'train': {'epochs': 3, "
                            "'batch_size': 32, 'lr': 0.05}}`; seeds [0, 1]; protocol hashes ")  # none: as before
    table["config"]["ipc_overrides"] = {"2": {"train": {"epochs": 5, "lr": 0.01}}, "1": {"full_reference": False}}
    (copy / "bench.json").write_text(json.dumps(table))
    out = write_report(copy, tmp_path / "rep")
    stated = ("Protocol preset `dc-protocol` with overrides `{'full_epochs': 1, 'train': {'epochs': 3, 'batch_size': "
              "32, 'lr': 0.05}}` and per-IPC overrides (applied after them) IPC 1: `{'full_reference': False}`, IPC 2: "
              "`{'train': {'epochs': 5, 'lr': 0.01}}`; seeds [0, 1]; protocol hashes ")
    assert (out / "report.md").read_text().splitlines()[2].startswith(stated)
    assert f"<p>{html.escape(stated).replace('`', '')}" in (out / "report.html").read_text()


def test_committed_reports_state_their_benchs_protocol():
    """Each committed docs/results/<run>-report/report.md (and .html) states the protocol of its bench JSON,
    ipc_overrides included, and its results table is the JSON's rows as the report writes them now (re-render the
    folders after changing report.protocol_sentence or the table's cells: docs/results/README.md says how)."""
    from conftest import REPO
    from ddkit.report import _cells, protocol_sentence

    reports = sorted((REPO / "docs" / "results").glob("*-report"))
    assert reports
    for folder in reports:
        table = json.loads(folder.with_name(folder.name.removesuffix("-report") + ".json").read_text())
        stated = protocol_sentence(table["config"]) + "; seeds "
        md = (folder / "report.md").read_text().splitlines()
        assert md[2].startswith(stated), folder.name
        start = md.index("## Results") + 4
        assert md[start:start + len(table["rows"]) + 1] == ["| " + " | ".join(_cells(r)) + " |"
                                                             for r in table["rows"]] + [""], folder.name
        assert f"<p>{html.escape(stated).replace('`', '')}" in (folder / "report.html").read_text(), folder.name
