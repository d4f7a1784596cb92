"""Evaluation protocols: typed configs and named presets.

A protocol fixes everything that decides a student's test accuracy — architecture, label mode,
loss, optimizer, schedule, epochs, batch size, augmentation, EMA — so that every distilled set, the
random real subset of the same IPC and the full training set are measured the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ddkit.artifacts import recorded_path, recorded_paths
from ddkit.config import (
    Checked,
    config_hash,
    field,
    from_dict,
    load_yaml,
    merge_overrides,
    refuse_record,
    short_repr,
    sorted_keys,
    to_dict,
)
from ddkit.data.zca import check_reg as check_zca_reg
from ddkit.errors import ConfigError, DDKitError
from ddkit.registry import Registry, origin
from ddkit.training import TeacherBN, TrainConfig, check_teacher_bn, omit_running_bn

log = logging.getLogger(__name__)
_UNKNOWN_STUDENTS: set[str] = set()  # students warned about once per process

# the kl loss divides logits by the temperature T and scales by T² in float32: both stay finite in this range
MIN_TEMPERATURE = 2.0**-126  # float32's smallest normal number: 1/T <= 8.5e37
MAX_TEMPERATURE = math.sqrt(3.4028234663852886e38)  # float32's largest number, the bound of T²

# label modes that do not use a protocol's extra_teachers (hard: the set's labels; stored: the labels the set was
# made with, and the random subset's as they were made): their keys leave them out, so their evaluations are reused
UNLABELLED_BY_ENSEMBLE = ("hard", "stored")

# what a protocol's hash holds for its FKD store: the path names no content, the keys add the content
FKD_STORE_MARK = "<keyed by the store's content>"
#: the protocol fields that name artifacts on disk, recorded absolute
PATH_FIELDS = ("extra_teachers", "fkd_store")


@dataclass
class ProtocolConfig(Checked):
    """How students are trained and tested."""

    student: str = field("convnet3", help="student model key (`ddkit list models`)")
    student_options: dict = field({}, help="keyword options for the student factory")
    label_mode: Literal["hard", "teacher", "stored", "fkd"] = field(
        "hard", help="hard: cross-entropy; teacher: teacher queried on every augmented batch; stored: the artifact's "
        "static soft labels; fkd: per-epoch stored views and logits from `ddkit relabel` (fkd_store)"
    )
    loss: Literal["ce", "kl", "mse_ce"] | None = field(
        None, help="ce (hard labels); kl with temperature; mse_ce (EDC: MSE + 0.025 CE); null (the default): ce for "
        "label_mode hard, kl for the others")
    temperature: float = field(4.0, help="softmax temperature for the kl loss")
    teacher_bn: TeacherBN = field("running",
                                  help="teacher BatchNorm when the evaluator computes soft labels (label_mode "
                                  "teacher; the random baseline's labels in mode stored): running "
                                  "statistics, or batch: statistics of the images labelled (CV-DD's "
                                  "batch-specific soft labels)")
    teacher_bn_batch: int | None = field(None, help="teacher_bn batch: BatchNorm statistics over groups of this many "
                                         "images of each batch (null: the whole batch)")
    fkd_store: str | None = field(None, help="label_mode fkd: directory written by `ddkit relabel` (null: the store "
                                  "passed to evaluate as fkd_store=)")
    extra_teachers: list[str] = field([], added=True,
                                      help="more teacher artifacts: soft labels become the mean logits of the "
                                      "teacher and these (an ensemble: every EDC branch's train/direct_train.py "
                                      "labels with the mean logits of its whole teacher pool, CIFAR-10 8 models, "
                                      "CIFAR-100 and Tiny-ImageNet 5, ImageNet-10 4, where the edc preset uses the "
                                      "teacher alone; CV-DD's committee); label modes teacher and fkd (stored "
                                      "replays the set's own labels)")
    learned_lr: bool = field(False, added=True,
                             help="train the students with the set's learned student lr (meta syn_lr: "
                             "mtt, tesla, ftd, datm, shq) instead of train.lr, as MTT's evaluation; the "
                             "random subset too")
    zca: bool = field(False, added=True, help="train and test students on ZCA-whitened images (fitted on the training "
                      "set's pixels; the random subset and full-data reference too), as MTT, FTD, TESLA and "
                      "DATM evaluate sets distilled with `buffer.zca`; label_mode hard or stored")
    zca_reg: float = field(0.1, added=True, help="zca: regularisation added to the covariance eigenvalues (MTT: 0.1)")
    train: TrainConfig = field(factory=TrainConfig, help="optimizer, schedule, epochs, batch, augmentation, EMA")
    random_baseline: bool = field(True, help="also evaluate a random real subset of the same IPC")
    full_reference: bool = field(True, help="also report the same student trained on the full training set (cached)")
    full_epochs: int = field(20, help="epochs for the full-data reference (300 passes over 60k images are not needed)")
    full_seeds: int = field(1, help="how many of the seeds (the smallest) the full-data reference uses")

    def __post_init__(self) -> None:
        if self.loss is None:  # left at its default: the label mode's loss, as resolve_protocol picks it
            self.loss = "ce" if self.label_mode == "hard" else "kl"
        if self.label_mode == "hard" and self.loss != "ce":
            raise ConfigError(f"label_mode 'hard' needs loss 'ce', got {self.loss!r}; set loss=ce or a soft label_mode")
        if self.label_mode != "hard" and self.loss == "ce":
            raise ConfigError(f"label_mode {self.label_mode!r} needs loss 'kl' or 'mse_ce'; set loss=kl")
        if not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:  # the kl loss divides by T and scales by T²
            raise ConfigError(f"temperature must lie in [{MIN_TEMPERATURE:.3g}, {MAX_TEMPERATURE:.3g}] (1/T and T² "
                              f"finite in float32; 1 to 20 is usual), got {self.temperature:g}")
        check_teacher_bn(self.teacher_bn, self.teacher_bn_batch)
        if self.learned_lr and self.label_mode == "fkd":
            raise ConfigError("learned_lr is not supported with label_mode fkd; set learned_lr: false")
        if self.zca and self.label_mode not in ("hard", "stored"):
            raise ConfigError(f"zca trains students on whitened images, but label_mode {self.label_mode!r} has the "
                              "teacher label views of unwhitened images; use label_mode hard or stored, or zca: false")
        check_zca_reg(self.zca_reg)
        if self.full_epochs < 1 or self.full_seeds < 1:
            raise ConfigError("full_epochs and full_seeds must be >= 1")
        if self.full_reference and self.train.warmup_epochs >= self.full_epochs:
            raise ConfigError(f"full_epochs {self.full_epochs} leaves no epoch after train.warmup_epochs "
                              f"{self.train.warmup_epochs} for the full-data reference; raise full_epochs or set "
                              "full_reference: false")

    def identity(self) -> dict:
        """What decides the numbers: every field, except those at a value that reproduces the
        behaviour from before they existed (fields declared ``added``, e.g. an empty ``extra_teachers``:
        no ensemble; ``teacher_bn`` running with no ``teacher_bn_batch``), which are left out so hashes
        stay those of older protocols; with an EMA student, a marker of the EMA's decay warm-up.
        ``extra_teachers`` enter as their count in label modes teacher and fkd: every key of an evaluation
        adds their weights (:func:`ddkit.pipeline.ensemble_identity`, or the ensemble teacher's fingerprint), so
        a moved or copied ensemble keeps its evaluations; label modes hard and stored, which do not use them,
        leave them out (their evaluations are those without them). ``fkd_store`` enters as a marker for the same reason:
        the keys add the store's content (:func:`ddkit.pipeline.protocol_inputs`). A student model from outside
        ddkit (a plugin) adds the sha256 of its source, so cached evaluations of an edited one are not reused."""
        out = to_dict(self, identity=True)
        if "extra_teachers" in out and self.label_mode in UNLABELLED_BY_ENSEMBLE:
            del out["extra_teachers"]
        elif "extra_teachers" in out:
            out["extra_teachers"] = len(out["extra_teachers"])
        if out.get("fkd_store"):
            out["fkd_store"] = FKD_STORE_MARK
        if self.train.ema_decay > 0:  # the EMA's decay warm-up changed its numbers: new hashes for EMA protocols only
            out["train"]["ema_warmup"] = True
        from ddkit.models.registry import model_source

        source = model_source(self.student)
        if sha := source.get("source_sha256"):  # a plugin student: an edit is a new protocol
            out["student_source"] = sha
        elif not source and self.student not in _UNKNOWN_STUDENTS:
            _UNKNOWN_STUDENTS.add(self.student)
            log.warning("student %r is not a registered model, so the protocol's hash leaves out its source (and "
                        "differs from the hash once its plugin is imported); import the module that registers it "
                        "first (CLI: DDKIT_PLUGINS)", self.student)
        return omit_running_bn(out)

    @property
    def hash(self) -> str:
        return config_hash(self.identity())

    def record(self) -> dict:
        """The protocol as reports record it: every field, with the paths of ``extra_teachers`` and ``fkd_store``
        absolute (against the current folder), so the record names the same artifacts from any folder (its hash
        does not read them)."""
        return recorded_paths(to_dict(self), PATH_FIELDS)

    def full_train(self) -> TrainConfig:
        return dataclasses.replace(self.train, epochs=self.full_epochs)


#: how a protocol spec names a file (case ignored): every other spec without a path separator is a registered name
PROTOCOL_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def _check_protocol(name: str, obj: object) -> None:
    """What PROTOCOLS takes: a factory called with no arguments that returns a ProtocolConfig, as the presets
    below are registered (a config itself would be called at every use), under a name that does not end in a
    file's suffix (:data:`PROTOCOL_FILE_SUFFIXES`: a spec with one is read as a file, so the name could not be
    used)."""
    if name.lower().endswith(PROTOCOL_FILE_SUFFIXES):
        stem = name[: name.rindex(".")]
        raise DDKitError(f"protocol name {name!r} ends in {name[len(stem):]!r}, so every --protocol or protocol: "
                         f"naming it reads a file of that name instead; register it under a name without the "
                         f"suffix, e.g. {stem!r}")
    if isinstance(obj, ProtocolConfig):
        raise DDKitError(f"protocol {name!r}: register a function returning the ProtocolConfig, not the config "
                         f"itself: PROTOCOLS.add({name!r}, lambda: cfg) (or save it as a YAML file and pass its path)")
    try:
        inspect.signature(obj).bind()
    except TypeError:  # not callable, or takes arguments
        raise DDKitError(f"protocol {name!r}: {type(obj).__name__} {short_repr(obj)} is no function of no arguments "
                         "returning a ProtocolConfig; register such a function, e.g. "
                         "`@PROTOCOLS.register(name)` on `def f(): return ProtocolConfig(...)`") from None
    except ValueError:  # a callable whose signature cannot be read (a builtin): taken as it is
        pass


#: named protocols: functions of no arguments returning a ProtocolConfig (README, Fair evaluation)
PROTOCOLS: Registry[Callable[[], ProtocolConfig]] = Registry("protocol", check=_check_protocol)


@PROTOCOLS.register("dc-protocol")
def dc_protocol() -> ProtocolConfig:
    """DC's evaluation (Zhao et al. ICLR 2021): ConvNet-3, SGD 0.01, momentum 0.9, wd 5e-4,
    batch 256, 300 epochs, lr x0.1 at half, no augmentation, hard labels. That is DC's setting on
    Fashion-MNIST (and other datasets whose DC augmentation is none); DSA and DM evaluate 1000
    epochs with DSA augmentation (``dsa-protocol``). The reference ``evaluate_synset`` trains N+1
    epochs, drops the lr after epoch N//2+1 and restarts the optimizer there (``step`` keeps
    momentum); its 28x28 ConvNet is ``convnet3-p3`` (README, Fair evaluation)."""
    return ProtocolConfig()


@PROTOCOLS.register("dsa-protocol")
def dsa_protocol() -> ProtocolConfig:
    """DSA's and DM's evaluation (Zhao & Bilen ICML 2021, WACV 2023): as dc-protocol, 1000 epochs with
    DSA augmentation."""
    return ProtocolConfig(train=TrainConfig(epochs=1000, augment="dsa"))


@PROTOCOLS.register("mtt-protocol")
def mtt_protocol() -> ProtocolConfig:
    """MTT's evaluation (Cazenavette et al. CVPR 2022, reference ``evaluate_synset``), also FTD's and
    TESLA's: dsa-protocol (ConvNet-3, SGD momentum 0.9, wd 5e-4, batch 256, 1000 epochs with DSA
    augmentation, lr x0.1 at half, hard labels) with the set's learned student lr (``learned_lr``).
    DATM's evaluation is the same with batch 128 (its configs' ``batch_train``: add
    ``--set train.batch_size=128``). For a set distilled on whitened images add ``zca: true``; for
    DATM's and TESLA's learned soft labels ``label_mode: stored`` with ``temperature: 1`` (they train
    on softmax(logits); stored's default is soft-kl's T=4)."""
    return ProtocolConfig(learned_lr=True, train=TrainConfig(epochs=1000, augment="dsa"))


@PROTOCOLS.register("soft-kl")
def soft_kl_protocol() -> ProtocolConfig:
    """SRe2L-style relabelled training: teacher soft labels online, KL with T=4, AdamW 1e-3 (weight
    decay 0.01) + cosine to 0, random-resized-crop (0.08-1) + flip, batch 64, 300 epochs. Sized for
    small sets; the authors' own recipes differ:

    - SRe2L's ImageNet-1K FKD script (``validate/train_FKD.sh``): T 20, CutMix, batch 1024, labels
      stored by its relabel stage: ``temperature``, ``train.cutmix_prob`` and ``train.batch_size``
      overrides, label mode ``fkd``.
    - SRe2L's small-image recipe (CIFAR-100 ``relabel_cifar.py`` / ``relabel_cifar.sh``): teacher
      online, RandomCrop(32, padding 4) + flip (``train.augment: crop_flip``), MixUp with Beta(0.8,
      0.8) on every batch, T 30, batch 128, 400 epochs, cosine to 0, AdamW 1e-3 (weight decay 0.01);
      its teacher is never put in eval mode, so it labels with each batch's BatchNorm statistics
      (``teacher_bn: batch``). ddkit has no MixUp: the rest is reachable by overrides, MixUp is not.
    - RDED's evaluation: see the ``rded`` method's docstring (``configs/fashion-mnist/rded/ipc10-fkd.yaml``
      follows it where ddkit can).

    Also unlike SRe2L's and RDED's code: ddkit's KL is scaled by T^2 (theirs is not;
    :func:`ddkit.training.per_sample_loss`), and weight decay applies to every parameter, where
    SRe2L's ImageNet-1K and RDED's students leave biases and 1-D (BatchNorm) parameters out
    (:func:`ddkit.training.make_optimizer`)."""
    return ProtocolConfig(
        label_mode="teacher", loss="kl", temperature=4.0,
        train=TrainConfig(epochs=300, batch_size=64, optimizer="adamw", lr=1e-3, weight_decay=0.01,
                          schedule="cosine", augment="rrc_flip", augment_options={"scale_min": 0.08}),
    )


@PROTOCOLS.register("edc")
def edc_protocol() -> ProtocolConfig:
    """EDC's evaluation recipe in part (Shao et al. NeurIPS 2024; shaoshitong/EDC ``train/direct_train.py``): MSE +
    0.025 CE on teacher logits, AdamW 1e-3 (weight decay 0.01), smoothing schedule (zeta 2), small batch (50), weak
    augmentation (crop scale 0.5-1) and an EMA student (0.99), without EDC's CutMix and RandAugment, and labelled
    by one teacher where EDC's labels are the mean logits of a teacher pool.

    Differences from EDC's evaluation scripts (``Branch_*/train/train.sh``), kept because recorded benches use this
    preset (``configs/bench/fashion-mnist-edc-protocol-cpu.yaml``):

    - no CutMix: every EDC script passes ``--mix-type cutmix`` and pastes one Beta(1, 1) box into every batch (no
      probability). ``train.cutmix_prob: 1.0`` switches ddkit's on (a box per image, not per batch); ddkit's
      ``mse_ce`` then takes its CE term on the mixed hard labels (``lam * y + (1 - lam) * y_partner``), where EDC's
      ``mse_gt`` takes it on the unmixed labels;
    - no RandAugment: the CIFAR-10/100, Tiny-ImageNet and ImageNet-10 scripts apply ``RandAugment()`` before the
      random-resized crop (scale 0.08-1 on CIFAR-10, 0.5-1 elsewhere);
    - batch and optimiser come from different scripts: batch 50 with AdamW 1e-3 is the ImageNet-10 script's; the
      CIFAR-100 script's batch 50 trains with SGD (lr 0.1, momentum 0.875, weight decay 5e-4), the CIFAR-10 script
      uses batch 10 with AdamW 1e-3 (ImageNet-1k: batch 100); the smoothing schedule is the Tiny-ImageNet and
      ImageNet-1k scripts' (``--ls-type cos``; CIFAR-100 and ImageNet-10 end with a linear tail over the last
      sixth, ``cos2``; CIFAR-10 halves the lr at epochs 800, 900 and 950 of 1000);
    - 300 epochs (the CIFAR-10/100 and ImageNet-10 scripts: 1000);
    - one teacher: every EDC branch's ``train/direct_train.py`` labels each batch with the mean logits of its whole
      teacher pool (``soft_label.mean(0)`` over ``model_teacher``, in the ``mse_gt`` loss too; CIFAR-10: 8 models,
      CIFAR-100 and Tiny-ImageNet: 5, ImageNet-10: 4), where this preset labels with the pipeline's teacher alone
      (``extra_teachers: []``). EDC's form: name the other teachers' folders in ``extra_teachers`` (the labels
      become the mean logits of the teacher and these): ``ddkit evaluate SET --teacher T1 --protocol edc --set
      'extra_teachers=[T2, T3]'``, ``ddkit run CONFIG --set 'evaluate.overrides.extra_teachers=[T2, T3]'``, or a
      bench's ``overrides: {extra_teachers: [T2, T3]}`` (folders, not the ``@name`` references of a method's
      options: a bench's pool lies in ``OUT/teachers/DATASET@NAME`` once trained).
    """
    return ProtocolConfig(
        label_mode="teacher", loss="mse_ce",
        train=TrainConfig(epochs=300, batch_size=50, optimizer="adamw", lr=1e-3, weight_decay=0.01,
                          schedule="smoothing", smoothing_zeta=2.0, augment="rrc_flip",
                          augment_options={"scale_min": 0.5}, ema_decay=0.99),
    )


@PROTOCOLS.register("cvdd")
def cvdd_protocol() -> ProtocolConfig:
    """CV-DD's CIFAR evaluation (Cui et al. 2025, Jiacheng8/CV-DD ``validate/train_fkd.py``): KL on
    teacher logits at temperature 20, AdamW lr 1e-3 (weight decay 0.01) with a cosine schedule over
    300 epochs, batch 16 (``train_fkd.py``'s default), CutMix (Beta(1, 1) on every batch),
    random-resized-crop (scale 0.08-1) + flip, and batch-specific soft labels: the teacher's BatchNorm normalises with
    the statistics of each (augmented, mixed) student batch (``teacher_bn: batch``), in groups of 8 images
    (``teacher_bn_batch: 8``): CV-DD's ``relabel.py`` runs each batch of 16 through the teachers in two halves
    (a smaller last batch: 8 and the rest here, two halves there).

    Adapted: the teacher is queried online on every batch (``label_mode: teacher``) instead of
    CV-DD's stored per-batch FKD labels, which only replay with the same batch size and order; for
    stored labels use ``ddkit relabel --teacher-bn batch --teacher-bn-batch 8`` and label_mode fkd
    (its groups of 8 views are drawn from the epoch, not the student's batches).
    ddkit's KL is scaled by T^2 (CV-DD leaves it out; AdamW is nearly invariant to that factor),
    CutMix draws a box per image (CV-DD one per batch); like CV-DD it mixes the cropped and flipped
    views. Not reproduced: CV-DD's gradient accumulation (2 forward passes of 8 per
    step). CV-DD's committee of teachers is ``extra_teachers``, which label with equal weights, where
    CV-DD's relabelling weighs the teachers ``softmax(acc / 10)`` by their accuracies in % (a set's own
    ``cvdd`` committee labels do, evaluated with ``label_mode: stored``); its ``eta`` 2 runs are
    ``train.schedule=smoothing``.
    """
    return ProtocolConfig(
        label_mode="teacher", loss="kl", temperature=20.0, teacher_bn="batch", teacher_bn_batch=8,
        train=TrainConfig(epochs=300, batch_size=16, optimizer="adamw", lr=1e-3, weight_decay=0.01,
                          schedule="cosine", augment="rrc_flip", augment_options={"scale_min": 0.08},
                          cutmix_prob=1.0, cutmix_alpha=1.0),
    )


@PROTOCOLS.register("demo")
def demo_protocol() -> ProtocolConfig:
    """Fast CPU protocol for the demo: dc-protocol with a 32-wide ConvNet-3 student."""
    return ProtocolConfig(student="convnet3-w32", full_epochs=3)


def is_protocol_file(spec: object) -> bool:
    """Whether :func:`resolve_protocol` reads ``spec`` as a file's path, not a registered protocol's name: a path
    object, or a string with a path separator or ending in ``.yaml``, ``.yml`` or ``.json`` (no registered name
    has either). A bare name is a registered protocol's even where a file of that name lies in the current folder
    (``./NAME`` reads the file)."""
    return isinstance(spec, os.PathLike) or (isinstance(spec, str) and (
        spec.lower().endswith(PROTOCOL_FILE_SUFFIXES) or any(sep in spec for sep in ("/", os.sep, os.altsep) if sep)))


_SHADOWED: set[str] = set()  # protocol names warned about once per process: a file of the name in the current folder


def preset(name: str) -> ProtocolConfig:
    """The ProtocolConfig the protocol registered as ``name`` returns; one that returns anything else (a function
    that forgot its ``return``) is refused, naming the protocol. A file of that name in the current folder is not
    read (a warning says how to read it); an unknown name that is such a file gets the same hint."""
    if name not in PROTOCOLS and Path(name).is_file():
        raise ConfigError(f"{PROTOCOLS.unknown_message(name)}; to read the file {name!r} in the current folder, "
                          f"pass its path: ./{name}")
    made = PROTOCOLS.get(name)()
    if not isinstance(made, ProtocolConfig):
        text = short_repr(made, 60)
        what = ("None (no `return`?)" if made is None else
                text if text.startswith(type(made).__name__) else f"{type(made).__name__} {text}")
        raise DDKitError(f"protocol {name!r}: its function ({origin(PROTOCOLS.get(name))}) returned {what}, not a "
                         "ProtocolConfig; make it `return ProtocolConfig(...)`")
    if name not in _SHADOWED and Path(name).is_file():
        _SHADOWED.add(name)
        log.warning("protocol %r is the registered one, not the file %r in the current folder; pass ./%s to read "
                    "the file", name, name, name)
    return made


def recorded_protocol(spec: str) -> str:
    """A config's protocol as records name it: a YAML file's path absolute (against the current folder, where it
    was read), so the record reads the same file from any folder; a preset's name as it is."""
    return recorded_path(spec) if is_protocol_file(spec) else spec


