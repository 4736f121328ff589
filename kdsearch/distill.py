"""One distillation run from a ``RunConfig``: the path `kdsearch train` and every search trial share.

``prepare`` does the per-process work once (load data, load or train the teacher, cache its
outputs); ``train_student`` is the per-trial work (build the student and the method's loss, run
the loop). A search calls ``prepare`` once and ``train_student`` per trial, each trial with its
own config (the study's, with the trial's values).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdsearch.checkpoints import load_checkpoint, load_weights, save_checkpoint
from kdsearch.config import DataConfig, RunConfig
from kdsearch.data import TensorSplits, splits_for
from kdsearch.errors import ConfigError, UserError, about, shown
from kdsearch.fsutil import refuse_overwriting_inputs
from kdsearch.loop import EpochReport, check_precision, evaluate, feature_shape, fit, prepare_module, resolve_device
from kdsearch.losses import LossShapes
from kdsearch.models import build_model, count_parameters
from kdsearch.paths import data_folder
from kdsearch.strategies import get_strategy
from kdsearch.taps import layer_shapes
from kdsearch.teacher import ensure_default_teacher, load_teacher, model_name_for
from kdsearch.teacher_outputs import TeacherOutputs, cached_teacher_outputs
from kdsearch.views import FEATURE_VIEWS, views_of
from kdsearch.weighted_sum import build_loss, check_feature_shapes


@dataclass
class Prepared:
    """Per-process state shared by every trial: data and teacher outputs, on the device."""

    config: RunConfig
    device: torch.device
    splits: TensorSplits
    teacher: TeacherOutputs | None = None
    teacher_path: Path | None = None
    teacher_checksum: str | None = None
    teacher_outputs_seconds: float = 0.0
    teacher_metadata: dict[str, Any] = field(default_factory=dict)


def prepare(
    config: RunConfig,
    *,
    augmentations: tuple[str, ...] | None = None,
    methods: tuple[str, ...] = (),
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Prepared:
    """Load the data and the teacher's cached outputs once for all runs of ``config``.

    ``augmentations`` are those the runs may use (a search passes its space's choices; default:
    the one ``config`` names): the teacher's outputs are cached for all their views. ``methods``
    are those the runs may use (a study across methods; default: ``config``'s): the teacher is
    loaded when any of them needs it, its features kept when any compares features.
    """
    strategies = [get_strategy(m) for m in methods or (config.method,)]
    uses_teacher = any(s.uses_teacher for s in strategies)
    feature_methods = [s.name for s in strategies if s.uses_features]
    device = resolve_device(config.device)
    check_precision(config.recipe.precision, device)
    data = config.data
    splits = splits_for(data).to(device)
    # The student's code runs here, after every check that needs no model (storage, outputs, data), and
    # a class that is missing or weights that do not fit fail now, not after a teacher has trained.
    build_student(config, splits)
    if not uses_teacher:
        return Prepared(config, device, splits)
    models = config.models
    if models.teacher is not None:
        path = Path(models.teacher)
        if not path.is_file():
            raise UserError(f"teacher checkpoint {path} does not exist")
    else:
        path = ensure_default_teacher(
            data, models.teacher_model, models.teacher_preset, splits, device, progress=progress, log=log
        )
    teacher = load_teacher(path, models.teacher_model, splits, device)
    views = views_of(augmentations if augmentations is not None else config.recipe.augment, splits.train.population)
    layer = _cached_layer(teacher.model, models.teacher_layer, splits, device, views, needed=bool(feature_methods))
    if feature_methods and not set(views) <= set(FEATURE_VIEWS):
        raise ConfigError(
            "augment",
            f"shift and crops are for logit methods: {', '.join(feature_methods)} "
            f"{'compares' if len(feature_methods) == 1 else 'compare'} hidden features, whose cache for many views "
            "would not fit in memory; use flip (or none) with feature methods",
        )
    cached = cached_teacher_outputs(teacher.model, teacher.checksum, splits, layer, device, views)
    outputs = cached.outputs if feature_methods else cached.outputs.without_features()
    return Prepared(config, device, splits, outputs, path, teacher.checksum, cached.seconds, teacher.metadata)


# Features a logit-only run caches beside the logits, so that one pass of the teacher also serves later
# feature methods on the same data: only while they stay this small (CIFAR-10's 32x8x8 map: ~370 MB a view).
SHARED_FEATURES_BYTES = 1 << 30


def _cached_layer(
    teacher: nn.Module, layer: str, splits: TensorSplits, device: torch.device, views: tuple[Any, ...], *, needed: bool
) -> str | None:
    """The layer whose features are cached: always when a method needs them, else when they are small.

    A 224-pixel image's 16x56x56 map is 200 KB: 10 GB for 50,000 images, held in memory while it is
    computed — a cost a logit method should not pay for a feature method that may never run.
    """
    if needed:
        return layer
    if layer not in dict(teacher.named_modules()):
        return None
    shape = feature_shape(teacher, layer, splits.train.head(), device)
    size = len(splits.train) * math.prod(shape) * 4 * sum(view in FEATURE_VIEWS for view in views)
    return layer if size <= SHARED_FEATURES_BYTES else None


@dataclass
class StudentResult:
    model: nn.Module
    config: RunConfig  # the run's own (a trial's values included)
    epochs: list[EpochReport]
    params: int

    @property
    def val_accuracy(self) -> float | None:
        return self.epochs[-1].val_accuracy if self.epochs else None


def build_student(config: RunConfig, splits: TensorSplits) -> nn.Module:
    """The run's student, sized for the data, from ``student_init``'s weights when it names a file."""
    models = config.models
    student = build_model(
        models.student_model,
        num_classes=splits.num_classes,
        in_channels=splits.in_channels,
        image_size=splits.image_size,
        width=models.width,
    )
    if models.student_init is not None:
        weights = load_checkpoint(models.student_init)
        load_weights(student, weights, source=models.student_init, model_name=models.student_model, new_head=True)
    return student


def loss_shapes(prepared: Prepared, student: nn.Module, config: RunConfig) -> LossShapes:
    """The tapped layers' per-sample shapes, for methods that compare features."""
    if not get_strategy(config.method).uses_features:
        return LossShapes()
    assert prepared.teacher is not None and prepared.teacher.features is not None
    student_shape = feature_shape(student, config.models.student_layer, prepared.splits.train.head(), prepared.device)
    return LossShapes(student_shape, tuple(prepared.teacher.features[0].shape[1:]))


def check_loss_shapes(prepared: Prepared, method: str | None = None) -> None:
    """Build the method's (default: the config's) feature terms once, so unmatched layers fail before any trial."""
    config = prepared.config
    if method is not None and method != config.method:
        config = config.with_values({"method": method})
    strategy = get_strategy(config.method)
    if strategy.uses_features:
        student = build_student(config, prepared.splits).to(prepared.device)
        check_feature_shapes(strategy, loss_shapes(prepared, student, config))


def train_student(
    prepared: Prepared,
    config: RunConfig | None = None,
    *,
    on_epoch: Callable[[EpochReport], None] | None = None,
    progress: bool = False,
) -> StudentResult:
    """Seed, build the student and the method's loss, and run the shared loop.

    ``config`` is this run's (a trial's), on the data and teacher ``prepared`` holds; default: the prepared one.
    """
    config = config or prepared.config
    strategy = get_strategy(config.method)
    splits, device = prepared.splits, prepared.device
    torch.manual_seed(config.recipe.seed)
    student = prepare_module(build_student(config, splits), device)
    shapes = loss_shapes(prepared, student, config)
    loss = build_loss(strategy, dict(config.loss.params), shapes, label_smoothing=config.recipe.label_smoothing)
    loss_fn = prepare_module(loss, device)
    reports = fit(
        student,
        loss_fn,
        splits.train,
        config.recipe,
        device=device,
        teacher=prepared.teacher,
        student_layer=config.models.student_layer if strategy.uses_features else None,
        val=splits.val,
        on_epoch=on_epoch,
        progress=progress,
    )
    return StudentResult(student, config, reports, count_parameters(student))


def student_metadata(prepared: Prepared, result: StudentResult) -> dict[str, Any]:
    """What a student checkpoint records so `evaluate` and a re-run can rebuild it."""
    splits, config = prepared.splits, result.config
    return {
        "kind": "student",
        "model": config.models.student_model,
        "width": config.models.width,
        "method": config.method,
        "dataset": splits.dataset,
        "data_fingerprint": splits.fingerprint,
        "num_classes": splits.num_classes,
        "in_channels": splits.in_channels,
        "image_size": list(splits.image_size),
        "mean": list(splits.mean),
        "std": list(splits.std),
        "teacher_sha256": prepared.teacher_checksum,
        # The rows it never trained on: a student exported as a teacher is then known not to have
        # seen a search's validation images (see study.teacher_saw_validation).
        "data": {"val_size": config.data.val_size, "limit_train": config.data.limit_train},
        "config": config.to_dict(),
        "val_accuracy": result.val_accuracy,
        "params": result.params,
    }


def run_training(
    config: RunConfig,
    *,
    out: Path | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    teacher_sha256: str | None = None,
) -> dict[str, Any]:
    """`kdsearch train`: one run, test accuracy, optional student checkpoint; returns the JSON result.

    ``teacher_sha256`` is the teacher a config was searched with: a re-train must distil from the
    same one, so another file at that path is refused before the student trains.
    """
    if out is not None:
        with about("out"):
            refuse_overwriting_inputs(
                {"out": out},
                (
                    config.models.teacher,
                    config.models.student_init,
                    data_folder(config.data.dataset, config.data.data_dir),
                ),
            )
    prepared = prepare(config, progress=progress, log=log)
    if teacher_sha256 is not None and prepared.teacher_checksum not in (None, teacher_sha256):
        raise ConfigError(
            "teacher",
            f"{prepared.teacher_path} is not the teacher this config was searched with (sha256 "
            f"{prepared.teacher_checksum[:12]}…, the search's {teacher_sha256[:12]}…); give the search's file",
        )
    result = train_student(prepared, progress=progress)
    test = evaluate(result.model, prepared.splits.test, prepared.device)
    summary: dict[str, Any] = {
        "method": config.method,
        "dataset": config.data.dataset,
        "test_accuracy": test,
        "val_accuracy": result.val_accuracy,
        "params": result.params,
        "config": config.to_dict(),
        "epoch_seconds": [r.seconds for r in result.epochs],
        "epoch_val_accuracy": [r.val_accuracy for r in result.epochs],
        "epoch_train_loss": [r.train_loss for r in result.epochs],
        "teacher_outputs_seconds": prepared.teacher_outputs_seconds,
        "teacher": str(prepared.teacher_path) if prepared.teacher_path else None,
        "teacher_sha256": prepared.teacher_checksum,
        "device": str(prepared.device),
        "train_images": len(prepared.splits.train),
    }
    if out is not None:
        with about("out"):
            refuse_overwriting_inputs({"out": out}, (str(prepared.teacher_path) if prepared.teacher_path else None,))
        save_checkpoint(out, result.model, student_metadata(prepared, result) | {"test_accuracy": test})
        summary["checkpoint"] = str(out)
    return summary


def run_evaluation(
    checkpoint: str, model_name: str | None, width: float | None, data: DataConfig, device: str
) -> dict[str, Any]:
    """`kdsearch evaluate`: accuracy of any checkpoint (student, teacher or tutorial state_dict)."""
    loaded = load_checkpoint(checkpoint)
    name = model_name_for(loaded.metadata, model_name, checkpoint, fallback=None)
    torch_device = resolve_device(device)
    splits = splits_for(data)
    recorded_width = loaded.metadata.get("width", 1.0)
    if width is None and (isinstance(recorded_width, bool) or not isinstance(recorded_width, (int, float))):
        raise ConfigError(
            "width", f"must be given: checkpoint {checkpoint} records width {shown(recorded_width)}, not a number"
        )
    model = build_model(
        name,
        num_classes=splits.num_classes,
        in_channels=splits.in_channels,
        image_size=splits.image_size,
        width=width if width is not None else float(recorded_width),
    )
    load_weights(model, loaded, source=checkpoint, model_name=name)
    model = prepare_module(model, torch_device)
    splits = splits.to(torch_device)
    return {
        "checkpoint": checkpoint,
        "model": name,
        "dataset": data.dataset,
        "test_accuracy": evaluate(model, splits.test, torch_device),
        "val_accuracy": evaluate(model, splits.val, torch_device) if splits.val is not None else None,
        "params": count_parameters(model),
    }


def run_layers(model_name: str, width: float, data: DataConfig) -> dict[str, Any]:
    """`kdsearch layers`: every tappable layer of a model built for ``data``, with its output shape."""
    splits = splits_for(dataclasses.replace(data, val_size=0, limit_train=None))  # any split gives the sizes
    model = build_model(
        model_name,
        num_classes=splits.num_classes,
        in_channels=splits.in_channels,
        image_size=splits.image_size,
        width=width,
    )
    return {
        "model": model_name,
        "dataset": data.dataset,
        "image_size": list(splits.image_size),
        "in_channels": splits.in_channels,
        "params": count_parameters(model),
        "layers": [dataclasses.asdict(layer) for layer in layer_shapes(model, splits.train.head())],
    }
