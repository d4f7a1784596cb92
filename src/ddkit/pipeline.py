"""Stage functions and ``run``: dataset -> teacher -> distilled set -> evaluation -> report.

Each stage writes an artifact whose manifest holds a ``config_hash`` of everything that decides its
content; ``run`` reuses a stage whose artifact already carries the same hash.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ddkit import cache as ddcache
from ddkit import distributed as ddist
from ddkit.artifacts import (
    OutputBusy,
    base_manifest,
    check_output_dir,
    check_writable,
    copy_file,
    folder_kind,
    hidden_path,
    holds_files,
    read_json,
    read_manifest,
    recorded_paths,
    refuse_current_folder,
    write_json,
    write_text,
    writing,
)
from ddkit.config import (
    Checked,
    as_config,
    config_hash,
    field,
    from_dict,
    keyed,
    operational_defaults,
    sorted_keys,
    sorted_seeds,
    to_dict,
    typed_numbers,
)
from ddkit.data.base import DATASETS, DataBundle, DatasetConfig, check_bundle, load_dataset
from ddkit.determinism import evaluation_change, global_rng, stage_modes
from ddkit.distilled import KIND as DISTILLED_KIND
from ddkit.distilled import DistilledSet, ipc_text, store_images
from ddkit.errors import ConfigError, DDKitError
from ddkit.evaluate.metrics import check_report
from ddkit.evaluate.protocol import (
    UNLABELLED_BY_ENSEMBLE,
    ProtocolConfig,
    protocol_settings,
    recorded_overrides,
    recorded_protocol,
    refuse_inert_overrides,
    resolve_protocol,
    unused_overrides,
)
from ddkit.evaluate.runner import (
    check_random_ipc,
    evaluate,
    format_table,
    labelling_teacher,
    progress_form,
    teacher_logits,
)
from ddkit.evaluate.tables import diverged_mark
from ddkit.labels.fkd import KIND as FKD_KIND
from ddkit.labels.fkd import RelabelSpec, SoftLabelStore, store_identity
from ddkit.methods import METHODS, FitContext, Method, SyntheticSet
from ddkit.methods.base import check_ipc, fit_seeded
from ddkit.registry import origin, source_record, source_sha256
from ddkit.teacher import (
    Teacher,
    TeacherConfig,
    as_teacher,
    check_teacher,
    check_teacher_artifact,
    saved_teacher,
    train_teacher,
)
from ddkit.training import LABEL_MODES, TeacherBN, check_teacher_bn, keeps_teacher_modes, omit_running_bn

log = logging.getLogger(__name__)

DEFAULT_IPC = 10
RUN_KIND = "pipeline-run"  # the manifest.json `run` writes beside config.json once every stage is done
RUN_FKD_STORE = "<made by the run from its distilled set>"  # label mode fkd's store until the labels stage made it


@dataclass
class DistillConfig(Checked):
    """Which method makes the distilled set."""

    method: str = field("random", help="registered method key (`ddkit list methods`)")
    ipc: int | None = field(DEFAULT_IPC, help="images per class (method full: every image; leave it out)")
    seed: int = field(0, seed=True, help="seed of the method")
    options: dict = field({}, help="the method's own settings (its Config dataclass)")
    soft_labels: bool = field(False, help="store the teacher's logits on each image (static soft labels)")
    soft_labels_bn: TeacherBN = field("running", help="teacher BatchNorm for soft_labels: running statistics, or "
                                      "batch: statistics of the distilled images (CV-DD's batch-specific soft labels)")
    soft_labels_bn_batch: int | None = field(None, help="soft_labels_bn batch: statistics over groups of this many "
                                             "images (a permutation seeded with seed; null: all images at once)")
    image_dtype: Literal["float32", "uint8"] = field(
        "float32", added=True, help="how the set stores its images: float32 (as the method makes them; sets of real "
        "pixels, as random's, keep the data's uint8) or uint8 (each pixel rounded to the nearest of 256 levels of "
        "0..1, 4x fewer bytes; pixels outside 0..1 are clipped and counted in images.quantised of the manifest)")

    def __post_init__(self) -> None:
        self.options = sorted_keys(self.options)  # recorded alike whatever order the keys were given in
        if self.method not in METHODS:
            raise ConfigError(METHODS.unknown_message(self.method))
        # the default cannot be told from a typed 10
        if not METHODS.get(self.method).uses_ipc and self.ipc not in (None, DEFAULT_IPC):
            what = "keeps every training image" if self.method == "full" else "makes no ipc images per class"
            raise ConfigError(f"ipc {self.ipc} does not apply to method {self.method!r}, which {what}; remove ipc (or "
                              "set ipc: null)")
        check_teacher_bn(self.soft_labels_bn, self.soft_labels_bn_batch, "soft_labels_bn")
        if self.soft_labels_bn != "running" and not self.soft_labels:
            raise ConfigError("soft_labels_bn batch only applies to stored soft labels; set soft_labels: true "
                              "or soft_labels_bn: running")


@dataclass
class EvalConfig(Checked):
    """How the distilled set is evaluated."""

    protocol: str = field("dc-protocol", help="protocol preset name or YAML file (`ddkit list protocols`)")
    overrides: dict = field({}, help="protocol fields to change, e.g. {train: {epochs: 100}} (not label_mode: "
                            "label_modes sets it)")
    label_modes: list[str] = field(["hard"],
                                   help="label modes to evaluate, each a separate protocol: hard, teacher, stored, fkd")
    seeds: list[int] = field([0, 1, 2], seed=True, help="student seeds, in any order (kept sorted: the same "
                             "evaluation however they are written)")

    def __post_init__(self) -> None:
        self.overrides = sorted_keys(self.overrides)
        unused = unused_overrides(self.overrides, {"label_mode": "the run evaluates every mode in "
                                                                 "evaluate.label_modes"})  # protocols() sets it
        if unused:
            raise ConfigError("; ".join(unused))
        self.seeds = sorted_seeds(self.seeds, "evaluate.seeds")
        if not self.label_modes:
            raise ConfigError("label_modes is empty; list at least one (hard, teacher, stored or fkd)")
        bad = [m for m in self.label_modes if m not in LABEL_MODES]
        if bad:
            raise ConfigError(f"unknown label mode(s) {bad}; use hard, teacher, stored or fkd")
        if len(set(self.label_modes)) != len(self.label_modes):
            raise ConfigError(f"label_modes {self.label_modes} repeat a mode (the same evaluation twice); "
                              "list each once")
        if not self.seeds:
            raise ConfigError("evaluate.seeds is empty; give at least one seed")

    @property
    def makes_store(self) -> bool:
        """Whether the run makes its set's FKD store (label mode fkd, no ``overrides.fkd_store`` given)."""
        return "fkd" in self.label_modes and not self.overrides.get("fkd_store")

    def protocols(self, fkd_store: str | None = None) -> list[ProtocolConfig]:
        """One protocol per label mode; label mode fkd replays ``overrides.fkd_store`` where given, else
        ``fkd_store`` (the run's own store; a placeholder until it is made)."""
        out = []
        for mode in self.label_modes:
            over = {**self.overrides, "label_mode": mode}
            if mode == "fkd" and self.makes_store:
                over["fkd_store"] = fkd_store or RUN_FKD_STORE
            try:
                out.append(resolve_protocol(self.protocol, over, "evaluate.overrides", check_inert=False))
            except ConfigError as e:  # the label mode comes from label_modes, not from an override the user wrote
                raise ConfigError(str(e).replace("evaluate.overrides.label_mode ", "evaluate.label_modes: label_mode ")
                                  ) from None
        # an override that no label mode's protocol reads (hard labels read no temperature, soft ones may)
        refuse_inert_overrides(protocol_settings(self.protocol), self.overrides, out, "evaluate.overrides")
        return out


