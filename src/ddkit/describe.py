"""One-paragraph summaries of whatever ddkit writes (``ddkit show``).

:func:`describe` reads the ``kind`` a file or folder records (an artifact's manifest, a bench table,
cell or synthesis record, an evaluation, an export's side file, a ``.pt`` export) and returns a short
plain-text summary of it; :func:`read_record` returns the record itself (a ``.pt`` export's tensors as
their shape and dtype).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ddkit.artifacts import KIND_FILES, MANIFEST, damaged_record, read_json
from ddkit.errors import DDKitError

# what a folder may hold that names its kind, in the order they are looked for: a bench folder's
# table before its config (no folder holds both a manifest and a bench table)
_RECORD_FILES = ("bench.json", *KIND_FILES)
_ACCEPTS = "pass a ddkit output folder, a JSON record of one, a `ddkit export --format pt` file or a protocol name"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's file format is a zip archive


def _is_torch_file(path: Path) -> bool:
    if path.suffix in (".pt", ".pth"):
        return True
    with path.open("rb") as f:
        return f.read(4) == _ZIP_MAGIC


def _tensor_info(obj: Any) -> Any:
    """``obj`` with every tensor replaced by its shape and dtype (what ``show --json`` prints of a .pt export)."""
    if isinstance(obj, torch.Tensor):
        return {"shape": list(obj.shape), "dtype": str(obj.dtype).removeprefix("torch.")}
    if isinstance(obj, dict):
        return {k: _tensor_info(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_tensor_info(v) for v in obj]
    return obj


def _read_torch_record(path: Path) -> dict[str, Any]:
    """The record of a ``ddkit export --format pt`` file: its fields, tensors as shape and dtype."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a file it cannot read; all mean the same here
        raise DDKitError(f"{str(path)!r} is not a file `ddkit show` reads (torch.load: {exc.__class__.__name__}); "
                         f"{_ACCEPTS}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise DDKitError(f"{str(path)!r} holds a {type(obj).__name__}, not a ddkit record; {_ACCEPTS} "
                         "(a ddranking export: pass its folder)")
    return _tensor_info(obj)


