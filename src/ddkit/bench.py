"""``ddkit bench``: a matrix of datasets x methods x IPCs x students x label modes, resumable.

Layout of a bench run directory (``BenchConfig.out``)::

    config.json                     the resolved BenchConfig
    teachers/<dataset>/             one teacher per dataset (only when a label mode or method needs one)
    teachers/<dataset>@<name>/      one per teacher_pool entry (extra_teachers: ["@name"])
    distilled/<dataset>-<method>-ipc<N>/          one distilled set per dataset x method x IPC
    distilled/<dataset>-<method>-ipc<N>.synthesis.json   its synthesis wall time and peak memory (and,
                                    for the trajectory methods, the matched experts' test accuracies)
    evals/<hash>.json               every ``evaluate`` report (shared by cells: e.g. the hard-label
                                    evaluation behind HLR is reused by the hard cell of the same set)
    labels/<set>-<key>/             label mode fkd: each set's FKD store (per-epoch soft labels)
    cells/<cell id>.json            one finished cell; never recomputed while its key matches
    bench.json                      the assembled table (written by rank 0)

Every file is written atomically (temp file + rename), so a killed run leaves finished cells and
nothing half-written; re-running the same config recomputes only the missing cells. Full-data
references come from ``evaluate``'s cache ($DDKIT_CACHE).

Under ``torchrun`` teachers and distilled sets are spread over ranks (job i -> rank i % world)
and the unfinished cells are dealt round-robin per student (so every rank gets a share of the
expensive students); each job runs whole on its rank, and rank 0 assembles the table.

Peak memory of synthesis: on CUDA ``torch.cuda.max_memory_allocated`` over the stage; on CPU the
high-water mark of the process RSS (``VmRSS`` in /proc/self/status, sampled every 5 ms by a
background thread) minus the RSS at the start of the stage. Neither ``tracemalloc`` (torch's
allocations bypass it) nor ``ru_maxrss`` (a whole-process high-water mark) measure one stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ddkit import cache as ddcache
from ddkit import distributed as ddist
from ddkit.artifacts import (
    build_lock,
    check_schema_version,
    check_writable,
    folder_kind,
    holds_files,
    read_json,
    recorded_paths,
    refuse_current_folder,
    remove_unused_locks,
    shared_costs,
    versions,
    write_json,
    writing,
)
from ddkit.config import Checked, config_hash, field, field_default, from_dict, keyed, sorted_seeds, to_dict
from ddkit.data.augment import build_augment
from ddkit.data.base import DataBundle, DatasetConfig, load_dataset
from ddkit.determinism import evaluation_change, stage_modes
from ddkit.distilled import DistilledSet
from ddkit.errors import ConfigError, DDKitError
from ddkit.evaluate import metrics
from ddkit.evaluate.metrics import cell_problem, check_report
from ddkit.evaluate.protocol import (
    PATH_FIELDS,
    UNLABELLED_BY_ENSEMBLE,
    ProtocolConfig,
    merge_overrides,
    protocol_settings,
    recorded_overrides,
    recorded_protocol,
    refuse_inert_overrides,
    resolve_protocol,
    unused_overrides,
)
from ddkit.evaluate.runner import check_random_ipc, evaluate, evaluation_bytes, labelling_teacher, progress_form
from ddkit.evaluate.tables import format_bench_table, synthesis_cell, synthesis_seconds  # noqa: F401  (defined here before)
from ddkit.labels.fkd import RelabelSpec, SoftLabelStore
from ddkit.methods import METHODS
from ddkit.methods.base import check_ipc
from ddkit.methods.common import progress_view
from ddkit.pipeline import (
    DEFAULT_IPC,
    OPTION_PATHS,
    DistillConfig,
    check_learned_lr,
    check_method_data,
    check_student,
    check_teacher_folders,
    discard_work,
    distill,
    distill_hash,
    ensemble_identity,
    protocol_inputs,
    reusable_set,
    reusable_stage,
    work_dir,
)
from ddkit.teacher import Teacher, TeacherConfig, check_teacher, saved_teacher, train_teacher
from ddkit.training import LABEL_MODES

log = logging.getLogger(__name__)

CELL_SCHEMA = 1
FKD_PLACEHOLDER = "<made by the bench for each distilled set>"
BenchProgress = Callable[[int, int, dict], None]
# (step, total, record) inside a teacher training, synthesis, relabelling or student training, record["stage"]
# naming it, as evaluate calls its progress (older ddkit called it as (what, done, total))
StageProgress = Callable[[int, int, dict], None]


@dataclass
class MethodSpec(Checked):
    """One method of the matrix with its own options."""

    name: str = field("random", help="registered method key (`ddkit list methods`)")
    options: dict = field({}, help="the method's own settings (its Config dataclass)")
    ipc_options: dict[int, dict] = field({}, help="settings for one IPC over options, e.g. {50: {iterations: 500}} "
                                                  "(papers tune per IPC)")
    soft_labels: bool = field(False, help="store the teacher's logits on each image")
    image_dtype: Literal["float32", "uint8"] = field("float32", added=True,
                                                     help="how the set stores its images (distill.image_dtype): "
                                                          "float32, or uint8 (4x fewer image bytes in the tables)")
    label: str | None = field(None,
                              help="name in tables and file names (default: name); needed when a method appears twice")

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(METHODS.unknown_message(self.name))
        self.ipc_options = {int(k): v for k, v in self.ipc_options.items()}
        if self.label is not None and not re.fullmatch(r"[A-Za-z0-9_.+-]+", self.label):
            raise ConfigError(f"method label {self.label!r} may only use letters, digits and _ . + -")

    @property
    def key(self) -> str:
        return self.label or self.name


#: the protocol fields a bench sets per cell from a list of its own, which overrides may not set
CELL_KEYS = {"student": "students", "label_mode": "label_modes"}


@dataclass
class BenchConfig(Checked):
    """A benchmark matrix (``ddkit bench CONFIG``)."""

    datasets: list[str | DatasetConfig] = field(["synthetic"], help="dataset keys or dataset sections")
    methods: list[str | MethodSpec] = field(["random"], help="method keys or {name, options, soft_labels, label}, "
                                            "each making a set per IPC (full: one set, at IPC 10 alone; every cell's "
                                            "hard evaluation trains the full-data reference already, "
                                            "overrides.full_reference / full_epochs)")
    ipcs: list[int] = field([1, 10], help="images per class")
    students: list[str] = field(["convnet3"], help="student models; several give cross-architecture accuracy")
    label_modes: list[str] = field(["hard"], help="hard, teacher, stored and/or fkd; each is a column of the matrix")
    relabel: RelabelSpec = field(factory=RelabelSpec,
                                 help="label mode fkd: how each set's per-epoch soft labels are stored")
    seeds: list[int] = field([0, 1, 2], seed=True, help="student seeds (accuracy is mean ± std over them), in any "
                             "order (kept sorted: the same cells however they are written)")
    distill_seed: int = field(0, seed=True, help="seed of every method's synthesis")
    protocol: str = field("dc-protocol", help="protocol preset or YAML (`ddkit list protocols`)")
    overrides: dict = field({}, help="protocol fields to change, e.g. {train: {epochs: 100}} (not student or "
                            "label_mode: students and label_modes set them per cell; not fkd_store: the bench makes "
                            "each set's store from relabel)")
    ipc_overrides: dict[int, dict] = field({}, help="protocol fields to change at one IPC, applied after overrides, "
                                           "e.g. {50: {train: {epochs: 100}}} (same for every method: still fair)")
    student_options: dict[str, dict] = field({}, help="options per student, e.g. {resnet18_cifar: {width: 16}}, the "
                                             "same at every IPC (a student listed here takes no student_options "
                                             "from overrides or ipc_overrides)")
    student_ipcs: dict[str, list[int]] = field({}, help="run a student only at these IPCs, e.g. {resnet18_cifar: [10]} "
                                                        "(cross-architecture at one IPC)")
    method_ipcs: dict[str, list[int]] = field({}, help="run a method (by its name in tables) only at these IPCs, e.g. "
                                                       "an ablation at IPC 10")
    robust_scores: bool = field(False, help="also compute ARS: evaluates with and without augmentation (2 more "
                                            "evaluations per cell)")
    ars_augment: str = field("dsa", help="augmentation of the 'with augmentation' variant when the protocol has none")
    lrs_lambda: float = field(0.5, help="lambda of LRS: weight of IOR against HLR")
    ars_gamma: float = field(0.5, help="gamma of ARS: weight of the with-augmentation gap")
    teacher: TeacherConfig = field(factory=TeacherConfig,
                                   help="teacher per dataset (trained only if a label mode or method needs it)")
    teacher_pool: dict[str, TeacherConfig] = field({}, help="more teachers per dataset, by name; a method option "
                                                   "extra_teachers: ['@name'] refers to one (G-VBSM/EDC backbones, "
                                                   "CV-DD committees)")
    device: str = field("auto", help="auto, cpu, cuda or cuda:N")
    out: str = field("runs/bench", help="run directory")

    def __post_init__(self) -> None:
        self.datasets = [DatasetConfig(name=d) if isinstance(d, str) else d for d in self.datasets]
        self.methods = [MethodSpec(name=m) if isinstance(m, str) else m for m in self.methods]
        self.seeds = sorted_seeds(self.seeds)
        problems = []
        for name in ("datasets", "methods", "ipcs", "students", "label_modes", "seeds"):
            if not getattr(self, name):
                problems.append(f"{name} is empty; list at least one")
        bad = [m for m in self.label_modes if m not in LABEL_MODES]
        if bad:
            problems.append(f"unknown label mode(s) {bad}; use hard, teacher, stored or fkd")
        if any(i < 1 for i in self.ipcs):
            problems.append(f"ipcs must be >= 1, got {self.ipcs}")
        for name in ("ipcs", "students", "label_modes"):
            values = getattr(self, name)
            if len(set(map(repr, values))) != len(values):
                problems.append(f"{name} {list(values)} repeat an entry (the same cells twice); list each once")
        keys = [m.key for m in self.methods]
        if len(set(keys)) != len(keys):
            problems.append(f"methods {keys} repeat a name; give each a distinct label")
        # a set without an ipc (uses_ipc = False) is made once, at the default IPC (which DistillConfig takes for
        # it) and filed under it; at any other IPC DistillConfig refuses it only when the bench reaches its set
        for m in self.methods:
            others = [i for i in self.method_ipcs.get(m.key, self.ipcs) if i != DEFAULT_IPC]
            if METHODS.get(m.name).uses_ipc or not others:
                continue
            what, fix = (("keeps every training image", ": every cell trains the full-data reference behind its HLR "
                          "(full_hard) already, set by the protocol's full_reference / full_epochs (e.g. overrides: "
                          "{full_epochs: 20})") if m.name == "full" else
                         ("makes no ipc images per class (uses_ipc = False)",
                          " and make its set with `ddkit run` or `ddkit distill`"))
            problems.append(f"method {m.key!r} ({m.name}) {what}: a bench makes its one set at ipc {DEFAULT_IPC} "
                            f"alone (its rows are filed there), not at ipcs {others}; limit it with method_ipcs: "
                            f"{{{m.key}: [{DEFAULT_IPC}]}} ({DEFAULT_IPC} among ipcs), or remove it from methods{fix}")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            problems.append(f"datasets {names} repeat a name; run them in separate benches")
        joined: dict[str, list[tuple[str, str]]] = {}  # cells and sets are filed under "<dataset>-<method>-ipc..."
        for d in dict.fromkeys(names):
            for k in dict.fromkeys(keys):
                joined.setdefault(f"{d}-{k}", []).append((d, k))
        for name, pairs in joined.items():
            if len(pairs) > 1:
                problems.append(f"dataset {pairs[0][0]!r} with method {pairs[0][1]!r} and dataset {pairs[1][0]!r} "
                                f"with method {pairs[1][1]!r} would file their cells and sets under one name "
                                f"({name}-ipc...); give one of the methods a label that tells them apart")
        if self.robust_scores and "fkd" in self.label_modes:
            problems.append("robust_scores retrains students with and without augmentation, but label mode "
                            "fkd replays the views stored with its labels; use robust_scores with hard, teacher or "
                            "stored labels")
        for name in ("lrs_lambda", "ars_gamma"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.robust_scores:  # ARS's settings key every cell: one that nothing reads would only redo them
            defaults = {f.name: field_default(f) for f in dataclasses.fields(self)}
            problems += [f"{name} {getattr(self, name)!r} applies only with robust_scores, but robust_scores is "
                         "false; remove it or set robust_scores: true" for name in ("ars_augment", "ars_gamma")
                         if getattr(self, name) != defaults[name]]
        if problems:
            raise ConfigError("; ".join(problems))
        self.ipc_overrides = {int(k): v for k, v in self.ipc_overrides.items()}
        # protocol_for sets both per cell
        set_by = {k: f"each cell's {k.replace('_', ' ')} comes from {listed}" for k, listed in CELL_KEYS.items()}
        unused = unused_overrides(self.overrides, set_by)
        for ipc, over in self.ipc_overrides.items():
            unused += unused_overrides(over, set_by, f"ipc_overrides.{ipc}",
                                       {"student": " (student_ipcs limits a student to some IPCs)"})
        unused += self._replaced_overrides()
        if unused:
            raise ConfigError("; ".join(unused))
        self.teacher_pool = {k: v if isinstance(v, TeacherConfig) else from_dict(TeacherConfig, v, f"teacher_pool.{k}")
                             for k, v in self.teacher_pool.items()}
        extra = sorted(set(self.ipc_overrides) - set(self.ipcs))
        unknown = sorted(set(self.student_options) - set(self.students))
        if extra or unknown:
            raise ConfigError("; ".join(
                ([f"ipc_overrides names IPC {extra} that is not in ipcs {self.ipcs}; remove it or add the IPC"]
                 if extra else [])
                + ([f"student_options names {unknown}, not in students {self.students}"] if unknown else [])))
        stray = {m.key: sorted(set(m.ipc_options) - set(self.ipcs)) for m in self.methods
                 if set(m.ipc_options) - set(self.ipcs)}
        if stray:
            raise ConfigError(f"ipc_options of {stray} name IPCs not in ipcs {self.ipcs}; remove them or add the IPC")
        unlabelled, clashes = [], {}
        for m in self.methods:  # fail early on an unknown or badly typed method option
            for ipc in self.ipcs:
                cls = METHODS.get(m.name)
                mcfg = from_dict(cls.Config, merge_overrides(m.options, m.ipc_options.get(ipc, {})),
                                 f"methods[{m.key}].options")
                own = cls.own_soft_labels(mcfg)
                if not m.soft_labels and not cls.stores_soft_labels(mcfg) and m.key not in unlabelled:
                    unlabelled.append(m.key)
                if m.soft_labels and own is not None:
                    clashes.setdefault(m.key, (own, cls.own_soft_labels_off(own)))
        if clashes:  # the pipeline would refuse them only when the bench reaches their cell
            keys = sorted(clashes)
            offs = [f"methods[{k}].options.{clashes[k][1]}" for k in keys if clashes[k][1] is not None]
            raise ConfigError(
                f"methods {keys} label their images themselves ("
                + "; ".join(f"{k}: options.{clashes[k][0]}" if clashes[k][1] is not None else f"{k}: {clashes[k][0]}"
                            for k in keys)
                + "), and their soft_labels: true would overwrite that with the teacher's logits; drop soft_labels: "
                f"true on them{', or set ' + ' / '.join(offs) if offs else ''}")
        # a method that labels its images itself (DATM) needs no teacher's
        if "stored" in self.label_modes and unlabelled:
            raise ConfigError(f"label mode 'stored' needs soft labels in every set; {unlabelled} store none: set "
                              "soft_labels: true on them (the teacher's logits) or drop label mode 'stored' (a method "
                              "that makes its own declares them in its class: classmethod own_soft_labels)")
        for what, table, known in (("student_ipcs", self.student_ipcs, self.students),
                                   ("method_ipcs", self.method_ipcs, [m.key for m in self.methods])):
            for name, ipcs in table.items():
                if name not in known:
                    raise ConfigError(f"{what} names {name!r}, which is not one of {known}")
                if not ipcs or set(ipcs) - set(self.ipcs):
                    raise ConfigError(f"{what}[{name}] = {ipcs} must be a non-empty subset of ipcs {self.ipcs}")
                if len(set(ipcs)) != len(ipcs):
                    raise ConfigError(f"{what}[{name}] = {ipcs} repeats an entry (the same cells twice); "
                                      "list each once")
        bad_names = [n for n in self.teacher_pool if not re.fullmatch(r"[A-Za-z0-9_.+-]+", n)]
        if bad_names:
            raise ConfigError(f"teacher_pool names {bad_names} may only use letters, digits and _ . + -")
        for m in self.methods:
            for ipc in self.ipcs:
                refs = merge_overrides(m.options, m.ipc_options.get(ipc, {})).get("extra_teachers", [])
                missing = [r for r in refs
                           if isinstance(r, str) and r.startswith("@") and r[1:] not in self.teacher_pool]
                if missing:
                    raise ConfigError(f"method {m.key!r} refers to {missing}, not in teacher_pool "
                                      f"{sorted(self.teacher_pool)}; add it there")
        # fail early on a bad protocol or student: every label mode's, and the hard-label one that every
        # cell's HLR trains too
        protocols: dict[int, list[ProtocolConfig]] = {ipc: [] for ipc in self.ipcs}
        for student in self.students:
            for ipc in self.ipcs:
                for mode in dict.fromkeys([*self.label_modes, "hard"]):
                    try:
                        protocols[ipc].append(self.protocol_for(student, mode, ipc=ipc))
                    except ConfigError as e:
                        raise ConfigError(f"protocol {self.protocol!r} for student {student!r}, IPC {ipc}, label mode "
                                          f"{mode!r}: {e}") from None
        # an override that no cell's protocol reads (hard labels read no temperature, soft ones may)
        settings = protocol_settings(self.protocol)
        refuse_inert_overrides(settings, self.overrides, [p for ps in protocols.values() for p in ps], "overrides")
        for ipc, over in self.ipc_overrides.items():
            refuse_inert_overrides(merge_overrides(settings, self.overrides), over, protocols[ipc],
                                   f"ipc_overrides.{ipc}")
        # the augmentations of relabel (fkd cells) and of ARS's "with augmentation" run, built only when the
        # bench reaches a cell, after teachers and sets are made
        self.relabel.check_augment("relabel")
        try:
            build_augment(self.ars_augment)
        except DDKitError as e:
            raise keyed("ars_augment", e) from None

    def _replaced_overrides(self) -> list[str]:
        """One problem for each protocol field in ``overrides`` or an ``ipc_overrides`` entry that a bench replaces
        with its own (which the config and report would state, though no student trained with it): the FKD store,
        made per distilled set from ``relabel``, and ``student_options`` for a student listed in
        ``student_options``, whose options come from there alone."""
        problems = []
        for where, over, ipc in [("overrides", self.overrides, None),
                                 *((f"ipc_overrides.{i}", o, i) for i, o in self.ipc_overrides.items())]:
            if "fkd_store" in over:
                problems.append(f"{where}.fkd_store is not used: a bench makes one FKD store per distilled set from "
                                "its relabel section; remove it (to replay a given store, evaluate its set with "
                                "`ddkit evaluate SET --teacher T --label-mode fkd --set fkd_store=DIR`)")
            listed = [s for s in self.students if s in self.student_options
                      and (ipc is None or ipc in self.student_ipcs_of(s))]
            if over.get("student_options") and listed:
                # the students that do read it keep it only by being listed too: one place for every student's options
                users = [s for s in self.students
                         if s not in listed and (ipc is None or ipc in self.student_ipcs_of(s))]
                problems.append(f"{where}.student_options is not used by {listed}, whose options come from "
                                f"student_options alone{' (the same at every IPC)' if ipc is not None else ''}; give "
                                "them there: student_options: {" + ", ".join(f"{s}: {{...}}" for s in listed + users)
                                + "}" + (f" ({', '.join(users)} read it now: list them there too)" if users else ""))
        return problems

    def method_ipcs_of(self, key: str) -> list[int]:
        """The IPCs method ``key`` (its label) runs at, in the order of ``ipcs``."""
        return [i for i in self.ipcs if i in self.method_ipcs.get(key, self.ipcs)]

    def student_ipcs_of(self, student: str) -> list[int]:
        """The IPCs ``student`` is trained at, in the order of ``ipcs``."""
        return [i for i in self.ipcs if i in self.student_ipcs.get(student, self.ipcs)]

    def protocol_for(self, student: str, label_mode: str, augment: str | None = None, ipc: int | None = None,
                     fkd_store: str | None = None) -> ProtocolConfig:
        at_ipc = self.ipc_overrides.get(ipc, {})

        def over(entry: dict) -> dict[str, Any]:  # the cell's changes to the preset, with ``entry`` at its IPC
            out: dict[str, Any] = merge_overrides(self.overrides, entry)
            out.update({"student": student, "label_mode": label_mode})
            if student in self.student_options:
                out["student_options"] = dict(self.student_options[student])
            if label_mode == "fkd":  # the store is made per distilled set by the bench; named here for validation
                out["fkd_store"] = fkd_store or FKD_PLACEHOLDER  # (overrides may not name one: __post_init__)
            return out

        try:  # overrides no cell reads are refused by __post_init__, over every cell's protocol
            protocol = resolve_protocol(self.protocol, over(at_ipc), "overrides", check_inert=False)
        except ConfigError:
            if not at_ipc:
                raise
            # name the key the bad value was given under: overrides alone fail (theirs), or the IPC's entry does
            resolve_protocol(resolve_protocol(self.protocol, over({}), "overrides", check_inert=False), at_ipc,
                             f"ipc_overrides.{ipc}", check_inert=False)
            raise
        if (augment is None
                or (augment == protocol.train.augment and not (augment == "none" and protocol.train.cutmix_prob))):
            return protocol
        # ARS's other run: another augmentation's options do not apply, and "without" means without CutMix too
        train = dataclasses.replace(protocol.train, augment=augment, augment_options={},
                                    cutmix_prob=0.0 if augment == "none" else protocol.train.cutmix_prob)
        return dataclasses.replace(protocol, train=train)

    def record(self) -> dict:
        """The config as the bench records it (``config.json``, ``bench.json``): every relative path in it (a
        dataset's ``path``, teachers' ``checkpoint``, a protocol YAML file, ``extra_teachers`` in overrides, a
        method's ``extra_teachers`` and ``experts``) absolute against the working folder the bench read it from, and
        the protocol file's own relative ``extra_teachers`` in ``overrides``
        (:func:`~ddkit.evaluate.protocol.recorded_overrides`), as :func:`ddkit.pipeline.recorded_config` records a
        run's; ``"@name"`` references stay."""
        out = to_dict(self)
        out["datasets"] = [to_dict(d.absolute()) for d in self.datasets]
        out["protocol"] = recorded_protocol(self.protocol)
        out["overrides"] = recorded_overrides(self.protocol, out["overrides"])
        out["ipc_overrides"] = {ipc: recorded_paths(o, PATH_FIELDS) for ipc, o in out["ipc_overrides"].items()}
        for m in out["methods"]:
            m["options"] = recorded_paths(m["options"], OPTION_PATHS)
            m["ipc_options"] = {ipc: recorded_paths(o, OPTION_PATHS) for ipc, o in m["ipc_options"].items()}
        for t in [out["teacher"], *out["teacher_pool"].values()]:
            t.update(recorded_paths(t, ("checkpoint",)))
        return out

    def needs_teacher(self) -> bool:
        return bool(self.teacher_pool) or any(m != "hard" for m in self.label_modes) or any(
            s.soft_labels or getattr(METHODS.get(s.name), "needs_teacher", False) for s in self.methods)


@dataclass(frozen=True)
class Cell:
    index: int
    dataset: str
    method: str
    ipc: int
    student: str
    label_mode: str

    @property
    def id(self) -> str:
        return f"{self.dataset}-{self.method}-ipc{self.ipc}-{self.student}-{self.label_mode}"


def load_bench_config(path: str | Path, overrides: list[str] | None = None, **fields: Any) -> BenchConfig:
    """A :class:`BenchConfig` from YAML (``base: other.yaml`` resolved), or from the ``config.json`` a bench
    folder records (its ``config``), then top-level ``fields`` (the CLI's flags), then ``a.b=c`` overrides."""
    from ddkit.config import apply_overrides, load_yaml_with_base, record_kind

    data = load_yaml_with_base(path)
    if record_kind(data) == "bench-config" and isinstance(data.get("config"), dict):
        data = data["config"]  # a bench folder's own record: runs again as it was (its paths are absolute)
    return from_dict(BenchConfig, apply_overrides({**data, **fields}, list(overrides or [])))


def cells_of(cfg: BenchConfig) -> list[Cell]:
    """The matrix in a fixed order (dataset, method, IPC, student, label mode)."""
    out = []
    for d in cfg.datasets:
        for m in cfg.methods:
            for ipc in cfg.method_ipcs_of(m.key):
                for s in cfg.students:
                    if ipc not in cfg.student_ipcs_of(s):
                        continue
                    for mode in cfg.label_modes:
                        out.append(Cell(len(out), d.name, m.key, ipc, s, mode))
    return out


# --- helpers ------------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a stage: CUDA allocator peak on GPU, sampled RSS high-water minus start on CPU."""

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device = device
        self.interval = interval
        self.peak: int | None = None
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "rss_sampled_delta"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = _rss_bytes()
        self._high = self._base or 0
        if self._base is None:
            self.kind = "unavailable"
            return self

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self._high = max(self._high, _rss_bytes() or 0)

        self._thread = threading.Thread(target=sample, daemon=True, name="ddkit-peak-rss")
        self._thread.start()
        return self

    def read(self) -> int | None:
        """The peak so far (the stage may still be running); None where RSS cannot be read."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - self._base)
        if self._base is None:
            return None
        return int(max(self._high, _rss_bytes() or 0) - self._base)

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak = self.read()


class SavedTensorBytes:
    """Peak bytes of the storages autograd holds for backward while the context is active.

    Every tensor packed through ``torch.autograd.graph.saved_tensors_hooks`` is counted by its
    storage: a storage saved by several graph nodes (or as several views) counts once, and stops
    counting when the last node holding it is freed. ``peak`` is the high-water mark of graph
    memory: exact and device-independent, unlike RSS (allocator caching) -- the quantity that grows
    with the number of unrolled steps in trajectory matching. ``live`` is 0 again once every graph
    built inside the context has been released.
    """

    def __init__(self) -> None:
        self.live = self.peak = 0
        self._refs: dict[tuple[str, int], list[int]] = {}  # storage -> [nbytes, holders]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, t: torch.Tensor) -> _Saved:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        ref = self._refs.get(key)
        if ref is None:
            ref = self._refs[key] = [storage.nbytes(), 0]
            self.live += ref[0]
            self.peak = max(self.peak, self.live)
        ref[1] += 1
        # detached: a saved output would otherwise hold its own grad_fn (a reference cycle that
        # only the garbage collector frees); autograd re-attaches the graph when unpacking
        held = _Saved(t.detach())
        weakref.finalize(held, self._free, key)
        return held

    def _free(self, key: tuple[str, int]) -> None:
        ref = self._refs[key]
        ref[1] -= 1
        if ref[1] == 0:
            self.live -= ref[0]
            del self._refs[key]

    @staticmethod
    def _unpack(held: _Saved) -> torch.Tensor:
        return held.tensor


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _teacher_stage(data: DataBundle, cfg: TeacherConfig, tdir: Path, device,
                   progress: StageProgress | None = None) -> Teacher:
    if (teacher := saved_teacher(data, cfg, tdir, device)) is not None:
        return teacher
    cb = (lambda e, n, r: progress(e, n, {**r, "stage": f"teacher {tdir.name}"})) if progress is not None else None
    return train_teacher(data, cfg, tdir, device, progress=cb)


def shared_seconds(shared: list[dict]) -> float | None:
    """What building the shared artifacts of :func:`ddkit.artifacts.shared_costs` took, each artifact
    counted once however often it was used; None when one of them did not record it."""
    builds = {c["key"]: c["build_seconds"] for c in shared}
    return None if None in builds.values() else round(sum(builds.values()), 3)


# facts of a set's synthesis its record and cells carry from the set's meta (trajectory methods)
SET_FACTS = ("expert_test_accuracy",)


def _distill_stage(data, dcfg: DatasetConfig, dist_cfg: DistillConfig, ddir: Path, teacher, device,
                   progress: StageProgress | None = None, options_key: str = "distill.options") -> dict:
    """Make (or reuse) one distilled set; return its synthesis record (``<set>.synthesis.json``);
    ``options_key``: the config key of the method's options, which errors in them name.

    The record is written just before the set is saved, so a kill between the two costs no new
    synthesis; a record already there for these settings is of a synthesis that finished before its
    set was saved, and keeps its timing when the set is made again (from the checkpoints left)."""
    stats_path = ddir.parent / f"{ddir.name}.synthesis.json"
    want = distill_hash(dist_cfg, data, teacher)
    made = read_json(stats_path) if stats_path.is_file() else {}
    # the set's own key: want, or the older one it is still reused by (reusable_set)
    if made and isinstance(found := reusable_set(ddir, dist_cfg, data, teacher, want), DistilledSet) and (
            made.get("config_hash") == found.manifest["config_hash"]):
        discard_work(ddir, made["config_hash"])
        return made
    made = made if made.get("config_hash") == want else {}
    # a synthesis that resumes from the checkpoints of an interrupted one (the method's work folder beside
    # the set) is timed from the resume only: the record says so
    work = work_dir(ddir, want)
    resumed = work.is_dir() and any(work.iterdir())
    t0 = time.perf_counter()
    with PeakMemory(torch.device(device)) as mem, shared_costs() as shared:

        def record(ds: DistilledSet) -> None:
            if made:
                return
            wall = time.perf_counter() - t0
            write_json(stats_path, {
                "schema_version": 1, "kind": "synthesis-stats", "config_hash": want, "seed": dist_cfg.seed,
                # wall_seconds: the whole call; seconds: without building shared cached artifacts (teacher
                # statistics, expert buffers) or waiting for another process to build them, whose cost is
                # shared_seconds whether built here or reused
                "wall_seconds": round(wall, 4),
                "seconds": round(wall - sum(c["seconds_here"] + c["waited_seconds"] for c in shared), 4),
                "shared_seconds": shared_seconds(shared), "shared": shared, "resumed": resumed,
                "peak_memory_bytes": mem.read(), "peak_memory_kind": mem.kind, "device": str(device),
                "versions": versions(), "bytes": {"images": ds.image_bytes, "labels": ds.label_bytes},
                **{key: ds.manifest["meta"][key] for key in SET_FACTS if key in ds.manifest.get("meta", {})}})

        cb = ((lambda d, n, r: progress(d, n, {**r, "stage": progress_view(f"distill {ddir.name}", r)[0]}))
              if progress is not None else None)
        distill(data, dist_cfg, dcfg, ddir, teacher, device, progress=cb, before_save=record, options_key=options_key)
    return read_json(stats_path)


# --- the runner ---------------------------------------------------------------------------------


def check_bench_dir(root: Path) -> None:
    """Refuse an existing ``root`` that is not a bench folder: the bench writes ``config.json``,
    ``bench.json``, ``cells/``, ``evals/``, ``distilled/``, ``labels/`` and ``teachers/`` there and must never overwrite
    a user's files. A bench folder is marked by the ``config.json`` of kind ``bench-config`` written first. A folder
    this process cannot write (or make) is refused (a :class:`~ddkit.artifacts.WriteFailure`), before any stage, and so
    is the current folder (``.``)."""
    refuse_current_folder(root, "a bench folder holds only what the bench writes")
    if holds_files(root, ignore_hidden=True) and folder_kind(root) != "bench-config":
        raise DDKitError(f"output {str(root)!r} exists and is not a ddkit bench folder (no config.json of kind "
                         "bench-config); choose another out / --out or remove it")
    check_writable(root, inside=True)


def check_students(cfg: BenchConfig, data: DataBundle) -> None:
    """Build every student of ``cfg`` once for ``data``'s channels, classes and image size (with the
    options of each of its protocols), as ``check_run`` does for a run: a bad name or option fails
    before any teacher trains or set is made, not when the bench reaches the student's first cell."""
    built = set()
    for student in cfg.students:
        for ipc in cfg.student_ipcs_of(student):
            for mode in dict.fromkeys([*cfg.label_modes, "hard"]):  # the hard one behind HLR trains too
                protocol = cfg.protocol_for(student, mode, ipc=ipc)
                key = config_hash({"student": protocol.student, "options": protocol.student_options})
                if key in built:
                    continue
                built.add(key)
                try:
                    check_student(protocol, data, keys=None)  # the message names the student
                except DDKitError as e:
                    raise ConfigError(f"student {student!r} on dataset {data.name!r}: {e}") from None