@dataclass
class RunConfig(Checked):
    """A whole pipeline run (``ddkit run CONFIG``)."""

    dataset: DatasetConfig = field(factory=DatasetConfig, help="the real dataset")
    teacher: TeacherConfig | None = field(factory=TeacherConfig, help="teacher to train or import (null: no teacher)")
    distill: DistillConfig = field(factory=DistillConfig, help="method, IPC and seed")
    evaluate: EvalConfig = field(factory=EvalConfig, help="evaluation protocol, label modes and seeds")
    relabel: RelabelSpec = field(factory=RelabelSpec, help="label mode fkd (without evaluate.overrides.fkd_store): how "
                                 "the run stores its set's per-epoch soft labels, in labels/")
    device: str = field("auto", help="auto, cpu, cuda or cuda:N")
    out: str = field("runs/run", help="output folder")


def load_teacher_for(path: str | Path | None, data: DataBundle, device) -> Teacher | None:
    """The teacher artifact at ``path`` (:func:`as_teacher`; None: none), checked against ``data``."""
    teacher = as_teacher(path, device)
    if teacher is not None:
        teacher.check_compatible(data)
    return teacher


def _dataset_config_of(data: DataBundle, given: DatasetConfig | None) -> DatasetConfig:
    """The config a set records for ``data``: ``given`` if it describes the data ``data`` was loaded with."""
    if given is None:
        if data.config is None:
            raise ConfigError(f"dataset_cfg is needed for data built by hand ({data.name!r}): pass the DatasetConfig "
                              "that loads it, which the set records and evaluation reloads the data by (data in "
                              "memory: dataset_cfg=ddkit.data.save_tensors(data, 'data.safetensors'))")
        return data.config
    if not isinstance(given, DatasetConfig):
        raise ConfigError(f"dataset_cfg must be a DatasetConfig, got {type(given).__name__} {given!r:.80}")
    if given.name not in DATASETS:
        raise ConfigError(f"dataset_cfg names dataset {given.name!r}, which no registered source loads, so the set "
                          "could not be evaluated from it; save the data with "
                          "dataset_cfg=ddkit.data.save_tensors(data, 'data.safetensors') (a 'tensors' config)")
    if data.config is not None:
        mine, theirs = to_dict(data.config.absolute()), to_dict(given.absolute())
        neutral = {"decode_cache"}  # how the data is loaded, not which data: the same pixels either way
        diff = [f"{k} {theirs[k]!r} vs {mine[k]!r}" for k in mine if k not in neutral and mine[k] != theirs[k]]
        if diff:
            raise ConfigError(f"dataset_cfg does not describe the data it is given ({', '.join(diff)}, as loaded); "
                              "pass the config the data was loaded with (data.config), or leave dataset_cfg out")
    return given


def check_real_unchanged(method: str, data: DataBundle, before: str, error: type[DDKitError] = DDKitError) -> None:
    """Refuse (as ``error``) a fit of ``method`` that changed the real ``data`` it was given in place: its
    fingerprint is no longer ``before``, read before the fit. The run's baselines and evaluations, and the set's
    record, use that data after the fit; the distill stage and the method contract (:mod:`ddkit.testing`) check it."""
    if data.fingerprint != before:
        raise error(f"method {method!r} changed the real data it was given in place (fingerprint {before} before its "
                    f"fit, {data.fingerprint} after), which the run's baselines and evaluations use next; fix the "
                    "method to work on copies (real.train.images.float(), .clone()), never on `real` itself")


