"""Trajectory matching: MTT, TESLA, FTD, DATM and AST (``shq``).

All five distil by the same loop (see :mod:`ddkit.methods.trajectory` for the buffer and the
unrolled student): each iteration samples an expert and a start epoch ``t``, starts a student at
the expert's parameters ``θ*_t``, takes ``syn_steps`` SGD steps with the learnable learning rate on
(DSA-augmented) synthetic minibatches, and moves the images (and the lr, and learned labels) to
reduce ``||θ_N − θ*_{t+M}||² / ||θ*_t − θ*_{t+M}||²`` (``M = expert_epochs``).

``trajectories: k`` draws ``k`` such segments per iteration (each: expert, ``t``, minibatch and
augmentation plan, weight perturbation, in that order, from the run's one seeded generator) and
steps on the mean of their gradients (images, lr, learned labels) and of their losses; ``k = 1``
is the references' loop. Under ``torchrun`` segment ``j`` is computed by rank ``j % world_size``
while every rank takes every draw, and the per-rank sums are all-reduced, so all ranks take the
same step as one process: bit for bit for ``k <= 2`` (one two-operand sum plus zeros has no
order), to float rounding for larger ``k`` (the ranks' partial sums change the summation order).
Use ``k`` a multiple of the world size (fewer segments than ranks leaves ranks idle, with a
warning). Rank 0 writes the checkpoints; every rank resumes from them.

Images are optimised in normalised space (as the references, which optimise the normalised or
ZCA-whitened tensors) and returned in pixel space, unclamped. ``meta["syn_lr"]`` holds the learned
learning rate; a protocol with ``learned_lr: true`` trains the students with it, as MTT's evaluation.

Per-IPC settings of the papers (CIFAR-10, ConvNet-3; lr_img values marked ZCA were tuned for
ZCA-whitened images: set ``buffer.zca: true``, see below). DATM rows: the authors' configs
(``configs/CIFAR-10/ConvIN/IPC{1,10,50}.yaml``). MTT rows: the paper's appendix table, not
re-checked against the PDF here (the repository ships no per-IPC configs) — verify before quoting:

===========  =========  =============  ===============  ==============  =======  ============
method/IPC   syn_steps  expert_epochs  start window     lr_img          lr_lr    lr_teacher
===========  =========  =============  ===============  ==============  =======  ============
MTT 1        50         2              [0, 2)           1000 (ZCA)      1e-7     0.01
MTT 10       30         2              [0, 20)          1e5 (ZCA) [*]   1e-5     0.01
MTT 50       30         2              [0, 40)          1000 (no ZCA)   1e-5     0.01
DATM 1       80         2              [0, 4)           100 (ZCA)       1e-7     0.01
DATM 10      80         2              [0, 10→20)/1000  100 (ZCA)       1e-5     0.01
DATM 50      80         2              [0, 20→40)/2000  1000 (ZCA)      1e-5     0.01
===========  =========  =============  ===============  ==============  =======  ============

[*] A typo in MTT's table, confirmed by its author (mtt-distillation issue #31: with 1e5 the learned lr
explodes); 100 to 1000 is stable, and FTD's Table 7, which re-runs MTT's CIFAR-10 settings, uses 100.

DATM also: lr_y 5 (IPC 1) or 2, label momentum 0.9, skip the update when the loss exceeds
``threshold`` (1.1 at IPC 1, else 1.0), real images the experts classify correctly as init.
"``[0, 10→20)/1000``": the upper end of the start-epoch window grows linearly from 10 to 20 over
the first 1000 iterations (DATM's sequential generation).

ZCA: ``buffer: {zca: true}`` (or an expert buffer made with ``zca: true``) trains the experts on
ZCA-whitened images (:mod:`ddkit.data.zca`: fitted on raw pixels with regularisation 0.1, as MTT's
kornia call); the method
then initialises, unrolls and matches in whitened space and maps the images back to pixel space
(``ZCA.invert``) for the artifact, so every protocol can read them. ``meta["zca_reg"]`` marks such
a set: MTT's evaluation trains its students on whitened images, which a protocol with ``zca: true``
does (the random subset and full-data reference whitened too); a plain protocol evaluates the
un-whitened images, and ``evaluate`` warns.

AST (``shq``) adds options that every method here accepts (all off by default): ``init:
representative`` (``representative_clusters``), ``balance_loss``, ``intermediate_matching``,
``weight_perturb``, ``inner_momentum``, and expert recipes with ``buffer.clip_loss`` /
``buffer.grad_penalty`` / ``buffer.lr_drop``; see :class:`SHQ`. FTD adds ``image_ema`` (the result
is an EMA of the images) and GSAM experts (``buffer.sam_alpha``); see :class:`FTD`. FYI's
``flip_plugin`` (every method here) unrolls the student on each minibatch with its mirror images.

Fashion-MNIST (1x28x28, no ZCA): keep the table's steps and windows, take lr_img 1000 (MTT's
non-ZCA value) and DSA with flips (as DSA does on Fashion-MNIST). The defaults of each Config are
the IPC-1 row, so set the IPC-10/50 rows' ``lr_lr`` and ``syn_steps`` yourself: an unroll too short
for its expert segment makes the images worse than their real initialisation (on Fashion-MNIST IPC
10, 10 steps per expert epoch: 4 points below the random subset; 30 steps with lr_lr 1e-5: above it;
see ``docs/results/mtt-steps-fashion-mnist-cpu.md``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ddkit import distributed as ddist
from ddkit.config import Checked, field, field_default
from ddkit.data.augment import build_augment, typed_augment_options, warn_digit_flips
from ddkit.data.base import DataBundle
from ddkit.errors import ConfigError, DDKitError
from ddkit.methods.base import METHODS, FitContext, Method, SyntheticSet, check_ipc
from ddkit.methods.common import init_images, report, to_normalized, to_pixels
from ddkit.methods.fyi import warn_digit_mirrors
from ddkit.methods.matching import legacy_fingerprint, resumable, state_fingerprint
from ddkit.methods.random import stratified_indices
from ddkit.methods.trajectory import (
    ZCA_SPACE,
    ExpertBuffer,
    ExpertConfig,
    FunctionalStudent,
    GradientMode,
    Intermediate,
    MatchResult,
    Step,
    buffer_for,
    buffer_identity,
    intermediate_terms,
    perturb_start,
    plan_steps,
    trajectory_gradients,
)

log = logging.getLogger(__name__)

_SMOKE_BUFFER = {"model": "tiny_convnet", "num_experts": 1, "epochs": 3, "batch_size": 32}
_SMOKE = {"buffer": _SMOKE_BUFFER, "iterations": 3, "syn_steps": 3, "expert_epochs": 1, "max_start_epoch": 2,
          "lr_img": 100.0, "lr_lr": 1e-5, "checkpoint_every": 1}


def window_problem(cfg: MTTConfig, epochs: int) -> str | None:
    """Why experts of ``epochs`` epochs cannot serve ``cfg``'s start window, or None if they can."""
    need = cfg.max_start_epoch - 1 + cfg.expert_epochs
    if need <= epochs:
        return None
    return (f"start epochs up to {cfg.max_start_epoch - 1} plus expert_epochs {cfg.expert_epochs} need experts of at "
            f"least {need} epochs, but they have {epochs}; lower max_start_epoch/expert_epochs or train longer experts")


