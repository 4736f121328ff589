"""``ce``: cross-entropy on the labels, with the recipe's label smoothing (a recipe knob, not the term's)."""

from kdsearch.terms import TermSpec

SPEC = TermSpec("ce", "cross-entropy on the labels")
