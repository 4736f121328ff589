"""A model class the user names (``package.module:Class``) runs its module's code: kdsearch imports
it only after every check that needs no model has passed, and before any training, so a run that
something else refuses never runs it, and a class that is not there never waits for a teacher."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import files_under, run_cli

MODULE = """\
from pathlib import Path

import torch.nn as nn

Path({marker!r}).write_text("imported")


class Net(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.features(x))
"""


@pytest.fixture()
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A module ``usermodel`` in the working directory whose import writes the returned marker file."""
    marker = tmp_path / "imported.txt"
    package = tmp_path / "cwd"
    package.mkdir()
    (package / "usermodel.py").write_text(MODULE.format(marker=str(marker)))
    monkeypatch.chdir(package)
    monkeypatch.syspath_prepend(str(package))
    sys.modules.pop("usermodel", None)
    yield marker
    sys.modules.pop("usermodel", None)  # the next test's module writes its own marker


def refused(args: list[object], capsys: pytest.CaptureFixture[str]) -> str:
    code, out, err = run_cli(args, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1, (code, out, err)
    return err


def test_a_run_refused_for_its_data_never_imports_the_model(
    user_module: Path, tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-folder"
    data = ["--dataset", "imagefolder", "--data-dir", missing]
    for args in (
        ["train", "--method", "ce", "--student-model", "usermodel:Net", *data],
        ["optimize", "--method", "ce", "--student-model", "usermodel:Net", "--trials", "1", *data],
        ["teacher", "--model", "usermodel:Net", *data],
        ["layers", "--model", "usermodel:Net", *data],
    ):
        assert "no-such-folder" in refused(args, capsys)
        assert not user_module.exists(), args


def test_a_config_file_naming_a_model_is_refused_for_its_data_before_the_import(
    user_module: Path, tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"dataset": "imagefolder", "data_dir": str(tmp_path / "no-such-folder")},
        "models": {"student_model": "usermodel:Net"},
        "loss": {"method": "ce", "params": {}},
    }))  # fmt: skip
    assert "no-such-folder" in refused(["train", "--config", config], capsys)
    assert not user_module.exists()


def test_a_teacher_whose_output_is_refused_never_imports_the_model(
    user_module: Path, pattern_folder: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inside = pattern_folder / "train" / "teacher.pt"
    args = ["teacher", "--model", "usermodel:Net", "--dataset", "imagefolder", "--data-dir", pattern_folder]
    assert "inside" in refused([*args, "--out", inside], capsys)
    assert not user_module.exists() and not inside.exists()


@pytest.mark.parametrize("student", ["usermodel:NoSuchNet", "torch.nn:NoSuchClass", "no_such_module:Net"])
def test_a_student_that_cannot_be_built_is_refused_before_a_teacher_trains(
    student: str, user_module: Path, pattern_folder: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--method", "kd", "--student-model", student, "--dataset", "imagefolder"]
    err = refused([*args, "--data-dir", pattern_folder, "--val-size", "50", "--epochs", "1"], capsys)
    assert "no class" in err or "cannot import" in err
    assert files_under(home / "teachers") == set()


def test_a_model_that_passes_every_check_is_imported_and_trains(
    user_module: Path, pattern_folder: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "student.pt"
    args = ["train", "--method", "ce", "--student-model", "usermodel:Net", "--dataset", "imagefolder"]
    code, _, err = run_cli(
        [*args, "--data-dir", pattern_folder, "--val-size", "50", "--epochs", "1", "--out", out], capsys
    )
    assert code == 0, err
    assert user_module.read_text() == "imported" and out.is_file()
