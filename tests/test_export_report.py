"""Reading a study back on the stub trainer: export's ranking, the config it writes and `train --config`
reads, multi-objective studies and their Pareto export, and the HTML report."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.study import StudyDirection
from optuna.trial import TrialState

import kdsearch.distill
from kdsearch.checkpoints import load_checkpoint
from kdsearch.config import RunConfig
from kdsearch.export import trial_run_config
from tests.helpers import StubTrainer, load_study, run_cli


@pytest.fixture()
def trained(monkeypatch: pytest.MonkeyPatch) -> list[RunConfig]:
    """`kdsearch train` without the training: each run's config is kept here (``kdsearch.distill.run_training``)."""
    configs: list[RunConfig] = []

    def run_training(config: RunConfig, **_: Any) -> dict[str, Any]:
        configs.append(config)
        return {"method": config.method, "config": config.to_dict()}

    monkeypatch.setattr(kdsearch.distill, "run_training", run_training)
    return configs


def test_export_ranks_trials_best_first_and_ties_by_trial_number(
    search, home: Path, tmp_path: Path, stub: StubTrainer, capsys: pytest.CaptureFixture[str]
) -> None:
    values = iter([50.0, 70.0, 60.0, 70.0, 65.0])
    stub.val = lambda config: next(values)
    assert search("--trials", "5", "--pruner", "none", "--study-name", "r")[0] == 0
    top = tmp_path / "top.json"
    code, out, err = run_cli(["export", "--study-name", "r", "--top", "3", "-o", top], capsys)
    assert (code, out) == (0, ""), err
    configs = json.loads(top.read_text())["configs"]
    assert [(c["source"]["trial"], c["source"]["val_accuracy"]) for c in configs] == [(1, 70.0), (3, 70.0), (4, 65.0)]
    assert yaml.safe_load(run_cli(["export", "--study-name", "r"], capsys)[1])["source"]["trial"] == 1
    assert run_cli(["export", "--study-name", "r", "--top", "9", "-o", top], capsys)[0] == 0  # all there are
    assert [c["source"]["trial"] for c in json.loads(top.read_text())["configs"]] == [1, 3, 4, 2, 0]


