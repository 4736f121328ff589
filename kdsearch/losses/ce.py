"""Cross-entropy on the labels, with the recipe's label smoothing."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F  # noqa: N812 - torch's own convention

from kdsearch.losses import LossInputs, LossShapes, Term


class CrossEntropy(Term):
    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, inputs: LossInputs) -> Tensor:
        return F.cross_entropy(inputs.student_logits, inputs.labels, label_smoothing=self.label_smoothing)


def build(shapes: LossShapes, *, label_smoothing: float = 0.0) -> Term:
    return CrossEntropy(label_smoothing)
