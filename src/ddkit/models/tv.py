"""torchvision classifiers, randomly initialised (``weights=None`` always: nothing is downloaded).

Registered as ``tv_<torchvision name>``: ``tv_resnet18``, ``tv_resnet50``, ``tv_mobilenet_v2``,
``tv_efficientnet_b0``, ``tv_vgg11_bn``, ``tv_densenet121``. They take no options.

The model keeps torchvision's module names, so its ``state_dict`` keys are torchvision's and a
torchvision checkpoint of the same shapes loads strictly. With 3 input channels and images of at
least 64 px the model *is* torchvision's (same weights under the same seed). Otherwise it is
adapted:

- ``in_channels != 3``: the first conv is rebuilt for ``in_channels`` with the same geometry
  (Kaiming-normal fan-out init, zero bias).
- the classifier always outputs ``num_classes`` (torchvision builds it so).
- images smaller than 64 px (``SMALL_IMAGE``):
  ResNets: the 7x7 stride-2 stem becomes a 3x3 stride-1 conv and the max-pool is dropped (the
  usual CIFAR adaptation; 28 px gives 28 -> 14 -> 7 -> 4 feature maps instead of 1x1).
  DenseNet-121: same for its stem (``features.conv0``, ``features.pool0``).
  VGG-11-BN: global average pooling and a single ``Linear(512, num_classes)`` replace the 7x7
  pooling and the three-layer 4096-wide classifier (as the DC benchmark's VGG11 does), and inputs
  below 32 px are bilinearly upsampled to 32 px inside ``embed``, since its 5 max-pools need 32 px.
  MobileNetV2 and EfficientNet-B0 keep their ImageNet strides (28 px ends in a 1x1 map).
- DenseNet-121 with the small stem needs 8 px (3 transition poolings); smaller inputs are
  upsampled likewise.

``embed`` returns the input of the final ``nn.Linear``: the globally pooled features for all but
VGG-11-BN at >= 64 px, where it is the 4096-wide output of the classifier's second ReLU/Dropout.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ddkit.data.augment import resize_bilinear
from ddkit.determinism import global_avg_pool
from ddkit.models.registry import MODELS
from ddkit.registry import OwnPartial

logger = logging.getLogger(__name__)

SMALL_IMAGE = 64  # px; below this ResNet/DenseNet get a CIFAR-style stem and VGG a 512-d head

# torchvision name -> (family, dotted path of the first conv)
ARCHS = {
    "resnet18": ("resnet", "conv1"),
    "resnet50": ("resnet", "conv1"),
    "mobilenet_v2": ("mobilenet", "features.0.0"),
    "efficientnet_b0": ("efficientnet", "features.0.0"),
    "vgg11_bn": ("vgg", "features.0"),
    "densenet121": ("densenet", "features.conv0"),
}
_VGG_LAYERS = {"vgg11_bn": ("A", True)}  # torchvision.models.vgg.cfgs key, batch norm


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _conv_like(old: nn.Conv2d, in_channels: int, **geometry) -> nn.Conv2d:
    """A conv with ``old``'s settings (overridden by ``geometry``) taking ``in_channels``."""
    settings = {"kernel_size": old.kernel_size, "stride": old.stride, "padding": old.padding}
    conv = nn.Conv2d(
        in_channels, old.out_channels, bias=old.bias is not None, **{**settings, **geometry}
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class TorchvisionClassifier(nn.Module):
    """A torchvision classifier with ``embed`` and ``feature_dim``; its children are torchvision's."""

    def __init__(self, arch: str, net: nn.Module, min_size: int = 1) -> None:
        super().__init__()
        self.arch = arch
        self.family = ARCHS[arch][0]
        self.min_size = min_size  # inputs smaller than this are upsampled to it
        for name, child in net.named_children():
            self.add_module(name, child)
        self.feature_dim = self.head().in_features

    def head(self) -> nn.Linear:
        """The final linear layer, applied to ``embed(x)``."""
        if self.family == "resnet":
            return self.fc
        if self.family == "densenet":
            return self.classifier
        return self.classifier[-1]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if min(h, w) < self.min_size:
            x = resize_bilinear(x, (max(h, self.min_size), max(w, self.min_size)))
        if self.family == "resnet":
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return global_avg_pool(x).flatten(1)  # torchvision's avgpool: AdaptiveAvgPool2d((1, 1))
        if self.family == "densenet":
            return global_avg_pool(F.relu(self.features(x))).flatten(1)
        if self.family == "mobilenet":
            return global_avg_pool(self.features(x)).flatten(1)
        # efficientnet: classifier = [Dropout, Linear]; vgg: classifier ends with its last Linear.
        # Both pool with AdaptiveAvgPool2d(1), except torchvision's VGG (>= 64 px): its 7x7 pooling
        # feeds the 512 * 7 * 7-wide classifier
        x = self.features(x)
        if self.family == "vgg" and self.avgpool.output_size != 1:
            return self.classifier[:-1](self.avgpool(x).flatten(1))
        x = global_avg_pool(x).flatten(1)
        return x if self.family == "efficientnet" else self.classifier[:-1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.embed(x)
        if self.family in ("mobilenet", "efficientnet"):
            return self.classifier(features)  # keeps torchvision's dropout before the Linear
        return self.head()(features)


def _small_vgg(arch: str, num_classes: int) -> nn.Module:
    """torchvision's VGG layers and init with a global-pool + ``Linear(512, num_classes)`` head.

    Built directly rather than by replacing the head of torchvision's VGG, which would first
    initialise (for seconds) the ~120M-parameter 4096-wide classifier only to throw it away.
    """
    from torchvision.models.vgg import cfgs, make_layers

    cfg, batch_norm = _VGG_LAYERS[arch]
    net = nn.Module()
    net.features = make_layers(cfgs[cfg], batch_norm=batch_norm)
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    net.classifier = nn.Sequential(nn.Linear(512, num_classes))
    for m in net.modules():  # torchvision's VGG init
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return net


def torchvision_model(
    arch: str, in_channels: int, num_classes: int, image_size: int
) -> TorchvisionClassifier:
    """A randomly initialised torchvision classifier, adapted to the input channels, image size and class count
    (module doc)."""
    from torchvision.models import get_model  # lazy: importing torchvision.models takes a while

    family, first_conv = ARCHS[arch]
    small = image_size < SMALL_IMAGE
    if small and family == "vgg":
        net = _small_vgg(arch, num_classes)
        logger.info(
            "tv_%s: %d px < %d px, using global pooling and a 512-d linear head",
            arch,
            image_size,
            SMALL_IMAGE,
        )
    else:
        net = get_model(arch, weights=None, num_classes=num_classes)
    min_size = 1
    if small and family in ("resnet", "densenet"):
        pool = "maxpool" if family == "resnet" else "features.pool0"
        _set_module(
            net,
            first_conv,
            _conv_like(
                net.get_submodule(first_conv), in_channels, kernel_size=3, stride=1, padding=1
            ),
        )
        _set_module(net, pool, nn.Identity())
        min_size = 8 if family == "densenet" else 1
        logger.info(
            "tv_%s: %d px < %d px, using a 3x3 stride-1 stem without max-pool",
            arch,
            image_size,
            SMALL_IMAGE,
        )
    elif in_channels != 3:
        _set_module(net, first_conv, _conv_like(net.get_submodule(first_conv), in_channels))
    if small and family == "vgg":
        min_size = 32
    return TorchvisionClassifier(arch, net, min_size)


for _arch in ARCHS:
    MODELS.add(f"tv_{_arch}", OwnPartial(torchvision_model, _arch))
