"""Crop views, the FKD way: seeded random-resized crops per image whose teacher outputs are cached."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdsearch.data import load_splits
from kdsearch.distill import prepare, train_student
from kdsearch.errors import ConfigError, UserError
from kdsearch.teacher import load_teacher
from kdsearch.teacher_outputs import compute_teacher_outputs
from kdsearch.views import CROP_RATIO, CROP_SCALE, CropView, crop_boxes, views_of
from tests.helpers import CPU, RecordingLogitsLoss, RecordingStudent, fit_tiny, outputs_of, pattern_config


def test_crop_boxes_are_seeded_inside_the_image_and_half_mirrored() -> None:
    boxes = crop_boxes(500, 8, seed=0)
    assert torch.equal(boxes, crop_boxes(500, 8, seed=0)) and not torch.equal(boxes, crop_boxes(500, 8, seed=1))
    # Row r's crops do not depend on how many rows there are beyond it.
    assert boxes.shape == (500, 8, 5) and ((boxes[..., :4] >= 0) & (boxes[..., :4] <= 1 + 1e-6)).all()
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    area = width * height
    assert area.max() <= CROP_SCALE[1] + 1e-6 and area.min() >= CROP_SCALE[0] * 0.5  # clamping only shrinks
    inside = (width < 1) & (height < 1)
    ratio = (width / height)[inside]
    assert ratio.min() >= CROP_RATIO[0] - 1e-4 and ratio.max() <= CROP_RATIO[1] + 1e-4
    assert 0.4 < boxes[..., 4].mean() < 0.6


def test_a_crop_view_resamples_each_image_at_its_own_box() -> None:
    images = torch.zeros(2, 1, 16, 16)
    images[:, :, :, :8] = 1.0  # bright left half
    view = CropView(0, 1, rows=2)
    object.__setattr__(view, "boxes", torch.tensor([[0.0, 0.0, 0.4, 1.0, 0.0], [0.6, 0.0, 1.0, 1.0, 1.0]]))
    crops = view.apply(images, torch.tensor([0, 1]))
    assert crops.shape == images.shape
    assert torch.allclose(crops[0], torch.ones(1, 16, 16))  # inside the left half, stretched
    assert torch.allclose(crops[1], torch.zeros(1, 16, 16), atol=1e-6)  # inside the dark right half (mirrored)
    assert views_of("crops:3", 10) == tuple(CropView(k, 3, 10) for k in range(3))
    assert views_of(("none", "crops:2"), 10)[0].name == "identity"


@pytest.mark.slow
def test_cached_crop_views_equal_a_live_teacher_on_the_same_crops(
    pattern_teacher: Path, pattern_folder: Path, home: Path
) -> None:
    splits = load_splits("imagefolder", pattern_folder, val_size=50)
    teacher = load_teacher(pattern_teacher, None, splits, CPU)
    cached = outputs_of(teacher, splits, None, "crops:4")
    assert cached.built and cached.outputs.views[0].name.startswith("crop0of4")
    assert not outputs_of(teacher, splits, None, "crops:4").built  # built once, shared by every later run
    student, loss_fn = RecordingStudent(), RecordingLogitsLoss()
    fit_tiny(splits.train, student, loss_fn, epochs=2, teacher=cached.outputs, augment="crops:4")
    plain = {row.numpy().tobytes() for row in splits.train.images}
    for images, logits in zip(student.batches, loss_fn.teacher_logits, strict=True):
        live = compute_teacher_outputs(teacher.model, images, None, CPU)
        assert torch.allclose(logits, live.logits[0], atol=1e-5)
        assert not any(row.contiguous().numpy().tobytes() in plain for row in images)  # every row is a crop


@pytest.mark.slow
def test_crops_train_a_logit_method_and_are_refused_for_feature_methods(
    pattern_teacher: Path, pattern_folder: Path, home: Path
) -> None:
    result = train_student(prepare(pattern_config(pattern_folder, pattern_teacher, method="kd", augment="crops:2")))
    assert result.config.recipe.augment == "crops:2" and result.val_accuracy is not None
    with pytest.raises(ConfigError, match="shift and crops are for logit methods"):
        prepare(pattern_config(pattern_folder, pattern_teacher, method="cosine", augment="crops:2"))
    with pytest.raises(UserError, match=r"augment must be one of none, flip, shift or crops:K \(K from 1 to 64\)"):
        pattern_config(pattern_folder, pattern_teacher, method="kd", augment="crops:0")
