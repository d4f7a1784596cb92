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
    cells = [[label, printable(mode), printable(proto["student"]), summary_text(res), str(res["n"]),
              f"{nbytes:,}" if nbytes is not None else ""] for label, mode, res, nbytes, proto in rows]
    # at least as wide as before, wider only where a cell needs it ("(N diverged)", a long student name)
    columns = [("set", "<", 30), ("labels", "<", 8), ("student", "<", 14), ("top-1 % (mean ± std)", "<", 22),
               ("seeds", ">", 5), ("bytes", ">", 12)]
    return "\n".join(text_table(columns, cells))


def text_table(columns: list[tuple[str, str, int]], rows: list[list[str]]) -> list[str]:
    """The lines of a plain-text table: its header, a rule and ``rows``, each column (``(header, alignment,
    least width)``: ``<`` left, ``>`` right) as wide as its widest cell, so that a long method label or
    student name does not push the columns after it out from under their headers."""
    widths = [max([least, len(head), *(len(row[i]) for row in rows)]) for i, (head, _, least) in enumerate(columns)]

    def line(cells: list[str]) -> str:
        return " ".join(f"{cell:{align}{width}}" for cell, (_, align, _), width in zip(cells, columns, widths))

    head = line([head for head, _, _ in columns])
    return [head, "-" * len(head), *map(line, rows)]


def diverged_mark(summary: dict) -> str:
    """`` (N diverged)`` after an accuracy summary some of whose students diverged (NaN/inf outputs, counted
    as wrong), else nothing."""
    return f" ({summary['diverged']} diverged)" if summary.get("diverged") else ""


def single_seed(x: dict) -> bool:
    """Whether summary ``x`` is of one value (``n`` 1): its std 0 is no measured spread, so tables print no ± and
    plots draw no error bar."""
    return x.get("n") == 1


def summary_text(x: dict | None, scale: float = 100.0, digits: int = 2) -> str:
    """A ``{"mean", "std", "n", ...}`` summary as tables print it: ``mean ± std`` (times ``scale``), the mean alone
    where it is of one value (``n`` 1: no spread to state), ``–`` for none; marked where students diverged."""
    if not x:
        return "–"
    spread = "" if single_seed(x) else f" ± {scale * x['std']:.{digits}f}"
    return f"{scale * x['mean']:.{digits}f}{spread}{diverged_mark(x)}"


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
    def mean(r, k, s=100.0, d=2):
        return f"{s * r[k]['mean']:.{d}f}" if r.get(k) else "–"

    cells = [[printable(r["dataset"]), printable(r["method"]), ipc_text(r["ipc"]), printable(r["student"]),
              printable(r["label_mode"]), summary_text(r["acc"]), summary_text(r["random"]), mean(r, "ior"),
              mean(r, "hlr"), mean(r, "lrs", 1, 3), mean(r, "ars", 1, 3), f"{r['bytes']['total']:,}",
              f"{synthesis_seconds(r):.2f}"] for r in rows]
    # at least as wide as before, wider only where a cell needs it ("(N diverged)", a long method label)
    columns = [("dataset", "<", 14), ("method", "<", 10), ("ipc", ">", 4), ("student", "<", 14), ("labels", "<", 8),
               ("acc %", "<", 14), ("random %", "<", 14), ("IOR", ">", 7), ("HLR", ">", 7), ("LRS", ">", 6),
               ("ARS", ">", 6), ("bytes", ">", 11), ("synth s", ">", 8)]
    return "\n".join(text_table(columns, cells))


__all__ = ["text_table", "format_bench_table", "format_table", "ipc_text", "summary_text", "synthesis_cell",
           "synthesis_seconds"]
