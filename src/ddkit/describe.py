"""One-paragraph summaries of whatever ddkit writes (``ddkit show``).

:func:`describe` reads the ``kind`` a file or folder records (an artifact's manifest, a bench table,
cell or synthesis record (a bench's, or a benchmark script's), an evaluation, an export's side file, a
``.pt`` export) and returns a short plain-text summary of it; :func:`read_record` returns the record
itself (a ``.pt`` export's tensors as their shape and dtype).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddkit.artifacts import (
    KIND_FILES,
    MANIFEST,
    check_schema_version,
    damaged_record,
    load_failure,
    member,
    quiet_torch_load,
    read_json,
)
from ddkit.errors import DDKitError, printable
from ddkit.evaluate.metrics import drop_diverged_scores
from ddkit.evaluate.tables import format_bench_table, format_table, ipc_text, single_seed

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
    import torch  # loaded already: the export was read with torch.load

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
        obj = quiet_torch_load(path)
    except Exception as exc:  # torch.load raises many types for a file it cannot read; all mean the same here
        raise DDKitError(f"{str(path)!r} is damaged or not a file `ddkit show` reads (torch.load: "
                         f"{load_failure(exc)}); a damaged `ddkit export --format pt` file: remove it and export the "
                         f"set again; {_ACCEPTS}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise DDKitError(f"{str(path)!r} holds a {type(obj).__name__}, not a ddkit record; {_ACCEPTS} "
                         "(a ddranking export: pass its folder)")
    return _tensor_info(obj)


def _not_json(path: Path) -> bool:
    """Whether ``path`` (not named .json) holds something other than a JSON record (an image, weights):
    its first bytes tell, without reading a file of gigabytes."""
    with path.open("rb") as f:
        return not f.read(64).lstrip().startswith((b"{", b"["))


def _load_record(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The record at ``path`` as it is stored (unchecked) and the file it came from."""
    path = Path(path)
    if not path.exists():
        raise DDKitError(f"{str(path)!r} not found; {_ACCEPTS}")
    if path.is_dir():
        found = next((path / name for name in _RECORD_FILES if (path / name).is_file()), None)
        if found is None and path.name == "report" and (path.parent / "config.json").is_file():
            found = path / "eval.json" if (path / "eval.json").is_file() else None  # a `ddkit run`'s report/
        if found is None:
            # a `ddkit run` killed before its last stage has stage folders but no record of its own yet
            check_run_finished(path)
            from ddkit.report import _older_report

            if _older_report(path):
                raise DDKitError(f"{str(path)!r} is a `ddkit report` folder written by an older ddkit (no "
                                 f"manifest.json); run `ddkit report BENCH_FOLDER --out {str(path)!r}` again")
            raise DDKitError(f"{str(path)!r} holds no ddkit record ({', '.join(_RECORD_FILES)}); pass a ddkit "
                             "output folder")
        path = found
    if _is_torch_file(path):
        record = _read_torch_record(path)
    elif path.suffix != ".json" and _not_json(path):  # an image, weights, a text file: no record at all
        what = f"a {path.suffix} file" if path.suffix else "a file that is not JSON"
        if any((path.parent / name).is_file() for name in _RECORD_FILES):  # a file of an artifact: name the artifact
            raise DDKitError(f"{str(path)!r} is not a ddkit record ({what} of the ddkit output {str(path.parent)!r}); "
                             "pass that folder")
        raise DDKitError(f"{str(path)!r} is not a ddkit record ({what}); {_ACCEPTS}")
    else:
        record = read_json(path, "ddkit record", mapping=False)
    if not isinstance(record, dict):
        raise DDKitError(f"{str(path)!r} is not a ddkit record (a JSON object with a 'kind'); pass a ddkit output")
    return record, path


