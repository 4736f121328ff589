"""The search service: studies per strategy, pruning, resuming, artifacts, export round trip, dashboard."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import distribution_to_json
from optuna.trial import TrialState

from kdsearch.checkpoints import load_checkpoint
from kdsearch.config import DEFAULT_TEACHER_PRESET, KNOBS, TEACHER_PRESETS, RecipeConfig
from kdsearch.distill import prepare
from kdsearch.spaces import default_space, space_to_dict
from kdsearch.strategies import METHODS, get_strategy
from kdsearch.study import teacher_saw_validation
from tests.helpers import pattern_config, run_cli

DATA = ["--dataset", "imagefolder", "--val-size", "50"]


def optimize(folder: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        "optimize",
        *DATA,
        "--data-dir",
        str(folder),
        "--teacher",
        str(teacher),
        "--epochs",
        "2",
        "-q",
        "--batch-size",
        "64",
        *extra,
    ]


def load(home: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{home / 'kdsearch.db'}")


@pytest.mark.parametrize("method", ["ce", "kd", "dkd", "cosine", "regressor"])
def test_each_strategy_runs_a_study(
    method: str, pattern_folder: Path, pattern_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        optimize(pattern_folder, pattern_teacher, "--method", method, "--trials", "3", "--json"), capsys
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["study_name"] == f"{method}-imagefolder"
    study = load(home, summary["study_name"])
    trials = study.get_trials()
    assert len(trials) == 3
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    best = study.best_trial
    strategy = get_strategy(method)
    space = default_space(strategy)
    assert summary["best_value"] == best.value == max(t.value for t in trials if t.state == TrialState.COMPLETE)
    assert set(best.params) == set(space) and {"optimizer", "weight_decay", "label_smoothing"} <= set(space)
    assert len(best.user_attrs["epoch_val_accuracy"]) == 2 and len(best.user_attrs["epoch_seconds"]) == 2
    assert best.user_attrs["params"] == 267_738 and best.user_attrs["seed"] == 42
    attrs = study.user_attrs
    assert attrs["method"] == method and attrs["epochs"] == 2 and attrs["dataset"] == "imagefolder"
    assert attrs["search_space"] == {name: distribution_to_json(d) for name, d in space.items()}
    assert attrs["kdsearch_version"]
    assert (attrs["teacher_sha256"] is None) == (method == "ce")
    # The default space may draw flip augmentation: the teacher's outputs are cached for both views.
    assert len(list((home / "cache" / "teacher").glob("*.pt"))) == (0 if method == "ce" else 2)
    assert best.intermediate_values.keys() == {1, 2}
    # A new study starts from the tutorial's hand-set config, so the search never ends below it on val.
    tutorial = strategy.tutorial() | {name: getattr(RecipeConfig(), name) for name in space if name in KNOBS}
    assert trials[0].user_attrs["baseline"] == "tutorial" and trials[0].params["lr"] == 1e-3
    assert trials[0].params == tutorial
    assert not any("baseline" in t.user_attrs for t in trials[1:])


def test_a_bad_trial_is_pruned_and_reruns_add_trials(
    pattern_folder: Path, pattern_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = optimize(
        pattern_folder,
        pattern_teacher,
        "--method",
        "kd",
        "--pruner-startup",
        "2",
        "--pruner-warmup",
        "0",
        "--study-name",
        "prune",
    )
    assert run_cli([*base, "--trials", "2", "--fix", "lr=0.003"], capsys)[0] == 0
    # A learning rate this small leaves the student at chance after one epoch: the median pruner stops it.
    assert run_cli([*base, "--trials", "1", "--fix", "lr=1e-7"], capsys)[0] == 0
    trials = load(home, "prune").get_trials()
    assert len(trials) == 3  # the second run added to the same study
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[2].user_attrs["pinned"]["lr"] == 1e-7 and trials[2].last_step == 1
    # The baseline is the first trial of a new study only; the pinned lr kept it out of the baseline.
    assert [("baseline" in t.user_attrs) for t in trials] == [True, False, False]
    assert trials[0].params == {
        "optimizer": "adam",
        "lr_schedule": "constant",
        "weight_decay": 0.0,
        "label_smoothing": 0.0,
        "augment": "none",
        "temperature": 2.0,
        "soft_target_weight": 0.25,
    }
    assert run_cli([*base, "--trials", "1", "--no-baseline", "--study-name", "plain"], capsys)[0] == 0
    assert "baseline" not in load(home, "plain").get_trials()[0].user_attrs


def test_diverging_trials_are_pruned_with_the_reason(
    pattern_folder: Path,
    pattern_teacher: Path,
    home: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kdsearch import objective
    from kdsearch.errors import DivergedError

    real = objective.train_student
    calls = iter([True, False])

    def sometimes_diverges(prepared, config, **kwargs):
        if next(calls):
            raise DivergedError(1, 3, float("nan"))
        return real(prepared, config, **kwargs)

    monkeypatch.setattr(objective, "train_student", sometimes_diverges)
    code, _, err = run_cli(optimize(pattern_folder, pattern_teacher, "--method", "kd", "--trials", "2"), capsys)
    assert code == 0, err
    first, second = load(home, "kd-imagefolder").get_trials()
    assert first.state == TrialState.PRUNED and "diverged at epoch 1" in first.user_attrs["failure"]
    assert second.state == TrialState.COMPLETE


def test_best_student_artifact_export_and_retrain_round_trip(
    pattern_folder: Path, pattern_teacher: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        optimize(pattern_folder, pattern_teacher, "--method", "cosine", "--trials", "3", "--pruner", "none"), capsys
    )
    assert code == 0, err
    study = load(home, "cosine-imagefolder")
    best = study.best_trial
    artifact_id = best.user_attrs["artifact_id"]
    assert list((home / "artifacts" / "cosine-imagefolder").glob(artifact_id))

    config_path, checkpoint_path = tmp_path / "best.yaml", tmp_path / "best.pt"
    code, out, err = run_cli(
        ["export", "--study-name", "cosine-imagefolder", "-o", config_path, "--checkpoint", checkpoint_path], capsys
    )
    assert code == 0, err
    config = yaml.safe_load(config_path.read_text())
    assert config["loss"]["method"] == "cosine" and config["data"]["val_size"] == 0
    assert config["recipe"]["epochs"] == 2 and config["recipe"]["seed"] == 42
    exported = {**config["recipe"], **config["loss"]["params"]}
    assert {name: exported[name] for name in best.params} == best.params
    assert config["source"]["trial"] == best.number and config["source"]["artifact_id"] == artifact_id
    assert config["source"]["val_accuracy"] == best.value

    # The artifact is the trial's student: its validation accuracy reproduces the trial's value.
    checkpoint = load_checkpoint(checkpoint_path)
    assert checkpoint.metadata["trial"] == best.number
    assert checkpoint.metadata["config"]["recipe"]["lr"] == best.params["lr"]
    code, out, err = run_cli(
        ["evaluate", "--checkpoint", checkpoint_path, *DATA, "--data-dir", pattern_folder, "--json"], capsys
    )
    assert code == 0, err
    assert json.loads(out)["val_accuracy"] == pytest.approx(best.value)

    code, out, err = run_cli(["train", "--config", config_path, "--json", "-q"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["method"] == "cosine" and result["config"]["recipe"]["lr"] == best.params["lr"]
    assert result["train_images"] == 300 and result["val_accuracy"] is None  # the whole train split
    assert result["test_accuracy"] > 20.0 and len(result["epoch_seconds"]) == 2  # chance is 10 %

    # The same file with another method keeps the recipe and starts from that method's own values.
    code, out, err = run_cli(["train", "--config", config_path, "--method", "ce", "--json", "-q"], capsys)
    assert code == 0, err
    other = json.loads(out)["config"]
    assert other["loss"] == {"method": "ce", "params": {}} and other["recipe"] == config["recipe"]

    top = tmp_path / "top.json"
    assert run_cli(["export", "--study-name", "cosine-imagefolder", "--top", "2", "-o", top], capsys)[0] == 0
    configs = json.loads(top.read_text())["configs"]
    assert len(configs) == 2 and configs[0]["source"]["val_accuracy"] >= configs[1]["source"]["val_accuracy"]


def test_studies_listing_formats(
    pattern_folder: Path, pattern_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(["studies", "-f", "json"], capsys)
    assert code == 0 and json.loads(out) == []
    assert not (home / "kdsearch.db").exists()  # listing never creates a storage
    assert run_cli(optimize(pattern_folder, pattern_teacher, "--method", "kd", "--trials", "2"), capsys)[0] == 0
    code, out, _ = run_cli(["studies", "-f", "json"], capsys)
    (row,) = json.loads(out)
    assert row["name"] == "kd-imagefolder" and row["method"] == "kd" and row["dataset"] == "imagefolder"
    assert row["complete"] + row["pruned"] == 2 and row["failed"] == 0 and row["running"] == 0
    code, out, _ = run_cli(["studies", "-f", "yaml"], capsys)
    assert yaml.safe_load(out)[0]["name"] == "kd-imagefolder"
    code, out, _ = run_cli(["studies"], capsys)
    assert out.splitlines()[0].split()[:3] == ["name", "method", "dataset"] and "kd-imagefolder" in out


def test_user_space_file_and_fix(
    pattern_folder: Path, pattern_teacher: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(
        "method: regressor\nparameters:\n  kernel_size: {type: categorical, choices: [1]}\n"
        "  depth: 2\n  distance: {type: categorical, choices: [smooth_l1, cosine]}\n"
    )
    code, _, err = run_cli(
        optimize(
            pattern_folder,
            pattern_teacher,
            "--method",
            "regressor",
            "--trials",
            "2",
            "--space",
            space,
            "--fix",
            "feature_weight=0.5",
        ),
        capsys,
    )
    assert code == 0, err
    for trial in load(home, "regressor-imagefolder").get_trials():
        assert trial.params["kernel_size"] == 1 and trial.params["distance"] in ("smooth_l1", "cosine")
        assert "depth" not in trial.params and "feature_weight" not in trial.params  # pinned, not searched
    config = yaml.safe_load(run_cli(["export", "--study-name", "regressor-imagefolder"], capsys)[1])
    assert config["loss"]["params"]["depth"] == 2 and config["loss"]["params"]["feature_weight"] == 0.5


def test_presets_mirror_the_strategies_defaults() -> None:
    presets = Path(__file__).resolve().parents[1] / "studies" / "spaces"
    assert sorted(p.stem for p in presets.glob("*.yaml")) == sorted(METHODS)
    for name in METHODS:
        data = yaml.safe_load((presets / f"{name}.yaml").read_text())
        assert data["method"] == name
        assert data["parameters"] == space_to_dict(default_space(get_strategy(name))), name


def test_dashboard_lists_the_study_and_its_trials_parameters(
    pattern_folder: Path, pattern_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--method", "dkd", "--trials", "1", "--study-name", "kd-imagefolder", "--epochs", "1"]
    assert run_cli(optimize(pattern_folder, pattern_teacher, *args), capsys)[0] == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "kdsearch", "dashboard", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        body = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    body = json.loads(response.read())
            except OSError:
                assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
                time.sleep(0.5)
        assert body is not None, "dashboard did not answer"
        assert [s["study_name"] for s in body["study_summaries"]] == ["kd-imagefolder"]
        study_id = body["study_summaries"][0]["study_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study_id}", timeout=10) as response:
            detail = json.loads(response.read())
        (trial,) = detail["trials"]
        shown = {p["name"]: p["param_external_value"] for p in trial["params"]}
        # DKD's weights and the recipe knobs every method searches are shown as the trial's parameters.
        assert {"alpha", "beta", "temperature", "optimizer", "weight_decay", "label_smoothing"} <= set(shown)
        assert (shown["alpha"], shown["beta"], shown["optimizer"]) == ("1.0", "8.0", "adam")  # trial 0: the tutorial
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_teacher_that_saw_the_validation_images_is_flagged(
    pattern_folder: Path, pattern_teacher: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # pattern_teacher trained on every train image, the search's 50 validation images included.
    code, _, err = run_cli(
        optimize(pattern_folder, pattern_teacher, "--method", "kd", "--trials", "1", "--study-name", "leaky"), capsys
    )
    assert code == 0, err
    assert "warning: the teacher was trained on this search's 50 validation images" in err
    assert load(home, "leaky").user_attrs["teacher_saw_validation"] is True
    held_out = tmp_path / "held-out.pt"
    code, _, err = run_cli(
        ["teacher", *DATA, "--data-dir", pattern_folder, "--epochs", "1", "--out", held_out, "-q"], capsys
    )
    assert code == 0, err
    code, _, err = run_cli(
        optimize(pattern_folder, held_out, "--method", "kd", "--trials", "1", "--study-name", "clean"), capsys
    )
    assert code == 0 and "warning" not in err
    assert load(home, "clean").user_attrs["teacher_saw_validation"] is False


def test_the_default_search_teacher_holds_out_the_validation_images(
    pattern_folder: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --teacher, a search's teacher is trained once without the search's validation rows."""
    # Two epochs of the default (strong) preset: what is tested is which rows it trains on, not how well.
    monkeypatch.setitem(
        TEACHER_PRESETS, DEFAULT_TEACHER_PRESET, TEACHER_PRESETS[DEFAULT_TEACHER_PRESET] | {"epochs": 2}
    )
    prepared = prepare(pattern_config(pattern_folder, None, method="kd"))  # 50 validation images
    assert prepared.teacher_path is not None and prepared.teacher_path.name.endswith("-val50.pt")
    assert prepared.teacher_metadata["data"]["val_size"] == 50 and prepared.teacher_metadata["train_images"] == 250
    assert not teacher_saw_validation(prepared)
    stamp = prepared.teacher_path.stat().st_mtime_ns
    again = prepare(pattern_config(pattern_folder, None, method="cosine"))
    assert again.teacher_path == prepared.teacher_path and prepared.teacher_path.stat().st_mtime_ns == stamp
    assert prepared.teacher_metadata["recipe"]["optimizer"] == TEACHER_PRESETS[DEFAULT_TEACHER_PRESET]["optimizer"]
    # A run on the whole split (no validation) gets another teacher, trained on every image.
    whole = prepare(pattern_config(pattern_folder, None, method="kd", val_size=0))
    assert whole.teacher_path is not None and whole.teacher_path != prepared.teacher_path
    assert whole.teacher_metadata["train_images"] == 300
    assert sorted(p.name for p in (home / "teachers").glob("*.pt")) == sorted(
        [prepared.teacher_path.name, whole.teacher_path.name]
    )


