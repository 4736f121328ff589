"""One study across methods (`optimize --method auto` or a list) and its racing confirm, on the stub trainer.

The space is the method as a categorical with each method's parameters conditional on it; every
trial holds its own method's parameters and no other's; each method's hand-set config starts the
study; export and confirm read a trial's method from its parameters. Confirm races the candidates
over seeds (successive halving) and reuses search trials that already are a run.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from kdsearch.config import RECIPE_SPACE, RunConfig
from kdsearch.confirm import run_of
from kdsearch.errors import ConfigError
from kdsearch.export import trial_run_config
from kdsearch.racing import race_rungs, survivors_of
from kdsearch.spaces import MethodSpaces, build_methods_space, suggest
from kdsearch.strategies import METHODS, get_strategy, methods_of
from tests.helpers import StubTrainer, load_study, run_cli


def own_parameters(method: str) -> set[str]:
    return set(get_strategy(method).space)


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_every_trial_holds_its_own_methods_parameters_and_no_other(
    sampler: str, search, home: Path, stub: StubTrainer
) -> None:
    code, out, err = search("--trials", "16", "--sampler", sampler, "--sampler-seed", "3", "--json", method="auto")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["study_name"] == "auto-imagefolder" and summary["complete"] + summary["pruned"] == 16
    study = load_study(home, "auto-imagefolder")
    assert study.user_attrs["method"] == "auto" and study.user_attrs["methods"] == list(METHODS)
    trials = study.get_trials()
    # The hand-set config of every method comes first, each method once: ce's is the study's control.
    assert [t.params["method"] for t in trials[: len(METHODS)]] == list(METHODS)
    assert all(t.user_attrs.get("baseline") == "tutorial" for t in trials[: len(METHODS)])
    for trial, run in zip(trials, stub.runs, strict=True):
        method = trial.params["method"]
        assert set(trial.params) == {"method", *RECIPE_SPACE, *own_parameters(method)}, (method, trial.params)
        assert run.method == method and set(run.loss.params) <= set(get_strategy(method).params)
        assert trial.user_attrs["pinned"] == {}
    assert len({t.params["method"] for t in trials}) == len(METHODS)
    # Each method keeps its own best student, so the best of every method can be exported.
    for method in METHODS:
        ranked = sorted(
            (t for t in trials if t.params["method"] == method and t.state == TrialState.COMPLETE),
            key=lambda t: (-t.value, t.number),
        )
        assert ranked[0].user_attrs.get("artifact_id"), method


def test_a_list_of_methods_is_one_study_of_those(search, home: Path) -> None:
    code, out, err = search("--trials", "4", "--json", method="kd, ce,kd")
    assert code == 0, err
    study = load_study(home, json.loads(out)["study_name"])
    assert study.study_name == "kd,ce-imagefolder" and study.user_attrs["methods"] == ["kd", "ce"]
    assert {t.params["method"] for t in study.get_trials()} <= {"kd", "ce"}
    assert methods_of("auto") == METHODS and methods_of("dkd") == ("dkd",)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--sampler", "cmaes"), "--sampler cmaes samples one fixed space; a study across methods needs tpe or random"),
        (
            ("--sampler", "grid"),
            "--sampler grid enumerates one fixed space; a study across methods needs tpe or random",
        ),
        (("--fix", "method=kd"), "--fix cannot pin method in a study across methods; pass that one method as --method"),
        (("--fix", "temprature=3"), "search space: no method of auto has a parameter 'temprature'"),
    ],
)
def test_what_a_study_across_methods_cannot_do_is_one_line(
    args: tuple[str, ...], said: str, search, home: Path
) -> None:
    code, _, err = search("--trials", "2", *args, method="auto")
    assert code == 2 and err.startswith(f"kdsearch: error: {said}") and err.count("\n") == 1, err
    assert not (home / "kdsearch.db").exists()  # refused before anything was created


def test_an_unknown_method_in_a_list_is_one_line(search) -> None:
    code, _, err = search("--trials", "2", method="kd,kdd")
    assert code == 2
    assert err == f"kdsearch: error: --method must be auto, or one or more of {', '.join(METHODS)}, got 'kdd'\n"


def test_a_pin_reaches_the_methods_that_have_it_and_only_their_trials_record_it(
    search, home: Path, stub: StubTrainer
) -> None:
    assert search("--trials", "8", "--fix", "temperature=3", "--sampler-seed", "1", method="auto")[0] == 0
    for trial in load_study(home, "auto-imagefolder").get_trials():
        having = "temperature" in get_strategy(trial.params["method"]).params
        assert trial.user_attrs["pinned"] == ({"temperature": 3} if having else {}), trial.params
        assert "temperature" not in trial.params
    assert all(run.loss.params.get("temperature", 3) == 3 for run in stub.runs)


def test_a_method_is_drawn_first_then_only_its_parameters() -> None:
    """``suggest`` on a conditional space, the way Optuna's define-by-run sees it."""
    import optuna

    space = build_methods_space([get_strategy(m) for m in ("kd", "ce")], "kd,ce", None, {})
    assert isinstance(space["method"], MethodSpaces) and space["method"].methods == ("kd", "ce")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen = set()
    for _ in range(12):
        trial = study.ask()
        values = suggest(trial, space)
        seen.add(values["method"])
        assert set(trial.params) == {"method", *RECIPE_SPACE, *own_parameters(values["method"])}
        study.tell(trial, 1.0)
    assert seen == {"kd", "ce"}


