"""A trainable conv regressor from the student's feature map to the teacher's, matched by a distance.

``depth`` convs with 'same' padding (ReLU between them; ``hidden_channels`` wide inside) map the
student's channels onto the teacher's; the distance is MSE, smooth-L1, or 1 − cosine similarity of
the flattened maps. The regressor trains with the student and is dropped afterwards.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from kdsearch.errors import UserError
from kdsearch.losses import LossInputs, LossShapes, Term


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
            f"the regressor needs feature maps (C, H, W) from both tapped layers (student_layer, teacher_layer); "
            f"got student {student} and teacher {teacher}: pick conv layers"
        )
    if student[1:] != teacher[1:]:
        raise UserError(
            f"regressor cannot match feature maps of different spatial size: student "
            f"{student[1]}x{student[2]}, teacher {teacher[1]}x{teacher[2]}"
        )
    return student[0], teacher[0]


class Regressor(Term):
    def __init__(self, regressor: nn.Module, distance: str) -> None:
        super().__init__()
        self.regressor = regressor
        self.distance = distance

    def forward(self, inputs: LossInputs) -> Tensor:
        assert inputs.student_features is not None and inputs.teacher_features is not None
        return feature_distance(self.regressor(inputs.student_features), inputs.teacher_features, self.distance)


def build(shapes: LossShapes, *, kernel_size: int, depth: int, hidden_channels: int, distance: str) -> Term:
    student_channels, teacher_channels = check_maps(shapes.student_features, shapes.teacher_features)
    regressor = build_regressor(student_channels, teacher_channels, int(kernel_size), int(depth), int(hidden_channels))
    return Regressor(regressor, str(distance))
