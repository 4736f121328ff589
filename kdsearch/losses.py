"""Losses as weighted sums of terms; a strategy is its terms, their weights and its space.

A *term* is one loss a student can be trained on: cross-entropy on labels, soft targets, a cosine
on features, a regressor's distance, DKD's two parts. A *strategy* (one module per method under
``kdsearch.strategies``) names its terms, the hyperparameters that weigh them, their tutorial
values and default search space; ``build_loss`` turns a set of values into
``Σ weightᵢ · termᵢ`` (as torchdistill's ``WeightedSumLoss`` does). CE is always the last term. Its
weight is 1, or ``1 − w`` for the tutorial's methods that mix one distillation weight ``w`` with CE
(Adam is invariant to a common scale of the loss, so only the ratio matters and a second free
weight would be a wasted search dimension); ``ce_weight`` may still be set explicitly.

A term whose weight is 0 is not built at all: it costs nothing and draws no random numbers, so
``hybrid`` with every distillation weight at zero trains exactly as ``ce``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from optuna.distributions import FloatDistribution
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812 - torch's own convention

from kdsearch.config import RecipeConfig
from kdsearch.errors import ConfigError, UserError
from kdsearch.knobs import Knob


@dataclass
class LossInputs:
    """One batch as a loss sees it. Teacher tensors come from the precomputed cache, by index."""

    student_logits: Tensor
    labels: Tensor
    student_features: Tensor | None = None
    teacher_logits: Tensor | None = None
    teacher_features: Tensor | None = None


@dataclass(frozen=True)
class LossShapes:
    """Per-sample shapes of the tapped layers' outputs (None when no feature is tapped)."""

    student_features: tuple[int, ...] | None = None
    teacher_features: tuple[int, ...] | None = None


class Term(nn.Module):
    """One loss term: ``forward(LossInputs) -> Tensor`` (a scalar)."""

    reads_teacher_features: ClassVar[bool] = False

    def teacher_features_once(self, features: Tensor) -> Tensor:
        """The teacher's cached features as ``forward`` wants them, computed once per run.

        The loop applies it to the whole cache before training, so work a term would otherwise
        repeat on the frozen teacher every step (cosine's pooling) is done once.
        """
        return features


class CrossEntropy(Term):
    """Cross-entropy on the labels, with the recipe's label smoothing."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, inputs: LossInputs) -> Tensor:
        return F.cross_entropy(inputs.student_logits, inputs.labels, label_smoothing=self.label_smoothing)


class WeightedSum(nn.Module):
    """``Σ wᵢ · termᵢ``, summed in order; trainable parts of terms (a regressor) train with the student."""

    def __init__(self, weighted: list[tuple[float, Term]]) -> None:
        super().__init__()
        if not weighted:
            raise UserError("every loss weight is zero: nothing to train on")
        self.weights = [w for w, _ in weighted]
        self.terms = nn.ModuleList(t for _, t in weighted)

    def forward(self, inputs: LossInputs) -> Tensor:
        total: Tensor | None = None
        for weight, term in zip(self.weights, self.terms, strict=True):
            part = weight * term(inputs)
            total = part if total is None else total + part
        assert total is not None
        return total

    def teacher_features_once(self, features: Tensor) -> Tensor:
        """Delegated to the one term that reads the teacher's features; terms that share them get them as cached."""
        readers = [t for t in self.terms if isinstance(t, Term) and t.reads_teacher_features]
        return readers[0].teacher_features_once(features) if len(readers) == 1 else features


@dataclass(frozen=True)
class Hyper:
    """A method's hyperparameter: its tutorial value and its rule (range, choices, default space)."""

    default: Any
    rule: Knob


def hyper(default: Any, help: str, **rules: Any) -> Hyper:
    if "kind" not in rules:
        rules["kind"] = type(default)
    return Hyper(default, Knob(help, **rules))


@dataclass(frozen=True)
class TermKind:
    """How to build one term from a method's hyperparameters, and which of them it reads."""

    name: str
    build: Callable[[dict[str, Any], LossShapes], Term]
    params: dict[str, Hyper] = field(default_factory=dict)
    uses_teacher_logits: bool = False
    uses_features: bool = False


