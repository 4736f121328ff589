"""``regressor``: a trainable conv regressor maps the student's feature map onto the teacher's.

loss = w · distance(regressor(f_s), f_t) + (1 − w) · CE(s, y)

The tutorial uses one 3x3 conv (16 → 32 channels) and MSE against the teacher's 32x8x8 map. Here the
regressor's shape is a hyperparameter: ``kernel_size``, ``depth`` (convs; ReLU between them) and
``hidden_channels`` (width of the inner convs when depth > 1), and so is the ``distance``: MSE,
smooth-L1, or cosine (1 − cosine similarity of the flattened maps). The regressor trains with the
student and is dropped afterwards: it is not part of the exported student. Spatial sizes must match.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from kdsearch.errors import UserError
from kdsearch.spaces import CategoricalParam, FloatParam, IntParam
from kdsearch.strategies.base import (
    RECIPE_SPACE,
    RECIPE_TUTORIAL,
    DistillationLoss,
    LossInputs,
    Strategy,
    cross_entropy,
)

DISTANCES = ("mse", "smooth_l1", "cosine")
KERNEL_SIZES = (1, 3, 5)


def build_regressor(in_channels: int, out_channels: int, kernel_size: int, depth: int, hidden: int) -> nn.Sequential:
    """``depth`` convs with 'same' padding from the student's channels to the teacher's."""
    layers: list[nn.Module] = []
    channels = in_channels
    for i in range(depth):
        last = i == depth - 1
        out = out_channels if last else hidden
        layers.append(nn.Conv2d(channels, out, kernel_size=kernel_size, padding=kernel_size // 2))
        if not last:
            layers.append(nn.ReLU())
        channels = out
    return nn.Sequential(*layers)


def feature_distance(predicted: Tensor, target: Tensor, distance: str) -> Tensor:
    if distance == "mse":
        return F.mse_loss(predicted, target)
    if distance == "smooth_l1":
        return F.smooth_l1_loss(predicted, target)
    return (1.0 - F.cosine_similarity(predicted.flatten(1), target.flatten(1), dim=1)).mean()


def check_regressor_hyperparameters(strategy: Strategy, hp: dict[str, Any]) -> None:
    """The regressor's own parameters: shared by ``regressor`` and ``hybrid``."""
    strategy.check_choice(hp, "distance", DISTANCES)
    for name in ("kernel_size", "hidden_channels"):
        value = hp[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{strategy.name}: {name} must be a positive integer, got {value!r}")
    if hp["kernel_size"] % 2 == 0:
        raise UserError(f"{strategy.name}: kernel_size must be odd to keep the map's size, got {hp['kernel_size']}")
    if isinstance(hp["depth"], bool) or not isinstance(hp["depth"], int) or hp["depth"] < 1:
        raise UserError(f"{strategy.name}: depth must be a positive integer, got {hp['depth']!r}")


class RegressorLoss(DistillationLoss):
    def __init__(self, regressor: nn.Module, feature_weight: float, ce_weight: float, distance: str) -> None:
        super().__init__()
        self.regressor = regressor
        self.feature_weight = feature_weight
        self.ce_weight = ce_weight
        self.distance = distance

    def forward(self, inputs: LossInputs) -> Tensor:
        assert inputs.student_features is not None and inputs.teacher_features is not None
        predicted = self.regressor(inputs.student_features)
        hidden = feature_distance(predicted, inputs.teacher_features, self.distance)
        return self.feature_weight * hidden + self.ce_weight * cross_entropy(inputs)


class FeatureRegressor(Strategy):
    name = "regressor"
    summary = "trainable conv regressor from student to teacher feature map, matched by a distance"
    uses_features = True
    tutorial = {
        **RECIPE_TUTORIAL,
        "feature_weight": 0.25,
        "kernel_size": 3,
        "depth": 1,
        "hidden_channels": 32,
        "distance": "mse",
    }
    optional = ("ce_weight",)
    space = {
        **RECIPE_SPACE,
        "feature_weight": FloatParam(0.0, 1.0),
        "kernel_size": CategoricalParam(KERNEL_SIZES),
        "depth": IntParam(1, 3),
        "hidden_channels": CategoricalParam((16, 32, 64)),
        "distance": CategoricalParam(DISTANCES),
    }

    def check(self, hp: dict[str, Any]) -> None:
        super().check(hp)
        check_regressor_hyperparameters(self, hp)

    def check_maps(self, student_features: tuple[int, ...], teacher_features: tuple[int, ...]) -> None:
        """Both layers must give (C, H, W) maps of one spatial size for a conv regressor to match them."""
        if len(student_features) != 3 or len(teacher_features) != 3:
            raise UserError(
                f"regressor needs feature maps (C, H, W) from both layers; got student {student_features} "
                f"and teacher {teacher_features}: pick conv layers with --student-layer / --teacher-layer"
            )
        if student_features[1:] != teacher_features[1:]:
            raise UserError(
                f"regressor cannot match feature maps of different spatial size: student "
                f"{student_features[1]}x{student_features[2]}, teacher {teacher_features[1]}x{teacher_features[2]}"
            )

    def build_loss(
        self, hp: dict[str, Any], student_features: tuple[int, ...] | None, teacher_features: tuple[int, ...] | None
    ) -> DistillationLoss:
        assert student_features is not None and teacher_features is not None
        self.check_maps(student_features, teacher_features)
        regressor = build_regressor(
            student_features[0],
            teacher_features[0],
            int(hp["kernel_size"]),
            int(hp["depth"]),
            int(hp["hidden_channels"]),
        )
        weight = float(hp["feature_weight"])
        return RegressorLoss(regressor, weight, self.ce_weight(hp, "feature_weight"), hp["distance"])
