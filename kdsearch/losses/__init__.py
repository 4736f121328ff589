"""The loss terms' computations: one module ``kdsearch.losses.<name>`` per term, and what they share.

Each term module holds its ``Term`` (an ``nn.Module``) and ``build(shapes, **params)``, called with
exactly the hyperparameters its declaration (``kdsearch.terms.<name>``) names. This package holds
what every term reads and is: the batch as a loss sees it, the tapped layers' shapes, the base
class, and KL from log-probabilities. ``kdsearch.weighted_sum`` weighs the terms into one loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


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

    def teacher_features_once(self, features: Tensor) -> Tensor:
        """The teacher's cached features as ``forward`` wants them, computed once per run.

        The loop applies it to the whole cache before training, so work a term would otherwise
        repeat on the frozen teacher every step (cosine's pooling) is done once.
        """
        return features


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) from log-probabilities, summed over the last axis and averaged over the batch.

    Written out rather than ``F.kl_div(reduction="batchmean")``, whose summation order differs:
    every earlier result was computed with this one.
    """
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()