def test_an_exported_config_is_the_trials_run_and_train_reads_it_back(
    search, home: Path, tmp_path: Path, trained: list[RunConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        search(
            "--trials", "3", "--fix", "temperature=3", "--seed", "7", "--study-name", "e", "--pruner", "none", epochs=2
        )[0]
        == 0
    )
    study = load_study(home, "e")
    best = study.best_trial
    path = tmp_path / "best.yaml"
    assert run_cli(["export", "--study-name", "e", "-o", path], capsys)[0] == 0
    config = yaml.safe_load(path.read_text())
    assert config["loss"]["method"] == "kd" and config["data"]["val_size"] == 0  # re-trains on the whole split
    assert config["recipe"]["epochs"] == 2 and config["recipe"]["seed"] == 7
    exported = {**config["recipe"], **config["loss"]["params"]}
    assert {name: exported[name] for name in best.params} == best.params and exported["temperature"] == 3.0
    assert config["source"] | {"storage": None} == {
        "study": "e",
        "storage": None,
        "trial": best.number,
        "val_accuracy": best.value,
        "objectives": {"accuracy": best.value},
        "artifact_id": best.user_attrs["artifact_id"],
        "teacher_sha256": "stub-teacher",
        "search_val_size": 50,
        "confirmed": None,
    }
    # `train --config` runs exactly the trial's config, on the whole train split.
    code, out, err = run_cli(["train", "--config", path, "--json"], capsys)
    assert code == 0, err
    run = trial_run_config(study, best)
    assert trained[-1] == dataclasses.replace(run, data=dataclasses.replace(run.data, val_size=0))
    assert json.loads(out)["config"] == {key: config[key] for key in ("data", "models", "recipe", "loss")}
    # The same file with another method keeps the recipe and starts from that method's own values.
    assert run_cli(["train", "--config", path, "--method", "ce", "--json"], capsys)[0] == 0
    assert trained[-1].to_dict()["loss"] == {"method": "ce", "params": {}}
    assert trained[-1].recipe == trained[0].recipe
    # A file of several configs: --rank picks one, best first.
    top = tmp_path / "top.yaml"
    assert run_cli(["export", "--study-name", "e", "--top", "2", "-o", top], capsys)[0] == 0
    second = yaml.safe_load(top.read_text())["configs"][1]["source"]["trial"]
    assert run_cli(["train", "--config", top, "--rank", "2", "--json"], capsys)[0] == 0
    assert trained[-1].recipe.lr == study.trials[second].params["lr"] != best.params["lr"]


def test_multi_objective_study_and_pareto_export(
    search, home: Path, tmp_path: Path, stub: StubTrainer, capsys: pytest.CaptureFixture[str]
) -> None:
    stub.val = lambda config: 40.0 + 10.0 * config.models.width  # wider is better and bigger: a front of several
    code, out, err = search("--trials", "4", "--objectives", "accuracy,params", "--json")
    assert code == 0, err
    summary = json.loads(out)
    study = load_study(home, "kd-imagefolder")
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
    assert len(configs) == len(front) > 1
    assert [c["source"]["objectives"]["params"] for c in configs] == sorted(t.values[1] for t in front)
    for config in configs:
        trial = next(t for t in front if t.number == config["source"]["trial"])
        assert config["models"]["width"] == trial.params["width"]
        checkpoint = load_checkpoint(ckpt_dir / f"trial-{trial.number}.pt")
        assert checkpoint.metadata["width"] == trial.params["width"]
        assert checkpoint.metadata["params"] == trial.values[1]


def test_report_is_self_contained(search, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert search("--trials", "3", "--pruner", "none", epochs=2)[0] == 0
    report, png = tmp_path / "report.html", tmp_path / "png"
    code, _, err = run_cli(["report", "--study-name", "kd-imagefolder", "-o", report, "--png", png], capsys)
    assert code == 0, err
    assert f"kdsearch: wrote {report} (" in err
    text = report.read_text()
    for title in ("optimization history", "intermediate values", "param importances", "parallel coordinate"):
        assert f"<h2>{title}</h2>" in text
    assert text.count('class="plotly-graph-div"') >= 3
    assert not re.search(r"<script[^>]+src=", text)  # plotly inlined once: opens with no network
    assert not re.search(r"<link[^>]+href=[\"']https?:", text)
    assert "best trials" in text and "checkpoint" in text
    assert "method kd (soft targets: KL to the teacher&#x27;s softened logits, scaled by T²)" in text
    assert "dataset imagefolder, 2 epochs, 3 trials" in text
    # The best trials in export's order: best value first.
    ranked = sorted(load_study(home, "kd-imagefolder").trials, key=lambda t: (-t.value, t.number))
    rows = re.findall(r"<tr><td>(\d+)</td>", text.split("<h2>best trials</h2>")[1])
    assert [int(r) for r in rows] == [t.number for t in ranked]
    assert sorted(p.name for p in png.iterdir()) >= ["intermediate_values.png", "optimization_history.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in png.iterdir())


def test_report_of_a_multi_objective_study_draws_the_front(
    search, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert search("--trials", "3", "--objectives", "accuracy,params", method="ce")[0] == 0
    report = tmp_path / "mo.html"
    assert run_cli(["report", "--study-name", "ce-imagefolder", "-o", report], capsys)[0] == 0
    text = report.read_text()
    assert "<h2>pareto front</h2>" in text and "<h2>intermediate values</h2>" not in text
    front = optuna.load_study(study_name="ce-imagefolder", storage=f"sqlite:///{home / 'kdsearch.db'}").best_trials
    assert all(f"<tr><td>{t.number}</td>" in text for t in front)
