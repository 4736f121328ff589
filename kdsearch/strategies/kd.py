"""``kd``: Hinton's soft targets. The student matches the teacher's temperature-softened distribution.

loss = w · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − w) · CE(s, y)

The T² factor keeps the soft-target gradients at the same scale as T changes (Hinton et al., 2015),
as the tutorial does. One mixing weight ``soft_target_weight`` (w) is searched (see
``kdsearch.strategies`` for why one); ``ce_weight`` may still be set explicitly.
"""

from kdsearch.strategies import Strategy, mixing_weight

STRATEGY = Strategy(
    "kd",
    "soft targets: KL to the teacher's softened logits, scaled by T²",
    terms={"soft_target_weight": "soft_targets"},
    weights={"soft_target_weight": mixing_weight("soft targets")},
    mixed=True,
)
