"""``kd``: Hinton's soft targets. The student matches the teacher's temperature-softened distribution.

loss = w · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − w) · CE(s, y)

The T² factor keeps the soft-target gradients at the same scale as T changes (Hinton et al., 2015),
as the tutorial does. One mixing weight ``soft_target_weight`` (w) is searched rather than two free
weights: Adam's update is invariant to a common scale of the loss, so only the ratio of the two
weights matters and a second weight would be a wasted search dimension. ``ce_weight`` may still be
set explicitly (in a config, a space file or ``--fix``) to reproduce other recipes.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from kdsearch.errors import UserError
from kdsearch.spaces import FloatParam
from kdsearch.strategies.base import (
    RECIPE_SPACE,
    RECIPE_TUTORIAL,
    DistillationLoss,
    LossInputs,
    Strategy,
    cross_entropy,
)


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher ‖ student) at temperature T, summed over classes, averaged over the batch, times T²."""
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1).mean()
    return kl * temperature**2


class SoftTargetLoss(DistillationLoss):
    def __init__(self, temperature: float, soft_target_weight: float, ce_weight: float) -> None:
        super().__init__()
        self.temperature = temperature
        self.soft_target_weight = soft_target_weight
        self.ce_weight = ce_weight

    def forward(self, inputs: LossInputs) -> Tensor:
        assert inputs.teacher_logits is not None
        soft = soft_target_loss(inputs.student_logits, inputs.teacher_logits, self.temperature)
        return self.soft_target_weight * soft + self.ce_weight * cross_entropy(inputs)


class SoftTargets(Strategy):
    name = "kd"
    summary = "soft targets: KL to the teacher's softened logits, scaled by T²"
    uses_teacher_logits = True
    tutorial = {**RECIPE_TUTORIAL, "temperature": 2.0, "soft_target_weight": 0.25}
    optional = ("ce_weight",)
    space = {
        **RECIPE_SPACE,
        "temperature": FloatParam(1.0, 8.0),
        "soft_target_weight": FloatParam(0.0, 1.0),
    }

    def check(self, hp: dict[str, Any]) -> None:
        super().check(hp)
        if hp["temperature"] <= 0:
            raise UserError(f"kd: temperature must be positive, got {hp['temperature']}")

    def build_loss(self, hp: dict[str, Any], student_features: object, teacher_features: object) -> DistillationLoss:
        weight = float(hp["soft_target_weight"])
        return SoftTargetLoss(float(hp["temperature"]), weight, self.ce_weight(hp, "soft_target_weight"))
