"""``ce``: the student alone, trained on labels with cross-entropy. The control every KD run must beat."""

from kdsearch.strategies import Strategy

STRATEGY = Strategy("ce", "student alone on hard labels (no teacher)")