@stage_modes()
@keeps_teacher_modes
def distill(
    data: DataBundle,
    cfg: DistillConfig | dict,
    dataset_cfg: DatasetConfig | None = None,
    out: str | Path | None = None,
    teacher: Teacher | str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int, dict], None] | None = None,
    run_config: dict | None = None,
    before_save: Callable[[DistilledSet], None] | None = None,
    options_key: str = "distill.options",
) -> DistilledSet:
    """Run a method and (if ``out``) write the distilled-set artifact atomically; ``cfg``: a
    :class:`DistillConfig` or a dict of its settings; ``teacher``: a :class:`Teacher` or its artifact
    folder; ``before_save(set)`` is called (by the process that saves) once the set is made, before it
    is saved. ``options_key``: the config key of ``cfg.options``, which errors in them name (a bench's
    ``methods[KEY].options``). ``dataset_cfg``
    (recorded in the set, which evaluation reloads the data by) defaults to the config ``data`` was
    loaded with, and must describe the same data if given. Under torchrun rank 0 alone labels, builds
    and saves the set; the other ranks return the saved artifact (without ``out``: rank 0's set, sent)."""
    check_bundle(data)
    cfg = as_config(DistillConfig, cfg, "distill")
    dataset_cfg = _dataset_config_of(data, dataset_cfg)
    device = ddist.resolve_device(device)
    if out is not None:
        check_output_dir(Path(out), DISTILLED_KIND)  # a folder we may not replace fails now, not after the method
    method_cls = METHODS.get(cfg.method)
    method_cfg = from_dict(method_cls.Config, cfg.options, options_key)
    if method_cls.uses_ipc and method_cls.ipc_within_class_size:  # every method's, not only those that check it
        check_ipc(data, cfg.ipc)
    teacher = as_teacher(teacher, device)  # a teacher artifact's folder is loaded (after the options are checked)
    if teacher is not None:
        teacher.check_compatible(data)
    ddist.agree_settings({"distill": cfg, "dataset": [data.fingerprint, data.normalisation],
                          "teacher": getattr(teacher, "fingerprint", None)})
    own = method_cls.own_soft_labels(method_cfg)
    if cfg.soft_labels and own is not None:
        raise ConfigError(own_labels_clash(cfg.method, method_cls, own, options_key))
    if (getattr(method_cls, "needs_teacher", False) or cfg.soft_labels) and teacher is None:
        raise DDKitError(f"method {cfg.method!r}{' with soft_labels' if cfg.soft_labels else ''} needs a teacher; pass "
                         "teacher= (CLI: --teacher DIR)")
    key = distill_hash(cfg, data, teacher)
    reads = reads_teacher(cfg)  # a teacher-free set is made without one (and records none)
    source = method_source(method_cls)  # read with the key, before the fit (an edit during it is the next set's)
    root = work_dir(out) if out is not None else None
    fresh = root is not None and not root.exists()
    # another distill to this --out would share (and remove) the checkpoint folder
    with writing(root, out) if root is not None else contextlib.nullcontext():
        work = work_dir(out, key) if out is not None else None
        if root is not None and not fresh and ddist.current().is_main:
            # checkpoints of an interrupted synthesis with other settings (seed, options, teacher, data) cannot be
            # resumed by this one: they would only stop it, so it starts afresh
            for stale in root.iterdir():
                if stale != work:
                    log.info("discarding %s: checkpoints of a synthesis with other settings", stale)
                    if stale.is_dir():
                        shutil.rmtree(stale)
                    else:
                        stale.unlink()
        ctx = FitContext(ipc=cfg.ipc, seed=cfg.seed, device=device, work_dir=work, progress=progress,
                         options_key=options_key, image_dtype=cfg.image_dtype)
        ipc = cfg.ipc if method_cls.uses_ipc else None
        teacher_info = teacher.record() if teacher is not None and reads else None
        info = ddist.current()
        distilled, failure = None, None
        try:
            data_before = data.fingerprint  # remembered: a second read costs nothing unless fit edits the tensors
            method = fit_seeded(method_cls(method_cfg), data, [teacher] if teacher is not None and reads else [], ctx)
            check_real_unchanged(cfg.method, data, data_before)
            # rank 0 alone labels and builds the set (a method may gather it there alone, and return None on the
            # other ranks of a torchrun job), which the other ranks then read back from the saved artifact
            if info.is_main:
                synthetic = _fitted(method, cfg.method)
                if cfg.soft_labels and synthetic.soft_labels is not None and not method_cls.stores_soft_labels(
                        method_cfg):  # labels of its own that it does not declare: never replaced unannounced
                    raise ConfigError(
                        f"method {cfg.method!r} made soft labels of its own, and distill.soft_labels (--soft-labels) "
                        "would overwrite them with the teacher's logits; drop --soft-labels / distill.soft_labels: "
                        "true to keep them (label mode stored trains with them), and declare them in the method's "
                        "class (classmethod own_soft_labels), which ddkit run and bench read before the fit")
                # the images as the set stores them (uint8: rounded), before the teacher labels them: stored labels
                # describe the stored images (RDED and CV-DD label theirs in fit, with ctx.as_stored)
                quantised = store_images(synthetic, cfg.image_dtype, data, cfg.method, to_dict(method_cfg), options_key)
                if cfg.soft_labels:
                    synthetic.soft_labels = teacher_logits(teacher, synthetic.images, data.mean, data.std, device,
                                                           bn=cfg.soft_labels_bn,
                                                           bn_batch=cfg.soft_labels_bn_batch, seed=cfg.seed,
                                                           name="distill.soft_labels_bn")
                distilled = DistilledSet.build(
                    synthetic, data, method=cfg.method, method_config=recorded_options(method_cfg), ipc=ipc,
                    seed=cfg.seed,
                    config=run_config or {"distill": recorded_distill(cfg)},
                    dataset_config=to_dict(dataset_cfg.absolute()),
                    teacher=teacher_info, options_key=options_key, quantised=quantised, method_source=source,
                )
        except DDKitError as e:
            failure = e
        if info.enabled:  # a set rank 0 refused is refused on every rank, which would otherwise wait for it
            reason = ddist.broadcast_object(None if failure is None else str(failure))
            if failure is None and reason is not None:
                failure = DDKitError(reason)
        if failure is not None:
            # a method that refuses its input or diverges does so again with the same settings: checkpoints
            # this call made would only stand in the way of a corrected re-run (a kill keeps them, to resume)
            if fresh and info.is_main:
                shutil.rmtree(root, ignore_errors=True)
            raise failure
        if info.is_main:
            distilled.manifest["config_hash"] = key
        if out is not None and info.is_main:
            if before_save is not None:
                before_save(distilled)
            distilled.save(out)
            if root is not None and root.exists():
                shutil.rmtree(root, ignore_errors=True)
        if info.enabled and out is None:
            distilled = ddist.broadcast_object(distilled)  # no artifact to read it from: rank 0 sends it
        else:
            ddist.barrier()
            if not info.is_main:
                distilled = DistilledSet.load(out)  # rank 0's saved set, as rank 0 holds it
        distilled.path = Path(out).absolute() if out is not None else None
        return distilled


def own_labels_clash(name: str, cls: type[Method], own: str, options_key: str = "distill.options") -> str:
    """Why ``distill.soft_labels`` is refused for method ``name`` (class ``cls``), which labels its images itself as
    ``own`` (:meth:`~ddkit.methods.Method.own_soft_labels`) says, and how to go on."""
    off = cls.own_soft_labels_off(own)
    where, keep = (f"{options_key}.{own}", f", or set {options_key}.{off}") if off else (own, "")
    return (f"method {name!r} labels its images itself ({where}), and distill.soft_labels (--soft-labels) would "
            f"overwrite them with the teacher's logits; drop --soft-labels / distill.soft_labels: true{keep}")


def _fitted(method: Any, name: str) -> SyntheticSet:
    """The set a method's ``fit`` made, or a DDKitError naming the slip (no ``return self``, no ``synthetic_``)."""
    if not isinstance(method, Method):
        got = "None" if method is None else f"a {type(method).__name__}"
        raise DDKitError(f"method {name!r}: its fit returned {got}; it must `return self` after setting "
                         "self.synthetic_")
    if not isinstance(getattr(method, "synthetic_", None), SyntheticSet):
        raise DDKitError(f"method {name!r}: its fit set no self.synthetic_ (a ddkit.methods.SyntheticSet); set it "
                         "before `return self`")
    return method.synthetic_


def method_source(cls: type) -> dict:
    """Where method class ``cls`` is defined (``module``: ``myplug.Herding``) and, for one from outside
    ddkit, the sha256 of its source (and the helper modules it covers), which a distilled set records
    beside the method's name."""
    return {"module": origin(cls), **source_record(cls)}


def work_dir(out: str | Path, key: str | None = None) -> Path:
    """Where :func:`distill` keeps the checkpoints of a set written to ``out`` until it is saved (a
    hidden folder beside it), so that an interrupted synthesis resumes; with ``key`` (the set's
    :func:`distill_hash`), the subfolder of the synthesis with those settings."""
    root = hidden_path(out, ".work")
    return root if key is None else root / key[:16]


