"""Tiny models for tests and smoke runs: they learn ``ddkit.data.make_synthetic()`` in seconds.

``tiny_convnet``: a ConvNet with 2 blocks of width 8 (instance norm, average pooling), about 2k
parameters on 1x16x16 inputs; it takes every ``convnet`` option. ``tiny_mlp``: flatten ->
Linear(hidden=32) -> ReLU -> Linear.
"""

from __future__ import annotations

import torch
from torch import nn

from ddkit.errors import DDKitError
from ddkit.models.convnet import convnet
from ddkit.models.registry import MODELS, check_positive_int
from ddkit.registry import OwnPartial

MODELS.add("tiny_convnet", OwnPartial(convnet, depth=2, width=8))


class MLP(nn.Module):
    """flatten -> Linear(hidden) -> ReLU -> Linear; ``embed`` is the hidden activation."""

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int, hidden: int = 32
    ) -> None:
        super().__init__()
        check_positive_int("MLP hidden", hidden)
        self.fc1 = nn.Linear(in_channels * image_size * image_size, hidden)
        self.act = nn.ReLU()
        self.feature_dim = hidden
        self.classifier = nn.Linear(hidden, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        if h.shape[1] != self.fc1.in_features:
            if x.dim() == 4 and x.shape[-2] != x.shape[-1]:
                raise DDKitError(
                    f"MLP models need square images, the data's are {x.shape[-2]}x{x.shape[-1]} (height x width); "
                    "resize them to one square size (dataset.image_size for an imagefolder) or use a model that "
                    "pools adaptively (resnet18_cifar)"
                )
            raise DDKitError(
                f"this MLP was built for {self.fc1.in_features} values per image but got "
                f"{tuple(x.shape[1:])}; create it with the data's channels and image_size"
            )
        return self.act(self.fc1(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


@MODELS.register("tiny_mlp")
def tiny_mlp(in_channels: int, num_classes: int, image_size: int, hidden: int = 32) -> MLP:
    """flatten -> Linear(hidden) -> ReLU -> Linear."""
    return MLP(in_channels, num_classes, image_size, hidden)
