"""``cosine``: align the student's flattened hidden features with the teacher's by cosine similarity.

loss = w · mean(1 − cos(reduce(f_t), f_s)) + (1 − w) · CE(s, y)

The tutorial flattens the student's conv output (1024) and the teacher's (2048), and average-pools
the teacher's vector by 2 so the sizes match. Here the larger vector is pooled down to the smaller
one's length with adaptive 1-D pooling (identical to the tutorial's when one size divides the
other), by average or max (``reduce``), so any pair of layers can be aligned.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from optuna.distributions import CategoricalDistribution
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from kdsearch.losses import LossInputs, LossShapes, Strategy, Term, TermKind, hyper, mixing_weight

REDUCTIONS = ("avg", "max")


def reduce_to(vectors: Tensor, size: int, how: str) -> Tensor:
    """Pool (B, D) vectors to (B, size) along D: the tutorial's avg_pool1d, generalised.

    When ``size`` divides D the pooling windows are consecutive runs of D/size values, so a view
    and a mean (or max) over the last axis gives the same numbers as adaptive pooling, much faster
    on the CPU.
    """
    batch, length = vectors.shape
    if length == size:
        return vectors
    if length % size == 0:
        runs = vectors.reshape(batch, size, length // size)
        return runs.mean(dim=2) if how == "avg" else runs.amax(dim=2)
    pool = F.adaptive_avg_pool1d if how == "avg" else F.adaptive_max_pool1d
    return pool(vectors.unsqueeze(1), size).squeeze(1)


class CosineFeatures(Term):
    reads_teacher_features: ClassVar[bool] = True

    def __init__(self, reduce: str, student_size: int | None = None) -> None:
        super().__init__()
        self.reduce = reduce
        # Known when built from the tapped layers' shapes: then the teacher's side is pooled once.
        self.student_size = student_size

    def teacher_features_once(self, features: Tensor) -> Tensor:
        """The teacher's vectors pooled to the student's length once per run, not per batch."""
        flat = features.flatten(1)
        if self.student_size is None or flat.shape[1] <= self.student_size:
            return features
        return reduce_to(flat, self.student_size, self.reduce)

    def forward(self, inputs: LossInputs) -> Tensor:
        assert inputs.student_features is not None and inputs.teacher_features is not None
        student = inputs.student_features.flatten(1)
        teacher = inputs.teacher_features.flatten(1)
        size = min(student.shape[1], teacher.shape[1])
        student, teacher = reduce_to(student, size, self.reduce), reduce_to(teacher, size, self.reduce)
        return (1.0 - F.cosine_similarity(student, teacher, dim=1)).mean()


def _build(hp: dict[str, Any], shapes: LossShapes) -> Term:
    # Any pair of sizes can be pooled to the smaller one, so no shape check is needed here.
    student = shapes.student_features
    return CosineFeatures(str(hp["reduce"]), math.prod(student) if student is not None else None)


REDUCE = hyper(
    "avg", "How the longer vector is pooled: avg or max.", choices=REDUCTIONS, space=CategoricalDistribution(REDUCTIONS)
)
COSINE = TermKind("cosine", _build, {"reduce": REDUCE}, uses_features=True)

STRATEGY = Strategy(
    "cosine",
    "cosine loss between flattened hidden features, the larger pooled to the smaller",
    terms={"hidden_weight": COSINE},
    weights={"hidden_weight": mixing_weight("cosine term")},
    mixed=True,
)
