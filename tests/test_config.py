"""The config is the one source of truth: CLI options, exports, study identity and checkpoints come from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click
import optuna
import pytest
from optuna.distributions import FloatDistribution

from kdsearch.cli import cli
from kdsearch.cli_options import flag
from kdsearch.config import (
    KNOBS,
    DataConfig,
    ModelsConfig,
    RecipeConfig,
    RunConfig,
)
from kdsearch.errors import ConfigError, UserError, speak
from kdsearch.export import trial_config
from kdsearch.knobs import knobs_of
from kdsearch.search_config import SearchConfig
from kdsearch.study import identity_keys
from tests.helpers import run_cli

SEARCH_KNOBS = {name for name, _ in knobs_of(SearchConfig)}


def option_names(command: str) -> set[str]:
    cmd = cli.commands[command]
    assert isinstance(cmd, click.Command)
    return {p.name for p in cmd.params if p.name is not None}


def knobs(*sections: type) -> set[str]:
    return {name for section in sections for name, _ in knobs_of(section)}


def test_every_command_line_option_is_a_config_field() -> None:
    """A knob declared once is an option everywhere it belongs; nothing else is spelled out by hand."""
    assert option_names("train") == set(KNOBS) | {"method", "device", "config", "rank", "hp", "out"} | {
        "json",
        "quiet",
    }
    assert option_names("optimize") == set(KNOBS) | SEARCH_KNOBS | {"method", "device", "json", "quiet"}
    assert option_names("teacher") == knobs(DataConfig, RecipeConfig) | {
        "model",
        "preset",
        "device",
        "out",
        "json",
        "quiet",
    }
    assert knobs(DataConfig) <= option_names("evaluate")
    train = {p.name: p for p in cli.commands["train"].params}
    for name, rule in KNOBS.items():
        option = train[name]
        assert isinstance(option, click.Option)
        assert option.opts == [flag(name)] and option.help == speak(rule.help, flag)
        section = next(s for s in (DataConfig, ModelsConfig, RecipeConfig) if name in s.__dataclass_fields__)
        assert option.default == section.__dataclass_fields__[name].default  # each default stated once


def test_a_config_round_trips_through_its_exported_and_flat_forms() -> None:
    config = RunConfig.from_flat(
        {
            "method": "dkd",
            "dataset": "imagefolder",
            "data_dir": "/data",
            "limit_train": 100,
            "width": 0.5,
            "optimizer": "sgd",
            "weight_decay": 5e-4,
            "label_smoothing": 0.1,
            "hyperparameters": {"beta": 4.0},
        },
        origin="of a test",
    )
    assert config.loss.params == {"alpha": 1.0, "beta": 4.0, "temperature": 4.0}  # complete: tutorial values filled
    assert RunConfig.from_dict(config.to_dict(), origin="x") == config
    assert RunConfig.from_flat(config.flat(), origin="x") == config
    assert set(config.to_dict()) == {"data", "models", "recipe", "loss"}
    assert config.to_dict()["recipe"] == dataclasses.asdict(config.recipe)


def test_configs_exported_before_the_sections_still_train() -> None:
    """Older exports were flat and kept the recipe (lr, schedule, augmentation) among the method's values."""
    legacy = {
        "method": "kd",
        "dataset": "imagefolder",
        "epochs": 3,
        "hyperparameters": {"lr": 0.004, "lr_schedule": "cosine", "augment": "flip", "temperature": 7.0},
        "source": {"study": "s"},
        "kdsearch_version": "0.1.0",
    }
    config = RunConfig.from_dict(legacy, origin="old.yaml")
    assert (config.recipe.lr, config.recipe.lr_schedule, config.recipe.augment) == (0.004, "cosine", "flip")
    assert config.recipe.epochs == 3 and config.loss.params == {"soft_target_weight": 0.25, "temperature": 7.0}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"recipe": {"seed": "abc"}}, "config c.yaml: recipe.seed must be a number, got 'abc'"),
        ({"recipe": {"seed": 1e23}}, "seed must be at most 4294967294"),
        ({"recipe": {"seed": 1.5}}, "seed must be an integer, got 1.5"),
        ({"models": {"student_model": 5}}, "student_model must be a non-empty string, got 5"),
        ({"models": {"width": 100000}}, "width must be at most 16"),
        ({"recipe": {"lr": float("nan")}}, "lr must be finite"),
        ({"data": {"val_size": -1}}, "data.val_size must be at least 0"),
        ({"recipe": {"momentum": 0.9}}, "section recipe has unknown keys ['momentum']"),
        ({"loss": {"method": "fitnets"}}, "loss.method must be one of"),
        ({"loss": {"method": "kd", "params": {"soft_target_weight": 2}}}, "soft_target_weight must be at most 1"),
        ({"loss": {"method": "kd", "params": []}}, "must be a mapping of name to value, got []"),
        ({"trainer": {}}, "config c.yaml: unknown keys ['trainer']"),
    ],
)
def test_a_bad_value_in_a_config_file_is_named_by_its_key(document: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RunConfig.from_dict(document, origin="c.yaml")


def test_sections_validate_when_built_and_name_the_field() -> None:
    with pytest.raises(ConfigError) as caught:
        RecipeConfig(epochs=0)
    assert caught.value.name == "epochs" and caught.value.problem == "must be at least 1, got 0"
    with pytest.raises(ConfigError, match="study_name must be 1-128 characters"):
        SearchConfig(trials=1, study_name="..")
    with pytest.raises(ConfigError, match="study_name must be 1-128 characters"):
        SearchConfig(trials=1, study_name="x" * 300)
    with pytest.raises(ConfigError, match="trials or timeout"):
        SearchConfig()
    with pytest.raises(ConfigError, match="objectives must start with accuracy"):
        SearchConfig(trials=1, objectives="params")
    assert SearchConfig(trials=1, objectives="accuracy,params").objective_names == ("accuracy", "params")


def test_trial_values_land_in_their_sections() -> None:
    config = RunConfig().with_values({"lr": 0.01, "width": 0.5, "temperature": 3.0, "augment": "flip"})
    assert config.recipe.lr == 0.01 and config.recipe.augment == "flip"
    assert config.models.width == 0.5 and config.loss.params["temperature"] == 3.0


def test_study_identity_and_exports_are_the_configs_fields() -> None:
    config = RunConfig.from_flat({"method": "kd", "dataset": "imagefolder", "data_dir": "/d"}, origin="x")
    keys = identity_keys(config)
    assert {k for k, rule in KNOBS.items() if rule.identity} <= set(keys)
    assert set(keys) <= set(KNOBS) | {"method", "objectives", "data_fingerprint", "teacher_sha256"}
    assert not {"lr", "seed", "optimizer", "teacher", "data_dir"} & set(keys)  # searched, or not compared

    study = optuna.create_study(direction="maximize")
    for key, value in (config.flat() | {"objectives": ["accuracy"]}).items():
        study.set_user_attr(key, value)
    study.add_trial(
        optuna.trial.create_trial(
            params={"lr": 0.003, "temperature": 5.0},
            distributions={"lr": FloatDistribution(1e-4, 1e-2, log=True), "temperature": FloatDistribution(1, 8)},
            value=71.0,
            user_attrs={"seed": 7, "fixed_params": {"soft_target_weight": 0.5}},
        )
    )
    exported = trial_config(study, study.trials[0], "sqlite:///x.db")
    assert set(exported) == set(config.to_dict()) | {"source", "kdsearch_version"}
    rebuilt = RunConfig.from_dict(exported, origin="export")
    assert rebuilt.recipe.lr == 0.003 and rebuilt.recipe.seed == 7 and rebuilt.data.val_size == 0
    assert rebuilt.loss.params == {"soft_target_weight": 0.5, "temperature": 5.0}
    assert dataclasses.replace(rebuilt, recipe=config.recipe, data=config.data, loss=config.loss) == config


def test_help_does_not_import_torch() -> None:
    """The command line is declared from torch-free modules: `kdsearch --help` answers at once."""
    import subprocess
    import sys

    code = "import sys, kdsearch.cli; kdsearch.cli.cli.main(['optimize', '--help'], standalone_mode=False); "
    code += "print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (
        "--optimizer [adam|adamw|sgd]" in done.stdout and "--method [ce|cosine|dkd|hybrid|kd|regressor]" in done.stdout
    )
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_a_teacher_preset_is_a_recipe_the_options_override(
    pattern_folder: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kdsearch.checkpoints import load_checkpoint
    from kdsearch.config import TEACHER_PRESETS

    out = tmp_path / "strong.pt"
    args = ["teacher", "--dataset", "imagefolder", "--data-dir", pattern_folder, "--preset", "strong", "--epochs", "1"]
    code, _, err = run_cli(
        [*args, "--limit-train", "32", "--out", out, "-q"], capsys
    )  # 32 images: the recipe is the point
    assert code == 0, err
    recorded = load_checkpoint(out).metadata["recipe"]
    assert recorded == dataclasses.asdict(RecipeConfig(**(TEACHER_PRESETS["strong"] | {"epochs": 1})))
    assert recorded["augment"] == "flip" and recorded["optimizer"] == "adamw"
