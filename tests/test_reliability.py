"""What careless and hostile input must not do: lose data, trust a corrupt cache, duplicate trials,
leave workers running, leak a password, or end in a traceback."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState

from kdsearch.config import RunConfig
from kdsearch.errors import UserError
from kdsearch.spaces import build_space, parse_assignments, parse_param
from kdsearch.storage import redact
from kdsearch.strategies import METHODS, get_strategy
from tests.helpers import STALLING_MODEL, optimize_args, pattern_config, run_cli, spawn, wait_for_stall


def _flip_bytes(path: Path, at: float = 0.6, count: int = 64) -> None:
    """Overwrite bytes inside a file (same size, same header): what a bad sector or a stray write does."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start : start + count] = bytes((b + 1) % 256 for b in data[start : start + count])
    path.write_bytes(bytes(data))


def test_corrupted_caches_are_rebuilt_with_one_warning(
    pattern_folder: Path, untrained_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kdsearch.distill import prepare

    config = pattern_config(pattern_folder, untrained_teacher, method="cosine")
    first = prepare(config)
    assert first.teacher is not None and first.teacher.features is not None
    # Both caches are memory-mapped: keep copies of what they held before the files are damaged.
    images, features = first.splits.train.images.clone(), first.teacher.features[0].clone()
    del first
    capsys.readouterr()
    (data_cache,) = (home / "cache" / "data").glob("*.pt")
    (teacher_cache,) = (home / "cache" / "teacher").glob("*.pt")
    _flip_bytes(data_cache)
    _flip_bytes(teacher_cache, at=0.9)
    again = prepare(config)
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2, warnings
    assert "decoded-image cache" in warnings[0] and "corrupt" in warnings[0]
    assert "teacher-output cache" in warnings[1] and "corrupt" in warnings[1]
    assert torch.equal(again.splits.train.images, images)
    assert again.teacher is not None and again.teacher.features is not None
    assert torch.equal(again.teacher.features[0], features)
    prepare(config)  # the rebuilt caches are trusted again, silently
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_sigterm_to_the_parent_reaches_every_worker_and_no_new_trial_starts(
    pattern_folder: Path, pattern_teacher: Path, home: Path
) -> None:
    """SIGTERM to the parent alone is passed on to its workers. Ctrl-C sent to the parent alone takes
    the same way after a moment's wait (tests/test_parallel_faults.py, with stand-in workers); a
    terminal's Ctrl-C reaches every process of the group anyway."""
    home.mkdir(parents=True)
    storage = f"sqlite:///{home / 'kdsearch.db'}"
    args = optimize_args(pattern_folder, pattern_teacher, "--storage", storage, "--student-model", STALLING_MODEL)
    marker = home.parent / "stalled"
    process = spawn([*args, "--trials", "8", "--n-jobs", "2"], home, stall=marker)
    wait_for_stall(marker, process)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # both workers inside a trial
        running = optuna.load_study(study_name="kd-imagefolder", storage=storage).get_trials(
            states=(TrialState.RUNNING,)
        )
        if len(running) == 2:
            break
        time.sleep(0.2)
    assert len(running) == 2
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1] == "kdsearch: terminated"
    assert "Traceback" not in err and "KeyError" not in err
    trials = optuna.load_study(study_name="kd-imagefolder", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]  # closed, and nothing new began


def test_credentials_are_masked_wherever_a_url_is_shown() -> None:
    assert redact("postgresql+psycopg2://kd:hunter2@db/kd") == "postgresql+psycopg2://kd:***@db/kd"
    assert redact("postgresql://db/kd?user=kd&password=hunter2&sslmode=require") == (
        "postgresql://db/kd?user=kd&password=***&sslmode=require"
    )
    assert redact("mysql+pymysql://db/kd?PASSWD=x1&token=t2") == "mysql+pymysql://db/kd?PASSWD=***&token=***"
    assert redact("sqlite:///studies/kdsearch.db") == "sqlite:///studies/kdsearch.db"


def test_credentials_in_query_parameters_never_reach_errors(search) -> None:
    url = "postgresql+psycopg2://127.0.0.1:1/db?user=u&password=hunter2"
    code, out, err = search("--trials", "1", "--storage", url)
    assert code == 2 and "hunter2" not in out + err and "password=***" in err