def read_record(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The record that describes ``path`` (a folder's manifest / bench table / export meta, a JSON file,
    a ``.pt`` export's fields) and the file it came from. A record :func:`describe` cannot summarise (no
    kind of ddkit's, a missing or mistyped field) is refused here too; an artifact's files are not checked,
    so ``show --json`` prints the manifest of a damaged artifact, to see what is there."""
    record, where = _load_record(path)
    _summarise(record, where, check_files=False)
    return record, where


def describe(path: str | Path) -> str:
    """A short plain-text summary of the ddkit output at ``path``."""
    record, where = _load_record(path)
    text = _summarise(record, where)
    if record.get("kind") == "bench-config" and where.name == "config.json":
        # here, not in _summarise: counting the finished cells reads the config as ``ddkit bench`` does (a cell
        # counts when made with the protocol hashes this ddkit gives it; the config checks need the method option
        # classes, TrainConfig and the model registry), which imports torch; ``show --json`` (read_record) prints
        # the record without the count, so it imports none (the count never refuses a record; a config that no
        # longer reads as a whole is counted from its matrix, :func:`_matrix_only`)
        text += "\n" + _bench_progress(record, where.parent)
    return text


def _summarise(record: dict[str, Any], where: Path, check_files: bool = True) -> str:
    """The summary of ``record`` (read from ``where``); ``check_files``: first check the files of the
    artifact it describes (:func:`check_artifact`)."""
    kind = record.get("kind")
    summarise = _SUMMARIES.get(kind) if isinstance(kind, str) else None  # a list or object kind: no record of ours
    if kind is None and where.name == "config.json" and (where.parent / "distilled" / "manifest.json").is_file():
        if (where.parent / MANIFEST).is_file():  # a finished run: its record is the folder's manifest
            return _summarise(*_load_record(where.parent), check_files=check_files)
        check_run_finished(where.parent)
    if kind is None and (older := _older_export(record, where)) is not None:
        raise DDKitError(f"{str(older)!r} was written by an older ddkit export (it records no kind); export it "
                         f"again: `ddkit export SET --format {'pt' if older == where else 'imagefolder'} --out "
                         f"{str(older)!r}`")
    if kind == "imagefolder-decoded" and where.name == MANIFEST:
        from ddkit.cache import stale_reason

        if why := stale_reason("imagefolder", where.parent):
            raise DDKitError(f"the decoded-image cache {str(where.parent)!r} was made by an older ddkit ({why}), "
                             "which this one never reads (it decodes the images into a new entry); prune it "
                             "(`ddkit cache prune --stale`, or rm -r)")
    if summarise is None:
        raise DDKitError(f"{str(where)!r} is not a ddkit record ddkit can summarise (kind {kind!r}); pass one of: "
                         f"{', '.join(sorted(_SUMMARIES))}")
    if kind in _VERSIONED:  # a newer ddkit's record may mean other things by its fields (caches keep own schemas)
        check_schema_version(record, where, _FIXES.get(kind, "it is damaged, re-create it"), required=False)
    with damaged_record(where, f"a {kind!r} record", _FIXES.get(kind, "it is damaged, re-create it"),
                        (KeyError, TypeError, ValueError, AttributeError)):
        # the record of a folder: check the folder's files
        if check_files and kind == "pt-export" and _is_torch_file(where):
            check_artifact(kind, where, record)
        elif check_files and where.name == _ARTIFACT_RECORD.get(kind, MANIFEST):
            check_artifact(kind, where.parent, record)
        _check_numbers(kind, record, where)
        return summarise(_printable_text(record))


def _older_export(record: dict[str, Any], where: Path) -> Path | None:
    """The export an older ddkit wrote that ``record`` (read from ``where``, no kind) is of, or None: a
    ``--format pt`` file of the set's fields, an imagefolder export's classes.json."""
    from ddkit.distilled import older_imagefolder_export, older_pt_export

    if _is_torch_file(where) and older_pt_export(record):
        return where
    if where.name == "classes.json" and older_imagefolder_export(where.parent):
        return where.parent
    return None


def _printable_text(value: Any) -> Any:
    """``value`` with every str in it (nested in lists and dicts) :func:`printable`: the names a summary
    shows, read from an artifact someone sent, carry no terminal escapes or line breaks."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, list):
        return [_printable_text(v) for v in value]
    if isinstance(value, dict):
        return {k: _printable_text(v) for k, v in value.items()}
    return value


_CELL_FIX = "the cell is damaged: delete it and re-run `ddkit bench` with the run's config to make it again"


def _check_numbers(kind: str, record: dict, where: Path) -> None:
    """Refuse an evaluation (or a run's or report's list of them), a bench cell or table whose summaries are not
    their seeds' (an edited mean, a NaN, n not the number of seeds): ``show`` would print them as results."""
    from ddkit.evaluate.metrics import accuracy_problem, cell_problem, check_report, summary_problem

    if kind == "evaluation":
        check_report(record, where)
    elif kind in ("evaluation-set", "pipeline-run"):  # a run's manifest lists its evaluations too
        for i, report in enumerate(record["evaluations"]):
            check_report(report, f"{where}: evaluations[{i}]", "run `ddkit run` with its config again to rewrite it")
    elif kind in ("bench-cell", "bench-table"):
        for i, row in enumerate([record] if kind == "bench-cell" else record["rows"]):
            if problem := cell_problem(row):
                where_ = f"{str(where)!r}" + (f" rows[{i}]" if kind == "bench-table" else "")
                raise DDKitError(f"{where_} holds {problem}; {_FIXES.get(kind, _CELL_FIX)}")
    elif kind in ("random-baseline-cache", "distilled-student-cache", "full-reference-cache"):  # as `ddkit evaluate`
        key = "result" if kind == "full-reference-cache" else "accuracy"  # refuses to read it
        if problem := (accuracy_problem if key == "accuracy" else summary_problem)(record[key]):
            raise DDKitError(f"cache entry {str(where)!r} holds {key} {problem}; it is damaged: delete it "
                             "(`ddkit evaluate` trains its students again)")


# how to re-create a damaged record, where it is not the command that wrote it
_FIXES = {"bench-table": "it is damaged: re-run `ddkit bench` with the run's config (finished cells are reused) "
                         "to rebuild it",
          **{kind: "it is damaged: export the distilled set again"
             for kind in ("imagefolder-export", "ddranking-export", "pt-export")}}

# the records written at ddkit's SCHEMA_VERSION that are read without read_manifest (artifacts' manifests are checked
# there; cache entries have schemas of their own, ddkit.cache); exports record one in their side file or .pt fields
_VERSIONED = ("evaluation", "evaluation-set", "pipeline-run", "bench-table", "bench-config", "imagefolder-export",
              "ddranking-export", "pt-export")

# the file that records the kind of an artifact folder, where it is not its manifest.json (a bench folder's table
# names its sets; a pt export is a file, checked as such)
_ARTIFACT_RECORD = {"imagefolder-export": "classes.json", "ddranking-export": "meta.json", "bench-table": "bench.json"}


def check_artifact(kind: str, folder: Path, manifest: dict) -> None:
    """Load the artifact of ``kind`` in ``folder`` as its users would (files, shapes, values), so ``show``
    refuses an incomplete or damaged artifact instead of summarising its manifest alone. An expert
    buffer (gigabytes at paper scale) is checked from its files' headers (each opens, holds a trajectory of
    the manifest's shape), a statistics cache for its file only, an image-folder export for its class
    folders and that each image opens, a pt export (``folder``: the file) and a DD-Ranking export for their
    tensors as a set's are checked (:func:`~ddkit.distilled.check_set_tensors`), a bench report for the files its
    manifest lists, a bench folder for each set its table names (its manifest and tensor files, not their
    contents: ``ddkit show -q`` a set's folder loads it)."""
    if kind == "distilled-set":
        from ddkit.distilled import DistilledSet

        DistilledSet.load(folder)
    elif kind == "teacher":
        from ddkit.teacher import Teacher

        Teacher.load(folder)
    elif kind == "fkd-soft-labels":
        from ddkit.labels.fkd import SoftLabelStore

        SoftLabelStore.load(folder)
    elif kind == "expert-buffer":
        _check_experts(folder)
    elif kind == "imagefolder-export":
        _check_imagefolder(folder, manifest)
    elif kind == "ddranking-export":
        _check_ddranking(folder, manifest)
    elif kind == "pt-export":
        _check_pt_export(folder)
    elif kind == "bench-report":
        _check_report(folder, manifest)
    elif kind == "bench-table":
        _check_bench(folder, manifest)
    elif kind == "pipeline-run":
        _check_run(folder, manifest)
    elif kind == "imagefolder-decoded":
        from ddkit.data.sources import _read_entry

        try:
            _read_entry(folder, manifest.get("key"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DDKitError(f"the decoded-image cache {str(folder)!r} is damaged ({str(exc).splitlines()[0]}); "
                             "delete it (`ddkit cache prune --kind imagefolder`, or rm -r): the next load decodes "
                             "the images again") from None
    elif kind == "statistics":
        from ddkit.cache import STATISTICS_TENSORS as TENSORS

        if not (folder / TENSORS).is_file():
            raise DDKitError(f"{kind} {str(folder)!r} lacks its file(s) {[TENSORS]}; the artifact is incomplete, "
                             "re-create it")


def _check_run(folder: Path, manifest: dict) -> None:
    """Each stage a run's manifest names (teacher, distilled set, FKD labels), checked as its own artifact."""
    from ddkit.artifacts import read_manifest

    for stage, kind in (("teacher", "teacher"), ("distilled", "distilled-set"), ("labels", "fkd-soft-labels")):
        if (path := run_stage(folder, manifest, stage)) is not None:
            try:
                check_artifact(kind, path, read_manifest(path, kind))
            except DDKitError as e:
                raise DDKitError(f"the run's {stage} stage: {e}") from None


#: the stages of a ``ddkit run`` folder, each a subfolder of that name
RUN_STAGES = ("teacher", "distilled", "labels")
#: the fix of a damaged run manifest
RERUN = "run the run's config again to rewrite it"


def run_stage(folder: Path, manifest: dict, stage: str) -> Path | None:
    """The folder of ``stage`` that the manifest of the run ``folder`` names, or None for a teacher or labels stage
    the run did not make (null); the distilled stage, which every run makes, must be named. A damaged entry (missing,
    not a name, outside the folder) is refused, as ``ddkit show`` and every reader of a run's set refuse it."""
    stages = manifest.get("stages")
    name = stages.get(stage) if isinstance(stages, dict) else None
    if name is None and stage != "distilled":
        return None
    if not isinstance(name, str):
        raise DDKitError(f"{str(folder / MANIFEST)!r} names no {stage} stage (stages.{stage}); the manifest is "
                         f"damaged: {RERUN}")
    return member(folder, name, folder / MANIFEST, f"stages.{stage}", RERUN)


def check_run_finished(folder: Path, load_stage: str = "show a stage folder, e.g. {!r}") -> None:
    """Refuse ``folder`` where it is a ``ddkit run`` folder killed before its last stage: stage folders but no
    manifest.json yet. ``load_stage`` says how to read its distilled stage instead (where that was made)."""
    if (folder / MANIFEST).is_file():
        return
    done = [name for name in RUN_STAGES if (folder / name / MANIFEST).is_file()]
    if done:
        other = f", or {load_stage.format(str(folder / 'distilled'))}" if "distilled" in done else ""
        raise DDKitError(f"{str(folder)!r} is an unfinished `ddkit run` folder (stages done: {', '.join(done)}; no "
                         f"manifest.json: killed before its last stage, or from before run folders had a "
                         f"manifest.json); run its config again with the same --out to finish it (finished "
                         f"stages are reused, though stages an older ddkit made may be made again){other}")


def _check_experts(folder: Path) -> None:
    """What :func:`ddkit.methods.trajectory.load_experts` checks, from the files' headers: the manifest's
    fields, at least one expert, each expert file opens and holds a float ``trajectory`` of shape
    ``[epochs + 1, num_params]``; and the manifest's parameter list adds up to ``num_params`` and is
    that of its model (as :meth:`ExpertBuffer.build_model` checks), and each file's bytes have the sha256 its
    manifest records (about a second per GB). Values (NaN) are not decoded."""
    from safetensors import SafetensorError, safe_open

    from ddkit.artifacts import check_sha256
    from ddkit.methods.trajectory import KIND, ExpertBuffer, read_experts_manifest

    manifest = read_experts_manifest(folder)
    damaged = f"the manifest is damaged: re-create the {KIND} artifact"
    if not manifest["experts"]:
        raise DDKitError(f"expert buffer {str(folder)!r} has no experts; re-create it")
    missing = [e["file"] for e in manifest["experts"] if not (folder / e["file"]).is_file()]
    if missing:
        raise DDKitError(f"{KIND} {str(folder)!r} lacks its file(s) {missing[:3]}; the artifact is incomplete, "
                         "re-create it")
    spec = manifest["params"]
    if not all(isinstance(p, dict) and isinstance(p.get("shape"), list) and all(isinstance(n, int) for n in p["shape"])
               for p in spec):
        raise DDKitError(f"{str(folder / MANIFEST)!r} holds params that are not [{{name, shape}}]; {damaged}")
    counted = sum(math.prod(p["shape"]) for p in spec)
    if counted != manifest["num_params"]:
        raise DDKitError(f"{str(folder / MANIFEST)!r} lists params of {counted} values but num_params "
                         f"{manifest['num_params']}; {damaged}")
    ExpertBuffer([], manifest, folder).build_model()  # the model still has the buffer's parameters
    want = [manifest["epochs"] + 1, manifest["num_params"]]
    for entry in manifest["experts"]:
        path = folder / entry["file"]
        try:
            with safe_open(str(path), "pt") as f:
                names = list(f.keys())
                traj = f.get_slice("trajectory") if "trajectory" in names else None
                got = None if traj is None else list(traj.get_shape())
                dtype = None if traj is None else traj.get_dtype()
        except (SafetensorError, OSError, ValueError) as exc:
            raise DDKitError(f"expert trajectory {str(path)!r} is corrupt ({str(exc).splitlines()[0]}); "
                             "re-create it") from None
        if got != want or dtype not in ("F16", "BF16", "F32", "F64"):
            raise DDKitError(f"expert file {str(path)!r} holds trajectory {got} ({dtype}), manifest says {want} "
                             "(floating point); the buffer is corrupt, re-create it")
        check_sha256(manifest, folder, entry["file"], KIND, "expert trajectory", "re-create the buffer")


def _export_fix(kind: str) -> str:
    return f"the {kind} is incomplete or damaged; export the distilled set again"


def _check_imagefolder(folder: Path, meta: dict) -> None:
    """An image-folder export holds a folder of images for each class of its classes.json (as many in
    each when the set had a fixed IPC), and every image opens, all of one size and mode (as a set's are)."""
    from PIL import Image, UnidentifiedImageError

    from ddkit.distilled import class_folder_names

    kind, where = "imagefolder-export", folder / "classes.json"
    classes = meta.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise DDKitError(f"{str(where)!r} holds classes {classes!r}, not a list of class names; {_export_fix(kind)}")
    names = meta.get("folders", class_folder_names(classes))  # exports before the record named them
    if not (isinstance(names, list) and len(names) == len(classes) and all(isinstance(n, str) for n in names)):
        raise DDKitError(f"{str(where)!r} holds folders {names!r}, not one folder name per class; {_export_fix(kind)}")
    counts, shape, first = {}, None, None
    for i, name in enumerate(names):
        path = member(folder, name, where, f"folders[{i}]", "export the distilled set again")
        images = sorted(path.glob("*.png")) if path.is_dir() else []
        # a set without an ipc may hold no image of a class: its export writes the class's folder empty
        if not images and (isinstance(meta.get("ipc"), int) or not path.is_dir()):
            raise DDKitError(f"export {str(folder)!r} holds no images of class folder {name!r}; {_export_fix(kind)}")
        counts[name] = len(images)
        for image in images:
            try:
                with Image.open(image) as im:
                    im.verify()
                    this = (im.size, im.mode)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
                raise DDKitError(f"image {str(image)!r} does not open "
                                 f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                                 f"{_export_fix(kind)}") from None
            if shape is None:
                shape, first = this, image
            elif this != shape:
                raise DDKitError(f"image {str(image)!r} is {this[0][0]}x{this[0][1]} {this[1]}, but "
                                 f"{str(first)!r} is {shape[0][0]}x{shape[0][1]} {shape[1]}: an export's images "
                                 f"share one size and mode; {_export_fix(kind)}")
    usual = max(set(counts.values()), key=list(counts.values()).count)
    odd = [f"{n} in {name!r}" for name, n in counts.items() if n != usual]
    if isinstance(meta.get("ipc"), int) and odd:  # a set of a fixed IPC has as many images of every class
        raise DDKitError(f"export {str(folder)!r} holds {usual} images in its other class folders but "
                         f"{', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''}; {_export_fix(kind)}")
    if isinstance(meta.get("ipc"), int) and usual != meta["ipc"]:  # as many lost from every folder
        raise DDKitError(f"export {str(folder)!r} holds {usual} images in each class folder, but {str(where)!r} says "
                         f"ipc {meta['ipc']}; {_export_fix(kind)}")


def _check_ddranking(folder: Path, meta: dict) -> None:
    """A DD-Ranking export's tensors load and agree with its meta.json: ``ipc`` images of each class in
    class-major order, the channels of its mean, soft labels (where written) one row of logits per image; and are
    checked as a set's are (:func:`~ddkit.distilled.check_set_tensors`: finite pixels and logits)."""
    import torch

    from ddkit.distilled import check_set_tensors

    kind = "ddranking-export"
    classes, ipc, mean = meta.get("classes"), meta.get("ipc"), meta.get("mean")
    if not (isinstance(classes, list) and classes and isinstance(ipc, int) and ipc > 0 and isinstance(mean, list)):
        raise DDKitError(f"{str(folder / 'meta.json')!r} lacks classes, ipc or mean; {_export_fix(kind)}")

    def load(name: str) -> torch.Tensor:
        try:
            obj = quiet_torch_load(folder / name)
        except Exception as exc:  # torch.load raises many types for a damaged file; all mean the same here
            raise DDKitError(f"{str(folder / name)!r} does not load ({load_failure(exc)}); "
                             f"{_export_fix(kind)}") from None
        if not isinstance(obj, torch.Tensor):
            raise DDKitError(f"{str(folder / name)!r} holds a {type(obj).__name__}, not a tensor; {_export_fix(kind)}")
        return obj

    n, k = ipc * len(classes), len(classes)
    for name in ("images.pt", "labels.pt"):
        if not (folder / name).is_file():
            raise DDKitError(f"export {str(folder)!r} lacks {name}; {_export_fix(kind)}")
    images, labels = load("images.pt"), load("labels.pt")
    if images.dim() != 4 or images.shape[0] != n or images.shape[1] != len(mean) or not images.is_floating_point():
        raise DDKitError(f"{str(folder / 'images.pt')!r} holds {str(images.dtype).removeprefix('torch.')} "
                         f"images of shape {list(images.shape)}, meta.json says {n} images ({ipc} per class) of "
                         f"{len(mean)} channel(s); {_export_fix(kind)}")
    if labels.tolist() != [c for c in range(k) for _ in range(ipc)]:
        raise DDKitError(f"{str(folder / 'labels.pt')!r} does not hold {ipc} labels of each of {k} classes "
                         f"in class-major order; {_export_fix(kind)}")
    soft = None
    if (folder / "soft_labels.pt").is_file():
        soft = load("soft_labels.pt")
        if list(soft.shape) != [n, k]:
            raise DDKitError(f"{str(folder / 'soft_labels.pt')!r} holds soft labels of shape {list(soft.shape)}, not "
                             f"[{n}, {k}]; {_export_fix(kind)}")
    check_set_tensors(images, labels, soft, k, images_at=repr(str(folder / "images.pt")),
                      labels_at=repr(str(folder / "labels.pt")), soft_at=f"the soft labels in "
                      f"{str(folder / 'soft_labels.pt')!r}", fix=_export_fix(kind))


def _check_pt_export(path: Path) -> None:
    """A ``ddkit export --format pt`` file's tensors, checked as a set's are (:func:`check_set_tensors`: as many
    labels (and soft-label rows) as images, finite pixels and logits, labels and soft-label columns of its classes),
    the channels of its mean, ``ipc`` images of each class where it records one, and the ``pixel_range`` it records
    (which ``show`` prints) that of its images."""
    import torch

    from ddkit.distilled import check_set_tensors, pixel_range

    kind, fix = "pt-export", _export_fix("pt-export")
    record = quiet_torch_load(path)  # read once already (_read_torch_record): it loads
    images, labels, soft = record.get("images"), record.get("labels"), record.get("soft_labels")
    classes, mean = record.get("classes"), record.get("mean")
    if not (isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor) and isinstance(classes, list)
            and classes and isinstance(mean, list) and isinstance(soft, (torch.Tensor, type(None)))):
        raise DDKitError(f"{str(path)!r} lacks its images, labels, classes or mean (or holds other types there); "
                         f"the {kind} is incomplete or damaged; export the distilled set again")
    where = repr(str(path))
    check_set_tensors(images, labels, soft, len(classes), images_at=where, soft_at=f"the soft labels in {where}",
                      fix=fix)
    if images.shape[1] != len(mean):
        raise DDKitError(f"{where} holds images of {images.shape[1]} channel(s) but a mean of {len(mean)}; {fix}")
    ipc, held = record.get("ipc"), torch.bincount(labels, minlength=len(classes)).tolist()
    if isinstance(ipc, int) and set(held) != {ipc}:
        raise DDKitError(f"{where} holds {held} images per class but records ipc {ipc}; {fix}")
    span = record.get("pixel_range")  # exports before 2026-12-06 did not record it
    if span is not None and list(span) != pixel_range(images):
        raise DDKitError(f"{where} records pixel_range {span} but its pixels lie in {pixel_range(images)}; {fix}")


def _check_report(folder: Path, manifest: dict) -> None:
    """A ``ddkit report`` folder holds each file its manifest lists (``files``: report.md, report.html, plots,
    set grids)."""
    files = manifest["files"]
    fix = (f"run `ddkit report {manifest.get('run_dir', 'BENCH_FOLDER')} --out {str(folder)}` again to write it "
           "whole")
    if not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
        raise DDKitError(f"{str(folder / MANIFEST)!r} holds files {files!r}, not a list of file names; {fix}")
    outside = [f for f in files if not f or Path(f).is_absolute() or ".." in Path(f).parts]
    if outside:
        raise DDKitError(f"{str(folder / MANIFEST)!r} lists {outside[0]!r} among its files, which leads outside the "
                         f"report's folder; the manifest is damaged: {fix}")
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DDKitError(f"report {str(folder)!r} lacks {len(missing)} of the files its manifest lists "
                         f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); {fix}")


def _check_bench(folder: Path, table: dict) -> None:
    """A bench folder holds each distilled set its table's rows name (``distilled_path``: the set's folder under
    ``distilled/``): its manifest and the tensor files the manifest lists. The sets are not loaded (a bench of
    full-size sets holds gigabytes): ``ddkit show -q`` of a set's folder checks its contents. A table without a
    ``distilled/`` folder beside it is a copy of the table alone (as kept to write its report again), read from
    its records."""
    from ddkit.artifacts import read_manifest

    if not (folder / "distilled").exists():
        return
    fix = "re-run `ddkit bench` with its config (finished cells are reused) to make it again"
    seen = set()
    for row in table["rows"]:
        if not isinstance(row.get("distilled_path"), str) or row["distilled_path"] in seen:
            continue
        seen.add(row["distilled_path"])
        name = Path(row["distilled_path"]).name
        path = member(folder / "distilled", name, folder / "bench.json", "a row's distilled_path", fix)
        if not (path / MANIFEST).is_file():
            raise DDKitError(f"bench {str(folder)!r} lacks the distilled set {name!r} its table names "
                             f"({str(path)!r}); {fix}")
        try:
            manifest = read_manifest(path, "distilled-set", require={"files.images": str})
        except DDKitError as e:
            raise DDKitError(f"bench {str(folder)!r}: {e}") from None
        files = manifest["files"]
        for key in ("images", "soft_labels"):
            if files.get(key) and not member(path, files[key], path / MANIFEST, f"files.{key}", fix).is_file():
                raise DDKitError(f"bench {str(folder)!r}: the distilled set {name!r} lacks its file {files[key]!r}; "
                                 f"{fix}")


def _bench_progress(record: dict, root: Path) -> str:
    """How many of a bench folder's cells are finished: a cell file of the matrix exists and was made with
    the config's protocols and student seeds, by this ddkit's revision of student training
    (:data:`~ddkit.cache.STUDENT_REVISION`: its cells record theirs from 2 on, as their key names it). ``show`` loads
    no teacher or distilled set, so a cell whose teacher or set changed still counts here; ``ddkit bench`` re-checks
    those and recomputes the cell."""
    from ddkit.bench import BenchConfig, cells_of
    from ddkit.cache import STUDENT_REVISION
    from ddkit.config import from_dict

    note = ""
    try:
        cfg = from_dict(BenchConfig, record["config"])
    except (DDKitError, KeyError, TypeError, ValueError) as exc:
        try:  # a method option or teacher setting this ddkit no longer reads decides no cell's file or protocol
            cfg = from_dict(BenchConfig, _matrix_only(record["config"]))
        except (DDKitError, KeyError, TypeError, ValueError):
            return "(its matrix does not read with this ddkit; cannot count finished cells)"
        why = str(exc) if len(str(exc)) <= 160 else str(exc)[:157] + "..."
        note = (f"\n(its config does not read with this ddkit as a whole ({why}), which `ddkit bench` refuses; cells "
                "counted from its matrix)")
    cells = cells_of(cfg)
    done = stale = 0
    revisions: dict[Any, int] = {}  # cells of this config made by another revision of student training: how many
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
        if current and (revision := rec.get("revision", 1)) != STUDENT_REVISION:
            revisions[revision] = revisions.get(revision, 0) + 1
            continue
        done += current
        stale += not current
    if not (root / "bench.json").is_file():
        table = "no table yet (bench.json)"
    else:
        table = "bench.json holds the table" if done == len(cells) else "bench.json holds an earlier run's table"
    why = [f"{stale} cell file(s) from another config or seeds"] if stale else []
    if revisions:
        made = " or ".join(str(r) for r in sorted(revisions, key=str))
        why.append(f"{sum(revisions.values())} made by revision {made} of ddkit's student training (this ddkit's is "
                   f"{STUDENT_REVISION})")
    old = f" ({', '.join(why)}, recomputed by the next `ddkit bench`)" if why else ""
    return f"{done} of {len(cells)} cells finished{old}; {table}{note}"


#: what counting a bench's cells reads of its config: the matrix, with the protocol settings of each cell
_MATRIX_KEYS = ("datasets", "ipcs", "students", "label_modes", "seeds", "protocol", "overrides", "ipc_overrides",
                "student_options", "student_ipcs", "method_ipcs")


def _matrix_only(config: dict) -> dict:
    """The part of a bench's recorded ``config`` that names its cells and their protocols (:data:`_MATRIX_KEYS`),
    each method as the method ``random`` under its name in tables: its own settings (options, a method this ddkit
    no longer has), the teachers and the relabel settings decide no cell's file name or protocol hash."""
    methods = [m if isinstance(m, str) else m.get("label") or m.get("name", "random") for m in config["methods"]]
    # soft labels: label mode 'stored' asks every set for them
    return {**{k: config[k] for k in _MATRIX_KEYS if k in config},
            "methods": [{"name": "random", "label": key, "soft_labels": True} for key in methods]}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _seconds(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f} s"


def _mib(x: int | None) -> str:
    return "–" if x is None else f"{x / 2**20:.1f} MiB"


def _pixels(lo: float, hi: float) -> str:
    """A float set's pixel range, and whether it leaves the data's 0..1 (clipped in PNG exports)."""
    beyond = " (beyond the data's 0..1)" if lo < 0 or hi > 1 else ""
    return f"in [{lo:.6g}, {hi:.6g}]{beyond}"  # enough digits to show a value just beyond 1


def _span(span) -> str:
    """A recorded float pixel range as :func:`_pixels` writes it ("" for anything else)."""
    ok = isinstance(span, list) and len(span) == 2 and all(isinstance(v, (int, float)) for v in span)
    return _pixels(*span) if ok else ""


def _distilled(m: dict) -> str:
    images = m.get("images") if isinstance(m.get("images"), dict) else {}
    span = _span(images.get("pixel_range")) if images.get("dtype", "").startswith("float") else ""
    floats = f", float pixels {span}" if span else ""
    if isinstance(rounded := images.get("quantised"), dict):  # distill.image_dtype uint8 rounded float pixels
        span = _span(rounded.get("pixel_range"))
        floats = (f", uint8 pixels rounded from {rounded.get('from', 'float')} {span}".rstrip()
                  + f", {rounded.get('clipped_pixels', 0)} clipped")
    return (f"distilled set: {m['method']['name']} ipc={ipc_text(m['ipc'])} on {m['dataset']['name']} "
            f"(fingerprint {m['dataset']['fingerprint']}), {m['num_images']} images{floats}, {m['bytes']['images']:,} "
            f"image bytes, {m['bytes']['labels']:,} label bytes, seed {m['seed']}")


def _teacher(m: dict) -> str:
    return (f"teacher: {m['model']['name']} on {m['dataset']['name']}, test accuracy {_pct(m['test_accuracy'])}, "
            f"seed {m['seed']}, weights {m['weights_sha']}")


def _evaluation(m: dict) -> str:
    return format_table([m]) + _replaced_set(m)


def _replaced_set(m: dict) -> str:
    """A note where the set at the path evaluation report ``m`` records is no longer the one it scored (another
    ``config_hash`` in its manifest: a run or distill replaced it since), else "" (also for a report from before
    2026-12-07, which names no set, and for a set that is gone or unreadable)."""
    scored = m.get("distilled") if isinstance(m.get("distilled"), dict) else {}
    if not isinstance(scored.get("config_hash"), str) or not isinstance(path := scored.get("path"), str):
        return ""
    try:
        now = read_json(Path(path) / MANIFEST, "distilled-set manifest").get("config_hash")
    except (DDKitError, OSError):
        return ""
    if now is None or now == scored["config_hash"]:
        return ""
    return (f"\nnote: this report scored set {scored['config_hash']}, but the set now at {path} is another "
            f"({now}): evaluate that set again")


def _evaluation_set(m: dict) -> str:
    return format_table(m["evaluations"])


def _fkd(m: dict) -> str:
    from ddkit.labels.fkd import TEACHER_BATCH  # here: showing JSON records imports no torch

    cut = m.get("cutmix")
    top = f"top-{m['top_k']} logits" if m.get("top_k") else "all logits"
    mix = f"CutMix p={cut['prob']} alpha={cut['alpha']}" if cut else "no CutMix"
    bn = m.get("teacher_bn", "running")
    if bn == "batch":
        group = m.get("teacher_bn_batch")
        bn += f" (groups of {group} views)" if group else " (all views of an epoch)"
    if (batch := m.get("teacher_batch_size")) not in (None, TEACHER_BATCH):  # the default (or unrecorded): not said
        bn += f", teacher batches of {batch}"
    others = m["teacher"].get("extra_teachers")
    extra = f" (ensemble with extra_teachers {', '.join(map(str, others))})" if others else ""
    return (f"FKD soft labels: {m['epochs']} epochs x {m['num_images']} images, {m['num_classes']} classes, "
            f"{top} (fp16), views {m['augment']['spec']} + {mix}, teacher BatchNorm {bn}, "
            f"{m['bytes']['total']:,} bytes, seed {m['seed']}, teacher {m['teacher']['fingerprint']}{extra}, "
            f"set {m['distilled']['fingerprint']}")


def _statistics(m: dict) -> str:
    patch = m["config"].get("patch_size")
    return (f"real-data statistics of teacher {m['teacher']} on {m['dataset']} ({m['num_classes']} classes, data "
            f"{m['data']}): {len(m['config']['layers'])} layers{f', {patch}x{patch} patches' if patch else ''}, "
            f"built in {_seconds(m.get('build_seconds'))}")


def _decoded(m: dict) -> str:
    from ddkit.cache import size_text

    s, shapes = m["settings"], m["shapes"]
    subset = [f"{k} {s[k]}" for k in ("train_per_class", "test_per_class") if s.get(k) is not None]
    subset = ", ".join(subset + ([f"subset_seed {s['subset_seed']}"] if subset else []))
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return (f"decoded-image cache of imagefolder {s['root']} (splits {'/'.join(s['splits'])}, {len(s['classes'])} "
            f"classes, image_size {s['image_size']}{f', {subset}' if subset else ''}): train {shapes['train']}, test "
            f"{shapes['test']} uint8, {size_text(m['bytes'])}, decoded in {_seconds(m.get('decode_seconds'))} on "
            f"host {m['host']} ({versions}); loading the dataset maps it, `ddkit cache` lists the cache and "
            "`ddkit cache prune --kind imagefolder` removes its entries")


def _trained_where(m: dict) -> str:
    """Where a cached random-subset or full-data student trained (on CUDA: which GPU), and whether an older revision of
    ddkit's student training did (:data:`~ddkit.cache.STUDENT_REVISION`); entries of an older ddkit record nothing."""
    from ddkit.cache import STUDENT_REVISION

    if "torch_threads" in m:
        gpu = m["cuda"].get("gpu") if isinstance(m.get("cuda"), dict) else None
        revision = m.get("revision", 1)
        old = (f" (made by revision {revision} of ddkit's student training, this ddkit's is {STUDENT_REVISION}: never "
               "read again; `ddkit cache prune --stale` removes it)"
               if isinstance(revision, int) and revision < STUDENT_REVISION else "")
        return f", trained with {m['torch_threads']} torch threads on {m['device']}{f' ({gpu})' if gpu else ''}{old}"
    return (" (made by an older ddkit, keyed without thread count and device: never read again; `ddkit cache prune "
            "--stale` removes it)")


def _random_cache(m: dict) -> str:
    return (f"cached random-baseline student: test accuracy {_pct(m['accuracy'])} of a random subset of {m['ipc']} "
            f"images per class, student seed {m['seed']}, protocol {m['protocol_hash']}{_trained_where(m)}")


def _student_cache(m: dict) -> str:
    return (f"cached distilled-set student: test accuracy {_pct(m['accuracy'])} of a {m['method']} set (ipc "
            f"{m['ipc']}), label mode {m['label_mode']}, student seed {m['seed']}, protocol {m['protocol_hash']}"
            f"{_trained_where(m)}")


def _full_cache(m: dict) -> str:
    r = m["result"]
    diverged = f", {r['diverged']} diverged" if r.get("diverged") else ""
    spread = "" if single_seed(r) else f" ± {_pct(r['std'])}"  # one seed: no spread to state
    return (f"cached full-data reference: test accuracy {_pct(r['mean'])}{spread} over {r['n']} student "
            f"seed(s){diverged}, {r['epochs']} epochs{_trained_where(m)}")


def _experts(m: dict) -> str:
    accs = [e.get("test_accuracy") for e in m["experts"]]
    accs = [a for a in accs if a is not None]
    final = f", final test accuracy {_pct(sum(accs) / len(accs))} (mean)" if accs else ""
    return (f"expert buffer: {len(m['experts'])} trajectories of {m['model']['name']} x {m['epochs']} epochs on "
            f"{m['dataset']['name']}, {m['num_params']:,} parameters each{final}, seed {m['seed']}")


def _bench_table(m: dict) -> str:
    for r in m["rows"]:
        drop_diverged_scores(r)  # tables assembled before 2026-12-07 scored diverged students too
    return format_bench_table(m["rows"])


def _bench_cell(m: dict) -> str:
    drop_diverged_scores(m)  # as the bench does when it assembles the table from this cell
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
            f"({m['peak_memory_kind']}) on {m['device']}, {m['bytes']['images']:,} image + "
            f"{m['bytes']['labels']:,} label bytes")


def _synthesis_timing(m: dict) -> str:
    """A set's synthesis record written by ``benchmarks/dc_dsa.py`` (``NAME.synthesis.json``; while the
    set is being made, ``NAME.synthesis.partial.json`` holds the time so far)."""
    if "device" not in m:
        return f"synthesis so far (benchmarks/dc_dsa.py, unfinished or interrupted): {_seconds(m['wall_seconds'])}"
    text = (f"synthesis (benchmarks/dc_dsa.py): {_seconds(m['wall_seconds'])} wall on {m['device']}"
            + (", in chunks resumed from checkpoints" if m.get("chunks_resumed") else "")
            + (f"; machine: {m['machine']}" if m.get("machine") else ""))
    return text + (f"\nmade by: {m['command']}" if m.get("command") else "")


def _run(m: dict) -> str:
    d = m["config"]["distill"]
    head = f"pipeline run: {d['method']} ipc={ipc_text(d['ipc'])} on {m['config']['dataset']['name']}, seed {m['seed']}"
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
    lo, hi = m.get("pixel_range") or (0.0, 1.0)  # exports before 2026-12-06 did not record it
    return (f"{_export(m)}: images {shape('images')} ({m['images']['dtype']}, pixels {_pixels(lo, hi)}), labels "
            f"{shape('labels')}{soft}; classes {names}")


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
    "synthesis-timing": _synthesis_timing,
    "pipeline-run": _run,
    "bench-report": _report,
    "imagefolder-export": _export,
    "ddranking-export": _export,
    "pt-export": _pt_export,
    "imagefolder-decoded": _decoded,
    "random-baseline-cache": _random_cache,
    "distilled-student-cache": _student_cache,
    "full-reference-cache": _full_cache,
}

__all__ = ["describe", "read_record"]


def method_record(key: str) -> dict[str, Any]:
    """What ``ddkit show METHOD --json`` prints: the registered method ``key``'s class, docstring's summary,
    the promises of its class attributes and its options (``config.describe`` of its ``Config``)."""
    import json

    from ddkit.config import describe as config_rows
    from ddkit.methods import METHODS
    from ddkit.registry import origin

    cls = METHODS.get(key)
    return {
        "method": key,
        "class": origin(cls),
        "description": doc_summary(cls),
        "needs_teacher": bool(cls.needs_teacher),
        "uses_teacher": bool(cls.uses_teacher),
        "uses_seed": bool(cls.uses_seed),
        "resumable": bool(cls.resumable),
        # through JSON: a default the table prints is the value a YAML or --set override writes
        "options": [{"name": name, "type": tp, "default": json.loads(json.dumps(default)), "help": text}
                    for name, tp, default, text in config_rows(cls.Config)],
    }


def describe_method(key: str) -> str:
    """``ddkit show METHOD``: the method's docstring summary, what it needs, and a table of its options
    (name, type, default, help) as ``distill.options`` takes them."""
    import json

    m = method_record(key)
    lines = [f"method {key} ({m['class']}): {m['description'] or 'no description (add a docstring to its class)'}",
             f"needs a teacher: {'yes' if m['needs_teacher'] else 'no'}{'' if m['uses_teacher'] else ' (reads none)'}; "
             f"another seed, another set: "
             f"{'yes' if m['uses_seed'] else 'no'}; resumes after an interruption: {'yes' if m['resumable'] else 'no'}"]
    if not m["options"]:
        return "\n".join([*lines, "options: none"])
    rows = [("option", "type", "default", "help")] + [
        (o["name"], o["type"], o["default"] if isinstance(o["default"], str) else json.dumps(o["default"]), o["help"])
        for o in m["options"]]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines.append("options (distill.options.OPTION in a config, --set distill.options.OPTION=VALUE):")
    lines += ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def doc_summary(obj: Any) -> str:
    """The first paragraph of ``obj``'s docstring (its summary, which cites the paper) on one line, or "". A class's
    own docstring only: one without (a user's method) would be described by its base class's (``Method``'s)."""
    import functools
    import inspect

    while isinstance(obj, functools.partial):  # a model family's preset: the family's docstring
        obj = obj.func
    own = obj.__dict__.get("__doc__") if isinstance(obj, type) else inspect.getdoc(obj)
    doc = inspect.cleandoc(own if isinstance(own, str) else "").strip()
    return " ".join(doc.split("\n\n")[0].split())
