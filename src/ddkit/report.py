"""``ddkit report RUN_DIR``: a self-contained folder (report.md, report.html, PNG plots) from a bench run.

Everything the pages show lives in the folder: plots are PNG files made with matplotlib's Agg
backend and referenced by relative path, each distilled set's ``preview.png`` is copied in, and the
HTML uses no external assets (inline CSS, no scripts), so the folder can be zipped or served as is.
Its ``manifest.json`` (kind ``bench-report``) names the bench run, its config and the files; the folder
is written atomically (built beside the target, then renamed).
"""

from __future__ import annotations

import html
import logging
import math
import shutil
from pathlib import Path

from ddkit.artifacts import (
    atomic_dir,
    base_manifest,
    damaged_record,
    folder_kind,
    write_json,
    write_text,
)
from ddkit.config import is_count
from ddkit.errors import DDKitError, printable
from ddkit.evaluate.metrics import cell_problem
from ddkit.evaluate.tables import format_bench_table, single_seed, summary_text, synthesis_cell, synthesis_seconds

log = logging.getLogger(__name__)
REPORT_KIND = "bench-report"

PLOTS = {
    "acc_vs_ipc.png": ("Accuracy vs IPC (mean ± std over seeds; random real subset: dashed line in a shaded ± std "
                       "band, square markers at a single IPC or seed)"),
    "acc_vs_bytes.png": "Accuracy vs total bytes (images + labels)",
    "time_vs_acc.png": "Synthesis wall time vs accuracy",
}


