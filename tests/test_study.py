"""A study's own logic on the stub trainer: what it records, its identity, the baseline trial, --total,
samplers and pruners, pruning and failures, listings. No image is trained on here (see tests.helpers.StubTrainer)."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from kdsearch.config import RecipeConfig, RunConfig
from kdsearch.distill import Prepared
from kdsearch.errors import DivergedError
from kdsearch.samplers import make_pruner
from kdsearch.search_config import SearchConfig
from kdsearch.strategies import METHODS, get_strategy
from kdsearch.study import teacher_saw_validation
from tests.helpers import CPU, StubTrainer, check_new_study, load_study, run_cli, stub_splits

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# The tutorial's hand-set kd run, as the search space names it (lr pinned by the test that uses it).
KD_TUTORIAL = {
    "optimizer": "adam",
    "lr_schedule": "constant",
    "weight_decay": 0.0,
    "label_smoothing": 0.0,
    "augment": "none",
    "temperature": 2.0,
    "soft_target_weight": 0.25,
}


@pytest.mark.parametrize("method", METHODS)
def test_a_study_records_its_config_and_starts_from_the_tutorial(method: str, search, home: Path) -> None:
    code, out, err = search("--trials", "3", "--json", method=method, epochs=2)
    assert code == 0, err
    attrs = check_new_study(home, out, method, trials=3, epochs=2).user_attrs
    assert attrs["data_fingerprint"] == "stub-data"  # what prepare found, recorded
    assert attrs["teacher_sha256"] == ("stub-teacher" if get_strategy(method).uses_teacher else None)


def test_the_baseline_trial_holds_the_tutorials_values_and_comes_once(search, home: Path, stub: StubTrainer) -> None:
    assert search("--trials", "2", "--fix", "lr=0.003", "--study-name", "b")[0] == 0
    first = load_study(home, "b").get_trials()[0]
    # lr is pinned, so it is no parameter of the baseline; every searched one holds the tutorial's value.
    assert first.user_attrs["baseline"] == "tutorial" and first.params == KD_TUTORIAL
    assert first.user_attrs["pinned"] == {"lr": 0.003}
    assert stub.runs[0].recipe == RecipeConfig(epochs=1, batch_size=64, lr=0.003)
    assert dict(stub.runs[0].loss.params) == {"temperature": 2.0, "soft_target_weight": 0.25}
    assert search("--trials", "1", "--study-name", "b")[0] == 0  # a study that has trials gets no second baseline
    assert [("baseline" in t.user_attrs) for t in load_study(home, "b").get_trials()] == [True, False, False]
    assert search("--trials", "1", "--no-baseline", "--study-name", "plain")[0] == 0
    assert "baseline" not in load_study(home, "plain").get_trials()[0].user_attrs


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [
        ("--epochs", "2", "epochs=1, not 2"),
        ("--batch-size", "32", "batch_size=64, not 32"),
        ("--val-size", "60", "val_size=50, not 60"),
        ("--width", "0.5", "width=1.0, not 0.5"),
        ("--student-model", "deepnn", "student_model='lightnn', not 'deepnn'"),
        ("--method", "dkd", "method='kd', not 'dkd'"),
        ("--objectives", "accuracy,params", "objectives=['accuracy'], not ['accuracy', 'params']"),
    ],
)
def test_a_run_of_another_identity_is_refused_and_adds_nothing(
    flag: str, value: str, said: str, search, home: Path, stub: StubTrainer
) -> None:
    assert search("--trials", "1", "--study-name", "s")[0] == 0
    code, out, err = search("--trials", "1", "--study-name", "s", flag, value)
    assert (code, out) == (2, "")
    assert err == f"kdsearch: error: --study-name 's' names a study created with {said}; choose another\n"
    assert len(load_study(home, "s").get_trials()) == 1 and len(stub.runs) == 1


def test_other_data_or_another_teacher_is_refused(search, home: Path, stub: StubTrainer) -> None:
    assert search("--trials", "1", "--study-name", "s")[0] == 0
    stub.fingerprint = "other-data"  # the same folder name, other images
    code, _, err = search("--trials", "1", "--study-name", "s")
    assert code == 2 and "created with data_fingerprint='stub-data', not 'other-data'" in err
    stub.fingerprint, stub.teacher_checksum = "stub-data", "another-teacher"
    code, _, err = search("--trials", "1", "--study-name", "s")
    assert code == 2 and "created with teacher_sha256='stub-teacher', not 'another-teacher'" in err
    assert len(load_study(home, "s").get_trials()) == 1


def test_the_same_identity_joins_whatever_else_changes(search, home: Path, stub: StubTrainer) -> None:
    assert search("--trials", "1", "--study-name", "s")[0] == 0
    created = load_study(home, "s").user_attrs
    joined = ["--sampler", "random", "--pruner", "none", "--fix", "lr=0.005", "--seed", "7", "--heartbeat", "5"]
    code, _, err = search("--trials", "2", "--study-name", "s", *joined)
    assert code == 0, err
    study = load_study(home, "s")
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    assert [t.user_attrs["pinned"] for t in trials] == [{}, {"lr": 0.005}, {"lr": 0.005}]
    assert [t.user_attrs["seed"] for t in trials] == [42, 7, 7] and "lr" not in trials[1].params
    assert study.user_attrs == created  # a run that joins leaves the study's record as it was


def test_total_runs_until_the_study_holds_that_many_finished_trials(search, home: Path, stub: StubTrainer) -> None:
    base = ("--study-name", "t", "--pruner", "none")
    assert search(*base, "--trials", "2")[0] == 0
    calls = iter(range(100))

    def first_diverges(config: RunConfig) -> float:
        if next(calls) == 0:
            raise DivergedError(1, 2, math.nan)
        return 40.0

    stub.val = first_diverges  # a pruned trial is finished too
    code, out, err = search(*base, "--trials", "5", "--total", "--json")
    assert code == 0, err
    assert [t.state for t in load_study(home, "t").get_trials()] == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED] + [
        TrialState.COMPLETE
    ] * 2
    assert json.loads(out)["complete"] == 4 and json.loads(out)["pruned"] == 1
    trained = len(stub.runs)
    assert search(*base, "--trials", "4", "--total")[0] == 0  # already past its total: runs nothing
    assert len(stub.runs) == trained and len(load_study(home, "t").get_trials()) == 5
    assert search(*base, "--trials", "2")[0] == 0  # without --total, N more trials
    assert len(load_study(home, "t").get_trials()) == 7


def test_a_trial_below_the_median_is_pruned_at_its_first_epoch(search, home: Path, stub: StubTrainer) -> None:
    stub.val = lambda config: 10.0 if config.recipe.lr < 1e-6 else 60.0
    base = ("--pruner-startup", "2", "--pruner-warmup", "0", "--study-name", "prune")
    assert search(*base, "--trials", "2", "--fix", "lr=0.003", epochs=2)[0] == 0
    assert search(*base, "--trials", "1", "--fix", "lr=1e-7", epochs=2)[0] == 0
    trials = load_study(home, "prune").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[2].user_attrs["pinned"]["lr"] == 1e-7 and trials[2].last_step == 1
    assert trials[2].intermediate_values == {1: 5.0} and trials[0].intermediate_values == {1: 30.0, 2: 60.0}


def test_a_diverging_trial_is_pruned_with_the_reason(search, home: Path, stub: StubTrainer) -> None:
    calls = iter([True, False])

    def sometimes_diverges(config: RunConfig) -> float:
        if next(calls):
            raise DivergedError(1, 3, math.nan)
        return 50.0

    stub.val = sometimes_diverges
    code, _, err = search("--trials", "2")
    assert code == 0, err
    first, second = load_study(home, "kd-imagefolder").get_trials()
    assert first.state == TrialState.PRUNED and "diverged at epoch 1" in first.user_attrs["failure"]
    assert second.state == TrialState.COMPLETE and second.value == 50.0


@pytest.mark.parametrize(
    ("sampler", "pruner", "pruner_class"),
    [
        ("random", "percentile", optuna.pruners.PercentilePruner),
        ("cmaes", "hyperband", optuna.pruners.HyperbandPruner),
        ("grid", "none", optuna.pruners.NopPruner),
        ("tpe", "median", optuna.pruners.MedianPruner),
    ],
)
def test_every_sampler_and_pruner_runs_a_study(
    sampler: str, pruner: str, pruner_class: type, search, home: Path
) -> None:
    assert isinstance(make_pruner(SearchConfig(trials=1, pruner=pruner), epochs=2), pruner_class)
    pins = ["--fix", "optimizer=adam", "--fix", "weight_decay=0", "--fix", "label_smoothing=0", "--fix", "augment=none"]
    code, _, err = search("--trials", "3", "--sampler", sampler, "--pruner", pruner, "--sampler-seed", "3", *pins,
                          method="ce", epochs=2)  # fmt: skip
    assert code == 0, err
    trials = load_study(home, "ce-imagefolder").get_trials()
    assert len(trials) == 3 and all(t.state in FINISHED for t in trials)
    lrs = [t.params["lr"] for t in trials]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs)
    if sampler == "grid":  # no baseline trial; every trial a distinct point of the grid
        grid = [1e-4, 10 ** (-4 + 2 / 3), 10 ** (-4 + 4 / 3), 1e-2]
        assert len({(t.params["lr"], t.params["lr_schedule"]) for t in trials}) == 3
        assert all(any(lr == pytest.approx(point) for point in grid) for lr in lrs)
        assert not any("baseline" in t.user_attrs for t in trials)
    else:
        assert trials[0].user_attrs["baseline"] == "tutorial" and len(set(lrs)) == 3


def test_random_sampler_seed_makes_a_study_repeatable(search, home: Path) -> None:
    """--sampler-seed fixes the proposals; without it each process draws its own seed."""

    def proposals(name: str, *seed: str) -> list[dict]:
        assert search("--trials", "2", "--sampler", "random", "--no-baseline", "--study-name", name, *seed)[0] == 0
        return [t.params for t in load_study(home, name).get_trials()]

    assert proposals("a", "--sampler-seed", "5") == proposals("b", "--sampler-seed", "5")
    assert proposals("c") != proposals("d")


def test_timeout_alone_bounds_a_study(search, home: Path) -> None:
    code, out, err = search("--timeout", "0.5", "--json", method="ce")
    assert code == 0, err
    trials = load_study(home, "ce-imagefolder").get_trials()
    # Optuna checks the timeout between trials: at least the first trial runs, none is left running.
    assert len(trials) >= 1 and all(t.state in FINISHED for t in trials)
    summary = json.loads(out)
    assert summary["complete"] + summary["pruned"] == len(trials) and summary["running"] == 0


def test_latency_objective_is_measured_and_minimised(search, home: Path) -> None:
    code, out, err = search("--trials", "2", "--objectives", "accuracy,latency", "--json")
    assert code == 0, err
    study = load_study(home, "kd-imagefolder")
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert study.metric_names == ["accuracy", "latency"]
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        assert trial.values[1] == trial.user_attrs["latency_ms"] > 0
        assert 0.25 <= trial.params["width"] <= 2.0  # a size objective searches the width
    assert json.loads(out)["objectives"] == ["accuracy", "latency"]


def test_studies_listing_formats(search, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["studies", "-f", "json"], capsys)
    assert code == 0 and json.loads(out) == []
    assert not (home / "kdsearch.db").exists()  # listing never creates a storage
    assert search("--trials", "2")[0] == 0
    code, out, _ = run_cli(["studies", "-f", "json"], capsys)
    (row,) = json.loads(out)
    assert row["name"] == "kd-imagefolder" and row["method"] == "kd" and row["dataset"] == "imagefolder"
    assert row["complete"] + row["pruned"] == 2 and row["failed"] == 0 and row["running"] == 0
    assert row["best_value"] == load_study(home, "kd-imagefolder").best_value
    code, out, _ = run_cli(["studies", "-f", "yaml"], capsys)
    assert yaml.safe_load(out)[0]["name"] == "kd-imagefolder"
    code, out, _ = run_cli(["studies"], capsys)
    assert out.splitlines()[0].split()[:3] == ["name", "method", "dataset"] and "kd-imagefolder" in out


def test_user_space_file_and_fix(
    search, home: Path, tmp_path: Path, stub: StubTrainer, capsys: pytest.CaptureFixture[str]
) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(
        "method: regressor\nparameters:\n  kernel_size: {type: categorical, choices: [1]}\n"
        "  depth: 2\n  distance: {type: categorical, choices: [smooth_l1, cosine]}\n"
    )
    code, _, err = search("--trials", "2", "--space", space, "--fix", "feature_weight=0.5", method="regressor")
    assert code == 0, err
    for trial in load_study(home, "regressor-imagefolder").get_trials():
        assert trial.params["kernel_size"] == 1 and trial.params["distance"] in ("smooth_l1", "cosine")
        assert "depth" not in trial.params and "feature_weight" not in trial.params  # pinned, not searched
    assert all(run.loss.params["depth"] == 2 and run.loss.params["feature_weight"] == 0.5 for run in stub.runs)
    config = yaml.safe_load(run_cli(["export", "--study-name", "regressor-imagefolder"], capsys)[1])
    assert config["loss"]["params"]["depth"] == 2 and config["loss"]["params"]["feature_weight"] == 0.5


def test_a_teacher_that_saw_the_validation_images_is_flagged(search, home: Path, stub: StubTrainer) -> None:
    stub.teacher_val_size = 0  # trained on every train image, the search's 50 validation images included
    code, _, err = search("--trials", "1", "--study-name", "leaky")
    assert code == 0, err
    assert "warning: the teacher was trained on this search's 50 validation images" in err
    assert "train one with `kdsearch teacher --val-size 50` and pass it as --teacher" in err
    assert load_study(home, "leaky").user_attrs["teacher_saw_validation"] is True
    stub.teacher_val_size = 50
    code, _, err = search("--trials", "1", "--study-name", "clean")
    assert code == 0 and "warning" not in err
    assert load_study(home, "clean").user_attrs["teacher_saw_validation"] is False


@pytest.mark.parametrize(
    ("teacher_held_out", "search_val_size", "saw"),
    [(None, 50, True), (0, 50, True), (49, 50, True), (50, 50, False), (5000, 50, False), (0, 0, False)],
)
def test_a_teacher_saw_the_validation_rows_unless_it_held_as_many_out(
    teacher_held_out: int | None, search_val_size: int, saw: bool, stub: StubTrainer
) -> None:
    """Validation rows are the first V of one permutation: a teacher that held out V' >= V never saw them."""
    config = RunConfig().with_values({"val_size": search_val_size})
    prepared = stub.prepare(config)
    prepared.teacher_metadata = {} if teacher_held_out is None else {"data": {"val_size": teacher_held_out}}
    assert teacher_saw_validation(prepared) is saw
    assert not teacher_saw_validation(Prepared(config, CPU, stub_splits(search_val_size, "x")))  # no teacher


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_optuna_records_a_trial_waits_until_it_is_recorded(sig: int) -> None:
    """The race that left a trial RUNNING: a signal during the storage write of its COMPLETE state."""
    from kdsearch.errors import Terminated
    from kdsearch.workers import run_trials

    study = optuna.create_study(direction="maximize")
    storage = study._storage
    record = storage.set_trial_state_values

    def recording_with_a_signal(trial_id: int, state: TrialState, values=None) -> bool:
        if state == TrialState.COMPLETE:
            os.kill(os.getpid(), sig)  # delivered here, in the middle of Optuna's bookkeeping
        return record(trial_id, state, values)

    storage.set_trial_state_values = recording_with_a_signal
    with pytest.raises(Terminated if sig == signal.SIGTERM else KeyboardInterrupt):
        run_trials(study, lambda trial: trial.suggest_float("x", 0, 1), SearchConfig(trials=5), [], 5)
    (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE  # recorded whole, then the signal was raised
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are restored


def test_a_signal_during_training_fails_the_trial_as_before() -> None:
    from kdsearch.workers import run_trials

    study = optuna.create_study(direction="maximize")

    def training(trial: optuna.Trial) -> float:
        os.kill(os.getpid(), signal.SIGINT)
        return 1.0

    with pytest.raises(KeyboardInterrupt):
        run_trials(study, training, SearchConfig(trials=5), [], 5)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]


@pytest.mark.parametrize(("epochs", "rungs"), [(10, [1, 3, 9]), (5, [1, 3]), (30, [3, 9, 27])])
def test_the_default_pruner_cuts_at_a_tenth_of_the_epochs_then_every_third(epochs: int, rungs: list[int]) -> None:
    """A trial that leads until one rung and falls behind there is stopped at that very epoch."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=make_pruner(SearchConfig(trials=1), epochs))
    for _ in range(2):
        leader = study.ask()
        for step in range(1, epochs + 1):
            leader.report(90.0, step)
            assert not leader.should_prune()  # ASHA records a trial's rung value when it asks
        study.tell(leader, 90.0)
    stopped_at = []
    for rung in rungs:
        trial = study.ask()
        for step in range(1, epochs + 1):
            trial.report(95.0 if step < rung else 10.0, step)
            if trial.should_prune():
                stopped_at.append(step)
                break
        study.tell(trial, state=TrialState.PRUNED)
    assert stopped_at == rungs