@dataclass
class MTTConfig(Checked):
    """Settings of trajectory matching (defaults: MTT, CIFAR-10 IPC 1); ``trajectories`` segments per
    iteration, spread over the ranks under ``torchrun``."""

    experts: str | None = field(None, help="expert-buffer artifact; unset: train `buffer` on the fly")
    buffer: ExpertConfig = field(factory=ExpertConfig, help="expert recipe when `experts` is unset")
    iterations: int = field(5000, help="distillation iterations (MTT default 5000)")
    trajectories: int = field(
        1, help="expert segments per iteration; their gradients are averaged (references: 1). Under torchrun "
        "segment k runs on rank k % world size: use a multiple of the number of processes")
    syn_steps: int = field(50, help="student SGD steps on synthetic data per iteration (N)")
    expert_epochs: int = field(2, help="expert epochs between start and target parameters (M)")
    min_start_epoch: int = field(0, help="smallest start epoch t")
    max_start_epoch: int = field(2, help="start epochs are drawn from [min_start_epoch, max_start_epoch)")
    lr_img: float = field(1000.0, help="SGD lr of the (normalised) synthetic images")
    lr_lr: float = field(1e-7, help="SGD lr of the learnable student lr (of its log if log_lr)")
    lr_teacher: float = field(0.01, help="initial student lr (the experts' lr)")
    log_lr: bool = field(False, help="learn log(lr) instead of lr (the references learn lr itself)")
    momentum: float = field(0.5, help="SGD momentum of the image and lr optimisers (references: 0.5)")
    batch_syn: int | None = field(None, help="synthetic minibatch per student step (None: all images)")
    init: Literal["real", "noise", "representative"] = field(
        "real", help="initial images: stratified real subset, noise, or representative (AST: per class, the "
        "real images nearest to k-means centres of the last-epoch expert's logits)")
    augment: str = field("dsa", help="augmentation inside the unroll (dsa as the references; none)")
    augment_options: dict = field({}, help="options of the augmentation (dsa: flip=false for digits)")
    gradient: GradientMode = field(
        "unroll", help="unroll: backprop through all steps (MTT); exact: same gradient, memory of one step; "
        "first_order: TESLA's reference approximation")
    checkpoint_every: int = field(100, operational=True, help="iterations between resumable checkpoints in the work "
                                  "dir (not part of the set's identity)")
    balance_loss: bool = field(
        False, help="AST balanced inner loss: scale the student's cross-entropy by log_5(t − h + 8) when the start "
        "epoch t >= h = max_start_epoch // 2, else by 1 / log_5(h − t + 8)")
    intermediate_matching: Literal["off", "uniform", "linear"] = field(
        "off", help="AST intermediate matching: also match the student after i·(syn_steps // expert_epochs) steps "
        "with the expert at t + i (i < expert_epochs); uniform: weight 1 each (AST), linear: weight i / expert_epochs")
    weight_perturb: float = field(
        0.0, help="AST weight perturbation α of the start parameters: conv weights W += α·(d/||d||)⊙W, "
        "d ~ N(0, I) from the run's seeded generator; AST: 1; 0: off")
    inner_momentum: float = field(
        0.0, help="heavy-ball momentum of the student's SGD steps in the unroll (v = m·v + g, θ −= lr·v; AST "
        "distill.py --mom: 0.9); 0: MTT's plain steps; every gradient mode supports it")
    representative_clusters: int = field(
        0, help="init representative: k-means clusters per class, each giving its IPC/k nearest images (AST: 10, "
        "k = min(10, IPC); IPC must then be a multiple of k); 0: k = IPC, one image per centre")
    image_ema: float = field(
        0.0, help="decay of an exponential moving average of the (normalised) images, updated after every "
        "iteration from the initial images (no bias correction); the artifact holds the EMA images. FTD's "
        "--ema_decay (CIFAR-10: 0.9999 IPC 1, 0.9995 IPC 10, 0.999 IPC 50, for 5000 iterations); 0: off")
    flip_plugin: bool = field(
        False, added=True, help="FYI (ECCV 2024): every unrolled student step trains on its minibatch and the "
        "minibatch's mirror images (2 x batch_syn images; the authors halve batch_syn), each mirror augmented with "
        "its image's draw")

    def __post_init__(self) -> None:
        problems = []
        if self.experts is not None and not self.experts.strip():  # '' trained experts on the fly, unasked
            problems.append("experts is empty; give the expert buffer's folder, or leave it out (null) to train "
                            "`buffer` on the fly")
        if not 0 <= self.inner_momentum < 1:
            problems.append(f"inner_momentum must lie in [0, 1), got {self.inner_momentum}")
        if self.representative_clusters < 0:
            problems.append("representative_clusters must be >= 0 (0: one per image), got "
                            f"{self.representative_clusters}")
        if not 0 <= self.image_ema < 1:
            problems.append(f"image_ema must lie in [0, 1) (0 disables it), got {self.image_ema}")
        if self.weight_perturb < 0:
            problems.append(f"weight_perturb must be >= 0 (0 disables it), got {self.weight_perturb}")
        if self.iterations < 1:
            problems.append(f"iterations must be >= 1, got {self.iterations}")
        if self.trajectories < 1:
            problems.append(f"trajectories must be >= 1, got {self.trajectories}")
        if self.syn_steps < 1:
            problems.append(f"syn_steps must be >= 1, got {self.syn_steps}")
        if self.expert_epochs < 1:
            problems.append(f"expert_epochs must be >= 1, got {self.expert_epochs}")
        if not 0 <= self.min_start_epoch < self.max_start_epoch:
            problems.append(
                f"need 0 <= min_start_epoch < max_start_epoch, got {self.min_start_epoch} and {self.max_start_epoch}")
        elif self.experts is None and (window := window_problem(self, self.buffer.epochs)):
            problems.append(window)  # before the experts are trained; fit checks a given `experts` buffer
        if self.experts is not None:  # the recipe is not read, yet it would give the set another identity
            default = field_default(next(f for f in dataclasses.fields(self) if f.name == "buffer"))
            changed = [f.name for f in dataclasses.fields(self.buffer)
                       if getattr(self.buffer, f.name) != getattr(default, f.name)]
            if changed:
                problems.append(f"buffer ({', '.join(changed)}) applies only to experts trained on the fly, but "
                                "experts is given; remove buffer or experts")
        if self.lr_img <= 0:
            problems.append(f"lr_img must be > 0, got {self.lr_img}")
        if self.lr_lr < 0:
            problems.append(f"lr_lr must be >= 0 (0 freezes the lr), got {self.lr_lr}")
        if self.lr_teacher <= 0:
            problems.append(f"lr_teacher must be > 0, got {self.lr_teacher}")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.batch_syn is not None and self.batch_syn < 1:
            problems.append(f"batch_syn must be >= 1 or null, got {self.batch_syn}")
        if self.gradient not in ("unroll", "exact", "first_order"):
            problems.append(f"gradient must be unroll, exact or first_order, got {self.gradient!r}")
        if self.checkpoint_every < 1:
            problems.append(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if problems:
            raise ConfigError("; ".join(problems))
        try:  # numbers as the augmentation types them: 1 and 1.0 give one set
            self.augment_options = typed_augment_options(self.augment, self.augment_options)
        except DDKitError as exc:
            raise ConfigError(f"augment: {exc}") from None


@dataclass
class TESLAConfig(MTTConfig):
    """MTT settings plus TESLA's soft labels; the gradient needs the memory of one student step."""

    iterations: int = field(
        5000, help="distillation iterations (MTT's 5000, which the shipped configs and the full bench run; TESLA's "
        "distill.py defaults to 10000)")
    gradient: GradientMode = field(
        "exact", help="exact: MTT's gradient with the memory of one step; first_order: TESLA's reference "
        "code (drops the dependence of later steps on earlier batches); unroll: MTT")
    soft_labels: Literal["none", "expert"] = field(
        "none", help="expert: each iteration, train the student on softmax of the sampled expert's logits "
        "(at its target epoch) for the synthetic images, as TESLA's teacher_label")


def _ftd_buffer() -> ExpertConfig:
    # FTD's buffer_FTD.py: GSAM (adaptive, i.e. ASAM's perturbation) with rho_max = rho_min = 0.01, as its
    # run_buffer.sh passes (the argparse default is 2.0), and surrogate-gap alpha 0.3 from the paper's Table 7
    # for CIFAR-10 IPC 1 and 10 (IPC 50: 1; DATM's README buffer command passes 0.3 too). FTD's run_buffer.sh
    # passes no --alpha, so it runs with the argparse default 0.4; FTD's README passes --rho 0.01, an option
    # buffer_FTD.py does not define.
    return ExpertConfig(sam_rho=0.01, sam_adaptive=True, sam_alpha=0.3)


@dataclass
class FTDConfig(MTTConfig):
    """MTT settings with flat (GSAM) experts and an EMA of the images by default."""

    buffer: ExpertConfig = field(
        factory=_ftd_buffer, help="expert recipe (GSAM: adaptive, rho 0.01, alpha 0.3; FTD's Table 7 "
                                      "uses alpha 1 at IPC 50) when `experts` is unset")
    image_ema: float = field(
        0.9999, help="EMA decay of the images, saved as the result (FTD Table 7, CIFAR-10 IPC 1: 0.9999; IPC 10: "
        "0.9995; IPC 50: 0.999); 0: the last iterate")


@dataclass
class DATMConfig(MTTConfig):
    """MTT settings plus DATM's learned soft labels, correct-sample init and growing window."""

    iterations: int = field(10000, help="distillation iterations (DATM's configs: 10000 at every CIFAR IPC; MTT 5000)")
    syn_steps: int = field(80, help="student SGD steps per iteration (DATM: 80 at IPC 1-50)")
    max_start_epoch: int = field(4, help="final upper end of the start window (exclusive)")
    lr_img: float = field(100.0, help="SGD lr of the synthetic images (DATM IPC 1/10: 100 with ZCA)")
    init: Literal["real", "noise", "correct", "representative"] = field(
        "correct", help="correct: real images that the experts classify correctly (DATM); real (labels from the "
        "first expert's logits, as DATM's pix_init real); noise; representative (AST)")
    learn_labels: bool = field(True, help="learn soft labels (logits) initialised from the experts: the mean over "
                               "the experts that classify each image correctly; init real: the first expert's")
    label_epoch: int = field(-1, help="expert epoch whose logits initialise the labels (-1: last)")
    lr_y: float = field(5.0, help="SGD lr of the soft-label logits (DATM: 5 at IPC 1, else 2)")
    momentum_y: float = field(0.9, help="SGD momentum of the soft-label logits")
    threshold: float = field(1.1, help="skip the update when the matching loss exceeds this (DATM)")
    current_max_start_epoch: int | None = field(
        None, help="initial upper end of the start window; it grows to max_start_epoch over "
        "expansion_end iterations (DATM sequential generation; None: fixed window)")
    expansion_end: int = field(1000, help="iteration at which the window reaches max_start_epoch (DATM's configs: "
                               "1000 at IPC 10, 2000 at IPC 50)")

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if self.lr_y <= 0:
            problems.append(f"lr_y must be > 0, got {self.lr_y}")
        if not 0 <= self.momentum_y < 1:
            problems.append(f"momentum_y must lie in [0, 1), got {self.momentum_y}")
        if self.threshold <= 0:
            problems.append(f"threshold must be > 0, got {self.threshold}")
        if self.current_max_start_epoch is not None and not (
                self.min_start_epoch < self.current_max_start_epoch <= self.max_start_epoch):
            problems.append(
                f"need min_start_epoch < current_max_start_epoch <= max_start_epoch, got "
                f"{self.min_start_epoch}, {self.current_max_start_epoch}, {self.max_start_epoch}")
        if self.expansion_end < 1:
            problems.append(f"expansion_end must be >= 1, got {self.expansion_end}")
        if problems:
            raise ConfigError("; ".join(problems))


# AST's clipping loss: the authors' buffer.py --loss_decay factors for expert epochs 0..9.
AST_CLIP_LOSS = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def _shq_buffer() -> ExpertConfig:
    # AST's buffer.py as its README runs it (--optim SGDMOM --loss_decay --gp True): SGD momentum 0.9,
    # weight decay 1e-3, lr 0.003 (its default lr_teacher), clipping loss, gradient penalty λ 2, and its
    # unconditional lr × 0.6 after epoch epochs // 2 + 1 (a fresh optimiser: momentum reset).
    return ExpertConfig(lr=0.003, momentum=0.9, weight_decay=1e-3, clip_loss=list(AST_CLIP_LOSS), grad_penalty=2.0,
                        lr_drop=0.6)


@dataclass
class SHQConfig(MTTConfig):
    """MTT settings with every AST piece on (defaults: the authors' README command, CIFAR-100 IPC 1)."""

    buffer: ExpertConfig = field(
        factory=_shq_buffer, help="expert recipe (AST: momentum 0.9, wd 1e-3, lr 0.003 × 0.6 after epoch "
        "epochs // 2 + 1, clip_loss, grad_penalty 2)")
    syn_steps: int = field(20, help="student SGD steps per iteration (AST README, CIFAR-100 IPC 1: 20)")
    expert_epochs: int = field(3, help="expert epochs between start and target (AST README: 3)")
    max_start_epoch: int = field(20, help="start epochs are drawn from [min_start_epoch, max_start_epoch) (AST: 20)")
    lr_lr: float = field(1e-5, help="SGD lr of the learnable student lr (AST: 1e-5)")
    init: Literal["real", "noise", "representative"] = field(
        "representative", help="representative (AST): real images nearest to per-class k-means centres of the "
        "expert's logits; real; noise")
    balance_loss: bool = field(True, help="AST balanced inner loss (see MTTConfig)")
    intermediate_matching: Literal["off", "uniform", "linear"] = field(
        "uniform", help="AST intermediate matching (uniform: the authors' --agg_middle_loss)")
    weight_perturb: float = field(1.0, help="AST weight perturbation α of the start conv weights (AST: 1)")
    inner_momentum: float = field(0.9, help="momentum of the student's unrolled SGD (AST distill.py --mom 0.9)")
    representative_clusters: int = field(
        10, help="k-means clusters per class of the representative init (AST: 10, IPC/10 images each)")


def window_upper(iteration: int, cfg: MTTConfig) -> int:
    """Exclusive upper end of the start-epoch window at ``iteration`` (0-based).

    Fixed ``max_start_epoch`` unless ``cfg.current_max_start_epoch`` is set (DATM): then
    ``current + int((max − current) · iteration / expansion_end)``, capped at ``max``.
    """
    current = getattr(cfg, "current_max_start_epoch", None)
    if current is None:
        return cfg.max_start_epoch
    grown = current + int((cfg.max_start_epoch - current) * iteration / cfg.expansion_end)
    return min(grown, cfg.max_start_epoch)


def balance_scale(start_epoch: int, cfg: MTTConfig) -> float:
    """AST's balanced inner loss factor for start epoch ``t`` (authors' code, ``--balance_loss``):
    with ``h = max_start_epoch // 2``, ``log_5(t − h + 8)`` for ``t >= h`` (late, flat segments get
    a larger inner loss) and ``1 / log_5(h − t + 8)`` for ``t < h`` (early, steep ones a smaller)."""
    half = cfg.max_start_epoch // 2
    if start_epoch >= half:
        return math.log(start_epoch - half + 8, 5)
    return 1.0 / math.log(half - start_epoch + 8, 5)


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high, (1,), generator=gen))


