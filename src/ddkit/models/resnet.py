"""CIFAR-style ResNet-18 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

The variant used for 32x32 images throughout the distillation literature: a 3x3 stride-1 stem
without max-pool, four stages of two BasicBlocks with ``width``, 2, 4 and 8 x ``width`` channels
and strides 1, 2, 2, 2, global average pooling and one ``nn.Linear``. Any input size works (28x28
MNIST-like images give 28 -> 14 -> 7 -> 4 feature maps), but for the instance-norm variant, which
needs at least 9 px.

``resnet18_cifar`` uses BatchNorm; ``resnet18_cifar_in`` uses instance norm as
``GroupNorm(c, c, affine=True)``, as the ConvNet of the DC/DM papers does. Both take ``width``
(base width, default 64) so tests can build thin ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ddkit import determinism
from ddkit.errors import ImageTooSmall
from ddkit.models.registry import MODELS, check_positive_int

Norm = Callable[[int], nn.Module]


class GlobalAvgPool(nn.Module):
    """``AdaptiveAvgPool2d(1)`` that stays deterministic on CUDA (:func:`ddkit.determinism.global_avg_pool`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return determinism.global_avg_pool(x)


def _batchnorm(channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels)


def _instancenorm(channels: int) -> nn.Module:
    return nn.GroupNorm(channels, channels, affine=True)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; a 1x1 conv shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: Norm) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = norm(out_channels)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), norm(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """ResNet with a 3x3 stride-1 stem; ``embed`` is the globally pooled last stage."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        width: int = 64,
        norm: Norm = _batchnorm,
    ) -> None:
        super().__init__()
        check_positive_int("ResNet width", width)
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU()
        stages = []
        channels = width
        for i, n in enumerate(blocks):
            out = width * 2**i
            layers = []
            for j in range(n):
                layers.append(BasicBlock(channels, out, 2 if (i > 0 and j == 0) else 1, norm))
                channels = out
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = GlobalAvgPool()
        self.feature_dim = channels
        self.fc = nn.Linear(channels, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.pool(h).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))


@MODELS.register("resnet18_cifar")
def resnet18_cifar(
    in_channels: int, num_classes: int, image_size: int, width: int = 64
) -> ResNetCIFAR:
    """CIFAR-style ResNet-18 with BatchNorm; ``width`` is the first stage's channels."""
    return ResNetCIFAR(in_channels, num_classes, (2, 2, 2, 2), width, _batchnorm)


@MODELS.register("resnet18_cifar_in")
def resnet18_cifar_in(
    in_channels: int, num_classes: int, image_size: int, width: int = 64
) -> ResNetCIFAR:
    """CIFAR-style ResNet-18 with instance norm (``GroupNorm(c, c)``).

    Needs images of at least 9 px: three stride-2 stages bring 8 px to 1x1 maps in the last stage,
    where a per-channel norm subtracts the only value and every input gets the same logits.
    """
    size = image_size
    for _ in range(3):  # the stride-2 3x3 convs (padding 1) of stages 2 to 4
        size = (size + 1) // 2
    if size < 2:
        raise ImageTooSmall(
            f"image size {image_size} is too small for resnet18_cifar_in: its last stage would see "
            "1x1 maps, which instance norm maps to a constant; use images of at least 9 px or resnet18_cifar"
        )
    return ResNetCIFAR(in_channels, num_classes, (2, 2, 2, 2), width, _instancenorm)
