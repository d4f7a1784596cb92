"""Distribution Matching (DM).

Built from the pieces the matching methods share (:mod:`ddkit.methods.matching`): a fresh network per
iteration and :func:`~ddkit.methods.matching.fit_per_class`, with DM's loss (:func:`dm_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ddkit.config import Checked, field
from ddkit.data.base import DataBundle
from ddkit.methods import common
from ddkit.methods.base import METHODS, FitContext, Method, check_ipc
from ddkit.methods.matching import check_common, fit_per_class, gather_result


def dm_loss(embed_real: torch.Tensor, embed_syn: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance between the mean embeddings (DM's per-class MMD, linear kernel)."""
    return (embed_real.mean(0) - embed_syn.mean(0)).pow(2).sum()


@dataclass
class DMConfig(Checked):
    """Distribution Matching settings (defaults: the reference ``main_DM.py`` for ConvNet)."""

    iterations: int = field(20000, help="image updates, each with a freshly initialised network (paper: 20000)")
    model: str = field("convnet3", help="embedding network, re-initialised every iteration")
    model_options: dict = field({}, help="options of the model (e.g. {width: 64})")
    init: Literal["real", "noise"] = field("real", help="initial images: random real ones (paper) or Gaussian noise")
    lr_img: float = field(1.0, help="SGD learning rate of the synthetic images (normalised pixel units)")
    momentum_img: float = field(0.5, help="SGD momentum of the synthetic images")
    batch_real: int = field(256, help="real images per class per iteration")
    dsa: bool = field(True, help="differentiable siamese augmentation of both batches (paper: on)")
    dsa_options: dict = field({}, help="DSA options, e.g. {flip: false} for digits")
    checkpoint_every: int = field(500, operational=True, help="iterations between checkpoints in the work folder (not "
                                  "part of the set's identity)")
    flip_plugin: bool = field(False, added=True, help="FYI (ECCV 2024): embed each class's synthetic images "
                              "together with their mirror images (DSA's per-batch flip kept)")

    def __post_init__(self) -> None:
        check_common(self)


@METHODS.register("dm")
class DM(Method):
    """Distribution Matching (Zhao & Bilen, "Dataset Condensation with Distribution Matching", WACV 2023).

    Every iteration draws a randomly initialised network ψ and, per class c, minimises
    ``|| mean ψ(A(real_c)) - mean ψ(A(syn_c)) ||²`` over the synthetic images of c, with one DSA
    transform ``A`` shared by both batches. Defaults follow the paper and ``main_DM.py``: ConvNet-3,
    20000 iterations, SGD lr 1 momentum 0.5, 256 real images per class, real initialisation, DSA
    strategy color_crop_cutout_flip_scale_rotate.

    Differences: images are optimised in normalised space (as the reference) and returned as
    float32 pixels; every class has its own optimiser and RNG stream (seeded from seed, class and
    iteration) so that classes can be sharded over ``torchrun`` ranks with the single-process
    result — the reference draws everything from one global stream. Batch-norm models see
    per-class batches (the reference concatenates all classes for BN models).

    ``flip_plugin`` adds FYI (:mod:`ddkit.methods.fyi`), as the FYI authors' ``main_DM.py``: each class's
    synthetic batch is concatenated with its mirror images before DSA, so the synthetic mean embedding
    covers both.
    """

    Config = DMConfig
    uses_teacher = False
    smoke_options = {"model": "tiny_convnet", "iterations": 4, "batch_real": 8, "checkpoint_every": 1}

    def fit_classes(self, real: DataBundle, ctx: FitContext, classes: list[int]) -> dict[int, torch.Tensor]:
        """Pixel-space synthetic images of ``classes`` (identical whichever classes come along)."""

        def loss(net: nn.Module, x_real: torch.Tensor, x_syn: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                e_real = net.embed(x_real)
            return dm_loss(e_real, net.embed(x_syn))

        return fit_per_class(self.cfg, real, ctx, classes, loss, tag="dm")

    def fit(self, real: DataBundle, teachers: list, ctx: FitContext) -> DM:
        ipc = check_ipc(real, ctx.ipc)
        per_class = self.fit_classes(real, ctx, common.my_classes(real.num_classes))
        self.synthetic_ = gather_result(per_class, real, ipc, seed=ctx.seed)
        return self