def discard_work(out: str | Path, key: str) -> None:
    """Remove the checkpoints of the set ``key`` at ``out`` that a kill between the set's save and their
    removal left (the set is then reused and never made again), and the work folder once empty."""
    if not ddist.current().is_main:
        return
    shutil.rmtree(work_dir(out, key), ignore_errors=True)
    with contextlib.suppress(OSError):  # missing, or holding another setting's checkpoints: kept
        work_dir(out).rmdir()


def reads_teacher(cfg: DistillConfig) -> bool:
    """Whether a set made with ``cfg`` depends on the teacher: its method may read one (``uses_teacher``; a method
    not registered is assumed to), or the set stores the teacher's logits (``soft_labels``)."""
    return cfg.soft_labels or cfg.method not in METHODS or METHODS.get(cfg.method).uses_teacher


def distill_identity(cfg: DistillConfig, resolved: dict) -> dict:
    """The settings that identify a set made with ``cfg``: the options given, each number as the method's
    Config types it (``resolved``: that Config as a dict), so that ``lr_img: 1`` and ``1.0`` (or numpy's
    1.0) make one set; options written as they resolve, as the shipped configs are, keep the identity they
    always had. An option given at the method's default stays in (``lr_img: 1.0`` for dm is another identity than no
    ``lr_img``): dropping defaults would re-key shipped configs and recorded benches that write some out.
    ``soft_labels_bn`` is left out while running. An ``operational`` option (see
    :func:`ddkit.config.field`: ``checkpoint_every``, a ``cache_dir``) given at another value than its default is
    left out, as if not given: it decides how the set is made, not what it is; given at its default it stays, as
    identities always held it."""
    ident = omit_running_bn(to_dict(cfg, identity=True), "soft_labels_bn")
    options = typed_numbers(ident["options"], resolved)
    if cfg.method in METHODS:
        at = operational_defaults(METHODS.get(cfg.method).Config)
        options = {k: v for k, v in options.items() if k not in at or v == to_dict(at[k])}
    ident["options"] = options
    return ident


def distill_hash(cfg: DistillConfig, data: DataBundle, teacher: Teacher | str | None, *,
                 teacher_free: bool = True) -> str:
    """Identity of a distilled set: options as given (numbers typed, :func:`distill_identity`), data and its
    normalisation, teacher (its fingerprint, or ``teacher`` itself as one; left out where the set does not depend on
    it, :func:`reads_teacher`, unless ``teacher_free`` is False, as ddkit until 2026-12-07 keyed every set), the
    method's ``revision``, ``identity_tags`` and ``data_identity_tags`` (left out while 0 / empty; likewise
    ``soft_labels_bn`` while running), and for a method from outside ddkit the sha256 of its source
    (:func:`source_sha256`).
    Artifacts named in the options (``extra_teachers``, an ``experts`` buffer) enter by what they hold,
    not by path, so a moved or copied run or bench folder keeps its sets."""
    # a plugin model the options name (MTT's experts, a student), given or a plugin method's default
    resolved = to_dict(from_dict(METHODS.get(cfg.method).Config, cfg.options)) if cfg.method in METHODS else cfg.options
    ident = distill_identity(cfg, resolved)
    options = ident.get("options") or {}
    key = {"distill": ident, "data": data.fingerprint, "norm": data.normalisation,
           "teacher": None if teacher is None or (teacher_free and not reads_teacher(cfg))
           else getattr(teacher, "fingerprint", teacher)}
    if cfg.method in METHODS:
        cls = METHODS.get(cfg.method)
        if cls.revision:
            key["method_revision"] = cls.revision
        if tags := {**cls.identity_tags(cfg.options), **cls.data_identity_tags(cfg.options, data.num_classes)}:
            key["method_tags"] = tags
        if sha := source_sha256(cls):  # a plugin's code: an edit makes a new set (ddkit's own keep their keys)
            key["method_source"] = sha
    if models := _plugin_model_sources(resolved):
        key["model_sources"] = models
    if isinstance(experts := cfg.options.get("experts"), str):  # a buffer on disk: what it holds, not its path
        from ddkit.methods.trajectory import buffer_identity

        options.pop("experts", None)
        key["experts_buffer"] = buffer_identity(experts)
    if extra := cfg.options.get("extra_teachers"):  # teacher artifacts on disk: their weights, not their paths
        options.pop("extra_teachers", None)
        key["extra_teacher_weights"] = teacher_weights(extra)
    return config_hash(key)


def _plugin_model_sources(value: Any) -> dict[str, str]:
    """The source sha256 of every plugin model (from outside ddkit) named by a string in ``value`` (a
    method's options, nested): an edited model makes a new set, as an edited method does. Empty for
    ddkit's own models, so the keys of their sets keep their values."""
    from ddkit.models.registry import model_source

    found: dict[str, str] = {}
    if isinstance(value, dict):
        for v in value.values():
            found.update(_plugin_model_sources(v))
    elif isinstance(value, (list, tuple)):
        for v in value:
            found.update(_plugin_model_sources(v))
    elif isinstance(value, str) and (sha := model_source(value).get("source_sha256")):
        found[value] = sha
    return found


def teacher_weights(paths: list[str]) -> list[str]:
    """The weights sha of each teacher artifact in ``paths`` (read from its manifest): what keys name
    instead of the paths. A plugin model's adds the sha256 of its factory's source as it is now
    (:func:`~ddkit.teacher.squeeze.model_code`), so an edit of it makes new sets and evaluations."""
    from ddkit.teacher.squeeze import KIND as TEACHER_KIND
    from ddkit.teacher.squeeze import recorded_fingerprint

    return [recorded_fingerprint(read_manifest(t, TEACHER_KIND, require={"weights_sha": str})) for t in paths]


def ensemble_identity(protocol: ProtocolConfig) -> dict:
    """For keys of ``protocol``'s evaluations: the weights of its ``extra_teachers``, which its hash
    counts only (they form an ensemble with the teacher in label modes teacher and fkd). Empty without
    an ensemble, so the keys of other evaluations keep their values, and in label modes hard and stored,
    which do not use them (their hash leaves them out too: the evaluation is the one without them; those
    that ddkit before 2026-12-07 made in mode stored with the random subset labelled by the ensemble had
    their count in the hash, so they are not reused)."""
    if not protocol.extra_teachers or protocol.label_mode in UNLABELLED_BY_ENSEMBLE:
        return {}
    return {"extra_teacher_weights": teacher_weights(protocol.extra_teachers)}