def test_an_exported_auto_pick_is_its_methods_config(search, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert search("--trials", "6", "--pruner", "none", method="auto")[0] == 0
    study = load_study(home, "auto-imagefolder")
    best = max(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    code, out, err = run_cli(["export", "--study-name", "auto-imagefolder"], capsys)
    assert code == 0, err
    exported = yaml.safe_load(out)
    assert exported["loss"]["method"] == best.params["method"] and exported["source"]["trial"] == best.number
    own = set(get_strategy(best.params["method"]).params)
    assert set(exported["loss"]["params"]) <= own
    config = RunConfig.read({k: v for k, v in exported.items() if k != "source"})
    assert config.to_dict() == trial_run_config(study, best).with_values({}).to_dict() | {
        "data": config.to_dict()["data"]  # export re-trains on the whole train split (val_size 0)
    }


def test_the_race_rungs_are_successive_halving_over_seeds() -> None:
    # k = ⌈log₂ n⌉ halvings; rung i gives ⌈seeds / 2^(k − i)⌉ seeds.
    assert race_rungs(1, 5) == [5]
    assert race_rungs(2, 5) == [3, 5]
    assert race_rungs(3, 5) == [2, 3, 5]
    assert race_rungs(4, 5) == [2, 3, 5]
    assert race_rungs(5, 5) == [1, 2, 3, 5]
    assert race_rungs(8, 2) == [1, 2]
    assert survivors_of({"a": 1.0, "b": 3.0, "c": 2.0}, 2) == ["b", "c"]
    assert survivors_of({"a": 2.0, "b": 2.0}, 1) == ["a"]  # a tie keeps the one listed first


# Validation accuracy by method over seeds 42…46. The search trials (seed 42) rank kd > hybrid > dkd,
# so those three are raced (top 3). By hand, rungs 2, 3, 5: after two seeds hybrid 59.0, kd 58.5,
# dkd 57.5 (dropped); after three kd 59.67, hybrid 58.67 (dropped); kd runs all five.
VAL = {
    "kd": [60.0, 57.0, 62.0, 61.0, 60.0],
    "hybrid": [59.0, 59.0, 58.0, 58.0, 58.0],
    "dkd": [58.0, 57.0, 56.0, 56.0, 56.0],
    "regressor": [55.0] * 5,
    "cosine": [50.0] * 5,
    "ce": [52.0, 51.0, 53.0, 52.0, 52.0],
}
TEST = {"kd": [70.0, 71.0, 72.0, 70.0, 71.0], "ce": [68.0, 70.0, 70.0, 69.0, 69.0]}


def racing_stub(stub: StubTrainer) -> None:
    stub.val = lambda config: VAL[config.method][config.recipe.seed - 42]
    stub.test = lambda config: TEST.get(config.method, [0.0] * 5)[config.recipe.seed - 42]


def test_the_race_drops_the_worse_half_and_reuses_the_search_trials(
    search, home: Path, stub: StubTrainer, capsys: pytest.CaptureFixture[str]
) -> None:
    racing_stub(stub)
    assert search("--trials", "6", "--pruner", "none", method="auto")[0] == 0  # the six hand-set configs
    arm = {m: f"trial-{METHODS.index(m)}" for m in METHODS}  # enqueued in METHODS order
    searched = len(stub.runs)
    code, out, err = run_cli(["confirm", "--study-name", "auto-imagefolder", "--json", "-q"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["race"] == {"rungs": [2, 3, 5], "dropped_after_seeds": {arm["dkd"]: 2, arm["hybrid"]: 3}}
    assert summary["chosen"] == arm["kd"]
    rows = {r["arm"]: r for r in summary["rows"]}
    assert {a: r["seeds_run"] for a, r in rows.items()} == {arm["kd"]: 5, arm["hybrid"]: 3, arm["dkd"]: 2,
                                                            "control-ce": 5}  # fmt: skip
    assert rows[arm["kd"]]["val_mean"] == pytest.approx(statistics.fmean(VAL["kd"]))
    assert rows[arm["hybrid"]]["test_runs"] is None and rows["control-ce"]["baseline"]
    # Seed 42 of every arm is its search trial: not trained again. The rest: dkd 1, hybrid 2, kd 4, ce 4.
    trained = stub.runs[searched:]
    assert len(trained) == 11 and all(run.recipe.seed != 42 for run in trained)
    runs = load_study(home, "auto-imagefolder-confirm").get_trials(states=(TrialState.COMPLETE,))
    reused = {run_of(t): t.user_attrs["reused_trial"] for t in runs if "reused_trial" in t.user_attrs}
    assert reused == {(arm[m], 42): METHODS.index(m) for m in ("kd", "hybrid", "dkd")} | {("control-ce", 42): 0}
    # By hand: kd − ce on test = 2, 1, 2, 1, 2: mean 1.6, sd √0.3, t(0.975, 4) = 2.776.
    comparison = summary["chosen_minus"]["control-ce"]
    assert comparison["mean"] == pytest.approx(1.6)
    assert comparison["half_width"] == pytest.approx(2.776 * math.sqrt(0.3) / math.sqrt(5))
    assert comparison["interval"] == "+1.60 ± 0.68"
    # The table says which arms were raced out, and export re-trains the confirmed winner.
    code, out, _ = run_cli(["confirm", "--study-name", "auto-imagefolder"], capsys)
    assert f"  {arm['dkd']} (raced out after 2 seeds): validation 57.50% mean" in out.splitlines()
    assert len(stub.runs) == searched + 11  # confirming again trains nothing
    exported = yaml.safe_load(run_cli(["export", "--study-name", "auto-imagefolder"], capsys)[1])
    assert exported["loss"]["method"] == "kd" and exported["source"]["confirmed"]["seeds"] == [42, 43, 44, 45, 46]


def test_an_interrupted_race_resumes_without_running_any_run_twice(
    search, home: Path, stub: StubTrainer, capsys: pytest.CaptureFixture[str]
) -> None:
    racing_stub(stub)
    assert search("--trials", "6", "--pruner", "none", method="auto")[0] == 0
    searched, calls = len(stub.runs), []
    honest = stub.val

    def interrupted_once(config: RunConfig) -> float:
        calls.append(config)
        if len(calls) == 7:  # the second rung, mid-way
            raise KeyboardInterrupt
        return honest(config)

    stub.val = interrupted_once
    code, _, err = run_cli(["confirm", "--study-name", "auto-imagefolder", "-q"], capsys)
    assert code == 130 and err == "kdsearch: interrupted\n"  # one line: no empty one before it
    stub.val = honest
    code, out, err = run_cli(["confirm", "--study-name", "auto-imagefolder", "--json", "-q"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["chosen"] == f"trial-{METHODS.index('kd')}" and summary["race"]["rungs"] == [2, 3, 5]
    # 11 runs, plus the one cut short, which ran again; no finished run twice.
    assert len(stub.runs) == searched + 12
    finished = [
        run_of(t) for t in load_study(home, "auto-imagefolder-confirm").get_trials(states=(TrialState.COMPLETE,))
    ]
    assert len(finished) == len(set(finished)) == 15


def test_a_space_file_for_auto_may_say_so_and_reaches_each_method(tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("method: auto\nparameters:\n  temperature: {type: float, low: 1, high: 3}\n  lr: 0.002\n")
    strategies = [get_strategy(m) for m in METHODS]
    built = build_methods_space(strategies, "auto", str(space), {})
    assert built["lr"] == 0.002
    for method, own in built["method"].spaces.items():
        assert ("temperature" in own) == ("temperature" in get_strategy(method).params)
        if "temperature" in own:
            assert (own["temperature"].low, own["temperature"].high) == (1.0, 3.0)
    with pytest.raises(ConfigError, match="sets width"):
        build_methods_space(strategies, "auto", None, {"width": 1.0})


def test_the_report_shows_each_methods_best_side_by_side_at_readable_precision(
    search, home: Path, stub: StubTrainer, capsys: pytest.CaptureFixture[str]
) -> None:
    racing_stub(stub)
    assert search("--trials", "9", "--pruner", "none", "--sampler-seed", "2", method="auto")[0] == 0
    report = home.parent / "report.html"
    code, _, err = run_cli(["report", "--study-name", "auto-imagefolder", "-o", report], capsys)
    assert code == 0, err
    page = report.read_text()
    assert "method auto (one study across ce, cosine, dkd, hybrid, kd, regressor)" in page
    section = page.split("<h2>best trial of each method</h2>")[1].split("</table>")[0]
    rows = section.split("<tr>")[2:]
    assert [row.split("<td>")[1].split("</td>")[0] for row in rows] == ["kd", "hybrid", "dkd", "regressor", "ce",
                                                                        "cosine"]  # fmt: skip
    # No parameter is printed with more than 3 significant digits (a sampled lr has 16).
    numbers = re.findall(r"&quot;lr&quot;: ([0-9.e-]+)", page)
    assert len(numbers) >= 9  # the best trials and each method's best
    for number in numbers:
        assert len(number.replace("0.", "").replace("-", "").lstrip("0").split("e")[0].replace(".", "")) <= 3


@pytest.mark.parametrize("method", ["kd", "auto"])
def test_joining_a_study_with_other_categorical_choices_is_refused_before_a_trial(
    method: str, search, home: Path, tmp_path: Path
) -> None:
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text("parameters:\n  optimizer: {type: categorical, choices: [adam, sgd]}\n")
    assert search("--trials", "2", "--space", narrow, "--study-name", "s", method=method)[0] == 0
    wide = tmp_path / "wide.yaml"
    wide.write_text("parameters:\n  augment: {type: categorical, choices: [none, flip, shift]}\n")
    for extra in ((), ("--space", wide)):
        code, _, err = search("--trials", "1", "--study-name", "s", *extra, method=method)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith("kdsearch: error: --study-name 's' searched ") and "choose another" in err
    trials = load_study(home, "s").get_trials()
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 2
    assert not any(t.state == TrialState.FAIL for t in trials)
    # Numeric ranges may move, and the same choices join as before.
    assert search("--trials", "1", "--study-name", "s", "--space", narrow, "--lr", "0.002", method=method)[0] == 0


def test_every_method_gets_its_share_of_trials_before_tpe_picks_the_method(
    search, home: Path, stub: StubTrainer
) -> None:
    """TPE alone settles on whichever method leads early; half the study is spread evenly over the methods."""
    from collections import Counter

    from kdsearch.samplers import even_floor

    stub.val = lambda config: 90.0 if config.method == "ce" else 10.0  # ce leads from the first trial
    assert search("--trials", "36", "--sampler-seed", "4", "--pruner", "none", method="auto")[0] == 0
    trials = load_study(home, "auto-imagefolder").get_trials()
    tried = Counter(t.params["method"] for t in trials)
    assert even_floor(36, len(METHODS)) == 3 and min(tried[m] for m in METHODS) >= 3, tried
    # Until every method has its share, the least-tried one is drawn: the first 18 trials cover each 3 times.
    assert Counter(t.params["method"] for t in trials[:18]) == dict.fromkeys(METHODS, 3)
    assert tried["ce"] > 3  # then TPE follows the leader


def test_a_kept_student_is_the_run_whatever_paths_its_config_was_given_with() -> None:
    """A search given relative paths (or no teacher) records them so; the study records them resolved."""
    from kdsearch.confirm import _same_run

    wanted = RunConfig.read({"dataset": "imagefolder", "data_dir": "/abs/data", "teacher": "/abs/t.pt"}).to_dict()
    recorded = RunConfig.read({"dataset": "imagefolder", "data_dir": "../data", "teacher": None}).to_dict()
    assert _same_run(recorded, wanted)
    other_seed = RunConfig.read({"dataset": "imagefolder", "data_dir": "../data", "seed": 43}).to_dict()
    assert not _same_run(other_seed, wanted) and not _same_run({"models": {}}, wanted) and not _same_run(None, wanted)


@pytest.mark.slow
def test_an_auto_pick_exported_is_what_train_config_trains(
    pattern_folder: Path, pattern_teacher: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end, real trainings: a small study across methods, its best exported, `train --config` on it."""
    from tests.helpers import optimize_args

    args = optimize_args(pattern_folder, pattern_teacher, "--trials", "8", "--sampler-seed", "5", method="auto")
    assert run_cli([*args, "--pruner", "none"], capsys)[0] == 0
    study = load_study(home, "auto-imagefolder")
    best = max(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: (t.value, -t.number))
    path = tmp_path / "best.yaml"
    assert run_cli(["export", "--study-name", "auto-imagefolder", "-o", path], capsys)[0] == 0
    exported = yaml.safe_load(path.read_text())
    assert exported["loss"]["method"] == best.params["method"] and exported["source"]["trial"] == best.number
    code, out, err = run_cli(["train", "--config", path, "--json", "-q"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["method"] == best.params["method"]
    assert result["config"] == {key: exported[key] for key in ("data", "models", "recipe", "loss")}
    assert 0.0 <= result["test_accuracy"] <= 100.0
