"""Model registry: ConvNet family, CIFAR-style ResNets, torchvision wrappers and tiny test nets.

``create_model(name, in_channels, num_classes, image_size, **options)`` builds any registered model
(``list_models('convnet*')``); every model maps ``[B, C, H, W]`` normalised images to logits
``[B, num_classes]`` and has ``embed(x) -> [B, feature_dim]`` and ``feature_dim``. Add a model by
registering a factory with ``@MODELS.register("name")`` in a module imported below.
"""

from ddkit.models import convnet, resnet, tiny, tv  # noqa: F401  (registration)
from ddkit.models.convnet import ConvNet
from ddkit.models.registry import (
    MODELS,
    configured_model,
    create_model,
    list_models,
    model_options,
    register_name_parser,
)
from ddkit.models.resnet import ResNetCIFAR
from ddkit.models.tiny import MLP
from ddkit.models.tv import TorchvisionClassifier

__all__ = [
    "MLP",
    "MODELS",
    "ConvNet",
    "ResNetCIFAR",
    "TorchvisionClassifier",
    "configured_model",
    "create_model",
    "list_models",
    "model_options",
    "register_name_parser",
]