def read_record(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The JSON record that describes ``path`` (a folder's manifest / bench table / export meta, or a
    JSON file) and the file it came from."""
    path = Path(path)
    if not path.exists():
        raise DDKitError(f"{str(path)!r} not found; {_ACCEPTS}")
    if path.is_dir():
        found = next((path / name for name in _RECORD_FILES if (path / name).is_file()), None)
        if found is None:
            raise DDKitError(f"{str(path)!r} holds no ddkit record ({', '.join(_RECORD_FILES)}); pass a ddkit output folder")
        path = found
    record = _read_torch_record(path) if _is_torch_file(path) else read_json(path, "ddkit record", mapping=False)
    if not isinstance(record, dict):
        raise DDKitError(f"{str(path)!r} is not a ddkit record (a JSON object with a 'kind'); pass a ddkit output")
    return record, path


def describe(path: str | Path) -> str:
    """A short plain-text summary of the ddkit output at ``path``."""
    record, where = read_record(path)
    kind = record.get("kind")
    summarise = _SUMMARIES.get(kind)
    if kind is None and where.name == "config.json" and (where.parent / "distilled" / "manifest.json").is_file():
        raise DDKitError(f"{str(where.parent)!r} is a `ddkit run` folder without its manifest.json (an unfinished run, or "
                         "one from before run folders had a manifest.json); run `ddkit run` again with the same config "
                         "and --out (finished stages are reused) to write it")
    if summarise is None:
        raise DDKitError(f"{str(where)!r} is not a ddkit record ddkit can summarise (kind {kind!r}); pass one of: "
                         f"{', '.join(sorted(_SUMMARIES))}")
    with damaged_record(where, f"a {kind!r} record", "it is damaged, re-create it"):
        text = summarise(record)
        if where.name == MANIFEST:
            check_artifact(kind, where.parent, record)
    if kind == "bench-config" and where.name == "config.json":
        text += "\n" + _bench_progress(record, where.parent)
    return text


def check_artifact(kind: str, folder: Path, manifest: dict) -> None:
    """Load the artifact of ``kind`` in ``folder`` as its users would (files, shapes, values), so ``show``
    refuses an incomplete or damaged artifact instead of summarising its manifest alone. An expert
    buffer (gigabytes at paper scale) and a statistics cache are checked for their files only."""
    if kind == "distilled-set":
        from ddkit.distilled import DistilledSet

        DistilledSet.load(folder)
    elif kind == "teacher":
        from ddkit.teacher import Teacher

        Teacher.load(folder)
    elif kind == "fkd-soft-labels":
        from ddkit.labels.fkd import SoftLabelStore

        SoftLabelStore.load(folder)
    elif kind in ("expert-buffer", "statistics"):
        from ddkit.methods.statistics import TENSORS

        files = [e.get("file") if isinstance(e, dict) else None for e in manifest.get("experts", [])] \
            if kind == "expert-buffer" else [TENSORS]
        missing = [f for f in files if not (isinstance(f, str) and (folder / f).is_file())]
        if missing:
            raise DDKitError(f"{kind} {str(folder)!r} lacks its file(s) {missing[:3]}; the artifact is incomplete, "
                             "re-create it")


def _bench_progress(record: dict, root: Path) -> str:
    """How many of a bench folder's cells are finished: a cell file of the matrix exists and was made with
    the config's protocols and student seeds. ``show`` loads no teacher or distilled set, so a cell whose
    teacher or set changed still counts here; ``ddkit bench`` re-checks those and recomputes the cell."""
    from ddkit.bench import BenchConfig, cells_of
    from ddkit.config import from_dict

    try:
        cfg = from_dict(BenchConfig, record["config"])
        cells = cells_of(cfg)
    except (DDKitError, KeyError, TypeError, ValueError):
        return "(its matrix does not read with this ddkit; cannot count finished cells)"
    done = stale = 0
    for c in cells:
        path = root / "cells" / f"{c.id}.json"
        if not path.is_file():
            continue
        try:
            rec = read_json(path, "cell")
        except DDKitError:
            rec = None
        current = isinstance(rec, dict) and rec.get("seeds") == list(cfg.seeds) and (
            rec.get("hard_protocol_hash") == cfg.protocol_for(c.student, "hard", ipc=c.ipc).hash) and (
            rec.get("protocol_hash") == cfg.protocol_for(c.student, c.label_mode, ipc=c.ipc).hash)
        done += current
        stale += not current
    if not (root / "bench.json").is_file():
        table = "no table yet (bench.json)"
    else:
        table = "bench.json holds the table" if done == len(cells) else "bench.json holds an earlier run's table"
    old = f" ({stale} cell file(s) from another config or seeds, recomputed by the next `ddkit bench`)" if stale else ""
    return f"{done} of {len(cells)} cells finished{old}; {table}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _seconds(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f} s"


def _mib(x: int | None) -> str:
    return "–" if x is None else f"{x / 2**20:.1f} MiB"


def _distilled(m: dict) -> str:
    return (f"distilled set: {m['method']['name']} ipc={m['ipc']} on {m['dataset']['name']} "
            f"(fingerprint {m['dataset']['fingerprint']}), {m['num_images']} images, {m['bytes']['images']:,} image "
            f"bytes, {m['bytes']['labels']:,} label bytes, seed {m['seed']}")


def _teacher(m: dict) -> str:
    return (f"teacher: {m['model']['name']} on {m['dataset']['name']}, test accuracy {_pct(m['test_accuracy'])}, "
            f"seed {m['seed']}, weights {m['weights_sha']}")


def _evaluation(m: dict) -> str:
    from ddkit.evaluate import format_table

    return format_table([m])


def _evaluation_set(m: dict) -> str:
    from ddkit.evaluate import format_table

    return format_table(m["evaluations"])


def _fkd(m: dict) -> str:
    cut = m.get("cutmix")
    top = f"top-{m['top_k']} logits" if m.get("top_k") else "all logits"
    mix = f"CutMix p={cut['prob']} alpha={cut['alpha']}" if cut else "no CutMix"
    return (f"FKD soft labels: {m['epochs']} epochs x {m['num_images']} images, {m['num_classes']} classes, {top} (fp16), "
            f"views {m['augment']['spec']} + {mix}, teacher BatchNorm {m.get('teacher_bn', 'running')}, "
            f"{m['bytes']['total']:,} bytes, seed {m['seed']}, teacher {m['teacher']['fingerprint']}, "
            f"set {m['distilled']['fingerprint']}")


def _statistics(m: dict) -> str:
    patch = m["config"].get("patch_size")
    return (f"real-data statistics of teacher {m['teacher']} on {m['dataset']} ({m['num_classes']} classes, data "
            f"{m['data']}): {len(m['config']['layers'])} layers{f', {patch}x{patch} patches' if patch else ''}, "
            f"built in {_seconds(m.get('build_seconds'))}")


def _experts(m: dict) -> str:
    accs = [e.get("test_accuracy") for e in m["experts"]]
    accs = [a for a in accs if a is not None]
    final = f", final test accuracy {_pct(sum(accs) / len(accs))} (mean)" if accs else ""
    return (f"expert buffer: {len(m['experts'])} trajectories of {m['model']['name']} x {m['epochs']} epochs on "
            f"{m['dataset']['name']}, {m['num_params']:,} parameters each{final}, seed {m['seed']}")


def _bench_table(m: dict) -> str:
    from ddkit.bench import format_bench_table

    return format_bench_table(m["rows"])


def _bench_cell(m: dict) -> str:
    from ddkit.bench import format_bench_table

    return format_bench_table([m])


def _names(entries: list) -> list[str]:
    return [x if isinstance(x, str) else x.get("label") or x["name"] for x in entries]


def _bench_config(m: dict) -> str:
    c = m["config"]
    return (f"bench config: datasets {_names(c['datasets'])}, methods {_names(c['methods'])}, IPC {c['ipcs']}, "
            f"students {c['students']}, "
            f"label modes {c['label_modes']}, seeds {c['seeds']}, protocol {c['protocol']!r}")


def _synthesis(m: dict) -> str:
    return (f"synthesis: {_seconds(m['seconds'])} ({_seconds(m['wall_seconds'])} with shared artifacts built here; "
            f"they cost {_seconds(m.get('shared_seconds'))}), peak memory {_mib(m['peak_memory_bytes'])} "
            f"({m['peak_memory_kind']}) on {m['device']}, {m['bytes']['images']:,} image + {m['bytes']['labels']:,} label bytes")


def _run(m: dict) -> str:
    from ddkit.evaluate import format_table

    d = m["config"]["distill"]
    head = f"pipeline run: {d['method']} ipc={d['ipc']} on {m['config']['dataset']['name']}, seed {m['seed']}"
    if m.get("teacher_accuracy") is not None:
        head += f", teacher test accuracy {_pct(m['teacher_accuracy'])}"
    return head + "\n" + format_table(m["evaluations"]) if m["evaluations"] else head


def _report(m: dict) -> str:
    plots = sum(f.endswith(".png") and "/" not in f for f in m["files"])
    grids = sum(f.startswith("grids/") for f in m["files"])
    return (f"bench report: {m['rows']} rows of the bench run {m['run_dir']}, report.md and report.html with "
            f"{plots} plots and {grids} set grids")


def _export(m: dict) -> str:
    return (f"{m['kind']}: {len(m['classes'])} classes"
            + (f", {m['ipc']} images per class" if m.get("ipc") else "")
            + (f", from set {m['source_config_hash']}" if m.get("source_config_hash") else ""))


def _pt_export(m: dict) -> str:
    def shape(key: str) -> str:
        return str(list(m[key]["shape"]))

    soft = f", soft labels {shape('soft_labels')}" if "soft_labels" in m else ", no soft labels"
    names = ", ".join(m["classes"][:10]) + (f", ... ({len(m['classes'])} in all)" if len(m["classes"]) > 10 else "")
    return (f"{_export(m)}: images {shape('images')} ({m['images']['dtype']}, pixels in [0, 1]), labels {shape('labels')}"
            f"{soft}; classes {names}")


_SUMMARIES: dict[str, Callable[[dict], str]] = {
    "distilled-set": _distilled,
    "teacher": _teacher,
    "evaluation": _evaluation,
    "evaluation-set": _evaluation_set,
    "fkd-soft-labels": _fkd,
    "statistics": _statistics,
    "expert-buffer": _experts,
    "bench-table": _bench_table,
    "bench-cell": _bench_cell,
    "bench-config": _bench_config,
    "synthesis-stats": _synthesis,
    "pipeline-run": _run,
    "bench-report": _report,
    "imagefolder-export": _export,
    "ddranking-export": _export,
    "pt-export": _pt_export,
}

__all__ = ["describe", "read_record"]
