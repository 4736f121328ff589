"""Errors name fields; the command line says them as flags and the file reader as keys, each in one place."""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path

import click
import optuna
import pytest
import yaml

from kdsearch.cli import _confirm_lines, cli
from kdsearch.cli_options import flag
from kdsearch.config import KNOBS, RunConfig, migrate
from kdsearch.confirm import HEARTBEAT_SECONDS, _enqueue, run_of
from kdsearch.errors import MENTION, ConfigError, UserError
from kdsearch.export import confirm_table
from kdsearch.search_config import SearchConfig
from kdsearch.settings import EvaluateSettings
from kdsearch.storage import pareto_front
from tests.helpers import run_cli

PACKAGE = Path(__file__).resolve().parents[1] / "kdsearch"
# The command line: the one place that names flags.
COMMAND_LINE = {"cli.py", "cli_options.py"}
FLAG = re.compile(r"--[a-z]")


def _docstrings(tree: ast.AST) -> set[int]:
    """The string constants that are docstrings (they may describe the command line)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def flags_in_messages(source: str, where: str) -> list[str]:
    """Every string literal (f-string parts included) of a module that holds a flag, docstrings aside."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    return [
        f"{where}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and FLAG.search(node.value)
    ]


def test_no_module_below_the_command_line_names_a_flag() -> None:
    modules = {str(path.relative_to(PACKAGE)): path for path in sorted(PACKAGE.rglob("*.py"))}
    below = {name: path for name, path in modules.items() if name not in COMMAND_LINE}
    assert len(below) > 20
    assert [hit for name, path in below.items() for hit in flags_in_messages(path.read_text(), name)] == []


def test_the_scan_sees_flags_in_strings_and_f_strings_but_not_in_docstrings_or_comments() -> None:
    source = '"""Pass --val-size."""\n# --width\nA = "pass --teacher"\nB = f"{A} then --trials {A}"\n'
    assert flags_in_messages(source, "probe.py") == ["probe.py:3: 'pass --teacher'", "probe.py:4: ' then --trials '"]