def evaluation_key(protocol: ProtocolConfig, seeds: list[int], distilled: str, teacher: str | None,
                   legacy: bool = False) -> str:
    """The key ``run`` gives its evaluation of the set with key ``distilled`` under ``protocol`` (its report's
    ``run_hash``), labelled by the teacher with fingerprint ``teacher`` (None: hard labels); ``legacy``: with the
    inputs as ddkit until 2026-12-07 keyed them (:func:`protocol_inputs`). From
    :data:`~ddkit.cache.STUDENT_REVISION` 2 on, by the revision of ddkit's student training too, as its students:
    a run folder evaluates again once a fix changed them."""
    return config_hash({"protocol": protocol.hash, "seeds": seeds, "distilled": distilled, "teacher": teacher,
                        **protocol_inputs(protocol, legacy), **ddcache.revised(ddcache.STUDENT_REVISION)})


def protocol_inputs(protocol: ProtocolConfig, legacy: bool = False) -> dict:
    """For keys of ``protocol``'s evaluations: what it reads from disk, which its hash names only by
    count or marker: the extra teachers' weights (:func:`ensemble_identity`) and, in label mode fkd,
    the FKD store's content (a store re-made in place with other settings must not reuse the old
    one's evaluations; a moved or copied one keeps them; ``legacy``: its identity as ddkit until 2026-12-07
    gave it, :func:`store_identity`)."""
    out = ensemble_identity(protocol)
    if protocol.label_mode == "fkd" and protocol.fkd_store:
        out["fkd_store"] = store_identity(protocol.fkd_store, legacy=legacy)
    return out


def check_student(protocol: ProtocolConfig, data: DataBundle,
                  keys: tuple[str, str] | None = ("student", "student_options")) -> None:
    """Build ``protocol``'s student once for ``data`` (its channels, classes and image size), leaving
    the global random state alone: a bad student name or option fails before any stage runs, naming
    the config key of the name or options (``keys``; None: the caller names where the student is)."""
    from ddkit.models import configured_model, create_model

    c, h, _ = data.image_shape
    with global_rng():
        if keys is None:
            create_model(protocol.student, c, data.num_classes, h, **protocol.student_options)
        else:
            configured_model(keys, protocol.student, c, data.num_classes, h, protocol.student_options)


def check_method_data(method: type[Method], method_cfg: Any, data: DataBundle, ipc: int | None,
                      key: str = "distill.options") -> None:
    """What ``method`` (its options ``method_cfg``, at ``key``) would refuse of ``data`` only in its ``fit``, after a
    run's or bench's teacher trained: its network (``model`` / ``model_options``, or an expert ``buffer`` trained on the
    fly) too deep for the images, built once here as the students are, and the method's own ``check_data(cfg, data,
    ipc, key)`` where it has one (rded: the source images per class)."""
    from ddkit.models import configured_model

    nets = [(key, method_cfg)]
    if getattr(method_cfg, "experts", None) is None and hasattr(method_cfg, "buffer"):
        nets.append((f"{key}.buffer", method_cfg.buffer))
    c, h, _ = data.image_shape
    with global_rng():
        for at, part in nets:
            if isinstance(getattr(part, "model", None), str) and isinstance(getattr(part, "model_options", None), dict):
                configured_model((f"{at}.model", f"{at}.model_options"), part.model, c, data.num_classes, h,
                                 part.model_options)
    if (check := getattr(method, "check_data", None)) is not None and ipc is not None:
        check(method_cfg, data, ipc, key)


def check_learned_lr(method: str, protocols: list[ProtocolConfig], where: str = "evaluate") -> None:
    """Refuse a protocol with ``learned_lr`` (students train with the set's learned lr) for a method
    whose sets record none, before any stage runs."""
    if method not in METHODS or METHODS.get(method).learns_lr:
        return
    if any(p.learned_lr for p in protocols):
        raise ConfigError(f"{where}: the protocol trains students with the set's learned lr (learned_lr: true), but "
                          f"method {method!r} learns none; use a trajectory method (mtt, tesla, ftd, datm, shq) or set "
                          "learned_lr: false")


def check_run(cfg: RunConfig, data: DataBundle) -> None:
    """Fail before any stage runs (and leaves output) on what would only fail later: the method's
    options and what it would refuse of the data (:func:`check_method_data`), the evaluation protocols and their
    overrides, the students, label modes without the
    teacher or soft labels they need, extra teachers that are not there or were made for other data."""
    method = METHODS.get(cfg.distill.method)
    method_cfg = from_dict(method.Config, dict(cfg.distill.options), "distill.options")
    # read after the teacher stage otherwise: one of other data is refused before any teacher trains
    check_teacher_folders(getattr(method_cfg, "extra_teachers", None) or [], data, "distill.options.extra_teachers")
    if method.uses_ipc and method.ipc_within_class_size:
        check_ipc(data, cfg.distill.ipc)
    check_method_data(method, method_cfg, data, cfg.distill.ipc if method.uses_ipc else None)
    if method.needs_teacher and cfg.teacher is None:
        raise ConfigError(f"method {cfg.distill.method!r} needs a teacher but teacher is null; configure teacher:")
    if cfg.teacher is not None:
        check_teacher(cfg.teacher, data)
    protocols = cfg.evaluate.protocols()
    check_learned_lr(cfg.distill.method, protocols)
    if not cfg.evaluate.makes_store and cfg.relabel != RelabelSpec():
        log.warning("the relabel: section is unused: the run makes FKD labels only for label mode fkd without "
                    "evaluate.overrides.fkd_store")
    for protocol in protocols:
        mode = protocol.label_mode
        if protocol.random_baseline and method.uses_ipc and not method.ipc_within_class_size:
            check_random_ipc(data, cfg.distill.ipc, "evaluate.overrides.random_baseline: false")
        if mode in ("teacher", "stored", "fkd") and cfg.teacher is None:
            raise ConfigError(f"evaluate label mode {mode!r} needs a teacher but teacher is null; configure teacher: "
                              "or use label mode hard")
        if mode == "stored" and not (cfg.distill.soft_labels or method.stores_soft_labels(method_cfg)):
            raise ConfigError(f"evaluate label mode 'stored' needs soft labels in the set, and method "
                              f"{cfg.distill.method!r} declares none of its own with these options; set "
                              "distill.soft_labels: true (the teacher's logits), or, for a method that makes its own, "
                              "declare them in its class (classmethod own_soft_labels)")
        if mode == "fkd":
            check_fkd(cfg, data, protocol)
        if mode not in UNLABELLED_BY_ENSEMBLE:  # hard and stored ask no extra teacher; the others after the set
            check_teacher_folders(protocol.extra_teachers, data, "evaluate.overrides.extra_teachers"
                                 if "extra_teachers" in cfg.evaluate.overrides else
                                 f"evaluate.protocol {cfg.evaluate.protocol!r}'s extra_teachers")
        check_student(protocol, data)


