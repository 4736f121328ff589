"""DKD's target-class part (Zhao et al., CVPR 2022): T² · KL(b_t ‖ b_s), b = [p_target, 1 − p_target]."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from kdsearch.losses import LossInputs, LossShapes, Term, kl_divergence


def target_mask(logits: Tensor, labels: Tensor) -> Tensor:
    return F.one_hot(labels, logits.shape[-1]).bool()


def _binary_log_probs(scaled: Tensor, target: Tensor) -> Tensor:
    """log [p_target, 1 − p_target] of softmax(scaled), from log-sum-exps (no 1 − p cancellation)."""
    everything = torch.logsumexp(scaled, dim=-1)
    on_target = scaled.masked_fill(~target, float("-inf")).logsumexp(dim=-1)
    off_target = scaled.masked_fill(target, float("-inf")).logsumexp(dim=-1)
    return torch.stack((on_target, off_target), dim=-1) - everything.unsqueeze(-1)


def tckd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """T² · KL(b_teacher ‖ b_student), averaged over the batch."""
    target = target_mask(student_logits, labels)
    log_student = _binary_log_probs(student_logits / temperature, target)
    log_teacher = _binary_log_probs(teacher_logits / temperature, target)
    return kl_divergence(log_teacher, log_student) * temperature**2


class TargetClassKD(Term):
    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, inputs: LossInputs) -> Tensor:
        assert inputs.teacher_logits is not None
        return tckd(inputs.student_logits, inputs.teacher_logits, inputs.labels, self.temperature)


def build(shapes: LossShapes, *, temperature: float) -> Term:
    return TargetClassKD(float(temperature))
