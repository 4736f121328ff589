"""bench/cli_runner.py, the one way the bench scripts run kdsearch: the command shown, the JSON read back,
failures in one line, timeouts that stop the workers too, and workers run side by side; and that every
bench script still imports with it.

The commands run here are tiny Python one-liners or fake interpreters: nothing trains.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))  # as the scripts see each other: bench/ is their sys.path[0]

import cli_runner  # noqa: E402 - after bench/ is importable


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def running(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie nobody has reaped yet (in a container, say) has stopped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_the_command_runs_the_working_trees_kdsearch_and_is_shown_as_typed() -> None:
    command = cli_runner.kdsearch_command(["train", "--method", "kd", "--data-dir", "my data"], python="/py")
    assert command == ["/py", "-m", "kdsearch", "train", "--method", "kd", "--data-dir", "my data", "--json"]
    assert cli_runner.shown(command) == "kdsearch train --method kd --data-dir 'my data' --json"
    assert cli_runner.kdsearch_command(["export"], python="/py", as_json=False) == ["/py", "-m", "kdsearch", "export"]
    assert cli_runner.shown(["/py", "-m", "pytest", "-q"]) == "/py -m pytest -q"


def test_kdsearch_returns_the_json_and_the_shown_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = tmp_path / "fakepy"  # prints its arguments as kdsearch --json would print a result
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\nprint('log line')\nprint(json.dumps({{'argv': sys.argv[1:]}}))\n"
    )
    fake.chmod(0o755)
    result, shown = cli_runner.kdsearch("evaluate", "--checkpoint", "c.pt", python=str(fake))
    assert result == {"argv": ["-m", "kdsearch", "evaluate", "--checkpoint", "c.pt", "--json"]}
    assert shown == "kdsearch evaluate --checkpoint c.pt --json"
    assert capsys.readouterr().err == "$ kdsearch evaluate --checkpoint c.pt --json\n"


def test_a_failure_says_why_in_one_line() -> None:
    code = "import sys; print('noise'); sys.stderr.write('Traceback\\nValueError: the real reason\\n'); sys.exit(3)"
    finished = cli_runner.run(python(code))
    assert finished.returncode == 3 and finished.stdout == "noise\n" and not finished.timed_out
    with pytest.raises(cli_runner.CommandError, match=r"^ValueError: the real reason$"):
        finished.check()
    assert finished.check(ok_returncodes=(0, 3)) is finished
    with pytest.raises(cli_runner.CommandError, match=r"^exit code 4$"):
        cli_runner.run(python("import sys; sys.exit(4)")).check()


def test_json_is_the_last_object_printed() -> None:
    printed = cli_runner.run(python('print("kdsearch: log"); print(\'{"a": 1}\'); print(\'{"b": 2}\'); print()'))
    assert printed.json() == {"b": 2}
    with pytest.raises(ValueError, match="no JSON object"):
        cli_runner.run(python("print('[1, 2]'); print('{not json')")).json()


def test_a_timeout_stops_the_command_and_the_workers_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "worker.pid"
    code = (
        "import subprocess, sys, time\n"
        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(worker.pid))\n"
        "time.sleep(60)\n"
    )
    finished = cli_runner.run(python(code), timeout=2.0)
    assert finished.timed_out and finished.returncode is not None
    with pytest.raises(cli_runner.CommandError, match=r"^timed out after 2 s"):
        finished.check()
    worker = int(pid_file.read_text())
    for _ in range(50):  # the worker got SIGTERM with its group: give it a moment to go
        if not running(worker):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"worker {worker} still runs after its command timed out")


def test_workers_side_by_side_never_block_on_their_output() -> None:
    # Each writes far more than a pipe holds (64 KiB) before it exits; waited for one after the other.
    code = "import sys; sys.stderr.write('x' * 400_000); print('{\"done\": true}')"
    running = [cli_runner.start(python(code)) for _ in range(3)]
    finished = [worker.wait(timeout=60) for worker in running]
    assert all(not f.timed_out and f.json() == {"done": True} and len(f.stderr) == 400_000 for f in finished)


@pytest.mark.parametrize("script", ["tutorial", "studies", "pareto", "speed", "soak"])
def test_every_bench_script_imports_with_the_shared_runner(script: str) -> None:
    assert callable(importlib.import_module(script).main)  # its imports from cli_runner (and tutorial) resolve
