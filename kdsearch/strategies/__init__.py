"""The distillation methods as declarations: which terms, weighed by which hyperparameters, searched where.

A method is a module ``kdsearch/strategies/<name>.py`` holding ``STRATEGY``, a ``Strategy``: its
name, the terms it adds to cross-entropy (by name, declared in ``kdsearch.terms``), the
hyperparameters that weigh them, their tutorial values and default search space. No strategy
imports another and none imports torch: ``kdsearch.losses.build_loss`` turns a strategy and its
values into ``Σ weightᵢ · termᵢ``. The names are read from the package folder, so adding a method
is adding its module, and ``--help`` never loads one.

CE is always the last term. Its weight is 1, or ``1 − w`` for the tutorial's methods that mix one
distillation weight ``w`` with CE (Adam is invariant to a common scale of the loss, so only the
ratio matters and a second free weight would be a wasted search dimension); ``ce_weight`` may
still be set explicitly.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any

from optuna.distributions import FloatDistribution

from kdsearch.errors import ConfigError, UserError, shown
from kdsearch.terms import Hyper, TermSpec, get_term, hyper

METHODS: tuple[str, ...] = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def mixing_weight(term: str) -> Hyper:
    """The tutorial's one distillation weight w (CE gets 1 − w), at its hand-set 0.25, searched in [0, 1]."""
    return hyper(0.25, f"Weight w of the {term}; CE gets 1 − w.", low=0.0, high=1.0, space=FloatDistribution(0.0, 1.0))


CE_WEIGHT = hyper(None, "Weight of the cross-entropy term [default: 1 − w, or 1].", kind=float, low=0.0, optional=True)


@dataclass(frozen=True)
class Strategy:
    """A distillation method: its weighted terms (plus CE), their values, and its search space."""

    name: str
    summary: str
    terms: dict[str, str] = field(default_factory=dict)  # weight name → the term (kdsearch.terms) it weighs
    weights: dict[str, Hyper] = field(default_factory=dict)
    mixed: bool = False  # CE weight is 1 − the one distillation weight (the tutorial's form)
    defaults: dict[str, Any] = field(default_factory=dict)  # tutorial values differing from the terms'

    @property
    def term_specs(self) -> dict[str, TermSpec]:
        """Weight name → the declaration of the term it weighs."""
        return {weight: get_term(term) for weight, term in self.terms.items()}

    @property
    def params(self) -> dict[str, Hyper]:
        """Every hyperparameter of the method: weights, then each term's own (shared names once)."""
        out = dict(self.weights)
        for spec in self.term_specs.values():
            for name, declared in spec.params.items():
                out.setdefault(name, declared)
        return out | {"ce_weight": CE_WEIGHT}

    @property
    def space(self) -> dict[str, Any]:
        """The method's default search space (the recipe's is added by ``kdsearch.spaces``)."""
        return {name: spec.rule.space for name, spec in self.params.items() if spec.rule.space is not None}

    @property
    def uses_teacher_logits(self) -> bool:
        return any(spec.reads_teacher_logits for spec in self.term_specs.values())

    @property
    def uses_features(self) -> bool:
        return any(spec.reads_features for spec in self.term_specs.values())

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
                raise UserError(f"method {self.name} has no hyperparameter {shown(name)}; known: {known}")
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


# `optimize --method auto`: one study over every method, ce among them (the study's own control).
AUTO = "auto"


def methods_of(text: str) -> tuple[str, ...]:
    """The arms of ``--method``: one method, ``auto`` (every method) or a comma list (``kd,dkd,ce``).

    Each name is checked; a list is kept in the user's order without repeats.
    """
    if text.strip() == AUTO:
        return METHODS
    names = [name.strip() for name in text.split(",")]
    for name in names:
        if name not in METHODS:
            raise ConfigError("method", f"must be {AUTO}, or one or more of {', '.join(METHODS)}, got {shown(name)}")
    return tuple(dict.fromkeys(names))


def get_strategy(method: str) -> Strategy:
    if method not in METHODS:
        raise UserError(f"unknown method {shown(method)}; choose one of {', '.join(METHODS)}")
    return importlib.import_module(f"{__name__}.{method}").STRATEGY
