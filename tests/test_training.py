"""The shared loop, teacher checkpoints, and the teacher-output cache."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kdsearch.checkpoints import load_checkpoint, save_checkpoint
from kdsearch.config import RecipeConfig, RunConfig
from kdsearch.data import load_splits
from kdsearch.distill import prepare, train_student
from kdsearch.errors import ConfigError, DivergedError, UserError
from kdsearch.loop import evaluate, learning_rate_at, prepare_module
from kdsearch.losses import LossInputs, LossShapes
from kdsearch.losses.cosine import CosineFeatures
from kdsearch.models import DeepNN, LightNN
from kdsearch.strategies import get_strategy
from kdsearch.teacher import load_teacher
from kdsearch.teacher_outputs import TeacherOutputs, compute_teacher_outputs
from kdsearch.views import IDENTITY, MIRRORED, SHIFT_VIEWS, View
from kdsearch.weighted_sum import build_loss
from tests.helpers import (
    CPU,
    TEST_DEVICE,
    RecordingLogitsLoss,
    RecordingStudent,
    fit_tiny,
    outputs_of,
    pattern_config,
    train_with,
)

FEATURE_SHAPES = LossShapes((16, 8, 8), (32, 8, 8))


@pytest.mark.slow
def test_loop_beats_chance_on_a_small_real_subset(pattern_folder: Path) -> None:
    splits = load_splits("imagefolder", pattern_folder, val_size=50).to(CPU)
    torch.manual_seed(0)
    model = prepare_module(LightNN(), CPU)
    reports = fit_tiny(splits.train, model, epochs=2, batch_size=32, lr=3e-3, val=splits.val)
    assert [r.epoch for r in reports] == [1, 2]
    assert all(r.seconds > 0 for r in reports)
    assert reports[-1].val_accuracy is not None and reports[-1].val_accuracy > 30.0  # chance is 10 %
    assert evaluate(model, splits.test, CPU) > 30.0


@pytest.mark.slow
def test_loop_is_reproducible_for_a_seed(pattern_folder: Path) -> None:
    prepared = prepare(pattern_config(pattern_folder, method="ce"))
    a = train_student(prepared)
    b = train_student(prepared)
    assert a.epochs[0].train_loss == b.epochs[0].train_loss
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


class NaNLoss(nn.Module):
    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return inputs.student_logits.sum() * float("nan")


def test_non_finite_loss_is_detected(pattern_folder: Path) -> None:
    splits = load_splits("imagefolder", pattern_folder, val_size=0)
    with pytest.raises(DivergedError, match="diverged at epoch 1"):
        fit_tiny(splits.train, loss_fn=NaNLoss())


@pytest.mark.slow
def test_teacher_checkpoint_round_trip(pattern_teacher: Path, pattern_folder: Path) -> None:
    checkpoint = load_checkpoint(pattern_teacher)
    meta = checkpoint.metadata
    assert meta["model"] == "deepnn" and meta["params"] == 1_186_986 and meta["num_classes"] == 10
    assert meta["recipe"] == dataclasses.asdict(RecipeConfig(epochs=3))
    assert meta["test_accuracy"] > 10.0
    splits = load_splits("imagefolder", pattern_folder, val_size=0)
    teacher = load_teacher(pattern_teacher, None, splits, CPU)
    assert evaluate(teacher.model, splits.test, CPU) == pytest.approx(meta["test_accuracy"])


def test_a_tutorial_state_dict_loads_as_teacher(tmp_path: Path, pattern_folder: Path) -> None:
    torch.manual_seed(42)
    model = DeepNN(num_classes=10)
    path = tmp_path / "tutorial_teacher.pth"
    torch.save(model.state_dict(), path)  # what the tutorial's own code writes
    splits = load_splits("imagefolder", pattern_folder, val_size=0)
    teacher = load_teacher(path, None, splits, CPU)
    x = splits.test.images[:4]
    assert torch.allclose(teacher.model.eval()(x), model.eval()(x), atol=1e-5)


def test_checkpoints_of_another_architecture_or_class_count_are_refused(tmp_path: Path, pattern_folder: Path) -> None:
    splits = load_splits("imagefolder", pattern_folder, val_size=0)
    light = tmp_path / "light.pt"
    torch.save(LightNN().state_dict(), light)
    with pytest.raises(UserError, match="does not fit model deepnn"):
        load_teacher(light, None, splits, CPU)
    five = tmp_path / "five.pt"
    save_checkpoint(five, DeepNN(num_classes=5), {"model": "deepnn", "num_classes": 5})
    with pytest.raises(UserError, match="5 classes"):
        load_teacher(five, None, splits, CPU)
    torch.save(DeepNN(num_classes=5).state_dict(), five)
    with pytest.raises(UserError, match=r"its head \(classifier\.3\.weight\) has 5 outputs and this dataset 10"):
        load_teacher(five, None, splits, CPU)


class Payload:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_payloads_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": DeepNN().state_dict(), "payload": Payload()}, path)
    with pytest.raises(UserError, match="refused for safety"):
        load_checkpoint(path)
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_teacher_outputs_are_cached_once_and_keyed(
    untrained_teacher: Path, pattern_folder: Path, home: Path, tmp_path: Path
) -> None:
    splits = load_splits("imagefolder", pattern_folder, val_size=50, limit_train=64)
    teacher = load_teacher(untrained_teacher, None, splits, CPU)
    first = outputs_of(teacher, splits, "features")
    outputs = first.outputs
    assert first.built
    assert outputs.logits[0].shape == (64, 10) and outputs.features is not None
    assert outputs.features[0].shape == (64, 32, 8, 8)
    files = sorted((home / "cache" / "teacher").glob("*.pt"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = outputs_of(teacher, splits, "features")
    assert not again.built and torch.equal(again.outputs.logits[0], outputs.logits[0])
    assert files[0].stat().st_mtime_ns == stamp
    # Another layer, or another split, is another cache entry.
    outputs_of(teacher, splits, "features.5")
    outputs_of(teacher, load_splits("imagefolder", pattern_folder, val_size=60, limit_train=64), "features")
    assert len(list((home / "cache" / "teacher").glob("*.pt"))) == 3
    # A truncated cache file is detected and rebuilt, never trusted.
    files[0].write_bytes(files[0].read_bytes()[:64])
    rebuilt = outputs_of(teacher, splits, "features")
    assert rebuilt.built and torch.equal(rebuilt.outputs.logits[0], outputs.logits[0])
    # Another teacher file (other weights) is another key.
    other = tmp_path / "other.pt"
    torch.manual_seed(7)
    save_checkpoint(other, DeepNN(), {"model": "deepnn", "num_classes": 10})
    assert outputs_of(load_teacher(other, None, splits, CPU), splits, "features").built
    assert len(list((home / "cache" / "teacher").glob("*.pt"))) == 4


def test_cached_and_live_teacher_give_identical_losses(
    untrained_teacher: Path, pattern_folder: Path, home: Path
) -> None:
    splits = load_splits("imagefolder", pattern_folder, val_size=50)
    teacher = load_teacher(untrained_teacher, None, splits, CPU)
    cached = outputs_of(teacher, splits, "features").outputs
    live_model = DeepNN()
    live_model.load_state_dict(load_checkpoint(untrained_teacher).state_dict)
    live_model.eval()
    index = torch.tensor([5, 0, 17, 3, 99, 42])
    live = compute_teacher_outputs(live_model, splits.train.images[index], "features", CPU)
    student_logits = torch.randn(len(index), 10)
    for method in ("kd", "cosine"):
        strategy = get_strategy(method)
        loss_fn = build_loss(strategy, strategy.hyperparameters({}), FEATURE_SHAPES)
        labels = splits.train.labels[index]
        student_features = torch.randn(len(index), 16, 8, 8)
        cached_logits, cached_features = cached.rows(index)
        live_logits, live_features = live.rows(torch.arange(len(index)))
        from_cache = loss_fn(LossInputs(student_logits, labels, student_features, cached_logits, cached_features))
        from_live = loss_fn(LossInputs(student_logits, labels, student_features, live_logits, live_features))
        assert torch.allclose(from_cache, from_live, atol=1e-6), method


@pytest.mark.slow
@pytest.mark.parametrize("reduce", ["avg", "max"])
def test_cosine_pools_the_teacher_once_and_trains_bit_for_bit_as_per_batch(
    reduce: str, pattern_teacher: Path, pattern_folder: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pooling the cached teacher vectors once before training changes no weight against pooling per batch."""
    config = pattern_config(pattern_folder, pattern_teacher, method="cosine", epochs=2)
    prepared = prepare(config, augmentations=("none", "flip"))
    hp = {"reduce": reduce, "augment": "flip"}  # both views of the teacher are pooled
    pooled_once: list[tuple[int, ...]] = []
    pool_once = CosineFeatures.teacher_features_once

    def recording(self: CosineFeatures, features: torch.Tensor) -> torch.Tensor:
        out = pool_once(self, features)
        pooled_once.append(tuple(out.shape))
        return out

    monkeypatch.setattr(CosineFeatures, "teacher_features_once", recording)
    once = train_with(prepared, **hp)
    assert pooled_once == [(250, 1024), (250, 1024)]  # the 2048-long teacher vectors, both views, once
    monkeypatch.setattr(CosineFeatures, "teacher_features_once", lambda self, features: features)
    per_batch = train_with(prepared, **hp)
    assert [r.train_loss for r in once.epochs] == [r.train_loss for r in per_batch.epochs]
    for a, b in zip(once.model.parameters(), per_batch.model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "cosine", "regressor"])
