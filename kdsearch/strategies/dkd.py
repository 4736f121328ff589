"""``dkd``: Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).

loss = α · TCKD + β · NCKD + CE(s, y)

The KD loss splits into a target-class part and a non-target-class part, both at temperature T:

- TCKD = T² · KL(b_t ‖ b_s), where b = [p_target, 1 − p_target] is the binary "is it the label" view;
- NCKD = T² · KL(p̂_t ‖ p̂_s), where p̂ is the distribution over the non-target classes alone.

Classical KD weighs NCKD by (1 − p_target of the teacher), which suppresses it exactly where the
teacher is confident; DKD frees the two weights. The authors' β ranges from 2 to 8 depending on the
teacher-student pair, so both weights (log scale) and T are searched. Logits only: the teacher's
outputs stay cached. The authors also ramp the DKD weight up over the first epochs; the tutorial's
10-epoch runs keep it constant. Tutorial-style defaults: α 1, β 8, T 4.
"""

from __future__ import annotations

from typing import Any

import torch
from optuna.distributions import FloatDistribution
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from kdsearch.losses import LossInputs, LossShapes, Strategy, Term, TermKind, hyper
from kdsearch.strategies.kd import TEMPERATURE

# Added to the target logit (already divided by T) to take it out of the softmax: exp(-1e4) is 0
# in float32, and unlike -inf it leaves no NaN in 0 · (log 0 − log 0).
MASK = -1e4


def _target_mask(logits: Tensor, labels: Tensor) -> Tensor:
    return F.one_hot(labels, logits.shape[-1]).bool()


def _binary_log_probs(scaled: Tensor, target: Tensor) -> Tensor:
    """log [p_target, 1 − p_target] of softmax(scaled), from log-sum-exps (no 1 − p cancellation)."""
    everything = torch.logsumexp(scaled, dim=-1)
    on_target = scaled.masked_fill(~target, float("-inf")).logsumexp(dim=-1)
    off_target = scaled.masked_fill(target, float("-inf")).logsumexp(dim=-1)
    return torch.stack((on_target, off_target), dim=-1) - everything.unsqueeze(-1)


def tckd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """T² · KL(b_teacher ‖ b_student), averaged over the batch."""
    target = _target_mask(student_logits, labels)
    log_student = _binary_log_probs(student_logits / temperature, target)
    log_teacher = _binary_log_probs(teacher_logits / temperature, target)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1).mean()
    return kl * temperature**2


def nckd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """T² · KL(p̂_teacher ‖ p̂_student) over the non-target classes, averaged over the batch."""
    target = _target_mask(student_logits, labels)
    log_student = F.log_softmax(student_logits / temperature + MASK * target, dim=-1)
    log_teacher = F.log_softmax(teacher_logits / temperature + MASK * target, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1).mean()
    return kl * temperature**2


class TargetClassKD(Term):
    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, inputs: LossInputs) -> Tensor:
        assert inputs.teacher_logits is not None
        return tckd(inputs.student_logits, inputs.teacher_logits, inputs.labels, self.temperature)


class NonTargetClassKD(TargetClassKD):
    def forward(self, inputs: LossInputs) -> Tensor:
        assert inputs.teacher_logits is not None
        return nckd(inputs.student_logits, inputs.teacher_logits, inputs.labels, self.temperature)


def _tckd(hp: dict[str, Any], shapes: LossShapes) -> Term:
    return TargetClassKD(float(hp["temperature"]))


def _nckd(hp: dict[str, Any], shapes: LossShapes) -> Term:
    return NonTargetClassKD(float(hp["temperature"]))


STRATEGY = Strategy(
    "dkd",
    "decoupled KD: target-class (α) and non-target-class (β) parts of the KD loss, plus CE",
    terms={
        "alpha": TermKind("tckd", _tckd, {"temperature": TEMPERATURE}, uses_teacher_logits=True),
        "beta": TermKind("nckd", _nckd, {"temperature": TEMPERATURE}, uses_teacher_logits=True),
    },
    weights={
        "alpha": hyper(1.0, "Weight α of TCKD.", low=0.0, high=100.0, space=FloatDistribution(0.25, 4.0, log=True)),
        "beta": hyper(8.0, "Weight β of NCKD.", low=0.0, high=100.0, space=FloatDistribution(0.5, 16.0, log=True)),
    },
    defaults={"temperature": 4.0},
)
