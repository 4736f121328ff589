"""The training recipe every strategy shares and searches: learning-rate schedule and augmentation.

The tutorial trains with Adam at a constant 1e-3 on un-augmented images. A search may also decay
the rate (cosine, over the run's whole step budget: a search trial and the re-train of its
exported config, with the same epochs, follow the same curve) and mirror a random half of every
batch (``flip``; the teacher's outputs are cached for both views, see ``kdsearch.teacher``).
"""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine")
# Train-time augmentations: none (the tutorial), or a random horizontal flip of half the batch.
# Each is a fixed set of views, so the frozen teacher's outputs are cached once per view.
AUGMENTATIONS = ("none", "flip")


def learning_rate_at(schedule: str, base_lr: float, step: int, total_steps: int) -> float:
    """The rate for 0-based ``step`` of ``total_steps``: constant, or half a cosine from base to 0."""
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; use {', '.join(LR_SCHEDULES)}")