def test_every_strategy_trains_through_the_loop(
    method: str, pattern_teacher: Path, pattern_folder: Path, home: Path
) -> None:
    prepared = prepare(pattern_config(pattern_folder, pattern_teacher, method=method))
    assert isinstance(prepared.teacher, TeacherOutputs)
    result = train_student(prepared)
    assert result.params == 267_738  # the regressor is not part of the student
    assert result.val_accuracy is not None and result.val_accuracy > 30.0  # chance is 10 %


@pytest.mark.slow
def test_hybrid_with_every_distillation_weight_zero_is_ce(
    pattern_teacher: Path, pattern_folder: Path, home: Path
) -> None:
    ce = train_student(prepare(pattern_config(pattern_folder, pattern_teacher, method="ce")))
    zero = {"kd_weight": 0.0, "cosine_weight": 0.0, "regressor_weight": 0.0}
    hybrid = train_with(prepare(pattern_config(pattern_folder, pattern_teacher, method="hybrid")), **zero)
    assert hybrid.epochs[0].train_loss == ce.epochs[0].train_loss
    assert hybrid.val_accuracy == ce.val_accuracy
    for a, b in zip(ce.model.parameters(), hybrid.model.parameters(), strict=True):
        assert torch.equal(a, b)
    # With weights on, every term contributes and the regressor trains with the student.
    strategy = get_strategy("hybrid")
    loss_fn = build_loss(
        strategy,
        strategy.hyperparameters({"kd_weight": 1.0, "cosine_weight": 1.0, "regressor_weight": 1.0}),
        FEATURE_SHAPES,
    )
    assert sum(p.numel() for p in loss_fn.parameters()) == 16 * 32 * 9 + 32


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "regressor"])
def test_bf16_autocast_trains_with_float32_weights_and_losses_on_the_device(
    method: str, pattern_teacher: Path, pattern_folder: Path, home: Path
) -> None:
    config = pattern_config(pattern_folder, pattern_teacher, method=method, epochs=2, batch_size=32)
    prepared = prepare(_on_test_device(config))
    fp32 = train_with(prepared, lr=3e-3)
    bf16 = train_with(prepared, lr=3e-3, precision="bf16")
    assert all(p.dtype == torch.float32 and p.device.type == TEST_DEVICE.type for p in bf16.model.parameters())
    first32, first16 = fp32.epochs[0].train_loss, bf16.epochs[0].train_loss
    assert first16 != first32  # the forward pass really ran in bf16 ...
    assert abs(first16 - first32) < 0.1 * first32  # ... and trained the same way
    assert bf16.val_accuracy is not None and bf16.val_accuracy > 30.0  # chance is 10 %


