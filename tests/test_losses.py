"""Each strategy's loss against a hand computation written the tutorial's way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdsearch.errors import UserError
from kdsearch.strategies import LossInputs, get_strategy

torch.manual_seed(0)
B = 4
STUDENT_LOGITS = torch.randn(B, 10)
TEACHER_LOGITS = torch.randn(B, 10)
LABELS = torch.tensor([1, 0, 3, 9])
STUDENT_MAP = torch.randn(B, 16, 8, 8)
TEACHER_MAP = torch.randn(B, 32, 8, 8)


def inputs() -> LossInputs:
    return LossInputs(STUDENT_LOGITS, LABELS, STUDENT_MAP, TEACHER_LOGITS, TEACHER_MAP)


def test_ce_is_cross_entropy() -> None:
    loss = get_strategy("ce").build_loss({"lr": 1e-3}, None, None)(inputs())
    assert torch.allclose(loss, nn.CrossEntropyLoss()(STUDENT_LOGITS, LABELS))


def test_kd_matches_the_tutorial_formula() -> None:
    strategy = get_strategy("kd")
    hp = strategy.hyperparameters({})
    assert hp == {
        "lr": 1e-3,
        "lr_schedule": "constant",
        "augment": "none",
        "temperature": 2.0,
        "soft_target_weight": 0.25,
    }
    loss = strategy.build_loss(hp, None, None)(inputs())
    t = 2.0
    soft_targets = nn.functional.softmax(TEACHER_LOGITS / t, dim=-1)
    soft_prob = nn.functional.log_softmax(STUDENT_LOGITS / t, dim=-1)
    soft_loss = torch.sum(soft_targets * (soft_targets.log() - soft_prob)) / soft_prob.size()[0] * (t**2)
    expected = 0.25 * soft_loss + 0.75 * nn.CrossEntropyLoss()(STUDENT_LOGITS, LABELS)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_kd_explicit_ce_weight_overrides_the_mixing_weight() -> None:
    strategy = get_strategy("kd")
    hp = strategy.hyperparameters({"soft_target_weight": 0.0, "ce_weight": 2.0})
    loss = strategy.build_loss(hp, None, None)(inputs())
    assert torch.allclose(loss, 2.0 * nn.CrossEntropyLoss()(STUDENT_LOGITS, LABELS))


def test_cosine_matches_the_tutorial_pooling_and_loss() -> None:
    strategy = get_strategy("cosine")
    hp = strategy.hyperparameters({})
    loss = strategy.build_loss(hp, (16, 8, 8), (32, 8, 8))(inputs())
    teacher = nn.functional.avg_pool1d(torch.flatten(TEACHER_MAP, 1), 2)  # 2048 -> 1024, as the tutorial
    student = torch.flatten(STUDENT_MAP, 1)
    hidden = nn.CosineEmbeddingLoss()(student, teacher, target=torch.ones(B))
    expected = 0.25 * hidden + 0.75 * nn.CrossEntropyLoss()(STUDENT_LOGITS, LABELS)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_cosine_max_reduction_and_uneven_sizes() -> None:
    strategy = get_strategy("cosine")
    loss_fn = strategy.build_loss(strategy.hyperparameters({"reduce": "max", "hidden_weight": 1.0}), (10,), (25,))
    student, teacher = torch.randn(B, 10), torch.randn(B, 25)
    got = loss_fn(LossInputs(STUDENT_LOGITS, LABELS, student, TEACHER_LOGITS, teacher))
    pooled = nn.functional.adaptive_max_pool1d(teacher.unsqueeze(1), 10).squeeze(1)
    expected = (1 - nn.functional.cosine_similarity(student, pooled)).mean()
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("distance", ["mse", "smooth_l1", "cosine"])
def test_regressor_matches_a_hand_built_regressor(distance: str) -> None:
    strategy = get_strategy("regressor")
    hp = strategy.hyperparameters({"distance": distance})
    torch.manual_seed(1)
    loss_fn = strategy.build_loss(hp, (16, 8, 8), (32, 8, 8))
    conv = loss_fn.regressor[0]
    assert isinstance(conv, nn.Conv2d) and (conv.in_channels, conv.out_channels, conv.kernel_size) == (16, 32, (3, 3))
    regressed = nn.functional.conv2d(STUDENT_MAP, conv.weight, conv.bias, padding=1)
    if distance == "mse":
        hidden = nn.MSELoss()(regressed, TEACHER_MAP)
    elif distance == "smooth_l1":
        hidden = nn.SmoothL1Loss()(regressed, TEACHER_MAP)
    else:
        hidden = nn.CosineEmbeddingLoss()(regressed.flatten(1), TEACHER_MAP.flatten(1), torch.ones(B))
    expected = 0.25 * hidden + 0.75 * nn.CrossEntropyLoss()(STUDENT_LOGITS, LABELS)
    assert torch.allclose(loss_fn(inputs()), expected, atol=1e-5)


def test_regressor_shape_is_a_hyperparameter() -> None:
    strategy = get_strategy("regressor")
    hp = strategy.hyperparameters({"kernel_size": 5, "depth": 3, "hidden_channels": 64})
    loss_fn = strategy.build_loss(hp, (16, 8, 8), (32, 8, 8))
    convs = [m for m in loss_fn.regressor if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [(16, 64, 5), (64, 64, 5), (64, 32, 5)]
    assert loss_fn.regressor(STUDENT_MAP).shape == TEACHER_MAP.shape


def test_regressor_rejects_unmatched_maps() -> None:
    strategy = get_strategy("regressor")
    with pytest.raises(UserError, match="spatial size"):
        strategy.build_loss(strategy.hyperparameters({}), (16, 16, 16), (32, 8, 8))
    with pytest.raises(UserError, match="feature maps"):
        strategy.build_loss(strategy.hyperparameters({}), (1024,), (32, 8, 8))


@pytest.mark.parametrize(
    ("method", "given", "message"),
    [
        ("kd", {"temperature": 0}, "temperature must be positive"),
        ("kd", {"lr": -1}, "lr must be positive"),
        ("kd", {"soft_target_weight": -0.1}, "soft_target_weight must be 0 or more"),
        ("kd", {"bogus": 1}, "no hyperparameter 'bogus'"),
        ("cosine", {"reduce": "median"}, "reduce must be one of avg, max"),
        ("regressor", {"kernel_size": 2}, "kernel_size must be odd"),
        ("regressor", {"depth": 1.5}, "depth must be an integer"),
        ("regressor", {"distance": "l3"}, "distance must be one of"),
        ("ce", {"lr_schedule": "step"}, "lr_schedule must be one of constant, cosine"),
    ],
)
def test_bad_hyperparameters_are_user_errors(method: str, given: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        get_strategy(method).hyperparameters(given)


@pytest.mark.parametrize("how", ["avg", "max"])
@pytest.mark.parametrize(("length", "size"), [(2048, 1024), (2048, 256), (1000, 300), (64, 64)])
def test_reduce_to_equals_adaptive_pooling(how: str, length: int, size: int) -> None:
    from kdsearch.strategies.cosine import reduce_to

    vectors = torch.randn(3, length)
    pool = nn.functional.adaptive_avg_pool1d if how == "avg" else nn.functional.adaptive_max_pool1d
    expected = pool(vectors.unsqueeze(1), size).squeeze(1)
    assert torch.allclose(reduce_to(vectors, size, how), expected, atol=1e-6)
