"""Train fresh students on a distilled set, a same-IPC random real subset and the full data.

Every number comes from one :class:`ProtocolConfig` and one list of seeds. Under ``torchrun`` the
students (the distilled set's and each random subset's, per seed) are spread over ranks (each is
trained whole by one rank, so results equal the single-process run exactly) and the full-data
reference is trained data-parallel.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ddkit import cache as ddcache
from ddkit import distributed as ddist
from ddkit.artifacts import (
    WriteFailure,
    artifact_folder,
    base_manifest,
    build_lock,
    check_output_file,
    check_writable,
    file_kind,
    hidden_path,
    read_json,
    recorded_path,
    remove_unused_lock,
    tensor_bytes,
    write_json,
)
from ddkit.artifacts import (
    cache_dir as cache_dir_of,
)
from ddkit.cache import ACCURACY_SCHEMA  # of the accuracy entries written here (bump it there)
from ddkit.config import config_hash, from_dict, sorted_seeds, to_dict
from ddkit.data.augment import build_augment, warn_digit_flips
from ddkit.data.base import DataBundle, DatasetConfig, ImageSet, check_bundle, load_dataset, other_data_fix
from ddkit.determinism import device_numerics, global_rng, made_under, stage_modes
from ddkit.distilled import DistilledSet
from ddkit.errors import DDKitError, caller_stacklevel
from ddkit.evaluate.metrics import accuracy_problem, summary_problem
from ddkit.evaluate.protocol import UNLABELLED_BY_ENSEMBLE, ProtocolConfig, resolve_protocol
from ddkit.evaluate.tables import format_table  # noqa: F401  (defined here before)
from ddkit.methods.random import stratified_indices
from ddkit.models import create_model
from ddkit.training import TeacherBN, TrainConfig, keeps_teacher_modes, omit_running_bn, train_classifier

if TYPE_CHECKING:
    from ddkit.labels import SoftLabelStore
    from ddkit.teacher import Teacher

log = logging.getLogger(__name__)

# progress(step, total, record), as train_teacher, distill and relabel call theirs: after every epoch of every
# student, step/total its epochs, record["stage"] naming the student ("distilled, seed 0", "random subset, seed 0",
# "full data, seed 0"; older ddkit called progress(stage, epoch, total))
Progress = Callable[[int, int, dict], None]
_OLD_FIRST = ("what", "label", "stage", "name", "desc", "description", "title")  # first parameters of the old form
RANDOM_SEED_OFFSET = 7919  # random-baseline subsets use seed + offset, never the distilled set's own draw


def progress_form(progress: Callable | None, call: str, name: str) -> Progress | None:
    """The callback ``progress`` that the library call ``call`` takes as its argument ``name``, as a ``(step, total,
    record)`` callback; one of the old ``(what, done, total)`` form, told by its first parameter's name (``what``,
    ``stage``, or another name of a label: :data:`_OLD_FIRST`), wrapped with a DeprecationWarning that names the
    caller's line (the first outside ddkit)."""
    try:
        params = list(inspect.signature(progress).parameters) if progress is not None else []
    except (TypeError, ValueError):  # a builtin without a signature: taken for the new form
        params = []
    if not params or params[0] not in _OLD_FIRST:
        return progress
    warnings.warn(f"{call}({name}=) now calls {name}(step, total, record), record['stage'] naming the stage; the old "
                  f"form {name}(what, done, total) goes in the next release: rename the callback's parameters and read "
                  "the name from the record", DeprecationWarning, stacklevel=caller_stacklevel())
    return lambda step, total, record: progress(record["stage"], step, total)


class DivergedAccuracy(float):
    """The test accuracy of a student whose outputs were NaN or inf on some test images (counted as wrong):
    it diverged. Counted as ``diverged`` in its summary (:func:`_summary`). A random baseline's cache entry holds a
    bare accuracy, so a diverged one is not cached (it trains again); the full-data reference's entry holds its
    summary, so it is cached with its ``diverged`` count."""


def _score(result) -> float:
    """The test accuracy of a :class:`~ddkit.training.TrainResult`: a :class:`DivergedAccuracy` if it diverged."""
    return (DivergedAccuracy if result.nonfinite else float)(result.test_accuracy)


def _summary(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n) if n else float("nan")
    # students that diverged: only where some did, so the reports of the others stay as they were
    diverged = sum(isinstance(v, DivergedAccuracy) for v in values)
    return {"per_seed": [float(v) for v in values], **({"diverged": diverged} if diverged else {}),
            "mean": mean, "std": std, "n": n}


@torch.no_grad()
def teacher_logits(teacher, images: torch.Tensor, mean, std, device, batch_size: int = 512, *,
                   bn: TeacherBN = "running", bn_batch: int | None = None, seed: int = 0,
                   name: str = "teacher_bn") -> torch.Tensor:
    """Teacher logits on un-augmented pixel-space images (static soft labels); ``name``: the setting of ``bn``,
    for errors.

    ``bn="batch"``: BatchNorm statistics of groups of ``bn_batch`` images (``None``: all images at
    once, one forward pass), the groups cut from a permutation seeded with ``seed``
    (:func:`~ddkit.training.label_groups`); ``running``: the teacher's running statistics.
    """
    from ddkit.training import normalizer, teacher_labels, to_float

    norm = normalizer(mean, std, device)
    return teacher_labels(teacher.model.to(device).eval(), lambda idx: norm(to_float(images[idx], device)), len(images),
                          batch_size, bn, bn_batch, torch.Generator().manual_seed(seed), name)


def _train_fkd(distilled: DistilledSet, store, data: DataBundle, protocol: ProtocolConfig, seed: int, device,
               progress=None) -> float:
    from ddkit.labels import train_with_store

    c, h, _ = data.image_shape
    with global_rng(seed, device):  # initial weights, then dropout, from the seed: see _train_student
        model = create_model(protocol.student, c, data.num_classes, h, **protocol.student_options)
        return _score(train_with_store(model, distilled, store, protocol, seed, device, test=data.test,
                                       progress=progress))