@dataclass
class Segment:
    """One expert segment of an iteration: what was drawn for it and the tensors it matches."""

    expert: int
    start_epoch: int
    steps: list[Step]
    start: torch.Tensor  # θ*_t (perturbed when weight_perturb > 0)
    target: torch.Tensor  # θ*_{t+M}
    middle: list[Intermediate]


def draw_segment(gen: torch.Generator, iteration: int, cfg: MTTConfig, buffer: ExpertBuffer,
                 student: FunctionalStudent, n: int, batch: int, augment, size, device: torch.device) -> Segment:
    """Draw one segment from ``gen`` in the fixed order expert, start epoch ``t``, minibatch and
    augmentation plan, weight perturbation. Every rank draws every segment (so the generator stays
    that of one process); a rank that will not compute it passes ``device=cpu`` to skip transfers."""
    expert = _randint(gen, 0, buffer.num_experts)
    t = _randint(gen, cfg.min_start_epoch, window_upper(iteration, cfg))
    start = buffer.params(expert, t).to(device)
    target = buffer.params(expert, t + cfg.expert_epochs).to(device)
    steps = plan_steps(n, cfg.syn_steps, batch, gen, augment, size)
    if cfg.weight_perturb > 0:
        start = perturb_start(student, start, cfg.weight_perturb, gen)
    middle = intermediate_terms(lambda i: buffer.params(expert, t + i).to(device), cfg.syn_steps,
                                cfg.expert_epochs, cfg.intermediate_matching)
    return Segment(expert, t, steps, start, target, middle)


