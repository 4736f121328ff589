"""Each method's loss, and each term, against a hand computation written the tutorial's (or paper's) way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdsearch.errors import UserError
from kdsearch.losses import LossInputs, LossShapes
from kdsearch.losses.ce import CrossEntropy
from kdsearch.losses.cosine import reduce_to
from kdsearch.losses.nckd import nckd
from kdsearch.losses.tckd import tckd
from kdsearch.strategies import METHODS, get_strategy
from kdsearch.weighted_sum import WeightedSum, build_loss, check_feature_shapes

torch.manual_seed(0)
B = 4
STUDENT_LOGITS = torch.randn(B, 10)
TEACHER_LOGITS = torch.randn(B, 10)
LABELS = torch.tensor([1, 0, 3, 9])
STUDENT_MAP = torch.randn(B, 16, 8, 8)
TEACHER_MAP = torch.randn(B, 32, 8, 8)
NONE = LossShapes()
MAPS = LossShapes((16, 8, 8), (32, 8, 8))


def inputs() -> LossInputs:
    return LossInputs(STUDENT_LOGITS, LABELS, STUDENT_MAP, TEACHER_LOGITS, TEACHER_MAP)


def test_ce_is_cross_entropy() -> None:
    loss = build_loss(get_strategy("ce"), {}, NONE)(inputs())
    assert torch.equal(loss, nn.CrossEntropyLoss()(STUDENT_LOGITS, LABELS))


def test_label_smoothing_reaches_the_cross_entropy_term() -> None:
    loss = build_loss(get_strategy("ce"), {}, NONE, label_smoothing=0.1)(inputs())
    assert torch.allclose(loss, nn.CrossEntropyLoss(label_smoothing=0.1)(STUDENT_LOGITS, LABELS))
    assert not torch.allclose(loss, nn.CrossEntropyLoss()(STUDENT_LOGITS, LABELS))


def test_a_weighted_sum_adds_its_terms_in_order() -> None:
    class Constant(CrossEntropy):
        def forward(self, batch: LossInputs) -> torch.Tensor:
            return torch.tensor(3.0)

    total = WeightedSum([(0.5, Constant()), (2.0, CrossEntropy())])(inputs())
    assert torch.allclose(total, 0.5 * 3.0 + 2.0 * nn.CrossEntropyLoss()(STUDENT_LOGITS, LABELS))
    with pytest.raises(UserError, match="every loss weight is zero"):
        WeightedSum([])


@pytest.mark.parametrize("method", METHODS)
def test_a_method_is_its_terms_and_ce_comes_last(method: str) -> None:
    strategy = get_strategy(method)
    loss_fn = build_loss(strategy, strategy.hyperparameters({}), MAPS)
    assert isinstance(loss_fn.terms[-1], CrossEntropy)
    names = [type(t).__name__ for t in loss_fn.terms]
    expected = {
        "ce": ["CrossEntropy"],
        "kd": ["SoftTargets", "CrossEntropy"],
        "dkd": ["TargetClassKD", "NonTargetClassKD", "CrossEntropy"],
        "cosine": ["CosineFeatures", "CrossEntropy"],
        "regressor": ["Regressor", "CrossEntropy"],
        "hybrid": ["CrossEntropy"],  # every distillation weight is 0 by default: not built
    }
    assert names == expected[method]


def test_kd_matches_the_tutorial_formula() -> None:
    strategy = get_strategy("kd")
    hp = strategy.hyperparameters({})
    assert hp == {"temperature": 2.0, "soft_target_weight": 0.25}
    loss = build_loss(strategy, hp, NONE)(inputs())
    t = 2.0
    soft_targets = nn.functional.softmax(TEACHER_LOGITS / t, dim=-1)
    soft_prob = nn.functional.log_softmax(STUDENT_LOGITS / t, dim=-1)
    soft_loss = torch.sum(soft_targets * (soft_targets.log() - soft_prob)) / soft_prob.size()[0] * (t**2)
    expected = 0.25 * soft_loss + 0.75 * nn.CrossEntropyLoss()(STUDENT_LOGITS, LABELS)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_kd_explicit_ce_weight_overrides_the_mixing_weight() -> None:
    strategy = get_strategy("kd")
    hp = strategy.hyperparameters({"soft_target_weight": 0.0, "ce_weight": 2.0})
    loss_fn = build_loss(strategy, hp, NONE)
    assert len(loss_fn.terms) == 1  # the soft targets at weight 0 are not built
    assert torch.allclose(loss_fn(inputs()), 2.0 * nn.CrossEntropyLoss()(STUDENT_LOGITS, LABELS))


def test_cosine_matches_the_tutorial_pooling_and_loss() -> None:
    strategy = get_strategy("cosine")
    hp = strategy.hyperparameters({})
    loss = build_loss(strategy, hp, MAPS)(inputs())
    teacher = nn.functional.avg_pool1d(torch.flatten(TEACHER_MAP, 1), 2)  # 2048 -> 1024, as the tutorial
    student = torch.flatten(STUDENT_MAP, 1)
    hidden = nn.CosineEmbeddingLoss()(student, teacher, target=torch.ones(B))
    expected = 0.25 * hidden + 0.75 * nn.CrossEntropyLoss()(STUDENT_LOGITS, LABELS)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_cosine_max_reduction_and_uneven_sizes() -> None:
    strategy = get_strategy("cosine")
    loss_fn = build_loss(
        strategy, strategy.hyperparameters({"reduce": "max", "hidden_weight": 1.0}), LossShapes((10,), (25,))
    )
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
    loss_fn = build_loss(strategy, hp, MAPS)
    conv = loss_fn.terms[0].regressor[0]
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
    loss_fn = build_loss(strategy, hp, MAPS)
    regressor = loss_fn.terms[0].regressor
    convs = [m for m in regressor if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [(16, 64, 5), (64, 64, 5), (64, 32, 5)]
    assert regressor(STUDENT_MAP).shape == TEACHER_MAP.shape


def test_regressor_rejects_unmatched_maps() -> None:
    strategy = get_strategy("regressor")
    with pytest.raises(UserError, match="spatial size"):
        build_loss(strategy, strategy.hyperparameters({}), LossShapes((16, 16, 16), (32, 8, 8)))
    with pytest.raises(UserError, match="feature maps"):
        check_feature_shapes(strategy, LossShapes((1024,), (32, 8, 8)))


@pytest.mark.parametrize(
    ("method", "given", "message"),
    [
        ("kd", {"temperature": 0}, "kd: temperature must be above 0, got 0"),
        ("kd", {"temperature": float("nan")}, "temperature must be finite"),
        ("kd", {"soft_target_weight": -0.1}, "soft_target_weight must be at least 0, got -0.1"),
        ("kd", {"soft_target_weight": 2}, "soft_target_weight must be at most 1, got 2"),
        ("cosine", {"hidden_weight": 1.5}, "hidden_weight must be at most 1"),
        ("regressor", {"feature_weight": 3}, "feature_weight must be at most 1"),
        ("kd", {"bogus": 1}, "no hyperparameter 'bogus'"),
        ("kd", {"lr": 0.1}, "no hyperparameter 'lr'"),  # a recipe knob, not the method's
        ("cosine", {"reduce": "median"}, "reduce must be one of avg, max"),
        ("regressor", {"kernel_size": 2}, "kernel_size must be odd"),
        ("regressor", {"kernel_size": 10001}, "kernel_size must be at most 15"),
        ("regressor", {"depth": 1.5}, "depth must be an integer"),
        ("regressor", {"distance": "l3"}, "distance must be one of"),
        ("dkd", {"beta": -1}, "beta must be at least 0"),
        ("hybrid", {"kd_weight": "x"}, "kd_weight must be a number"),
    ],
)
def test_bad_hyperparameters_are_user_errors(method: str, given: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        get_strategy(method).hyperparameters(given)


@pytest.mark.parametrize("how", ["avg", "max"])
@pytest.mark.parametrize(("length", "size"), [(2048, 1024), (2048, 256), (1000, 300), (64, 64)])
def test_reduce_to_equals_adaptive_pooling(how: str, length: int, size: int) -> None:
    vectors = torch.randn(3, length)
    pool = nn.functional.adaptive_avg_pool1d if how == "avg" else nn.functional.adaptive_max_pool1d
    expected = pool(vectors.unsqueeze(1), size).squeeze(1)
    assert torch.allclose(reduce_to(vectors, size, how), expected, atol=1e-6)


def test_dkd_defaults_are_the_papers_tutorial_style_values() -> None:
    assert get_strategy("dkd").hyperparameters({}) == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}


@pytest.mark.parametrize(("alpha", "beta", "t"), [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 7.5)])
def test_dkd_matches_a_direct_computation_of_its_formula(alpha: float, beta: float, t: float) -> None:
    """Zhao et al. 2022, eq. 3-4: binary KL on [p_target, 1 - p_target] and KL over the other classes."""
    p_s = torch.softmax(STUDENT_LOGITS.double() / t, dim=1)
    p_t = torch.softmax(TEACHER_LOGITS.double() / t, dim=1)
    expected_tckd = expected_nckd = 0.0
    for i, label in enumerate(LABELS.tolist()):
        b_s = torch.stack([p_s[i, label], 1 - p_s[i, label]])
        b_t = torch.stack([p_t[i, label], 1 - p_t[i, label]])
        expected_tckd += float((b_t * (b_t.log() - b_s.log())).sum())
        others = [c for c in range(10) if c != label]
        q_s = p_s[i, others] / p_s[i, others].sum()
        q_t = p_t[i, others] / p_t[i, others].sum()
        expected_nckd += float((q_t * (q_t.log() - q_s.log())).sum())
    expected_tckd *= t**2 / B
    expected_nckd *= t**2 / B
    assert float(tckd(STUDENT_LOGITS, TEACHER_LOGITS, LABELS, t)) == pytest.approx(expected_tckd, rel=1e-4, abs=1e-6)
    assert float(nckd(STUDENT_LOGITS, TEACHER_LOGITS, LABELS, t)) == pytest.approx(expected_nckd, rel=1e-4, abs=1e-6)
    strategy = get_strategy("dkd")
    loss = build_loss(strategy, strategy.hyperparameters({"alpha": alpha, "beta": beta, "temperature": t}), NONE)
    ce = float(nn.CrossEntropyLoss()(STUDENT_LOGITS, LABELS))
    assert float(loss(inputs())) == pytest.approx(alpha * expected_tckd + beta * expected_nckd + ce, rel=1e-4)


def test_dkd_gradients_are_finite_for_confident_teachers() -> None:
    """The masked target logit must leave no NaN in the backward pass, even far from the student."""
    student = (torch.randn(B, 10) * 30).requires_grad_()
    teacher = torch.randn(B, 10) * 30
    total = tckd(student, teacher, LABELS, 1.0) + nckd(student, teacher, LABELS, 1.0)
    total.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and torch.isfinite(total)


def test_kd_equals_dkd_with_the_teachers_coupling() -> None:
    """The paper's decomposition: KD = TCKD + (1 - p_t^target) · NCKD, per sample."""
    t = 3.0
    kd = build_loss(get_strategy("kd"), {"soft_target_weight": 1.0, "temperature": t}, NONE).terms[0]
    for i in range(B):
        one = LossInputs(STUDENT_LOGITS[i : i + 1], LABELS[i : i + 1], None, TEACHER_LOGITS[i : i + 1])
        p_target = torch.softmax(TEACHER_LOGITS[i] / t, dim=0)[LABELS[i]]
        decomposed = tckd(one.student_logits, one.teacher_logits, one.labels, t) + (1 - p_target) * nckd(
            one.student_logits, one.teacher_logits, one.labels, t
        )
        assert torch.allclose(kd(one), decomposed, atol=1e-5)