def check_teachers(cfg: BenchConfig, data: DataBundle) -> None:
    """:func:`~ddkit.teacher.check_teacher` for ``cfg``'s teacher and every teacher of its pool on
    ``data``: a bad model, option or checkpoint fails before any output is written, not at the teacher
    stage. Nothing when no teacher is trained."""
    if not cfg.needs_teacher():
        return
    for key, tcfg in [("teacher", cfg.teacher), *((f"teacher_pool.{n}", t) for n, t in cfg.teacher_pool.items())]:
        check_teacher(tcfg, data, key)


def check_relabel(cfg: BenchConfig, data: DataBundle) -> None:
    """What ``relabel`` and FKD training refuse only when the bench reaches the first ``fkd`` cell (after
    teachers and sets are made): a ``relabel.top_k`` outside ``data``'s classes, or top-k labels with a
    protocol loss other than kl. Nothing without label mode fkd (relabel is unused then)."""
    if "fkd" not in cfg.label_modes:
        return
    losses = {f"the fkd protocol of student {student!r} at IPC {ipc}": cfg.protocol_for(student, "fkd", ipc=ipc).loss
              for student in cfg.students for ipc in cfg.student_ipcs_of(student)}
    cfg.relabel.check(data.num_classes, data.name, losses, "use a protocol whose soft-label loss is kl")