def recorded_overrides(spec: str, overrides: dict) -> dict:
    """A config's ``overrides`` of protocol ``spec`` as records hold them: the paths they name (:data:`PATH_FIELDS`)
    absolute, and, where ``spec`` is a YAML file whose ``extra_teachers`` name relative paths (read against the working
    folder, as the file's own path is) and the overrides give none, the file's teachers added absolute, so the record
    labels with the same teachers from any folder. Hashes do not change (they count ``extra_teachers`` and read their
    weights). A file's ``fkd_store`` is not added: runs and benches replay their own store or ``overrides.fkd_store``,
    never the file's."""
    out = recorded_paths(overrides, PATH_FIELDS)
    if is_protocol_file(spec) and "extra_teachers" not in out:
        named = resolve_protocol(spec).extra_teachers
        absolute = recorded_paths({"extra_teachers": named}, ("extra_teachers",))["extra_teachers"]
        if absolute != named:
            out = sorted_keys({**out, "extra_teachers": absolute})
    return out


def unused_overrides(overrides: dict, set_by: dict[str, str], where: str = "overrides",
                     hints: dict[str, str] | None = None) -> list[str]:
    """One problem for each protocol field of ``set_by`` that ``overrides`` (at ``where``) sets although the
    caller sets it itself (a run per label mode, a bench per cell): it would be recorded and never used.
    ``set_by`` says where each field's value comes from instead, ``hints`` what more to say of a field."""
    return [f"{where}.{k} is not used: {source}; list it there instead{(hints or {}).get(k, '')}"
            for k, source in set_by.items() if k in overrides]


