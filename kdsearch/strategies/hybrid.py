"""``hybrid``: soft targets, cosine features and a feature regressor in one loss; the search decides.

loss = CE + w_kd · KD_T + w_cos · cosine + w_reg · distance(R(f_s), f_t)

Each distillation weight may be zero, so the search can switch a term off; with all three at zero
the run is exactly ``ce``. Here the CE weight is pinned at 1 rather than mixed (three weights cannot
share one ``1 − w``), and since Adam only sees the ratios, the three weights range over [0, 2]
relative to it. The other parameters are the single strategies' own.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kdsearch.spaces import FloatParam
from kdsearch.strategies.base import (
    RECIPE_SPACE,
    RECIPE_TUTORIAL,
    DistillationLoss,
    LossInputs,
    Strategy,
    cross_entropy,
)
from kdsearch.strategies.cosine import REDUCTIONS, CosineFeatureLoss, CosineFeatures
from kdsearch.strategies.kd import SoftTargets, soft_target_loss
from kdsearch.strategies.regressor import (
    FeatureRegressor,
    RegressorLoss,
    build_regressor,
    check_regressor_hyperparameters,
)


class HybridLoss(DistillationLoss):
    def __init__(self, hp: dict[str, Any], regressor: nn.Module) -> None:
        super().__init__()
        self.ce_weight = float(hp["ce_weight"])
        self.kd_weight = float(hp["kd_weight"])
        self.temperature = float(hp["temperature"])
        self.cosine = CosineFeatureLoss(float(hp["cosine_weight"]), 0.0, hp["reduce"])
        self.regressor = RegressorLoss(regressor, float(hp["regressor_weight"]), 0.0, hp["distance"])

    def forward(self, inputs: LossInputs) -> Tensor:
        loss = self.ce_weight * cross_entropy(inputs)
        if self.kd_weight:
            assert inputs.teacher_logits is not None
            loss = loss + self.kd_weight * soft_target_loss(
                inputs.student_logits, inputs.teacher_logits, self.temperature
            )
        if self.cosine.hidden_weight:
            loss = loss + self.cosine(inputs)
        if self.regressor.feature_weight:
            loss = loss + self.regressor(inputs)
        return loss


class Hybrid(Strategy):
    name = "hybrid"
    summary = "KD, cosine and regressor losses together, each weight searchable down to zero"
    uses_teacher_logits = True
    uses_features = True
    # The single strategies' own parameters are taken from them, so their ranges stay in one place.
    _REGRESSOR_SHAPE = ("kernel_size", "depth", "hidden_channels", "distance")
    tutorial = {
        **RECIPE_TUTORIAL,
        "ce_weight": 1.0,
        "kd_weight": 0.0,
        "temperature": SoftTargets.tutorial["temperature"],
        "cosine_weight": 0.0,
        "reduce": CosineFeatures.tutorial["reduce"],
        "regressor_weight": 0.0,
        **{name: FeatureRegressor.tutorial[name] for name in _REGRESSOR_SHAPE},
    }
    space = {
        **RECIPE_SPACE,
        "kd_weight": FloatParam(0.0, 2.0),
        "temperature": SoftTargets.space["temperature"],
        "cosine_weight": FloatParam(0.0, 2.0),
        "reduce": CosineFeatures.space["reduce"],
        "regressor_weight": FloatParam(0.0, 2.0),
        **{name: FeatureRegressor.space[name] for name in _REGRESSOR_SHAPE},
    }
    optional = ("ce_weight",)

    def check(self, hp: dict[str, Any]) -> None:
        super().check(hp)
        check_regressor_hyperparameters(self, hp)
        self.check_choice(hp, "reduce", REDUCTIONS)

    def build_loss(
        self, hp: dict[str, Any], student_features: tuple[int, ...] | None, teacher_features: tuple[int, ...] | None
    ) -> DistillationLoss:
        assert student_features is not None and teacher_features is not None
        # No regressor at weight zero: building one would draw from the RNG and change the run.
        if float(hp["regressor_weight"]):
            FeatureRegressor().check_maps(student_features, teacher_features)
            regressor = build_regressor(
                student_features[0],
                teacher_features[0],
                int(hp["kernel_size"]),
                int(hp["depth"]),
                int(hp["hidden_channels"]),
            )
        else:
            regressor = nn.Identity()
        return HybridLoss(hp, regressor)