def check_extra_teachers(cfg: BenchConfig, data: DataBundle) -> None:
    """Read the manifest of every teacher artifact that a method option or a protocol of a label mode that labels
    with them names by path (``extra_teachers``; ``@name`` ones are the bench's pool, trained on ``data``): one that
    is missing, not a teacher or made for other data than ``data`` (classes, image shape) fails before any output is
    written, not at its synthesis or first cell."""
    for m in cfg.methods:
        for ipc in cfg.method_ipcs_of(m.key):
            refs = merge_overrides(m.options, m.ipc_options.get(ipc, {})).get("extra_teachers", [])
            check_teacher_folders([r for r in refs if isinstance(r, str) and not r.startswith("@")], data,
                                  f"methods[{m.key}].options.extra_teachers")
    for student in cfg.students:
        for ipc in cfg.student_ipcs_of(student):
            for mode in cfg.label_modes:
                if mode in UNLABELLED_BY_ENSEMBLE:  # hard and stored labels ask no extra teacher
                    continue
                check_teacher_folders(cfg.protocol_for(student, mode, ipc=ipc).extra_teachers, data,
                                      f"extra_teachers of protocol {cfg.protocol!r} for student {student!r}, IPC "
                                      f"{ipc}, label mode {mode!r}")


class _Bench:
    def __init__(self, cfg: BenchConfig, stage_progress: StageProgress | None = None) -> None:
        from ddkit.distributed import resolve_device

        self.cfg = cfg
        self.stage_progress = stage_progress
        self.root = Path(cfg.out)
        check_bench_dir(self.root)
        versions()  # every record holds them; reading them imports torchvision (seconds), not in a set's timing
        self.device = resolve_device(cfg.device)
        self.data: dict[str, DataBundle] = {d.name: load_dataset(d) for d in cfg.datasets}
        self.dcfg = {d.name: d for d in cfg.datasets}
        self.methods = {m.key: m for m in cfg.methods}
        for data in self.data.values():  # before any teacher trains or set is made
            for key, spec in self.methods.items():
                # a method without an ipc (full) makes its one set at the default IPC alone (BenchConfig)
                for ipc in cfg.method_ipcs_of(key) if METHODS.get(spec.name).uses_ipc else ():
                    method, where = METHODS.get(spec.name), f"methods[{key}].options"
                    if method.ipc_within_class_size:
                        check_ipc(data, ipc)
                    # a method that makes more than a class holds runs (as in `ddkit run`); a random baseline
                    # beside its set cannot (every cell's hard evaluation has one too, for HLR)
                    elif any(cfg.protocol_for(st, mode, ipc=ipc).random_baseline for st in cfg.students
                             if ipc in cfg.student_ipcs_of(st) for mode in {"hard", *cfg.label_modes}):
                        # the setting that turns it on: an ipc_overrides entry, applied after overrides, wins
                        at_ipc = "random_baseline" in cfg.ipc_overrides.get(ipc, {})
                        check_random_ipc(data, ipc, f"ipc_overrides: {{{ipc}: {{random_baseline: false}}}}" if at_ipc
                                         else "overrides.random_baseline: false")
                    options = merge_overrides(spec.options, spec.ipc_options.get(ipc, {}))
                    check_method_data(method, from_dict(method.Config, options, where), data, ipc, where)
            check_students(cfg, data)
            check_teachers(cfg, data)
            check_relabel(cfg, data)
            check_extra_teachers(cfg, data)
        for spec in cfg.methods:  # learned_lr protocols need a set that learned its lr
            check_learned_lr(spec.name, [cfg.protocol_for(st, mode, ipc=ipc) for st in cfg.students
                                         for ipc in cfg.student_ipcs_of(st) for mode in cfg.label_modes],
                             f"method {spec.key!r}")
        self.teachers: dict[str, Teacher | None] = {}
        self.distilled: dict[tuple[str, str, int], DistilledSet] = {}
        self.synthesis: dict[tuple[str, str, int], dict] = {}
        self.world = ddist.current().world_size  # ranks running cells at once (each cell runs whole on its rank)

    def _spread(self, jobs: list, fn: Callable) -> None:
        info = ddist.current()
        for i, job in enumerate(jobs):
            if i % info.world_size == info.rank:
                with ddist.single_process():
                    fn(job)
        ddist.barrier()

    def prepare(self) -> None:
        cfg = self.cfg
        names = list(self.data)
        if cfg.needs_teacher():
            self._spread(names,
                         lambda n: _teacher_stage(self.data[n], cfg.teacher, self.root / "teachers" / n, self.device,
                                                  self.stage_progress))
            pool = [(n, name) for n in names for name in cfg.teacher_pool]
            self._spread(pool, lambda job: _teacher_stage(self.data[job[0]], cfg.teacher_pool[job[1]],
                                                          self._pool_dir(*job), self.device, self.stage_progress))
            for n in names:
                self.teachers[n] = Teacher.load(self.root / "teachers" / n, self.device)
                self.teachers[n].check_compatible(self.data[n])
        else:
            self.teachers = dict.fromkeys(names)
        sets = [(d, m, ipc) for d in names for m in self.methods for ipc in cfg.method_ipcs_of(m)]
        self._spread(sets, self._make_set)
        for key in sets:
            ddir = self._set_dir(key)
            self.distilled[key] = DistilledSet.load(ddir)
            self.synthesis[key] = read_json(ddir.parent / f"{ddir.name}.synthesis.json")

    def _pool_dir(self, dataset: str, name: str) -> Path:
        return self.root / "teachers" / f"{dataset}@{name}"

    def _set_dir(self, key: tuple[str, str, int]) -> Path:
        d, m, ipc = key
        return self.root / "distilled" / f"{d}-{m}-ipc{ipc}"

    def _dist_cfg(self, m: str, ipc: int, dataset: str) -> DistillConfig:
        spec = self.methods[m]
        options = merge_overrides(spec.options, spec.ipc_options.get(ipc, {}))
        if "extra_teachers" in options:  # '@name' -> this dataset's teacher of that name in the pool
            options["extra_teachers"] = [str(self._pool_dir(dataset, r[1:]))
                                         if isinstance(r, str) and r.startswith("@") else r
                                         for r in options["extra_teachers"]]
        return DistillConfig(method=spec.name, ipc=ipc, seed=self.cfg.distill_seed, options=options,
                             soft_labels=spec.soft_labels, image_dtype=spec.image_dtype)

    def _make_set(self, key: tuple[str, str, int]) -> None:
        d, m, ipc = key
        _distill_stage(self.data[d], self.dcfg[d], self._dist_cfg(m, ipc, d), self._set_dir(key),
                       self.teachers[d], self.device, self.stage_progress, f"methods[{m}].options")

    # evaluations are cached by everything that decides them
    def _evaluate(self, cell: Cell, protocol: ProtocolConfig) -> dict:
        key3 = (cell.dataset, cell.method, cell.ipc)
        teacher = self.teachers[cell.dataset]
        ds = self.distilled[key3]
        tfp = teacher.fingerprint if teacher is not None and protocol.label_mode != "hard" else None
        key = config_hash({"protocol": protocol.hash, "seeds": self.cfg.seeds,
                           "distilled": ds.manifest.get("config_hash"), "teacher": tfp, **protocol_inputs(protocol),
                           **ddcache.revised(ddcache.STUDENT_REVISION)})  # as its students (STUDENT_REVISION 2 on)
        path = self.root / "evals" / f"{key}.json"
        if (rep := self._cached_eval(path, self.device)) is not None:
            return rep
        # torchrun ranks may need one evaluation at once (the hard one behind HLR, for cells of other label
        # modes): one makes it, the other waits and reuses it
        with build_lock(path) if self.world > 1 else contextlib.nullcontext():
            # another rank made it while this one waited
            if (rep := self._cached_eval(path, self.device, say=False)) is not None:
                return rep
            sp = self.stage_progress
            cb = (lambda e, n, r: sp(e, n, {**r, "stage": f"{cell.id}: {r['stage']}"})) if sp is not None else None
            store = self._replayable_store(key3, protocol) if protocol.label_mode == "fkd" else None
            rep = evaluate(ds, protocol, self.cfg.seeds, data=self.data[cell.dataset],
                           teacher=teacher if protocol.label_mode != "hard" else None, device=self.device, progress=cb,
                           fkd_store=store)
            rep["eval_key"] = key
            write_json(path, rep)
        return rep

    @staticmethod
    def _cached_eval(path: Path, device: str | torch.device = "cpu", say: bool = True) -> dict | None:
        """The evaluation cached at ``path``, unless it is missing or was made with another thread count
        (float sums depend on it: a student trained with another one is another number) or, evaluating on
        ``device``, under other CUDA settings, GPU or libraries, or on another device type (its students are not
        those that ``device`` trains: :func:`~ddkit.determinism.numerics_change`); ``say``: log that it is
        recomputed (once per cell: not again after waiting for the lock)."""
        # a damaged one (also one whose mean is not its seeds') is made again
        rep = reusable_stage(lambda: check_report(read_json(path), path), path, "evaluating")
        if not rep:
            return None
        if why := evaluation_change(rep.get("run"), device):
            if say:
                log.info("recomputing %s: %s", path.name, why)
            return None
        return rep

    def _fkd_store(self, key3: tuple[str, str, int], protocol: ProtocolConfig) -> Path:
        """The set's FKD store for ``cfg.relabel`` and ``protocol`` (made once; atomic; resumable per epoch), by
        the teacher the evaluation labels with (with ``extra_teachers``, their ensemble: another store)."""
        spec = self.cfg.relabel
        teacher = labelling_teacher(protocol, self.teachers[key3[0]], self.device)
        protocol_epochs = protocol.train.epochs
        ds = self.distilled[key3]
        key = spec.key(ds, teacher, protocol_epochs)[:16]
        path = self.root / "labels" / f"{self._set_dir(key3).name}-{key}"
        work = self.root / "labels" / f".{path.name}.partial"  # finished epochs, until the store is saved
        if (path / "manifest.json").is_file():
            if ddist.current().is_main:  # a kill between the save and the removal below leaves them
                shutil.rmtree(work, ignore_errors=True)
            return path
        # torchrun ranks may reach the same set's store at once (cells of other students): one builds it
        with build_lock(path):
            if (path / "manifest.json").is_file():  # another rank built it while this one waited
                return path
            sp = self.stage_progress
            cb = (lambda d, n, r: sp(d, n, {**r, "stage": f"relabel {path.name}"})) if sp is not None else None
            spec.make(ds, teacher, protocol_epochs, self.device, cb, work_dir=work, out=path)
            shutil.rmtree(work, ignore_errors=True)
        return path

    def _replayable_store(self, key3: tuple[str, str, int], protocol: ProtocolConfig) -> SoftLabelStore:
        """The set's FKD store at ``protocol.fkd_store``, loaded for an evaluation (which then does not read it
        again). A damaged one (a truncated file) is labelled again, as ``ddkit run`` does, instead of failing
        every fkd cell of the set."""
        path = Path(protocol.fkd_store)
        try:
            return SoftLabelStore.load(path)
        except DDKitError as e:
            log.warning("%s; labelling the set again", str(e).split(";")[0])
        with build_lock(path):  # another rank may be labelling it again already: it then finds the new store
            try:
                return SoftLabelStore.load(path)
            except DDKitError:
                shutil.rmtree(path, ignore_errors=True)
        self._fkd_store(key3, protocol)
        return SoftLabelStore.load(path)

    def cell_key(self, cell: Cell) -> str:
        cfg = self.cfg
        key3 = (cell.dataset, cell.method, cell.ipc)
        teacher = self.teachers[cell.dataset]
        protocol = cfg.protocol_for(cell.student, cell.label_mode, ipc=cell.ipc)
        return config_hash({
            "schema": CELL_SCHEMA, "cell": cell.id, "protocol": protocol.hash,
            "seeds": cfg.seeds, "distilled": self.distilled[key3].manifest.get("config_hash"),
            "teacher": teacher.fingerprint if teacher is not None else None, "robust": cfg.robust_scores,
            "ars_augment": cfg.ars_augment, "lambda": cfg.lrs_lambda, "gamma": cfg.ars_gamma,
            **({"relabel": cfg.relabel.identity()} if cell.label_mode == "fkd" else {}), **ensemble_identity(protocol),
            **ddcache.revised(ddcache.STUDENT_REVISION),  # its numbers are its students' (STUDENT_REVISION 2 on)
        })

    def method_revision(self, key: str) -> int:
        """The ``revision`` of the method (by its name in tables) that made the bench's sets of ``key``: a set's
        identity, and so every cell key, holds it (:func:`~ddkit.pipeline.distill_hash`), so a set or cell the bench
        reuses was made by this revision (0: the method was never revised)."""
        return METHODS.get(self.methods[key].name).revision

    def cell_path(self, cell: Cell) -> Path:
        return self.root / "cells" / f"{cell.id}.json"

    def finished(self, cell: Cell) -> dict | None:
        path = self.cell_path(cell)
        if not path.is_file():
            return None
        try:
            rec = read_json(path, "cell")
        except DDKitError:
            return None
        if rec.get("key") != self.cell_key(cell):
            return None
        if problem := cell_problem(rec):  # an edited number is not republished: the cell is made again
            log.warning("bench cell %s holds %s; the cell is damaged: computing it again", path, problem)
            return None
        # a cell made with another thread count is recomputed (its evaluations too, in _evaluate); cells
        # made before 2026-12-05 recorded the thread count of their run, not of the cached evaluations
        # they were built from, so those are asked too
        if evaluation_change(rec, self.device):  # another thread count, other CUDA settings or another device
            return None
        evals = [self.root / "evals" / f"{k}.json" for k in rec.get("eval_keys", [])]
        return rec if all(self._cached_eval(p, self.device) is not None for p in evals if p.is_file()) else None

    def written(self, cell: Cell) -> dict:
        """The finished cell's file, read back for the table: it must hold this bench's cell (its key), not one that
        another process wrote there meanwhile (with another teacher or settings, its numbers are not this bench's)."""
        path = self.cell_path(cell)
        rec = read_json(path, "cell")
        if rec.get("key") != self.cell_key(cell):
            raise DDKitError(f"bench cell {str(path)!r} was written with other settings than this bench's (its key "
                             f"differs) by another process while this bench ran; run one bench at a time in "
                             f"{str(self.root)!r}, and this one again")
        return rec

    def compute(self, cell: Cell) -> dict:
        cfg = self.cfg
        key3 = (cell.dataset, cell.method, cell.ipc)
        protocol = cfg.protocol_for(cell.student, cell.label_mode, ipc=cell.ipc)
        if cell.label_mode == "fkd":
            store = self._fkd_store(key3, protocol)
            protocol = cfg.protocol_for(cell.student, cell.label_mode, ipc=cell.ipc, fkd_store=str(store))
        rep = self._evaluate(cell, protocol)
        hard = (rep if cell.label_mode == "hard"
                else self._evaluate(cell, cfg.protocol_for(cell.student, "hard", ipc=cell.ipc)))
        res = rep["results"]
        acc = res["distilled"]
        rnd = res.get("random")
        full = hard["results"].get("full")
        hard_acc = hard["results"]["distilled"]
        seeds = cfg.seeds
        row: dict[str, Any] = {
            "schema_version": CELL_SCHEMA, "kind": "bench-cell", "key": self.cell_key(cell), "cell": cell.id,
            "index": cell.index, "dataset": cell.dataset, "method": cell.method,
            "method_name": self.methods[cell.method].name, "ipc": cell.ipc, "student": cell.student,
            "label_mode": cell.label_mode, "method_revision": self.method_revision(cell.method),
            "seeds": list(seeds), "acc": acc, "random": rnd,
            "full_hard": full, "hard_acc": hard_acc,
            "ior": None, "hlr": None, "lrs": None, "ars": None,
            "bytes": rep["bytes"], "synthesis": {
                **{k: self.synthesis[key3].get(k) for k in ("wall_seconds", "seconds", "shared_seconds",
                                                            "peak_memory_bytes", "peak_memory_kind", "device",
                                                            "resumed")},
                **{k: self.synthesis[key3][k] for k in SET_FACTS if k in self.synthesis[key3]}},
            "protocol_hash": rep["protocol_hash"], "hard_protocol_hash": hard["protocol_hash"],
            "eval_keys": [rep["eval_key"], hard["eval_key"]],
            "distilled_path": str(self._set_dir(key3)), "versions": rep["versions"],
            # what else decides the numbers: the teacher's weights (retrained per bench folder) and the
            # thread count (float summation order: one thread and two give different students)
            "teacher_sha": self.teachers[cell.dataset].fingerprint if self.teachers[cell.dataset] is not None else None,
            # (of its evaluations: cells and cached evaluations made with another one are recomputed)
            "torch_threads": rep.get("run", {}).get("torch_threads", torch.get_num_threads()),
            # on CUDA also the settings, GPU and libraries they were made under (not recorded on the CPU)
            **{k: v for k, v in rep.get("run", {}).items() if k == "cuda"},
            # the revision of ddkit's student training its key names (from 2 on), for `ddkit show`, which loads no
            # teacher or set to compute that key
            **ddcache.revised(ddcache.STUDENT_REVISION),
        }
        if "learned_lr" in rep:  # protocol learned_lr: the student lr the set learned, which its students trained with
            row["learned_lr"] = rep["learned_lr"]
        if rnd is not None:
            row["ior"] = metrics.mean_std([metrics.ior(a, r) for a, r in zip(acc["per_seed"], rnd["per_seed"])])
        if full is not None:
            f = full["mean"]
            row["hlr"] = metrics.mean_std([metrics.hlr(f, h) for h in hard_acc["per_seed"]])
        if row["ior"] is not None and row["hlr"] is not None:
            row["lrs"] = metrics.mean_std([metrics.lrs(i, h, cfg.lrs_lambda)
                                           for i, h in zip(row["ior"]["per_seed"], row["hlr"]["per_seed"])])
        if cfg.robust_scores and rnd is not None:
            aug = protocol.train.augment if protocol.train.augment != "none" else cfg.ars_augment
            with_aug = self._evaluate(cell, cfg.protocol_for(cell.student, cell.label_mode, aug, cell.ipc))
            no_aug = self._evaluate(cell, cfg.protocol_for(cell.student, cell.label_mode, "none", cell.ipc))
            gap = [[metrics.ior(a, r)
                    for a, r in zip(e["results"]["distilled"]["per_seed"], e["results"]["random"]["per_seed"])]
                   for e in (with_aug, no_aug)]
            row["ars"] = metrics.mean_std([metrics.ars(ga, gn, cfg.ars_gamma) for ga, gn in zip(*gap)])
            row["aug_gap"] = metrics.mean_std(gap[0])
            row["noaug_gap"] = metrics.mean_std(gap[1])
            for name, e in (("aug", with_aug), ("noaug", no_aug)):  # the accuracies behind the gaps
                row[f"{name}_acc"], row[f"{name}_random"] = e["results"]["distilled"], e["results"]["random"]
            row["ars_protocol_hashes"] = {"with_aug": with_aug["protocol_hash"], "without_aug": no_aug["protocol_hash"]}
            row["eval_keys"] += [with_aug["eval_key"], no_aug["eval_key"]]
        if dropped := metrics.drop_diverged_scores(row):
            log.warning("bench cell %s: %s left out (–): students behind them diverged (NaN/inf outputs)",
                        cell.id, ", ".join(dropped))
        return row


