"""``tckd``: DKD's target-class part, KL between the binary "is it the label" distributions, times T²."""

from kdsearch.terms import TEACHER_LOGITS, TermSpec
from kdsearch.terms.soft_targets import TEMPERATURE

SPEC = TermSpec(
    "tckd", "T² · KL([p_t, 1 − p_t] ‖ [p_s, 1 − p_s])", params={"temperature": TEMPERATURE}, reads=(TEACHER_LOGITS,)
)