def mixing_weight(term: str) -> Hyper:
    """The tutorial's one distillation weight w (CE gets 1 − w), at its hand-set 0.25, searched in [0, 1]."""
    return hyper(0.25, f"Weight w of the {term}; CE gets 1 − w.", low=0.0, high=1.0, space=FloatDistribution(0.0, 1.0))


CE_WEIGHT = hyper(None, "Weight of the cross-entropy term [default: 1 − w, or 1].", kind=float, low=0.0, optional=True)


@dataclass(frozen=True)
class Strategy:
    """A distillation method: its weighted terms (plus CE), their values, and its search space."""

    name: str
    summary: str
    terms: dict[str, TermKind] = field(default_factory=dict)  # weight name → the term it weighs
    weights: dict[str, Hyper] = field(default_factory=dict)
    mixed: bool = False  # CE weight is 1 − the one distillation weight (the tutorial's form)
    defaults: dict[str, Any] = field(default_factory=dict)  # tutorial values differing from the terms'

    @property
    def params(self) -> dict[str, Hyper]:
        """Every hyperparameter of the method: weights, then each term's own (shared names once)."""
        out = dict(self.weights)
        for kind in self.terms.values():
            for name, spec in kind.params.items():
                out.setdefault(name, spec)
        return out | {"ce_weight": CE_WEIGHT}

    @property
    def space(self) -> dict[str, Any]:
        """The method's default search space (the recipe's is added by ``kdsearch.spaces``)."""
        return {name: spec.rule.space for name, spec in self.params.items() if spec.rule.space is not None}

    @property
    def uses_teacher_logits(self) -> bool:
        return any(kind.uses_teacher_logits for kind in self.terms.values())

    @property
    def uses_features(self) -> bool:
        return any(kind.uses_features for kind in self.terms.values())

    @property
    def uses_teacher(self) -> bool:
        return self.uses_teacher_logits or self.uses_features

    def tutorial(self) -> dict[str, Any]:
        """The hand-set values (``ce_weight`` unset: derived)."""
        values = {name: spec.default for name, spec in self.params.items() if name != "ce_weight"}
        return values | self.defaults

    def hyperparameters(self, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """Tutorial values overlaid with ``given``, each checked: unknown names and bad values are user errors."""
        params = self.params
        merged: dict[str, Any] = self.tutorial()
        for name, value in (given or {}).items():
            if name not in params:
                known = ", ".join(sorted(params))
                raise UserError(f"method {self.name} has no hyperparameter {name!r}; known: {known}")
            merged[name] = value
        checked: dict[str, Any] = {}
        for name, value in merged.items():
            try:
                checked[name] = params[name].rule.validate(name, value)
            except ConfigError as exc:
                raise UserError(f"{self.name}: {exc.name} {exc.problem}") from None
        if checked.get("ce_weight") is None:
            checked.pop("ce_weight", None)
        return checked

    def ce_weight(self, hp: dict[str, Any]) -> float:
        if hp.get("ce_weight") is not None:
            return float(hp["ce_weight"])
        if self.mixed:
            (weight,) = self.weights
            return 1.0 - float(hp[weight])
        return 1.0

    def build_loss(self, hp: dict[str, Any], shapes: LossShapes, recipe: RecipeConfig | None = None) -> WeightedSum:
        """``Σ weight · term`` over the terms with a non-zero weight, CE last (with the recipe's label smoothing)."""
        label_smoothing = recipe.label_smoothing if recipe is not None else 0.0
        weighted: list[tuple[float, Term]] = [
            (float(hp[weight]), kind.build(hp, shapes)) for weight, kind in self.terms.items() if float(hp[weight])
        ]
        ce = self.ce_weight(hp)
        if ce:
            weighted.append((ce, CrossEntropy(label_smoothing)))
        return WeightedSum(weighted)

    def check_shapes(self, shapes: LossShapes) -> None:
        """Build each feature term once so unmatched layers fail before any trial runs."""
        hp = self.hyperparameters()
        for kind in self.terms.values():
            if kind.uses_features:
                kind.build(hp, shapes)
