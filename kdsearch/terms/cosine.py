"""``cosine``: 1 − cosine similarity of the flattened hidden features, the longer vector pooled to the shorter."""

from optuna.distributions import CategoricalDistribution

from kdsearch.terms import FEATURES, TermSpec, hyper

REDUCTIONS = ("avg", "max")

SPEC = TermSpec(
    "cosine",
    "mean(1 − cos(pool(f_t), f_s))",
    params={
        "reduce": hyper(
            "avg",
            "How the longer vector is pooled: avg or max.",
            choices=REDUCTIONS,
            space=CategoricalDistribution(REDUCTIONS),
        )
    },
    reads=(FEATURES,),
)
