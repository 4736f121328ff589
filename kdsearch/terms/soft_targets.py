"""``soft_targets``: Hinton's KL to the teacher's temperature-softened distribution, times T²."""

from optuna.distributions import FloatDistribution

from kdsearch.terms import TEACHER_LOGITS, TermSpec, hyper

# The one temperature of every KL-at-temperature term (soft targets, DKD's two parts).
TEMPERATURE = hyper(
    2.0, "Softmax temperature T.", low=0.0, low_open=True, high=100.0, space=FloatDistribution(1.0, 8.0)
)

SPEC = TermSpec(
    "soft_targets",
    "T² · KL(softmax(t/T) ‖ softmax(s/T))",
    params={"temperature": TEMPERATURE},
    reads=(TEACHER_LOGITS,),
)