@stage_modes()
def run_bench(cfg: BenchConfig, progress: BenchProgress | None = None,
              stage_progress: StageProgress | None = None) -> list[dict]:
    """Run (or resume) the matrix of ``cfg``; return the table: one row (dict) per cell, in matrix order.

    ``progress(done, total, row)`` is called after every cell (``row["reused"]`` tells whether it was
    already finished); ``stage_progress(step, total, record)`` inside every teacher training (epochs),
    synthesis (steps), relabelling (epochs) and student training (epochs), as every stage calls its ``progress``,
    ``record["stage"]`` naming it (``"teacher fashion-mnist"``, ``"<cell>: distilled, seed 0"``). Older ddkit called
    it as ``stage_progress(what, done, total)``: a callback whose first parameter is named ``what`` or ``label`` is
    still called so, with a DeprecationWarning, until the next release. Accuracies and scores are fractions. Under
    torchrun every rank runs its share of the cells; the full table is returned on every rank (read back from the
    cell files).
    """
    bench = _Bench(cfg, progress_form(stage_progress, "run_bench", "stage_progress"))
    ddist.agree_settings({"bench": cfg,
                          "datasets": {n: [d.fingerprint, d.normalisation] for n, d in bench.data.items()}})
    # the bench folder is locked for the whole job (its rank 0 holds it for every rank): a second bench there would
    # replace the teachers and cells this one reads back
    with writing(bench.root, cfg.out):
        return _run_cells(bench, progress)


