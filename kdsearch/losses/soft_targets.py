"""Soft targets: T² · KL(softmax(t/T) ‖ softmax(s/T)) (Hinton et al., 2015), as the tutorial computes it.

The T² factor keeps the soft-target gradients at the same scale as T changes.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from kdsearch.losses import LossInputs, LossShapes, Term, kl_divergence


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher ‖ student) at temperature T, summed over classes, averaged over the batch, times T²."""
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    return kl_divergence(log_p_teacher, log_p_student) * temperature**2


class SoftTargets(Term):
    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, inputs: LossInputs) -> Tensor:
        assert inputs.teacher_logits is not None
        return soft_target_loss(inputs.student_logits, inputs.teacher_logits, self.temperature)


def build(shapes: LossShapes, *, temperature: float) -> Term:
    return SoftTargets(float(temperature))
