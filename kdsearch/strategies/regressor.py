"""``regressor``: a trainable conv regressor maps the student's feature map onto the teacher's.

loss = w · distance(regressor(f_s), f_t) + (1 − w) · CE(s, y)

The tutorial uses one 3x3 conv (16 → 32 channels) and MSE against the teacher's 32x8x8 map. Here the
regressor's shape is a hyperparameter: ``kernel_size``, ``depth`` (convs; ReLU between them) and
``hidden_channels`` (width of the inner convs when depth > 1), and so is the ``distance``: MSE,
smooth-L1, or cosine (1 − cosine similarity of the flattened maps). The regressor trains with the
student and is dropped afterwards: it is not part of the exported student. Spatial sizes must match.
"""

from __future__ import annotations

from typing import Any, ClassVar

from optuna.distributions import CategoricalDistribution, IntDistribution
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from kdsearch.errors import UserError
from kdsearch.losses import LossInputs, LossShapes, Strategy, Term, TermKind, hyper, mixing_weight

DISTANCES = ("mse", "smooth_l1", "cosine")
KERNEL_SIZES = (1, 3, 5)


def build_regressor(in_channels: int, out_channels: int, kernel_size: int, depth: int, hidden: int) -> nn.Sequential:
    """``depth`` convs with 'same' padding from the student's channels to the teacher's."""
    layers: list[nn.Module] = []
    channels = in_channels
    for i in range(depth):
        last = i == depth - 1
        out = out_channels if last else hidden
        layers.append(nn.Conv2d(channels, out, kernel_size=kernel_size, padding=kernel_size // 2))
        if not last:
            layers.append(nn.ReLU())
        channels = out
    return nn.Sequential(*layers)


def feature_distance(predicted: Tensor, target: Tensor, distance: str) -> Tensor:
    if distance == "mse":
        return F.mse_loss(predicted, target)
    if distance == "smooth_l1":
        return F.smooth_l1_loss(predicted, target)
    return (1.0 - F.cosine_similarity(predicted.flatten(1), target.flatten(1), dim=1)).mean()


def check_maps(student: tuple[int, ...] | None, teacher: tuple[int, ...] | None) -> tuple[int, int]:
    """Both layers must give (C, H, W) maps of one spatial size; returns the two channel counts."""
    if student is None or teacher is None or len(student) != 3 or len(teacher) != 3:
        raise UserError(
            f"regressor needs feature maps (C, H, W) from both layers; got student {student} and teacher "
            f"{teacher}: pick conv layers with --student-layer / --teacher-layer"
        )
    if student[1:] != teacher[1:]:
        raise UserError(
            f"regressor cannot match feature maps of different spatial size: student "
            f"{student[1]}x{student[2]}, teacher {teacher[1]}x{teacher[2]}"
        )
    return student[0], teacher[0]


class Regressor(Term):
    reads_teacher_features: ClassVar[bool] = True

    def __init__(self, regressor: nn.Module, distance: str) -> None:
        super().__init__()
        self.regressor = regressor
        self.distance = distance

    def forward(self, inputs: LossInputs) -> Tensor:
        assert inputs.student_features is not None and inputs.teacher_features is not None
        return feature_distance(self.regressor(inputs.student_features), inputs.teacher_features, self.distance)


def _build(hp: dict[str, Any], shapes: LossShapes) -> Term:
    student_channels, teacher_channels = check_maps(shapes.student_features, shapes.teacher_features)
    regressor = build_regressor(
        student_channels, teacher_channels, int(hp["kernel_size"]), int(hp["depth"]), int(hp["hidden_channels"])
    )
    return Regressor(regressor, str(hp["distance"]))


def _odd(value: int) -> str | None:
    return None if value % 2 else f"must be odd to keep the map's size, got {value}"


REGRESSOR = TermKind(
    "regressor",
    _build,
    {
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
    uses_features=True,
)

STRATEGY = Strategy(
    "regressor",
    "trainable conv regressor from student to teacher feature map, matched by a distance",
    terms={"feature_weight": REGRESSOR},
    weights={"feature_weight": mixing_weight("regressor term")},
    mixed=True,
)
