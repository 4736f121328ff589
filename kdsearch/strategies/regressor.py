"""``regressor``: a trainable conv regressor maps the student's feature map onto the teacher's.

loss = w · distance(regressor(f_s), f_t) + (1 − w) · CE(s, y)

The tutorial uses one 3x3 conv (16 → 32 channels) and MSE against the teacher's 32x8x8 map. Here the
regressor's shape is searched (``kernel_size``, ``depth``, ``hidden_channels``) and so is the
``distance`` (``kdsearch.terms.regressor``). The regressor trains with the student and is dropped
afterwards: it is not part of the exported student.
"""

from kdsearch.strategies import Strategy, mixing_weight

STRATEGY = Strategy(
    "regressor",
    "trainable conv regressor from student to teacher feature map, matched by a distance",
    terms={"feature_weight": "regressor"},
    weights={"feature_weight": mixing_weight("regressor term")},
    mixed=True,
)
