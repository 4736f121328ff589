"""`kdsearch confirm`: multi-seed re-trains, ranking on validation, paired intervals, resuming."""

from __future__ import annotations

import json
import math
import statistics
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from kdsearch.config import RunConfig
from kdsearch.confirm import ConfirmObjective, _enqueue, paired_interval, t_quantile
from tests.helpers import files_under, run_cli
from tests.test_search import load, optimize


def test_the_paired_interval_is_the_textbook_one() -> None:
    first, second = [71.0, 70.5, 72.0, 69.5, 71.5], [69.0, 69.5, 70.0, 69.0, 70.5]
    differences = [2.0, 1.0, 2.0, 0.5, 1.0]
    interval = paired_interval(first, second)
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    assert interval.mean == pytest.approx(1.3)
    assert interval.half_width == pytest.approx(2.776 * sd / math.sqrt(5))  # t(0.975, 4 degrees of freedom)
    assert interval.excludes_zero and str(interval) == f"+{mean:.2f} ± {2.776 * sd / math.sqrt(5):.2f}"
    assert not paired_interval([1.0, 2.0], [2.0, 1.0]).excludes_zero
    single = paired_interval([70.0], [69.0])
    assert single.half_width is None and "no interval" in str(single)
    assert t_quantile(1) == 12.706 and t_quantile(30) == 2.042 and t_quantile(200) == 1.96


def test_confirm_ranks_on_validation_compares_paired_and_resumes(
    pattern_folder: Path, pattern_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--method", "kd", "--trials", "3", "--epochs", "1", "--pruner", "none", "--sampler-seed", "1"]
    assert run_cli(optimize(pattern_folder, pattern_teacher, *args), capsys)[0] == 0
    code, out, err = run_cli(
        ["confirm", "--study-name", "kd-imagefolder", "--top", "2", "--seeds", "2", "--json"], capsys
    )
    assert code == 0, err
    summary = json.loads(out)
    companion = load(home, "kd-imagefolder-confirm")
    trials = companion.get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)  # (2 configs + hand-set) x 2
    assert {(t.params["arm"], t.params["seed"]) for t in trials} == {
        (arm, seed)
        for arm in ("hand-set", *(r["arm"] for r in summary["rows"] if not r["baseline"]))
        for seed in (42, 43)
    }
    # The chosen config has the best mean validation accuracy; only it and the baseline are tested.
    candidates = [r for r in summary["rows"] if not r["baseline"]]
    best = max(candidates, key=lambda r: r["val_mean"])
    assert summary["chosen"] == best["arm"] and best["chosen"]
    assert all(r["test_runs"] is None for r in candidates if not r["chosen"])
    hand_set = next(r for r in summary["rows"] if r["arm"] == "hand-set")
    expected = paired_interval(best["test_runs"], hand_set["test_runs"])
    assert summary["chosen_minus"]["hand-set"]["mean"] == pytest.approx(expected.mean)
    assert companion.user_attrs["confirms"] == "kd-imagefolder" and companion.user_attrs["summary"] == summary
    # export now re-trains the confirmed winner, and says what confirmation found.
    exported = yaml.safe_load(run_cli(["export", "--study-name", "kd-imagefolder"], capsys)[1])
    assert f"trial-{exported['source']['trial']}" == summary["chosen"]
    assert exported["source"]["confirmed"]["seeds"] == [42, 43]
    report = home.parent / "report.html"
    assert run_cli(["report", "--study-name", "kd-imagefolder", "-o", report], capsys)[0] == 0
    page = report.read_text()
    assert "confirmed over seeds [42, 43]" in page and f"{summary['chosen']} (chosen)" in page
    assert "hand-set (baseline)" in page and "paired by seed, mean ± 95 % CI" in page
    # A third seed later: only the new runs are trained, the finished ones are kept.
    stamps = {t.number: t.datetime_complete for t in trials}
    assert run_cli(["confirm", "--study-name", "kd-imagefolder", "--top", "2", "--seeds", "3", "-q"], capsys)[0] == 0
    again = load(home, "kd-imagefolder-confirm").get_trials()
    assert len(again) == 9 and {t.number: t.datetime_complete for t in again[:6]} == stamps
    # The companion holds runs, not a search: optimize refuses to add trials to it.
    code, _, err = run_cli(
        optimize(pattern_folder, pattern_teacher, *args, "--study-name", "kd-imagefolder-confirm"), capsys
    )
    assert code == 2 and "holds the confirmation runs of 'kd-imagefolder'" in err