def check_teacher_folders(paths: list[str], data: DataBundle, key: str) -> None:
    """Refuse, naming the config ``key`` that lists them, an extra teacher in ``paths`` that is missing, no teacher
    artifact, or made for other data than ``data`` (classes, image shape): from its manifest, before any stage runs
    (its weights are read where it labels)."""
    for path in paths:
        try:
            check_teacher_artifact(path, data)
        except DDKitError as e:
            raise keyed(key, e) from None


def check_fkd(cfg: RunConfig, data: DataBundle, protocol: ProtocolConfig) -> None:
    """Label mode fkd: the store named in ``evaluate.overrides.fkd_store`` must be one, or the run's own
    store must be makeable (``relabel``'s augmentation and top_k; top-k labels train only with loss kl)."""
    if not cfg.evaluate.makes_store:
        try:
            read_manifest(protocol.fkd_store, FKD_KIND)
        except DDKitError as e:
            raise keyed("evaluate.overrides.fkd_store", e) from None
        return
    cfg.relabel.check(data.num_classes, data.name, {"the fkd protocol": protocol.loss}, "evaluate.overrides.loss: kl")


_STAGE_DIRS = ("teacher", "distilled", "labels")  # atomic_dir refuses these when they hold something else
_RUN_FILES = ("config.json", "manifest.json", "report", "eval-*.json")


def evaluation_file(label_mode: str) -> str:
    """The name of a run folder's evaluation report of ``label_mode`` (one of :data:`_RUN_FILES`' ``eval-*.json``)."""
    return f"eval-{label_mode}.json"


def drop_evaluations(out: Path, keep: Sequence[str] = ()) -> None:
    """Remove the evaluation reports the run writes (``eval-<label mode>.json``) in the run folder ``out`` but those
    of the label modes ``keep``: a run that replaces another keeps no report of a label mode it no longer evaluates,
    nor (``keep`` empty) any report of a set it is about to replace, whether it finishes or fails later (as it
    removes the old run's ``manifest.json`` and ``report/`` first). Other ``eval-*.json`` there (``ddkit evaluate
    --out``) are the user's: kept."""
    for mode in set(LABEL_MODES) - set(keep):  # only the run's own names: a user's are kept
        if (path := out / evaluation_file(mode)).is_file():
            path.unlink(missing_ok=True)


def check_run_dir(out: Path) -> None:
    """Refuse an ``out`` that ``run`` would write into but that is not (the start of) a run folder:
    ``run`` replaces ``config.json``, ``report/`` and ``eval-*.json`` there (the reports of label modes it no longer
    evaluates, or of a set it replaces, removed: :func:`drop_evaluations`) and must never overwrite a user's files. A
    folder holding a finished run, or the stages of a killed one, is fine; one this process cannot write (or make) is
    refused (a :class:`~ddkit.artifacts.WriteFailure`), before any stage, and so is the current
    folder (``.``)."""
    refuse_current_folder(out, "a run folder holds only what the run writes")
    if holds_files(out, ignore_hidden=True) and folder_kind(out) != RUN_KIND:
        started = any(folder_kind(out / name) is not None for name in _STAGE_DIRS)
        foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in _STAGE_DIRS
                         and not (started and any(fnmatch.fnmatch(p.name, pat) for pat in _RUN_FILES)))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise DDKitError(f"output {str(out)!r} exists and is not a ddkit run folder (it holds {shown}); choose "
                             "another out / --out or remove it")
    check_writable(out, inside=True)


@stage_modes()
def run(
    cfg: RunConfig | dict,
    progress_factory: Callable[[str], Callable[[int, int, dict], None] | None] | None = None,
    eval_progress: Callable[[int, int, dict], None] | None = None,
) -> dict[str, Any]:
    """Chain the stages into ``cfg.out`` (``cfg``: a :class:`RunConfig` or a dict of its settings, as a run's
    YAML file holds them); reuse every stage whose artifact matches. Returns a summary.

    ``progress_factory(stage)``: the ``progress(step, total, record)`` callback of the teacher, distill and
    relabel stages; ``eval_progress``: the evaluations' callback of the same form (``evaluate``'s
    ``progress``, ``record["stage"]`` naming each student). Older ddkit called ``eval_progress``
    ``(stage, epoch, total)``: one whose first parameter is named ``stage`` (or ``what``, ``label``, ...) is still
    called so, with a DeprecationWarning, until the next release."""
    from ddkit.distributed import resolve_device

    cfg = as_config(RunConfig, cfg)
    eval_progress = progress_form(eval_progress, "run", "eval_progress")
    pf = progress_factory or (lambda name: None)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    check_run_dir(out)
    data = load_dataset(cfg.dataset)
    log.info("dataset %s: %d train / %d test images, fingerprint %s", data.name, len(data.train), len(data.test),
             data.fingerprint)
    check_run(cfg, data)
    ddist.agree_settings({"run": cfg, "dataset": [data.fingerprint, data.normalisation]})
    # the whole run under one lock on its folder: a second run to this out refuses before it writes anything (its
    # teacher would replace this one's, which the evaluations record); a folder made here that the run leaves
    # empty (it failed) goes with the lock
    with writing(out, out):
        return _run_stages(cfg, data, out, device, pf, eval_progress)


