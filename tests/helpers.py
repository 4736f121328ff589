"""Helpers the tests share: the CLI in-process and in child processes, small run configs, short
trainings, and a stub trainer that stands in for training in the study-level tests.

Test modules import from here (and only from here) in the tests package; no test module imports another.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.distributions import distribution_to_json
from optuna.trial import TrialState
from torch import nn

from kdsearch.cli import main
from kdsearch.config import KNOBS, RecipeConfig, RunConfig
from kdsearch.data import Split, TensorSplits
from kdsearch.distill import Prepared, StudentResult, build_student, train_student
from kdsearch.loop import EpochReport, fit, prepare_module
from kdsearch.losses import LossInputs
from kdsearch.losses.ce import CrossEntropy
from kdsearch.models import LightNN, count_parameters
from kdsearch.spaces import default_space
from kdsearch.strategies import get_strategy
from kdsearch.teacher import LoadedTeacher
from kdsearch.teacher_outputs import CachedOutputs, TeacherOutputs, cached_teacher_outputs
from kdsearch.views import IDENTITY, views_of
from kdsearch.weighted_sum import WeightedSum
from tests.stalling_model import MODEL as STALLING_MODEL
from tests.stalling_model import STALL_VARIABLE

__all__ = ["STALLING_MODEL", "STALL_VARIABLE"]

CPU = torch.device("cpu")
# `make bench-gpu` runs the device tests with KDSEARCH_TEST_DEVICE=cuda; everywhere else they run on the CPU.
TEST_DEVICE = torch.device(os.environ.get("KDSEARCH_TEST_DEVICE", "cpu"))
RECIPE_FIELDS = set(RecipeConfig.__dataclass_fields__)
POSTGRES_URL = os.environ.get("KDSEARCH_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
CLASSES = [f"class{i}" for i in range(10)]


def run_cli(args: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``kdsearch ARGS`` in-process; returns (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def optimize_args(folder: Any, teacher: Any, *extra: Any, method: str = "kd", epochs: int = 1) -> list[str]:
    """`kdsearch optimize` on an image folder: 50 validation images, batch 64, quiet; ``extra`` last, so it wins."""
    args: list[Any] = ["optimize", "--method", method, "--dataset", "imagefolder", "--data-dir", folder]
    args += ["--val-size", "50", "--epochs", epochs, "--batch-size", "64", "-q"]
    if teacher is not None:
        args += ["--teacher", teacher]
    return [str(a) for a in (*args, *extra)]


def load_study(home: Path, name: str) -> optuna.Study:
    """A study of the default storage of the studies home ``home``."""
    return optuna.load_study(study_name=name, storage=f"sqlite:///{home / 'kdsearch.db'}")


def check_new_study(home: Path, out: str, method: str, trials: int, epochs: int) -> optuna.Study:
    """What every new study of ``optimize --json`` (default space and name, tutorial LightNN) records; returns it.

    Its trials are finished, the best is the summary's, each trial searched the method's default space
    and reported every epoch, the study's attributes hold its config, and trial 0 is the tutorial's
    hand-set config (so the search never ends below it on validation).
    """
    summary = json.loads(out)
    assert summary["study_name"] == f"{method}-imagefolder"
    study = load_study(home, summary["study_name"])
    found = study.get_trials()
    assert len(found) == trials and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in found)
    best, strategy = study.best_trial, get_strategy(method)
    space = default_space(strategy)
    assert summary["best_value"] == best.value == max(t.value for t in found if t.state == TrialState.COMPLETE)
    assert set(best.params) == set(space) and {"optimizer", "weight_decay", "label_smoothing"} <= set(space)
    assert len(best.user_attrs["epoch_val_accuracy"]) == epochs and len(best.user_attrs["epoch_seconds"]) == epochs
    assert best.intermediate_values.keys() == set(range(1, epochs + 1))
    assert best.user_attrs["params"] == 267_738 and best.user_attrs["seed"] == 42  # the tutorial's LightNN
    attrs = study.user_attrs
    assert attrs["method"] == method and attrs["epochs"] == epochs and attrs["dataset"] == "imagefolder"
    assert attrs["val_size"] == 50 and attrs["objectives"] == ["accuracy"] and attrs["kdsearch_version"]
    assert attrs["search_space"] == {name: distribution_to_json(d) for name, d in space.items()}
    tutorial = strategy.tutorial() | {name: getattr(RecipeConfig(), name) for name in space if name in KNOBS}
    assert found[0].user_attrs["baseline"] == "tutorial" and found[0].params["lr"] == 1e-3
    assert found[0].params == tutorial
    assert not any("baseline" in t.user_attrs for t in found[1:])
    return study


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
    views = views_of(augment, splits.train.population)
    return cached_teacher_outputs(teacher.model, teacher.checksum, splits, layer, CPU, views)


# --- child processes ------------------------------------------------------------------------------


def spawn(args: list[Any], home: Path, stall: Path | None = None) -> subprocess.Popen:
    """Run the CLI in a child process; with `stall`, its first training step blocks (see stalling_model)."""
    env = {**os.environ, "KDSEARCH_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop(STALL_VARIABLE, None)
    if stall is not None:
        env[STALL_VARIABLE] = str(stall)
    return subprocess.Popen(
        [sys.executable, "-m", "kdsearch", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_stall(marker: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Block until the child is inside a trial's training loop, where the stalling student holds it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if marker.exists():
            return
        time.sleep(0.1)
    raise AssertionError("no trial reached its training loop in time")


def postgres_available() -> bool:
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(POSTGRES_URL).connect():
            return True
    except Exception:  # noqa: BLE001
        return False


# --- the stub trainer -----------------------------------------------------------------------------


def stub_splits(val_size: int, fingerprint: str) -> TensorSplits:
    """Eight noise images per split, 32x32 RGB in ten classes: enough to build, save and time a student."""
    generator = torch.Generator().manual_seed(0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def split(rows: int) -> Split:
        pixels = torch.randint(0, 256, (rows, 3, 32, 32), dtype=torch.uint8, generator=generator)
        return Split(pixels, torch.arange(rows) % 10, torch.arange(rows), mean, std)

    val = split(8) if val_size else None
    return TensorSplits("imagefolder", split(8), val, split(8), CLASSES, mean, std, fingerprint)


def default_val(config: RunConfig) -> float:
    """A validation accuracy that rises with the learning rate (30 % at 1e-4, 50 % at 1e-2) and the seed."""
    return 30.0 + 10.0 * math.log10(config.recipe.lr / 1e-4) + 0.1 * (config.recipe.seed - 42)


@dataclass
class StubTrainer:
    """Stands in for ``prepare`` and ``train_student`` (and confirm's ``evaluate``) where a test is about a study.

    A run's final validation accuracy is ``val(config)``, reached in equal steps over its epochs (each
    reported, as training reports them); its test accuracy is ``test(config)``. The student is the
    run's real architecture, untrained, so parameter counts, checkpoints and latency are real. Every
    run's config is kept in ``runs``. ``val`` may raise (a ``DivergedError``) to make a run fail.
    """

    val: Callable[[RunConfig], float] = default_val
    test: Callable[[RunConfig], float] = lambda config: default_val(config) - 1.0
    fingerprint: str = "stub-data"
    teacher_checksum: str = "stub-teacher"
    teacher_val_size: int = 50  # the validation rows the teacher was held out of
    runs: list[RunConfig] = field(default_factory=list)

    def prepare(self, config: RunConfig, *, methods: tuple[str, ...] = (), **_: Any) -> Prepared:
        splits = stub_splits(config.data.val_size, self.fingerprint)
        if not any(get_strategy(m).uses_teacher for m in methods or (config.method,)):
            return Prepared(config, CPU, splits)
        outputs = TeacherOutputs((IDENTITY,), (torch.zeros(len(splits.train), 10),), None, None)
        path = Path(config.models.teacher) if config.models.teacher else None
        metadata = {"data": {"val_size": self.teacher_val_size}}
        return Prepared(config, CPU, splits, outputs, path, self.teacher_checksum, 0.0, metadata)

    def train_student(
        self,
        prepared: Prepared,
        config: RunConfig | None = None,
        *,
        on_epoch: Callable[[EpochReport], None] | None = None,
        progress: bool = False,
    ) -> StudentResult:
        config = config or prepared.config
        self.runs.append(config)
        final, epochs = self.val(config), config.recipe.epochs
        model = build_student(config, prepared.splits)
        model.stub_test_accuracy = self.test(config)  # type: ignore[assignment]
        reports = []
        for epoch in range(1, epochs + 1):
            accuracy = final * epoch / epochs if epoch < epochs else final  # the last one exactly ``val``
            reports.append(EpochReport(epoch, 1.0 / epoch, accuracy, 0.001))
            if on_epoch is not None:
                on_epoch(reports[-1])
        return StudentResult(model, config, reports, count_parameters(model))

    @staticmethod
    def evaluate(model: nn.Module, split: Split, device: torch.device) -> float:
        return float(model.stub_test_accuracy)  # type: ignore[arg-type]

    def install(self, monkeypatch: pytest.MonkeyPatch) -> StubTrainer:
        """Patch the names the search and confirm modules call; returns itself."""
        import kdsearch.confirm
        import kdsearch.objective
        import kdsearch.study

        monkeypatch.setattr(kdsearch.study, "prepare", self.prepare)
        monkeypatch.setattr(kdsearch.study, "check_loss_shapes", lambda prepared, method=None: None)
        monkeypatch.setattr(kdsearch.objective, "train_student", self.train_student)
        monkeypatch.setattr(kdsearch.confirm, "prepare", self.prepare)
        monkeypatch.setattr(kdsearch.confirm, "train_student", self.train_student)
        monkeypatch.setattr(kdsearch.confirm, "evaluate", self.evaluate)
        # A reused search trial's student is "tested" as the stub tests a run of its config.
        monkeypatch.setattr(
            kdsearch.confirm, "_tested_artifact", lambda prepared, config, artifact, sha256: self.test(config)
        )
        return self


class RecordingStudent(nn.Module):
    """A tiny student that keeps every training batch it is fed (the images after augmentation)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 10)
        self.batches: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.batches.append(images.detach().clone())
        return self.head(images.mean(dim=(2, 3)))


class RecordingLogitsLoss(nn.Module):
    """Cross-entropy that keeps the teacher logits the loop paired with each batch."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher_logits: list[torch.Tensor] = []

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        assert inputs.teacher_logits is not None and inputs.teacher_features is None
        self.teacher_logits.append(inputs.teacher_logits.clone())
        return nn.functional.cross_entropy(inputs.student_logits, inputs.labels)