def add_results(total: MatchResult | None, r: MatchResult) -> MatchResult:
    """``total + r`` field by field (``r`` alone when ``total`` is None)."""
    if total is None:
        return r
    labels = None if r.grad_labels is None else total.grad_labels + r.grad_labels
    return MatchResult(total.loss + r.loss, total.grad_images + r.grad_images, total.grad_lr + r.grad_lr, labels)


def mean_over_segments(total: MatchResult | None, count: int, images: torch.Tensor, lr_param: torch.Tensor,
                       labels: torch.Tensor | None) -> MatchResult:
    """The mean of ``count`` segments' results, given this rank's sum ``total`` of the segments it
    computed, in segment order (None: it computed none).

    Under torchrun the sums (image, lr and label gradients and the loss, packed into one tensor) are
    all-reduced, so every rank holds the same mean and takes the same step. One segment in one
    process is returned unchanged.
    """
    if total is None:  # an idle rank (fewer segments than processes) contributes zeros
        total = MatchResult(images.new_zeros(()), torch.zeros_like(images), torch.zeros_like(lr_param),
                            None if labels is None else torch.zeros_like(labels))
    parts = [total.grad_images, total.grad_lr, total.loss] + ([total.grad_labels] if labels is not None else [])
    if ddist.current().enabled:
        flat = ddist.all_reduce_sum(torch.cat([p.reshape(-1).to(images.dtype) for p in parts]))
        parts = [chunk.view_as(p).to(p.dtype) for chunk, p in zip(flat.split([p.numel() for p in parts]), parts,
                                                                   strict=True)]
    if count > 1:
        parts = [p / count for p in parts]
    return MatchResult(parts[2], parts[0], parts[1], parts[3] if labels is not None else None)


