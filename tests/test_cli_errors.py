"""Every user error: one line on stderr, exit code 2, nothing written (caches aside)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution

from kdsearch.checkpoints import FORMAT, save_checkpoint
from kdsearch.config import RunConfig
from kdsearch.models import DeepNN, LightNN
from tests.helpers import files_under, optimize_args, run_cli


@pytest.fixture(scope="module")
def error_env(
    tmp_path_factory: pytest.TempPathFactory, pattern_folder: Path, untrained_teacher: Path
) -> dict[str, str]:
    """Paths the error cases refer to: data, teachers of the wrong kind, bad files (made once: no case writes)."""
    tmp_path = tmp_path_factory.mktemp("errors")
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
    (tmp_path / "truncated.pt").write_bytes(untrained_teacher.read_bytes()[:5000])
    (tmp_path / "seed.yaml").write_text("recipe: {seed: abc}\n")
    (tmp_path / "space-step.yaml").write_text("parameters:\n  depth: {type: int, low: 1, high: 3, step: 5}\n")
    (tmp_path / "dir.html").mkdir()
    (tmp_path / "dir.yaml").mkdir()
    save_checkpoint(tmp_path / "code.pt", LightNN(), {"model": "sys:exit", "width": 1.0})
    save_checkpoint(tmp_path / "code-teacher.pt", DeepNN(), {"model": "os:abort", "num_classes": 10})
    save_checkpoint(tmp_path / "width.pt", LightNN(), {"model": "lightnn", "width": "abc"})
    for name, state, meta in (("list-meta.pt", LightNN().state_dict(), "[]"), ("str-state.pt", "weights", "{}")):
        torch.save({"format": FORMAT, "state_dict": state, "metadata": meta}, tmp_path / name)
    with sqlite3.connect(tmp_path / "other.db") as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER)")
    zero = tmp_path / "zero"
    for split in ("train", "test"):
        shutil.copytree(pattern_folder / split / "class0", zero / split / "class0")
    (zero / "train" / "class0" / "empty.png").write_bytes(b"")
    _kdsearch_and_plain_studies(f"sqlite:///{tmp_path / 'c.db'}")
    return {"data": str(pattern_folder), "teacher": str(untrained_teacher), "tmp": str(tmp_path)}


def _kdsearch_and_plain_studies(url: str) -> None:
    """A study as kdsearch records one (named s, one complete trial) and one made by plain Optuna."""
    config = RunConfig.from_flat({"method": "kd", "dataset": "imagefolder"}, origin="test")
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    for key, value in (config.flat() | {"objectives": ["accuracy"]}).items():
        study.set_user_attr(key, value)
    study.add_trial(
        optuna.trial.create_trial(params={"lr": 1e-3}, distributions={"lr": FloatDistribution(1e-4, 1e-2)}, value=50.0)
    )
    optuna.create_study(study_name="plain", storage=url, direction="minimize").optimize(lambda t: 1.0, n_trials=1)


DATA = ["--dataset", "imagefolder", "--data-dir", "{data}", "--val-size", "50"]
TRAIN = ["train", *DATA, "--epochs", "1", "--teacher", "{teacher}", "--out", "{tmp}/out.pt"]
OPT = optimize_args("{data}", "{teacher}", "--trials", "1")

CASES = {
    "unknown dataset": (["train", "--dataset", "mnist2"], "mnist2"),
    "unknown method": (["train", "--method", "fitnets"], "fitnets"),
    "unknown student model": ([*TRAIN, "--student-model", "resnet"], "unknown model 'resnet'"),
    "unimportable model": ([*TRAIN, "--student-model", "nosuch.mod:Net"], "cannot import model module"),
    "missing data dir": (["train", "--dataset", "imagefolder", "--data-dir", "{tmp}/nope"], "does not exist"),
    "empty data dir": (["train", "--dataset", "imagefolder", "--data-dir", "{tmp}/empty"], "missing"),
    "imagefolder without dir": (["train", "--dataset", "imagefolder"], "--data-dir must be given"),
    "teacher of another architecture": ([*TRAIN, "--teacher", "{tmp}/light.pt"], "does not fit model deepnn"),
    "teacher of another class count": ([*TRAIN, "--teacher", "{tmp}/five.pt"], "5 classes"),
    "missing teacher": ([*TRAIN, "--teacher", "{tmp}/none.pt"], "does not exist"),
    "corrupt checkpoint": ([*TRAIN, "--teacher", "{tmp}/evil.pt"], "evil.pt: not a torch checkpoint file"),
    "unknown teacher layer": ([*TRAIN, "--method", "cosine", "--teacher-layer", "body"], "no layer 'body'"),
    "unknown student layer": ([*TRAIN, "--method", "cosine", "--student-layer", "body"], "no layer 'body'"),
    "unmatched feature maps": ([*TRAIN, "--method", "regressor", "--student-layer", "features.0"], "spatial size"),
    "invalid config yaml": (["train", "--config", "{tmp}/bad.yaml"], "not valid YAML"),
    "unknown config key": (["train", "--config", "{tmp}/unknown-key.yaml"], "unknown keys ['learning_rate']"),
    "missing config": (["train", "--config", "{tmp}/none.yaml"], "does not exist"),
    "zero epochs": ([*TRAIN, "--epochs", "0"], "--epochs must be at least 1, got 0"),
    "negative val size": ([*TRAIN, "--val-size", "-1"], "--val-size must be at least 0, got -1"),
    "bad hyperparameter value": ([*TRAIN, "--hp", "temperature=-1"], "kd: temperature must be above 0, got -1"),
    "bad recipe value through --hp": ([*TRAIN, "--hp", "lr_schedule=step"], "--lr-schedule must be one of"),
    "unknown hyperparameter": ([*TRAIN, "--hp", "momentum=0.9"], "no hyperparameter 'momentum'"),
    "malformed --hp": ([*TRAIN, "--hp", "temperature"], "--hp expects NAME=VALUE"),
    "teacher zero epochs": (["teacher", *DATA, "--epochs", "0", "--out", "{tmp}/t.pt"], "--epochs must be at least 1"),
    "evaluate missing checkpoint": (["evaluate", "--checkpoint", "{tmp}/none.pt", *DATA], "does not exist"),
    "evaluate wrong architecture": (
        ["evaluate", "--checkpoint", "{tmp}/light.pt", "--model", "deepnn", *DATA],
        "does not fit model deepnn",
    ),
    "evaluate without model name": (["evaluate", "--checkpoint", "{tmp}/light.pt", *DATA], "--model must be given"),
    "zero trials": ([*OPT, "--method", "kd", "--trials", "0"], "--trials must be at least 1, got 0"),
    "unknown sampler": ([*OPT, "--method", "kd", "--sampler", "bayes"], "bayes"),
    "unknown pruner": ([*OPT, "--method", "kd", "--pruner", "bohb"], "bohb"),
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
    # Nothing lost: no output may be an input of the same command, a folder, or below a file.
    "train --out is the teacher": ([*TRAIN[:-2], "--out", "{teacher}"], "is one of this command's inputs"),
    "train --out is the config": (
        ["train", "--config", "{tmp}/seed.yaml", "--out", "{tmp}/seed.yaml"],
        "is one of this command's inputs",
    ),
    "train --out onto a folder": ([*TRAIN[:-2], "--out", "{tmp}/empty"], "is a directory"),
    "train --out below a file": ([*TRAIN[:-2], "--out", "{tmp}/bad.yaml/x.pt"], "bad.yaml is a file, not a folder"),
    "teacher --out below a file": (["teacher", *DATA, "--out", "{tmp}/bad.yaml/t.pt"], "is a file, not a folder"),
    "export --checkpoint is the storage": (
        ["export", "--study-name", "s", "--storage", "sqlite:///{tmp}/c.db", "--checkpoint", "{tmp}/c.db"],
        "is one of this command's inputs",
    ),
    "export -o onto a folder": (
        ["export", "--study-name", "s", "--storage", "sqlite:///{tmp}/c.db", "-o", "{tmp}/dir.yaml"],
        "is a directory",
    ),
    "report -o onto a folder": (
        ["report", "--study-name", "s", "--storage", "sqlite:///{tmp}/c.db", "-o", "{tmp}/dir.html"],
        "is a directory",
    ),
    "report --png below a file": (
        [
            "report",
            "--study-name",
            "s",
            "--storage",
            "sqlite:///{tmp}/c.db",
            "-o",
            "{tmp}/r.html",
            "--png",
            "{tmp}/bad.yaml/png",
        ],
        "is a file, not a folder",
    ),
    # Nothing run: a checkpoint never names code.
    "checkpoint naming code (evaluate)": (["evaluate", "--checkpoint", "{tmp}/code.pt", *DATA], "never chooses code"),
    "checkpoint naming code (teacher)": ([*TRAIN, "--teacher", "{tmp}/code-teacher.pt"], "never chooses code"),
    "checkpoint width not a number": (["evaluate", "--checkpoint", "{tmp}/width.pt", *DATA], "records width 'abc'"),
    "checkpoint metadata a list": (["evaluate", "--checkpoint", "{tmp}/list-meta.pt", *DATA], "wrong shape"),
    "checkpoint state_dict a string": (["evaluate", "--checkpoint", "{tmp}/str-state.pt", *DATA], "no state_dict"),
    "truncated checkpoint": ([*TRAIN, "--teacher", "{tmp}/truncated.pt"], "not a torch checkpoint file"),
    # Nothing duplicated or mixed up.
    "study not made by kdsearch (export)": (
        ["export", "--study-name", "plain", "--storage", "sqlite:///{tmp}/c.db"],
        "was not created by kdsearch",
    ),
    "study not made by kdsearch (optimize)": (
        [*OPT, "--method", "kd", "--study-name", "plain", "--storage", "sqlite:///{tmp}/c.db"],
        "was not created by kdsearch",
    ),
    "storage of something else": (["studies", "--storage", "sqlite:///{tmp}/other.db"], "of something else"),
    "study name ..": ([*OPT, "--method", "kd", "--study-name", ".."], "--study-name must be 1-128 characters"),
    "study name too long": ([*OPT, "--method", "kd", "--study-name", "n" * 300], "--study-name must be 1-128"),
    # One line where a traceback used to be.
    "config seed not a number": (["train", "--config", "{tmp}/seed.yaml"], "seed must be a number, got 'abc'"),
    "negative seed": ([*TRAIN, "--seed", "-1"], "--seed must be at least 0, got -1"),
    "seed past numpy's range": ([*OPT, "--method", "kd", "--seed", str(2**32)], "--seed must be at most 4294967294"),
    "huge kernel": ([*TRAIN, "--method", "regressor", "--hp", "kernel_size=10001"], "kernel_size must be at most 15"),
    "huge width": ([*TRAIN, "--width", "100000"], "--width must be at most 16, got 100000.0"),
    "weight above 1": ([*TRAIN, "--hp", "soft_target_weight=2"], "soft_target_weight must be at most 1"),
    "teacher lr nan": (["teacher", *DATA, "--lr", "nan", "--out", "{tmp}/t.pt"], "--lr must be finite"),
    "empty image file": (
        ["train", "--method", "ce", "--dataset", "imagefolder", "--data-dir", "{tmp}/zero", "--val-size", "0"],
        "the file is empty",
    ),
    "dashboard port out of range": (["dashboard", "--port", "70000"], "--port must be at most 65535, got 70000"),
    "storage port not a number": (
        [*OPT, "--method", "kd", "--storage", "postgresql+psycopg2://u:secret@127.0.0.1:abc/db"],
        "malformed storage URL",
    ),
    "int step past its range": (
        [*OPT, "--method", "regressor", "--space", "{tmp}/space-step.yaml"],
        "multiple of step",
    ),
    "grid too large": ([*OPT, "--method", "hybrid", "--sampler", "grid"], "more than 100,000"),
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
    for command in (["train", *args], optimize_args(pattern_folder, None, "--trials", "1", "--device", "cpu")):
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
