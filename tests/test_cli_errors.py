"""Every user error: one line on stderr, exit code 2, nothing written (caches aside)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdsearch.checkpoints import save_checkpoint
from kdsearch.models import DeepNN, LightNN
from tests.helpers import files_under, run_cli


@pytest.fixture()
def error_env(tmp_path: Path, pattern_folder: Path, pattern_teacher: Path, home: Path) -> dict[str, str]:
    """Paths the error cases refer to: data, teachers of the wrong kind, bad files."""
    (tmp_path / "empty").mkdir()
    torch.save(LightNN().state_dict(), tmp_path / "light.pt")
    save_checkpoint(tmp_path / "five.pt", DeepNN(num_classes=5), {"model": "deepnn", "num_classes": 5})
    (tmp_path / "bad.yaml").write_text("method: [kd\n")
    (tmp_path / "unknown-key.yaml").write_text("method: kd\nlearning_rate: 3\n")
    (tmp_path / "space-unknown.yaml").write_text("parameters:\n  momentum: {type: float, low: 0, high: 1}\n")
    (tmp_path / "space-inverted.yaml").write_text("parameters:\n  temperature: {type: float, low: 8, high: 1}\n")
    (tmp_path / "space-type.yaml").write_text("parameters:\n  temperature: {type: categorical, choices: [1, 2]}\n")
    (tmp_path / "space-value.yaml").write_text("parameters:\n  temperature: {type: float, low: -1, high: 2}\n")
    (tmp_path / "evil.pt").write_bytes(b"\x80\x04not a checkpoint")
    return {"data": str(pattern_folder), "teacher": str(pattern_teacher), "tmp": str(tmp_path)}


DATA = ["--dataset", "imagefolder", "--data-dir", "{data}", "--val-size", "50"]
TRAIN = ["train", *DATA, "--epochs", "1", "--teacher", "{teacher}", "--out", "{tmp}/out.pt"]
OPT = ["optimize", *DATA, "--epochs", "1", "--teacher", "{teacher}", "--trials", "1"]

CASES = {
    "unknown dataset": (["train", "--dataset", "mnist2"], "mnist2"),
    "unknown method": (["train", "--method", "fitnets"], "fitnets"),
    "unknown student model": ([*TRAIN, "--student-model", "resnet"], "unknown model 'resnet'"),
    "unimportable model": ([*TRAIN, "--student-model", "nosuch.mod:Net"], "cannot import model module"),
    "missing data dir": (["train", "--dataset", "imagefolder", "--data-dir", "{tmp}/nope"], "does not exist"),
    "empty data dir": (["train", "--dataset", "imagefolder", "--data-dir", "{tmp}/empty"], "missing"),
    "imagefolder without dir": (["train", "--dataset", "imagefolder"], "needs --data-dir"),
    "teacher of another architecture": ([*TRAIN, "--teacher", "{tmp}/light.pt"], "does not fit model deepnn"),
    "teacher of another class count": ([*TRAIN, "--teacher", "{tmp}/five.pt"], "5 classes"),
    "missing teacher": ([*TRAIN, "--teacher", "{tmp}/none.pt"], "does not exist"),
    "corrupt checkpoint": ([*TRAIN, "--teacher", "{tmp}/evil.pt"], "cannot load checkpoint"),
    "unknown teacher layer": ([*TRAIN, "--method", "cosine", "--teacher-layer", "body"], "no layer 'body'"),
    "unknown student layer": ([*TRAIN, "--method", "cosine", "--student-layer", "body"], "no layer 'body'"),
    "unmatched feature maps": ([*TRAIN, "--method", "regressor", "--student-layer", "features.0"], "spatial size"),
    "invalid config yaml": (["train", "--config", "{tmp}/bad.yaml"], "not valid YAML"),
    "unknown config key": (["train", "--config", "{tmp}/unknown-key.yaml"], "unknown keys ['learning_rate']"),
    "missing config": (["train", "--config", "{tmp}/none.yaml"], "does not exist"),
    "zero epochs": ([*TRAIN, "--epochs", "0"], "'--epochs': 0 is not in the range"),
    "negative val size": ([*TRAIN, "--val-size", "-1"], "'--val-size': -1 is not in the range"),
    "bad hyperparameter value": ([*TRAIN, "--hp", "temperature=-1"], "kd: temperature must be above 0, got -1"),
    "bad recipe value through --hp": ([*TRAIN, "--hp", "lr_schedule=step"], "--lr-schedule must be one of"),
    "unknown hyperparameter": ([*TRAIN, "--hp", "momentum=0.9"], "no hyperparameter 'momentum'"),
    "malformed --hp": ([*TRAIN, "--hp", "temperature"], "--hp expects NAME=VALUE"),
    "teacher zero epochs": (["teacher", *DATA, "--epochs", "0", "--out", "{tmp}/t.pt"], "'--epochs': 0 is not"),
    "evaluate missing checkpoint": (["evaluate", "--checkpoint", "{tmp}/none.pt", *DATA], "does not exist"),
    "evaluate wrong architecture": (
        ["evaluate", "--checkpoint", "{tmp}/light.pt", "--model", "deepnn", *DATA],
        "does not fit model deepnn",
    ),
    "evaluate without model name": (["evaluate", "--checkpoint", "{tmp}/light.pt", *DATA], "pass --model"),
    "zero trials": ([*OPT, "--method", "kd", "--trials", "0"], "'--trials': 0 is not in the range"),
    "unknown sampler": ([*OPT, "--method", "kd", "--sampler", "bayes"], "bayes"),
    "unknown pruner": ([*OPT, "--method", "kd", "--pruner", "asha"], "asha"),
    "malformed storage url": ([*OPT, "--method", "kd", "--storage", "not a url"], "malformed storage URL"),
    "storage dir missing": (
        [*OPT, "--method", "kd", "--storage", "sqlite:///{tmp}/no/such/dir/x.db"],
        "does not exist",
    ),
    "unreachable database": (
        [*OPT, "--method", "kd", "--storage", "postgresql+psycopg2://u:secret@127.0.0.1:1/db"],
        "cannot open storage",
    ),
    "space unknown parameter": ([*OPT, "--method", "kd", "--space", "{tmp}/space-unknown.yaml"], "'momentum'"),
    "space low above high": ([*OPT, "--method", "kd", "--space", "{tmp}/space-inverted.yaml"], "low 8.0 > high 1.0"),
    "space wrong type": ([*OPT, "--method", "kd", "--space", "{tmp}/space-type.yaml"], "must be of type float"),
    "space impossible value": ([*OPT, "--method", "kd", "--space", "{tmp}/space-value.yaml"], "temperature"),
    "fix unknown parameter": ([*OPT, "--method", "kd", "--fix", "depth=2"], "no parameter 'depth'"),
    "search without validation": ([*OPT, "--method", "kd", "--val-size", "0"], "needs a validation split"),
    "search unknown layer": ([*OPT, "--method", "cosine", "--teacher-layer", "nope"], "no layer 'nope'"),
    "export unknown study": (["export", "--study-name", "nope"], "no study named 'nope'"),
    "export bad suffix": (["export", "--study-name", "nope", "-o", "{tmp}/x.txt"], ".yaml, .yml or .json"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_user_errors_are_one_line_exit_2_and_write_nothing(
    case: str, error_env: dict[str, str], home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args, expected = CASES[case]
    tmp = Path(error_env["tmp"])
    before = files_under(tmp) - files_under(home)
    code, out, err = run_cli([a.format(**error_env) for a in args], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("kdsearch: error: "), err
    assert expected in err
    assert "secret" not in err  # passwords in storage URLs never reach output
    assert out == ""
    written = {p for p in files_under(home) if "cache" not in p.relative_to(home).parts}
    assert written == set(), f"wrote {written}"
    assert files_under(tmp) - files_under(home) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_fp16_on_the_cpu_is_a_user_error(pattern_folder: Path, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--method", "ce", "--dataset", "imagefolder", "--data-dir", pattern_folder, "--device", "cpu"]
    for command in (["train", *args], ["optimize", *args, "--trials", "1"]):
        code, _, err = run_cli([*command, "--precision", "fp16"], capsys)
        assert code == 2 and err.count("\n") == 1 and "needs a CUDA device" in err, err
    assert not home.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_user_error(
    pattern_folder: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        ["train", "--method", "ce", "--dataset", "imagefolder", "--data-dir", pattern_folder, "--device", "cuda"],
        capsys,
    )
    assert code == 2 and "no CUDA device" in err