def _run_cells(bench: _Bench, progress: BenchProgress | None) -> list[dict]:
    """:func:`run_bench`'s stages and cells, in the folder it holds the lock of."""
    cfg = bench.cfg
    info = ddist.current()
    if info.is_main:
        write_json(bench.root / "config.json", {"schema_version": 1, "kind": "bench-config", "config": cfg.record(),
                                                 "versions": versions()})
        # the table is written once every cell is done: a run that stops before must not leave an earlier
        # run's table, which `ddkit report` would publish beside this run's distilled sets
        (bench.root / "bench.json").unlink(missing_ok=True)
    bench.prepare()
    cells = cells_of(cfg)
    mine = _my_cells(cells, {c.index: bench.finished(c) for c in cells}, info)
    ddist.barrier()  # every rank has read which cells are finished before any rank writes one
    for done, cell in enumerate(mine, 1):
        row = bench.finished(cell)
        reused = row is not None
        if row is None:
            with ddist.single_process():
                row = bench.compute(cell)
            write_json(bench.cell_path(cell), row)
        if progress is not None:
            progress(done, len(mine), {**row, "reused": reused})
    ddist.barrier()
    if info.is_main:  # every rank is past its cells, so no rank of this job takes their build locks again; one
        # another process holds stays (removal under the lock is safe for those waiting on it: see build_lock)
        for folder in ("evals", "labels"):
            remove_unused_locks(bench.root / folder)
    rows = [bench.written(c) for c in cells]
    for r in rows:  # cells finished before 2026-12-05 counted a set's soft labels also where they go unused
        if r["label_mode"] != "fkd":
            r["bytes"] = evaluation_bytes(bench.distilled[(r["dataset"], r["method"], r["ipc"])], r["label_mode"])
        metrics.drop_diverged_scores(r)  # cells finished before 2026-12-07 scored diverged students too
        # cells finished before rows recorded their method's revision (2026-12-07) hold none: their key holds it
        r.setdefault("method_revision", bench.method_revision(r["method"]))
    _add_cross_arch(rows)
    if info.is_main:
        write_json(bench.root / "bench.json", {"schema_version": 1, "kind": "bench-table", "config": cfg.record(),
                                                "versions": versions(), "rows": rows})
    ddist.barrier()
    return rows


