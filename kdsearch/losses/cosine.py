"""Cosine on hidden features: mean(1 − cos(pool(f_t), f_s)), the longer vector pooled to the shorter.

The tutorial flattens the student's conv output (1024) and the teacher's (2048), and average-pools
the teacher's vector by 2. Here the larger vector is pooled down to the smaller one's length with
adaptive 1-D pooling (identical to the tutorial's when one size divides the other), by average or
max, so any pair of layers can be aligned.
"""

from __future__ import annotations

import math

from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from kdsearch.losses import LossInputs, LossShapes, Term


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


def build(shapes: LossShapes, *, reduce: str) -> Term:
    # Any pair of sizes can be pooled to the smaller one, so no shape check is needed here.
    student = shapes.student_features
    return CosineFeatures(str(reduce), math.prod(student) if student is not None else None)
