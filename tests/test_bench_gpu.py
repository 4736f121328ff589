"""bench/gpu.py (issue #14) on the CPU: the no-GPU exit, its options, its pure helpers, and prepare offline.

Nothing here needs a GPU or the network; the device run itself is `make bench-gpu` on a CUDA machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import gpu  # noqa: E402 - after the repository root is importable

SCRIPT = ROOT / "bench" / "gpu.py"
PY = "/py"


def run_args(**overrides: object) -> argparse.Namespace:
    """The run command's defaults, as argparse gives them, with ``overrides``."""
    args = gpu.build_parser().parse_args(["run"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def fake_paths(tmp_path: Path) -> gpu.Paths:
    return gpu.Paths(tmp_path / "bundle", tmp_path / "slice", tmp_path / "work", tmp_path / "site")


def make_wheel(folder: Path, name: str, version: str, requires: list[str], tag: str = "py3-none-any") -> Path:
    """A minimal, installable wheel: one module ``<name>_mod`` and METADATA with ``requires``."""
    dist = name.replace("-", "_")
    path = folder / f"{dist}-{version}-{tag}.whl"
    info = f"{dist}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires) + "\nA description: ignored.\n"
    files = {
        f"{dist}_mod.py": "VALUE = 42\n",
        f"{info}/METADATA": metadata,
        f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }
    record = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for n, text in files.items():
            archive.writestr(n, text)
        archive.writestr(f"{info}/RECORD", record)
    return path


# --- the command line ----------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run its checks")
def test_without_a_gpu_says_so_in_one_line_and_exits_0_before_any_work(tmp_path: Path) -> None:
    work, site, results = tmp_path / "work", tmp_path / "site", tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--work-dir", str(work), "--site", str(site), "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0] == "bench/gpu.py: no CUDA GPU here (torch.cuda.is_available() is false); nothing to run"
    assert not work.exists() and not site.exists() and not results.exists()


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["prepare", "--help"]])
def test_help_exits_0(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        gpu.main(argv)
    assert exc.value.code == 0
    assert "usage: bench/gpu.py" in capsys.readouterr().out


@pytest.mark.parametrize("budget", ["0", "-30", "abc", "nan", "inf", ""])
def test_a_bad_budget_is_rejected_with_exit_2(budget: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        gpu.main(["--budget", budget])
    assert exc.value.code == 2
    assert "--budget" in capsys.readouterr().err


def test_run_is_the_default_command_and_prepare_needs_a_data_dir(capsys: pytest.CaptureFixture[str]) -> None:
    args = gpu.build_parser().parse_args(["run", "--budget", "90.5"])
    assert args.budget == 90.5 and args.func is gpu.run and args.study_trials == 50 and args.study_epochs == 10
    with pytest.raises(SystemExit) as exc:
        gpu.main(["prepare"])
    assert exc.value.code == 2
    assert "--data-dir" in capsys.readouterr().err


def test_the_script_runs_as_a_file_too() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--budget", "x"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "must be" in proc.stderr or "not a number" in proc.stderr


def test_dry_run_prints_every_step_with_its_command_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    assert gpu.main(["--dry-run", "--budget", "200", "--work-dir", str(work), "--study-trials", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [
        "install", "tests", "teacher-slice", "train-cpu", "train-gpu", "cpu-vs-gpu", "evaluate-cpu",
        "gpu-ckpt-on-cpu", "synthetic-data", "teacher-synthetic", "kd-fp32", "kd-bf16", "kd-fp16", "study-1",
        "study-4",
    ]  # fmt: skip
    assert "-k 'device or precision or cuda'" in lines[1]
    assert "--trials 5 --epochs 10 --n-jobs 4" in lines[-1]
    shares = [float(line.split()[1]) for line in lines]
    assert sum(shares) <= 200 - gpu.RESERVE_SECONDS + len(shares)  # shown rounded
    assert not work.exists()


def test_skip_leaves_out_groups_but_keeps_a_teacher_another_group_needs(capsys: pytest.CaptureFixture[str]) -> None:
    gpu.main(["--dry-run", "--skip", "train", "--skip", "precision", "--skip", "tests"])
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["install", "teacher-slice", "study-1", "study-4"]
    gpu.main(["--dry-run", "--no-install", "--skip", "study", "--skip", "train"])
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["tests", "synthetic-data", "teacher-synthetic", "kd-fp32", "kd-bf16", "kd-fp16"]


# --- commands and environment --------------------------------------------------------------------------


def test_step_command_lines(tmp_path: Path) -> None:
    paths = fake_paths(tmp_path)
    assert gpu.tests_command(PY) == [
        PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", "-k", "device or precision or cuda"
    ]  # fmt: skip
    assert gpu.teacher_command(Path("/s"), Path("/w/t.pt"), 5, 1000, python=PY) == [
        PY, "-m", "kdsearch", "teacher", "--preset", "tutorial", "--dataset", "imagefolder", "--data-dir", "/s",
        "--val-size", "1000", "--epochs", "5", "--seed", "42", "--device", "cuda", "--json", "-q", "--out", "/w/t.pt",
    ]  # fmt: skip
    assert gpu.train_command(Path("/s"), Path("/t.pt"), "cpu", 3, out=Path("/w/c.pt"), python=PY) == [
        PY, "-m", "kdsearch", "train", "--method", "kd", "--dataset", "imagefolder", "--data-dir", "/s",
        "--val-size", "0", "--epochs", "3", "--seed", "42", "--device", "cpu", "--teacher", "/t.pt", "--json", "-q",
        "--out", "/w/c.pt",
    ]  # fmt: skip
    fp16 = gpu.train_command(Path("/syn"), Path("/t.pt"), "cuda", 2, precision="fp16", python=PY)
    assert fp16[-2:] == ["--precision", "fp16"] and "--out" not in fp16
    assert gpu.evaluate_command(Path("/w/g.pt"), Path("/s"), python=PY) == [
        PY, "-m", "kdsearch", "evaluate", "--checkpoint", "/w/g.pt", "--dataset", "imagefolder", "--data-dir", "/s",
        "--val-size", "0", "--device", "cpu", "--json",
    ]  # fmt: skip
    study = gpu.optimize_command(paths, 4, 50, 10, 1000, timeout=120.0, python=PY)
    assert study == [
        PY, "-m", "kdsearch", "optimize", "--method", "kd", "--trials", "50", "--epochs", "10", "--n-jobs", "4",
        "--dataset", "imagefolder", "--data-dir", str(tmp_path / "slice"), "--val-size", "1000", "--device", "cuda",
        "--storage", f"sqlite:///{tmp_path}/work/gpu.db", "--study-name", "kd-gpu-4",
        "--teacher", str(tmp_path / "work" / "teacher-slice.pt"), "--timeout", "120", "--json", "-q",
    ]  # fmt: skip
    assert paths.storage.startswith("sqlite:////")  # an absolute path: four slashes
    assert "--timeout" not in gpu.optimize_command(paths, 1, 50, 10, 1000, python=PY)


def test_plan_steps_wire_the_teachers_checkpoints_and_timeouts(tmp_path: Path) -> None:
    paths = fake_paths(tmp_path)
    results = {"train-cpu": {"test_accuracy": 40.0}, "train-gpu": {"test_accuracy": 40.5}}
    steps = {s.name: s for s in gpu.plan_steps(run_args(python=PY, study_trials=8), paths, results)}
    assert steps["evaluate-cpu"].needs == ("train-gpu",)
    assert steps["tests"].env == {"KDSEARCH_TEST_DEVICE": "cuda"} and steps["tests"].ok_returncodes == (0, 5)
    gpu_train = steps["train-gpu"].command(30.0)  # type: ignore[misc]
    assert gpu_train[gpu_train.index("--out") + 1] == str(tmp_path / "work" / "ckpt-cuda.pt")
    evaluate = steps["evaluate-cpu"].command(30.0)  # type: ignore[misc]
    assert evaluate[evaluate.index("--checkpoint") + 1] == str(tmp_path / "work" / "ckpt-cuda.pt")
    teacher = steps["teacher-slice"].command(30.0)  # type: ignore[misc]
    assert teacher[teacher.index("--val-size") + 1] == "1000"  # the studies' validation images stay unseen
    kd_bf16 = steps["kd-bf16"].command(30.0)  # type: ignore[misc]
    assert kd_bf16[kd_bf16.index("--teacher") + 1] == str(tmp_path / "work" / "teacher-synthetic.pt")
    study = steps["study-1"].command(100.0)  # type: ignore[misc]
    assert study[study.index("--timeout") + 1] == "70" and study[study.index("--trials") + 1] == "8"
    assert steps["cpu-vs-gpu"].action(1.0) == {  # type: ignore[misc]
        "first": 40.0, "second": 40.5, "difference": 0.5, "tolerance": 1.0
    }  # fmt: skip


def test_step_timeout_shares_the_time_left_by_weight() -> None:
    assert gpu.step_timeout(100.0, 20.0, [30.0, 50.0]) == 20.0
    assert gpu.step_timeout(100.0, 50.0, []) == 100.0
    assert gpu.step_timeout(-5.0, 10.0, [10.0]) == 0.0
    assert gpu.study_optuna_timeout(100.0) == 70.0
    assert gpu.study_optuna_timeout(20.0) == 10.0


def test_subprocess_env_puts_the_tree_then_the_bundle_on_pythonpath(tmp_path: Path) -> None:
    base = {"PATH": "/bin", "PYTHONPATH": "/theirs", "KDSEARCH_STORAGE": "sqlite:///elsewhere.db"}
    env = gpu.subprocess_env(base, tmp_path / "site", tmp_path / "home")
    assert env["PYTHONPATH"].split(":") == [str(ROOT), str(tmp_path / "site"), "/theirs"]
    assert env["KDSEARCH_HOME"] == str(tmp_path / "home") and env["PYTHONUNBUFFERED"] == "1"
    assert "KDSEARCH_STORAGE" not in env and env["PATH"] == "/bin"
    assert base["PYTHONPATH"] == "/theirs"  # not modified
    assert gpu.subprocess_env({}, None, tmp_path)["PYTHONPATH"] == str(ROOT)


# --- parsing and reporting -----------------------------------------------------------------------------


def test_parse_outputs() -> None:
    assert gpu.parse_pytest_counts(".\n1 passed, 143 deselected in 0.35s\n") == {
        "passed": 1, "failed": 0, "errors": 0, "skipped": 0, "deselected": 143
    }  # fmt: skip
    summary = "FAILED tests/x.py::t - boom\n==== 2 failed, 3 passed, 1 skipped, 2 errors, 1 warning in 1.20s ===="
    assert gpu.parse_pytest_counts(summary) == {"passed": 3, "failed": 2, "errors": 2, "skipped": 1, "warnings": 1}
    assert gpu.parse_pytest_counts("no tests ran in 0.01s") == {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    assert gpu.parse_json_output('kdsearch: log\n{"test_accuracy": 41.5}\n\n') == {"test_accuracy": 41.5}
    assert gpu.parse_json_output('{"a": 1}\n{"b": 2}\n') == {"b": 2}
    with pytest.raises(ValueError, match="JSON"):
        gpu.parse_json_output("[1, 2]\nnot json\n")
    assert gpu.last_line("a\n  b  \n\n") == "b" and gpu.last_line(None) == ""
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
    assert gpu.format_table(sample_records()).splitlines() == [
        "step       status   seconds  result",
        "tests      ok          12.3  4 passed, 0 failed, 0 errors, 1 skipped",
        "train-gpu  ok           9.0  test accuracy 41.23%",
        "kd-bf16    ok          20.0  steady epoch 1.50 s, test accuracy 10.00%",
        "study-4    ok          99.0  88.2 s wall: 30 complete, 20 pruned, 0 failed, 1.76 s a trial",
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
    assert "func" not in doc["options"]
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


def test_study_seconds_per_trial_and_long_errors() -> None:
    assert gpu.study_seconds_per_trial({"wall_seconds": 10.0, "complete": 3, "pruned": 1}) == 2.5
    assert gpu.study_seconds_per_trial({"wall_seconds": 10.0, "complete": 0, "pruned": 0}) is None
    long = {"name": "tests", "status": "failed", "seconds": 1.0, "error": "x" * 300}
    assert gpu.describe(long) == "x" * 97 + "..."


def test_compare_accuracies() -> None:
    assert gpu.compare_accuracies(40.0, 40.1, 0.1)["difference"] == 0.1
    with pytest.raises(RuntimeError, match=r"1\.50 points apart"):
        gpu.compare_accuracies(40.0, 38.5, 1.0)


# --- guarded steps -------------------------------------------------------------------------------------


def python_step(name: str, code: str, **kwargs: object) -> gpu.Step:
    return gpu.Step(name, 1.0, ("tests",), command=lambda t: [sys.executable, "-c", code], **kwargs)  # type: ignore[arg-type]


def test_execute_step_records_results_failures_and_timeouts() -> None:
    env = gpu.subprocess_env({"PATH": "/usr/bin:/bin"}, None, Path("/nonexistent-home"))
    ok = gpu.execute_step(python_step("train-gpu", "print('{\"test_accuracy\": 12.5}')"), 60.0, env)
    assert ok["status"] == "ok" and ok["result"] == {"test_accuracy": 12.5} and ok["returncode"] == 0
    code = "import sys; print('noise'); sys.stderr.write('Traceback\\nValueError: the real reason\\n'); sys.exit(3)"
    failed = gpu.execute_step(python_step("train-cpu", code), 60.0, env)
    assert failed["status"] == "failed" and failed["returncode"] == 3
    assert failed["error"] == "ValueError: the real reason" and failed["stderr_tail"].startswith("Traceback")
    assert "stderr_tail" not in ok
    slow = gpu.execute_step(python_step("slow", "import time; time.sleep(60)"), 1.0, env)
    assert slow["status"] == "failed" and slow["error"].startswith("timed out after 1 s")
    study = python_step("study-1", 'print(\'{"wall_seconds": 1.0, "complete": 1, "failed": 2}\')')
    assert gpu.execute_step(study, 60.0, env)["error"] == "2 trials failed"
    tests = python_step("tests", "import sys; print('5 deselected in 0.1s'); sys.exit(5)", parse="pytest",
                        ok_returncodes=(0, 5), env={"KDSEARCH_TEST_DEVICE": "cuda"})  # fmt: skip
    record = gpu.execute_step(tests, 60.0, env)
    assert record["status"] == "ok" and record["result"]["deselected"] == 5

    def broken(timeout: float) -> dict[str, object]:
        raise KeyError("teacher")

    crashed = gpu.execute_step(gpu.Step("install", 1.0, ("tests",), action=broken), 5.0, env)
    assert crashed["status"] == "failed" and crashed["error"] == "KeyError: 'teacher'"


# --- bundle: prepare and install, offline --------------------------------------------------------------


def image_folder(root: Path, per_class: dict[str, dict[str, int]]) -> None:
    for split, classes in per_class.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (32, 32), (i, 0, 0)).save(folder / f"{i:04d}.jpg")


def test_copy_slice_takes_the_first_images_of_each_class(tmp_path: Path) -> None:
    source = tmp_path / "cifar"
    image_folder(source, {"train": {"cat": 7, "dog": 7, "frog": 3}, "test": {"cat": 4, "dog": 4, "frog": 4}})
    (source / "train" / ".hidden").mkdir()
    counts = gpu.copy_slice(source, tmp_path / "slice", train_per_class=5, test_per_class=2)
    assert counts == {"train": {"cat": 5, "dog": 5, "frog": 3}, "test": {"cat": 2, "dog": 2, "frog": 2}}
    assert sorted(p.name for p in (tmp_path / "slice" / "train" / "dog").iterdir()) == [
        "0000.jpg", "0001.jpg", "0002.jpg", "0003.jpg", "0004.jpg"
    ]  # fmt: skip
    assert len(list((tmp_path / "slice").rglob("*.jpg"))) == 19
    with pytest.raises(FileNotFoundError, match="missing"):
        gpu.copy_slice(tmp_path / "missing", tmp_path / "other", 1, 1)


def fake_index(tmp_path: Path) -> dict[str, Path]:
    """A tiny index: optuna needs sqlalchemy (which needs greenlet on 3.10 only), tomli on 3.10, numpy."""
    index = tmp_path / "index"
    index.mkdir()
    return {
        "optuna==5.0.0": make_wheel(index, "optuna", "5.0.0", ["SQLAlchemy>=1.4.2", "numpy", "pytest; extra == 't'"]),
        "sqlalchemy==2.1.9": make_wheel(index, "SQLAlchemy", "2.1.9", ["typing-extensions>=4.6"], "cp311-cp311-x"),
        "sqlalchemy>=1.4.2": make_wheel(
            index, "SQLAlchemy", "2.0.40", ['greenlet>=1; platform_machine == "x86_64"'], "cp310-cp310-x"
        ),
        "greenlet>=1": make_wheel(index, "greenlet", "3.0.0", [], "cp310-cp310-x"),
        "cmaes==0.13.1": make_wheel(index, "cmaes", "0.13.1", ['tomli; python_version < "3.11"', "numpy"]),
        "tomli": make_wheel(index, "tomli", "2.0.0", []),
    }  # fmt: skip


def test_resolve_wheels_follows_markers_pins_and_falls_back(tmp_path: Path) -> None:
    index = fake_index(tmp_path)
    asked: list[tuple[str, str]] = []

    def download(spec: str, python_version: str, dest: Path) -> Path:
        asked.append((spec, python_version))
        if spec == "sqlalchemy==2.1.9" and python_version == "3.10":
            raise RuntimeError("requires Python >=3.11")  # like pip: SQLAlchemy 2.1 needs 3.11
        if spec not in index:
            raise RuntimeError(f"no {spec}")
        return index[spec]

    pins = {"optuna": "5.0.0", "sqlalchemy": "2.1.9", "cmaes": "0.13.1"}.get
    dest = tmp_path / "wheels"
    assert gpu.resolve_wheels(("optuna", "cmaes"), "3.12", dest, download=download, pins=pins) == [
        "cmaes-0.13.1-py3-none-any.whl", "optuna-5.0.0-py3-none-any.whl", "SQLAlchemy-2.1.9-cp311-cp311-x.whl"
    ]  # fmt: skip
    assert ("numpy", "3.12") not in asked and ("typing-extensions>=4.6", "3.12") not in asked  # the device has them
    asked.clear()
    assert gpu.resolve_wheels(("optuna", "cmaes"), "3.10", dest, download=download, pins=pins) == [
        "cmaes-0.13.1-py3-none-any.whl", "greenlet-3.0.0-cp310-cp310-x.whl", "optuna-5.0.0-py3-none-any.whl",
        "SQLAlchemy-2.0.40-cp310-cp310-x.whl", "tomli-2.0.0-py3-none-any.whl",
    ]  # fmt: skip
    assert ("sqlalchemy==2.1.9", "3.10") in asked and ("sqlalchemy>=1.4.2", "3.10") in asked


def test_pip_download_command_asks_for_the_device_platform() -> None:
    command = gpu.pip_download_command("sqlalchemy==2.1.9", "3.10", Path("/d"), python=PY)
    assert command[:4] == [PY, "-m", "pip", "download"] and command[-3:] == ["-d", "/d", "sqlalchemy==2.1.9"]
    assert "--no-deps" in command and "--only-binary=:all:" in command
    assert command[command.index("--python-version") + 1] == "3.10"
    assert "manylinux2014_x86_64" in command and "manylinux_2_28_x86_64" in command


def test_prepare_writes_the_bundle_and_fails_over_the_size_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "cifar"
    image_folder(source, {"train": {"a": 4, "b": 4}, "test": {"a": 2, "b": 2}})
    wheel = make_wheel(tmp_path, "optuna", "5.0.0", [])

    def fake_resolve(roots: tuple[str, ...], version: str, dest: Path) -> list[str]:
        assert "pytest" in roots and ("plotly" in roots) is (version != "3.12")
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return [wheel.name]

    monkeypatch.setattr(gpu, "resolve_wheels", fake_resolve)
    bundle = tmp_path / "bundle"
    argv = ["prepare", "--data-dir", str(source), "--bundle", str(bundle), "--train-per-class", "3"]
    assert gpu.main([*argv, "--test-per-class", "1", "--python-versions", "3.11"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["wheels"] == {"3.11": [wheel.name]}
    assert manifest["slice"]["counts"] == {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}}
    assert (bundle / ".gitignore").read_text().splitlines()[-1] == "*"
    out = capsys.readouterr().out
    assert "slice: 6 train + 2 test images" in out and f"bundle {bundle}:" in out
    monkeypatch.setattr(gpu, "MAX_BUNDLE_BYTES", 10)
    assert gpu.main([*argv, "--python-versions", "3.12", "--no-plots"]) == 1
    assert json.loads((bundle / "manifest.json").read_text())["wheels"] == {"3.12": [wheel.name]}  # rebuilt


def test_wheels_to_install_skips_what_the_device_has() -> None:
    manifest = {"wheels": {"3.12": ["optuna-5.0.0-py3-none-any.whl", "MarkupSafe-3.0.4-cp312-cp312-x.whl"]}}
    missing, present = gpu.wheels_to_install(manifest, "3.12", installed=lambda name: name == "markupsafe")
    assert missing == ["optuna-5.0.0-py3-none-any.whl"] and present == ["markupsafe"]
    with pytest.raises(RuntimeError, match=r"no wheels for Python 3\.13"):
        gpu.wheels_to_install(manifest, "3.13")
    assert gpu.wheel_distribution("optuna_dashboard-0.21.0-py3-none-any.whl") == "optuna-dashboard"


def test_install_bundle_installs_offline_into_its_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    wheel = make_wheel(bundle / "wheels", "kdsearch-bench-fake", "1.0", [])
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    (bundle / "manifest.json").write_text(
        json.dumps({"wheels": {version: [wheel.name, "MarkupSafe-3.0-cp3-x.whl", "click-8.0-py3-none-any.whl"]}})
    )
    site = tmp_path / "site"
    result = gpu.install_bundle(bundle, site, timeout=120.0)
    assert (
        result["installed"] == [wheel.name] and result["already_there"] == ["markupsafe"] and result["method"] == "pip"
    )
    proc = subprocess.run(
        [sys.executable, "-c", "import kdsearch_bench_fake_mod as m; print(m.VALUE)"],
        env={"PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip() == "42", proc.stderr
    monkeypatch.syspath_prepend(str(site))  # as if an earlier run's PYTHONPATH were still set: not "there"
    assert gpu.install_bundle(bundle, site, timeout=120.0)["installed"] == [wheel.name]  # emptied and refilled
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    with pytest.raises(RuntimeError, match="not made by this script"):
        gpu.install_bundle(bundle, foreign, timeout=120.0)
    assert (foreign / "keep.txt").exists()


@pytest.mark.parametrize("processes", [1, 2])
def test_write_synthetic_makes_an_image_folder(tmp_path: Path, processes: int) -> None:
    counts = gpu.write_synthetic(tmp_path / "syn", n_train=25, n_test=10, classes=3, processes=processes, chunk=4)
    assert counts == {"train": 25, "test": 10, "classes": 3, "written": 35}
    per_class = [len(list((tmp_path / "syn" / "train" / f"class{i}").glob("*.png"))) for i in range(3)]
    assert per_class == [9, 8, 8]
    with Image.open(tmp_path / "syn" / "test" / "class2" / "00002.png") as image:
        assert image.size == (32, 32) and image.mode == "RGB"


# --- the whole run, with an interpreter that fails every command -------------------------------------------


def test_run_guards_every_step_writes_the_json_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = tmp_path / "fakepy"
    fake.write_text("#!/bin/sh\necho 'Traceback...' >&2\necho 'kdsearch: error: no CUDA device here' >&2\nexit 2\n")
    fake.chmod(0o755)
    monkeypatch.setattr(gpu, "gpu_absent_reason", lambda: None)
    monkeypatch.setattr(gpu, "host_info", lambda: {"gpu": "fake", "torch": "0", "python": "3"})
    results = tmp_path / "out" / "gpu.json"
    argv = ["--no-install", "--work-dir", str(tmp_path / "work"), "--results", str(results), "--python", str(fake)]
    code = gpu.main([*argv, "--budget", "120", "--synthetic-images", "20", "--synthetic-test", "10"])
    assert code == 1
    doc = json.loads(results.read_text())
    status = {r["name"]: (r["status"], r["error"]) for r in doc["steps"]}
    assert status["install"] == ("skipped", "not asked for (--skip/--no-install)")
    assert status["tests"][0] == "failed"
    assert status["teacher-slice"] == ("failed", "kdsearch: error: no CUDA device here")
    assert status["train-cpu"] == ("failed", "not run: needs teacher-slice")
    assert status["cpu-vs-gpu"] == ("failed", "not run: needs train-cpu, train-gpu")
    assert status["synthetic-data"] == ("ok", None)  # in-process: it ran
    assert status["kd-fp16"] == ("failed", "not run: needs teacher-synthetic")
    assert status["study-4"] == ("failed", "not run: needs teacher-slice")
    assert doc["failed"] == [n for n, (s, _) in status.items() if s == "failed"]
    assert len(list((tmp_path / "work" / "synthetic" / "train").rglob("*.png"))) == 20
    out = capsys.readouterr().out
    assert "synthetic-data     ok" in out and out.rstrip().endswith(f"results in {results}")


def test_run_past_its_budget_runs_no_more_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "gpu_absent_reason", lambda: None)
    monkeypatch.setattr(gpu, "host_info", lambda: {"gpu": "fake", "torch": "0", "python": "3"})
    results = tmp_path / "gpu.json"
    budget = str(gpu.RESERVE_SECONDS + 1)
    assert gpu.main(["--no-install", "--work-dir", str(tmp_path), "--results", str(results), "--budget", budget]) == 1
    steps = json.loads(results.read_text())["steps"]
    assert {r["error"] for r in steps if r["name"] not in ("install",)} <= {
        "not run: budget spent", "not run: needs teacher-slice", "not run: needs train-gpu",
        "not run: needs train-cpu, train-gpu", "not run: needs synthetic-data", "not run: needs teacher-synthetic",
        "not run: needs train-gpu, evaluate-cpu",
    }  # fmt: skip
