"""Stratified random real subset: the baseline every distillation method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddkit.config import Checked
from ddkit.data.base import DataBundle, class_indices
from ddkit.methods.base import METHODS, FitContext, Method, SyntheticSet, check_ipc


@dataclass
class RandomConfig(Checked):
    """No settings: the subset depends only on the seed and IPC."""


def stratified_indices(labels: torch.Tensor, num_classes: int, ipc: int, seed: int) -> torch.Tensor:
    """``ipc`` indices per class drawn without replacement with ``seed``, class-major order."""
    gen = torch.Generator().manual_seed(seed)
    picks = [idx[torch.randperm(len(idx), generator=gen)[:ipc]] for idx in class_indices(labels, num_classes)]
    return torch.cat(picks)


@METHODS.register("random")
class RandomSubset(Method):
    """Random real images, ``ipc`` per class (the "Random" baseline of Zhao et al., ICLR 2021, Table 1)."""

    Config = RandomConfig
    uses_teacher = False
    resumable = False  # one draw: nothing to interrupt

    def fit(self, real: DataBundle, teachers: list, ctx: FitContext) -> RandomSubset:
        ipc = check_ipc(real, ctx.ipc)
        index = stratified_indices(real.train.labels, real.num_classes, ipc, ctx.seed)
        subset = real.train.subset(index)
        self.synthetic_ = SyntheticSet(subset.images.clone(), subset.labels.clone(),
                                       meta={"source_index": index.tolist()})
        return self
