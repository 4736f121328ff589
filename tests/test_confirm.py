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

from kdsearch.artifacts import ArtifactDirectory, fetch_artifact
from kdsearch.config import RunConfig
from kdsearch.confirm import ConfirmObjective, _enqueue, _tested_artifact, run_of
from kdsearch.errors import UserError
from kdsearch.fsutil import file_sha256
from kdsearch.racing import paired_interval, t_quantile
from tests.helpers import (
    POSTGRES_URL,
    StubTrainer,
    files_under,
    load_study,
    optimize_args,
    postgres_available,
    run_cli,
    spawn,
)


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


# Over seeds 42, 43, 44 (and 45 when a fourth is asked for), per arm: validation and test accuracy.
# The search's runner-up (trial 2) wins on mean validation; test accuracy is looked at for it and
# the hand-set baseline only.
VAL = {"trial-1": [60.0, 61.0, 62.0, 62.0], "trial-2": [63.0, 63.0, 63.0, 63.0], "hand-set": [50.0, 50.0, 50.0, 50.0]}
TEST = {"trial-1": [90.0, 90.0, 90.0, 90.0], "trial-2": [70.0, 72.0, 71.0, 70.0], "hand-set": [68.0, 69.0, 71.0, 70.0]}


def confirm(capsys: pytest.CaptureFixture[str], *args: object) -> dict:
    code, out, err = run_cli(["confirm", "--study-name", "kd-imagefolder", *args, "--json", "-q"], capsys)
    assert code == 0, err
    return json.loads(out)


def test_confirm_ranks_on_mean_validation_and_compares_the_chosen_one_paired_on_test(
    search, home: Path, stub: StubTrainer, capsys: pytest.CaptureFixture[str]
) -> None:
    values = iter([40.0, 60.0, 55.0])
    stub.val = lambda config: next(values)
    assert search("--trials", "3", "--pruner", "none", "--no-baseline")[0] == 0  # one seed: trial 1 > 2 > 0
    arm_of_lr = {t.params["lr"]: f"trial-{t.number}" for t in load_study(home, "kd-imagefolder").trials}
    arm_of_lr[1e-3] = "hand-set"  # the tutorial's
    stub.val = lambda config: VAL[arm_of_lr[config.recipe.lr]][config.recipe.seed - 42]
    stub.test = lambda config: TEST[arm_of_lr[config.recipe.lr]][config.recipe.seed - 42]
    summary = confirm(capsys, "--top", "2", "--seeds", "3", "--no-race")
    assert summary["chosen"] == "trial-2" and summary["seeds"] == [42, 43, 44]
    rows = [(r["arm"], r["chosen"], r["baseline"], r["val_mean"], r["test_runs"]) for r in summary["rows"]]
    assert rows == [
        ("trial-1", False, False, 61.0, None),
        ("trial-2", True, False, 63.0, [70.0, 72.0, 71.0]),
        ("hand-set", False, True, 50.0, [68.0, 69.0, 71.0]),
    ]
    # By hand: differences 2, 3, 0; mean 5/3; sample variance ((1/3)² + (4/3)² + (5/3)²) / 2 = 7/3;
    # t(0.975, 2 degrees of freedom) = 4.303; half width 4.303 · √(7/3) / √3 = 3.7949.
    (comparison,) = summary["chosen_minus"].values()
    assert set(summary["chosen_minus"]) == {"hand-set"} and comparison["interval"] == "+1.67 ± 3.79"
    assert comparison["mean"] == pytest.approx(5 / 3) and comparison["half_width"] == pytest.approx(3.7949, abs=1e-4)
    chosen = summary["rows"][1]["params"]
    assert chosen["method"] == "kd" and chosen["lr"] == next(lr for lr, arm in arm_of_lr.items() if arm == "trial-2")
    companion = load_study(home, "kd-imagefolder-confirm")
    runs = companion.get_trials()
    assert len(runs) == 9 and all(t.state == TrialState.COMPLETE for t in runs)
    assert {run_of(t) for t in runs} == {(a, s) for a in VAL for s in (42, 43, 44)}
    assert companion.user_attrs["confirms"] == "kd-imagefolder" and companion.user_attrs["summary"] == summary
    # A fourth seed later: only its three runs are trained, the finished ones are kept.
    trained, stamps = len(stub.runs), {t.number: t.datetime_complete for t in runs}
    assert confirm(capsys, "--top", "2", "--seeds", "4", "--no-race")["chosen"] == "trial-2"
    again = load_study(home, "kd-imagefolder-confirm").get_trials()
    assert len(stub.runs) == trained + 3 and len(again) == 12
    assert {t.number: t.datetime_complete for t in again[:9]} == stamps
    # The companion holds runs, not a search: optimize refuses to add trials to it.
    code, _, err = search("--trials", "1", "--study-name", "kd-imagefolder-confirm")
    assert code == 2 and "holds the confirmation runs of 'kd-imagefolder'" in err
    # export now re-trains the confirmed winner, and says what confirmation found; so does the report.
    exported = yaml.safe_load(run_cli(["export", "--study-name", "kd-imagefolder"], capsys)[1])
    assert exported["source"]["trial"] == 2 and exported["source"]["confirmed"]["seeds"] == [42, 43, 44, 45]
    report = home.parent / "report.html"
    assert run_cli(["report", "--study-name", "kd-imagefolder", "-o", report], capsys)[0] == 0
    page = report.read_text()
    assert "confirmed over seeds [42, 43, 44, 45]" in page and "trial-2 (chosen)" in page
    assert "hand-set (baseline)" in page and "paired by seed, mean ± 95 % CI" in page


