"""The teacher: train it once per dataset, load it safely, and cache its outputs once per study.

Every trial of a study distils from the same frozen teacher on the same images, so its logits and
tapped features are computed once per (teacher checkpoint content, dataset, train rows, layer,
normalisation, view), written atomically under ``<home>/cache/teacher/`` behind a file lock, and
indexed by row in the loop. A cache whose key or shapes do not match is rebuilt. Augmentation is a
fixed set of views (``flip``: the image and its mirror), so the teacher's outputs are cached once
per view too and never computed live.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn

from kdsearch import __version__
from kdsearch.checkpoints import load_checkpoint, load_weights, save_checkpoint
from kdsearch.data import TensorSplits
from kdsearch.errors import UserError
from kdsearch.fsutil import atomic_write, file_sha256
from kdsearch.loop import TeacherOutputs, compute_teacher_outputs, evaluate, fit, prepare_module
from kdsearch.models import build_model, count_parameters
from kdsearch.strategies import get_strategy

CACHE_FORMAT = "kdsearch-teacher-outputs/1"


@dataclass(frozen=True)
class TeacherRecipe:
    """How the tutorial trains its teacher: 10 epochs of Adam at 1e-3, batch 128, seed 42."""

    model: str = "deepnn"
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 42

    def is_tutorial(self) -> bool:
        return self == TeacherRecipe(model=self.model)


def home_dir() -> Path:
    """Where studies, artifacts, teachers and caches live (``KDSEARCH_HOME``, default ``studies``)."""
    return Path(os.environ.get("KDSEARCH_HOME", "studies"))


def cache_dir() -> Path:
    return home_dir() / "cache"


def default_teacher_path(
    splits: TensorSplits, recipe: TeacherRecipe, val_size: int = 0, limit_train: int | None = None
) -> Path:
    """One teacher per dataset content, recipe and held-out validation size, reused by every study.

    ``val_size`` is part of the name because a search must not validate on images its teacher was
    trained on (the teacher's outputs would carry their labels): a search with ``--val-size V``
    gets a teacher trained without those V rows, a re-train on the whole split (V = 0) another.
    A teacher trained on a ``limit_train`` subset is named for it, so it never stands in for a full one.
    """
    name = f"{recipe.model.replace(':', '_').replace('.', '_')}-{splits.dataset}-{splits.fingerprint}"
    if not recipe.is_tutorial():
        digest = hashlib.sha256(repr(recipe).encode()).hexdigest()[:8]
        name += f"-{digest}"
    if val_size:
        name += f"-val{val_size}"
    if limit_train is not None:
        name += f"-limit{limit_train}"
    return home_dir() / "teachers" / f"{name}.pt"


def train_teacher(
    splits: TensorSplits,
    recipe: TeacherRecipe,
    device: torch.device,
    out: Path,
    *,
    progress: bool = False,
    data_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a teacher with cross-entropy through the shared loop; save weights + metadata atomically."""
    torch.manual_seed(recipe.seed)
    model = build_model(
        recipe.model, num_classes=splits.num_classes, in_channels=splits.in_channels, image_size=splits.image_size
    )
    model = prepare_module(model, device)
    loss_fn = get_strategy("ce").build_loss({"lr": recipe.lr}, None, None)
    reports = fit(
        model,
        loss_fn,
        splits.train,
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        seed=recipe.seed,
        device=device,
        val=splits.val,
        progress=progress,
    )
    test_accuracy = evaluate(model, splits.test, device)
    result = {
        "kind": "teacher",
        "model": recipe.model,
        "dataset": splits.dataset,
        "data_fingerprint": splits.fingerprint,
        "classes": splits.classes,
        "num_classes": splits.num_classes,
        "in_channels": splits.in_channels,
        "image_size": list(splits.image_size),
        "mean": list(splits.mean),
        "std": list(splits.std),
        "recipe": {"epochs": recipe.epochs, "lr": recipe.lr, "batch_size": recipe.batch_size, "seed": recipe.seed},
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
    name = model_name or checkpoint.metadata.get("model", "deepnn")
    meta = checkpoint.metadata
    if meta.get("num_classes") not in (None, splits.num_classes):
        raise UserError(
            f"teacher {path} was trained for {meta['num_classes']} classes; this dataset has {splits.num_classes}"
        )
    model = build_model(
        name, num_classes=splits.num_classes, in_channels=splits.in_channels, image_size=splits.image_size
    )
    load_weights(model, checkpoint, source=str(path), model_name=name)
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedTeacher(prepare_module(model, device), Path(path), file_sha256(path), meta)


VIEWS = ("identity", "mirrored")


def teacher_outputs_key(teacher: LoadedTeacher, splits: TensorSplits, layer: str | None, view: str = "identity") -> str:
    """Everything the cached outputs depend on; any change gives a new key and a fresh cache."""
    parts = {
        "format": CACHE_FORMAT,
        "teacher_sha256": teacher.checksum,
        "teacher_model": type(teacher.model).__module__ + "." + type(teacher.model).__qualname__,
        "dataset": splits.dataset,
        "data_fingerprint": splits.fingerprint,
        "train_rows": splits.train_index_digest(),
        "mean": list(splits.mean),
        "std": list(splits.std),
        "layer": layer,
        "view": view,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _read_cache(path: Path, key: str, rows: int, layer: str | None) -> TeacherOutputs | None:
    try:
        # Memory-mapped: worker processes on one machine share the pages instead of each holding a copy.
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if blob.get("format") != CACHE_FORMAT or blob.get("key") != key:
            return None
        logits, features = blob["logits"], blob.get("features")
        if logits.shape[0] != rows or (layer is not None and (features is None or features.shape[0] != rows)):
            return None
        return TeacherOutputs(logits, features, layer)
    except Exception:  # noqa: BLE001 - truncated or corrupt: rebuild rather than trust it
        return None


@dataclass
class CachedOutputs:
    outputs: TeacherOutputs
    seconds: float  # spent computing or loading
    built: bool  # True when this call ran the teacher (no usable cache existed)


def teacher_outputs(
    teacher: LoadedTeacher, splits: TensorSplits, layer: str | None, device: torch.device, *, mirrored: bool = False
) -> CachedOutputs:
    """Teacher outputs for ``splits.train`` (on ``device``), from the cache or computed once and cached.

    With ``mirrored`` the outputs for the flipped images come along (``.mirrored``), for runs with
    flip augmentation. A file lock makes concurrent builders (worker processes) wait for the first
    one's cache rather than compute it again; the cache is written atomically, so a crash never
    leaves a partial file.
    """
    start = time.perf_counter()
    outputs, built = _view_outputs(teacher, splits, layer, device, "identity")
    if mirrored:
        outputs.mirrored, built_mirror = _view_outputs(teacher, splits, layer, device, "mirrored")
        built = built or built_mirror
    return CachedOutputs(outputs.to(device), time.perf_counter() - start, built)


def _view_outputs(
    teacher: LoadedTeacher, splits: TensorSplits, layer: str | None, device: torch.device, view: str
) -> tuple[TeacherOutputs, bool]:
    key = teacher_outputs_key(teacher, splits, layer, view)
    path = cache_dir() / "teacher" / f"{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = len(splits.train)
    with FileLock(str(path) + ".lock"):
        outputs = _read_cache(path, key, rows, layer) if path.exists() else None
        if outputs is not None:
            return outputs, False
        outputs = compute_teacher_outputs(
            teacher.model, splits.train.images, layer, device, mirrored=view == "mirrored"
        )
        blob = {"format": CACHE_FORMAT, "key": key, "logits": outputs.logits, "features": outputs.features}
        atomic_write(path, lambda tmp: torch.save(blob, tmp))
        return outputs, True
