"""ddkit: dataset distillation toolkit — distil, relabel and fairly evaluate tiny datasets.

The stages, as library calls (``ddkit.X`` is imported on first use, so ``import ddkit`` stays cheap)::

    data = ddkit.load_dataset(ddkit.DatasetConfig(name="fashion-mnist"))
    teacher = ddkit.train_teacher(data, ddkit.TeacherConfig(model="convnet3"), "runs/t")
    distilled = ddkit.distill(data, ddkit.DistillConfig(method="dm", ipc=10), out="runs/dm10", teacher=teacher)
    store = ddkit.relabel(distilled, teacher, 300)                 # per-epoch soft labels (label mode fkd)
    report = ddkit.evaluate(distilled, "dc-protocol", [0, 1, 2])   # or a ProtocolConfig
    print(ddkit.format_table(report))

``ddkit.load(path)`` reads back whatever a stage wrote (by the kind its record names).
"""

import os as _os

__version__ = "0.1.0"

# cuBLAS reads this at its first call; deterministic CUDA runs need it (see ddkit.determinism)
_os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# name -> the module it is re-exported from, imported on first use (module __getattr__, PEP 562)
_EXPORTS = {
    "DatasetConfig": "ddkit.data", "DataBundle": "ddkit.data", "load_dataset": "ddkit.data",
    "save_tensors": "ddkit.data",
    "Teacher": "ddkit.teacher", "TeacherConfig": "ddkit.teacher", "train_teacher": "ddkit.teacher",
    "DistillConfig": "ddkit.pipeline", "RunConfig": "ddkit.pipeline", "distill": "ddkit.pipeline",
    "run": "ddkit.pipeline",
    "DistilledSet": "ddkit.distilled",
    "RelabelSpec": "ddkit.labels", "SoftLabelStore": "ddkit.labels", "relabel": "ddkit.labels",
    "ProtocolConfig": "ddkit.evaluate", "format_table": "ddkit.evaluate", "resolve_protocol": "ddkit.evaluate",
    "ConfigError": "ddkit.errors", "DDKitError": "ddkit.errors",
}
# ``ddkit.evaluate`` is the subpackage, made callable as its function ``evaluate`` (see ddkit/evaluate/__init__.py):
# a plain re-export would be replaced by the subpackage as soon as anything imports it


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # once: later look-ups are plain attribute reads
        return value
    if name == "evaluate":
        import importlib

        return importlib.import_module("ddkit.evaluate")
    raise AttributeError(f"module 'ddkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# what ddkit.load refuses, and what reads it instead
_OTHER_LOADERS = {
    "expert-buffer": "ddkit.methods.trajectory.load_experts(path) reads it",
    "statistics": "a cache of real-data statistics the recover methods read themselves; `ddkit show` summarises it",
    "ddranking-export": "torch.load(path / 'images.pt', weights_only=True) reads its tensors (meta.json: classes)",
    "bench-config": "`ddkit show` summarises it; its table is bench.json (ddkit.artifacts.read_json)",
    "bench-table": "ddkit.artifacts.read_json(path) reads it (`ddkit report` renders it)",
    "bench-cell": "ddkit.artifacts.read_json(path) reads it",
    "bench-report": "ddkit.artifacts.read_json(path) reads it",
    "imagefolder-decoded": "an entry of the imagefolder source's decoded-image cache, which loading that dataset "
                           "maps itself (ddkit.data.load_dataset); `ddkit show` summarises it, `ddkit cache` lists "
                           "the cache and `ddkit cache prune` removes entries",
}
_LOADS = "ddkit.load reads distilled sets, run folders, teachers, FKD stores and evaluation reports"


def load(path, normalize: bool = False):
    """Load what ddkit wrote at ``path``, by the ``kind`` its record names:

    - a distilled set (its folder or manifest.json): a :class:`~ddkit.distilled.DistilledSet`, a torch
      ``Dataset`` of (image, label) pairs with pixels in [0, 1] (``normalize=True``: normalised with
      the dataset's mean and std);
    - a ``ddkit run`` folder: its distilled set (the run manifest's ``stages.distilled``), as above;
    - a teacher: a :class:`~ddkit.teacher.Teacher` on the CPU (``Teacher.load(path, device)`` for another);
    - an FKD store (``ddkit relabel``): a :class:`~ddkit.labels.SoftLabelStore`;
    - an evaluation report (``eval-*.json``; a run's ``report/eval.json`` or ``report/`` holds several,
      under ``evaluations``): the JSON as a dict, which :func:`format_table` prints.

    Anything else is refused in one line naming what reads it.
    """
    from pathlib import Path

    from ddkit.artifacts import MANIFEST, check_schema_version, file_kind, folder_kind, read_json
    from ddkit.distilled import DistilledSet, set_folder
    from ddkit.errors import DDKitError

    if not isinstance(path, (str, _os.PathLike)) or not isinstance(normalize, bool):
        return DistilledSet.load(path, normalize=normalize)  # its one-line errors name the distilled set
    where = Path(path)
    if where.is_file() and where.name == MANIFEST:
        where = where.parent
    if where.is_file():
        kind = file_kind(where) if where.suffix == ".json" else None
    elif where.is_dir():
        kind = folder_kind(where)
        if kind is None and file_kind(where / "eval.json") == "evaluation-set":  # a run's report/ folder
            where, kind = where / "eval.json", "evaluation-set"
    else:
        kind = None
    if kind in (None, "distilled-set", "imagefolder-export", "pt-export", "pipeline-run"):
        # exports and non-artifacts: its one-line errors; a run folder: its distilled stage
        return DistilledSet.load(set_folder(where, "load its stage: ddkit.load({!r})"), normalize=normalize)
    if normalize:
        raise DDKitError(f"normalize applies to distilled sets, but {str(where)!r} is a {kind!r}; leave normalize out")
    if kind == "teacher":
        from ddkit.teacher import Teacher

        return Teacher.load(where)
    if kind == "fkd-soft-labels":
        from ddkit.labels import SoftLabelStore

        return SoftLabelStore.load(where)
    if kind in ("evaluation", "evaluation-set") and where.is_file():
        from ddkit.evaluate.metrics import check_report

        record = read_json(where, "evaluation report")
        check_schema_version(record, where, "it is damaged: evaluate again to rewrite it", required=False)
        reports = record.get("evaluations") if kind == "evaluation-set" else [record]
        for report in reports if isinstance(reports, list) else [{}]:  # a damaged list: refused as one
            check_report(report if isinstance(report, dict) else {}, where)
        return record
    if kind in _OTHER_LOADERS:
        raise DDKitError(f"{str(where)!r} is a {kind!r} record, which ddkit.load does not read; {_OTHER_LOADERS[kind]}")
    raise DDKitError(f"{str(where)!r} is a {kind!r} record, which ddkit.load does not know; {_LOADS}")


__all__ = ["__version__", "load", "evaluate", *sorted(_EXPORTS)]