def _dashboard_stderr(host: str, home: Path) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "KDSEARCH_HOME": str(home)}
    process = subprocess.Popen(
        [sys.executable, "-m", "kdsearch", "dashboard", "--host", host, "--port", str(port)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        assert process.stderr is not None
        while not any("dashboard for" in line for line in lines):
            line = process.stderr.readline()
            assert line, lines
            lines.append(line.strip())
    finally:
        process.terminate()
        process.wait(timeout=10)
    return lines


@pytest.mark.slow
def test_the_dashboard_warns_when_it_serves_beyond_loopback(search, home: Path) -> None:
    assert search("--trials", "1")[0] == 0
    assert len(_dashboard_stderr("127.0.0.1", home)) == 1
    beyond = _dashboard_stderr("0.0.0.0", home)
    assert len(beyond) == 2 and beyond[0].startswith("kdsearch: warning: serving on 0.0.0.0")
    assert "delete" in beyond[0]


def test_a_home_that_is_a_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("KDSEARCH_HOME", str(home))
    code, out, err = run_cli(["studies"], capsys)
    assert out == ""
    assert code == 2 and err == f"kdsearch: error: KDSEARCH_HOME {home} is a file, not a folder\n"


# --- fuzz: generated bad values through every path a value comes in by ------------------------------

ODD_VALUES: list[Any] = [
    -1,
    0,
    -0.0,
    1e308,
    -1e308,
    float("nan"),
    float("inf"),
    -float("inf"),
    2**64,
    -(2**63),
    True,
    None,
    "",
    " ",
    "abc",
    "1e23",
    "NaN",
    "../../etc/passwd",
    "x" * 5000,
    "\x00",
    "é",
    [],
    [1, 2],
    {},
    {"a": 1},
    0.5,
    1e-300,
    3,
    7.5,
]


def _fuzz_cases(seed: int, count: int) -> list[tuple[str, str, Any]]:
    """(kind, name, value) triples: a knob or a method hyperparameter, set to an odd value."""
    rng = random.Random(seed)
    names = [
        "epochs",
        "batch_size",
        "seed",
        "lr",
        "weight_decay",
        "label_smoothing",
        "optimizer",
        "augment",
        "lr_schedule",
        "precision",
        "val_size",
        "limit_train",
        "width",
        "student_model",
        "dataset",
        "temperature",
        "soft_target_weight",
        "alpha",
        "beta",
        "kernel_size",
        "depth",
        "hidden_channels",
        "distance",
        "reduce",
        "ce_weight",
        "bogus",
    ]
    return [(rng.choice(("config", "hp", "space")), rng.choice(names), rng.choice(ODD_VALUES)) for _ in range(count)]


@pytest.mark.parametrize("chunk", range(4))
def test_fuzzed_values_are_refused_in_one_line_or_accepted(chunk: int) -> None:
    """A few hundred odd values through the config file, --hp/--fix and --space paths: a user error or a
    valid config, never another exception."""
    refused = accepted = 0
    for kind, name, value in _fuzz_cases(seed=chunk, count=80):
        method = random.Random(f"{chunk}{name}{value!r}").choice(METHODS)
        try:
            if kind == "config":
                section = "loss" if name not in RunConfig().flat() else None
                document: dict[str, Any] = (
                    {"loss": {"method": method, "params": {name: value}}}
                    if section == "loss"
                    else {"method": method, name: value}
                )
                RunConfig.from_dict(document, origin="fuzz.yaml")
            elif kind == "hp":
                values = parse_assignments([f"{name}={value}"], "--hp")
                RunConfig.from_flat({"method": method, "hyperparameters": values}, origin="from the command line")
                build_space(get_strategy(method), None, parse_assignments([f"{name}={value}"], "--fix"))
            else:
                spec = {"type": random.Random(name).choice(("float", "int", "categorical")), "low": value}
                spec |= {"high": value, "choices": [value]} if isinstance(value, (int, float)) else {"choices": value}
                param = parse_param(name, spec)
                build_space(get_strategy(method), None, {name: param})
            accepted += 1
        except UserError as exc:
            assert len(str(exc).strip().splitlines()) == 1, str(exc)
            refused += 1
    assert refused + accepted == 80 and refused > 40  # most of these values are wrong, and say so


def test_fuzzed_command_lines_exit_2_with_one_line(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Odd values through the real command line: with no data there, even a valid value ends in one line."""
    rng = random.Random(7)
    options = ["--epochs", "--seed", "--lr", "--width", "--val-size", "--batch-size", "--label-smoothing"]
    missing = str(tmp_path / "no-data")
    for _ in range(40):
        option, value = rng.choice(options), rng.choice(["-1", "nan", "inf", "1e999", "abc", "", "0", "2e9", "0.5"])
        hp = rng.choice(["temperature", "kernel_size", "beta", "lr", "bogus"]) + "=" + rng.choice(["-3", "nan", "x"])
        args = ["train", "--method", rng.choice(METHODS), "--dataset", "imagefolder", "--data-dir", missing]
        code, out, err = run_cli([*args, option, value, "--hp", hp], capsys)
        assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("kdsearch: error: "), err
        assert "Traceback" not in err
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == "[]" and not home.exists()  # nothing written
