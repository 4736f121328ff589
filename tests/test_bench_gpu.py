"""bench/gpu.py (issue #14) and its step budget (bench/budget.py) on the CPU: the no-GPU exit, the options,
the commands each step runs, the time shares, the guarded steps and the results written.

Nothing here needs a GPU or the network, trains or times anything; the device run itself is
`make bench-gpu` on a CUDA machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))  # as the scripts see each other: bench/ is their sys.path[0]

import budget  # noqa: E402 - after bench/ is importable
import cli_runner  # noqa: E402
import gpu  # noqa: E402

SCRIPT = BENCH / "gpu.py"
PY = "/py"


def run_args(**overrides: object) -> argparse.Namespace:
    """The run's defaults, as argparse gives them, with ``overrides``."""
    args = gpu.build_parser().parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


# --- the command line ----------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run its checks")
def test_without_a_gpu_says_so_in_one_line_and_exits_0_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work, site, results = tmp_path / "work", tmp_path / "site", tmp_path / "gpu.json"
    assert gpu.main(["--work-dir", str(work), "--site", str(site), "--results", str(results)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "bench/gpu.py: no CUDA GPU here (torch.cuda.is_available() is false); nothing to run"
    ]
    assert not work.exists() and not site.exists() and not results.exists()


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        gpu.main(["--help"])
    assert exc.value.code == 0
    assert "usage: bench/gpu.py" in capsys.readouterr().out


@pytest.mark.parametrize("budget_text", ["0", "-30", "abc", "nan", "inf", ""])
def test_a_bad_budget_is_rejected_with_exit_2(budget_text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        gpu.main(["--budget", budget_text])
    assert exc.value.code == 2
    assert "--budget" in capsys.readouterr().err


def test_defaults_are_the_issues_numbers_and_counts_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    args = gpu.build_parser().parse_args(["--budget", "90.5"])
    assert args.budget == 90.5 and args.study_trials == 50 and args.study_epochs == 10 and args.parallel_jobs == 4
    assert gpu.build_parser().parse_args([]).budget == 480.0 and args.tiled_images == 50_000
    with pytest.raises(SystemExit) as exc:
        gpu.main(["--study-trials", "0"])
    assert exc.value.code == 2 and "--study-trials: must be a positive number, got 0" in capsys.readouterr().err


def test_the_script_runs_as_a_file_too() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--budget", "x"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "not a number: 'x'" in proc.stderr


STEPS = [
    "install", "tests", "teacher-slice", "train-cpu", "train-gpu", "cpu-vs-gpu", "evaluate-cpu", "gpu-ckpt-on-cpu",
    "tiled-data", "teacher-tiled", "kd-fp32", "kd-bf16", "kd-fp16", "study-1", "study-4",
]  # fmt: skip


def test_dry_run_prints_every_step_with_its_command_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    assert gpu.main(["--dry-run", "--budget", "200", "--work-dir", str(work), "--study-trials", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == STEPS
    assert lines[1].endswith(f"-m pytest -q -p no:cacheprovider {gpu.ROOT}/tests -k 'device or precision or cuda'")
    assert "  kdsearch optimize --method kd --trials 5 --epochs 10 --n-jobs 4 " in lines[-1]
    shares = [float(line.split()[1]) for line in lines]
    assert sum(shares) <= 200 - budget.RESERVE_SECONDS + len(shares)  # shown rounded
    assert not work.exists()


def test_skip_leaves_out_groups_but_keeps_a_teacher_another_group_needs(capsys: pytest.CaptureFixture[str]) -> None:
    gpu.main(["--dry-run", "--skip", "train", "--skip", "precision", "--skip", "tests"])
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["install", "teacher-slice", "study-1", "study-4"]
    gpu.main(["--dry-run", "--no-install", "--skip", "study", "--skip", "train"])
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["tests", "tiled-data", "teacher-tiled", "kd-fp32", "kd-bf16", "kd-fp16"]


# --- what each step runs --------------------------------------------------------------------------------


def test_kdsearch_arguments_of_the_steps(tmp_path: Path) -> None:
    assert gpu.teacher_args(Path("/s"), Path("/w/t.pt"), 5, 1000) == [
        "teacher", "--preset", "tutorial", "--dataset", "imagefolder", "--data-dir", "/s", "--val-size", "1000",
        "--epochs", "5", "--seed", "42", "--device", "cuda", "-q", "--out", "/w/t.pt",
    ]  # fmt: skip
    assert gpu.train_args(Path("/s"), Path("/t.pt"), "cpu", 3) == [
        "train", "--method", "kd", "--dataset", "imagefolder", "--data-dir", "/s", "--val-size", "0", "--epochs",
        "3", "--seed", "42", "--device", "cpu", "--teacher", "/t.pt", "--precision", "fp32", "-q",
    ]  # fmt: skip
    assert gpu.train_args(Path("/s"), Path("/t.pt"), "cuda", 2, precision="fp16")[-2:] == ["fp16", "-q"]
    study = gpu.optimize_args(Path("/s"), tmp_path, 4, run_args(), timeout=120.0)
    assert study == [
        "optimize", "--method", "kd", "--trials", "50", "--epochs", "10", "--n-jobs", "4", "--dataset", "imagefolder",
        "--data-dir", "/s", "--val-size", "1000", "--device", "cuda", "--storage", f"sqlite:///{tmp_path}/gpu.db",
        "--study-name", "kd-gpu-4", "--teacher", str(tmp_path / "teacher-slice.pt"), "--timeout", "90", "-q",
    ]  # fmt: skip
    assert gpu.optimize_args(Path("/s"), tmp_path, 1, run_args(), timeout=20.0)[-2] == "10"  # never below 10 s


def test_plan_steps_wire_the_teachers_checkpoints_and_comparisons(tmp_path: Path) -> None:
    work = tmp_path / "work"
    results = {"train-cpu": {"test_accuracy": 40.0}, "train-gpu": {"test_accuracy": 40.5}}
    args = run_args(python=PY, study_trials=8, bundle=str(tmp_path / "bundle"))
    steps = {s.name: s for s in gpu.plan_steps(args, work, results)}
    assert list(steps) == STEPS
    assert steps["evaluate-cpu"].needs == ("train-gpu",) and steps["kd-fp16"].needs == ("teacher-tiled",)
    assert steps["tests"].env == {"KDSEARCH_TEST_DEVICE": "cuda"} and steps["tests"].read is gpu.read_pytest
    assert steps["study-4"].read is gpu.read_study and steps["train-cpu"].read is budget.read_json

    def command(name: str) -> list[str]:
        line = steps[name].command(100.0)  # type: ignore[misc]
        assert line[:3] == [PY, "-m", "kdsearch"] and line[-1] == "--json"
        return line

    assert command("train-gpu")[command("train-gpu").index("--out") + 1] == str(work / "ckpt-cuda.pt")
    assert command("evaluate-cpu")[command("evaluate-cpu").index("--checkpoint") + 1] == str(work / "ckpt-cuda.pt")
    assert command("train-cpu")[command("train-cpu").index("--data-dir") + 1] == str(
        tmp_path / "bundle" / "cifar-slice"
    )
    teacher = command("teacher-slice")
    assert teacher[teacher.index("--val-size") + 1] == "1000"  # the studies' validation images stay unseen
    assert command("kd-bf16")[command("kd-bf16").index("--teacher") + 1] == str(work / "teacher-tiled.pt")
    study = command("study-1")
    assert study[study.index("--timeout") + 1] == "70" and study[study.index("--trials") + 1] == "8"
    assert steps["cpu-vs-gpu"].action(1.0) == {  # type: ignore[misc]
        "first": 40.0, "second": 40.5, "difference": 0.5, "tolerance": 1.0
    }  # fmt: skip


def test_subprocess_env_puts_the_tree_then_the_bundle_on_pythonpath(tmp_path: Path) -> None:
    base = {"PATH": "/bin", "PYTHONPATH": "/theirs", "KDSEARCH_STORAGE": "sqlite:///elsewhere.db"}
    env = gpu.subprocess_env(base, tmp_path / "site", tmp_path / "home")
    assert env["PYTHONPATH"].split(":") == [str(gpu.ROOT), str(tmp_path / "site"), "/theirs"]
    assert env["KDSEARCH_HOME"] == str(tmp_path / "home") and env["PYTHONUNBUFFERED"] == "1"
    assert "KDSEARCH_STORAGE" not in env and env["PATH"] == "/bin"
    assert base["PYTHONPATH"] == "/theirs"  # not modified
    assert gpu.subprocess_env({}, None, tmp_path)["PYTHONPATH"] == str(gpu.ROOT)


def test_tile_slice_links_the_slice_over_and_over(pattern_folder: Path, tmp_path: Path) -> None:
    tiled = tmp_path / "tiled"  # the slice: 10 classes of 30 train and 10 test images
    assert gpu.tile_slice(pattern_folder, tiled, 655) == {"train": 655, "classes": 10}
    first = sorted((tiled / "train" / "class0").iterdir())
    assert [p.name for p in first] == [f"{i:05d}.png" for i in range(66)]
    assert [p.resolve().name for p in first] == ([f"{i:03d}.png" for i in range(30)] * 3)[:66]
    assert len(list((tiled / "train" / "class9").iterdir())) == 65
    assert len(list((tiled / "test").rglob("*.png"))) == 100
    from kdsearch.data import load_splits

    splits = load_splits("imagefolder", str(tiled), val_size=0, cache_dir=tmp_path / "cache")
    assert len(splits.train) == 655 and len(splits.test) == 100  # kdsearch reads the links


# --- reading and reporting ------------------------------------------------------------------------------


def finished(stdout: str, returncode: int = 0, stderr: str = "", timed_out: bool = False) -> cli_runner.Finished:
    return cli_runner.Finished(["x"], returncode, stdout, stderr, 1.0, 60.0, timed_out)


def test_reading_pytest_and_study_outputs() -> None:
    assert gpu.read_pytest(finished(".\n1 passed, 143 deselected in 0.35s\n")) == {
        "passed": 1, "failed": 0, "errors": 0, "skipped": 0, "deselected": 143
    }  # fmt: skip
    summary = "FAILED tests/x.py::t - boom\n==== 2 failed, 3 passed, 1 skipped, 2 errors, 1 warning in 1.20s ===="
    with pytest.raises(cli_runner.CommandError, match=r"^==== 2 failed, 3 passed"):
        gpu.read_pytest(finished(summary, returncode=1, stderr="noise"))  # pytest's summary says why
    counts = gpu.read_pytest(finished(summary, returncode=0))
    assert counts == {"passed": 3, "failed": 2, "errors": 2, "skipped": 1, "warnings": 1}
    assert gpu.read_pytest(finished("no tests ran in 0.01s", returncode=5)) == {
        "passed": 0, "failed": 0, "errors": 0, "skipped": 0
    }  # fmt: skip
    assert gpu.read_pytest(finished("5 deselected in 0.1s", returncode=5))["deselected"] == 5  # none selected
    with pytest.raises(cli_runner.CommandError, match="timed out after 60 s"):
        gpu.read_pytest(finished("", returncode=-15, timed_out=True))
    with pytest.raises(cli_runner.CommandError, match=r"^2 trials failed$"):
        gpu.read_study(finished('{"wall_seconds": 1.0, "complete": 1, "failed": 2}'))
    assert gpu.read_study(finished('{"wall_seconds": 1.0, "complete": 1, "failed": 0}'))["complete"] == 1
    assert gpu.steady_epoch({"epoch_seconds": [3.5, 1.25]}) == 1.25 and gpu.steady_epoch({}) is None


def sample_records() -> list[dict[str, object]]:
    return [
        {"name": "tests", "status": "ok", "seconds": 12.34,
         "result": {"passed": 4, "failed": 0, "errors": 0, "skipped": 1}},
        {"name": "train-gpu", "status": "ok", "seconds": 9.0, "result": {"test_accuracy": 41.2345}},
        {"name": "kd-bf16", "status": "ok", "seconds": 20.0,
         "result": {"epoch_seconds": [4.0, 1.5], "test_accuracy": 10.0}},
        {"name": "study-4", "status": "ok", "seconds": 99.0,
         "result": {"wall_seconds": 88.25, "complete": 30, "pruned": 20, "failed": 0}},
        {"name": "train-cpu", "status": "failed", "seconds": 3.0, "error": "RuntimeError: CUDA error"},
    ]  # fmt: skip


def test_format_table() -> None:
    assert budget.format_table(sample_records()).splitlines() == [
        "tests      ok          12.3",
        "train-gpu  ok           9.0",
        "kd-bf16    ok          20.0",
        "study-4    ok          99.0",
        "train-cpu  failed       3.0  RuntimeError: CUDA error",
    ]


def test_results_document_shape() -> None:
    args = run_args(budget=300.0, work_dir=Path("/w"))
    host = {"gpu": "NVIDIA H200", "torch": "2.11.0"}
    doc = gpu.results_document(sample_records(), args, host, 123.456)
    assert set(doc) == {"schema", "finished", "budget_seconds", "wall_seconds", "host", "options", "steps", "summary",
                        "failed"}  # fmt: skip
    assert doc["schema"] == "kdsearch-bench-gpu/1" and doc["budget_seconds"] == 300.0 and doc["wall_seconds"] == 123.5
    assert doc["failed"] == ["train-cpu"] and doc["host"] == host and doc["options"]["work_dir"] == "/w"
    assert doc["summary"] == {
        "tests": {"passed": 4, "failed": 0, "errors": 0, "skipped": 1},
        "test_accuracy": {"cpu": None, "cuda": 41.2345},
        "gpu_checkpoint_on_cpu": None,
        "steady_epoch_seconds": {"fp32": None, "bf16": 1.5, "fp16": None},
        "studies": {
            "4": {"wall_seconds": 88.25, "complete": 30, "pruned": 20, "failed": 0, "seconds_per_trial": 1.765}
        },
    }
    json.dumps(doc)  # all of it serialisable


def test_study_seconds_per_trial_and_compare_accuracies() -> None:
    assert gpu.study_seconds_per_trial({"wall_seconds": 10.0, "complete": 3, "pruned": 1}) == 2.5
    assert gpu.study_seconds_per_trial({"wall_seconds": 10.0, "complete": 0, "pruned": 0}) is None
    assert gpu.compare_accuracies(40.0, 40.1, 0.1)["difference"] == 0.1
    with pytest.raises(RuntimeError, match=r"1\.50 points apart"):
        gpu.compare_accuracies(40.0, 38.5, 1.0)


# --- the budget ------------------------------------------------------------------------------------------


def test_time_share_splits_the_time_left_by_expected_seconds() -> None:
    assert budget.time_share(100.0, 20.0, [30.0, 50.0]) == 20.0
    assert budget.time_share(100.0, 50.0, []) == 100.0  # the last step may take all that is left
    assert budget.time_share(-5.0, 10.0, [10.0]) == 0.0
    lines = budget.plan_lines([budget.Step("a", 1, ()), budget.Step("b", 3, ())], budget=100.0 + budget.RESERVE_SECONDS)
    assert lines == ["a                     25 s  (in-process)", "b                     75 s  (in-process)"]


def test_run_steps_gives_the_time_of_steps_that_cannot_run_to_the_others(capsys: pytest.CaptureFixture[str]) -> None:
    def fail(timeout: float) -> dict[str, float]:
        raise RuntimeError("boom")

    def record_timeout(timeout: float) -> dict[str, float]:
        return {"timeout": timeout}

    steps = [
        budget.Step("a", 10, (), action=fail),
        budget.Step("x", 10, (), action=record_timeout),
        budget.Step("b", 80, (), ("a",), action=record_timeout),
        budget.Step("d", 10, (), action=record_timeout),
        budget.Step("skipped", 10, (), action=record_timeout),
    ]
    results: dict[str, dict[str, float]] = {}
    records = budget.run_steps(steps, {"a", "x", "b", "d"}, 100.0 + budget.RESERVE_SECONDS, {}, results)
    assert [(r["status"], r["error"]) for r in records] == [
        ("failed", "boom"), ("ok", None), ("failed", "not run: needs a"), ("ok", None),
        ("skipped", "not asked for (--skip/--no-install)"),
    ]  # fmt: skip
    assert 45 < results["x"]["timeout"] <= 50  # half of the ~100 s left: b, which needs a, takes no share
    assert set(results) == {"x", "d"}


def python_step(name: str, code: str, **kwargs: object) -> budget.Step:
    return budget.Step(name, 1.0, ("tests",), command=lambda t: [sys.executable, "-c", code], **kwargs)  # type: ignore[arg-type]


def test_execute_records_results_failures_and_timeouts() -> None:
    env = gpu.subprocess_env({"PATH": "/usr/bin:/bin"}, None, Path("/nonexistent-home"))
    ok = budget.execute(python_step("train-gpu", "print('{\"test_accuracy\": 12.5}')"), 60.0, env)
    assert ok["status"] == "ok" and ok["result"] == {"test_accuracy": 12.5} and ok["returncode"] == 0
    assert "stderr_tail" not in ok and ok["timeout"] == 60.0
    code = "import sys; print('noise'); sys.stderr.write('Traceback\\nValueError: the real reason\\n'); sys.exit(3)"
    failed = budget.execute(python_step("train-cpu", code), 60.0, env)
    assert failed["status"] == "failed" and failed["returncode"] == 3
    assert failed["error"] == "ValueError: the real reason" and failed["stderr_tail"].startswith("Traceback")
    slow = budget.execute(python_step("slow", "import time; time.sleep(60)"), 1.0, env)
    assert slow["status"] == "failed" and slow["error"].startswith("timed out after 1 s")
    env_step = python_step("env", "import os, json; print(json.dumps({'d': os.environ['KDSEARCH_TEST_DEVICE']}))",
                           env={"KDSEARCH_TEST_DEVICE": "cuda"})  # fmt: skip
    assert budget.execute(env_step, 60.0, env)["result"] == {"d": "cuda"}

    def broken(timeout: float) -> dict[str, object]:
        raise KeyError("teacher")

    crashed = budget.execute(budget.Step("install", 1.0, ("tests",), action=broken), 5.0, env)
    assert crashed["status"] == "failed" and crashed["error"] == "KeyError: 'teacher'"


# --- the whole run, with an interpreter that fails every command -------------------------------------------


def test_run_guards_every_step_writes_the_json_and_exits_1(
    pattern_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = tmp_path / "fakepy"
    fake.write_text("#!/bin/sh\necho 'Traceback...' >&2\necho 'kdsearch: error: no CUDA device here' >&2\nexit 2\n")
    fake.chmod(0o755)
    monkeypatch.setattr(gpu, "gpu_absent_reason", lambda: None)
    monkeypatch.setattr(gpu, "host_info", lambda: {"gpu": "fake", "torch": "0", "python": "3"})
    results = tmp_path / "out" / "gpu.json"
    argv = ["--no-install", "--work-dir", str(tmp_path / "work"), "--results", str(results), "--python", str(fake)]
    code = gpu.main([*argv, "--budget", "120", "--data-dir", str(pattern_folder), "--tiled-images", "20"])
    assert code == 1
    doc = json.loads(results.read_text())
    status = {r["name"]: (r["status"], r["error"]) for r in doc["steps"]}
    assert list(status) == STEPS
    assert status["install"] == ("skipped", "not asked for (--skip/--no-install)")
    assert status["tests"][0] == "failed"
    assert status["teacher-slice"] == ("failed", "kdsearch: error: no CUDA device here")
    assert status["train-cpu"] == ("failed", "not run: needs teacher-slice")
    assert status["cpu-vs-gpu"] == ("failed", "not run: needs train-cpu, train-gpu")
    assert status["tiled-data"] == ("ok", None)  # in-process: it ran
    assert status["kd-fp16"] == ("failed", "not run: needs teacher-tiled")
    assert status["study-4"] == ("failed", "not run: needs teacher-slice")
    assert doc["failed"] == [n for n, (s, _) in status.items() if s == "failed"]
    assert len(list((tmp_path / "work" / "tiled" / "train").rglob("*.png"))) == 20
    out = capsys.readouterr().out
    assert ["tiled-data", "ok"] in [line.split()[:2] for line in out.splitlines()]  # the table
    assert out.rstrip().endswith(f"results in {results}")


def test_run_past_its_budget_runs_no_more_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "gpu_absent_reason", lambda: None)
    monkeypatch.setattr(gpu, "host_info", lambda: {"gpu": "fake", "torch": "0", "python": "3"})
    results = tmp_path / "gpu.json"
    seconds = str(budget.RESERVE_SECONDS + 1)
    assert gpu.main(["--no-install", "--work-dir", str(tmp_path), "--results", str(results), "--budget", seconds]) == 1
    steps = json.loads(results.read_text())["steps"]
    assert {r["error"] for r in steps if r["name"] != "install"} <= {
        "not run: budget spent", "not run: needs teacher-slice", "not run: needs train-gpu",
        "not run: needs train-cpu, train-gpu", "not run: needs tiled-data", "not run: needs teacher-tiled",
        "not run: needs train-gpu, evaluate-cpu",
    }  # fmt: skip
    assert all(r["seconds"] == 0.0 for r in steps)  # nothing started
