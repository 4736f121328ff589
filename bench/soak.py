"""Soak: 4 workers x 25 short trials on one PostgreSQL study, one worker killed (-9) and restarted.

Prints finished / failed / retried / still-running counts and exits non-zero unless the study holds
100 finished trials and none is left RUNNING. Uses a tiny teacher and a 500-image slice of the
shared CIFAR-10 copy so each trial takes a few seconds.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import cli_runner
import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

STORAGE = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--storage", default=os.environ.get("KDSEARCH_SOAK_STORAGE", STORAGE))
    parser.add_argument("--data-dir", default="../shared/datasets/cifar10-jpeg")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--trials", type=int, default=100)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="kdsearch-soak-"))
    env = {**os.environ, "KDSEARCH_HOME": str(home)}
    data = ["--dataset", "imagefolder", "--data-dir", args.data_dir, "--limit-train", "500", "--val-size", "500"]
    teacher = home / "teacher.pt"
    cli_runner.kdsearch("teacher", *data, "--epochs", "1", "--out", str(teacher), "-q", env=env)
    name = f"soak-{int(time.time())}"
    worker = cli_runner.kdsearch_command(
        ["optimize", "--method", "kd", *data, "--teacher", str(teacher), "--epochs", "2", "--storage", args.storage,
         "--study-name", name, "--trials", str(args.trials), "--total", "--heartbeat", "2", "-q"]
    )  # fmt: skip
    # The first worker creates the study and the caches; the others join once it exists.
    processes = [cli_runner.start(worker, env)]
    storage = optuna.storages.RDBStorage(args.storage)
    while name not in optuna.get_all_study_names(storage):
        time.sleep(0.5)
    processes += [cli_runner.start(worker, env) for _ in range(args.workers - 1)]
    time.sleep(random.uniform(20, 60))
    victim = random.randrange(len(processes))
    print(f"soak: killing worker {victim} (pid {processes[victim].process.pid}) with SIGKILL", flush=True)
    processes[victim].kill()
    processes[victim].wait()
    processes[victim] = cli_runner.start(worker, env)
    finished = [p.wait() for p in processes]
    codes = [f.returncode for f in finished]
    for failed in (f for f in finished if f.returncode):
        print(f"soak: a worker exited {failed.returncode}: {cli_runner.last_line(failed.stderr)}")
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    states = [t.state for t in trials]
    finished = states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED)
    failed = states.count(TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retried = sum(RetryHeartbeatStaleTrialCallback.retried_trial_number(t) is not None for t in trials)
    running = states.count(TrialState.RUNNING)
    print(
        f"soak: study {name}: finished {finished}, failed {failed}, retried {retried}, still running {running}, "
        f"worker exit codes {codes}"
    )
    ok = finished >= args.trials and running == 0 and all(c == 0 for c in codes)
    print("soak: OK" if ok else "soak: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
