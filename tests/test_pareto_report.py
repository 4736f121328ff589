"""Multi-objective (accuracy vs size) search, Pareto export, hybrid search, and the HTML report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.study import StudyDirection
from optuna.trial import TrialState

from kdsearch.checkpoints import load_checkpoint
from tests.helpers import run_cli


def optimize(folder: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        "optimize",
        "--dataset",
        "imagefolder",
        "--data-dir",
        str(folder),
        "--val-size",
        "50",
        "--teacher",
        str(teacher),
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "-q",
        *extra,
    ]


def test_multi_objective_study_and_pareto_export(
    pattern_folder: Path, pattern_teacher: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        optimize(
            pattern_folder,
            pattern_teacher,
            "--method",
            "kd",
            "--trials",
            "4",
            "--objectives",
            "accuracy,params",
            "--json",
        ),
        capsys,
    )
    assert code == 0, err
    summary = json.loads(out)
    study = optuna.load_study(study_name="kd-imagefolder", storage=f"sqlite:///{home / 'kdsearch.db'}")
    assert study.directions == [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE]
    assert study.metric_names == ["accuracy", "params"]
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4  # no pruning in multi-objective studies
    assert all("width" in t.params and t.values[1] == t.user_attrs["params"] for t in trials)
    assert len({t.values[1] for t in trials}) > 1  # the width search changes the student's size
    assert trials[0].params["width"] == 1.0 and trials[0].values[1] == 267_738  # the tutorial's LightNN
    front = study.best_trials
    assert {t["trial"] for t in summary["pareto_front"]} == {t.number for t in front}

    out_file, ckpt_dir = tmp_path / "front.yaml", tmp_path / "front"
    code, _, err = run_cli(
        ["export", "--study-name", "kd-imagefolder", "--pareto", "-o", out_file, "--checkpoint", ckpt_dir], capsys
    )
    assert code == 0, err
    configs = yaml.safe_load(out_file.read_text())["configs"]
    assert len(configs) == len(front) >= 1
    for config in configs:
        trial = next(t for t in front if t.number == config["source"]["trial"])
        assert config["models"]["width"] == trial.params["width"]
        checkpoint = load_checkpoint(ckpt_dir / f"trial-{trial.number}.pt")
        assert checkpoint.metadata["width"] == trial.params["width"]
        assert checkpoint.metadata["params"] == trial.values[1]


def test_hybrid_search_runs(
    pattern_folder: Path, pattern_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(optimize(pattern_folder, pattern_teacher, "--method", "hybrid", "--trials", "2"), capsys)
    assert code == 0, err
    study = optuna.load_study(study_name="hybrid-imagefolder", storage=f"sqlite:///{home / 'kdsearch.db'}")
    assert {"kd_weight", "cosine_weight", "regressor_weight", "temperature"} <= set(study.trials[0].params)


def test_report_is_self_contained(
    pattern_folder: Path, pattern_teacher: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        run_cli(optimize(pattern_folder, pattern_teacher, "--method", "kd", "--trials", "3", "--epochs", "2"), capsys)[
            0
        ]
        == 0
    )
    report, png = tmp_path / "report.html", tmp_path / "png"
    code, _, err = run_cli(["report", "--study-name", "kd-imagefolder", "-o", report, "--png", png], capsys)
    assert code == 0, err
    text = report.read_text()
    for title in ("optimization history", "intermediate values", "param importances", "parallel coordinate"):
        assert f"<h2>{title}</h2>" in text
    assert text.count('class="plotly-graph-div"') >= 3
    assert not re.search(r"<script[^>]+src=", text)  # plotly inlined once: opens with no network
    assert not re.search(r"<link[^>]+href=[\"']https?:", text)
    assert "best trials" in text and "checkpoint" in text
    assert "method kd (soft targets: KL to the teacher&#x27;s softened logits, scaled by T²)" in text
    assert sorted(p.name for p in png.iterdir()) >= ["intermediate_values.png", "optimization_history.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in png.iterdir())


def test_report_of_a_multi_objective_study_draws_the_front(
    pattern_folder: Path, pattern_teacher: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        run_cli(
            optimize(
                pattern_folder, pattern_teacher, "--method", "ce", "--trials", "3", "--objectives", "accuracy,params"
            ),
            capsys,
        )[0]
        == 0
    )
    report = tmp_path / "mo.html"
    assert run_cli(["report", "--study-name", "ce-imagefolder", "-o", report], capsys)[0] == 0
    assert "<h2>pareto front</h2>" in report.read_text()