def test_the_confirm_table_is_printed_without_json(
    search, home: Path, stub: StubTrainer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert search("--trials", "1")[0] == 0
    code, out, err = run_cli(["confirm", "--study-name", "kd-imagefolder", "--top", "1", "--seeds", "2"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "confirmed kd-imagefolder with seeds [42, 43] (ranked on mean validation accuracy)"
    assert lines[1].startswith("  trial-0 (chosen): validation ") and lines[2].startswith("  hand-set (baseline): ")
    assert lines[3].startswith("  trial-0 − hand-set: ") and len(lines) == 4


@pytest.mark.slow
def test_confirm_trains_every_run_and_export_and_report_say_what_it_found(
    pattern_folder: Path, pattern_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end: real trainings of a search, its confirmation, then export and the report read it back."""
    args = optimize_args(pattern_folder, pattern_teacher, "--trials", "3", "--pruner", "none", "--sampler-seed", "1")
    assert run_cli(args, capsys)[0] == 0
    summary = confirm(capsys, "--top", "2", "--seeds", "2", "--no-race")
    companion = load_study(home, "kd-imagefolder-confirm")
    trials = companion.get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)  # (2 configs + hand-set) x 2
    assert {run_of(t) for t in trials} == {
        (arm, seed)
        for arm in ("hand-set", *(r["arm"] for r in summary["rows"] if not r["baseline"]))
        for seed in (42, 43)
    }
    assert all(0.0 <= t.user_attrs["test_accuracy"] <= 100.0 for t in trials)
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


def test_a_ce_study_is_the_control(search, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for method in ("kd", "ce"):
        assert search("--trials", "1", method=method)[0] == 0
    summary = confirm(capsys, "--top", "1", "--seeds", "2", "--against", "ce-imagefolder")
    control = next(r for r in summary["rows"] if r["arm"] == "control-ce-imagefolder")
    assert control["baseline"] and control["params"]["method"] == "ce" and len(control["test_runs"]) == 2
    assert set(summary["chosen_minus"]) == {"hand-set", "control-ce-imagefolder"}
    args = ["confirm", "--study-name", "kd-imagefolder", "--top", "1", "--seeds", "2", "--against", "ce-imagefolder"]
    assert "control-ce-imagefolder" in run_cli(args, capsys)[1]


@pytest.mark.parametrize(
    ("control", "change", "message"),
    [
        ("ce", {"fingerprint": "other-data"}, "'other' names a study of other data or another validation split"),
        ("cosine", {}, "'other' names a cosine study: a control needs no teacher (ce) or shares the method"),
    ],
)
def test_a_control_of_other_data_or_another_teachers_method_is_refused(
    control: str, change: dict, message: str, search, stub: StubTrainer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert search("--trials", "1")[0] == 0
    for name, value in change.items():
        setattr(stub, name, value)
    assert search("--trials", "1", "--study-name", "other", method=control)[0] == 0
    code, _, err = run_cli(["confirm", "--study-name", "kd-imagefolder", "--top", "1", "--against", "other"], capsys)
    assert code == 2 and err == f"kdsearch: error: --against {message}\n"


def test_an_interrupted_confirm_resumes_without_running_any_run_twice() -> None:
    """Waiting runs (left by a killed confirm) are not enqueued again; a copy that slipped in is not trained."""
    study = optuna.create_study(direction="maximize")
    arms = {"trial-0": RunConfig(), "hand-set": RunConfig()}
    runs = [(arm, seed) for arm in arms for seed in (42, 43)]
    _enqueue(study, runs)
    _enqueue(study, runs)  # the re-run: every run is still waiting
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
    # Two workers' race (runs of older versions carry the arm as a parameter and enqueued=True).
    fresh.enqueue_trial({"seed": 42}, user_attrs={"enqueued": {"arm": "trial-0", "seed": 42}})
    # No data is prepared: a duplicate is turned away before anything trains.
    fresh.optimize(ConfirmObjective(None, arms, [42, 43]), n_trials=1)  # type: ignore[arg-type]
    copy = fresh.trials[1]
    assert copy.state == TrialState.PRUNED and copy.user_attrs["duplicate_of"] == 0
    _enqueue(fresh, [(arm, 42) for arm in arms])
    assert [t.user_attrs["enqueued"] for t in fresh.get_trials(states=(TrialState.WAITING,))] == [
        {"arm": "hand-set", "seed": 42}
    ]


def test_the_control_is_its_studys_confirmed_winner(
    search, home: Path, stub: StubTrainer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A confirmed control is compared through the config its own confirmation chose, not its one-seed best."""
    assert search("--trials", "1")[0] == 0
    values = iter([50.0, 60.0, 55.0])
    stub.val = lambda config: next(values, 40.0)
    assert search("--trials", "3", method="ce")[0] == 0
    ce = load_study(home, "ce-imagefolder")
    ranked = sorted((t for t in ce.trials if t.value is not None), key=lambda t: -t.value)
    runner_up = ranked[-1]
    assert runner_up.number != ranked[0].number and runner_up.params["lr"] != ranked[0].params["lr"]
    companion = optuna.create_study(study_name="ce-imagefolder-confirm", storage=ce._storage)
    companion.set_user_attr("summary", {"chosen": f"trial-{runner_up.number}"})
    summary = confirm(capsys, "--top", "1", "--seeds", "1", "--against", "ce-imagefolder")
    control = next(r for r in summary["rows"] if r["arm"] == "control-ce-imagefolder")
    assert control["params"]["lr"] == runner_up.params["lr"]
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


@pytest.mark.slow
@pytest.mark.postgres
def test_two_confirm_workers_share_one_postgres_race(
    pattern_folder: Path, pattern_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two `confirm` processes on one storage, racing. ``--no-race`` runs the same loop with one rung
    (every seed at once), so sharing a race shares that too."""
    if not postgres_available():
        pytest.skip("PostgreSQL not reachable")
    name = f"confirm-{uuid.uuid4().hex[:8]}"
    storage = ["--storage", POSTGRES_URL]
    try:
        args = optimize_args(pattern_folder, pattern_teacher, "--trials", "2", "--study-name", name, *storage)
        assert run_cli(args, capsys)[0] == 0
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
        done = {run_of(t) for t in runs if t.state == TrialState.COMPLETE}
        left = [t for t in runs if t.state in (TrialState.RUNNING, TrialState.FAIL, TrialState.WAITING)]
        assert not left
        # Both workers drop the same arm after one seed, and neither runs its second seed.
        dropped = summaries[0]["race"]["dropped_after_seeds"]
        assert list(dropped.values()) == [1]
        assert len(done) == 5 and (next(iter(dropped)), 43) not in done
    finally:
        for study in (name, f"{name}-confirm"):
            optuna.delete_study(study_name=study, storage=POSTGRES_URL)


def test_confirm_survives_a_search_that_moves_on_and_another_top(
    search, home: Path, stub: StubTrainer, capsys: pytest.CaptureFixture[str]
) -> None:
    """optimize → confirm → optimize again (new trials, maybe a new best) → confirm, with other --top: no FAIL."""
    assert search("--trials", "3", "--sampler-seed", "1")[0] == 0
    assert confirm(capsys, "--top", "2", "--seeds", "2")["seeds"] == [42, 43]
    assert search("--trials", "3", "--sampler-seed", "2")[0] == 0
    for top in ("2", "3", "1"):
        summary = confirm(capsys, "--top", top, "--seeds", "2")
        best = max(load_study(home, "kd-imagefolder").get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
        assert f"trial-{best.number}" in {r["arm"] for r in summary["rows"]}
    runs = load_study(home, "kd-imagefolder-confirm").get_trials()
    assert not any(t.state == TrialState.FAIL for t in runs)
    finished = [run_of(t) for t in runs if t.state == TrialState.COMPLETE]
    assert len(finished) == len(set(finished))


def test_seeds_past_the_largest_seed_are_refused_before_any_run(
    search, home: Path, stub: StubTrainer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert search("--trials", "1", "--seed", "4294967294")[0] == 0
    trained = len(stub.runs)
    code, _, err = run_cli(["confirm", "--study-name", "kd-imagefolder", "--seeds", "5"], capsys)
    assert code == 2 and err == (
        "kdsearch: error: --seeds 5 seeds from the study's seed 4294967294 go past 4294967294\n"
    )
    assert len(stub.runs) == trained
    with pytest.raises(KeyError):
        load_study(home, "kd-imagefolder-confirm")


def test_a_search_trial_whose_artifact_is_damaged_or_gone_is_trained_again_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KDSEARCH_ARTIFACTS", str(tmp_path / "artifacts"))
    source = tmp_path / "student.pt"
    source.write_bytes(b"a kept student's bytes")
    ArtifactDirectory(study_name="s").write("kept", source.open("rb"))
    recorded = file_sha256(source)
    copy = tmp_path / "copy.pt"
    fetch_artifact("kept", copy, recorded)  # intact: copied
    assert copy.read_bytes() == source.read_bytes()
    (tmp_path / "artifacts" / "s" / "kept").write_bytes(b"a kept student's")  # truncated on disk
    with pytest.raises(UserError, match="is damaged"):
        fetch_artifact("kept", tmp_path / "again.pt", recorded)
    assert not (tmp_path / "again.pt").exists()
    # confirm then trains the run instead of reusing the search trial (nothing is prepared or built)
    assert _tested_artifact(None, RunConfig(), "kept", recorded) is None  # type: ignore[arg-type]
    assert _tested_artifact(None, RunConfig(), "gone", None) is None  # type: ignore[arg-type]
