"""Searches end to end, with real trainings: a study of real students, the best student's artifact through
export, evaluate and train, the dashboard, and the teachers a search uses. The study-level logic is tested
on the stub trainer (test_study, test_objective, test_export_report, test_confirm)."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from kdsearch.checkpoints import load_checkpoint
from kdsearch.config import DEFAULT_TEACHER_PRESET, TEACHER_PRESETS, RecipeConfig
from kdsearch.distill import prepare
from kdsearch.fsutil import file_sha256
from kdsearch.spaces import default_space, space_to_dict
from kdsearch.strategies import METHODS, get_strategy
from kdsearch.study import teacher_saw_validation
from tests.helpers import check_new_study, load_study, optimize_args, pattern_config, run_cli

DATA = ["--dataset", "imagefolder", "--val-size", "50"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ce", "kd"])
def test_a_study_trains_real_students_and_records_them(
    method: str, pattern_folder: Path, pattern_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = optimize_args(pattern_folder, pattern_teacher, "--trials", "2", "--json", method=method, epochs=2)
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    attrs = check_new_study(home, out, method, trials=2, epochs=2).user_attrs
    assert attrs["teacher_sha256"] == (None if method == "ce" else file_sha256(pattern_teacher))
    assert attrs["data_fingerprint"] and attrs["teacher_saw_validation"] is (method == "kd")
    # The default space may draw flip augmentation: the teacher's outputs are cached for both views.
    assert len(list((home / "cache" / "teacher").glob("*.pt"))) == (0 if method == "ce" else 2)


@pytest.mark.slow
def test_best_student_artifact_export_and_retrain_round_trip(
    pattern_folder: Path, pattern_teacher: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("--trials", "2", "--pruner", "none")
    code, _, err = run_cli(optimize_args(pattern_folder, pattern_teacher, *args, method="cosine", epochs=2), capsys)
    assert code == 0, err
    study = load_study(home, "cosine-imagefolder")
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


def test_presets_mirror_the_strategies_defaults() -> None:
    presets = Path(__file__).resolve().parents[1] / "studies" / "spaces"
    assert sorted(p.stem for p in presets.glob("*.yaml")) == sorted(METHODS)
    for name in METHODS:
        data = yaml.safe_load((presets / f"{name}.yaml").read_text())
        assert data["method"] == name
        assert data["parameters"] == space_to_dict(default_space(get_strategy(name))), name


@pytest.mark.slow
def test_dashboard_lists_the_study_and_its_trials_parameters(search, home: Path) -> None:
    """The dashboard command, served for real, on a study of the stub trainer."""
    assert search("--trials", "1", "--study-name", "kd-imagefolder", method="dkd")[0] == 0
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


@pytest.mark.slow
def test_a_teacher_that_saw_the_validation_images_is_flagged(
    pattern_folder: Path, pattern_teacher: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # pattern_teacher trained on every train image, the search's 50 validation images included.
    code, _, err = run_cli(
        optimize_args(pattern_folder, pattern_teacher, "--trials", "1", "--study-name", "leaky"), capsys
    )
    assert code == 0, err
    assert "warning: the teacher was trained on this search's 50 validation images" in err
    assert load_study(home, "leaky").user_attrs["teacher_saw_validation"] is True
    held_out = tmp_path / "held-out.pt"
    code, _, err = run_cli(
        [
            "teacher",
            *DATA,
            "--data-dir",
            pattern_folder,
            "--epochs",
            "1",
            "--limit-train",
            "64",
            "--out",
            held_out,
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    code, _, err = run_cli(optimize_args(pattern_folder, held_out, "--trials", "1", "--study-name", "clean"), capsys)
    assert code == 0 and "warning" not in err
    assert load_study(home, "clean").user_attrs["teacher_saw_validation"] is False


@pytest.mark.slow
def test_the_default_search_teacher_holds_out_the_validation_images(
    pattern_folder: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --teacher, a search's teacher is trained once without the search's validation rows."""
    # One epoch of the default (strong) preset: what is tested is which rows it trains on, not how well.
    monkeypatch.setitem(
        TEACHER_PRESETS, DEFAULT_TEACHER_PRESET, TEACHER_PRESETS[DEFAULT_TEACHER_PRESET] | {"epochs": 1}
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_ce_study_of_deepnn_exports_a_teacher(
    pattern_folder: Path, pattern_teacher: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A teacher can come from kdsearch itself: the best DeepNN of a ce search, exported, distils."""
    args = ["--student-model", "deepnn", "--trials", "1", "--study-name", "t"]
    assert run_cli(optimize_args(pattern_folder, pattern_teacher, *args, method="ce"), capsys)[0] == 0
    exported = tmp_path / "teacher.pt"
    assert run_cli(["export", "--study-name", "t", "--checkpoint", exported], capsys)[0] == 0
    code, _, err = run_cli(optimize_args(pattern_folder, exported, "--trials", "1", "--study-name", "s"), capsys)
    assert code == 0, err
    assert "warning" not in err  # it trained without the 50 validation rows, and says so
    study = load_study(home, "s")
    assert study.user_attrs["teacher_saw_validation"] is False and study.user_attrs["teacher"] == str(exported)
