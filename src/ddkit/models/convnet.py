"""The ConvNet family of the dataset-distillation literature.

ConvNet (Zhao et al., "Dataset Condensation with Gradient Matching", ICLR 2021; reused by DSA, DM,
MTT and most later work): ``depth`` blocks of [3x3 conv (``width`` channels, padding 1) -> norm ->
activation -> 2x2 pooling], then flatten and one ``nn.Linear``. ``convnet3`` (depth 3, width 128,
instance norm, average pooling, ReLU) is the standard student of the benchmarks.

Norms as in the reference code: ``instancenorm`` is ``GroupNorm(width, width, affine=True)`` (one
group per channel). Difference: ``layernorm`` here is ``GroupNorm(1, width)`` (normalises over C, H,
W like LayerNorm, but with per-channel rather than per-pixel affine weights), so it does not depend
on the image size.

One difference from the reference code, kept for the recorded results: for 1-channel 28x28 images
(MNIST, Fashion-MNIST) the papers' code pads the first conv by 3 (``padding=3 if channel == 1``), so
its feature maps are 32x32 -> 16 -> 8 -> 4 and a ConvNet-3 embeds 4*4*width features; ddkit pads
by 1 (28 -> 14 -> 7 -> 3, the last pooling dropping the 7th row and column: 3*3*width features).
``first_padding=3`` (name token ``-p3``, e.g. ``convnet3-p3``) builds the papers' network.

Names: ``convnet`` takes all options; ``convnet3``, ``convnetd{1,2,4,5}``, ``convnet3-bn``,
``convnet3-nonorm``, ``convnet3-w32``, ``convnet3-w64`` and ``convnet3-w32-bn`` are registered, and
``create_model`` also accepts any name of the form
``convnet[<depth digit>|d<depth>][-w<width>][-p<padding>][-bn|-in|-ln|-nonorm][-avgpool|-maxpool|-nopool]
[-relu|-leakyrelu|-sigmoid]``, e.g. ``convnetd6-w64-bn-maxpool`` or ``convnet3-w32-p3``.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import torch
from torch import nn

from ddkit.errors import DDKitError, ImageTooSmall
from ddkit.models.registry import MODELS, check_positive_int, register_name_parser
from ddkit.registry import OwnPartial

NORMS = ("instancenorm", "batchnorm", "layernorm", "none")
POOLINGS = ("avgpooling", "maxpooling", "none")
ACTIVATIONS = ("relu", "leakyrelu", "sigmoid")


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DDKitError(
            f"unknown ConvNet {what} {value!r}; {hint}choose one of {', '.join(choices)}"
        )


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "layernorm":
        return nn.GroupNorm(1, channels, affine=True)
    return nn.Identity()


def _activation(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU()
    if kind == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.01)  # slope of the reference code
    return nn.Sigmoid()


class ConvNet(nn.Module):
    """``depth`` x [conv3x3 -> norm -> activation -> pool], flatten, linear classifier.

    ``features`` maps images to the last feature map; ``embed`` flattens it (``feature_dim`` =
    ``width * s * s`` with ``s`` the spatial size after the poolings); ``classifier`` is the linear
    head. Non-inplace activations, so forward hooks see unmodified tensors.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        depth: int = 3,
        width: int = 128,
        norm: str = "instancenorm",
        pooling: str = "avgpooling",
        activation: str = "relu",
        first_padding: int = 1,
    ) -> None:
        super().__init__()
        check_positive_int("ConvNet depth", depth)
        check_positive_int("ConvNet width", width)
        check_positive_int("ConvNet first_padding", first_padding)
        _check_choice("norm", norm, NORMS)
        _check_choice("pooling", pooling, POOLINGS)
        _check_choice("activation", activation, ACTIVATIONS)
        size = image_size + 2 * first_padding - 2  # after the first 3x3 conv; the others keep the size
        if pooling != "none":
            deepest = max(size, 0).bit_length() - 1  # the most poolings that leave at least 1 px
            size >>= depth  # each 2x2 stride-2 pooling floors the size by half
            if size < 1:
                smaller = f"a smaller depth (at most {deepest}) or " if deepest >= 1 else ""
                raise ImageTooSmall(
                    f"image size {image_size} is too small for a depth-{depth} ConvNet with pooling: "
                    f"{depth} poolings need at least {2**depth} px; use {smaller}pooling='none'"
                )
        layers: list[nn.Module] = []
        channels = in_channels
        for d in range(depth):
            layers += [
                nn.Conv2d(channels, width, 3, padding=first_padding if d == 0 else 1),
                _norm(norm, width),
                _activation(activation),
            ]
            if pooling == "avgpooling":
                layers.append(nn.AvgPool2d(2, 2))
            elif pooling == "maxpooling":
                layers.append(nn.MaxPool2d(2, 2))
            channels = width
        self.image_size = image_size
        self.features = nn.Sequential(*layers)
        self.feature_dim = width * size * size
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).flatten(1)
        if h.shape[1] != self.feature_dim:
            if x.shape[-2] != x.shape[-1]:  # no image_size fits: the classifier sees size x size features
                raise DDKitError(
                    f"ConvNet models need square images, the data's are {x.shape[-2]}x{x.shape[-1]} (height x "
                    "width); resize them to one square size (dataset.image_size for an imagefolder) or use a "
                    "model that pools adaptively (resnet18_cifar)"
                )
            raise DDKitError(
                f"this ConvNet was built for {self.image_size}x{self.image_size} images but got "
                f"{x.shape[-2]}x{x.shape[-1]}; create it with image_size={x.shape[-1]}"
            )
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


