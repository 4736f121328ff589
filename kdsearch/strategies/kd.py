"""``kd``: Hinton's soft targets. The student matches the teacher's temperature-softened distribution.

loss = w · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − w) · CE(s, y)

The T² factor keeps the soft-target gradients at the same scale as T changes (Hinton et al., 2015),
as the tutorial does. One mixing weight ``soft_target_weight`` (w) is searched (see
``kdsearch.losses`` for why one); ``ce_weight`` may still be set explicitly.
"""

from __future__ import annotations

from typing import Any

from optuna.distributions import FloatDistribution
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from kdsearch.losses import LossInputs, LossShapes, Strategy, Term, TermKind, hyper, mixing_weight

TEMPERATURE = hyper(
    2.0, "Softmax temperature T.", low=0.0, low_open=True, high=100.0, space=FloatDistribution(1.0, 8.0)
)


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher ‖ student) at temperature T, summed over classes, averaged over the batch, times T²."""
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1).mean()
    return kl * temperature**2


class SoftTargets(Term):
    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, inputs: LossInputs) -> Tensor:
        assert inputs.teacher_logits is not None
        return soft_target_loss(inputs.student_logits, inputs.teacher_logits, self.temperature)


def _build(hp: dict[str, Any], shapes: LossShapes) -> Term:
    return SoftTargets(float(hp["temperature"]))


SOFT_TARGETS = TermKind("soft_targets", _build, {"temperature": TEMPERATURE}, uses_teacher_logits=True)

STRATEGY = Strategy(
    "kd",
    "soft targets: KL to the teacher's softened logits, scaled by T²",
    terms={"soft_target_weight": SOFT_TARGETS},
    weights={"soft_target_weight": mixing_weight("soft targets")},
    mixed=True,
)