def _on_test_device(config: RunConfig) -> RunConfig:
    return dataclasses.replace(config, device=str(TEST_DEVICE))


@pytest.mark.slow
def test_fp16_path_with_gradient_scaler_trains_on_the_device(
    pattern_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp16 is refused on the CPU for users; on the CPU the test lifts that check to run the GPU's code path."""
    import kdsearch.loop as loop

    if TEST_DEVICE.type == "cpu":
        monkeypatch.setattr(loop, "check_precision", lambda precision, device: None)
    splits = load_splits("imagefolder", pattern_folder, val_size=50).to(TEST_DEVICE)
    torch.manual_seed(0)
    model = prepare_module(LightNN(), TEST_DEVICE)
    reports = fit_tiny(
        splits.train, model, device=TEST_DEVICE, epochs=2, batch_size=32, lr=3e-3, val=splits.val, precision="fp16"
    )
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert reports[-1].train_loss < reports[0].train_loss
    assert reports[-1].val_accuracy is not None and reports[-1].val_accuracy > 30.0


@pytest.mark.slow
def test_a_checkpoint_saved_on_the_device_evaluates_the_same_on_the_cpu(
    pattern_teacher: Path, pattern_folder: Path, home: Path, tmp_path: Path
) -> None:
    from kdsearch.distill import run_evaluation, run_training

    config = _on_test_device(pattern_config(pattern_folder, pattern_teacher, method="kd", val_size=0))
    out = tmp_path / "student.pt"
    trained = run_training(config, out=out)
    on_cpu = run_evaluation(str(out), None, None, config.data, "cpu")
    assert trained["device"].startswith(TEST_DEVICE.type)
    assert on_cpu["test_accuracy"] == pytest.approx(trained["test_accuracy"], abs=0.5)  # 1 image in 100 at most
    assert on_cpu["params"] == trained["params"] == 267_738


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_follows_the_schedule_over_every_step(
    schedule: str, pattern_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rate Adam steps with is the schedule's, step by step, across epochs: cosine ends near 0."""
    seen: list[float] = []
    adam_step = torch.optim.Adam.step

    def recording_step(self: torch.optim.Adam, *args: Any, **kwargs: Any) -> Any:
        seen.append(self.param_groups[0]["lr"])
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    splits = load_splits("imagefolder", pattern_folder, val_size=50).to(CPU)
    batch_size, epochs, lr = 64, 2, 2e-3
    fit_tiny(splits.train, epochs=epochs, batch_size=batch_size, lr=lr, lr_schedule=schedule)
    total = epochs * -(-len(splits.train) // batch_size)
    assert seen == pytest.approx([learning_rate_at(schedule, lr, step, total) for step in range(total)])
    assert seen[0] == lr
    if schedule == "cosine":
        assert seen[total // 2] == pytest.approx(lr / 2) and seen[-1] < 0.05 * lr
    else:
        assert set(seen) == {lr}


@pytest.mark.slow
def test_cosine_schedule_changes_the_trained_student(pattern_folder: Path) -> None:
    """The searched schedule reaches the loop through the hyperparameters; the tutorial's is constant."""
    prepared = prepare(pattern_config(pattern_folder, method="ce", epochs=2))
    constant = train_student(prepared)
    assert constant.config.recipe.lr_schedule == "constant"
    cosine = train_with(prepared, lr_schedule="cosine")
    assert constant.epochs[0].train_loss != cosine.epochs[0].train_loss


@pytest.mark.parametrize(
    ("knob", "value", "message"),
    [
        ("lr_schedule", "step", "lr_schedule must be one of constant, cosine, got 'step'"),
        ("augment", "crop", "augment must be one of none, flip, shift or crops:K (K from 1 to 64), got 'crop'"),
        ("optimizer", "lbfgs", "optimizer must be one of adam, adamw, sgd, got 'lbfgs'"),
        ("label_smoothing", 0.9, "label_smoothing must be at most 0.5, got 0.9"),
        ("weight_decay", -1e-4, "weight_decay must be at least 0, got -0.0001"),
    ],
)
def test_recipe_values_are_checked_where_the_recipe_is_built(knob: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        RecipeConfig(**{knob: value})


class RecordingLoss(nn.Module):
    """Cross-entropy that keeps the teacher outputs the loop paired with each batch."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        assert inputs.teacher_logits is not None and inputs.teacher_features is not None
        self.teacher.append((inputs.teacher_logits.clone(), inputs.teacher_features.clone()))
        return nn.functional.cross_entropy(inputs.student_logits, inputs.labels)


def test_flip_augmentation_pairs_each_mirrored_image_with_the_teachers_mirrored_outputs(
    untrained_teacher: Path, pattern_folder: Path, home: Path
) -> None:
    splits = load_splits("imagefolder", pattern_folder, val_size=50, limit_train=64)  # one batch of 64
    teacher = load_teacher(untrained_teacher, None, splits, CPU)
    cached = outputs_of(teacher, splits, "features", "flip")
    assert cached.outputs.views == (IDENTITY, MIRRORED) and cached.built
    # The mirrored view is its own cache entry, reused like the plain one.
    assert len(list((home / "cache" / "teacher").glob("*.pt"))) == 2
    assert not outputs_of(teacher, splits, "features", "flip").built
    student, loss_fn = RecordingStudent(), RecordingLoss()
    fit_tiny(splits.train, student, loss_fn, epochs=2, teacher=cached.outputs, augment="flip")
    plain = {row.numpy().tobytes() for row in splits.train.images}
    mirrored = {row.flip(-1).numpy().tobytes() for row in splits.train.images}
    flipped = 0
    for images, (logits, features) in zip(student.batches, loss_fn.teacher, strict=True):
        live = compute_teacher_outputs(teacher.model, images, "features", CPU)
        assert torch.allclose(logits, live.logits[0], atol=1e-5)
        assert live.features is not None and torch.allclose(features, live.features[0], atol=1e-5)
        for row in images:
            key = row.contiguous().numpy().tobytes()
            assert key in plain or key in mirrored
            flipped += key in mirrored
    seen = 2 * len(splits.train)
    assert 0.35 * seen < flipped < 0.65 * seen  # about half of every epoch is mirrored


def test_flip_needs_the_mirrored_teacher_outputs(untrained_teacher: Path, pattern_folder: Path, home: Path) -> None:
    splits = load_splits("imagefolder", pattern_folder, val_size=50)
    plain = outputs_of(load_teacher(untrained_teacher, None, splits, CPU), splits, "features").outputs
    with pytest.raises(ValueError, match="lack the views mirrored"):
        fit_tiny(splits.train, RecordingStudent(), RecordingLoss(), teacher=plain, augment="flip")


def test_a_flip_run_prepares_the_mirrored_view_itself(
    untrained_teacher: Path, pattern_folder: Path, home: Path
) -> None:
    prepared = prepare(pattern_config(pattern_folder, untrained_teacher, method="kd", augment="flip"))
    assert prepared.teacher is not None and prepared.teacher.views == (IDENTITY, MIRRORED)
    assert prepared.teacher.features is None  # kd uses logits only
    assert prepare(pattern_config(pattern_folder, untrained_teacher, method="kd")).teacher.views == (IDENTITY,)  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.parametrize(("augment", "epochs"), [("flip", 1), ("shift", 2)])
def test_a_student_trained_on_flipped_or_shifted_views_beats_chance(
    augment: str, epochs: int, pattern_teacher: Path, pattern_folder: Path, home: Path
) -> None:
    config = pattern_config(pattern_folder, pattern_teacher, method="kd", augment=augment, epochs=epochs)
    result = train_student(prepare(config))
    assert result.config.recipe.augment == augment and result.val_accuracy is not None and result.val_accuracy > 30


def test_a_shift_view_moves_the_image_and_fills_with_zeros() -> None:
    image = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8) + 1
    right = View(4, 0).apply(image)
    assert torch.equal(right[..., :, 4:], image[..., :, :4]) and not right[..., :, :4].any()
    up_mirrored = View(0, -4, mirrored=True).apply(image)
    assert torch.equal(up_mirrored[..., :4, :], image[..., 4:, :].flip(-1)) and not up_mirrored[..., 4:, :].any()
    assert len(SHIFT_VIEWS) == 18 and SHIFT_VIEWS[4] == IDENTITY and SHIFT_VIEWS[13] == MIRRORED
    assert torch.equal(SHIFT_VIEWS[4].apply(image), image)


def test_shift_views_pair_each_row_with_the_teachers_outputs_for_that_view(
    untrained_teacher: Path, pattern_folder: Path, home: Path
) -> None:
    """The student sees the view the teacher scored: cached outputs equal live teacher runs on the batch."""
    splits = load_splits("imagefolder", pattern_folder, val_size=50, limit_train=64)  # one batch of 64
    teacher = load_teacher(untrained_teacher, None, splits, CPU)
    cached = outputs_of(teacher, splits, None, "shift")
    assert cached.built and cached.outputs.views == SHIFT_VIEWS
    assert [tuple(logits.shape) for logits in cached.outputs.logits] == [(64, 10)] * 18
    assert not outputs_of(teacher, splits, None, "shift").built  # every view is cached once
    # The identity and mirrored views are the same cache files a flip run uses: 18 files in all.
    assert not outputs_of(teacher, splits, None, "flip").built
    assert len(list((home / "cache" / "teacher").glob("*.pt"))) == 18
    student, loss_fn = RecordingStudent(), RecordingLogitsLoss()
    fit_tiny(splits.train, student, loss_fn, epochs=1, teacher=cached.outputs, augment="shift")
    plain = {row.numpy().tobytes() for row in splits.train.images}
    moved = 0
    for images, logits in zip(student.batches, loss_fn.teacher_logits, strict=True):
        live = compute_teacher_outputs(teacher.model, images, None, CPU)
        assert torch.allclose(logits, live.logits[0], atol=1e-5)
        moved += sum(row.contiguous().numpy().tobytes() not in plain for row in images)
    assert moved > 0.8 * len(splits.train)  # 17 of the 18 views move or mirror the image


def test_shift_is_refused_for_feature_methods_and_left_out_of_the_default_space(
    untrained_teacher: Path, pattern_folder: Path, home: Path
) -> None:
    from kdsearch.spaces import default_space
    from kdsearch.strategies import get_strategy

    with pytest.raises(ConfigError, match=r"cosine compares hidden features.*use flip"):
        prepare(pattern_config(pattern_folder, untrained_teacher, method="cosine", augment="shift"))
    assert default_space(get_strategy("kd"))["augment"].choices == ("none", "flip")
