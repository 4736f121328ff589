"""What every distillation strategy provides, and the inputs its loss sees.

A strategy is one small module: its loss, any trainable helper (the regressor), its tutorial
hyperparameters and its default search space, side by side. The training loop only ever calls
``build_loss``, the returned loss's ``forward`` and, once before training, its
``teacher_features_once``; it knows nothing of any strategy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812 - torch's own convention

from kdsearch.errors import UserError
from kdsearch.recipe import AUGMENTATIONS, LR_SCHEDULES
from kdsearch.spaces import CategoricalParam, FloatParam, IntParam, Space, is_distribution

# Every strategy searches the shared training recipe (kdsearch.recipe): learning rate, its schedule
# and augmentation. The tutorial: Adam at a constant 1e-3, no augmentation.
RECIPE_SPACE: Space = {
    "lr": FloatParam(1e-4, 1e-2, log=True),
    "lr_schedule": CategoricalParam(LR_SCHEDULES),
    "augment": CategoricalParam(AUGMENTATIONS),
}
RECIPE_TUTORIAL: dict[str, Any] = {"lr": 1e-3, "lr_schedule": "constant", "augment": "none"}


@dataclass
class LossInputs:
    """One batch as a loss sees it. Teacher tensors come from the precomputed cache, by index."""

    student_logits: Tensor
    labels: Tensor
    student_features: Tensor | None = None
    teacher_logits: Tensor | None = None
    teacher_features: Tensor | None = None


class DistillationLoss(nn.Module):
    """A strategy's loss: ``forward(LossInputs) -> Tensor``.

    ``teacher_features_once`` is the hook for work a loss would otherwise repeat on the frozen
    teacher's features every step (cosine's pooling): the loop applies it once to the whole cache
    before training, and the loss's ``forward`` then sees its result, by index, each batch.
    """

    def teacher_features_once(self, features: Tensor) -> Tensor:
        """The teacher's cached features as ``forward`` wants them; by default as they are."""
        return features


class Strategy:
    """A distillation method: subclasses set the class attributes and implement ``build_loss``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    uses_teacher_logits: ClassVar[bool] = False
    uses_features: ClassVar[bool] = False
    # The tutorial's hand-set values; `kdsearch train` uses them when no value is given.
    tutorial: ClassVar[dict[str, Any]]
    # Default search space (RECIPE_SPACE included); presets under studies/spaces/ mirror it.
    space: ClassVar[Space]
    # Accepted in configs and spaces but neither searched nor set by default (e.g. ce_weight).
    optional: ClassVar[tuple[str, ...]] = ()

    @property
    def known(self) -> list[str]:
        return sorted(set(self.space) | set(self.tutorial) | set(self.optional))

    @property
    def uses_teacher(self) -> bool:
        return self.uses_teacher_logits or self.uses_features

    def hyperparameters(self, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """Tutorial values overlaid with ``given``, checked: unknown names and bad values are user errors."""
        merged = dict(self.tutorial)
        for name, value in (given or {}).items():
            if name not in self.known:
                raise UserError(f"method {self.name} has no hyperparameter {name!r}; known: {', '.join(self.known)}")
            merged[name] = value
        self.check(merged)
        return merged

    def check(self, hp: dict[str, Any]) -> None:
        """Reject values no training run could use; every check names the parameter."""
        for name, value in hp.items():
            allowed = self.space.get(name)
            if isinstance(allowed, CategoricalParam):
                continue  # categorical values are checked by the strategy's own check
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{self.name}: {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise UserError(f"{self.name}: {name} must be finite, got {value!r}")
            if isinstance(allowed, IntParam) and not float(value).is_integer():
                raise UserError(f"{self.name}: {name} must be an integer, got {value!r}")
        if hp["lr"] <= 0:
            raise UserError(f"{self.name}: lr must be positive, got {hp['lr']}")
        self.check_choice(hp, "lr_schedule", LR_SCHEDULES)
        self.check_choice(hp, "augment", AUGMENTATIONS)
        for name in ("ce_weight", *[n for n in hp if n.endswith("_weight")]):
            if name in hp and hp[name] < 0:
                raise UserError(f"{self.name}: {name} must be 0 or more, got {hp[name]}")

    def check_choice(self, hp: dict[str, Any], name: str, allowed: tuple[Any, ...]) -> None:
        if hp[name] not in allowed:
            raise UserError(f"{self.name}: {name} must be one of {', '.join(map(str, allowed))}, got {hp[name]!r}")

    def check_space(self, space: Space) -> None:
        """Validate a user's space before any trial: known names, and every corner value usable."""
        for name, param in space.items():
            if name not in self.known:
                raise UserError(
                    f"search space: method {self.name} has no parameter {name!r}; known: {', '.join(self.known)}"
                )
            default = self.space.get(name)
            if is_distribution(param) and is_distribution(default) and type(param) is not type(default):
                kind = type(default).__name__.removesuffix("Param").lower()
                raise UserError(f"search space: {name} must be of type {kind} for method {self.name}")
            corners: list[Any]
            if isinstance(param, (FloatParam, IntParam)):
                corners = [param.low, param.high]
            elif isinstance(param, CategoricalParam):
                corners = list(param.choices)
            else:
                corners = [param]
            for value in corners:
                try:
                    self.hyperparameters({name: value})
                except UserError as exc:
                    raise UserError(f"search space: {exc}") from None

    def ce_weight(self, hp: dict[str, Any], distill_weight: str) -> float:
        """The CE weight: as given, or ``1 - distill_weight`` (one mixing weight; see README)."""
        if "ce_weight" in hp and hp["ce_weight"] is not None:
            return float(hp["ce_weight"])
        return 1.0 - float(hp[distill_weight])

    def build_loss(
        self, hp: dict[str, Any], student_features: tuple[int, ...] | None, teacher_features: tuple[int, ...] | None
    ) -> DistillationLoss:
        """A module whose ``forward(LossInputs) -> Tensor`` is the training loss.

        ``*_features`` are per-sample shapes of the tapped layers (None when not used). Trainable
        parameters of the returned module (the regressor) are optimised together with the student.
        """
        raise NotImplementedError


def cross_entropy(inputs: LossInputs) -> Tensor:
    return F.cross_entropy(inputs.student_logits, inputs.labels)
