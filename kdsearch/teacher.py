"""The teacher: train it (``kdsearch teacher``), name the default one, and load one safely.

A search distils from one frozen teacher per dataset; its outputs are cached once
(``kdsearch.teacher_outputs``). The teacher trains through the same loop and recipe as students.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdsearch import __version__
from kdsearch.checkpoints import load_checkpoint, load_weights, save_checkpoint
from kdsearch.config import DEFAULT_TEACHER_MODEL, TEACHER_PRESETS, DataConfig, RecipeConfig
from kdsearch.data import TensorSplits, splits_for
from kdsearch.errors import ConfigError, UserError, about
from kdsearch.fsutil import file_sha256, refuse_overwriting_inputs
from kdsearch.loop import evaluate, fit, prepare_module, resolve_device
from kdsearch.losses import LossShapes
from kdsearch.models import REGISTERED, build_model, count_parameters
from kdsearch.paths import data_folder, home_dir
from kdsearch.settings import TeacherConfig
from kdsearch.strategies import get_strategy
from kdsearch.weighted_sum import build_loss
from kdsearch.zoo import is_zoo_model

TUTORIAL_TEACHER = DEFAULT_TEACHER_MODEL  # the name bench/ knows the tutorial's teacher by


def preset_recipe(preset: str) -> RecipeConfig:
    """The recipe a named teacher preset trains with (``kdsearch.config.TEACHER_PRESETS``)."""
    return RecipeConfig(**TEACHER_PRESETS[preset])


def default_teacher_path(
    splits: TensorSplits, model: str, recipe: RecipeConfig, val_size: int = 0, limit_train: int | None = None
) -> Path:
    """One teacher per dataset content, model, recipe and held-out validation size, reused by every study.

    ``val_size`` is part of the name because a search must not validate on images its teacher was
    trained on (the teacher's outputs would carry their labels): a search with ``--val-size V``
    gets a teacher trained without those V rows, a re-train on the whole split (V = 0) another.
    A teacher trained on a ``limit_train`` subset is named for it, so it never stands in for a full one.
    """
    name = f"{model.replace(':', '_').replace('.', '_')}-{splits.dataset}-{splits.fingerprint}"
    if recipe != RecipeConfig():
        name += "-" + hashlib.sha256(json.dumps(dataclasses.asdict(recipe), sort_keys=True).encode()).hexdigest()[:8]
    if val_size:
        name += f"-val{val_size}"
    if limit_train is not None:
        name += f"-limit{limit_train}"
    return home_dir() / "teachers" / f"{name}.pt"


def train_teacher(
    splits: TensorSplits,
    model_name: str,
    recipe: RecipeConfig,
    device: torch.device,
    out: Path,
    *,
    progress: bool = False,
    data_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a teacher with cross-entropy through the shared loop; save weights + metadata atomically.

    The model is built first: its code runs only after the caller's checks (output, data), and a name
    that cannot be built is refused before any training.
    """
    torch.manual_seed(recipe.seed)
    model = build_model(
        model_name, num_classes=splits.num_classes, in_channels=splits.in_channels, image_size=splits.image_size
    )
    model = prepare_module(model, device)
    loss_fn = build_loss(get_strategy("ce"), {}, LossShapes(), label_smoothing=recipe.label_smoothing)
    reports = fit(model, loss_fn, splits.train, recipe, device=device, val=splits.val, progress=progress)
    test_accuracy = evaluate(model, splits.test, device)
    result = {
        "kind": "teacher",
        "model": model_name,
        "dataset": splits.dataset,
        "data_fingerprint": splits.fingerprint,
        "classes": splits.classes,
        "num_classes": splits.num_classes,
        "in_channels": splits.in_channels,
        "image_size": list(splits.image_size),
        "mean": list(splits.mean),
        "std": list(splits.std),
        "recipe": dataclasses.asdict(recipe),
        "data": data_settings or {},
        "train_images": len(splits.train),
        "test_accuracy": test_accuracy,
        "val_accuracy": reports[-1].val_accuracy,
        "epoch_val_accuracy": [r.val_accuracy for r in reports],
        "epoch_seconds": [r.seconds for r in reports],
        "params": count_parameters(model),
        "kdsearch_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    save_checkpoint(out, model, result)
    return result


def run_teacher(config: TeacherConfig, out: str | None, *, progress: bool = False) -> dict[str, Any]:
    """`kdsearch teacher`: train and save a teacher; returns its metadata and path."""
    with about("out"):
        refuse_overwriting_inputs({"out": out}, (data_folder(config.data.dataset, config.data.data_dir),))
    device = resolve_device(config.device)
    data = config.data
    splits = splits_for(data)
    path = (
        Path(out) if out else default_teacher_path(splits, config.model, config.recipe, data.val_size, data.limit_train)
    )
    settings = {"val_size": data.val_size, "limit_train": data.limit_train, "data_dir": data.data_dir}
    result = train_teacher(
        splits.to(device), config.model, config.recipe, device, path, progress=progress, data_settings=settings
    )
    return result | {"checkpoint": str(path)}


def model_name_for(
    checkpoint_meta: dict[str, Any], given: str | None, source: str, fallback: str | None, field: str = "model"
) -> str:
    """The architecture to build for a checkpoint: the user's name (``field``), else a built-in or zoo one it records.

    A checkpoint never names code to run: a ``package.module:Class`` recorded in its metadata is
    not imported; the user must name it (``field``: ``model`` or ``teacher_model``) to run it. A
    recorded zoo name (``timm:resnet18``) builds library code the user installed, so it is used.
    """
    if given is not None:
        return given
    recorded = checkpoint_meta.get("model")
    if recorded is None:
        if fallback is None:
            raise ConfigError(
                field, f"must be given: checkpoint {source} names no model (deepnn, lightnn or pkg.mod:Class)"
            )
        return fallback
    if not isinstance(recorded, str) or not (recorded in REGISTERED or is_zoo_model(recorded)):
        raise ConfigError(
            field,
            f"must be given: checkpoint {source} was saved from model {str(recorded)[:80]!r}, which is not built in, "
            "and a checkpoint never chooses code to run",
        )
    return recorded


@dataclass
class LoadedTeacher:
    model: nn.Module
    path: Path
    checksum: str
    metadata: dict[str, Any]


def load_teacher(
    path: str | os.PathLike[str], model_name: str | None, splits: TensorSplits, device: torch.device
) -> LoadedTeacher:
    """Load a kdsearch teacher checkpoint or a tutorial-style state_dict, checked against the data."""
    checkpoint = load_checkpoint(path)
    meta = checkpoint.metadata
    name = model_name_for(meta, model_name, str(path), fallback=DEFAULT_TEACHER_MODEL, field="teacher_model")
    if meta.get("num_classes") not in (None, splits.num_classes):
        raise UserError(
            f"teacher {path} was trained for {meta['num_classes']} classes; this dataset has {splits.num_classes}"
        )
    model = build_model(
        name, num_classes=splits.num_classes, in_channels=splits.in_channels, image_size=splits.image_size
    )
    load_weights(model, checkpoint, source=str(path), model_name=name)
    broken = [
        key for key, tensor in model.state_dict().items() if tensor.is_floating_point() and not tensor.isfinite().all()
    ]
    if broken:
        # Its outputs would be NaN for every image, and every student's loss with them: not a learning rate problem.
        raise UserError(f"teacher {path} holds NaN or infinite weights ({broken[0]}); it cannot teach")
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedTeacher(prepare_module(model, device), Path(path), file_sha256(path), meta)


def ensure_default_teacher(
    data: DataConfig,
    model: str | None,
    preset: str,
    splits: TensorSplits,
    device: torch.device,
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """The dataset's default teacher for runs with ``data``'s validation split, trained once if missing.

    It trains with the ``preset`` recipe, so it lives where ``kdsearch teacher --preset P --val-size V``
    saves by default: training it ahead of a search is the same teacher.

    It holds out the same ``val_size`` validation rows as the run (the split is one seeded
    permutation), so a search never validates on images whose labels its teacher learnt. It trains
    on every other train row, so one teacher serves all runs on the split; only a quick run
    (``limit_train``) that finds no such teacher trains one on its own rows, named for them so it
    never stands in for a full one.
    """
    name = model or DEFAULT_TEACHER_MODEL
    recipe = preset_recipe(preset)
    path = default_teacher_path(splits, name, recipe, data.val_size)
    if path.exists():
        return path
    if data.limit_train is not None:
        path = default_teacher_path(splits, name, recipe, data.val_size, data.limit_train)
        rows = splits
    else:
        rows = splits_for(data, limit_train=False)
    if not path.exists():
        if log is not None:
            log(
                f"no {preset} teacher for this dataset and validation split yet: training one, once, on "
                f"{len(rows.train):,} images for {recipe.epochs} epochs (the bar shows the time left; "
                f"{{teacher}} uses another): {path}"
            )
        settings = {"val_size": data.val_size, "limit_train": data.limit_train}
        train_teacher(rows.to(device), name, recipe, device, path, progress=progress, data_settings=settings)
    return path