def protocol_settings(spec: str | Path | dict | ProtocolConfig) -> dict:
    """Every setting of the protocol ``spec`` names (a preset name, a YAML path, a dict or a config), as a dict."""
    if isinstance(spec, ProtocolConfig):
        return to_dict(spec)
    if isinstance(spec, dict):
        refuse_record(spec, ProtocolConfig, read=True)  # an evaluation's JSON read in: every key of it would be unknown
        return to_dict(from_dict(ProtocolConfig, spec, "protocol"))
    if is_protocol_file(spec):
        data = load_yaml(spec)
        refuse_record(data, ProtocolConfig)  # an evaluation's JSON: every key of it would be unknown
        return to_dict(from_dict(ProtocolConfig, data, "protocol"))
    if isinstance(spec, str):
        return to_dict(preset(spec))
    raise ConfigError(f"protocol must be a ProtocolConfig, a preset name (`ddkit list protocols`) or a YAML file's "
                      f"path, got {type(spec).__name__} {spec!r}; pass one of them, e.g. 'dc-protocol'")


def inert_settings(protocol: ProtocolConfig) -> dict[str, tuple[str, str, str] | None]:
    """The settings (dotted names) that decide nothing in ``protocol``, each with what makes it so (``loss
    mse_ce``), what would read it and how to make it count; None for ``temperature`` under hard labels (loss ce),
    which read none either, but the shipped hard-label benches set one (for their soft modes, once) and it keys
    their evaluations: it is refused only where a soft label mode beside them does not read it either."""
    train, out = protocol.train, {}
    if protocol.loss != "kl":
        out["temperature"] = None if protocol.loss == "ce" else (f"loss {protocol.loss}", "only loss kl reads it",
                                                                  "set loss=kl")
    if train.schedule != "smoothing":
        out["train.smoothing_zeta"] = (f"train.schedule {train.schedule}", "only the smoothing schedule reads it",
                                       "set train.schedule=smoothing")
    if train.optimizer != "sgd":
        out["train.momentum"] = (f"train.optimizer {train.optimizer}", "only sgd reads it", "set train.optimizer=sgd")
    if train.cutmix_prob == 0:
        out["train.cutmix_alpha"] = ("train.cutmix_prob 0", "only CutMix reads it", "set train.cutmix_prob")
    if not protocol.zca:
        out["zca_reg"] = ("zca false", "only ZCA whitening reads it", "set zca=true")
    if not protocol.full_reference:
        for name in ("full_epochs", "full_seeds"):
            out[name] = ("full_reference false", "only the full-data reference reads it", "set full_reference=true")
    return out


