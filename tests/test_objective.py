"""One trial (``kdsearch.objective.Objective``) on Optuna's ask-and-tell interface and the stub trainer:
what it reports and returns, when it is pruned, which students it keeps. Each test runs in milliseconds."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from kdsearch.artifacts import ArtifactDirectory
from kdsearch.config import RunConfig
from kdsearch.distill import Prepared
from kdsearch.errors import DivergedError
from kdsearch.objective import Objective
from kdsearch.spaces import build_space
from kdsearch.strategies import get_strategy
from tests.helpers import StubTrainer

EPOCHS = 3


@pytest.fixture()
def prepared(stub: StubTrainer) -> Prepared:
    return stub.prepare(RunConfig().with_values({"epochs": EPOCHS, "val_size": 50}))


def objective_for(prepared: Prepared, root: Path, *objectives: str, fixes: dict | None = None) -> Objective:
    space = build_space(get_strategy(prepared.config.method), None, fixes or {}, search_width=len(objectives) > 1)
    return Objective(prepared, space, ArtifactDirectory(root, study_name="unit"), objectives or ("accuracy",))


def diverges(config: RunConfig) -> float:
    raise DivergedError(1, 4, math.nan)


def test_a_trial_reports_every_epoch_and_returns_the_last_accuracy(
    prepared: Prepared, stub: StubTrainer, tmp_path: Path
) -> None:
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    value = objective_for(prepared, tmp_path)(trial)
    study.tell(trial, value)
    (run,) = stub.runs
    assert run == prepared.config.with_values(trial.params)  # the trial's values on the study's config
    final = stub.val(run)
    (frozen,) = study.trials
    assert value == final and frozen.intermediate_values == {1: final / 3, 2: final * 2 / 3, 3: final}
    assert frozen.user_attrs["epoch_val_accuracy"] == [final / 3, final * 2 / 3, final]
    assert len(frozen.user_attrs["epoch_seconds"]) == EPOCHS
    assert frozen.user_attrs["seed"] == 42 and frozen.user_attrs["pinned"] == {}
    assert frozen.user_attrs["params"] == 267_738


def test_a_pruner_stops_the_trial_after_the_epoch_it_judges(prepared: Prepared, tmp_path: Path) -> None:
    # Below 1000 % is below the threshold at every epoch; the warm-up spares the first.
    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=1000.0, n_warmup_steps=2)
    )
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned, match=r"^pruned at epoch 2 with \d+\.\d\d%$"):
        objective_for(prepared, tmp_path)(trial)
    study.tell(trial, state=TrialState.PRUNED)
    (frozen,) = study.trials
    assert frozen.last_step == 2 and len(frozen.user_attrs["epoch_val_accuracy"]) == 2
    assert "artifact_id" not in frozen.user_attrs


def test_a_multi_objective_trial_is_never_pruned_and_returns_every_objective(
    prepared: Prepared, stub: StubTrainer, tmp_path: Path
) -> None:
    study = optuna.create_study(
        directions=["maximize", "minimize"], pruner=optuna.pruners.ThresholdPruner(lower=1000.0)
    )
    trial = study.ask()
    accuracy, params = objective_for(prepared, tmp_path, "accuracy", "params")(trial)
    assert accuracy == stub.val(stub.runs[0]) and params == float(trial.user_attrs["params"])
    assert trial.params["width"] == stub.runs[0].models.width  # a size search draws the width
    assert study.trials[0].intermediate_values == {}  # nothing reported: Optuna prunes one objective only


def test_a_diverged_run_is_pruned_with_its_reason(prepared: Prepared, stub: StubTrainer, tmp_path: Path) -> None:
    stub.val = diverges
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned, match="training diverged at epoch 1, step 4"):
        objective_for(prepared, tmp_path)(trial)
    assert "diverged at epoch 1" in study.trials[0].user_attrs["failure"]


def test_a_diverged_multi_objective_run_fails_with_its_reason(
    prepared: Prepared, stub: StubTrainer, tmp_path: Path
) -> None:
    stub.val = diverges
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    with pytest.raises(DivergedError):  # Optuna cannot prune it: the trial fails, its reason recorded
        objective_for(prepared, tmp_path, "accuracy", "params")(trial)
    assert "diverged at epoch 1" in study.trials[0].user_attrs["failure"]


def test_only_a_trial_better_than_every_finished_one_keeps_its_student(
    prepared: Prepared, stub: StubTrainer, tmp_path: Path
) -> None:
    values = iter([50.0, 40.0, 60.0, 60.0])
    stub.val = lambda config: next(values)
    study = optuna.create_study(direction="maximize")
    objective = objective_for(prepared, tmp_path)
    for _ in range(4):
        trial = study.ask()
        study.tell(trial, objective(trial))
    kept = [t.user_attrs.get("artifact_id") for t in study.trials]
    assert [artifact is not None for artifact in kept] == [True, False, True, False]  # a tie is not better
    assert {p.name for p in (tmp_path / "unit").iterdir()} == {kept[0], kept[2]}


@pytest.mark.parametrize(("other", "kept"), [([70.0, 100.0], False), ([50.0, 1e6], True), ([60.0, 267_738.0], True)])
def test_a_multi_objective_trial_keeps_its_student_when_no_finished_trial_dominates_it(
    other: list[float], kept: bool, prepared: Prepared, stub: StubTrainer, tmp_path: Path
) -> None:
    stub.val = lambda config: 60.0
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(optuna.create_trial(values=other))
    trial = study.ask()
    objective = objective_for(prepared, tmp_path, "accuracy", "params", fixes={"width": 1.0})  # 267,738 parameters
    assert objective(trial) == (60.0, 267_738.0)
    assert ("artifact_id" in trial.user_attrs) is kept  # equal on both objectives dominates nothing


def test_a_latency_objective_is_the_measured_milliseconds(prepared: Prepared, tmp_path: Path) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    accuracy, latency = objective_for(prepared, tmp_path, "accuracy", "latency")(trial)
    assert latency == trial.user_attrs["latency_ms"] > 0 and accuracy > 0


def test_pinned_values_reach_the_run_and_are_recorded(prepared: Prepared, stub: StubTrainer, tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    objective_for(prepared, tmp_path, fixes={"lr": 0.003, "temperature": 4.0})(trial)
    assert "lr" not in trial.params and "temperature" not in trial.params
    assert trial.user_attrs["pinned"] == {"lr": 0.003, "temperature": 4.0}
    assert stub.runs[0].recipe.lr == 0.003 and stub.runs[0].loss.params["temperature"] == 4.0


def test_the_last_epoch_is_never_pruned(prepared: Prepared, tmp_path: Path) -> None:
    """After the last epoch pruning saves nothing: the trial completes with its value (ASHA's rung may be there)."""
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=1000.0))
    with pytest.raises(optuna.TrialPruned, match=r"^pruned at epoch 1 "):
        objective_for(prepared, tmp_path)(study.ask())  # three epochs: pruned after the first
    one_epoch = dataclasses.replace(prepared, config=prepared.config.with_values({"epochs": 1}))
    assert isinstance(objective_for(one_epoch, tmp_path)(study.ask()), float)  # one epoch: it completes
