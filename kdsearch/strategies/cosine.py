"""``cosine``: align the student's flattened hidden features with the teacher's by cosine similarity.

loss = w · mean(1 − cos(reduce(f_t), f_s)) + (1 − w) · CE(s, y)

The tutorial flattens the student's conv output (1024) and the teacher's (2048), and average-pools
the teacher's vector by 2 so the sizes match. Here the larger vector is pooled down to the smaller
one's length (``kdsearch.losses.cosine``), by average or max (``reduce``), so any pair of layers
can be aligned.
"""

from kdsearch.strategies import Strategy, mixing_weight

STRATEGY = Strategy(
    "cosine",
    "cosine loss between flattened hidden features, the larger pooled to the smaller",
    terms={"hidden_weight": "cosine"},
    weights={"hidden_weight": mixing_weight("cosine term")},
    mixed=True,
)