def refuse_inert_overrides(settings: dict, overrides: dict, protocols: list[ProtocolConfig], where: str,
                           in_file: bool = True) -> None:
    """Refuse, in one :class:`ConfigError`, each setting that ``overrides`` (at ``where``) changes from ``settings``
    (the protocol's own, :func:`protocol_settings`) while it decides nothing in every one of ``protocols`` (those
    resolved with the overrides: one per label mode a run or bench evaluates; :func:`inert_settings`): it would
    only give the protocol another hash, and students would be trained again for the same numbers. A preset's own
    inert values (edc's temperature) are not refused: they keep the hash it always had. ``in_file``: the overrides
    are a config file's section (a run's, a bench's) with the command's ``--set`` applied, which cannot remove a key
    of the file: the error names the ``--set`` of the protocol's own value, which is taken."""
    problems = []
    inert = [inert_settings(p) for p in protocols]
    for name in inert[0] if inert else {}:
        why = [i[name] for i in inert if name in i]
        if len(why) < len(inert) or not (states := [w for w in why if w is not None]):
            continue  # some protocol reads it, or only hard labels leave it unread
        path = name.split(".")
        given, was = overrides, settings
        for part in path:
            given = given.get(part, _UNSET) if isinstance(given, dict) else _UNSET
            was = was.get(part, _UNSET) if isinstance(was, dict) else _UNSET
        value = functools.reduce(getattr, path, protocols[0])
        if given is not _UNSET and value != was:
            under = ", ".join(dict.fromkeys(state for state, _, _ in states))
            _, reads, fix = states[0]
            key = f"{where + '.' if where else ''}{name}"
            # a --set cannot remove a key a config file gives (smoke.yaml's full_epochs under --set
            # overrides.full_reference=false): the protocol's own value, which is taken, does the same
            own = f"; from the command line: --set {key}={was:g}, the protocol's own" if (
                in_file and isinstance(was, int | float)) else ""
            problems.append(f"{key}={value:g} does nothing under {under} ({reads}); drop it (it would only give the "
                            f"protocol another hash{own}) or {fix}")
    if problems:
        raise ConfigError("; ".join(problems))


