"""One distillation run from a ``RunConfig``: the path `kdsearch train` and every search trial share.

``prepare`` does the per-process work once (load data, load or train the teacher, cache its
outputs); ``train_student`` is the per-trial work (build the student and the strategy's loss, run
the loop). A search calls ``prepare`` once and ``train_student`` per trial.
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
from kdsearch.data import TensorSplits, load_splits
from kdsearch.errors import UserError
from kdsearch.loop import (
    PRECISIONS,
    EpochReport,
    TeacherOutputs,
    check_precision,
    evaluate,
    feature_shape,
    fit,
    prepare_module,
    resolve_device,
)
from kdsearch.models import build_model, count_parameters
from kdsearch.spaces import read_structured_file
from kdsearch.strategies import get_strategy
from kdsearch.teacher import (
    TeacherRecipe,
    cache_dir,
    default_teacher_path,
    load_teacher,
    teacher_outputs,
    train_teacher,
)


@dataclass
class RunConfig:
    """Everything that defines one distillation run; also the format of exported configs."""

    method: str = "kd"
    dataset: str = "cifar10"
    data_dir: str | None = None
    val_size: int = 5000
    limit_train: int | None = None
    epochs: int = 10
    batch_size: int = 128
    seed: int = 42
    device: str = "auto"
    teacher: str | None = None
    teacher_model: str | None = None
    student_model: str = "lightnn"
    teacher_layer: str = "features"
    student_layer: str = "features"
    width: float = 1.0
    precision: str = "fp32"
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Fail fast, before any data is loaded, on values no run could use."""
        get_strategy(self.method)
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if isinstance(self.val_size, bool) or not isinstance(self.val_size, int) or self.val_size < 0:
            raise UserError(f"val-size must be an integer 0 or more, got {self.val_size!r}")
        if self.limit_train is not None and (not isinstance(self.limit_train, int) or self.limit_train <= 0):
            raise UserError(f"limit-train must be a positive integer, got {self.limit_train!r}")
        if not isinstance(self.width, (int, float)) or not math.isfinite(self.width) or self.width <= 0:
            raise UserError(f"width must be positive, got {self.width!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.hyperparameters, dict):
            raise UserError("hyperparameters must be a mapping of name to value")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CONFIG_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
# Keys an exported config carries for provenance; `train --config` reads past them.
PROVENANCE_KEYS = {"source", "kdsearch_version"}


def config_from_dict(data: dict[str, Any], *, origin: str) -> RunConfig:
    unknown = set(data) - CONFIG_FIELDS - PROVENANCE_KEYS
    if unknown:
        raise UserError(
            f"config {origin} has unknown keys {sorted(unknown)}; known: {', '.join(sorted(CONFIG_FIELDS))}"
        )
    values = {k: v for k, v in data.items() if k in CONFIG_FIELDS}
    hp = values.get("hyperparameters", {})
    values["hyperparameters"] = dict(hp) if isinstance(hp, dict) else hp
    for key in ("data_dir", "teacher"):
        if values.get(key) is not None:
            values[key] = str(values[key])
    try:
        config = RunConfig(**values)
    except TypeError as exc:
        raise UserError(f"config {origin}: {exc}") from None
    config.check()
    return config


def load_config(path: str | Path, rank: int = 1) -> RunConfig:
    """A YAML or JSON run config, such as `kdsearch export` writes.

    A file from ``export --top K`` holds ``configs: [...]`` best first; ``rank`` picks one.
    """
    data = read_structured_file(path, "config file")
    if "configs" in data:
        configs = data["configs"]
        if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
            raise UserError(f"config file {path}: 'configs' must be a list of run configs")
        if not 1 <= rank <= len(configs):
            raise UserError(f"config file {path} holds {len(configs)} configs; --rank {rank} is out of range")
        data = configs[rank - 1]
    elif rank != 1:
        raise UserError(f"config file {path} holds one config; --rank {rank} is out of range")
    return config_from_dict(data, origin=str(path))


@dataclass
class Prepared:
    """Per-process state shared by every trial: data and teacher outputs, on the device."""

    config: RunConfig
    device: torch.device
    splits: TensorSplits
    teacher: TeacherOutputs | None
    teacher_path: Path | None
    teacher_checksum: str | None
    teacher_outputs_seconds: float
    teacher_metadata: dict[str, Any] = field(default_factory=dict)


def resolve_teacher(
    config: RunConfig,
    splits: TensorSplits,
    device: torch.device,
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """``--teacher PATH``, or the dataset's default teacher, trained once with the tutorial recipe.

    The default teacher holds out the same ``val_size`` validation rows as the run (the split is one
    seeded permutation), so a search never validates on images whose labels its teacher learnt.
    It trains on every other train row, whatever ``limit_train`` says, so one teacher serves all.
    """
    if config.teacher is not None:
        path = Path(config.teacher)
        if not path.is_file():
            raise UserError(f"teacher checkpoint {path} does not exist")
        return path
    recipe = TeacherRecipe(model=config.teacher_model or "deepnn")
    path = default_teacher_path(splits, recipe, config.val_size)
    if not path.exists():
        if log is not None:
            log(
                f"no teacher for this dataset and validation split yet: "
                f"training one ({recipe.epochs} epochs) into {path}"
            )
        held_out = load_splits(config.dataset, config.data_dir, val_size=config.val_size, cache_dir=cache_dir())
        train_teacher(
            held_out.to(device),
            recipe,
            device,
            path,
            progress=progress,
            data_settings={"val_size": config.val_size, "limit_train": None},
        )
    return path


def prepare(
    config: RunConfig,
    *,
    augmentations: tuple[str, ...] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Prepared:
    """Load the data and the teacher's cached outputs once for all runs of ``config``.

    ``augmentations`` are those the runs may use (a search passes its space's choices; default:
    the one ``config`` names); ``flip`` among them brings the teacher's mirrored-view outputs.
    """
    config.check()
    strategy = get_strategy(config.method)
    hp = strategy.hyperparameters(config.hyperparameters)  # fail on bad values before loading anything
    if augmentations is None:
        augmentations = (str(hp["augment"]),)
    device = resolve_device(config.device)
    check_precision(config.precision, device)
    splits = load_splits(
        config.dataset, config.data_dir, val_size=config.val_size, limit_train=config.limit_train, cache_dir=cache_dir()
    ).to(device)
    if not strategy.uses_teacher:
        return Prepared(config, device, splits, None, None, None, 0.0)
    path = resolve_teacher(config, splits, device, progress=progress, log=log)
    teacher = load_teacher(path, config.teacher_model, splits, device)
    # The tapped layer is cached even for logit-only strategies (when the teacher has it), so one
    # pass of the teacher serves kd, cosine, regressor and hybrid runs alike.
    has_layer = config.teacher_layer in dict(teacher.model.named_modules())
    layer = config.teacher_layer if strategy.uses_features or has_layer else None
    cached = teacher_outputs(teacher, splits, layer, device, mirrored="flip" in augmentations)
    outputs = cached.outputs
    if not strategy.uses_features:
        outputs = outputs.without_features()  # not indexed per step when unused
    return Prepared(config, device, splits, outputs, path, teacher.checksum, cached.seconds, teacher.metadata)


@dataclass
class StudentResult:
    model: nn.Module
    hyperparameters: dict[str, Any]
    epochs: list[EpochReport]
    params: int
    width: float

    @property
    def val_accuracy(self) -> float | None:
        return self.epochs[-1].val_accuracy if self.epochs else None


def build_student(config: RunConfig, splits: TensorSplits) -> nn.Module:
    return build_model(
        config.student_model,
        num_classes=splits.num_classes,
        in_channels=splits.in_channels,
        image_size=splits.image_size,
        width=config.width,
    )


def train_student(
    prepared: Prepared,
    hyperparameters: dict[str, Any],
    *,
    on_epoch: Callable[[EpochReport], None] | None = None,
    progress: bool = False,
    width: float | None = None,
) -> StudentResult:
    """Seed, build the student and the strategy's loss, and run the shared loop."""
    config = prepared.config
    if width is not None:
        config = dataclasses.replace(config, width=width)
    strategy = get_strategy(config.method)
    hp = strategy.hyperparameters(hyperparameters)
    splits, device = prepared.splits, prepared.device
    torch.manual_seed(config.seed)
    student = prepare_module(build_student(config, splits), device)
    student_shape = teacher_shape = None
    if strategy.uses_features:
        assert prepared.teacher is not None and prepared.teacher.features is not None
        student_shape = feature_shape(student, config.student_layer, splits.train.images, device)
        teacher_shape = tuple(prepared.teacher.features.shape[1:])
    loss_fn = prepare_module(strategy.build_loss(hp, student_shape, teacher_shape), device)
    reports = fit(
        student,
        loss_fn,
        splits.train,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=float(hp["lr"]),
        lr_schedule=str(hp["lr_schedule"]),
        augment=str(hp["augment"]),
        seed=config.seed,
        device=device,
        teacher=prepared.teacher,
        student_layer=config.student_layer if strategy.uses_features else None,
        val=splits.val,
        on_epoch=on_epoch,
        progress=progress,
        precision=config.precision,
    )
    return StudentResult(student, hp, reports, count_parameters(student), config.width)


def test_accuracy(prepared: Prepared, model: nn.Module) -> float:
    """Accuracy on the held-out test split: reported, never used to choose anything."""
    return evaluate(model, prepared.splits.test, prepared.device)


def student_metadata(prepared: Prepared, result: StudentResult) -> dict[str, Any]:
    """What a student checkpoint records so `evaluate` and a re-run can rebuild it."""
    config = dataclasses.replace(prepared.config, width=result.width)
    splits = prepared.splits
    return {
        "kind": "student",
        "model": config.student_model,
        "width": result.width,
        "method": config.method,
        "dataset": splits.dataset,
        "data_fingerprint": splits.fingerprint,
        "num_classes": splits.num_classes,
        "in_channels": splits.in_channels,
        "image_size": list(splits.image_size),
        "mean": list(splits.mean),
        "std": list(splits.std),
        "teacher_sha256": prepared.teacher_checksum,
        "hyperparameters": result.hyperparameters,
        "config": config.to_dict(),
        "val_accuracy": result.val_accuracy,
        "params": result.params,
    }


def run_training(
    config: RunConfig, *, out: Path | None = None, progress: bool = False, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """`kdsearch train`: one run, test accuracy, optional student checkpoint; returns the JSON result."""
    prepared = prepare(config, progress=progress, log=log)
    result = train_student(prepared, config.hyperparameters, progress=progress)
    test = test_accuracy(prepared, result.model)
    summary: dict[str, Any] = {
        "method": config.method,
        "dataset": config.dataset,
        "test_accuracy": test,
        "val_accuracy": result.val_accuracy,
        "params": result.params,
        "hyperparameters": result.hyperparameters,
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
        metadata = student_metadata(prepared, result) | {"test_accuracy": test}
        save_checkpoint(out, result.model, metadata)
        summary["checkpoint"] = str(out)
    return summary


def run_evaluation(
    checkpoint: str,
    model_name: str | None,
    width: float | None,
    *,
    dataset: str,
    data_dir: str | None,
    val_size: int,
    limit_train: int | None,
    device: str,
) -> dict[str, Any]:
    """`kdsearch evaluate`: accuracy of any checkpoint (student, teacher or tutorial state_dict)."""
    loaded = load_checkpoint(checkpoint)
    meta = loaded.metadata
    name = model_name or meta.get("model")
    if name is None:
        raise UserError(
            f"checkpoint {checkpoint} has no metadata naming its model; pass --model deepnn|lightnn|pkg.mod:Class"
        )
    torch_device = resolve_device(device)
    splits = load_splits(dataset, data_dir, val_size=val_size, limit_train=limit_train, cache_dir=cache_dir())
    chosen_width = width if width is not None else float(meta.get("width", 1.0))
    model = build_model(
        name,
        num_classes=splits.num_classes,
        in_channels=splits.in_channels,
        image_size=splits.image_size,
        width=chosen_width,
    )
    load_weights(model, loaded, source=checkpoint, model_name=name)
    model = prepare_module(model, torch_device)
    splits = splits.to(torch_device)
    return {
        "checkpoint": checkpoint,
        "model": name,
        "dataset": dataset,
        "test_accuracy": evaluate(model, splits.test, torch_device),
        "val_accuracy": evaluate(model, splits.val, torch_device) if splits.val is not None else None,
        "params": count_parameters(model),
    }
