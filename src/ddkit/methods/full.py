"""The whole training set, as the upper bound of any distilled set."""

from __future__ import annotations

from dataclasses import dataclass

from ddkit.config import Checked
from ddkit.data.base import DataBundle
from ddkit.methods.base import METHODS, FitContext, Method, SyntheticSet


@dataclass
class FullConfig(Checked):
    """No settings."""


@METHODS.register("full")
class FullDataset(Method):
    """Every training image (the "Whole Dataset" row of Zhao et al., ICLR 2021, Table 1). It takes no ipc (an ipc
    given is refused)."""

    Config = FullConfig
    uses_teacher = False
    uses_seed = False
    uses_ipc = False
    resumable = False

    def fit(self, real: DataBundle, teachers: list, ctx: FitContext) -> FullDataset:
        self.synthetic_ = SyntheticSet(real.train.images.clone(), real.train.labels.clone())
        return self