#: a plot's series colours: matplotlib's tab10 without its grey, which the random subset's band and marker use
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
MARKERS = ("o", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", ":", "-.")
#: legend entries per legend column (more series: more columns)
LEGEND_ROWS = 30
#: accuracy vs IPC draws neighbouring series this far apart (decades of the log IPC axis: 2.3 %)
IPC_DODGE = 0.01
#: the least an accuracy-vs-IPC axis spans (decades): a panel of one IPC (or of IPCs close together) is widened to
#: it around its IPCs, so that the dodge stays a small offset (autoscaled, a single IPC's dodged series filled the
#: panel, at its edges, away from the IPC's only tick)
IPC_SPAN = 1.0


def _style(i: int) -> dict:
    """The look of a plot's ``i``-th series: the next colour, and after every round of colours the next marker
    and line style, so no two of the first 81 series share colour and marker (matplotlib's cycle repeated its
    10 colours with one marker)."""
    turn = i // len(COLORS)
    return {"color": COLORS[i % len(COLORS)], "marker": MARKERS[turn % len(MARKERS)],
            "linestyle": LINESTYLES[turn % len(LINESTYLES)]}


def _series(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by (dataset, student, label mode, method), sorted by IPC."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["dataset"], r["student"], r["label_mode"], r["method"]), []).append(r)
    for v in out.values():
        v.sort(key=lambda r: r["ipc"])
    return out


def _errors(summaries: list[dict]) -> list[float] | None:
    """Error bars (± std, in %) of a series' summaries: none at a summary of one seed (whose std 0 is no spread: its
    bar a dash through the marker, a band of no height), None where no summary has one."""
    errors = [math.nan if single_seed(s) else 100 * s["std"] for s in summaries]
    return None if all(map(math.isnan, errors)) else errors


def _random_bands(series: dict[tuple, list[dict]], panel: tuple) -> list[tuple[list[str], dict[int, dict]]]:
    """The random subset's accuracy per IPC in one panel (dataset, student, label mode): one band per distinct
    baseline, with the methods it belongs to. Methods share a band when their random subsets agree at every IPC
    both hold, and a band takes each IPC from whichever of its methods holds it (the methods of a panel may run
    at different IPCs). Under ``learned_lr``, or ``stored`` labels made by each set's own committee or BN batch,
    each method has its own random baseline, so its own band."""
    bands: list[tuple[list[str], dict[int, dict]]] = []
    for key, rs in series.items():
        own = {r["ipc"]: r["random"] for r in rs if r.get("random")} if key[:3] == panel else {}
        if not own:
            continue
        for methods, band in bands:
            if all(band.get(ipc, b) == b for ipc, b in own.items()):
                methods.append(key[3])
                band.update(own)
                break
        else:
            bands.append(([key[3]], own))
    return [(methods, dict(sorted(band.items()))) for methods, band in bands]


def _plots(rows: list[dict], out: Path) -> list[str]:
    # figures of their own on an Agg canvas: no pyplot, whose backend (a notebook's inline one) stays the caller's
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def subplots(*grid: int, **kw):
        fig = Figure(figsize=kw.pop("figsize"))
        FigureCanvasAgg(fig)
        return fig, fig.subplots(*grid, **kw)

    series = _series(rows)
    panels = sorted({k[:3] for k in series})
    written = []

    def figure(n: int):
        cols = min(n, 3)
        rows_ = (n + cols - 1) // cols
        fig, axes = subplots(rows_, cols, figsize=(5 * cols, 3.8 * rows_), squeeze=False)
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        return fig, list(axes.flat)

    def finish(ax, xlabel: str, title: str | None = None, legend: int = 8) -> None:
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        if title:
            ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        entries = len(ax.get_legend_handles_labels()[1])  # beside the axes, where it hides no point
        ax.legend(fontsize=legend, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0,
                  ncols=-(-entries // LEGEND_ROWS))

    def save(fig, name: str) -> None:
        """Widen the figure by its widest legend per column of panels (taller where a legend is taller than
        its panel), so the panels keep their size beside the legends, then write it."""
        renderer = fig.canvas.get_renderer()
        boxes = [ax.get_legend().get_window_extent(renderer) for ax in fig.axes if ax.get_visible()]
        rows_, cols = fig.axes[0].get_subplotspec().get_gridspec().get_geometry()
        width, height = fig.get_size_inches()
        fig.set_size_inches(width + cols * (max(b.width for b in boxes) / fig.dpi + 0.2),
                            max(height, rows_ * (max(b.height for b in boxes) / fig.dpi + 1.2)))
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        written.append(name)

    # accuracy vs IPC, with the random baseline as a shaded band
    fig, axes = figure(len(panels))
    for ax, panel in zip(axes, panels):
        colors = {}  # method -> its line's colour, for its own random band
        keys, bands = [k for k in series if k[:3] == panel], _random_bands(series, panel)
        # each series a little to the side of the IPC it holds (ticks at the IPC), so that error bars at one IPC
        # do not hide each other (a single-IPC panel drew every method on one vertical line)
        dodge = [10 ** (IPC_DODGE * (j - (len(keys) + len(bands) - 1) / 2)) for j in range(len(keys) + len(bands))]
        for i, key in enumerate(keys):
            style, rs = _style(i), series[key]
            ax.errorbar([r["ipc"] * dodge[i] for r in rs], [100 * r["acc"]["mean"] for r in rs],
                        yerr=_errors([r["acc"] for r in rs]), capsize=3, label=printable(key[3]), **style)
            colors[key[3]] = style["color"]
        for j, (methods, band) in enumerate(bands, len(keys)):  # one gray band when every method shares its baseline
            color, label = ("gray", "random subset") if len(bands) == 1 else (
                colors[methods[0]], f"random subset ({', '.join(map(printable, methods))})")
            means, errors = [100 * b["mean"] for b in band.values()], _errors(list(band.values()))
            if len(band) == 1:  # one IPC: a band would have no width
                ax.errorbar([next(iter(band)) * dodge[j]], means, yerr=errors, color=color, marker="s", capsize=3,
                            label=label)
            elif errors is None:  # one seed: a band would have no height
                ax.plot(list(band), means, color=color, linestyle="--", linewidth=1, marker="s", label=label)
            else:  # of no height at an IPC of one seed (a merged or edited table), ± std elsewhere
                errors = [0.0 if math.isnan(e) else e for e in errors]
                ax.fill_between(list(band), [m - e for m, e in zip(means, errors)],
                                [m + e for m, e in zip(means, errors)], color=color, alpha=0.25, label=label)
                ax.plot(list(band), means, color=color, linestyle="--", linewidth=1)  # its mean
        finish(ax, "images per class", " / ".join(map(printable, panel)))
        ticks = sorted({r["ipc"] for k, rs in series.items() if k[:3] == panel for r in rs})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        if math.log10(ticks[-1] / ticks[0]) < IPC_SPAN:  # IPC_SPAN around the IPCs, the dodged series within it
            middle, low, high = math.sqrt(ticks[0] * ticks[-1]), *ax.get_xlim()
            ax.set_xlim(min(low, middle / 10 ** (IPC_SPAN / 2)), max(high, middle * 10 ** (IPC_SPAN / 2)))
    save(fig, "acc_vs_ipc.png")

    # accuracy vs bytes
    fig, axes = figure(len(panels))
    for ax, panel in zip(axes, panels):
        for i, (key, rs) in enumerate((k, rs) for k, rs in series.items() if k[:3] == panel):
            ax.errorbar([r["bytes"]["total"] for r in rs], [100 * r["acc"]["mean"] for r in rs],
                        yerr=_errors([r["acc"] for r in rs]), capsize=3, label=printable(key[3]), **_style(i))
        finish(ax, "bytes (images + labels)", " / ".join(map(printable, panel)))
    save(fig, "acc_vs_bytes.png")

    # synthesis time vs accuracy
    fig, ax = subplots(figsize=(6, 4))
    for i, (key, rs) in enumerate(series.items()):
        style = _style(i)
        ax.scatter([max(synthesis_seconds(r), 1e-3) for r in rs], [100 * r["acc"]["mean"] for r in rs],
                   label=" / ".join(map(printable, key)), s=20, color=style["color"], marker=style["marker"])
    finish(ax, "synthesis wall time (s, without shared statistics / expert buffers)", legend=6)
    save(fig, "time_vs_acc.png")
    return written


def _grids(rows: list[dict], out: Path, run_dir: Path) -> list[tuple[str, str]]:
    """Copy each distilled set's preview.png into ``grids/``; return (title, relative path). A set is
    taken only from ``run_dir/distilled``: the bench writes its sets there, and the path a row records
    (relative to where the bench ran) may name another run's set by the time a copied table is reported."""
    seen, grids, missing = set(), [], []
    for r in rows:
        name = Path(r["distilled_path"]).name
        if name in seen:
            continue
        seen.add(name)
        src = run_dir / "distilled" / name
        if (src / "preview.png").is_file():
            (out / "grids").mkdir(exist_ok=True)
            shutil.copyfile(src / "preview.png", out / "grids" / f"{name}.png")
            grids.append((f"{r['dataset']} / {r['method']} / IPC {r['ipc']}", f"grids/{name}.png"))
        else:
            missing.append(name)
    if missing:
        log.warning("no preview.png for %d of %d sets in %s (%s); their grids are left out (report the bench "
                    "folder that holds them to include them)", len(missing), len(seen), run_dir / "distilled",
                    ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else ""))
    return grids


COLUMNS = ["dataset", "method", "IPC", "student", "labels", "acc %", "random %", "IOR (pts)", "HLR (pts)", "LRS",
           "ARS", "image bytes", "label bytes", "synthesis s", "shared s", "peak mem MiB", "protocol"]


def _seconds(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _cells(r: dict) -> list[str]:
    mem = r["synthesis"].get("peak_memory_bytes")
    return [*map(printable, (r["dataset"], r["method"], str(r["ipc"]), r["student"], r["label_mode"])),
            *map(summary_text, (r["acc"], r.get("random"), r.get("ior"), r.get("hlr"))),
            *(summary_text(r.get(k), 1, 3) for k in ("lrs", "ars")), f"{r['bytes']['images']:,}",
            f"{r['bytes']['labels']:,}", synthesis_cell(r), _seconds(r["synthesis"].get("shared_seconds")),
            "–" if mem is None else f"{mem / 2**20:.1f}", f"`{r['protocol_hash']}`"]


def _cross_arch(rows: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    students = sorted({r["student"] for r in rows})
    if len(students) < 2:
        return None
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        key = tuple(map(printable, (r["dataset"], r["method"], str(r["ipc"]), r["label_mode"])))
        groups.setdefault(key, {})[r["student"]] = r["acc"]
    head = ["dataset", "method", "IPC", "labels", *students]
    body = [[*k, *(summary_text(g.get(s)) for s in students)] for k, g in groups.items()]
    return head, body


def _older_report(path: Path) -> bool:
    """A report folder an older ddkit wrote (its pages, no manifest): ``write_report`` may replace it."""
    return (path / "report.md").is_file() and (path / "report.html").is_file() and folder_kind(path) is None


_REBUILD = "the table is damaged: re-run `ddkit bench` with the run's config (finished cells are reused) to rebuild it"


def _check_table(table: dict, where: Path) -> None:
    """Refuse a ``bench.json`` without result rows (a non-empty list of JSON objects), config or versions;
    a row without a field the pages read is refused while they are written (as ``ddkit show`` does)."""
    rows = table.get("rows")
    if not isinstance(rows, list) or not rows:
        raise DDKitError(f"{str(where)!r} lacks 'rows' (a non-empty list) or holds {rows!r} there; {_REBUILD}")
    seen = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DDKitError(f"{str(where)!r} holds {row!r} as rows[{i}], not a JSON object; {_REBUILD}")
        cell, ipc, acc = row.get("cell"), row.get("ipc"), row.get("acc")
        mean = acc.get("mean") if isinstance(acc, dict) else None
        problem = (f"cell {cell!r} (not a name)" if not isinstance(cell, str)
                   else f"cell {cell!r} twice" if cell in seen
                   else f"ipc {ipc!r} (not a count)" if ipc is not None and not is_count(ipc)
                   else f"accuracy {acc!r} (not a mean in [0, 1])" if not (
                       isinstance(mean, (int, float)) and not isinstance(mean, bool) and 0 <= mean <= 1)
                   else cell_problem(row))  # a mean that is not its seeds' (edited) is not published
        if problem:
            raise DDKitError(f"{str(where)!r} holds {problem} in rows[{i}]; {_REBUILD}")
        seen.add(cell)
    for key in ("config", "versions"):
        if not isinstance(table.get(key), dict):
            raise DDKitError(f"{str(where)!r} lacks {key!r} (a JSON object) or holds {table.get(key)!r} "
                             f"there; {_REBUILD}")


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report/`` (or ``out``) for the bench run in ``run_dir``; return the folder.

    The folder is built beside ``out`` and renamed into place when complete, so a failed report
    leaves the previous one (or nothing); an existing ``out`` is replaced only when it is a report."""
    from ddkit.bench import load_table  # here: it imports torch, which `ddkit show` (reading this module) needs not

    if Path(run_dir).name == "bench.json" and Path(run_dir).is_file():  # the table itself: its run folder
        run_dir = Path(run_dir).parent
    table = load_table(run_dir)
    where = Path(run_dir) / "bench.json"
    _check_table(table, where)
    out = Path(out) if out is not None else Path(run_dir) / "report"
    with atomic_dir(out, kind=REPORT_KIND, accept=_older_report) as tmp:
        with damaged_record(where, "a bench table", _REBUILD, (KeyError, TypeError, ValueError, AttributeError)):
            _write_pages(table, tmp, Path(run_dir))
        manifest = base_manifest(REPORT_KIND, table["config"], None)
        manifest.update({"run_dir": str(Path(run_dir).resolve()), "rows": len(table["rows"]),
                         "bench_versions": table["versions"],
                         "files": sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())})
        write_json(tmp / "manifest.json", manifest)
    log.info("report written to %s", out)
    return out


def protocol_sentence(cfg: dict) -> str:
    """What a bench config (``bench.json``'s ``config``) changes in its protocol preset: its ``overrides`` and,
    where it has them, its ``ipc_overrides``, which the cells of that IPC ran with over the overrides."""
    text = f"Protocol preset `{cfg['protocol']}` with overrides `{cfg['overrides']}`"
    per_ipc = cfg.get("ipc_overrides") or {}  # JSON keys are text: "10"
    if per_ipc:
        text += " and per-IPC overrides (applied after them) " + ", ".join(
            f"IPC {k}: `{per_ipc[k]}`" for k in sorted(per_ipc, key=int))
    return text


def students_sentence(cfg: dict) -> str:
    """The students of a bench config (``bench.json``'s ``config``) with their ``student_options`` (``students
    convnet3-w32, resnet18_cifar (width=8)``), or nothing where it sets none: the pages name a student by its model
    alone, and a width-8 ResNet-18 read as the standard one."""
    options = cfg.get("student_options") or {}
    if not options:
        return ""
    named = [f"{s} ({', '.join(f'{k}={v}' for k, v in options[s].items())})" if options.get(s) else str(s)
             for s in cfg.get("students") or options]
    return printable("students " + ", ".join(named))


def _write_pages(table: dict, out: Path, run_dir: Path) -> None:
    """report.md, report.html, the plots and the set grids of ``table`` (the bench run in ``run_dir``)
    into the folder ``out``."""
    rows = table["rows"]
    plots = _plots(rows, out)
    grids = _grids(rows, out, run_dir)
    ver = table["versions"]
    protos = sorted({r["protocol_hash"] for r in rows} | {r["hard_protocol_hash"] for r in rows}
                    | {h for r in rows for h in (r.get("ars_protocol_hashes") or {}).values()})
    cfg = table["config"]
    students = students_sentence(cfg)
    intro = (f"{protocol_sentence(cfg)}; seeds {cfg['seeds']}{'; ' + students if students else ''}; protocol hashes "
             f"{', '.join(f'`{p}`' for p in protos)}. ddkit {ver['ddkit']}, torch {ver['torch']}, torchvision "
             f"{ver['torchvision']}, python {ver['python']}.")
    single = any(single_seed(r["acc"]) for r in rows)  # its value alone: no spread to state
    notes = ("Accuracies are top-1 test accuracy in % (mean ± population std over seeds{}). IOR = acc − acc(random "
             "subset, same protocol); HLR = acc(full data, hard) − acc(distilled, hard), in points. LRS and ARS "
             "follow DD-Ranking on fractions (λ = {}, γ = {}), in [0, 1]. Peak memory: CUDA allocator peak on GPU, "
             "sampled RSS high-water above the stage's start on CPU. Synthesis s leaves out building the cached "
             "artifacts that every set of the same teacher or expert recipe shares (teacher statistics, expert "
             "buffers); shared s is what building those took, reused or not (– where "
             "not recorded).").format("; a single seed's value without ±" if single else "", cfg["lrs_lambda"],
                                       cfg["ars_gamma"])
    cross = _cross_arch(rows)

    md = ["# ddkit benchmark report", "", intro, "", notes, "", "## Results", "",
          "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    if cross:
        md += ["", "## Cross-architecture accuracy (%)", "", "| " + " | ".join(cross[0]) + " |",
               "|" + "---|" * len(cross[0])]
        md += ["| " + " | ".join(c) + " |" for c in cross[1]]
    md += ["", "## Plots", ""]
    md += [f"### {PLOTS[p]}\n\n![{PLOTS[p]}]({p})\n" for p in plots]
    md += ["## Distilled sets", ""]
    md += [f"### {printable(t)}\n\n![{printable(t)}]({p})\n" for t, p in grids]
    md += ["## Plain-text table", "", "```", format_bench_table(rows), "```", ""]
    write_text(out / "report.md", "\n".join(md))

    e = html.escape

    def html_table(head, body):
        h = "".join(f"<th>{e(c)}</th>" for c in head)
        b = "".join("<tr>" + "".join(f"<td>{e(c.strip('`'))}</td>" for c in row) + "</tr>" for row in body)
        return f"<table><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>"

    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'><title>ddkit benchmark report</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
             "table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}"
             "img{max-width:100%;border:1px solid #eee}code{background:#f6f6f6}</style></head><body>",
             "<h1>ddkit benchmark report</h1>", f"<p>{e(intro).replace('`', '')}</p>", f"<p>{e(notes)}</p>",
             "<h2>Results</h2>", html_table(COLUMNS, [_cells(r) for r in rows])]
    if cross:
        parts += ["<h2>Cross-architecture accuracy (%)</h2>", html_table(*cross)]
    parts += ["<h2>Plots</h2>"]
    parts += [f"<h3>{e(PLOTS[p])}</h3><img src='{e(p)}' alt='{e(PLOTS[p])}'>" for p in plots]
    parts += ["<h2>Distilled sets</h2>"]
    parts += [f"<h3>{e(t)}</h3><img src='{e(p)}' alt='{e(t)}'>" for t, p in grids]
    parts += ["</body></html>"]
    write_text(out / "report.html", "\n".join(parts) + "\n")