_UNSET = object()


def resolve_protocol(spec: str | Path | dict | ProtocolConfig, overrides: dict | None = None,
                     where: str = "protocol", check_inert: bool = True) -> ProtocolConfig:
    """A protocol from a preset name, a YAML path (str or Path), a dict or a config, with ``overrides``
    (nested dict; ``where``: what a config calls them, which errors in them name). An override of a setting that
    decides nothing in the result (:func:`refuse_inert_overrides`) is refused, unless ``check_inert`` is False (a
    run or bench resolves one protocol per label mode, and refuses only what none of them reads)."""
    base = settings = protocol_settings(spec)
    if overrides:
        merged = merge_overrides(base, overrides)
        # switching to hard labels implies cross-entropy; to soft labels implies KL unless given
        if "label_mode" in overrides and "loss" not in overrides:
            merged["loss"] = "ce" if overrides["label_mode"] == "hard" else (
                base["loss"] if base["loss"] != "ce" else "kl")
        base = merged
    try:
        protocol = from_dict(ProtocolConfig, base, where if overrides else "protocol")
    except ConfigError as exc:
        train = (overrides or {}).get("train")
        if (isinstance(train, dict) and "augment" in train and "augment_options" not in train
                and "has no option(s)" in str(exc)):
            # the preset's options were for its own augmentation: WHOLE_DICTS keeps them unless given
            key = f"{where + '.' if where else ''}train.augment_options"
            fix = "add --set train.augment_options={}" if not where else f"add {key}: {{}}"
            raise ConfigError(f"{exc}; the protocol's train.augment_options are kept when train.augment changes: "
                              f"{fix}") from None
        raise
    if overrides and check_inert:
        refuse_inert_overrides(settings, overrides, [protocol], where, in_file=False)
    return protocol


