"""One classifier training loop for teachers, students and full-data references.

All randomness after model initialisation (batch order, augmentation, CutMix) is drawn from one
``torch.Generator`` seeded explicitly, but for dropout masks, which take no generator: they come from
torch's global generators, as the initial weights do, so callers build and train a model inside
:func:`ddkit.determinism.global_rng` with its seed (teachers, experts and students do). Batches and
augmentation are always drawn for the *global* batch: under ``torchrun`` each
rank takes a contiguous slice of every global batch and of its augmentation parameters, and the
per-sample loss is normalised by the global batch size, so a data-parallel run computes the same
updates as a single process (up to floating-point summation order) -- for models without
BatchNorm. BatchNorm layers normalise with the statistics of their rank's slice, as under any DDP
without SyncBatchNorm, so BatchNorm models (``resnet18_cifar``, ``*-bn`` ConvNets) train slightly
differently with more ranks; their running statistics are rank 0's after every epoch, on every rank.
A final global batch with fewer images than ranks is trained whole on every rank (gradients then
average to that batch's own, as in a single process).

Teacher soft labels come from :func:`teacher_forward`, in one of two BatchNorm modes
(:data:`TeacherBN`): ``running`` (the teacher as trained, eval mode: running statistics estimated
on real data) or ``batch`` (CV-DD's "batch-specific soft labels": every BatchNorm layer normalises
with the statistics of the images being labelled, optionally per group of N images, without
touching the teacher's running statistics or parameters).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ddkit import distributed as ddist
from ddkit.artifacts import atomic_torch_save, load_resume_state
from ddkit.config import Checked, field, is_count, short_repr
from ddkit.data.augment import (
    AUGMENTS,
    CutMix,
    Params,
    build_augment,
    check_cutmix,
    slice_params,
    typed_augment_options,
)
from ddkit.data.base import ImageSet, to_device
from ddkit.determinism import global_rng, use_deterministic_cuda
from ddkit.errors import ConfigError, DDKitError

log = logging.getLogger(__name__)

LabelSource = Literal["hard", "teacher", "stored", "fkd"]
LABEL_MODES: tuple[str, ...] = get_args(LabelSource)
LossKind = Literal["ce", "kl", "mse_ce"]
TeacherBN = Literal["running", "batch"]
TEACHER_BN_MODES = ("running", "batch")
Precision = Literal["fp32", "bf16", "fp16"]
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig(Checked):
    """Optimisation recipe shared by teachers and evaluation protocols."""

    epochs: int = field(300, help="passes over the training images")
    batch_size: int = field(256, help="global batch size (split across ranks under torchrun)")
    optimizer: Literal["sgd", "adam", "adamw"] = field("sgd", help="optimizer")
    lr: float = field(0.01, help="peak learning rate")
    momentum: float = field(0.9, help="SGD momentum")
    weight_decay: float = field(5e-4, help="weight decay (L2 for sgd/adam, decoupled for adamw) of every parameter "
                                "(SRe2L's FKD, RDED, EDC and CV-DD student code leave out biases and 1-D (BatchNorm) "
                                "parameters)")
    schedule: Literal["step", "cosine", "smoothing", "constant"] = field(
        "step",
        help="step: lr x0.1 from epoch N//2 on, counting from 0, momentum kept (DC/DSA's halving; their code trains "
        "N+1 epochs, drops after epoch N//2+1 and restarts the optimizer; an odd N spends its extra epoch at the low "
        "lr); cosine; smoothing: EDC's (1+cos(i*pi/(zeta*N)))/2"
    )
    smoothing_zeta: float = field(2.0, help="EDC smoothing-schedule zeta (1.5-2 in the paper)")
    warmup_epochs: int = field(0, help="linear warm-up epochs before the schedule")
    augment: str = field("none", help="none | dsa | rrc_flip | crop_flip | flip")
    augment_options: dict = field({}, help="options for the augmentation (e.g. scale_min for rrc_flip)")
    cutmix_prob: float = field(0.0, help="probability of CutMix per image (0 disables)")
    cutmix_alpha: float = field(1.0, help="CutMix Beta(alpha, alpha)")
    ema_decay: float = field(0.0, help="EMA of student weights used for testing (0 disables; EDC: 0.99); "
                             "the decay warms up as min(decay, (1 + n) / (10 + n)) over updates n")
    eval_batch_size: int = field(1024, help="batch size for test-set evaluation")
    precision: Precision = field("fp32", added=True, help="fp32; bf16 or fp16: mixed precision (torch.autocast) for "
                                 "the forward passes of student, teacher and test, fp16 with loss scaling; weights, "
                                 "optimizer state and losses stay fp32 (see benchmarks/precision.py)")

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0 or math.isinf(self.lr):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ConfigError(f"momentum and weight_decay must be >= 0, got {self.momentum} and {self.weight_decay}")
        if self.momentum >= 1:
            raise ConfigError("momentum must be < 1 (with 1 or more every step's gradient adds up forever), got "
                              f"{self.momentum}")
        if self.smoothing_zeta <= 0:
            raise ConfigError(f"smoothing_zeta must be > 0, got {self.smoothing_zeta}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"warmup_epochs must lie in [0, epochs) = [0, {self.epochs}), got {self.warmup_epochs}")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        check_cutmix(self.cutmix_prob, self.cutmix_alpha)
        if self.augment not in AUGMENTS:  # a ConfigError: from_dict names the section
            raise ConfigError(f"augment: unknown augmentation {self.augment!r}; valid: {', '.join(AUGMENTS)}")
        # fails early on a bad option; numbers as the augmentation types them (recorded and hashed alike)
        self.augment_options = typed_augment_options(self.augment, self.augment_options)


class Diverged(DDKitError):
    """Training stopped at the end of ``epoch`` (1-based) because a weight became non-finite: no later
    epoch can recover it, so the remaining epochs are not run."""

    def __init__(self, epoch: int, epochs: int) -> None:
        super().__init__(f"training diverged at epoch {epoch} of {epochs} (non-finite weights)")
        self.epoch, self.epochs = epoch, epochs


def check_finite_weights(model: nn.Module, epoch: int, epochs: int) -> None:
    """Raise :class:`Diverged` if a parameter of ``model`` holds NaN or inf after ``epoch`` (of ``epochs``)."""
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise Diverged(epoch, epochs)


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict]
    test_accuracy: float | None
    nonfinite: int = 0  # test images whose outputs were NaN or inf (counted as wrong): the model diverged


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """Learning-rate multiplier for ``epoch`` (0-based)."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    e = epoch - cfg.warmup_epochs
    n = max(1, cfg.epochs - cfg.warmup_epochs)
    if cfg.schedule == "step":
        return 0.1 if e >= n // 2 else 1.0
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * e / n))
    if cfg.schedule == "smoothing":
        return 0.5 * (1.0 + math.cos(math.pi * e / (cfg.smoothing_zeta * n)))
    return 1.0