class _TrajectoryMatching(Method):
    """The shared loop; subclasses only choose a Config and a registry key.

    Under ``torchrun``: the ``trajectories`` segments of an iteration are computed round-robin by
    the ranks and their gradients all-reduced (see the module docstring)."""

    key = "mtt"
    learns_lr = True  # its sets record meta.syn_lr
    uses_teacher = False  # experts, not a teacher

    @classmethod
    def identity_tags(cls, options: dict) -> dict:
        # ZCA is fitted on raw pixels since trajectory.ZCA_SPACE (it was on normalised images)
        buffer = options.get("buffer") or {}
        return {"zca_space": ZCA_SPACE} if isinstance(buffer, dict) and buffer.get("zca") else {}

    def fit(self, real: DataBundle, teachers: list, ctx: FitContext) -> _TrajectoryMatching:
        cfg = self.cfg
        device = torch.device(ctx.device)
        ipc = check_ipc(real, ctx.ipc)
        if cfg.init == "representative":
            representative_clusters(ipc, cfg.representative_clusters)  # fail before training any experts
        # training the experts on the fly can take long: report it as its own pass (marked
        # ``expert_epochs_pass``, like the decoupled methods' ``statistics_pass``)
        buffer = buffer_for(real, cfg.experts, cfg.buffer, ctx.work_dir, device,
                            progress=lambda done, total, rec: report(ctx, done, total, expert_epochs_pass=1.0),
                            where=f"{ctx.options_key}.buffer")
        if window := window_problem(cfg, buffer.epochs):
            raise ConfigError(window)
        label_epoch = getattr(cfg, "label_epoch", -1)
        if not -buffer.epochs - 1 <= label_epoch <= buffer.epochs:
            raise ConfigError(f"{ctx.options_key}.label_epoch {label_epoch} is outside the buffer's epochs "
                              f"0..{buffer.epochs} (or -{buffer.epochs + 1}..-1, counted back from the last)")
        student = FunctionalStudent(buffer.build_model().to(device).train())
        augment = build_augment(cfg.augment, **cfg.augment_options)
        warn_digit_flips(augment, real.name, f"{ctx.options_key}.augment_options")
        warn_digit_mirrors(cfg, real.name, ctx.options_key)
        size = tuple(real.image_shape[-2:])
        gen = torch.Generator().manual_seed(ctx.seed)

        zca = buffer.zca(real)  # experts trained on whitened images: optimise in that space too
        space = zca if zca is not None else (lambda x: x)
        if cfg.init == "correct":
            pixels, labels = _init_correct(real, ipc, buffer, student, cfg.label_epoch, ctx.seed, device, space)
        elif cfg.init == "representative":
            pixels, labels = _init_representative(real, ipc, buffer, student, ctx.seed, device, space,
                                                  cfg.representative_clusters)
        else:
            pixels, labels = init_images(real, ipc, cfg.init, ctx.seed)
        images = space(to_normalized(pixels.to(device), real)).requires_grad_(True)
        hard = labels.to(device)
        soft = None
        if getattr(cfg, "learn_labels", False):
            soft = _expert_logits(buffer, student, images.detach(), hard, cfg.label_epoch,
                                  1 if cfg.init == "real" else None).requires_grad_(True)
        init_lr = math.log(cfg.lr_teacher) if cfg.log_lr else cfg.lr_teacher
        lr_param = torch.tensor(init_lr, dtype=torch.float32, device=device, requires_grad=True)
        opt_img = torch.optim.SGD([images], lr=cfg.lr_img, momentum=cfg.momentum)
        opt_lr = torch.optim.SGD([lr_param], lr=cfg.lr_lr, momentum=cfg.momentum)
        opt_y = torch.optim.SGD([soft], lr=cfg.lr_y, momentum=cfg.momentum_y) if soft is not None else None
        expert_soft = None
        ema = images.detach().clone() if cfg.image_ema > 0 else None  # FTD: EMA from the initial images

        fingerprint = state_fingerprint(cfg, ipc, ctx.seed, real)
        legacy = legacy_fingerprint(cfg, ipc, ctx.seed, real)
        if cfg.experts is not None:  # a buffer retrained at the same path must not resume the old one's run
            experts = f"|experts={buffer_identity(cfg.experts)}"
            fingerprint, legacy = fingerprint + experts, None if legacy is None else legacy + experts
        ckpt, state = resumable(ctx, cfg.checkpoint_every, f"{self.key}-state", fingerprint, legacy)
        start_it, skipped = 0, 0
        if state is not None:
            with torch.no_grad():
                images.copy_(state["images"].to(device))
                lr_param.copy_(state["lr_param"].to(device))
                if soft is not None:
                    soft.copy_(state["soft"].to(device))
            opt_img.load_state_dict(state["opt_img"])
            opt_lr.load_state_dict(state["opt_lr"])
            if opt_y is not None:
                opt_y.load_state_dict(state["opt_y"])
            if state.get("expert_soft") is not None:
                expert_soft = state["expert_soft"].to(device)
            if ema is not None:
                ema = _load_ema(state, ema)
            gen.set_state(state["generator"])
            start_it = int(state["step"])
            skipped = int(state["skipped"])
            log.info("%s resumed at iteration %d", self.key, start_it)

        n = len(hard)
        batch = cfg.batch_syn or n
        threshold = getattr(cfg, "threshold", None)
        total = cfg.iterations
        info = ddist.current()
        if info.enabled and cfg.trajectories < info.world_size and info.is_main:
            log.warning("%s: trajectories %d < %d processes, so %d rank(s) stay idle; raise trajectories to a "
                        "multiple of the world size", self.key, cfg.trajectories, info.world_size,
                        info.world_size - cfg.trajectories)
        expert_labels = getattr(cfg, "soft_labels", "none") == "expert"
        for it in range(start_it, total):
            # every rank draws every segment; segment k is computed by rank k % world_size
            mine = [k % info.world_size == info.rank for k in range(cfg.trajectories)]
            segments = [draw_segment(gen, it, cfg, buffer, student, n, batch, augment, size,
                                     device if own else torch.device("cpu")) for own in mine]
            summed = None  # this rank's segments, added in segment order as they finish
            for k, seg in enumerate(segments):
                if not mine[k]:
                    continue
                if soft is not None:
                    targets = soft
                elif expert_labels:  # TESLA: each segment trains on its own expert's labels
                    with torch.no_grad():
                        targets = student(seg.target, images.detach())
                    if k == 0:
                        expert_soft = targets  # segment 0 (always rank 0) gives the stored soft labels
                else:
                    targets = hard
                summed = add_results(summed, trajectory_gradients(
                    student, seg.start, seg.target, images, targets, lr_param, seg.steps, augment, cfg.gradient,
                    cfg.log_lr, balance_scale(seg.start_epoch, cfg) if cfg.balance_loss else 1.0, seg.middle,
                    cfg.inner_momentum, cfg.flip_plugin))
            res = mean_over_segments(summed, cfg.trajectories, images, lr_param, soft)
            if threshold is None or float(res.loss) <= threshold:
                opt_img.zero_grad(set_to_none=True)
                opt_lr.zero_grad(set_to_none=True)
                images.grad = res.grad_images
                lr_param.grad = res.grad_lr
                opt_img.step()
                opt_lr.step()
                if opt_y is not None:
                    opt_y.zero_grad(set_to_none=True)
                    soft.grad = res.grad_labels
                    opt_y.step()
            else:
                skipped += 1
            if ema is not None:  # every iteration, after the update (FTD's ema.update)
                ema.mul_(cfg.image_ema).add_(images.detach(), alpha=1.0 - cfg.image_ema)
            step = it + 1
            if expert_labels and step == total and mine[0]:  # the stored labels: of the final images
                with torch.no_grad():
                    expert_soft = student(segments[0].target, (ema if ema is not None else images).detach())
            if ckpt.due(step, total):
                ckpt.save({
                    "fingerprint": fingerprint,
                    "images": images.detach().cpu(), "lr_param": lr_param.detach().cpu(),
                    "soft": soft.detach().cpu() if soft is not None else None,
                    "expert_soft": expert_soft.cpu() if expert_soft is not None else None,
                    "opt_img": opt_img.state_dict(), "opt_lr": opt_lr.state_dict(),
                    "opt_y": opt_y.state_dict() if opt_y is not None else None,
                    "generator": gen.get_state(), "step": step, "skipped": skipped,
                    "image_ema": ema.cpu() if ema is not None else None,
                })
            report(ctx, step, total, loss=float(res.loss), start_epoch=float(segments[0].start_epoch),
                   syn_lr=self._lr(lr_param))
        if info.enabled and expert_labels:  # rank 0 computed them; every rank returns the same set
            expert_soft = ddist.broadcast_object(expert_soft.cpu() if expert_soft is not None else None)

        out_soft = None
        if soft is not None:
            out_soft = soft.detach().cpu().float()
        elif expert_soft is not None:
            out_soft = expert_soft.detach().cpu().float()
        syn_lr = self._lr(lr_param)
        if not math.isfinite(syn_lr):
            log.warning("the learned student lr ended at %s: the synthesis diverged, so the set cannot be evaluated "
                        "with its learned lr (protocol learned_lr); lower lr_img or lr_lr", syn_lr)
        elif syn_lr <= 0:  # learned as a plain number (log_lr false), an update can carry it past zero
            log.warning("the learned student lr ended at %.4g, not > 0: its updates (lr_lr %g) carried it "
                        "past zero, so the set cannot be evaluated with its learned lr (protocol learned_lr); "
                        "lower lr_lr or set log_lr: true", syn_lr, cfg.lr_lr)
        meta: dict[str, Any] = {
            "syn_lr": syn_lr,
            "experts": str(buffer.path) if buffer.path is not None else None,
            "expert_buffer_hash": buffer.manifest.get("config_hash"),
            # how good the targets were: each expert's final test accuracy (a bench cell reports them)
            "expert_test_accuracy": [e.get("test_accuracy") for e in buffer.manifest.get("experts", [])],
            "skipped_updates": skipped,
            "image_ema": cfg.image_ema,
            **({"zca_reg": zca.reg} if zca is not None else {}),  # evaluate with protocol zca: true, as MTT
        }
        final = ema if ema is not None else images.detach()  # FTD saves (and evaluates) the EMA images
        final = zca.invert(final) if zca is not None else final
        self.synthetic_ = SyntheticSet(to_pixels(final, real).cpu().float(), hard.cpu().long(),
                                       soft_labels=out_soft, meta=meta)
        return self

    def _lr(self, lr_param: torch.Tensor) -> float:
        v = float(lr_param.detach())
        return math.exp(v) if self.cfg.log_lr else v


