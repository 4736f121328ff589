"""Parallel workers, shared caches, and faults: signals, killed workers, concurrent SQLite, crashes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import uuid
import warnings
from pathlib import Path

import optuna
import pytest
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from kdsearch.fsutil import atomic_write
from kdsearch.workers import _exit_reason, _stop_workers
from tests.helpers import (
    POSTGRES_URL,
    STALLING_MODEL,
    load_study,
    optimize_args,
    postgres_available,
    run_cli,
    spawn,
    wait_for_stall,
)

MYSQL_URL = os.environ.get("KDSEARCH_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")


@pytest.mark.slow
def test_n_jobs_finishes_exactly_the_requested_trials(
    pattern_folder: Path, pattern_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(optimize_args(pattern_folder, pattern_teacher, "--trials", "5", "--n-jobs", "2"), capsys)
    assert code == 0, err
    trials = load_study(home, "kd-imagefolder").get_trials()
    assert len(trials) == 5 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    # Two samplers with distinct seeds: the workers did not propose the same startup trials.
    assert len({t.params["lr"] for t in trials}) == 5


DYING_MODEL = """\
import multiprocessing
import os
import signal

from kdsearch.models import LightNN


class Net(LightNN):
    def forward(self, x):
        if self.training and multiprocessing.current_process().name != "MainProcess":
            os.kill(os.getpid(), signal.SIGKILL)  # a worker dies as the OOM killer ends it
        return super().forward(x)
"""


@pytest.mark.slow
def test_a_worker_that_dies_is_never_a_silent_success(
    pattern_folder: Path,
    pattern_teacher: Path,
    home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "dyingmodel.py").write_text(DYING_MODEL)
    monkeypatch.chdir(tmp_path)
    extra = ("--trials", "2", "--n-jobs", "2", "--student-model", "dyingmodel:Net")
    code, out, err = run_cli(optimize_args(pattern_folder, pattern_teacher, *extra), capsys)
    assert code == 1 and out == "", (code, out, err)
    assert err.strip().splitlines()[-1] == (
        "kdsearch: error: worker 1 of 2 stopped with SIGKILL (killed: out of memory?) before the study finished "
        "(its stderr, above, may say why); study 'kd-imagefolder' keeps the trials recorded so far"
    )


def test_a_workers_exit_is_said_as_its_code_or_the_signal_that_ended_it() -> None:
    """What a dead worker's message says: ``Process.exitcode`` is minus the signal's number."""
    assert _exit_reason(1) == "exit code 1"
    assert _exit_reason(-signal.SIGKILL) == "SIGKILL (killed: out of memory?)"
    assert _exit_reason(-signal.SIGSEGV) == "SIGSEGV"
    assert _exit_reason(-200) == "signal 200"


class StandInWorker:
    """A worker process as ``_stop_workers`` sees one, with a log of what was done to it.

    ``closes``: it closes its trial and exits once it is asked to wait (it had Ctrl-C from the
    terminal). ``obeys_sigterm``: terminate() ends it; otherwise only kill() does.
    """

    def __init__(self, *, closes: bool, obeys_sigterm: bool = True) -> None:
        self.closes, self.obeys_sigterm = closes, obeys_sigterm
        self.alive, self.log = True, []

    def is_alive(self) -> bool:
        return self.alive

    def join(self, timeout: float | None = None) -> None:
        self.log.append("join")
        self.alive = self.alive and not self.closes

    def terminate(self) -> None:
        self.log.append("terminate")
        self.closes = self.closes or self.obeys_sigterm

    def kill(self) -> None:
        self.log.append("kill")
        self.alive = False


def test_ctrl_c_to_the_parent_alone_reaches_the_workers_it_did_not_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (not forwarded): the workers get a moment to close their trials, those still running get
    SIGTERM, and one that ignores SIGTERM is killed after the grace period. SIGTERM is forwarded at once."""
    monkeypatch.setattr("kdsearch.workers.WORKER_GRACE_SECONDS", 0.0)
    reached, missed, stubborn = (
        StandInWorker(closes=True),
        StandInWorker(closes=False),
        StandInWorker(closes=False, obeys_sigterm=False),
    )
    _stop_workers([reached, missed, stubborn], forward=False)
    assert reached.log == ["join", "join"] and not reached.alive  # never signalled: it had the Ctrl-C
    assert missed.log == ["join", "terminate", "join"] and not missed.alive
    assert stubborn.log == ["join", "terminate", "join", "kill"] and not stubborn.alive
    forwarded = StandInWorker(closes=False)
    _stop_workers([forwarded], forward=True)
    assert forwarded.log == ["terminate", "join"] and not forwarded.alive


