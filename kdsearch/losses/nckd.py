"""DKD's non-target part (Zhao et al., CVPR 2022): T² · KL(p̂_t ‖ p̂_s) over the classes other than the label."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from kdsearch.losses import LossInputs, LossShapes, Term, kl_divergence
from kdsearch.losses.tckd import target_mask

# Added to the target logit (already divided by T) to take it out of the softmax: exp(-1e4) is 0
# in float32, and unlike -inf it leaves no NaN in 0 · (log 0 − log 0).
MASK = -1e4


def nckd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """T² · KL(p̂_teacher ‖ p̂_student) over the non-target classes, averaged over the batch."""
    target = target_mask(student_logits, labels)
    log_student = F.log_softmax(student_logits / temperature + MASK * target, dim=-1)
    log_teacher = F.log_softmax(teacher_logits / temperature + MASK * target, dim=-1)
    return kl_divergence(log_teacher, log_student) * temperature**2


class NonTargetClassKD(Term):
    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, inputs: LossInputs) -> Tensor:
        assert inputs.teacher_logits is not None
        return nckd(inputs.student_logits, inputs.teacher_logits, inputs.labels, self.temperature)


def build(shapes: LossShapes, *, temperature: float) -> Term:
    return NonTargetClassKD(float(temperature))
