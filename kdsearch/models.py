"""The tutorial's DeepNN teacher and LightNN student; zoo models by name; user models by import path.

The classes keep the tutorial's module names (``features``, ``classifier``) and so its state_dict
keys: a checkpoint saved by the tutorial's own code loads here unchanged. They are sized from the
dataset (channels, image size, classes) instead of hard-coding CIFAR-10's 3x32x32 and 10 classes.

Each conv block pools before its ReLU, where the tutorial writes ReLU then max-pool. The two commute
exactly: ReLU is monotone, so ``relu(max(x)) == max(relu(x))`` value for value, and the gradient
reaches the same input element either way. Pooling first runs the ReLU, forward and backward, on a
quarter of the elements. Only the order of two parameter-free modules differs from the tutorial's
listing, so the convolutions keep their indices and the state_dict keys are the tutorial's; a test
trains both orders and compares them bit for bit. User models run exactly as written.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable

from torch import Tensor, nn

from kdsearch.errors import ConfigError, UserError, shown
from kdsearch.zoo import build_zoo_model, is_zoo_model


def _flat_size(channels: int, image_size: tuple[int, int], pools: int) -> int:
    height, width = image_size
    for _ in range(pools):
        height, width = height // 2, width // 2
    if height < 1 or width < 1:
        raise UserError(f"images of {image_size[0]}x{image_size[1]} are too small for {pools} 2x2 poolings")
    return channels * height * width


class DeepNN(nn.Module):
    """The tutorial's teacher: four 3x3 convs, two max-pools, a 512-unit classifier.

    1,186,986 parameters on CIFAR-10.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 128, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(128, 64, kernel_size=3, padding=1),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 32, kernel_size=3, padding=1),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(_flat_size(32, image_size, 2), 512),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = x.flatten(1)
        return self.classifier(x)


class LightNN(nn.Module):
    """The tutorial's student: two 3x3 convs of 16 channels, a 256-unit classifier.

    267,738 parameters on CIFAR-10 at ``width=1``. ``width`` scales every channel and hidden-unit
    count (rounded, at least 1), so a search can trade accuracy for size.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, image_size: tuple[int, int] = (32, 32), width: float = 1.0
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ConfigError("width", f"must be positive, got {width}")
        channels = max(1, round(16 * width))
        hidden = max(1, round(256 * width))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=1),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(_flat_size(channels, image_size, 2), hidden),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = x.flatten(1)
        return self.classifier(x)


REGISTERED: dict[str, type[nn.Module]] = {"deepnn": DeepNN, "lightnn": LightNN}


def resolve_model_class(name: str) -> Callable[..., nn.Module]:
    """A registered name (``deepnn``, ``lightnn``) or ``package.module:Class`` importable from the cwd.

    Zoo names (``torchvision.models:NAME``, ``timm:NAME``) are checked and built by ``kdsearch.zoo``.
    """
    if name in REGISTERED:
        return REGISTERED[name]
    if ":" not in name:
        raise UserError(
            f"unknown model {shown(name)}; use one of {', '.join(REGISTERED)}, torchvision.models:NAME, timm:NAME "
            "or package.module:Class"
        )
    module_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"cannot import model module {shown(module_name)}: {exc}") from None
    cls = getattr(module, attr, None)
    if cls is None or not callable(cls):
        raise UserError(f"module {shown(module_name)} has no class {shown(attr)}")
    return cls


def build_model(
    name: str, *, num_classes: int, in_channels: int, image_size: tuple[int, int], width: float = 1.0
) -> nn.Module:
    """Instantiate a model sized for the dataset.

    A zoo model gets the class and channel counts its zoo's way; a class or builder of the user's
    gets the sizing arguments its signature names (``num_classes``, ``in_channels``,
    ``image_size``, ``width``), and one that only takes ``**kwargs`` gets ``num_classes``, the one
    every classifier understands.
    """
    if is_zoo_model(name):
        if width != 1.0:
            raise ConfigError("width", f"must stay 1: zoo model {shown(name)} has no width multiplier")
        model = build_zoo_model(name, num_classes=num_classes, in_channels=in_channels)
    else:
        model = _build_user_model(name, num_classes, in_channels, image_size, width)
    if not isinstance(model, nn.Module):
        raise UserError(f"{shown(name)} did not build a torch.nn.Module")
    return model


def _build_user_model(
    name: str, num_classes: int, in_channels: int, image_size: tuple[int, int], width: float
) -> nn.Module:
    cls = resolve_model_class(name)
    offered = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size, "width": width}
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    named = {k: v for k, v in offered.items() if k in params}
    if not named and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        named = {"num_classes": num_classes}
    if width != 1.0 and "width" not in named:
        raise ConfigError("width", f"must stay 1: model {shown(name)} takes no width argument")
    try:
        return cls(**named)
    except TypeError as exc:
        raise UserError(f"cannot build model {shown(name)}: {exc}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