def _my_cells(cells: list[Cell], finished: dict[int, dict | None], info) -> list[Cell]:
    """This rank's cells: finished ones (only reported) by ``index % world``; the unfinished ones
    grouped by student and dealt round-robin, so each rank gets its share of every student's
    cells (students differ a lot in cost) also when a resumed run has only a few left."""
    done = [c for c in cells if finished[c.index] is not None and c.index % info.world_size == info.rank]
    todo = sorted((c for c in cells if finished[c.index] is None), key=lambda c: (c.student, c.index))
    return sorted(done + todo[info.rank :: info.world_size], key=lambda c: c.index)


def _add_cross_arch(rows: list[dict]) -> None:
    """Each row gets ``cross_arch``: {student: mean accuracy} of the same set and label mode."""
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["method"], r["ipc"], r["label_mode"]), {})[r["student"]] = r["acc"]["mean"]
    for r in rows:
        g = groups[(r["dataset"], r["method"], r["ipc"], r["label_mode"])]
        r["cross_arch"] = dict(g) if len(g) > 1 else None


def load_table(run_dir: str | Path) -> dict:
    """The assembled ``bench.json`` of a run directory (or that file itself)."""
    path = Path(run_dir) / "bench.json"
    if not path.is_file():
        kind, takes = folder_kind(Path(run_dir)), "`ddkit report` takes the folder of a `ddkit bench` run"
        if kind == "pipeline-run":
            raise DDKitError(f"{str(run_dir)!r} is a `ddkit run` folder, whose report is "
                             f"{str(Path(run_dir) / 'report')!r}; {takes}")
        if kind is None and any((Path(run_dir) / stage / "manifest.json").is_file()
                                for stage in ("teacher", "distilled", "labels")):
            raise DDKitError(f"{str(run_dir)!r} looks like an unfinished `ddkit run` folder (no report yet); run "
                             f"`ddkit run` with its config again to finish it and write its report/; {takes}")
        if kind is not None and kind != "bench-config":
            raise DDKitError(f"{str(run_dir)!r} holds a ddkit {kind!r} output, not a bench run; {takes} (`ddkit "
                             "show` summarises this one)")
        raise DDKitError(f"{str(path)!r} not found; run `ddkit bench CONFIG` to completion first")
    table = read_json(path, "bench table")
    if table.get("kind") != "bench-table":
        raise DDKitError(f"{str(path)!r} is not a bench table (kind {table.get('kind')!r}); pass the folder of a "
                         "`ddkit bench` run")
    check_schema_version(table, path, "it is damaged: re-run `ddkit bench` with the run's config (finished cells are "
                         "reused) to rebuild it", required=False)
    rows = table.get("rows")  # tables assembled before 2026-12-07 scored diverged students too
    for r in rows if isinstance(rows, list) else []:  # (damaged rows: refused by the report's checks)
        if isinstance(r, dict):
            metrics.drop_diverged_scores(r)
    return table