@pytest.mark.slow
def test_processes_on_one_sqlite_file_share_a_study_and_never_propose_the_same_trial(
    pattern_folder: Path, pattern_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's multi-host recipe: the same command in several processes on one storage, default seeds."""
    args = optimize_args(pattern_folder, pattern_teacher, "--trials", "6", "--total", "--study-name", "shared")
    assert run_cli([*args, "--trials", "1"], capsys)[0] == 0  # builds caches and the study (its baseline) first
    processes = [spawn(args, home) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        assert "database is locked" not in err
    trials = load_study(home, "shared").get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert 6 <= len(finished) <= 8 and not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.FAIL)]
    proposals = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(proposals)) == len(proposals)


def _signal_and_resume(
    storage: str,
    name: str,
    signum: int,
    code: int,
    folder: Path,
    teacher: Path,
    home: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = optimize_args(folder, teacher, "--study-name", name, "--storage", storage, "--student-model", STALLING_MODEL)
    marker = home.parent / "stalled"
    process = spawn([*args, "--trials", "5"], home, stall=marker)
    wait_for_stall(marker, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert err.strip().splitlines()[-1] == ("kdsearch: terminated" if code == 143 else "kdsearch: interrupted")
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert trials[-1].state == TrialState.FAIL
    assert run_cli([*args, "--trials", "1"], capsys)[0] == 0
    resumed = optuna.load_study(study_name=name, storage=storage).get_trials()
    assert len(resumed) == len(trials) + 1 and resumed[-1].state == TrialState.COMPLETE


@pytest.mark.slow
def test_ctrl_c_on_sqlite_closes_the_running_trial_and_the_next_run_resumes(
    pattern_folder: Path, pattern_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home.mkdir(parents=True)
    storage = f"sqlite:///{home / 'kdsearch.db'}"
    _signal_and_resume(storage, "sig", signal.SIGINT, 130, pattern_folder, pattern_teacher, home, capsys)


@pytest.mark.slow
@pytest.mark.postgres
def test_sigterm_on_postgres_closes_the_running_trial_and_the_next_run_resumes(
    postgres: str, pattern_folder: Path, pattern_teacher: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the SIGINT test above, both signals and both storages; SIGTERM on SQLite is the n-jobs test's
    (tests/test_reliability.py), where every worker closes its trial."""
    name = f"sig-{uuid.uuid4().hex[:8]}"
    try:
        _signal_and_resume(postgres, name, signal.SIGTERM, 143, pattern_folder, pattern_teacher, home, capsys)
    finally:
        optuna.delete_study(study_name=name, storage=postgres)


def _kill_and_recover(
    storage: str, name: str, folder: Path, teacher: Path, home: Path
) -> list[optuna.trial.FrozenTrial]:
    args = optimize_args(
        folder,
        teacher,
        "--storage",
        storage,
        "--study-name",
        name,
        "--heartbeat",
        "1",
        "--trials",
        "3",
        "--total",
        "--student-model",
        STALLING_MODEL,
    )
    marker = home.parent / "stalled"
    victim = spawn(args, home, stall=marker)
    wait_for_stall(marker, victim)
    victim.kill()  # kill -9 inside the training loop: no chance to close its trial
    victim.wait(timeout=30)
    time.sleep(4)  # past the heartbeat grace period (2 x 1 s + 1 s)
    survivor = spawn(args, home)
    _, err = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, err
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def _assert_recovered(trials: list[optuna.trial.FrozenTrial]) -> None:
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states
    assert states.count(TrialState.FAIL) == 1
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 3
    failed = next(t for t in trials if t.state == TrialState.FAIL)
    with warnings.catch_warnings():  # experimental in Optuna, and the one public way to ask
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retried = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == failed.number]
    assert len(retried) == 1 and retried[0].params == failed.params


@pytest.mark.slow
@pytest.mark.postgres
def test_killed_worker_on_postgres_is_failed_and_retried(
    postgres: str, pattern_folder: Path, pattern_teacher: Path, home: Path
) -> None:
    name = f"kill-{uuid.uuid4().hex[:8]}"
    try:
        _assert_recovered(_kill_and_recover(postgres, name, pattern_folder, pattern_teacher, home))
    finally:
        optuna.delete_study(study_name=name, storage=postgres)


def test_passwords_never_reach_output_or_exports(
    search, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kdsearch.storage import redact

    assert redact("postgresql+psycopg2://kd:hunter2@db.example/kd") == "postgresql+psycopg2://kd:***@db.example/kd"
    if not postgres_available():
        pytest.skip("PostgreSQL not reachable")
    url = POSTGRES_URL.replace("postgres@", "postgres:hunter2@")  # trust auth ignores the password
    name = f"pw-{uuid.uuid4().hex[:8]}"
    try:
        code, out, err = search("--trials", "1", "--storage", url, "--study-name", name, "--json")
        assert code == 0, err
        exported = tmp_path / "best.yaml"
        code, out2, err2 = run_cli(["export", "--study-name", name, "--storage", url, "-o", exported], capsys)
        assert code == 0, err2
        code, out3, err3 = run_cli(["studies", "--storage", url, "-f", "json"], capsys)
        for text in (out, err, out2, err2, out3, err3, exported.read_text()):
            assert "hunter2" not in text
        assert "postgres:***@" in exported.read_text() and "postgres:***@" in out
    finally:
        optuna.delete_study(study_name=name, storage=POSTGRES_URL)


@pytest.mark.slow
def test_killed_worker_on_sqlite_is_failed_and_retried(pattern_folder: Path, pattern_teacher: Path, home: Path) -> None:
    home.mkdir(parents=True)  # an explicit --storage must point into an existing directory
    _assert_recovered(
        _kill_and_recover(f"sqlite:///{home / 'kdsearch.db'}", "kill", pattern_folder, pattern_teacher, home)
    )


def test_a_crash_while_writing_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.pt"

    def crash(tmp: Path) -> None:
        tmp.write_bytes(b"half a checkpoint")
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        atomic_write(target, crash)
    assert list(tmp_path.iterdir()) == []
    atomic_write(target, lambda tmp: torch.save({"w": torch.ones(1)}, tmp))
    with pytest.raises(RuntimeError, match="power cut"):
        atomic_write(target, crash)
    assert torch.load(target, weights_only=True)["w"].item() == 1.0  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def _build_cache(home: str, folder: str, teacher: str, queue: multiprocessing.Queue) -> None:
    os.environ["KDSEARCH_HOME"] = home
    from kdsearch.data import load_splits
    from kdsearch.teacher import load_teacher
    from kdsearch.teacher_outputs import cached_teacher_outputs

    splits = load_splits("imagefolder", folder, val_size=50)
    loaded = load_teacher(teacher, None, splits, torch.device("cpu"))
    cached = cached_teacher_outputs(loaded.model, loaded.checksum, splits, "features", torch.device("cpu"))
    queue.put((cached.built, float(cached.outputs.logits[0].sum())))


@pytest.mark.slow
def test_concurrent_builders_produce_one_cache(pattern_folder: Path, pattern_teacher: Path, home: Path) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=_build_cache, args=(str(home), str(pattern_folder), str(pattern_teacher), queue))
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    results = [queue.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    assert sorted(built for built, _ in results) == [False, True]  # one built it, the other waited and read it
    assert results[0][1] == results[1][1]
    assert len(list((home / "cache" / "teacher").glob("*.pt"))) == 1


def test_a_study_on_mysql(search, home: Path) -> None:
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(MYSQL_URL).connect():
            pass
    except Exception:  # noqa: BLE001
        pytest.skip(f"MySQL/MariaDB not reachable at {MYSQL_URL}")
    name = f"mysql-{uuid.uuid4().hex[:8]}"
    try:
        code, _, err = search("--trials", "2", "--storage", MYSQL_URL, "--study-name", name)
        assert code == 0, err
        trials = optuna.load_study(study_name=name, storage=MYSQL_URL).get_trials()
        assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
        assert trials[0].user_attrs["baseline"] == "tutorial" and "artifact_id" in trials[0].user_attrs
    finally:
        optuna.delete_study(study_name=name, storage=MYSQL_URL)