def _relabel_like(store, subset: ImageSet, data: DataBundle, teacher, seed: int, device, out: Path | None = None):
    """FKD labels for a random-baseline subset with the settings of ``store``. Under torchrun each
    rank labels its own seeds' subsets, so the relabel runs whole on this rank (no collectives).

    ``out``: a folder named by everything the labels depend on (the random subset's cache entry), which
    the labels are streamed into, one epoch at a time, instead of being made in memory; finished epochs
    survive a kill in ``.<name>.partial`` beside it, and labels already whole there (a student stopped
    before its accuracy was cached) are used again. The caller removes ``out`` once the student is done.
    """
    from ddkit.labels import SoftLabelStore, relabel

    ds = DistilledSet(subset.images, subset.labels, {"dataset": data.describe()})
    m = store.manifest
    cutmix = m.get("cutmix") or {"prob": 0.0, "alpha": 1.0}

    def label(**where) -> SoftLabelStore:  # as the store was made; ``where``: into the cache (work_dir, out)
        return relabel(ds, teacher, store.epochs, m["augment"]["spec"], dict(m["augment"]["options"]), cutmix["prob"],
                       seed, store.top_k, device, cutmix_alpha=cutmix["alpha"], teacher_bn=store.teacher_bn,
                       teacher_bn_batch=store.teacher_bn_batch, **where)

    with ddist.single_process():
        if out is not None:
            work = hidden_path(out, ".partial")
            try:
                with build_lock(out):  # two evaluations that need the same random subset's labels make them once
                    if (out / "manifest.json").is_file():
                        try:
                            labels = SoftLabelStore.load(out)
                            labels.check_matches(ds, teacher)
                            # epochs a kill between the save and their removal left: under this lock no one
                            # else writes them, and nothing would remove them once the student is cached
                            shutil.rmtree(work, ignore_errors=True)
                            return ds, labels
                        except DDKitError as e:
                            log.warning("%s; labelling the random subset again", str(e).split(";")[0])
                    try:
                        labels = label(work_dir=work, out=out)
                    except (OSError, WriteFailure) as exc:
                        if _cache_failure(exc, out, work):  # given up for memory: no epochs left on a full disk
                            shutil.rmtree(work, ignore_errors=True)
                        raise
                    shutil.rmtree(work, ignore_errors=True)
                    return ds, labels
            except (OSError, WriteFailure) as exc:
                if not _cache_failure(exc, out, work):
                    raise
                # a cache that cannot be written (read-only, full): the labels are made in memory
                cause = exc.strerror if isinstance(exc, OSError) else exc.cause
                log.warning("cannot keep the random subset's labels in %s: %s; labelling it in memory", out,
                            cause or exc)
        return ds, label()


def _cache_failure(exc: OSError | WriteFailure, out: Path, work: Path) -> bool:
    """Whether ``exc`` is a failed write of the cache entry ``out`` (or of its work folder ``work``, or of
    the folders and hidden files made for them), which labels made in memory get round, and not another
    error, which they would only meet again. An OSError that names no file is a write (the only I/O of a
    relabel into a folder)."""
    where = exc.path if isinstance(exc, WriteFailure) else exc.filename
    if where is None:
        return isinstance(exc, OSError)
    where, out, work = (Path(os.path.abspath(os.fsdecode(p))) for p in (where, out, work))
    return (where in out.parents or where.parent == out.parent
            or any(where == p or p in where.parents for p in (out, work)))


def _train_student(
    train_set: ImageSet,
    data: DataBundle,
    protocol: ProtocolConfig,
    cfg: TrainConfig,
    seed: int,
    device,
    label_mode: str,
    teacher=None,
    stored=None,
    distributed: bool = False,
    progress: Callable[[int, int, dict], None] | None = None,
    transform=None,
) -> float:
    warn_digit_flips(build_augment(cfg.augment, **cfg.augment_options), data.name, STUDENT_AUGMENT_KEY)
    c, h, _ = data.image_shape
    # the initial weights come from the global generators seeded with ``seed``, and so do the dropout masks of
    # the training that follows: both under the lock (other threads' stages wait), the caller's states kept
    with global_rng(seed, device):
        model = create_model(protocol.student, c, data.num_classes, h, **protocol.student_options)
        result = train_classifier(
            model, train_set, data.mean, data.std, cfg, seed=seed, device=device,
            label_source=label_mode, loss=protocol.loss if label_mode != "hard" else "ce",
            temperature=protocol.temperature, teacher=teacher.model if teacher is not None else None,
            teacher_bn=protocol.teacher_bn, teacher_bn_batch=protocol.teacher_bn_batch,
            stored_targets=stored, test=data.test, distributed=distributed, progress=progress, transform=transform,
        )
    return _score(result)


# where a protocol's student augmentation options are set: evaluate's own key, and a run's and a bench's
STUDENT_AUGMENT_KEY = ("train.augment_options (in a run: evaluate.overrides.train.augment_options; in a bench: "
                       "overrides.train.augment_options)")


# protocol fields that cannot change a student of the set or of its random subset: whether the baselines run,
# the full data's epochs and seeds, and the fkd store's path (the store's settings or content key the entry instead)
_NOT_STUDENT = frozenset({"random_baseline", "full_reference", "full_epochs", "full_seeds", "fkd_store"})