def test_a_ce_study_is_the_control(
    pattern_folder: Path, pattern_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for method in ("kd", "ce"):
        args = ["--method", method, "--trials", "1", "--epochs", "1"]
        assert run_cli(optimize(pattern_folder, pattern_teacher, *args), capsys)[0] == 0
    code, out, err = run_cli(
        [
            "confirm",
            "--study-name",
            "kd-imagefolder",
            "--top",
            "1",
            "--seeds",
            "2",
            "--against",
            "ce-imagefolder",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    summary = json.loads(out)
    control = next(r for r in summary["rows"] if r["arm"] == "control-ce-imagefolder")
    assert control["baseline"] and control["params"]["method"] == "ce" and len(control["test_runs"]) == 2
    assert set(summary["chosen_minus"]) == {"hand-set", "control-ce-imagefolder"}
    assert (
        "control-ce-imagefolder"
        in run_cli(
            ["confirm", "--study-name", "kd-imagefolder", "--top", "1", "--seeds", "2", "--against", "ce-imagefolder"],
            capsys,
        )[1]
    )


def test_an_interrupted_confirm_resumes_without_running_any_run_twice() -> None:
    """Waiting runs (left by a killed confirm) are not enqueued again; a copy that slipped in is not trained."""
    study = optuna.create_study(direction="maximize")
    arms = {"trial-0": RunConfig(), "hand-set": RunConfig()}
    _enqueue(study, arms, [42, 43])
    _enqueue(study, arms, [42, 43])  # the re-run: every run is still waiting
    assert sorted(t.user_attrs["enqueued"]["seed"] for t in study.trials) == [42, 42, 43, 43]
    done = optuna.create_trial(
        params={"arm": "trial-0", "seed": 42},
        distributions={
            "arm": optuna.distributions.CategoricalDistribution(list(arms)),
            "seed": optuna.distributions.IntDistribution(42, 43),
        },
        value=60.0,
        user_attrs={"enqueued": True},
    )
    fresh = optuna.create_study(direction="maximize")
    fresh.add_trial(done)
    fresh.enqueue_trial({"arm": "trial-0", "seed": 42}, user_attrs={"enqueued": True})  # two workers' race
    # No data is prepared: a duplicate is turned away before anything trains.
    fresh.optimize(ConfirmObjective(None, arms, [42, 43]), n_trials=1)  # type: ignore[arg-type]
    copy = fresh.trials[1]
    assert copy.state == TrialState.PRUNED and copy.user_attrs["duplicate_of"] == 0
    _enqueue(fresh, arms, [42])
    assert [t.user_attrs["enqueued"] for t in fresh.get_trials(states=(TrialState.WAITING,))] == [
        {"arm": "hand-set", "seed": 42}
    ]


def test_the_control_is_its_studys_confirmed_winner(
    pattern_folder: Path, pattern_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A confirmed control is compared through the config its own confirmation chose, not its one-seed best."""
    for method, trials in (("kd", "1"), ("ce", "3")):
        args = ["--method", method, "--trials", trials, "--epochs", "1"]
        assert run_cli(optimize(pattern_folder, pattern_teacher, *args), capsys)[0] == 0
    ce = load(home, "ce-imagefolder")
    ranked = sorted((t for t in ce.trials if t.value is not None), key=lambda t: -t.value)
    runner_up = ranked[-1]
    assert runner_up.number != ranked[0].number
    companion = optuna.create_study(study_name="ce-imagefolder-confirm", storage=ce._storage)
    companion.set_user_attr("summary", {"chosen": f"trial-{runner_up.number}"})
    code, out, err = run_cli(
        ["confirm", "--study-name", "kd-imagefolder", "--top", "1", "--seeds", "1", "--against", "ce-imagefolder",
         "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    control = next(r for r in json.loads(out)["rows"] if r["arm"] == "control-ce-imagefolder")
    assert control["params"]["lr"] == runner_up.params["lr"] != ranked[0].params["lr"]
    # The summary names every searched recipe knob the control trained with, not a familiar few.
    assert {k: control["params"][k] for k in runner_up.params} == runner_up.params


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--study-name", "nope"], "no study named 'nope'"),
        (["--study-name", "empty"], "has no completed trial"),
        (["--study-name", "empty", "--top", "0"], "--top must be at least 1, got 0"),
        (["--study-name", "empty", "--seeds", "0"], "--seeds must be at least 1, got 0"),
    ],
)
def test_confirm_refuses_bad_input_in_one_line_writing_nothing(
    args: list[str], message: str, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home.mkdir(parents=True)
    storage = f"sqlite:///{home / 'kdsearch.db'}"
    study = optuna.create_study(study_name="empty", storage=storage, direction="maximize")
    for key, value in (RunConfig().flat() | {"objectives": ["accuracy"]}).items():
        study.set_user_attr(key, value)
    before = files_under(home)
    code, out, err = run_cli(["confirm", *args], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert files_under(home) == before
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["empty"]  # no companion study


@pytest.mark.postgres
def test_two_confirm_workers_share_one_postgres_study(
    pattern_folder: Path, pattern_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_parallel_faults import POSTGRES_URL, postgres_available, spawn

    if not postgres_available():
        pytest.skip("PostgreSQL not reachable")
    name = f"confirm-{uuid.uuid4().hex[:8]}"
    storage = ["--storage", POSTGRES_URL]
    try:
        args = ["--method", "kd", "--trials", "2", "--epochs", "1", "--study-name", name, *storage]
        assert run_cli(optimize(pattern_folder, pattern_teacher, *args), capsys)[0] == 0
        command = ["confirm", "--study-name", name, "--top", "2", "--seeds", "2", "--json", "-q", *storage]
        workers = [spawn(command, home) for _ in range(2)]
        summaries = []
        for worker in workers:
            out, err = worker.communicate(timeout=300)
            assert worker.returncode == 0, err
            assert "Warning" not in err  # waiting for the other worker's runs says nothing
            summaries.append(json.loads(out))
        # The worker that runs out of work first waits for the other's runs: both summaries are whole.
        assert summaries[0] == summaries[1] and len(summaries[0]["rows"]) == 3
        runs = optuna.load_study(study_name=f"{name}-confirm", storage=POSTGRES_URL).get_trials()
        done = {(t.params["arm"], t.params["seed"]) for t in runs if t.state == TrialState.COMPLETE}
        assert len(done) == 6 and not [t for t in runs if t.state in (TrialState.RUNNING, TrialState.FAIL)]
    finally:
        for study in (name, f"{name}-confirm"):
            optuna.delete_study(study_name=study, storage=POSTGRES_URL)