def export_for_ddranking(distilled: DistilledSet | str | Path, out: str | Path) -> Path:
    """Write a distilled set the way DD-Ranking's evaluators consume it; returns the folder.

    DD-Ranking's ``compute_metrics(image_tensor=..., soft_labels=...)`` takes one image tensor in
    CLASS-MAJOR order (it rebuilds the hard labels as ``[0]*ipc + [1]*ipc + ...``, so every class
    must have exactly ``ipc`` images) already normalised like its real data (mean/std of the dataset),
    and optional soft labels in the same order. The folder holds::

        images.pt       float32 N x C x H x W, class-major, normalised with the dataset mean/std
        labels.pt       int64 N hard labels (class-major: 0..0, 1..1, ...)
        soft_labels.pt  float32 N x K teacher logits (only if the set stores soft labels)
        meta.json       classes, ipc, mean, std, source manifest hash

    ``torch.load(folder / "images.pt", weights_only=True)`` gives the tensor to pass as ``image_tensor``. For
    ``image_path=`` use ``DistilledSet.export(out, "imagefolder")`` instead (folders sort in label order).
    """
    from ddkit.artifacts import atomic_dir, torch_write_failures

    if not isinstance(distilled, DistilledSet):
        distilled = DistilledSet.load(distilled)
    labels = distilled.labels.long()
    counts = torch.bincount(labels, minlength=len(distilled.classes)).tolist()
    if len(set(counts)) != 1:
        raise DDKitError(f"DD-Ranking needs the same number of images in every class, got {counts}; "
                         "export a set made with a fixed IPC")
    order = torch.argsort(labels, stable=True)
    x = distilled.images[order]
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    mean = torch.tensor(distilled.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(distilled.std, dtype=torch.float32).view(1, -1, 1, 1)
    with atomic_dir(out, kind="ddranking-export") as tmp:
        tensors = {"images": ((x - mean) / std).contiguous(), "labels": labels[order].clone()}
        if distilled.soft_labels is not None:
            tensors["soft_labels"] = distilled.soft_labels[order].float().clone()
        for name, t in tensors.items():
            # saved by path, not through atomic_torch_save's file object: the archives keep their inner names
            with torch_write_failures(Path(out), tmp / f"{name}.pt"):
                torch.save(t, tmp / f"{name}.pt")
        write_json(tmp / "meta.json", {**distilled.export_record("ddranking-export"), "ipc": counts[0],
                                       "mean": list(distilled.mean), "std": list(distilled.std),
                                       "normalized": True, "order": "class-major"})
    return Path(out)


__all__ = ["BenchConfig", "Cell", "MethodSpec", "PeakMemory", "SavedTensorBytes", "cells_of", "export_for_ddranking",
           "format_bench_table", "load_bench_config", "load_table", "run_bench"]