def _student_key(protocol: ProtocolConfig, data: DataBundle, teacher, seed: int, lr: float | None, device) -> dict:
    """What decides the accuracy of one student of ``protocol`` besides what it trains on, for the keys of the
    cached students: the protocol without the fkd store path, the test batch size and the fields that only say
    what else ``evaluate`` runs, the data and its normalisation, the teacher (not in label mode hard), the seed,
    the learned lr it trains with under ``learned_lr``, and where it trains (:func:`trained_on`)."""
    proto = {k: v for k, v in protocol.identity().items() if k not in _NOT_STUDENT}
    proto["train"] = {k: v for k, v in proto["train"].items() if k != "eval_batch_size"}
    return {"protocol": proto, "data": data.fingerprint, "norm": data.normalisation, "seed": seed,
            **trained_on(device),
            "teacher": teacher.fingerprint if teacher is not None and protocol.label_mode != "hard" else None,
            **({"lr": lr} if lr is not None else {})}


def random_cache_path(protocol: ProtocolConfig, data: DataBundle, teacher, store, ipc: int, seed: int,
                      cache_dir: str | Path | None, lr: float | None = None, labeller: StoredLabeller | None = None,
                      device: str | torch.device = "cpu") -> Path:
    """Cache file of one random-baseline student: keyed by everything that decides its accuracy
    (:func:`_student_key`, the IPC, FKD store settings and how stored labels are made)."""
    settings = None
    if store is not None:
        m = store.manifest
        settings = omit_running_bn({"epochs": store.epochs, "augment": m.get("augment"), "cutmix": m.get("cutmix"),
                                    "top_k": store.top_k, "teacher_bn": store.teacher_bn,
                                    "teacher_bn_batch": store.teacher_bn_batch})
    key = config_hash({**_student_key(protocol, data, teacher, seed, lr, device), "ipc": ipc, "fkd": settings,
                       **({"stored_labels": labeller.key} if labeller is not None else {})})
    return (Path(cache_dir) if cache_dir else cache_dir_of()) / "random-baseline" / f"{key}.json"


def student_cache_path(protocol: ProtocolConfig, data: DataBundle, teacher, store, distilled: DistilledSet,
                       seed: int, cache_dir: str | Path | None, lr: float | None = None,
                       device: str | torch.device = "cpu") -> Path:
    """Cache file of one student of the distilled set: keyed by everything that decides its accuracy
    (:func:`_student_key`) and what it trains from: the set's images and labels by content, its soft labels in
    label mode stored, the FKD store's identity in label mode fkd (in these two modes not by the teacher, which
    only labels the random subset). Not by the other seeds evaluated with it, nor
    by the baselines beside it: evaluating more seeds, or the same seeds with or without a baseline, trains only
    the students not cached yet."""
    from ddkit.labels.fkd import distilled_fingerprint, set_fingerprint, store_identity

    labels = None
    if protocol.label_mode == "stored" and distilled.soft_labels is not None:  # its rows beside their classes
        labels = set_fingerprint(distilled.soft_labels, distilled.labels)
    if protocol.label_mode in ("stored", "fkd"):
        # the set's student learns from its soft labels or the FKD store (both keyed here), never asks the teacher:
        # a teacher passed only to label the random subset beside it keys no other student of the set
        teacher = None
    key = config_hash({**_student_key(protocol, data, teacher, seed, lr, device),
                       "set": distilled_fingerprint(distilled), "soft_labels": labels,
                       "fkd_store": store_identity(store) if store is not None else None})
    return (Path(cache_dir) if cache_dir else cache_dir_of()) / "distilled-student" / f"{key}.json"


def trained_on(device) -> dict[str, Any]:
    """By what and where a cached student trains, for its key and its entry: the revision of ddkit's student training
    (:data:`~ddkit.cache.STUDENT_REVISION`, from 2 on), the torch thread count (float sums depend on it; a bench
    evaluates again under another one, and the report records it) and the device type (cpu, cuda); on a CUDA device
    also its kernels' settings, GPU model and library versions (:func:`~ddkit.determinism.cuda_numerics`). Nothing
    more on the CPU: the keys made before these were recorded stay valid."""
    return {**ddcache.revised(ddcache.STUDENT_REVISION), **made_under(device)}


@dataclasses.dataclass
class StoredLabeller:
    """How a set's stored soft labels were made, where not by the evaluation's teacher with the
    protocol's BatchNorm mode: the random subset beside the set is labelled the same way. ``members``:
    a CV-DD committee's other teachers (``path``, ``weights_sha``), loaded only when a random subset
    is labelled (a cached one needs none); ``weights``: the votes, the evaluation's teacher first;
    ``bn``/``bn_batch``: the BatchNorm mode. ``key`` enters the random subset's cache entry."""

    teacher: Any
    members: list[dict]
    weights: list[float]
    bn: TeacherBN
    bn_batch: int | None
    loaded: dict[int, Any] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> dict:
        return {"teachers": [self.teacher.fingerprint] + [m["weights_sha"] for m in self.members],
                "weights": self.weights, "bn": self.bn, "bn_batch": self.bn_batch}

    def _member(self, i: int, data: DataBundle, device):
        from ddkit.teacher import Teacher

        if i not in self.loaded:
            m = self.members[i]
            if m["path"] is None or not Path(m["path"]).exists():
                raise DDKitError(f"this set's stored soft labels come from a committee with teacher {m['path']!r}, "
                                 "which is not there; the random subset beside it is labelled by the same committee: "
                                 "restore that teacher, or use label_mode teacher")
            member = Teacher.load(m["path"], device)
            if not member.made(m["weights_sha"]):
                raise DDKitError(f"committee teacher {m['path']!r} no longer holds the weights that labelled this set "
                                 f"({m['weights_sha']}); restore them, or use label_mode teacher")
            self.loaded[i] = member
        self.loaded[i].check_compatible(data)  # class names and image shape: cheap, for loaded members too
        return self.loaded[i]

    def __call__(self, images: torch.Tensor, data: DataBundle, device, seed: int) -> torch.Tensor:
        from ddkit.methods.cvdd import committee_logits

        teachers = [self.teacher] + [self._member(i, data, device) for i in range(len(self.members))]
        return committee_logits(teachers, images, self.weights, data.mean, data.std, device, bn=self.bn,
                                bn_batch=self.bn_batch, seed=seed)