def _load_ema(state: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
    """The EMA images of a checkpoint (strict: a checkpoint written without ``image_ema`` cannot resume it)."""
    saved = state.get("image_ema")
    if saved is None or tuple(saved.shape) != tuple(like.shape):
        raise DDKitError("the checkpoint in the work dir holds no image EMA of this shape (it was written with "
                         "image_ema 0 or another IPC); resume with the same settings or use a fresh work dir")
    return saved.to(device=like.device, dtype=like.dtype)


def _expert_logits(buffer: ExpertBuffer, student: FunctionalStudent, images: torch.Tensor, labels: torch.Tensor,
                   epoch: int, experts: int | None = None) -> torch.Tensor:
    """DATM's label init: per image, the mean logits (at ``epoch``) of those of the buffer's first ``experts`` experts
    (all by default) that classify it correctly (DATM.py's ``samples_predicted_correctly``), or of all of them where
    none does. ``experts=1`` is DATM.py's ``pix_init == "real"`` (``buffer[0][-1]``): the first expert's logits."""
    with torch.no_grad():
        logits = torch.stack([student(buffer.params(e, epoch).to(images.device), images)
                              for e in range(experts or buffer.num_experts)])  # [E, N, C]
    correct = (logits.argmax(2) == labels[None]).float()  # [E, N]
    count = correct.sum(0)
    mean_correct = (logits * correct[..., None]).sum(0) / count.clamp_min(1)[:, None]
    return torch.where((count > 0)[:, None], mean_correct, logits.mean(0)).detach()


def _init_correct(real: DataBundle, ipc: int, buffer: ExpertBuffer, student: FunctionalStudent, epoch: int,
                  seed: int, device: torch.device, space=lambda x: x) -> tuple[torch.Tensor, torch.Tensor]:
    """DATM's ``samples_predicted_correctly``: per class, random real images that the first expert
    (at ``epoch``) classifies correctly; too few correct ones are topped up with other images."""
    order = stratified_indices(real.train.labels, real.num_classes, 10**9, seed)  # every image, shuffled
    params = buffer.params(0, epoch).to(device)
    picks = []
    with torch.no_grad():
        for c in range(real.num_classes):
            idx = order[real.train.labels[order] == c]
            preds = torch.cat(
                [student(params, space(to_normalized(real.train.subset(chunk).float_images().to(device), real)))
                 .argmax(1).cpu() for chunk in idx.split(1024)])
            good, bad = idx[preds == c], idx[preds != c]
            if len(good) < ipc:
                log.warning("class %d: only %d real images are classified correctly; using %d others",
                            c, len(good), ipc - len(good))
            picks.append(torch.cat([good, bad])[:ipc])
    index = torch.cat(picks)
    return real.train.subset(index).float_images().clone(), torch.arange(real.num_classes).repeat_interleave(ipc)


def kmeans(x: torch.Tensor, k: int, gen: torch.Generator, iters: int = 100) -> torch.Tensor:
    """Lloyd's k-means on rows of ``x`` [n, d] with k-means++ seeding from ``gen``; returns the
    ``k`` centres. Deterministic for a given generator state (no library randomness)."""
    x = x.double()
    n = len(x)
    if not 1 <= k <= n:
        raise DDKitError(f"k-means needs 1 <= k <= n, got k={k}, n={n}")
    first = int(torch.randint(n, (1,), generator=gen))
    centres = x[first : first + 1]
    while len(centres) < k:
        d2 = torch.cdist(x, centres).pow(2).min(1).values
        if float(d2.sum()) <= 0:  # fewer distinct points than k: take the next unused rows
            centres = torch.cat([centres, x[len(centres) : len(centres) + 1]])
            continue
        pick = int(torch.multinomial((d2 / d2.sum()).float(), 1, generator=gen))
        centres = torch.cat([centres, x[pick : pick + 1]])
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
        if torch.equal(new, centres):
            break
        centres = new
    return centres


def representative_indices(features: torch.Tensor, k: int, gen: torch.Generator, per_centre: int = 1) -> torch.Tensor:
    """Indices (into ``features``) of the ``per_centre`` rows nearest to each of ``k`` k-means
    centres, centre by centre and all distinct (rows taken by an earlier centre are skipped)."""
    centres = kmeans(features, k, gen)
    if k * per_centre > len(features):
        raise DDKitError(f"cannot pick {k * per_centre} distinct rows from {len(features)}")
    dist = torch.cdist(centres, features.double())  # [k, n]
    picks: list[int] = []
    for row in dist:
        mine = 0
        for j in row.argsort(stable=True).tolist():
            if mine == per_centre:
                break
            if j not in picks:
                picks.append(j)
                mine += 1
    return torch.tensor(picks, dtype=torch.long)


def representative_clusters(ipc: int, clusters: int) -> int:
    """k-means clusters per class of the representative init: ``ipc`` if ``clusters`` is 0, else
    ``min(clusters, ipc)``, which must divide ``ipc`` (each centre gives ``ipc // k`` images)."""
    k = ipc if clusters == 0 else min(clusters, ipc)
    if ipc % k:
        raise ConfigError(f"representative_clusters {clusters} gives {k} clusters per class, which does not divide "
                          f"IPC {ipc} (each centre gives IPC/k images, as AST); use an IPC that is a multiple of "
                          f"{k} or representative_clusters: 0 (one image per centre)")
    return k


def _init_representative(real: DataBundle, ipc: int, buffer: ExpertBuffer, student: FunctionalStudent, seed: int,
                         device: torch.device, space=lambda x: x,
                         clusters: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """AST's representative initialisation: per class, k-means on the logits of the first expert at
    its last epoch for every real image of the class; the real images nearest to the centres
    (``ipc // k`` each, see :func:`representative_clusters`) initialise the synthetic set.
    Deterministic from ``seed``."""
    k = representative_clusters(ipc, clusters)
    params = buffer.params(0, buffer.epochs).to(device)
    gen = torch.Generator().manual_seed(seed)
    picks = []
    with torch.no_grad():
        for idx in real.train.class_indices(real.num_classes):
            logits = torch.cat([student(params, space(to_normalized(real.train.subset(chunk).float_images().to(device),
                                                                    real))).cpu()
                                for chunk in idx.split(1024)])
            picks.append(idx[representative_indices(logits, k, gen, ipc // k)])
    index = torch.cat(picks)
    return real.train.subset(index).float_images().clone(), torch.arange(real.num_classes).repeat_interleave(ipc)


@METHODS.register("mtt")
class MTT(_TrajectoryMatching):
    """Matching Training Trajectories (Cazenavette et al., "Dataset Distillation by Matching Training
    Trajectories", CVPR 2022).

    Back-propagates through ``syn_steps`` unrolled student updates (memory grows with ``syn_steps``).
    Differences from the reference: ZCA is off by default (``buffer: {zca: true}``; the module table
    gives the non-ZCA lrs too); the on-the-fly
    buffer (when ``experts`` is unset) has 10 experts, not 100; randomness from one seeded generator.
    The shipped Fashion-MNIST configs (``configs/fashion-mnist/{mtt,tesla,ftd,datm}``) and the full
    matching bench train 50 experts of 30 epochs, not the 100 of 50 of MTT's, TESLA's and FTD's buffer
    commands (``buffer.py --num_experts=100 --train_epochs=50``; DATM's: 100 of 100): 1500
    expert-epochs instead of 5000 (DATM: 10000), for the GPU budget (``docs/results/tier-cost-h200.md``:
    50 x 30 take 0.4 h plain, 1.0 h with GSAM on one H200). Fewer, shorter experts are other targets:
    at CPU scale, which epochs of 30-epoch experts were matched (starts in [0, 20) or [0, 10)) moved
    IPC-10 accuracy by about 2 points (``docs/results/README.md``, traj-e30-window).

    Scale-out (all five keys): ``trajectories`` segments per iteration, averaged; under ``torchrun``
    each rank computes every ``world_size``-th segment (and trains every ``world_size``-th expert of
    an on-the-fly buffer) and the gradients are all-reduced, giving the one-process result.

    ``flip_plugin`` (all five keys) adds FYI (:mod:`ddkit.methods.fyi`): every unrolled student step
    trains on its minibatch and the minibatch's mirror images, as the FYI authors' MTT ``distill.py``
    (which also halves ``batch_syn``; here the step holds 2 x ``batch_syn`` images).
    """

    Config = MTTConfig
    key = "mtt"
    smoke_options = dict(_SMOKE)


@METHODS.register("tesla")
class TESLA(_TrajectoryMatching):
    """TESLA (Cui et al., "Scaling Up Dataset Distillation to ImageNet-1K with Constant Memory",
    ICML 2023): MTT's objective with a gradient whose memory does not grow with ``syn_steps``.

    The loss depends on the images only through the per-step gradients ``g_i``, so a first pass
    stores the student parameters of every step (no graph) and a second pass recomputes each
    ``g_i`` and accumulates the image gradient batch by batch. Default ``gradient: exact`` also
    carries the adjoint back through each step (one Hessian-vector product per step), which gives
    exactly MTT's gradient; ``first_order`` is the reference code's computation, which drops the
    dependence of later parameters on earlier batches (equal to MTT for one step). Soft labels:
    ``soft_labels: expert`` (the reference's ``teacher_label``); the stored ``soft_labels`` are the
    last iteration's segment-0 expert's logits for the final images (computed after the last image
    update; before 2026-12-04 they were those of the images before it). With ``trajectories > 1`` each segment's
    student trains on its own expert's labels and the stored ones come from segment 0 (rank 0).

    Differences from the reference besides the gradient: ``iterations`` is MTT's 5000, half of
    TESLA's (``distill.py --Iteration`` defaults to 10000 and its README commands keep it); the
    shipped Fashion-MNIST configs, the full matching bench and its recorded cost estimate run 5000,
    so ddkit keeps it as the default (set ``iterations: 10000`` for TESLA's). TESLA's CIFAR-10 IPC-1
    command starts in [0, 5), ddkit MTT's [0, 2).
    """

    Config = TESLAConfig
    key = "tesla"
    smoke_options = {**_SMOKE, "soft_labels": "expert"}

    @classmethod
    def own_soft_labels(cls, cfg) -> str | None:
        return "soft_labels: expert" if cfg.soft_labels == "expert" else None

    @classmethod
    def identity_tags(cls, options: dict) -> dict:
        tags = super().identity_tags(options)
        return {**tags, "expert_labels": "final"} if options.get("soft_labels") == "expert" else tags


@METHODS.register("ftd")
class FTD(_TrajectoryMatching):
    """FTD (Du et al., "Minimizing the Accumulated Trajectory Error to Improve Dataset Distillation",
    CVPR 2023): MTT on flat expert trajectories, trained with sharpness-aware minimisation, and an
    exponential moving average of the synthetic images as the result.

    Values from the authors' code (github.com/AngusDujw/FTD-distillation):

    - experts: GSAM (Zhuang et al., ICLR 2022; ``buffer/gsam/gsam.py``) — the adaptive (ASAM)
      perturbation ``rho |w|² g / ||w ⊙ g||`` with ``buffer.sam_rho`` 0.01 (``run_buffer.sh``
      ``--rho_max=--rho_min=0.01``; argparse default 2.0), then the update ``g_p − α g_⊥``
      (``buffer.sam_alpha``: 0.3 as Table 7 for CIFAR-10 IPC 1/10; 1 at IPC 50 and on
      CIFAR-100/Tiny ImageNet; argparse default 0.4).
    - images: ``image_ema`` — after every iteration ``ema ← d·ema + (1 − d)·images`` from the
      initial images (timm's ``ModelEmaV2``, no bias correction); the artifact holds the EMA images
      (the reference saves and evaluates both the raw and the EMA images). ``d``: Table 7 /
      ``run_distill.sh`` (CIFAR-10: 0.9999 IPC 1, 0.9995 IPC 10, 0.999 IPC 50). With far fewer
      than the reference's 5000 iterations the EMA stays close to the initial images: lower it.

    Other settings (steps, windows, lrs) are MTT's defaults (Table 7 has CIFAR-10 IPC 1 lr_img 100
    with ZCA, and starts the student lr at 0.001 at IPC 10: ``lr_teacher``). Differences: the
    reference's second (perturbed) pass freezes batch-norm running statistics, ours runs the model
    twice in train mode (no difference for instance norm, the default).
    """

    Config = FTDConfig
    key = "ftd"
    revision = 1  # 1: GSAM experts, image EMA
    smoke_options = {**_SMOKE, "buffer": {**_SMOKE_BUFFER, "sam_rho": 0.05, "sam_adaptive": False}, "image_ema": 0.5}


@METHODS.register("datm")
class DATM(_TrajectoryMatching):
    """DATM (Guo et al., "Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory
    Matching", ICLR 2024).

    MTT plus: soft labels (logits) learned with their own SGD, initialised from the experts' logits
    of the synthetic images at ``label_epoch``: per image the mean over the experts that classify it
    correctly (``DATM.py``'s ``samples_predicted_correctly``), or with ``init: real`` one expert's
    logits, right or wrong (its ``pix_init == "real"``: ``buffer[0][-1]``; before 2026-12-07 ddkit
    took the mean there too); init from
    real images the first expert classifies correctly; a start-epoch window whose upper end grows
    from ``current_max_start_epoch`` to ``max_start_epoch`` (sequential generation); updates skipped
    when the loss exceeds ``threshold`` (with ``trajectories > 1``: the mean loss of the segments).
    Output ``soft_labels`` are the learned logits.
    Differences: the reference also averages the label init over experts from other buffer files;
    its ``pix_init == "real"`` takes the first expert of a buffer file drawn at random (and always
    its last epoch), ddkit the buffer's first expert (``expert_000``: the same one on every run) at
    ``label_epoch`` (-1, the last, by default).
    Its configs carry an ``ema_decay`` (e.g. 0.995 at CIFAR-10 IPC 1) but ``distill/DATM.py`` never
    uses it (no EMA is built or saved), so ``image_ema`` is off here too. Its README trains the
    experts with FTD's GSAM (``buffer_FTD.py --rho_max=0.01 --rho_min=0.01 --alpha=0.3``, 100
    epochs); the preset keeps MTT's plain-SGD buffer (set ``buffer: {sam_rho: 0.01, sam_adaptive:
    true, sam_alpha: 0.3}`` for theirs).
    """

    Config = DATMConfig
    key = "datm"
    smoke_options = {**_SMOKE, "max_start_epoch": 2, "current_max_start_epoch": 1, "expansion_end": 2,
                     "syn_steps": 3, "lr_img": 100.0, "threshold": 10.0}

    @classmethod
    def own_soft_labels(cls, cfg) -> str | None:
        return "learn_labels: true" if cfg.learn_labels else None

    @classmethod
    def identity_tags(cls, options: dict) -> dict:
        tags = super().identity_tags(options)
        # 2026-12-07: init real starts the learned labels from the first expert's logits (DATM.py's pix_init
        # real), not from the mean over the experts that classify each image correctly
        if options.get("init") == "real" and options.get("learn_labels", cls.Config.learn_labels):
            tags["real_label_init"] = "first_expert"
        return tags


@METHODS.register("shq")
class SHQ(_TrajectoryMatching):
    """AST (Shen, Yang & Lam, "Efficient Dataset Distillation through Alignment with Smooth and
    High-Quality Expert Trajectories", arXiv:2310.10541, 2023; v2 titled "AST: Effective Dataset
    Distillation through ..."): MTT with smoother experts and a better-conditioned student.

    Every piece is an option of MTT / the expert recipe (off there, on here); formulas and values
    follow the authors' code (github.com/shenjiyuan123/AST-Alignment-with-Smooth-Expert):

    - clipping loss (experts): ``buffer.clip_loss`` — the cross-entropy of expert epoch ``e`` is
      multiplied by ``0.5 + 0.05 e`` for ``e < 10`` (``buffer.py --loss_decay``), damping the fast
      early parameter change.
    - gradient penalty (experts): ``buffer.grad_penalty`` λ = 2 — adds
      ``λ · mean((||∂Σ logits/∂x||₂ − 1)²)`` on the un-augmented batch (``utils.epoch_gp``).
    - expert optimiser: ``buffer.momentum`` 0.9, ``buffer.weight_decay`` 1e-3, ``buffer.lr`` 0.003,
      multiplied by ``buffer.lr_drop`` 0.6 after epoch ``epochs // 2 + 1`` with a fresh optimiser
      (``buffer.py``'s ``lr_schedule``, applied there without any flag).
    - representative initialisation: ``init: representative`` — per class, k-means with
      ``representative_clusters`` 10 centres (``ipc_visual = 10`` in ``get_repre_images``) on the
      logits of an expert at its last epoch; the ``IPC / 10`` real images nearest to each centre.
    - student momentum: ``inner_momentum`` 0.9 — the unrolled student steps are heavy-ball SGD
      (``distill.py --mom``, default 0.9 and not changed by any of their commands).
    - balanced inner-loop loss: ``balance_loss`` — inner cross-entropy × ``log_5(t − h + 8)`` for
      start epoch ``t >= h = max_start_epoch // 2``, else × ``1 / log_5(h − t + 8)``.
    - intermediate matching loss: ``intermediate_matching: uniform`` — adds, for ``i < M``,
      ``||θ_{i·(N//M)} − θ*_{t+i}||² / ||θ_0 − θ*_{t+i}||²`` (weight 1; ``linear``: ``i/M``).
    - weight perturbation: ``weight_perturb`` α = 1 — each conv weight ``W`` of the start
      parameters becomes ``W + α (d/||d||_F) ⊙ W``, ``d ~ N(0, I)``; the perturbed start is also
      the denominators' ``θ_0``, as in the reference.

    All pieces work with ``gradient: unroll``, ``exact`` and ``first_order`` (the reverse pass adds
    the intermediate terms to the adjoint; the balance factor scales each inner gradient; with
    momentum it pulls the momentum's adjoint back through each step's gradient).
    Defaults: the authors' README command for CIFAR-100 IPC 1 (syn_steps 20, expert_epochs 3,
    max_start_epoch 20, lr_img 1000, lr_lr 1e-5, lr_teacher 0.01).

    Not implemented / differences (from the reference code; the paper's full text was not
    consulted here, only its abstract): the reference's k-means is scikit-learn's ``KMeans(10,
    random_state=0)`` (k-means++ with the version's restarts), ours one seeded k-means++/Lloyd run;
    below 10 images per class the reference selects ``int(ipc / 10) = 0`` images per centre (its
    IPC-1 command cannot initialise), here ``k = IPC`` centres with one image each; above, IPC must
    be a multiple of 10 (as the reference needs); the picks are distinct across centres (the
    reference may pick an image twice); the first expert of the buffer, not a random one; no ZCA by
    default (set ``buffer.zca``); randomness from one seeded generator, so the runs do not match
    the reference's numbers.
    """

    Config = SHQConfig
    key = "shq"
    revision = 1  # 1: expert lr drop, inner momentum 0.9, 10 k-means clusters
    smoke_options = {**_SMOKE, "buffer": {**_SMOKE_BUFFER, "clip_loss": [0.5, 0.75], "grad_penalty": 2.0},
                     "syn_steps": 4, "expert_epochs": 2, "max_start_epoch": 2}
