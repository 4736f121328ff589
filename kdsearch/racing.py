"""How sure: paired intervals between configs over seeds, and the successive-halving race over seeds.

``confirm`` re-trains configs with several seeds; a difference between two of them is the mean of
their per-seed differences with a 95 % Student-t interval. The race decides which candidates get
more seeds: k = ⌈log₂ n⌉ halvings, rung i giving ⌈seeds / 2^(k−i)⌉ seeds, the better half (by mean
validation accuracy) going on after each rung but the last.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Two-sided 95 % quantiles of Student's t by degrees of freedom; past 30 the normal's 1.96 is within 2 %.
T_975 = (
    *(12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131),
    *(2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042),
)


def t_quantile(degrees: int) -> float:
    return T_975[degrees - 1] if degrees <= len(T_975) else 1.96


@dataclass(frozen=True)
class Interval:
    mean: float
    half_width: float | None  # None with a single pair: no spread to estimate
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.half_width is not None and abs(self.mean) > self.half_width

    def __str__(self) -> str:
        spread = f" ± {self.half_width:.2f}" if self.half_width is not None else " (one seed: no interval)"
        return f"{self.mean:+.2f}{spread}"


def paired_interval(first: list[float], second: list[float]) -> Interval:
    """Mean of the per-seed differences ``first − second`` with its 95 % t interval."""
    differences = [a - b for a, b in zip(first, second, strict=True)]
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return Interval(mean, None, len(differences))
    half = t_quantile(len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return Interval(mean, half, len(differences))


def race_rungs(candidates: int, seeds: int) -> list[int]:
    """Seeds each surviving candidate has at each rung of successive halving over seeds.

    With n candidates there are k = ⌈log₂ n⌉ halvings: rung i gives ⌈seeds / 2^(k−i)⌉ seeds, the last all of
    them (3 candidates, 5 seeds: 2, 3, 5). Rungs that would give the same count are one rung.
    """
    halvings = math.ceil(math.log2(candidates)) if candidates > 1 else 0
    return sorted({max(1, math.ceil(seeds / 2 ** (halvings - i))) for i in range(halvings + 1)})


def survivors_of(means: dict[str, float], keep: int) -> list[str]:
    """The ``keep`` best arms by mean validation accuracy (ties: the arm listed first)."""
    order = sorted(means, key=lambda arm: (-means[arm], list(means).index(arm)))
    return order[:keep]
