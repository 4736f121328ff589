"""The distillation strategies, by name. Each module holds its loss, helper modules, tutorial
hyperparameters and default search space; see ``base.Strategy`` for the contract."""

from __future__ import annotations

from kdsearch.errors import UserError
from kdsearch.strategies.base import LossInputs, Strategy
from kdsearch.strategies.ce import CrossEntropy
from kdsearch.strategies.cosine import CosineFeatures
from kdsearch.strategies.hybrid import Hybrid
from kdsearch.strategies.kd import SoftTargets
from kdsearch.strategies.regressor import FeatureRegressor

STRATEGIES: dict[str, Strategy] = {
    s.name: s for s in (CrossEntropy(), SoftTargets(), CosineFeatures(), FeatureRegressor(), Hybrid())
}
METHODS = tuple(STRATEGIES)


def get_strategy(method: str) -> Strategy:
    try:
        return STRATEGIES[method]
    except KeyError:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}") from None


__all__ = ["METHODS", "STRATEGIES", "LossInputs", "Strategy", "get_strategy"]
