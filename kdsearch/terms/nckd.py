"""``nckd``: DKD's non-target part, KL over the classes other than the label, renormalised, times T²."""

from kdsearch.terms import TEACHER_LOGITS, TermSpec
from kdsearch.terms.soft_targets import TEMPERATURE

SPEC = TermSpec(
    "nckd",
    "T² · KL(p̂_teacher ‖ p̂_student) over non-target classes",
    params={"temperature": TEMPERATURE},
    reads=(TEACHER_LOGITS,),
)