def test_teacher_preset_tutorial_gives_the_tutorial_teacher_which_kdsearch_teacher_trains_ahead(
    pattern_folder: Path, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--teacher-preset tutorial` trains (once) the tutorial's recipe, where `kdsearch teacher` saves it."""
    monkeypatch.setitem(TEACHER_PRESETS, "tutorial", {"epochs": 1})
    code, out, err = run_cli(
        ["teacher", *DATA, "--data-dir", str(pattern_folder), "--preset", "tutorial", "--json"],
        capsys,
    )
    assert code == 0, err
    ahead = Path(json.loads(out)["checkpoint"])
    stamp = ahead.stat().st_mtime_ns
    tutorial = prepare(pattern_config(pattern_folder, None, method="kd", teacher_preset="tutorial"))
    assert tutorial.teacher_path == ahead and ahead.stat().st_mtime_ns == stamp  # found, not retrained
    assert tutorial.teacher_metadata["recipe"] == dataclasses.asdict(RecipeConfig(epochs=1))
    # The default preset is another teacher: the strong recipe (here cut to one epoch).
    monkeypatch.setitem(TEACHER_PRESETS, "strong", TEACHER_PRESETS["strong"] | {"epochs": 1})
    strong = prepare(pattern_config(pattern_folder, None, method="kd"))
    assert strong.teacher_path != ahead
    assert strong.teacher_metadata["recipe"]["optimizer"] == "adamw"


@pytest.mark.parametrize(
    ("sampler", "pruner", "pruner_class"),
    [
        ("random", "percentile", optuna.pruners.PercentilePruner),
        ("cmaes", "hyperband", optuna.pruners.HyperbandPruner),
        ("grid", "none", optuna.pruners.NopPruner),
    ],
)
def test_every_sampler_and_pruner_runs_a_study(
    sampler: str,
    pruner: str,
    pruner_class: type,
    pattern_folder: Path,
    pattern_teacher: Path,
    home: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from kdsearch.config import SearchConfig
    from kdsearch.study import make_pruner

    assert isinstance(make_pruner(SearchConfig(trials=1, pruner=pruner), epochs=2), pruner_class)
    pins = ["--fix", "optimizer=adam", "--fix", "weight_decay=0", "--fix", "label_smoothing=0", "--fix", "augment=none"]
    args = ["--method", "ce", "--trials", "3", "--sampler", sampler, "--pruner", pruner, "--sampler-seed", "3"]
    code, _, err = run_cli(optimize(pattern_folder, pattern_teacher, *args, *pins), capsys)
    assert code == 0, err
    trials = load(home, "ce-imagefolder").get_trials()
    assert len(trials) == 3 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    lrs = [t.params["lr"] for t in trials]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs)
    if sampler == "grid":  # no baseline trial; every trial a distinct point of the grid
        grid = [1e-4, 10 ** (-4 + 2 / 3), 10 ** (-4 + 4 / 3), 1e-2]
        assert len({(t.params["lr"], t.params["lr_schedule"]) for t in trials}) == 3
        assert all(any(lr == pytest.approx(point) for point in grid) for lr in lrs)
        assert not any("baseline" in t.user_attrs for t in trials)
    else:
        assert trials[0].user_attrs["baseline"] == "tutorial" and len(set(lrs)) == 3


def test_random_sampler_seed_makes_a_study_repeatable(
    pattern_folder: Path, pattern_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--sampler-seed fixes the proposals; without it each process draws its own seed."""

    def proposals(name: str, *seed: str) -> list[dict]:
        args = ["--method", "ce", "--trials", "2", "--sampler", "random", "--no-baseline", "--study-name", name]
        assert run_cli(optimize(pattern_folder, pattern_teacher, *args, *seed, "--epochs", "1"), capsys)[0] == 0
        return [t.params for t in load(home, name).get_trials()]

    assert proposals("a", "--sampler-seed", "5") == proposals("b", "--sampler-seed", "5")
    assert proposals("c") != proposals("d")


def test_timeout_alone_bounds_a_study(
    pattern_folder: Path, pattern_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        optimize(pattern_folder, pattern_teacher, "--method", "ce", "--timeout", "0.5", "--epochs", "1", "--json"),
        capsys,
    )
    assert code == 0, err
    trials = load(home, "ce-imagefolder").get_trials()
    # Optuna checks the timeout between trials: at least the first trial runs, none is left running.
    assert len(trials) >= 1 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    summary = json.loads(out)
    assert summary["complete"] + summary["pruned"] == len(trials) and summary["running"] == 0


def test_latency_objective_is_measured_and_minimised(
    pattern_folder: Path, pattern_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--method", "kd", "--trials", "2", "--objectives", "accuracy,latency", "--epochs", "1", "--json"]
    code, out, err = run_cli(optimize(pattern_folder, pattern_teacher, *args), capsys)
    assert code == 0, err
    study = load(home, "kd-imagefolder")
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert study.metric_names == ["accuracy", "latency"]
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        assert trial.values[1] == trial.user_attrs["latency_ms"] > 0
        assert 0.25 <= trial.params["width"] <= 2.0  # a size objective searches the width
    assert json.loads(out)["objectives"] == ["accuracy", "latency"]


def test_a_ce_study_of_deepnn_exports_a_teacher(
    pattern_folder: Path, pattern_teacher: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A teacher can come from kdsearch itself: the best DeepNN of a ce search, exported, distils."""
    args = ["--method", "ce", "--student-model", "deepnn", "--trials", "1", "--epochs", "1", "--study-name", "t"]
    assert run_cli(optimize(pattern_folder, pattern_teacher, *args), capsys)[0] == 0
    exported = tmp_path / "teacher.pt"
    assert run_cli(["export", "--study-name", "t", "--checkpoint", exported], capsys)[0] == 0
    code, _, err = run_cli(
        optimize(pattern_folder, exported, "--method", "kd", "--trials", "1", "--epochs", "1", "--study-name", "s"),
        capsys,
    )
    assert code == 0, err
    assert "warning" not in err  # it trained without the 50 validation rows, and says so
    study = load(home, "s")
    assert study.user_attrs["teacher_saw_validation"] is False and study.user_attrs["teacher"] == str(exported)
