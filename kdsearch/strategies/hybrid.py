"""``hybrid``: soft targets, cosine features and a feature regressor in one loss; the search decides.

loss = w_kd · KD_T + w_cos · cosine + w_reg · distance(R(f_s), f_t) + CE

The union of the ``soft_targets``, ``cosine`` and ``regressor`` terms with their own parameters.
Each distillation weight may be zero, so the search can switch a term off; with all three at zero
the run is exactly ``ce``. The CE weight is 1 rather than mixed (three weights cannot share one
``1 − w``), and since Adam only sees the ratios, the three weights range over [0, 2] relative to it.
"""

from optuna.distributions import FloatDistribution

from kdsearch.strategies import Strategy
from kdsearch.terms import Hyper, hyper


def _weight(term: str) -> Hyper:
    return hyper(0.0, f"Weight of the {term} term (0 = off).", low=0.0, high=100.0, space=FloatDistribution(0.0, 2.0))


STRATEGY = Strategy(
    "hybrid",
    "KD, cosine and regressor losses together, each weight searchable down to zero",
    terms={"kd_weight": "soft_targets", "cosine_weight": "cosine", "regressor_weight": "regressor"},
    weights={
        "kd_weight": _weight("soft-target"),
        "cosine_weight": _weight("cosine"),
        "regressor_weight": _weight("regressor"),
    },
)