def _one_line_exit_2(args: list[object], capsys: pytest.CaptureFixture[str]) -> str:
    code, out, err = run_cli(args, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("kdsearch: error: "), err
    return err.removeprefix("kdsearch: error: ").strip()


def test_a_bad_value_in_a_config_file_names_its_key(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "best.yaml"
    config.write_text(yaml.safe_dump({"data": {"val_size": -1}, "loss": {"method": "ce"}}))
    assert _one_line_exit_2(["train", "--config", config], capsys) == (
        f"config {config}: data.val_size must be at least 0, got -1"
    )
    flat = tmp_path / "old.yaml"  # the flat form of older versions: its keys are flat too
    flat.write_text(yaml.safe_dump({"method": "ce", "val_size": -1}))
    assert (
        _one_line_exit_2(["train", "--config", flat], capsys) == f"config {flat}: val_size must be at least 0, got -1"
    )


def test_the_same_value_on_the_command_line_names_the_flag(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _one_line_exit_2(["train", "--method", "ce", "--val-size", "-1"], capsys) == (
        "--val-size must be at least 0, got -1"
    )


@pytest.mark.parametrize(
    ("option", "value"),
    [("epochs", "0"), ("batch_size", "0"), ("lr", "0"), ("seed", "-1"), ("width", "100"), ("label_smoothing", "1")],
)
def test_a_range_is_checked_once_in_one_wording(
    option: str, value: str, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the knob says about a value is what the command line says, under the flag: click checks no range."""
    with pytest.raises(ConfigError) as caught:
        KNOBS[option].validate(option, KNOBS[option].kind(value))
    said = _one_line_exit_2(["train", "--method", "ce", flag(option), value], capsys)
    assert said == f"{flag(option)} {caught.value.problem}" and "is not in the range" not in said


def test_a_run_time_error_names_the_flag_or_the_file_key_the_value_came_from(
    pattern_folder: Path, tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A validation split larger than the data is found only once the data is read: the error still
    names the value the way the user gave it."""
    data = ["--dataset", "imagefolder", "--data-dir", pattern_folder, "--device", "cpu"]
    said = _one_line_exit_2(["train", "--method", "ce", *data, "--val-size", "300"], capsys)
    assert said == "--val-size must be below the 300 images of the train set, got 300"
    config = tmp_path / "c.yaml"
    document = {"data": {"dataset": "imagefolder", "data_dir": str(pattern_folder), "val_size": 300}}
    config.write_text(yaml.safe_dump(document | {"loss": {"method": "ce"}}))
    said = _one_line_exit_2(["train", "--config", config, "--device", "cpu"], capsys)
    assert said == f"config {config}: data.val_size must be below the 300 images of the train set, got 300"


def test_a_message_mentioning_another_field_says_both_the_users_way(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        SearchConfig()
    assert str(caught.value) == "trials or timeout SECONDS must be given (or both)"
    said = _one_line_exit_2(["optimize", "--method", "kd"], capsys)
    assert said == "--trials or --timeout SECONDS must be given (or both)"


def test_every_help_text_says_fields_as_flags() -> None:
    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and param.help:
                assert not MENTION.search(param.help), (name, param.name, param.help)
    optimize = {p.name: p.help for p in cli.commands["optimize"].params}
    assert "(all --n-jobs workers together); with --total" in str(optimize["trials"])


def test_a_field_error_survives_a_worker_process() -> None:
    """Workers send their errors to the parent as pickles; the field must arrive, to be said as a flag."""
    error = pickle.loads(pickle.dumps(ConfigError("val_size", "must be positive")))
    assert isinstance(error, ConfigError) and (error.name, error.problem) == ("val_size", "must be positive")
    assert error.say(flag) == "--val-size must be positive"


def test_every_flat_form_is_read_by_migrating_it_to_the_sectioned_one() -> None:
    flat = {"method": "kd", "epochs": 3, "val_size": 10, "hyperparameters": {"lr": 0.004, "temperature": 7.0}}
    document = migrate(flat)
    assert document == {
        "data": {"val_size": 10},
        "models": {},
        "recipe": {"epochs": 3, "lr": 0.004},
        "loss": {"params": {"temperature": 7.0}, "method": "kd"},
    }
    assert RunConfig.read(flat) == RunConfig.read(document) == RunConfig.from_dict(flat, origin="x")
    with pytest.raises(UserError, match=r"config x: unknown keys \['learning_rate'\]"):
        RunConfig.from_dict({"learning_rate": 3}, origin="x")


def test_defaults_are_read_from_their_declarations() -> None:
    """Each default stated once: the command line's are the declarations', and a shared rule is one rule."""
    train = {p.name: p for p in cli.commands["train"].params}
    assert (train["method"].default, train["device"].default) == (RunConfig().method, RunConfig().device)
    evaluate = {p.name: p for p in cli.commands["evaluate"].params}
    assert evaluate["width"].default is None  # from the checkpoint; the range is the run's
    with pytest.raises(ConfigError, match="width must be at most 16"):
        EvaluateSettings(checkpoint="c.pt", width=100.0)
    assert HEARTBEAT_SECONDS == SearchConfig(trials=1).heartbeat  # confirm beats like a search


def test_a_confirmation_run_is_known_by_our_own_attribute() -> None:
    """A waiting run's (arm, seed) is read from the user attribute kdsearch set, not Optuna's internals."""
    study = optuna.create_study(direction="maximize")
    _enqueue(study, [("trial-0", 42)])
    (waiting,) = study.get_trials()
    assert waiting.user_attrs["enqueued"] == {"arm": "trial-0", "seed": 42}
    assert run_of(waiting) == ("trial-0", 42)


def test_the_pareto_front_has_one_order() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for accuracy, params in ((70.0, 300.0), (60.0, 100.0), (65.0, 200.0), (50.0, 400.0)):
        study.add_trial(optuna.create_trial(values=[accuracy, params]))
    assert [t.values for t in pareto_front(study)] == [[60.0, 100.0], [65.0, 200.0], [70.0, 300.0]]


def test_the_confirm_table_is_one_for_the_command_and_the_report() -> None:
    summary = {
        "study": "s",
        "seeds": [42, 43],
        "chosen": "trial-3",
        "rows": [
            {"arm": "trial-3", "chosen": True, "baseline": False, "val_mean": 71.0, "test_runs": [70.0, 72.0]},
            {"arm": "trial-5", "chosen": False, "baseline": False, "val_mean": 70.0, "test_runs": None},
            {"arm": "hand-set", "chosen": False, "baseline": True, "val_mean": 69.0, "test_runs": [68.0, 69.0]},
        ],
        "chosen_minus": {"hand-set": {"interval": "+2.50 ± 6.35", "mean": 2.5, "half_width": 6.35}},
    }
    for row in summary["rows"]:
        row["params"] = {"method": "kd", "lr": 0.001}
    rows, differences = confirm_table(summary)
    assert [r["config"] for r in rows] == ["trial-3 (chosen)", "trial-5", "hand-set (baseline)"]
    assert [r["test % (mean)"] for r in rows] == [71.0, None, 68.5]
    assert differences == ["trial-3 − hand-set: +2.50 ± 6.35 test points (paired by seed, mean ± 95 % CI)"]
    assert _confirm_lines(summary) == [
        "confirmed s with seeds [42, 43] (ranked on mean validation accuracy)",
        "  trial-3 (chosen): validation 71.00% mean, test 71.00% mean",
        "  trial-5: validation 70.00% mean",
        "  hand-set (baseline): validation 69.00% mean, test 68.50% mean",
        f"  {differences[0]}",
    ]
