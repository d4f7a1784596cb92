"""Plain-text tables of evaluation reports and bench rows, and how a set's IPC is printed.

They read the JSON records only: ``ddkit show`` prints them without importing torch (which takes seconds).
"""

from __future__ import annotations

from typing import Any

from ddkit.errors import printable


def ipc_text(ipc: int | None) -> str:
    """A set's IPC as messages and tables print it: ``all`` for method full's whole training split."""
    return "all" if ipc is None else str(ipc)


def format_table(reports: list[dict[str, Any]] | dict[str, Any]) -> str:
    """A plain-text table of one or more evaluation reports (accuracies shown in %): a list of them, one
    report, or a run's ``report/eval.json`` (which lists them under ``evaluations``)."""
    if isinstance(reports, dict):
        reports = reports["evaluations"] if reports.get("kind") == "evaluation-set" else [reports]
    rows = []
    for rep in reports:
        proto = rep["config"]
        ipc = rep["distilled"]["ipc"]
        rows += [(f"{printable(rep['distilled']['method'])} ipc={ipc_text(ipc)}", proto["label_mode"],
                  rep["results"]["distilled"], rep["bytes"]["total"], proto)]
        if "random" in rep["results"]:
            rows.append((f"  baseline: random ipc={ipc}", proto["label_mode"], rep["results"]["random"], None, proto))
        if "full" in rep["results"]:
            full = rep["results"]["full"]
            rows.append((f"  baseline: full data ({full['epochs']} ep)", "hard", full, None, proto))
    accs = [_pm(res) for _, _, res, _, _ in rows]
    width = max([22, *map(len, accs)])  # wider only where "(N diverged)" needs it
    header = (f"{'set':<30} {'labels':<8} {'student':<14} {'top-1 % (mean ± std)':<{width}} {'seeds':>5} "
              f"{'bytes':>12}")
    lines = [header, "-" * len(header)]
    for (label, mode, res, nbytes, proto), acc in zip(rows, accs):
        size = f"{nbytes:,}" if nbytes is not None else ""
        lines.append(f"{label:<30} {printable(mode):<8} {printable(proto['student']):<14} {acc:<{width}} "
                     f"{res['n']:>5} {size:>12}")
    return "\n".join(lines)


def diverged_mark(summary: dict) -> str:
    """`` (N diverged)`` after an accuracy summary some of whose students diverged (NaN/inf outputs, counted
    as wrong), else nothing."""
    return f" ({summary['diverged']} diverged)" if summary.get("diverged") else ""


def _pm(x: dict | None, scale: float = 100.0, digits: int = 2) -> str:
    if x is None:
        return "–"
    return f"{scale * x['mean']:.{digits}f} ± {scale * x['std']:.{digits}f}{diverged_mark(x)}"


def synthesis_seconds(row: dict) -> float:
    """A cell's synthesis time without building the shared cached artifacts it uses (teacher
    statistics, expert buffers: ``row["synthesis"]["shared_seconds"]``); cells written before ddkit
    separated the two give their whole wall time."""
    syn = row["synthesis"]
    return syn["seconds"] if syn.get("seconds") is not None else (syn.get("wall_seconds") or 0.0)


def synthesis_cell(row: dict, digits: int = 2) -> str:
    """:func:`synthesis_seconds` for a table, marked ``(resumed)`` where the synthesis resumed from an
    interrupted run's checkpoints (its time then counts from the resume)."""
    return f"{synthesis_seconds(row):.{digits}f}" + (" (resumed)" if row["synthesis"].get("resumed") else "")


def format_bench_table(rows: list[dict]) -> str:
    """Plain-text table: accuracy, random, IOR, HLR in points (%); LRS/ARS in [0, 1]."""
    accs = [(_pm(r["acc"]), _pm(r["random"])) for r in rows]
    # each as wide as its widest cell: wider than 14 only where "(N diverged)" needs it
    wa, wr = (max([14, *(len(a[i]) for a in accs)]) for i in (0, 1))
    head = (f"{'dataset':<14} {'method':<10} {'ipc':>4} {'student':<14} {'labels':<8} {'acc %':<{wa}} "
            f"{'random %':<{wr}} {'IOR':>7} {'HLR':>7} {'LRS':>6} {'ARS':>6} {'bytes':>11} {'synth s':>8}")
    lines = [head, "-" * len(head)]
    def mean(r, k, s=100.0, d=2):
        return f"{s * r[k]['mean']:.{d}f}" if r.get(k) else "–"

    for r, (acc, rnd) in zip(rows, accs):
        lines.append(
            f"{printable(r['dataset']):<14} {printable(r['method']):<10} {r['ipc']:>4} {printable(r['student']):<14} "
            f"{printable(r['label_mode']):<8} "
            f"{acc:<{wa}} {rnd:<{wr}} {mean(r, 'ior'):>7} {mean(r, 'hlr'):>7} "
            f"{mean(r, 'lrs', 1, 3):>6} {mean(r, 'ars', 1, 3):>6} {r['bytes']['total']:>11,} "
            f"{synthesis_seconds(r):>8.2f}")
    return "\n".join(lines)


__all__ = ["format_bench_table", "format_table", "ipc_text", "synthesis_cell", "synthesis_seconds"]