@MODELS.register("convnet")
def convnet(
    in_channels: int,
    num_classes: int,
    image_size: int,
    depth: int = 3,
    width: int = 128,
    norm: str = "instancenorm",
    pooling: str = "avgpooling",
    activation: str = "relu",
    first_padding: int = 1,
) -> ConvNet:
    """ConvNet family: ``depth`` conv-norm-activation-pooling blocks of ``width`` channels, then a linear layer; the
    defaults are the standard ConvNet-3 (``convnet3``)."""
    return ConvNet(in_channels, num_classes, image_size, depth, width, norm, pooling, activation, first_padding)


_VARIANTS: dict[str, dict[str, Any]] = {
    "convnet3": {"depth": 3},
    "convnetd1": {"depth": 1},
    "convnetd2": {"depth": 2},
    "convnetd4": {"depth": 4},
    "convnetd5": {"depth": 5},
    "convnet3-bn": {"depth": 3, "norm": "batchnorm"},
    "convnet3-nonorm": {"depth": 3, "norm": "none"},
    "convnet3-w32": {"depth": 3, "width": 32},
    "convnet3-w64": {"depth": 3, "width": 64},
    "convnet3-w32-bn": {"depth": 3, "width": 32, "norm": "batchnorm"},
}
for _name, _opts in _VARIANTS.items():
    MODELS.add(_name, OwnPartial(convnet, **_opts))


_NAME = re.compile(r"convnet(?:(\d)|d(\d+))?((?:-[^-]*)*)")
_TOKENS: dict[str, tuple[str, str]] = {
    "bn": ("norm", "batchnorm"),
    "in": ("norm", "instancenorm"),
    "ln": ("norm", "layernorm"),
    "nonorm": ("norm", "none"),
    "avgpool": ("pooling", "avgpooling"),
    "maxpool": ("pooling", "maxpooling"),
    "nopool": ("pooling", "none"),
    "relu": ("activation", "relu"),
    "leakyrelu": ("activation", "leakyrelu"),
    "sigmoid": ("activation", "sigmoid"),
}
GRAMMAR = (
    "convnet[<depth digit>|d<depth>][-w<width>][-p<first conv padding>][-bn|-in|-ln|-nonorm]"
    "[-avgpool|-maxpool|-nopool][-relu|-leakyrelu|-sigmoid]"
)


@register_name_parser
def parse_convnet_name(name: str) -> tuple[str, dict[str, Any]] | None:
    """``convnetd4-w64-bn`` -> ``('convnet', {'depth': 4, 'width': 64, 'norm': 'batchnorm'})``."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    options: dict[str, Any] = {}
    depth = m.group(1) or m.group(2)
    if depth is not None:
        options["depth"] = int(depth)
    for token in m.group(3).split("-")[1:]:
        if re.fullmatch(r"w\d+", token):
            key, value = "width", int(token[1:])
        elif re.fullmatch(r"p\d+", token):
            key, value = "first_padding", int(token[1:])
        elif token in _TOKENS:
            key, value = _TOKENS[token]
        else:
            raise DDKitError(f"{MODELS.unknown_message(name)} (ConvNet names read {GRAMMAR})")
        if key in options:
            raise DDKitError(f"model name {name!r} sets the ConvNet {key} twice; keep one")
        options[key] = value
    return "convnet", options