def stored_labeller(distilled: DistilledSet, teacher, protocol: ProtocolConfig, device) -> StoredLabeller | None:
    """:class:`StoredLabeller` of ``distilled``'s stored soft labels when they came from a committee
    (CV-DD), or from the teacher with other BatchNorm statistics than the protocol's ``teacher_bn``
    (``soft_labels_bn``); None when the protocol's mode is the set's."""
    from ddkit.teacher import Teacher

    man = distilled.manifest
    rec = man.get("meta", {}).get("soft_labels")
    rec = rec if isinstance(rec, dict) else {}  # RDED records a description: the teacher's logits
    if rec.get("kind") == "committee":
        members, loaded = (rec.get("teachers") or [None])[1:], {}
        if "teachers" not in rec:  # sets made before the members were recorded: their extra_teachers, as given
            members = []
            for i, path in enumerate(man["method"]["config"].get("extra_teachers") or []):
                if not Path(path).exists():
                    log.warning("this set's committee teacher %r is not there (older sets record it as given); its "
                                "random subset is labelled by the main teacher alone", path)
                    return None
                loaded[i] = Teacher.load(path, device)  # loaded for its fingerprint: kept, not read again
                members.append({"path": path, "weights_sha": loaded[i].fingerprint})
        return StoredLabeller(teacher, members, [float(w) for w in rec["weights"]], rec.get("teacher_bn", "running"),
                              rec.get("teacher_bn_batch"), loaded)
    distill = man.get("config", {}).get("distill") or {}
    bn, bn_batch = distill.get("soft_labels_bn", "running"), distill.get("soft_labels_bn_batch")
    if (bn, bn_batch) != (protocol.teacher_bn, protocol.teacher_bn_batch):
        return StoredLabeller(teacher, [], [1.0], bn, bn_batch)
    return None


def labelling_teacher(protocol: ProtocolConfig, teacher, device):
    """The teacher that labels in ``protocol``'s label mode: ``teacher``, or with ``extra_teachers`` in label
    modes teacher and fkd the equal-weight ensemble of it and them (:func:`evaluate` labels with it; ``ddkit run``
    and ``ddkit bench`` make fkd stores with it, so a store's teacher is the evaluation's)."""
    if not protocol.extra_teachers or protocol.label_mode in UNLABELLED_BY_ENSEMBLE or teacher is None:
        return teacher
    return ensemble_with(teacher, protocol.extra_teachers, device)


def ensemble_with(teacher, extra_teachers: list[str], device):
    """The equal-weight ensemble of ``teacher`` and the teacher artifacts at ``extra_teachers`` (folders), as
    :func:`labelling_teacher` labels with (``ddkit relabel --extra-teacher`` makes its FKD store with it)."""
    from ddkit.teacher import Teacher, teacher_ensemble

    for p in extra_teachers:
        if not Path(p).exists():
            raise DDKitError(f"extra teacher {p!r} not found; give the folder of a `ddkit teacher` artifact")
    return teacher_ensemble([teacher] + [Teacher.load(p, device) for p in extra_teachers])


def check_random_ipc(data: DataBundle, ipc: int, fix: str = "--set random_baseline=false") -> None:
    """Refuse a random baseline of ``ipc`` images per class that a class of ``data`` is too small for (a method
    with ``ipc_within_class_size = False`` makes more than the data holds): its subset would hold fewer images
    than the set. ``fix``: how the caller's user turns the baseline off."""
    counts = data.train.class_counts(data.num_classes)
    c = int(counts.argmin())
    if ipc > int(counts[c]):
        raise DDKitError(f"the random baseline beside an ipc-{ipc} set needs {ipc} training images per class, but "
                         f"class {data.classes[c]!r} has {int(counts[c])}, so it would train on fewer images than the "
                         f"set; set random_baseline: false ({fix}) to evaluate the set without it")


def _random_baseline(data: DataBundle, protocol: ProtocolConfig, teacher, store, ipc: int, seed: int, device,
                     progress=None, train: TrainConfig | None = None, transform=None,
                     labeller: StoredLabeller | None = None, fkd_out: Path | None = None) -> float:
    """Accuracy of the protocol's student trained on a stratified random subset of ``ipc`` per class
    (label mode fkd: its labels are made in ``fkd_out``, see :func:`_relabel_like`, or in memory)."""
    idx = stratified_indices(data.train.labels, data.num_classes, ipc, seed + RANDOM_SEED_OFFSET)
    subset = data.train.subset(idx)
    if store is not None:
        rds, rstore = _relabel_like(store, subset, data, teacher, seed + RANDOM_SEED_OFFSET, device, fkd_out)
        return _train_fkd(rds, rstore, data, protocol, seed, device, progress)
    stored = None
    if protocol.label_mode == "stored" and labeller is not None:  # as the set's own labels were made
        stored = labeller(subset.images, data, device, seed + RANDOM_SEED_OFFSET)
    elif protocol.label_mode == "stored":
        stored = teacher_logits(teacher, subset.images, data.mean, data.std, device, bn=protocol.teacher_bn,
                                bn_batch=protocol.teacher_bn_batch, seed=seed + RANDOM_SEED_OFFSET)
    return _train_student(subset, data, protocol, train or protocol.train, seed, device, protocol.label_mode, teacher,
                          stored, progress=progress, transform=transform)


def student_transform(protocol: ProtocolConfig, data: DataBundle):
    """The fixed map of the students' normalised images under ``protocol``: its ZCA whitening fitted on
    ``data``'s training pixels (deterministic; one fit per data, normalisation and regularisation in
    this process), or None."""
    if not protocol.zca:
        return None
    key = (data.fingerprint, tuple(data.mean), tuple(data.std), protocol.zca_reg)
    if key not in _ZCA_FITS:
        from ddkit.data.zca import ZCA

        log.info("fitting the protocol's ZCA whitening on %d training images", len(data.train))
        _ZCA_FITS.clear()  # one dataset at a time: a 784-dim whitening is 5 MB, a 3072-dim one 75 MB
        _ZCA_FITS[key] = ZCA.fit(data.train, data.mean, data.std, protocol.zca_reg)
    return _ZCA_FITS[key]


