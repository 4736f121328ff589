"""``dkd``: Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).

loss = α · TCKD + β · NCKD + CE(s, y)

The KD loss splits into a target-class part (TCKD) and a non-target-class part (NCKD), both at
temperature T (``kdsearch.losses.tckd`` and ``.nckd``). Classical KD weighs NCKD by
(1 − p_target of the teacher), which suppresses it exactly where the teacher is confident; DKD
frees the two weights. The authors' β ranges from 2 to 8 depending on the teacher-student pair, so
both weights (log scale) and T are searched. Logits only: the teacher's outputs stay cached. The
authors also ramp the DKD weight up over the first epochs; the tutorial's 10-epoch runs keep it
constant. Tutorial-style defaults: α 1, β 8, T 4.
"""

from optuna.distributions import FloatDistribution

from kdsearch.strategies import Strategy
from kdsearch.terms import hyper

STRATEGY = Strategy(
    "dkd",
    "decoupled KD: target-class (α) and non-target-class (β) parts of the KD loss, plus CE",
    terms={"alpha": "tckd", "beta": "nckd"},
    weights={
        "alpha": hyper(1.0, "Weight α of TCKD.", low=0.0, high=100.0, space=FloatDistribution(0.25, 4.0, log=True)),
        "beta": hyper(8.0, "Weight β of NCKD.", low=0.0, high=100.0, space=FloatDistribution(0.5, 16.0, log=True)),
    },
    defaults={"temperature": 4.0},
)