def _run_stages(cfg: RunConfig, data: DataBundle, out: Path, device: torch.device,
                pf: Callable[[str], Callable[[int, int, dict], None] | None],
                eval_progress: Callable[[int, int, dict], None] | None) -> dict[str, Any]:
    """:func:`run`'s stages, into ``out``, which the run holds the lock of."""
    if ddist.current().is_main:
        # the run record says every stage is done; a run that stops (killed, or failing) after replacing a
        # stage must not leave the previous run's record beside it, read as a finished run by `ddkit show`
        (out / "manifest.json").unlink(missing_ok=True)
        # nor its report, which names the previous stages (written again once every stage is done)
        shutil.rmtree(out / "report", ignore_errors=True)
        # nor the evaluations of label modes this run does not evaluate (they would stay beside its set)
        drop_evaluations(out, cfg.evaluate.label_modes)
    resolved = recorded_config(cfg)
    summary: dict[str, Any] = {"out": str(out), "reused": [], "evaluations": []}

    teacher = None
    if cfg.teacher is not None:
        tdir = out / "teacher"
        teacher = saved_teacher(data, cfg.teacher, tdir, device)
        if teacher is not None:
            summary["reused"].append("teacher")
        else:
            teacher = train_teacher(data, cfg.teacher, tdir, device, progress=pf("teacher"))
        teacher.check_compatible(data)
        summary["teacher_accuracy"] = teacher.test_accuracy

    ddir = out / "distilled"
    want = distill_hash(cfg.distill, data, teacher)
    found = reusable_set(ddir, cfg.distill, data, teacher, want)
    # rank 0's decision on every rank: a rank that looks late may find the set rank 0 has just made (a method
    # without collectives saves at once), skip distill's collectives and leave the ranks in different ones
    if ddist.broadcast_object(isinstance(found, DistilledSet)):
        distilled = found if isinstance(found, DistilledSet) else DistilledSet.load(ddir)
        want = distilled.manifest["config_hash"]  # an older key it is reused by (reusable_set) keys its evaluations
        discard_work(ddir, want)
        summary["reused"].append("distilled")
    else:
        if ddist.current().is_main:  # they score the set that is replaced now: none stays beside the new one
            drop_evaluations(out)
        try:
            distilled = distill(data, cfg.distill, cfg.dataset, ddir, teacher, device, pf("distill"), resolved)
        except OutputBusy:  # the run's own stage folder, which is no --out the user gave: name the run's
            raise OutputBusy(out) from None

    protocols = cfg.evaluate.protocols()
    store = None
    if cfg.evaluate.makes_store:
        fkd = next(p for p in protocols if p.label_mode == "fkd")
        # with extra_teachers, by the ensemble that the evaluation labels with (the store's key names its teacher)
        reused, store = relabel_stage(out / "labels", distilled, labelling_teacher(fkd, teacher, device), cfg.relabel,
                                      fkd.train.epochs, device, pf("relabel"))
        if reused:
            summary["reused"].append("labels")
        protocols = cfg.evaluate.protocols(fkd_store=str(store.path))

    made_by = (distilled.manifest.get("teacher") or {}).get("weights_sha")
    for protocol in protocols:
        path = out / evaluation_file(protocol.label_mode)
        # hard labels ask no teacher (nor do their random subset and full-data reference): the evaluation is the same
        # whichever teacher the run has. Reports ddkit until 2026-12-07 wrote are reused too: their key named the
        # teacher in label mode hard as well (the run's, which its set records), and an FKD store by its legacy
        # identity (protocol_inputs); that key is computed only for a report there without the current one
        hard = protocol.label_mode == "hard"
        labels_with = None if hard else teacher
        fp = teacher.fingerprint if labels_with is not None else None
        key = evaluation_key(protocol, cfg.evaluate.seeds, want, fp)

        def keyed(r: dict, key: str = key, protocol: ProtocolConfig = protocol,
                  old_teacher: str | None = made_by if hard else fp) -> bool:
            return r.get("run_hash") == key or r.get("run_hash") == evaluation_key(
                protocol, cfg.evaluate.seeds, want, old_teacher, legacy=True)

        def alike(r: dict, path: Path = path) -> bool:
            """Whether report ``r`` was made with the torch thread count and under the CUDA settings, GPU and
            libraries (or on the device type) that this run's students train under: the key names none of them."""
            if why := evaluation_change(r.get("run"), device):
                log.info("evaluating %s again: %s", path.name, why)
            return not why

        # an edited number (a mean that is not its seeds') is a damaged report: evaluated again
        report = reusable_stage(lambda p=path, f=keyed: f(r := read_json(p)) and alike(r) and check_report(r, p),
                                path, "evaluating")
        if report:
            summary["reused"].append(path.name)
        else:
            report = evaluate(distilled, protocol, cfg.evaluate.seeds, data=data, teacher=labels_with, device=device,
                              progress=eval_progress, fkd_store=store if protocol.label_mode == "fkd" else None)
            report["run_hash"] = key
            if ddist.current().is_main:
                write_json(path, report)
        summary["evaluations"].append(report)
    if ddist.current().is_main:
        write_json(out / "config.json", resolved)
        write_report(out, distilled, summary["evaluations"], summary.get("teacher_accuracy"))
        manifest = base_manifest(RUN_KIND, resolved, cfg.distill.seed)
        manifest.update({"dataset": {"name": data.name, "fingerprint": data.fingerprint},
                         "teacher_accuracy": summary.get("teacher_accuracy"), "reused": summary["reused"],
                         "stages": {"teacher": "teacher" if teacher is not None else None, "distilled": "distilled",
                                    "labels": "labels" if store is not None else None,
                                    "evaluations": [evaluation_file(p.label_mode) for p in protocols],
                                    "report": "report"},
                         "evaluations": summary["evaluations"]})
        write_json(out / "manifest.json", manifest)
    return summary


#: method options that name artifacts on disk (as distill_hash reads them: by content), recorded absolute
OPTION_PATHS = ("extra_teachers", "experts")


def recorded_distill(cfg: DistillConfig) -> dict:
    """``cfg`` as a set records it: the paths its method options name (:data:`OPTION_PATHS`) absolute."""
    out = to_dict(cfg)
    out["options"] = recorded_paths(out["options"], OPTION_PATHS)
    return out


def recorded_options(method_cfg: Any) -> dict:
    """A method's resolved config as its set records it (``method.config``): the paths it names (:data:`OPTION_PATHS`)
    absolute, as ``config.distill.options`` holds them, and an on-the-fly expert recipe (``buffer``) that a given
    ``experts`` buffer leaves unused as null. The set's identity is not read from it."""
    out = recorded_paths(to_dict(method_cfg), OPTION_PATHS)
    if out.get("experts") is not None and "buffer" in out:
        out["buffer"] = None
    return out


def recorded_config(cfg: RunConfig) -> dict:
    """``cfg`` as a run records it (``config.json``, the manifests): every relative path in it (``dataset.path``,
    ``teacher.checkpoint``, a protocol YAML file, ``extra_teachers``, ``fkd_store``, a method's ``extra_teachers``
    and ``experts``) made absolute against the working folder the run read it from, and the protocol file's own
    relative ``extra_teachers`` recorded absolute in ``evaluate.overrides`` (:func:`recorded_overrides`), so the
    record runs again from any folder on the same files. Hashes do not change: they read those artifacts by
    content, not by path."""
    out = to_dict(cfg)
    out["dataset"] = to_dict(cfg.dataset.absolute())
    if out["teacher"] is not None:
        out["teacher"] = recorded_paths(out["teacher"], ("checkpoint",))
    out["distill"] = recorded_distill(cfg.distill)
    out["evaluate"]["protocol"] = recorded_protocol(cfg.evaluate.protocol)
    out["evaluate"]["overrides"] = recorded_overrides(cfg.evaluate.protocol, out["evaluate"]["overrides"])
    return out


