"""A run's loss: ``Σ wᵢ · termᵢ`` over a strategy's terms, CE last, as torchdistill's ``WeightedSumLoss``.

A strategy (``kdsearch.strategies``) says which terms a method weighs and by what; each term is
built by its module under ``kdsearch.losses``, found by the term's name, so adding a term edits
nothing here. A term whose weight is 0 is not built at all: it costs nothing and draws no random
numbers, so ``hybrid`` with every distillation weight at zero trains exactly as ``ce``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from kdsearch.errors import UserError
from kdsearch.losses import LossInputs, LossShapes, Term
from kdsearch.losses.ce import CrossEntropy
from kdsearch.terms import TermSpec

if TYPE_CHECKING:
    from kdsearch.strategies import Strategy


class WeightedSum(nn.Module):
    """``Σ wᵢ · termᵢ``, summed in order; trainable parts of terms (a regressor) train with the student."""

    def __init__(self, weighted: list[tuple[float, Term]], feature_reader: int | None = None) -> None:
        super().__init__()
        if not weighted:
            raise UserError("every loss weight is zero: nothing to train on")
        self.weights = [w for w, _ in weighted]
        self.terms = nn.ModuleList(t for _, t in weighted)
        # The one term reading the teacher's features, whose once-per-run transform the cache gets.
        self.feature_reader = feature_reader

    def forward(self, inputs: LossInputs) -> Tensor:
        total: Tensor | None = None
        for weight, term in zip(self.weights, self.terms, strict=True):
            part = weight * term(inputs)
            total = part if total is None else total + part
        assert total is not None
        return total

    def teacher_features_once(self, features: Tensor) -> Tensor:
        """Delegated to the one term that reads the teacher's features; terms that share them get them as cached."""
        if self.feature_reader is None:
            return features
        return self.terms[self.feature_reader].teacher_features_once(features)


def build_term(spec: TermSpec, hp: dict[str, Any], shapes: LossShapes) -> Term:
    """The term ``spec`` declares, built from the values of exactly the hyperparameters it reads."""
    module = importlib.import_module(f"kdsearch.losses.{spec.name}")
    return module.build(shapes, **{name: hp[name] for name in spec.params})


def build_loss(strategy: Strategy, hp: dict[str, Any], shapes: LossShapes, label_smoothing: float = 0.0) -> WeightedSum:
    """``Σ weight · term`` over the strategy's terms with a non-zero weight, CE last."""
    weighted: list[tuple[float, Term]] = []
    readers: list[int] = []
    for weight, spec in strategy.term_specs.items():
        if float(hp[weight]):
            if spec.reads_features:
                readers.append(len(weighted))
            weighted.append((float(hp[weight]), build_term(spec, hp, shapes)))
    ce_weight = strategy.ce_weight(hp)
    if ce_weight:
        weighted.append((ce_weight, CrossEntropy(label_smoothing)))
    return WeightedSum(weighted, readers[0] if len(readers) == 1 else None)


def check_feature_shapes(strategy: Strategy, shapes: LossShapes) -> None:
    """Build each feature term once, whatever its weight, so unmatched layers fail before any trial runs."""
    hp = strategy.hyperparameters()
    for spec in strategy.term_specs.values():
        if spec.reads_features:
            build_term(spec, hp, shapes)