_ZCA_FITS: dict[tuple, Any] = {}
# that label_mode stored leaves out extra_teachers: said once per set and protocol (by their config hashes, a set
# built by hand by the object), so a later evaluation of another set or protocol in the same process says it too,
# and one repeated (another seed) does not
_STORED_EXTRAS_SAID: set[tuple] = set()


def full_reference(
    data: DataBundle, protocol: ProtocolConfig, seeds: list[int], device, cache_dir: Path | None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Hard-label accuracy of the protocol's student trained on the whole training set (cached, keyed with
    :func:`trained_on` too) from the ``full_seeds`` smallest of ``seeds`` (in whatever order they are given);
    on whitened images under a ``zca`` protocol."""
    info = ddist.current()
    cfg = protocol.full_train()
    use = sorted_seeds(seeds, "full_reference seeds")[: protocol.full_seeds]
    # data-parallel training differs for BatchNorm students, so the number of ranks keys the entry too
    # (left out for one process: entries made before it was recorded keep their key)
    train = {k: v for k, v in to_dict(cfg, identity=True).items() if k != "eval_batch_size"}
    if cfg.ema_decay > 0:  # as in ProtocolConfig.identity: the EMA's decay warm-up changed its numbers
        train["ema_warmup"] = True
    zca = {"zca": {"reg": protocol.zca_reg}} if protocol.zca else {}
    # a plugin student's source, as in ProtocolConfig.identity: an edited model trains its reference again
    source = {"student_source": sha} if (sha := protocol.identity().get("student_source")) else {}
    key = config_hash({"student": protocol.student, "options": protocol.student_options, "train": train,
                       "data": data.fingerprint, "norm": data.normalisation, "seeds": use,
                       **({"world": info.world_size} if info.enabled else {}), **zca, **source, **trained_on(device)})
    cache = (Path(cache_dir) if cache_dir else cache_dir_of()) / "full-reference" / f"{key}.json"
    # one builder per entry: torchrun ranks of `ddkit bench` scoring other sets with the same student, or
    # two runs sharing the cache, would otherwise train the same whole-data students side by side
    with build_lock(cache):
        cached = _cache_entry(cache, "result", dict, summary_problem)
        # ranks that disagree would take different paths: one returns, the others train in collectives
        if ddist.agree_found(cached is not None, f"the full-data reference {cache.name}", cache.parent):
            log.info("full-data reference from cache %s", cache)
            return cached
        accs = []
        for s in use:
            cb = (lambda e, n, r, s=s: progress(e, n, {**r, "stage": f"full data, seed {s}"})) if progress else None
            accs.append(_train_student(data.train, data, protocol, cfg, s, device, "hard", distributed=info.enabled,
                                       progress=cb, transform=student_transform(protocol, data)))
        result = _summary(accs)
        result.update({"epochs": cfg.epochs, "key": key})
        if info.is_main:
            _write_cache(cache, {"schema_version": ACCURACY_SCHEMA, "kind": "full-reference-cache", "result": result,
                                 **trained_on(device)},
                         "the full-data reference")
    return result


def _write_cache(path: Path, record: dict[str, Any], what: str) -> None:
    """Cache ``what`` at ``path``; a cache that cannot be written (read-only, full) only costs later runs the
    training again, so it is a warning: the students trained here still make their report."""
    try:
        write_json(path, record)
    except (OSError, DDKitError) as exc:
        reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)
        log.warning("cannot cache %s in %s: %s; later runs will train it again", what, path, reason)


def check_report_out(out: str | Path) -> None:
    """Refuse an output path for an evaluation report that :func:`write_json` could not write (also in a folder
    this process cannot write: a read-only set's) or that holds something else than an evaluation report (a
    user's file, another artifact's manifest). Under torchrun only rank 0 writes the report: it tries the folder,
    and every rank stops on its verdict (a rank of another node that cannot write there does not stop alone)."""
    check_output_file(out)
    path = Path(out)
    if path.exists() and file_kind(path) != "evaluation":
        raise DDKitError(f"output {str(path)!r} exists and is not a ddkit evaluation report; choose another --out or "
                         "remove it")
    check_writable(path)


def _other_views(train: TrainConfig, store) -> tuple[str, str] | None:
    """The store's and the protocol's augmentation, as text, when they differ (label mode fkd replays the
    store's views, so the protocol's are not used; the store's CutMix is FKD's own recipe, not compared);
    None when they agree."""
    aug = store.manifest["augment"]
    theirs, mine = (aug["spec"], aug.get("options") or {}), (train.augment, train.augment_options)
    if build_augment(theirs[0], **theirs[1]) == build_augment(mine[0], **mine[1]):
        return None
    return f"{theirs[0]} {theirs[1]}", f"{mine[0]} {mine[1]}"


@stage_modes()
@keeps_teacher_modes
def evaluate(
    distilled: DistilledSet | str | Path,
    protocol: ProtocolConfig | str | Path,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    data: DataBundle | None = None,
    teacher: Teacher | str | Path | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    out: str | Path | None = None,
    progress: Progress | None = None,
    fkd_store: SoftLabelStore | None = None,
) -> dict[str, Any]:
    """Evaluate ``distilled`` under ``protocol`` (a config, a preset name or a YAML file) for every
    seed, beside a random subset and full data; ``teacher``: a Teacher or its artifact folder;
    ``fkd_store``: label mode fkd's store already in memory: the one saved at ``protocol.fkd_store``
    (which is then not read again; a run passes the store it has just made or checked), or, with no
    ``protocol.fkd_store``, any store of this set (one :func:`~ddkit.labels.relabel` returned, saved or
    not); the report records its identity (``fkd_store``). ``progress(step, total, record)`` after every
    epoch of every student (as ``train_teacher``, ``distill`` and ``relabel`` call theirs): ``step`` of
    ``total`` epochs, ``record["stage"]`` naming the student (``"distilled, seed 0"``, ``"random subset,
    seed 0"``, ``"full data, seed 0"``). Older ddkit called ``progress(stage, epoch, total)``: a callback whose
    first parameter is named ``stage`` (or ``what``, ``label``, ...) is still called so, with a DeprecationWarning,
    until the next release.

    ``seeds`` may come in any order: the report lists them sorted, and the full-data reference trains from
    the ``full_seeds`` smallest.

    Every student is cached in ``cache_dir`` (default :func:`~ddkit.artifacts.cache_dir`) as soon as it is trained,
    by what decides its accuracy (:func:`student_cache_path`, :func:`random_cache_path`, :func:`full_reference`),
    not by the other seeds or the baselines: a student cached before is read back, not trained again, so more seeds
    train only theirs and turning a baseline on trains only its students. Students of a set built in memory are
    keyed by its images and labels, as those of a saved one.

    Returns the report (also written to ``out`` as JSON): accuracies are fractions in [0, 1].
    """
    progress = progress_form(progress, "evaluate", "progress")
    if not isinstance(protocol, ProtocolConfig):
        protocol = resolve_protocol(protocol)
    if protocol.label_mode == "fkd" and not protocol.fkd_store and fkd_store is None:
        raise DDKitError("label_mode 'fkd' needs fkd_store: pass fkd_store= (a SoftLabelStore, as relabel returns) or "
                         "set the protocol's fkd_store to a `ddkit relabel` folder (CLI: --set fkd_store=DIR)")
    # integers in range, none repeated; sorted, so that the report (per-seed order, the full-data reference of the
    # smallest seeds) is the same however the seeds are written
    seeds = sorted_seeds(seeds, "evaluation seeds")
    if not seeds:
        raise DDKitError("no evaluation seeds; pass --seeds 0,1,2")
    if data is not None:
        check_bundle(data)
    device = ddist.resolve_device(device)
    if out is not None:
        check_report_out(out)  # before any student trains
    if not isinstance(distilled, DistilledSet):
        distilled = DistilledSet.load(distilled)
    from ddkit.teacher import as_teacher

    teacher = as_teacher(teacher, device)  # a teacher artifact's folder is loaded
    info = ddist.current()
    man = distilled.manifest
    if data is None:
        data = load_dataset(from_dict(DatasetConfig, man["dataset_config"], "dataset"))
    # data built by hand has no files to point at: the fix is passing the right bundle
    by_hand = data.config is None
    if list(distilled.classes) != list(data.classes):
        fix = ("pass the bundle the set was made from as data=" if by_hand
               else "point dataset.path at the data it was made from")
        raise DDKitError(f"distilled set's classes {list(distilled.classes)} differ from the dataset's "
                         f"{list(data.classes)}; {fix}")
    if data.fingerprint != man["dataset"]["fingerprint"]:
        fix = ("pass the bundle the set was made from as data=" if by_hand
               else other_data_fix(data.config, man["dataset_config"]))
        raise DDKitError(
            f"distilled set was made from {man['dataset']['name']!r} data with fingerprint "
            f"{man['dataset']['fingerprint']} but the loaded data has {data.fingerprint}; {fix}"
        )
    from ddkit.labels.fkd import distilled_fingerprint

    # every rank trains its share of the students: with another protocol or seeds the report would mix them
    ddist.agree_settings({"protocol": protocol, "seeds": seeds, "set": distilled_fingerprint(distilled),
                          "dataset": [data.fingerprint, data.normalisation],
                          "teacher": getattr(teacher, "fingerprint", None)})
    if protocol.random_baseline and distilled.ipc is not None:
        check_random_ipc(data, distilled.ipc)
    mode = protocol.label_mode
    if mode == "stored" and distilled.soft_labels is None:  # before asking for a teacher it would need too
        raise DDKitError("label_mode 'stored' needs soft labels in the distilled set; distil with --soft-labels or use "
                         "label_mode teacher")
    if teacher is None and (mode == "teacher" or (mode in ("stored", "fkd") and protocol.random_baseline)):
        why = "" if mode == "teacher" else " to label the random subset beside the set"
        fix = "" if mode == "teacher" else ", or set random_baseline=false to evaluate the set alone"
        raise DDKitError(f"label_mode {mode!r} needs a teacher{why}; pass teacher= (CLI: --teacher DIR){fix}")
    made_by = (man.get("teacher") or {}).get("weights_sha")
    if mode == "stored" and teacher is not None and made_by is not None and not teacher.made(made_by):
        # the set replays its teacher's logits; the random baseline would be labelled by another teacher
        raise DDKitError(f"label_mode 'stored' replays the soft labels teacher {made_by} "
                         f"({man['teacher'].get('path')}) gave this set, not teacher {teacher.fingerprint}; pass that "
                         "teacher, or use label_mode teacher to label both sets with this one")
    alone = getattr(teacher, "fingerprint", None)  # the teacher without the protocol's extra_teachers
    if protocol.extra_teachers and mode == "stored":
        # the set replays the labels its own teacher (or CV-DD committee) made: the random subset beside it is
        # labelled the same way, so an ensemble here would label only one side (a bench's overrides give every
        # label mode the same extra_teachers, so they are left out here rather than refused)
        said = (man.get("config_hash") or id(distilled), recorded_path(distilled.path), protocol.hash)
        if said not in _STORED_EXTRAS_SAID:
            _STORED_EXTRAS_SAID.add(said)
            log.warning("label_mode 'stored' does not use the protocol's extra_teachers: the set replays the soft "
                        "labels it was made with, and the random subset beside it is labelled as they were made (by "
                        "the set's teacher, or its committee); use label_mode teacher to label both with the ensemble")
    elif protocol.extra_teachers and mode != "hard":
        if teacher is None:
            raise DDKitError("protocol extra_teachers form an ensemble with the main teacher; pass teacher= "
                             "(CLI: --teacher DIR)")
        teacher = labelling_teacher(protocol, teacher, device)
    store = store_record = None
    if mode == "fkd":
        from ddkit.labels.fkd import SoftLabelStore, store_identity

        if isinstance(fkd_store, (str, os.PathLike)):
            fkd_store = SoftLabelStore.load(fkd_store)
        if fkd_store is not None and not isinstance(fkd_store, SoftLabelStore):
            raise DDKitError(f"fkd_store must be a SoftLabelStore (as relabel returns) or its folder, got "
                             f"{type(fkd_store).__name__}; pass one of them")
        if protocol.fkd_store and fkd_store is not None and fkd_store.path is None:
            raise DDKitError("fkd_store was never saved, so it cannot be the protocol's fkd_store "
                             f"{protocol.fkd_store!r}; save it there and pass the saved store, or leave fkd_store out, "
                             "or set the protocol's fkd_store to null to replay the store in memory")
        if protocol.fkd_store and fkd_store is not None and (
                Path(fkd_store.path).resolve() != artifact_folder(protocol.fkd_store, "fkd-soft-labels").resolve()):
            raise DDKitError(f"fkd_store was loaded from {str(fkd_store.path)!r}, not from the protocol's fkd_store "
                             f"{protocol.fkd_store!r}; pass the store loaded from the protocol's fkd_store, or leave "
                             "fkd_store out (it is read from there)")
        store = fkd_store if fkd_store is not None else SoftLabelStore.load(protocol.fkd_store)
        if protocol.extra_teachers and store.manifest["teacher"]["fingerprint"] == alone != teacher.fingerprint:
            # check_matches would advise passing the same teacher, which the protocol's ensemble replaces
            raise DDKitError(f"the FKD store was labelled by teacher {alone} alone, but with the protocol's "
                             f"extra_teachers label mode fkd uses their ensemble {teacher.fingerprint}; evaluate "
                             "without them (--set extra_teachers=[]), or make the store with the ensemble "
                             "(`ddkit relabel` with --extra-teacher DIR for each of them, or `ddkit run` / `ddkit "
                             "bench`)")
        store.check_matches(distilled, teacher)
        # the report names the store by content: one in memory has no path
        store_record = {"path": recorded_path(store.path), "identity": store_identity(store)}
        if differs := _other_views(protocol.train, store):
            log.warning("the FKD store's augmentation (%s) is not the protocol's train.augment (%s): "
                        "students replay the store's views; relabel with the protocol's augmentation to "
                        "train as it says", *differs)
    if teacher is not None:
        teacher.check_compatible(data)
    stored_random = mode == "stored" and protocol.random_baseline and distilled.ipc is not None
    labeller = stored_labeller(distilled, teacher, protocol, device) if stored_random else None

    train, learned = protocol.train, None
    if protocol.learned_lr:
        learned = man.get("meta", {}).get("syn_lr")
        if learned is None:
            raise DDKitError("protocol learned_lr trains students with the set's learned lr, but this "
                             f"{distilled.method!r} set has none (only mtt, tesla, ftd, datm and shq learn one); set "
                             "learned_lr: false")
        learned = float(learned)
        if not (math.isfinite(learned) and learned > 0):
            raise DDKitError("protocol learned_lr trains students with the set's learned lr, but this "
                             f"{distilled.method!r} set learned {learned:.4g} (meta.syn_lr), not a usable lr > 0; set "
                             "learned_lr: false, or distil again with a smaller lr_lr or log_lr: true")
        train = dataclasses.replace(protocol.train, lr=learned)
        log.info("students train with the set's learned lr %.5g (protocol learned_lr)", learned)

    set_reg = man.get("meta", {}).get("zca_reg")
    if set_reg is not None and not protocol.zca:
        log.warning("this %s set was distilled on ZCA-whitened images but the protocol trains students on plain ones; "
                    "set zca: true to evaluate it as MTT does", distilled.method)
    elif set_reg is not None and float(set_reg) != protocol.zca_reg:
        log.warning("this set was distilled with ZCA regularisation %g, the protocol whitens with %g; set zca_reg: %g",
                    set_reg, protocol.zca_reg, set_reg)
    transform = student_transform(protocol, data)

    def cb_for(label: str) -> Progress | None:  # a student's reports, named by record["stage"]
        return (lambda e, n, r: progress(e, n, {**r, "stage": label})) if progress else None

    t0 = time.perf_counter()
    ipc = distilled.ipc
    baseline = protocol.random_baseline and ipc is not None  # a set of every image (full) has no random subset
    if protocol.random_baseline and ipc is None and len(distilled) != man["dataset"].get("train_size", len(distilled)):
        log.warning("the %s set holds %d of the %d training images without an ipc (its method sets uses_ipc = False), "
                    "so no random subset is evaluated beside it (random_baseline skipped): ddkit draws its random "
                    "subsets ipc images per class", distilled.method, len(distilled), man["dataset"]["train_size"])
    # every student is one job (the distilled set's, then the random subsets'): each is trained whole by one rank
    # from its own seed, so its number depends on nothing else (not the other seeds, nor the baselines) and is cached
    # per student; students already cached are read, not trained; rank 0 decides which, so every rank deals the
    # same jobs
    caches = {("distilled", s): student_cache_path(protocol, data, teacher, store, distilled, s, cache_dir, learned,
                                                   device) for s in seeds}
    if baseline:
        caches.update({("random", s): random_cache_path(protocol, data, teacher, store, ipc, s, cache_dir, learned,
                                                        labeller, device) for s in seeds})
    cached: dict[tuple[str, int], float] = {}
    if info.is_main:
        cached = {job: float(v) for job, c in caches.items()
                  if (v := _cache_entry(c, "accuracy", (int, float), accuracy_problem)) is not None}
        if cached:
            log.info("%d of %d students from the cache", len(cached), len(caches))
    cached = ddist.broadcast_object(cached)
    # the jobs left to train, dealt round-robin: under torchrun 3 seeds with a random baseline keep 6 ranks busy,
    # not 3
    jobs = [job for job in caches if job not in cached]
    local: dict[tuple[str, int], float] = {}
    for kind, s in jobs[info.rank :: info.world_size]:
        fkd_out = None
        if kind == "distilled" and store is not None:
            acc = _train_fkd(distilled, store, data, protocol, s, device, cb_for(f"distilled, seed {s}"))
        elif kind == "distilled":
            acc = _train_student(
                distilled.as_imageset(), data, protocol, train, s, device, mode, teacher,
                distilled.soft_labels if mode == "stored" else None, progress=cb_for(f"distilled, seed {s}"),
                transform=transform)
        else:
            # label mode fkd: the subset's labels are streamed into a folder beside its cache entry (an
            # IPC-50 ImageNet store is tens of GB), kept until the student's accuracy is cached
            fkd_out = caches[kind, s].with_suffix(".fkd") if store is not None else None
            acc = _random_baseline(data, protocol, teacher, store, ipc, s, device, cb_for(f"random subset, seed {s}"),
                                   train, transform, labeller, fkd_out)
        local[kind, s] = acc
        if not isinstance(acc, DivergedAccuracy):  # the cache holds no diverged mark: trained again
            # cached as soon as it is trained, so a killed evaluation keeps the students it finished
            entry, what = (({"kind": "distilled-student-cache", "label_mode": mode, "method": distilled.method},
                            f"the distilled set's student of seed {s}") if kind == "distilled"
                           else ({"kind": "random-baseline-cache"}, f"the random baseline of seed {s}"))
            _write_cache(caches[kind, s], {"schema_version": ACCURACY_SCHEMA, **entry, "accuracy": acc, "ipc": ipc,
                                           "seed": s, "protocol_hash": protocol.hash, **trained_on(device)}, what)
        if fkd_out is not None and fkd_out.exists():
            with ddist.single_process(), build_lock(fkd_out):  # not while another process loads it
                shutil.rmtree(fkd_out, ignore_errors=True)
            remove_unused_lock(fkd_out)  # no cache entry keeps it (`ddkit cache prune` would never remove it)
    merged = dict(cached)
    for part in ddist.all_gather_objects(local):
        merged.update(part)
    results: dict[str, Any] = {"distilled": _summary([merged["distilled", s] for s in seeds])}
    if baseline:
        results["random"] = _summary([merged["random", s] for s in seeds])
    if protocol.full_reference:
        results["full"] = full_reference(data, protocol, seeds, device,
                                         Path(cache_dir) if cache_dir else None, progress)
    report = base_manifest("evaluation", protocol.record(), seeds[0])
    # on CUDA also the settings its students trained under (a bench or run re-evaluates under others; numerics_change)
    report["run"].update(device_numerics(device))
    report.update({
        "seeds": seeds,
        "protocol_hash": protocol.hash,
        **({"learned_lr": learned} if learned is not None else {}),
        # which set it scored: its identity (config_hash; None for a set never made by distill) and its images' and
        # labels' content (fingerprint), so a report left beside another set is told from a current one
        "distilled": {"path": recorded_path(distilled.path), "method": distilled.method,
                      "ipc": ipc, "num_images": len(distilled), "dataset": man["dataset"]["name"],
                      "dataset_fingerprint": man["dataset"]["fingerprint"], "config_hash": man.get("config_hash"),
                      "fingerprint": distilled_fingerprint(distilled)},
        "teacher": teacher.record() if teacher is not None else None,
        # label mode fkd: which store it replayed (by content: a store in memory has no path)
        **({"fkd_store": store_record} if store is not None else {}),
        "bytes": evaluation_bytes(distilled, mode, store.nbytes if store is not None else None),
        "results": results,
        "timing": {"wall_seconds": round(time.perf_counter() - t0, 3), "world_size": info.world_size},
    })
    if out is not None and info.is_main:
        write_json(out, report)
    return report


def _cache_entry(path: Path, key: str, kind: type | tuple[type, ...],
                 problem: Callable[[Any], str | None] | None = None) -> Any:
    """The ``key`` of the cache entry at ``path``, or None where there is none or it is unreadable, lacks
    it or holds a value ``problem`` finds wrong (a foreign or hand-edited file: an accuracy of 2.0 or NaN):
    the caller computes the value again and rewrites the entry."""
    if not path.is_file():
        return None
    try:
        value = read_json(path, "cache entry").get(key)
    except (DDKitError, AttributeError):
        value = None
    if not isinstance(value, kind) or isinstance(value, bool):
        log.warning("cache entry %s is damaged (no %r); computing it again", path, key)
        return None
    if problem is not None and (why := problem(value)):
        log.warning("cache entry %s is damaged (%s %s); computing it again", path, key, why)
        return None
    return value


def evaluation_bytes(distilled: DistilledSet, label_mode: str, fkd_bytes: int | None = None) -> dict[str, int]:
    """What a student of ``label_mode`` trains from: the images, the hard labels, and the set's soft labels
    only where it replays them (``stored``), or the FKD store's bytes (``fkd``). A set's own soft labels
    are not counted where the protocol ignores them (``hard``) or asks the teacher instead (``teacher``)."""
    labels = (tensor_bytes(distilled.labels, distilled.soft_labels if label_mode == "stored" else None)
              + (fkd_bytes or 0))
    return {"images": distilled.image_bytes, "labels": labels, "total": distilled.image_bytes + labels,
            **({"fkd_labels": fkd_bytes} if fkd_bytes is not None else {})}