def reusable_set(ddir: Path, cfg: DistillConfig, data: DataBundle, teacher: Teacher | None, want: str) -> Any:
    """The distilled set saved at ``ddir`` if it was made with these settings (falsy otherwise, as
    :func:`reusable_stage`): its ``config_hash`` is ``want`` (:func:`distill_hash`), or, for a set that does not
    depend on the teacher, the key ddkit until 2026-12-07 gave it with the teacher it records (the same images: kept,
    and keyed as they are), unless the set holds soft labels (a trajectory method's own) and the run has another
    teacher: label mode stored would take the recorded one for theirs."""

    def matches() -> bool:
        man = read_json(ddir / "manifest.json")
        got, made_by = man.get("config_hash"), (man.get("teacher") or {}).get("weights_sha")
        if got == want:
            return True
        soft = (man.get("files") or {}).get("soft_labels")
        return (not reads_teacher(cfg) and isinstance(made_by, str)
                and (not soft or made_by == getattr(teacher, "fingerprint", made_by))
                and got == distill_hash(cfg, data, made_by, teacher_free=False))

    return reusable_stage(lambda: matches() and DistilledSet.load(ddir), ddir / "manifest.json", "distilling")


def reusable_stage(load: Callable[[], Any], marker: Path, redo: str) -> Any:
    """``load()`` (falsy when the stage there has other settings) if ``marker`` exists; a stage that cannot
    be read (damaged) is falsy too, with a warning that the run is ``redo``-ing it."""
    if not marker.is_file():
        return None
    try:
        return load()
    except DDKitError as e:
        log.warning("%s; %s again", str(e).split(";")[0], redo)
        return None


def relabel_stage(path: Path, distilled: DistilledSet, teacher: Teacher, spec: RelabelSpec, protocol_epochs: int,
                  device, progress: Callable[[int, int, dict], None] | None = None) -> tuple[bool, SoftLabelStore]:
    """Make ``distilled``'s FKD store at ``path`` (:meth:`RelabelSpec.make`; finished epochs survive a kill
    in a hidden ``.<name>.partial`` beside it), unless the store there has these settings for this set
    and teacher. Returns whether it was reused, and the store (saved at ``path`` and loaded from there,
    memory-mapped, on every rank, for the evaluation, which then does not read it again)."""
    key = spec.key(distilled, teacher, protocol_epochs)
    work = hidden_path(path, ".partial")
    found = None
    if (path / "manifest.json").is_file():
        try:  # the whole store: a damaged one is labelled again, not replayed (or refused) at evaluation
            found = SoftLabelStore.load(path)
            found = found if found.manifest.get("config_hash") == key else None
        except DDKitError as e:
            log.warning("%s; labelling the set again", str(e).split(";")[0])
    if found is None:  # a folder relabel could not replace fails now, not after every epoch is labelled
        try:
            check_output_dir(path, FKD_KIND)
        except DDKitError as e:
            raise DDKitError(f"{str(e).split(';')[0]}; the run writes its FKD labels there: remove it, or give the run "
                             "another out") from None
    if ddist.broadcast_object(found is not None):  # rank 0's decision on every rank: relabel is a collective
        if ddist.current().is_main:  # a kill between the save and the removal below leaves them
            shutil.rmtree(work, ignore_errors=True)
        return True, found if found is not None else SoftLabelStore.load(path)
    # streamed into path epoch by epoch, never whole in memory; every rank gets it loaded from there; under the
    # work folder's lock, as `ddkit relabel` takes it: one relabelling into this path at a time
    with writing(work, path):
        store = spec.make(distilled, teacher, protocol_epochs, device, progress, work_dir=work, out=path,
                          manifest_extra={"config_hash": key})
        if ddist.current().is_main:
            shutil.rmtree(work, ignore_errors=True)
    return False, store


def _pct_marked(x: dict) -> str:
    """A summary's mean accuracy in percent, marked as the tables do where students diverged (NaN/inf outputs)."""
    return f"{100 * x['mean']:.2f}%{diverged_mark(x)}"


def write_report(out: Path, distilled: DistilledSet, reports: list[dict], teacher_acc: float | None) -> Path:
    """``report/``: the grid PNG, every eval JSON and a short markdown summary."""
    rdir = out / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    if distilled.path is not None and (Path(distilled.path) / "preview.png").is_file():
        copy_file(Path(distilled.path) / "preview.png", rdir / "distilled-grid.png")
    write_json(rdir / "eval.json", {"schema_version": 1, "kind": "evaluation-set", "evaluations": reports})
    man = distilled.manifest
    lines = [
        f"# ddkit report: {man['method']['name']} on {man['dataset']['name']}, IPC {ipc_text(man['ipc'])}",
        "",
        f"- dataset fingerprint `{man['dataset']['fingerprint']}`, {len(man['dataset']['classes'])} classes, "
        f"images {man['dataset']['image_shape']}",
        f"- distilled set: {man['num_images']} images, {man['bytes']['images']:,} bytes of images, "
        f"{man['bytes']['labels']:,} bytes of labels",
    ]
    if teacher_acc is not None:
        lines.append(f"- teacher test accuracy: {100 * teacher_acc:.2f}%")
    lines += ["", "![distilled set](distilled-grid.png)", "", "## Test accuracy (%)", "", "```",
              format_table(reports), "```", ""]
    for rep in reports:
        res = rep["results"]
        line = (f"- label mode **{rep['config']['label_mode']}** (protocol `{rep['protocol_hash']}`): distilled "
                f"{_pct_marked(res['distilled'])}")
        if "random" in res:
            # as in the bench: no IOR from students that diverged (their NaN/inf outputs count as wrong)
            diverged = res["distilled"].get("diverged") or res["random"].get("diverged")
            ior = "–" if diverged else f"{100 * (res['distilled']['mean'] - res['random']['mean']):+.2f}"
            line += f", random subset {_pct_marked(res['random'])} (IOR {ior})"
        if "full" in res:
            line += f", full data {_pct_marked(res['full'])}"
        lines.append(line)
    lines.append("")
    lines.append(f"Produced by ddkit {man['versions']['ddkit']} (torch {man['versions']['torch']}).")
    write_text(rdir / "summary.md", "\n".join(lines) + "\n")
    return rdir


def demo_config(out: str = "runs/demo", data_path: str | None = None, device: str = "auto",
                precision: str | None = None) -> RunConfig:
    """The demo: Fashion-MNIST, a small teacher, DM at IPC 10, hard and teacher-soft evaluation.

    About 15 minutes on 2 CPU cores, teacher included (README). ``configs/fashion-mnist/demo.yaml``
    holds the same run as a file.
    """
    from ddkit.config import load_yaml

    data = load_yaml(Path(__file__).parent / "presets" / "demo.yaml")
    data["out"] = out
    data["device"] = device
    if data_path:
        data["dataset"]["path"] = data_path
    if precision is not None:  # teacher and students (the random baseline and full reference too)
        data["teacher"]["train"]["precision"] = precision
        data["evaluate"]["overrides"]["train"]["precision"] = precision
    return from_dict(RunConfig, data)
