"""``ce``: the student alone, trained on labels with cross-entropy. The baseline every KD run must beat."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kdsearch.strategies.base import (
    RECIPE_SPACE,
    RECIPE_TUTORIAL,
    DistillationLoss,
    LossInputs,
    Strategy,
    cross_entropy,
)


class CrossEntropyLoss(DistillationLoss):
    def forward(self, inputs: LossInputs) -> Tensor:
        return cross_entropy(inputs)


class CrossEntropy(Strategy):
    name = "ce"
    summary = "student alone on hard labels (no teacher)"
    tutorial = dict(RECIPE_TUTORIAL)
    space = dict(RECIPE_SPACE)

    def build_loss(self, hp: dict[str, Any], student_features: object, teacher_features: object) -> DistillationLoss:
        return CrossEntropyLoss()
