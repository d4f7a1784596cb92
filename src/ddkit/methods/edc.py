"""G-VBSM and EDC: statistics matching over BN and convolution layers of one or more teachers.

Both are presets of :func:`ddkit.methods.statistics.recover`; every field of
:class:`~ddkit.methods.statistics.RecoverConfig` is a knob.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ddkit.config import field
from ddkit.data.base import DataBundle
from ddkit.methods.base import METHODS, FitContext, Method
from ddkit.methods.statistics import RecoverConfig, recover

# the contract test's teacher (tiny_convnet) has no BatchNorm: match convolution statistics only
_SMOKE = {"iterations": 4, "stats": "conv", "checkpoint_every": 1}


@dataclass
class GVBSMConfig(RecoverConfig):
    """G-VBSM settings (defaults: the authors' CIFAR-10 recover script)."""

    iterations: int = field(4000, help="steps per batch (G-VBSM CIFAR-10 script: 4000)")
    lr: float = field(0.05, help="Adam lr on normalised pixels (G-VBSM CIFAR-10 script: 0.05)")
    r_stats: float = field(0.01, help="weight of the BN + conv statistics loss (G-VBSM --r-loss 0.01)")
    stats: Literal["bn", "conv", "bn+conv"] = field("bn+conv", help="BN running statistics and real-data convolution statistics")
    r_logit: float = field(0.1, help="weight of per-class mean-logit matching to the real data (ddkit's choice, see the class docstring)")


@METHODS.register("gvbsm")
class GVBSM(Method):
    """Generalized Various Backbone and Statistical Matching (Shao, Yin, Wang & Shen, "Generalized
    Large-Scale Data Condensation via Various Backbone and Statistical Matching", CVPR 2024;
    shaoshitong/G_VBSM_Dataset_Condensation).

    Recover from Gaussian noise; each step samples one of the given teachers ("backbone
    matching" -- pass several teachers to ``fit``) and minimises its cross-entropy plus
    ``r_stats *`` statistics loss over its BatchNorm inputs (against running statistics) *and* its
    convolution outputs (against per-channel mean/variance of the real training set, computed once
    and cached: the paper's "convolution-based statistical matching"), plus ``r_logit *`` a logit
    matching term (per-class mean teacher logits of the synthetic batch against those of the real
    data). Adam lr 0.05, betas (0.5, 0.9), cosine schedule, 4000 iterations, first layer x10.

    Differences from the authors' code: teachers are sampled at random (the code cycles through
    them; sampling is what the paper describes); the EMA of synthetic statistics
    (``--training-momentum 0.8``), the random dropping of 40% of the matched layers
    (``--drop-rate``) and the nuclear-norm "data densification" loss are not implemented; the
    logit-matching term and its weight 0.1 are ddkit's reading of the paper, not copied from code;
    augmentation is RRC(0.08-1) + flip as in the ImageNet branch (``augment: crop_flip`` gives the
    CIFAR branch's crop + flip).
    """

    Config = GVBSMConfig
    needs_teacher = True
    smoke_options = dict(_SMOKE)

    def fit(self, real: DataBundle, teachers: list, ctx: FitContext) -> GVBSM:
        self.synthetic_ = recover("gvbsm", self.cfg, real, teachers, ctx)
        return self


@dataclass
class EDCConfig(RecoverConfig):
    """EDC settings: G-VBSM plus EDC's synthesis-side design choices, each a knob."""

    iterations: int = field(2000, help="steps per batch: half of G-VBSM's 4000 (EDC step B)")
    lr: float = field(0.05, help="Adam lr on normalised pixels (as G-VBSM's CIFAR script)")
    r_stats: float = field(0.01, help="weight of the statistics loss")
    stats: Literal["bn", "conv", "bn+conv"] = field("bn+conv", help="BN + convolution statistics (EDC step A, from G-VBSM)")
    init: Literal["noise", "real", "rded"] = field("rded", help="EDC step B: real-image init from the rded method's output (as EDC); 'real': a random real subset; 'noise' turns B off")
    alpha: float = field(0.5, help="EDC step F: soft category-aware matching alpha*global + (1-alpha)*class; 1 turns it off")
    flatness_weight: float = field(0.25, help="EDC step D: flatness regularisation weight; 0 turns it off")
    flatness_beta: float = field(0.99, help="EDC step D: EMA rate of the image copy")
    flatness_tau: float = field(4.0, help="EDC step D: KL temperature")
    scale_min: float = field(0.5, help="EDC step G: weak augmentation, RRC area in [0.5, 1]; 0.08 turns it off")


@METHODS.register("edc")
class EDC(Method):
    """Elucidating the Design space of dataset Condensation (Shao, Zhou, Yin, Zhang & Shen,
    "Elucidating the Design Space of Dataset Condensation", NeurIPS 2024; shaoshitong/EDC).

    G-VBSM's synthesis (:class:`GVBSM`: several teachers sampled per step, BN + convolution
    statistics) with EDC's synthesis-side changes. Map of the knobs to EDC's Fig. 1 steps:

    =====  ====================================================  =================================
    step   EDC change                                            ddkit knob (off value)
    =====  ====================================================  =================================
    A      G-VBSM baseline: several observers, BN + conv stats   ``stats: bn+conv``, teachers list
    B      real-image initialisation (RDED output); iterations   ``init: rded|real`` (``noise``);
           halved vs G-VBSM                                      ``iterations: 2000`` (4000)
    C      smoothing LR schedule at evaluation                   evaluation protocol, not here
    D      flatness regularisation: KL(observer logits on        ``flatness_weight: 0.25`` (0),
           images || on an EMA copy), beta 0.99, tau 4           ``flatness_beta``, ``flatness_tau``
    E      small evaluation batch, better observer choice        evaluation protocol / teachers
    F      soft category-aware matching, alpha 0.5               ``alpha: 0.5`` (1)
    G      weak augmentation, RRC scale 0.5-1 (+ EMA student     ``scale_min: 0.5`` (0.08); EMA
           at evaluation)                                        student: evaluation protocol
    =====  ====================================================  =================================

    Differences: G-VBSM's logit-matching term is off (``r_logit: 0``) as EDC does not list it; the
    flatness KL is not scaled by tau^2. Same G-VBSM omissions as :class:`GVBSM` (statistics EMA, layer dropping).
    ``flip_plugin`` adds FYI.
    """

    Config = EDCConfig
    needs_teacher = True
    smoke_options = dict(_SMOKE)
    revision = 1  # 1: default init real -> rded

    def fit(self, real: DataBundle, teachers: list, ctx: FitContext) -> EDC:
        self.synthetic_ = recover("edc", self.cfg, real, teachers, ctx)
        return self
