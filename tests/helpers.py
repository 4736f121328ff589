"""Helpers the tests share: the CLI in-process, small run configs, short trainings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kdsearch.cli import main
from kdsearch.config import RecipeConfig, RunConfig
from kdsearch.data import Split
from kdsearch.distill import Prepared, StudentResult, train_student
from kdsearch.loop import EpochReport, fit, prepare_module
from kdsearch.losses.ce import CrossEntropy
from kdsearch.models import LightNN
from kdsearch.teacher import LoadedTeacher
from kdsearch.teacher_outputs import CachedOutputs, cached_teacher_outputs
from kdsearch.views import views_of
from kdsearch.weighted_sum import WeightedSum

CPU = torch.device("cpu")
# `make bench-gpu` runs the device tests with KDSEARCH_TEST_DEVICE=cuda; everywhere else they run on the CPU.
TEST_DEVICE = torch.device(os.environ.get("KDSEARCH_TEST_DEVICE", "cpu"))
RECIPE_FIELDS = set(RecipeConfig.__dataclass_fields__)


def run_cli(args: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``kdsearch ARGS`` in-process; returns (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()} if path.exists() else set()


def pattern_config(folder: Path, teacher: Path | None = None, **values: Any) -> RunConfig:
    """A run on the generated pattern folder: 50 validation images, CPU, one epoch of batch 64.

    ``values`` are knobs by name, ``method``, or ``hyperparameters`` (the method's own values).
    """
    settings: dict[str, Any] = {
        "dataset": "imagefolder",
        "data_dir": str(folder),
        "val_size": 50,
        "epochs": 1,
        "batch_size": 64,
        "device": "cpu",
        "teacher": str(teacher) if teacher is not None else None,
    }
    return RunConfig.from_flat(settings | values, origin="of a test")


def train_with(prepared: Prepared, **values: Any) -> StudentResult:
    """``train_student`` with some knobs or hyperparameters of the prepared config replaced."""
    return train_student(prepared, prepared.config.with_values(values))


def fit_tiny(
    train: Split,
    model: nn.Module | None = None,
    loss_fn: nn.Module | None = None,
    device: torch.device = CPU,
    **settings: Any,
) -> list[EpochReport]:
    """``fit`` on CPU with small defaults (1 epoch, batch 64, lr 1e-3, seed 0): a LightNN on CE unless given.

    Recipe fields among ``settings`` go to the recipe, the rest (val, teacher…) to ``fit``.
    """
    recipe = RecipeConfig(
        **({"epochs": 1, "batch_size": 64, "seed": 0} | {k: v for k, v in settings.items() if k in RECIPE_FIELDS})
    )
    model = model if model is not None else prepare_module(LightNN(), device)
    loss_fn = loss_fn if loss_fn is not None else WeightedSum([(1.0, CrossEntropy())])
    rest = {k: v for k, v in settings.items() if k not in RECIPE_FIELDS}
    return fit(model, loss_fn, train, recipe, device=device, **rest)


def outputs_of(teacher: LoadedTeacher, splits: Any, layer: str | None, augment: str = "none") -> CachedOutputs:
    """The teacher's cached outputs on the CPU for the views of ``augment`` (built on first use)."""
    return cached_teacher_outputs(teacher.model, teacher.checksum, splits, layer, CPU, views_of(augment))