def autocast(device: torch.device | str, precision: Precision) -> contextlib.AbstractContextManager:
    """A fresh ``torch.autocast`` context for ``precision`` on ``device``'s type; fp32: a no-op (a stage
    runs without the caller's autocast: :func:`ddkit.determinism.stage_modes`).

    Autocast runs convolutions and matrix products in the reduced type and keeps reductions such as
    softmax and cross-entropy in fp32 (PyTorch's autocast op lists); parameters stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_AUTOCAST_DTYPES[precision])


def cpu_bf16_support() -> dict[str, bool]:
    """Whether this CPU has the instructions that make bf16 fast: ``{"avx512_bf16": ..., "amx_tile": ...}``."""
    return {name: bool(getattr(torch.cpu, f"_is_{name}_supported", lambda: False)())
            for name in ("avx512_bf16", "amx_tile")}


@functools.cache
def _warn_emulated_bf16() -> None:  # cached: the check and the warning happen once per process
    if not any(cpu_bf16_support().values()):
        log.warning("this CPU has no AVX512-BF16 or AMX: bf16 is emulated and likely slower than fp32; "
                    "use precision fp32 here")


def warn_slow_precision(precision: Precision, device: torch.device) -> None:
    """Log once when bf16 is asked for on a CPU without native support (it then runs emulated)."""
    if precision == "bf16" and device.type == "cpu":
        _warn_emulated_bf16()


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """``cfg``'s optimizer over ``params``, one group: ``cfg.weight_decay`` applies to every parameter, biases
    and BatchNorm weights included, as DC's and DSA's ``evaluate_synset`` and SRe2L's CIFAR-100
    ``relabel_cifar.py`` do. The soft-label student code of SRe2L (``validate/train_FKD.py``), RDED, EDC and
    CV-DD builds two groups instead (their ``get_parameters``): decay only on ``weight`` tensors of more than one
    dimension, none on biases and BatchNorm's 1-D gamma/beta. ddkit's AdamW multiplies those by
    ``1 - lr * weight_decay`` every step: about 1% over a thousand or two steps at lr 1e-3 and weight decay 0.01
    (soft-kl on ddkit's small sets), more at the papers' ImageNet scale."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def normalizer(mean, std, device) -> Callable[[torch.Tensor], torch.Tensor]:
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return lambda x: (x - m) / s


def sum_dtype(device: torch.device | str) -> torch.dtype:
    """dtype of running sums kept on ``device`` (losses, counts) so that reading them costs no host
    sync per step: float64, or float32 on Apple MPS, which has no float64 tensors."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def to_float(images: torch.Tensor, device) -> torch.Tensor:
    x = to_device(images, device)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def per_sample_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor | None,
    loss: LossKind,
    temperature: float,
    ce_weight: float = 0.025,
) -> torch.Tensor:
    """Per-sample loss. ``labels`` are hard labels (or a soft [B, C] mixture), ``targets`` teacher logits.

    - ``ce``: cross-entropy with the (possibly mixed) hard labels.
    - ``kl``: KL(softmax(t/T) || softmax(s/T)) * T^2. The T^2 is Hinton et al. (2015)'s, which keeps the
      gradients' size independent of T; SRe2L's and RDED's code (and EDC's, CV-DD's) train on the unscaled KL
      (``KLDivLoss(reduction="batchmean")``), T^2 times smaller (400x at their T 20): a constant factor, which
      Adam/AdamW nearly ignore but which scales SGD's step (and its balance against weight decay).
    - ``mse_ce``: mean-squared error between student and teacher logits plus ``ce_weight`` x
      cross-entropy with the hard labels (G-VBSM / EDC, weight 0.025); under CutMix those are the mixed labels,
      where EDC's code takes the cross-entropy on the unmixed ones.
    """
    if loss == "ce" or targets is None:
        if labels.dim() == 2:
            return -(labels * F.log_softmax(logits, dim=1)).sum(1)
        return F.cross_entropy(logits, labels, reduction="none")
    if loss == "kl":
        t = temperature
        log_p = F.log_softmax(logits / t, dim=1)
        q = F.softmax(targets / t, dim=1)
        return (q * (torch.log(q.clamp_min(1e-12)) - log_p)).sum(1) * t * t
    mse = (logits - targets).pow(2).mean(1)
    if labels.dim() == 2:
        ce = -(labels * F.log_softmax(logits, dim=1)).sum(1)
    else:
        ce = F.cross_entropy(logits, labels, reduction="none")
    return mse + ce_weight * ce


def mix_targets(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, loss: LossKind,
                temperature: float) -> torch.Tensor:
    """Stored target logits ``a`` and ``b`` [B, C] of a CutMix pair as one target for ``loss``, ``lam`` [B]
    being ``a``'s pixel fraction. ``kl`` mixes what it trains on, the distributions at ``temperature``
    (as CutMix mixes one-hot labels): the result is ``T * log(lam * p_a + (1 - lam) * p_b)``, whose
    softmax at ``T`` is that mixture exactly. ``mse_ce`` regresses logits, so it mixes the logits."""
    lam = lam[:, None]
    if loss != "kl":
        return lam * a + (1 - lam) * b
    t = temperature
    return t * torch.log(lam * F.softmax(a / t, dim=1) + (1 - lam) * F.softmax(b / t, dim=1))


# --- teacher BatchNorm modes ---------------------------------------------------------------------

_WARNED_NO_BN: weakref.WeakSet = weakref.WeakSet()


def check_teacher_bn(mode: str, group: int | None, name: str = "teacher_bn") -> None:
    """Raise :class:`ConfigError` unless ``mode`` is a :data:`TeacherBN` and ``group`` (the setting
    ``<name>_batch``) is ``None`` or a positive image count given with mode ``batch``."""
    if mode not in TEACHER_BN_MODES:
        raise ConfigError(f"{name} must be 'running' or 'batch', got {short_repr(mode)}; set {name}=running or "
                          f"{name}=batch")
    if group is None:
        return
    if not is_count(group):
        raise ConfigError(f"{name}_batch must be a number of images >= 1 (or null: the whole batch), got "
                          f"{short_repr(group)}")
    if mode != "batch":
        raise ConfigError(f"{name}_batch={group} only applies with {name} 'batch'; set {name}=batch or drop "
                          f"{name}_batch")


def omit_running_bn(settings: dict, name: str = "teacher_bn") -> dict:
    """``settings`` (a config as a dict, changed in place and returned) without ``name`` and
    ``<name>_batch`` while they are ``running`` and ``None``: identities and hashes of configs made
    before the BatchNorm mode existed stay valid."""
    if settings.get(name) == "running" and settings.get(f"{name}_batch") is None:
        settings.pop(name, None)
        settings.pop(f"{name}_batch", None)
    return settings


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of ``model`` (any dimension, SyncBatchNorm too), in module order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[int]:
    """Inside the block every BatchNorm layer of ``model`` normalises each forward pass with that
    pass's own batch statistics (mean and biased variance over batch and space) and updates nothing:
    its ``training`` flag is set and ``track_running_stats`` cleared, so running statistics and
    ``num_batches_tracked`` are neither used nor written; both flags are restored on exit. Other
    modules keep their mode (a teacher's dropout stays off). Yields the number of BatchNorm layers."""
    layers = batchnorm_layers(model)
    if not layers and model not in _WARNED_NO_BN:
        _WARNED_NO_BN.add(model)
        log.warning("teacher %s has no BatchNorm layers: batch-statistics labels equal running-mode ones",
                    type(model).__name__)
    saved = [(m.training, m.track_running_stats) for m in layers]
    try:
        for m in layers:
            m.training, m.track_running_stats = True, False
        yield len(layers)
    finally:
        for m, (training, track) in zip(layers, saved, strict=True):
            m.training, m.track_running_stats = training, track


def _teacher_modules(teacher) -> list[nn.Module]:
    """The modules of a ``teacher`` argument: a module, a Teacher (its ``model``) or a list of them; none for a path."""
    if isinstance(teacher, nn.Module):
        return [teacher]
    if isinstance(getattr(teacher, "model", None), nn.Module):
        return [teacher.model]
    if isinstance(teacher, (list, tuple)):
        return [m for t in teacher for m in _teacher_modules(t)]
    return []


def keeps_teacher_modes(fn: Callable) -> Callable:
    """Decorator of a stage that puts the modules of its ``teacher`` argument in eval mode: after it (an exception
    too), every submodule's train/eval flag is back as the caller left it (a module being fine-tuned keeps training
    with dropout and BatchNorm on). The device it moved them to stays (README, Teachers)."""
    import inspect

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            teacher = signature.bind_partial(*args, **kwargs).arguments.get("teacher")
        except TypeError:  # wrong arguments: the stage says so
            teacher = None
        modes = [(m, m.training) for model in _teacher_modules(teacher) for m in model.modules()]
        try:
            return fn(*args, **kwargs)
        finally:
            for m, training in modes:
                m.training = training

    return wrapper


# the start of torch's ValueError when a BatchNorm layer in training mode meets one value per channel: a batch (or
# group) of one image reaching a 1x1 feature map
ONE_VALUE_PER_CHANNEL = "Expected more than 1 value per channel when training"


@contextlib.contextmanager
def one_image_batch(model: nn.Module, cause: Callable[[], tuple[str, str]]) -> Iterator[None]:
    """Turn torch's ValueError for a batch of one image at a BatchNorm layer of ``model`` on a 1x1 feature map
    into a one-line :class:`ConfigError`: ``cause()`` gives the setting that made that batch, and its fix. Other
    ValueErrors pass through."""
    try:
        yield
    except ValueError as exc:
        if not str(exc).startswith(ONE_VALUE_PER_CHANNEL):
            raise
        what, fix = cause()
        name = type(model).__name__ + (f" ({model.arch})" if isinstance(getattr(model, "arch", None), str) else "")
        raise ConfigError(f"{what}, and {name}'s BatchNorm meets a 1x1 feature map there, which needs "
                          f"2 images to normalise; {fix}") from None


def _last_one(setting: str, size: int, n: int, unit: str) -> tuple[str, str]:
    """:func:`one_image_batch`'s cause and fix for ``n`` images cut into ``unit``-s of ``size`` (``setting``)."""
    if n == 1:
        return f"{setting}={size} on 1 image gives a {unit} of 1 image", "use 2 or more images"
    if size == 1:
        return f"{setting}=1 makes every {unit} 1 image", f"set {setting} to 2 or more"
    return (f"{setting}={size} on {n} images leaves a last {unit} of 1 image",
            f"pick a {setting} that leaves no single image over")


@torch.no_grad()
def teacher_forward(model: nn.Module, x: torch.Tensor, bn: TeacherBN = "running",
                    group: int | None = None) -> torch.Tensor:
    """Float logits of the teacher ``model`` on normalised images ``x``, without gradients.

    ``bn="running"``: the model as it is (a teacher is in eval mode, so BatchNorm uses its running
    statistics). ``bn="batch"``: BatchNorm uses the statistics of each group of ``group`` consecutive
    rows of ``x`` (``None``: all of ``x``; a last group may be smaller), so a row's logits depend only
    on the rows of its own group (:func:`batch_statistics`). A module whose weights are in another
    floating dtype (a caller's bfloat16 or float64 teacher) gets ``x`` in the dtype of its first one.
    """
    weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
    x = x.to(weights)  # float32 weights: x itself
    if bn == "running":
        return _logits(model, x)
    with batch_statistics(model):
        if group is None or group >= len(x):
            return _logits(model, x)
        return torch.cat([_logits(model, part) for part in x.split(group)])


def check_teacher_logits(model: nn.Module, image_shape, num_classes: int, device, what: str = "data") -> None:
    """One-line DDKitError unless the teacher ``model`` gives ``[B, num_classes]`` logits (:func:`teacher_forward`) on
    two zero images of ``image_shape``, the global random state left alone: for a module whose contract nothing
    checked where it was built (a bare module, a caller's own). ``what``: whose classes they are, for the message."""
    with global_rng(device=device):
        probe = teacher_forward(model, torch.zeros(2, *image_shape, device=device))
    if list(probe.shape) != [2, num_classes]:
        raise DDKitError(f"teacher gives logits {list(probe.shape)} for 2 images but the {what} has {num_classes} "
                         "classes; use the teacher of this dataset")


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` as float logits, refused in one line where the teacher gives another object (a tuple of logits and
    features: a bare module or a caller's own in a Teacher, whose contract nothing checked where it was built)."""
    out = model(x)
    if not isinstance(out, torch.Tensor):
        raise DDKitError(f"the teacher's model(x) gives a {type(out).__name__}, not a logits tensor [B, num_classes]; "
                         "pass a teacher whose forward returns the logits alone")
    return out.float()


def label_groups(n: int, batch_size: int, bn: TeacherBN, group: int | None, gen: torch.Generator) -> list[torch.Tensor]:
    """Index batches for labelling ``n`` fixed images, one teacher forward pass each.

    ``running``: consecutive batches of ``batch_size`` (speed only; ``gen`` is not used). ``batch``:
    every batch is one BatchNorm group: a permutation of the images drawn from ``gen`` cut into
    groups of ``group`` (``None``: one group of all ``n``), so groups mix classes even when the set
    is stored class by class, and the labels do not depend on ``batch_size``.
    """
    if n == 0:
        return []
    if bn == "running":
        return list(torch.arange(n).split(batch_size))
    return list(torch.randperm(n, generator=gen).split(group or n))


@torch.no_grad()
def teacher_labels(model: nn.Module, views: Callable[[torch.Tensor], torch.Tensor], n: int, batch_size: int,
                   bn: TeacherBN, group: int | None, gen: torch.Generator, name: str = "teacher_bn") -> torch.Tensor:
    """``[n, C]`` CPU float logits of the teacher ``model`` on ``n`` fixed images, row ``i`` for image
    ``i``: one :func:`teacher_forward` per :func:`label_groups` batch on ``views(idx)`` (the normalised,
    possibly augmented, views of the images ``idx``). An empty tensor when ``n`` is 0. ``name``: the
    setting of ``bn`` (``<name>_batch`` that of ``group``), named by the error of a group of one image."""
    check_teacher_bn(bn, group, name)
    groups = label_groups(n, batch_size, bn, group, gen)
    if not groups:
        return torch.zeros(0)
    with one_image_batch(model, lambda: _last_one(f"{name}_batch", group, n, "group") if group else
                         (f"{name}=batch on 1 image", f"use {name}=running")):
        parts = [teacher_forward(model, views(idx), bn).cpu() for idx in groups]
    out = torch.empty((n, parts[0].shape[1]))
    out[torch.cat(groups)] = torch.cat(parts)
    return out


class NonFiniteOutputs(DDKitError):
    """A model gave NaN or inf outputs in eval mode (its weights may be finite: BatchNorm running statistics)."""


def accuracy(model: nn.Module, data: ImageSet, mean, std, device, batch_size: int = 1024, distributed: bool = False,
             transform: Callable[[torch.Tensor], torch.Tensor] | None = None, precision: Precision = "fp32",
             nonfinite: Literal["warn", "raise"] = "warn") -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` on ``data``; shards over ranks if distributed.
    ``transform`` (e.g. ZCA whitening) is applied to the normalised images; ``precision``: the
    forward pass's autocast (:func:`autocast`). An image whose outputs are not all finite counts as
    wrong (an argmax over NaN would name a class), with a warning, or :class:`NonFiniteOutputs` with
    ``nonfinite="raise"`` (every rank raises together)."""
    return _accuracy(model, data, mean, std, device, batch_size, distributed, transform, precision, nonfinite)[0]


@torch.no_grad()
def _accuracy(model: nn.Module, data: ImageSet, mean, std, device, batch_size: int, distributed: bool,
              transform: Callable[[torch.Tensor], torch.Tensor] | None, precision: Precision,
              nonfinite: Literal["warn", "raise"]) -> tuple[float, int]:
    """:func:`accuracy`, and the number of test images whose outputs are not all finite."""
    info = ddist.current() if distributed else ddist.DistInfo()
    norm = normalizer(mean, std, device)
    was_training = model.training
    model.eval()
    n = len(data)
    lo, hi = n * info.rank // info.world_size, n * (info.rank + 1) // info.world_size
    counts = torch.zeros(3, dtype=sum_dtype(device), device=device)  # right, seen, non-finite
    for start in range(lo, hi, batch_size):
        stop = min(hi, start + batch_size)
        x = norm(to_float(data.images[start:stop], device))
        if transform is not None:
            x = transform(x)
        with autocast(device, precision):
            out = model(x)
        finite = torch.isfinite(out).all(1)
        counts[0] += ((out.argmax(1) == to_device(data.labels[start:stop], device)) & finite).sum()  # no host sync
        counts[1] += stop - start
        counts[2] += (~finite).sum()
    if distributed:
        ddist.all_reduce_sum(counts)
    model.train(was_training)
    right, seen, bad = counts.tolist()  # divided as Python floats: exact counts give the same fraction in float32
    if bad:
        text = (f"{int(bad)} of {int(seen)} test images give non-finite outputs (NaN/inf) in eval mode, counted as "
                "wrong")
        if nonfinite == "raise":
            raise NonFiniteOutputs(text)
        log.warning("%s: the model diverged, or its BatchNorm running statistics are degenerate", text)
    return (right / seen if seen > 0 else float("nan")), int(bad)


class EMA:
    """Exponential moving average of a model's weights (buffers copied), used for testing.

    The decay warms up: update ``n`` (from 0) uses ``min(decay, (1 + n) / (10 + n))``, as
    TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` and timm's EMA warm-up do. Without
    it a short schedule tests weights that still hold ``decay ** steps`` of the initialisation
    (0.99 over the 160 steps of an IPC-10 run: 20 %), while BatchNorm buffers, copied from the live
    model, describe the trained weights: a BatchNorm student then scores near chance.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.mul_(d).add_(p.detach(), alpha=1 - d)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)
        self.updates += 1


def _step(optimizer: torch.optim.Optimizer, batch_loss: torch.Tensor, model: nn.Module, ema: EMA | None,
          scaler: torch.amp.GradScaler | None = None) -> None:
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        batch_loss.backward()
        optimizer.step()
    else:  # fp16: scaled loss; a step whose gradients overflow is skipped and the scale halved
        scaler.scale(batch_loss).backward()
        scaler.step(optimizer)  # syncs with the host anyway (it reads found_inf)
        before = scaler.get_scale()
        scaler.update()
        if scaler.get_scale() < before:  # the scale only drops on a skipped step: the weights did not move,
            return  # so neither does their average
    if ema is not None:
        ema.update(model)


def needed_rows(gb: int, lo: int, hi: int, mix_params: Params | None, whole: bool = False) -> torch.Tensor:
    """The rows of a global batch of ``gb`` images that a rank training on rows ``lo:hi`` reads, sorted: its
    own and, with CutMix (``mix_params``), their partners, which may sit in another rank's slice. Every row
    when ``whole``: a teacher labelling with the global batch's statistics sees all of it, and a transform
    (ZCA, a matrix product) is applied to the whole batch, whose sums may round otherwise on fewer rows."""
    if whole or (lo, hi) == (0, gb):
        return torch.arange(gb)
    rows = torch.arange(lo, hi)
    if mix_params is None:
        return rows
    return torch.unique(torch.cat([rows, mix_params["perm"][lo:hi]]))  # sorted


def own_rows(need: torch.Tensor, lo: int, hi: int) -> slice:
    """Where rows ``lo:hi`` of the global batch sit in ``need`` (sorted, holding them all): one run of rows."""
    start = int((need < lo).sum())
    return slice(start, start + hi - lo)


def partner_params(mix_params: Params, need: torch.Tensor, lo: int, hi: int) -> Params:
    """CutMix parameters (drawn for the whole global batch) for its rows ``need`` (see :func:`needed_rows`):
    rows ``lo:hi`` take their partner's box as in the whole batch; the other rows, only partners read by
    them, stay unmixed."""
    if len(need) == len(mix_params["perm"]):
        return mix_params
    mine = (need >= lo) & (need < hi)
    return {
        "perm": torch.where(mine, torch.searchsorted(need, mix_params["perm"][need]), torch.arange(len(need))),
        "box": torch.where(mine[:, None], mix_params["box"][need], 0),
        "lam": torch.where(mine, mix_params["lam"][need], 1.0),
        "apply": mix_params["apply"][need] & mine,
    }


@keeps_teacher_modes
def train_classifier(
    model: nn.Module,
    data: ImageSet,
    mean,
    std,
    cfg: TrainConfig,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    label_source: LabelSource = "hard",
    loss: LossKind = "ce",
    temperature: float = 4.0,
    teacher: nn.Module | None = None,
    teacher_bn: TeacherBN = "running",
    teacher_bn_batch: int | None = None,
    stored_targets: torch.Tensor | None = None,
    fkd_store=None,
    test: ImageSet | None = None,
    distributed: bool = False,
    state_path: str | Path | None = None,
    eval_every: int = 0,
    progress: Callable[[int, int, dict], None] | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stop_if_diverged: bool = False,
    settings: str = "train",
) -> TrainResult:
    """Train ``model`` on pixel-space ``data`` and return it with its history and test accuracy.

    ``label_source``: ``hard`` uses ``data.labels``; ``teacher`` queries ``teacher`` on every augmented
    batch (online soft labels; ``teacher_bn``/``teacher_bn_batch``: its BatchNorm mode and group size,
    see :func:`teacher_forward`; under DDP batch statistics are those of the global batch, as in one
    process); ``stored`` uses ``stored_targets`` (logits [N, C], one row per image);
    ``fkd`` replays ``fkd_store`` (a :class:`~ddkit.labels.SoftLabelStore`): student epoch ``e`` sees the
    stored views of store epoch ``e % store.epochs`` (its augmentation and CutMix replace ``cfg``'s)
    with their stored teacher logits, whatever the batch size or number of ranks.
    ``state_path``: a checkpoint written after every epoch; if it exists the run resumes from it.
    ``distributed``: data-parallel over the ranks of an initialised process group (DDP).
    ``transform``: a fixed map of the normalised images (ZCA whitening), applied to training batches
    before augmentation and CutMix, as MTT's students see whitened images augmented, and to the test
    images; label modes hard and stored only. CutMix (``cfg.cutmix_prob``) mixes the augmented views,
    as the FKD store does. ``stop_if_diverged``: after each epoch, raise :class:`Diverged` (before that
    epoch's checkpoint) if a weight is non-finite, instead of training the remaining epochs on NaN; and
    :class:`NonFiniteOutputs` if the final test accuracy meets non-finite outputs. ``settings``: where ``cfg``
    sits in the user's config (``train``, ``teacher.train``), named by errors.
    """
    device = torch.device(device)
    use_deterministic_cuda(device)
    warn_slow_precision(cfg.precision, device)
    info = ddist.current() if distributed else ddist.DistInfo()
    check_teacher_bn(teacher_bn, teacher_bn_batch)
    if label_source == "teacher" and teacher is None:
        raise ConfigError("label mode 'teacher' needs a teacher; pass --teacher DIR")
    if label_source == "stored" and stored_targets is None:
        raise ConfigError("label mode 'stored' needs soft labels in the distilled set; distil with --soft-labels")
    if label_source == "fkd" and fkd_store is None:
        raise ConfigError("label mode 'fkd' needs a store made by `ddkit relabel`; set fkd_store=DIR")
    if label_source == "hard" and loss != "ce":
        raise ConfigError(f"loss {loss!r} needs soft labels; use label_mode teacher or stored, or loss ce")
    if transform is not None and label_source not in ("hard", "stored"):
        raise ConfigError(f"a transform (ZCA) of the student's images leaves label mode {label_source!r} without the "
                          "teacher's views of the plain images; use label mode hard or stored")
    if len(data) == 0:
        raise ConfigError("no training images")

    model = model.to(device)
    norm = normalizer(mean, std, device)
    fkd = label_source == "fkd"
    augment = None if fkd else build_augment(cfg.augment, **cfg.augment_options)
    cutmix = CutMix(cfg.cutmix_alpha, cfg.cutmix_prob) if cfg.cutmix_prob > 0 and not fkd else None
    image_size = tuple(data.images.shape[-2:])
    if teacher is not None:
        teacher = teacher.to(device).eval()
    if stored_targets is not None:
        stored_targets = stored_targets.float()

    optimizer = make_optimizer(cfg, model.parameters())
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None

    def amp() -> contextlib.AbstractContextManager:
        return autocast(device, cfg.precision)

    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    gen = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    start_epoch = 0

    state_path = Path(state_path) if state_path else None
    if state_path is not None and state_path.exists():
        state = load_resume_state(state_path)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            if "torch_rng" in state:  # dropout draws from the global generators
                torch.set_rng_state(state["torch_rng"])
                if device.type == "cuda" and "cuda_rng" in state:
                    torch.cuda.set_rng_state(state["cuda_rng"], device)
            if scaler is not None and "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            if ema is not None:
                ema.model.load_state_dict(state["ema"])
                ema.updates = int(state.get("ema_updates", 0))
            history = list(state["history"])
            start_epoch = int(state["epoch"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise DDKitError(f"resume checkpoint {str(state_path)!r} does not hold this training's state "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}); "
                             "delete it to start afresh") from None
        log.info("resumed from %s at epoch %d", state_path, start_epoch)

    net: nn.Module = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    n = len(data)
    bs = min(cfg.batch_size, n)

    def one_image(rows: int) -> tuple[str, str]:  # the cause of a batch of 1 image: see one_image_batch
        if rows < gb:  # this rank's slice of a larger batch
            return (f"{settings}.batch_size={cfg.batch_size} over {info.world_size} ranks gives a rank 1 image of a "
                    f"batch of {gb}", f"pick a {settings}.batch_size that gives every rank 2 or more images")
        return _last_one(f"{settings}.batch_size", cfg.batch_size, n, "batch")

    def one_teacher_image(rows: int) -> tuple[str, str]:
        if teacher_bn_batch is not None and teacher_bn_batch < rows:
            return _last_one("teacher_bn_batch", teacher_bn_batch, rows, "group")
        what, fix = one_image(rows)
        return f"teacher_bn=batch with {what}", fix
    if progress is not None and start_epoch < cfg.epochs:  # a bar from the start, not after the first epoch
        progress(start_epoch, cfg.epochs, {})
    for epoch in range(start_epoch, cfg.epochs):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, epoch)
        net.train()
        perm = torch.randperm(n, generator=gen)
        total, count = torch.zeros((), dtype=sum_dtype(device), device=device), 0  # no host sync per step
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            gb = len(idx)
            aug_params = augment.sample(gb, gen, image_size) if augment is not None else None
            mix_params = cutmix.sample(gb, gen, image_size) if cutmix is not None else None
            if info.enabled and gb < info.world_size:
                # too few samples to give every rank one: every rank trains on the whole batch, so the
                # gradient averaged over ranks is that batch's mean gradient, as in a single process
                lo, hi, scale = 0, gb, 1.0 / gb
                counts = info.is_main  # the epoch's loss counts the batch once, on rank 0
            else:
                lo, hi = gb * info.rank // info.world_size, gb * (info.rank + 1) // info.world_size
                scale = info.world_size / gb  # DDP averages over ranks: the global batch's mean loss
                counts = True
            if fkd:  # stored views (own augmentation + CutMix box from the partner) and their logits
                # of this rank's rows only: a row's replay is the same whatever else the batch holds
                r = fkd_store.replay(epoch % fkd_store.epochs, idx[lo:hi])
                x = fkd_store.render(r, data.images, mean, std, device)
                with amp(), one_image_batch(model, functools.partial(one_image, len(x))):
                    logits = net(x).float()
                lam, classes = r.lam[:, None], logits.shape[1]  # one-hot of the batch's labels only (not the set's)
                own = F.one_hot(data.labels[r.indices].long(), classes).float()
                partner = F.one_hot(data.labels[r.partner].long(), classes).float()
                labels = to_device(lam * own + (1 - lam) * partner, device)
                targets = to_device(r.targets, device)
            else:
                # the rows of the global batch this rank reads (sorted): its slice and the slice's CutMix
                # partners, or every row where each rank needs the whole batch (see needed_rows);
                # ``mine`` picks the slice out of them
                need = needed_rows(gb, lo, hi, mix_params, whole=(
                    transform is not None or (label_source == "teacher" and teacher_bn == "batch" and info.enabled)))
                mine = own_rows(need, lo, hi)
                x_all = norm(to_float(data.images[idx[need]], device))
                if transform is not None:
                    x_all = transform(x_all)
                y_all = to_device(data.labels[idx[need]], device)
                if cutmix is not None:
                    # CutMix pastes a box of the partner's view into the image's view (after crop and flip,
                    # as SRe2L, RDED and CV-DD mix), so lam is the share of the view each image fills;
                    # partners may sit in another rank's slice: every rank augments the partners it needs
                    if augment is not None:
                        x_all = augment.apply(x_all, aug_params if len(need) == gb else slice_params(aug_params, need))
                    x_all, partner, lam = cutmix.apply(x_all, partner_params(mix_params, need, lo, hi))
                    lam = to_device(lam, device)
                    partner = to_device(partner, device)
                    x = x_all[mine]
                elif augment is not None:
                    x = augment.apply(x_all[mine], slice_params(aug_params, slice(lo, hi)))
                else:
                    x = x_all[mine]
                with amp(), one_image_batch(model, functools.partial(one_image, len(x))):
                    logits = net(x).float()
                labels: torch.Tensor = y_all[mine]
                targets = None
                if cutmix is not None:
                    onehot = F.one_hot(y_all, logits.shape[1]).float()
                    labels = (lam[:, None] * onehot + (1 - lam[:, None]) * onehot[partner])[mine]
                if label_source == "teacher" and teacher_bn == "batch" and info.enabled:
                    # BatchNorm statistics of the global batch (every rank labels it whole), not of this rank's slice
                    xt = augment.apply(x_all, aug_params) if augment is not None and cutmix is None else x_all
                    with amp(), one_image_batch(teacher, functools.partial(one_teacher_image, len(xt))):
                        targets = teacher_forward(teacher, xt, teacher_bn, teacher_bn_batch)[lo:hi]
                elif label_source == "teacher":
                    with amp(), one_image_batch(teacher, functools.partial(one_teacher_image, len(x))):
                        targets = teacher_forward(teacher, x, teacher_bn, teacher_bn_batch)
                elif label_source == "stored":
                    t_all = to_device(stored_targets[idx[need]], device)
                    if cutmix is not None:
                        t_all = mix_targets(t_all, t_all[partner], lam, loss, temperature)
                    targets = t_all[mine]
            per = per_sample_loss(logits, labels, targets, loss, temperature)
            _step(optimizer, per.sum() * scale, model, ema, scaler)
            if counts:
                total += per.detach().sum().to(total.dtype)
                count += len(per)
        if info.enabled:  # each rank summed its own slices: the epoch's loss is over every image, as in one process
            sums = ddist.all_reduce_sum(
                torch.stack([total, torch.tensor(float(count), dtype=total.dtype, device=device)]))
            total, count = sums[0], int(sums[1])
            # every rank evaluates and saves the same BatchNorm statistics (rank 0's)
            ddist.broadcast_buffers(model)
            if ema is not None:
                ddist.broadcast_buffers(ema.model)
        record = {"epoch": epoch + 1, "loss": float(total) / max(count, 1), "lr": optimizer.param_groups[0]["lr"]}
        if test is not None and eval_every and ((epoch + 1) % eval_every == 0) and epoch + 1 < cfg.epochs:
            record["test_accuracy"] = accuracy(
                ema.model if ema else model, test, mean, std, device, cfg.eval_batch_size, distributed,
                transform=transform, precision=cfg.precision,
            )
        if stop_if_diverged:  # every rank holds the same weights, so every rank stops together
            check_finite_weights(model, epoch + 1, cfg.epochs)
        history.append(record)
        if state_path is not None and info.is_main:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                "history": history,
                "epoch": epoch + 1,
            }
            if ema is not None:
                state["ema"] = ema.model.state_dict()
                state["ema_updates"] = ema.updates
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            atomic_torch_save(state, state_path)
        if state_path is not None and info.enabled:
            ddist.barrier()
        if progress is not None:
            progress(epoch + 1, cfg.epochs, record)

    final = ema.model if ema is not None else model
    acc, bad = None, 0
    if test is not None:
        acc, bad = _accuracy(final, test, mean, std, device, cfg.eval_batch_size, distributed, transform,
                             cfg.precision, "raise" if stop_if_diverged else "warn")
        if history:
            history[-1]["test_accuracy"] = acc
    return TrainResult(model=final, history=history, test_accuracy=acc, nonfinite=bad)
