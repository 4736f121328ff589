"""``regressor``: a trainable conv regressor maps the student's feature map onto the teacher's, by a distance.

The tutorial's is one 3x3 conv and MSE; here its shape (``kernel_size``, ``depth``,
``hidden_channels``) and the ``distance`` are hyperparameters. Spatial sizes must match.
"""

from optuna.distributions import CategoricalDistribution, IntDistribution

from kdsearch.terms import FEATURES, TermSpec, hyper

DISTANCES = ("mse", "smooth_l1", "cosine")
KERNEL_SIZES = (1, 3, 5)


def _odd(value: int) -> str | None:
    return None if value % 2 else f"must be odd to keep the map's size, got {value}"


SPEC = TermSpec(
    "regressor",
    "distance(R(f_s), f_t), R a trainable conv stack",
    params={
        "kernel_size": hyper(
            3,
            "Kernel size of the regressor's convs (odd).",
            low=1,
            high=15,
            check=_odd,
            space=CategoricalDistribution(KERNEL_SIZES),
        ),
        "depth": hyper(1, "Convs in the regressor.", low=1, high=8, space=IntDistribution(1, 3)),
        "hidden_channels": hyper(
            32,
            "Channels of the inner convs (depth > 1).",
            low=1,
            high=1024,
            space=CategoricalDistribution((16, 32, 64)),
        ),
        "distance": hyper(
            "mse", "mse, smooth_l1 or cosine.", choices=DISTANCES, space=CategoricalDistribution(DISTANCES)
        ),
    },
    reads=(FEATURES,),
)
