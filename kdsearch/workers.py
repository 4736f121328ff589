"""Running a study's trials: in this process, or in N worker processes sharing it through the storage.

Each worker is a process with its own copy of the data (from the caches the parent built), its own
sampler seed and a share of the CPU threads. Ctrl-C or SIGTERM reaches every worker: the running
trials close as failed and no new trial starts.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

from kdsearch.distill import prepare
from kdsearch.errors import ConfigError, RunFailedError, Terminated, UserError, raise_terminated, shown
from kdsearch.objective import Objective
from kdsearch.progress import TrialProgress
from kdsearch.search_config import SearchConfig
from kdsearch.storage import open_storage

if TYPE_CHECKING:
    from kdsearch.study import SearchPlan

# Seconds a worker gets to close its running trial after Ctrl-C/SIGTERM before it is killed.
WORKER_GRACE_SECONDS = 20.0


class SignalsBetweenTrials:
    """Ctrl-C and SIGTERM interrupt a trial's training, never Optuna's bookkeeping around it.

    A signal that arrives while Optuna records a finished trial (or asks for the next one) would
    unwind out of the storage write and leave that trial RUNNING until its heartbeat went stale. Here
    such a signal waits: it is raised once the trial is recorded (from the callback Optuna calls
    after it), or as the next trial's objective starts, where Optuna records the trial as failed.
    """

    def __init__(self) -> None:
        self.in_objective = False
        self.pending: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> SignalsBetweenTrials:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.pending is not None and exc[0] is None:
            self._raise()

    def handle(self, signum: int, _frame: object) -> None:
        if self.in_objective:
            self._raise(signum)
        self.pending = signum

    def _raise(self, signum: int | None = None) -> None:
        signum = self.pending if signum is None else signum
        self.pending = None
        if signum == signal.SIGTERM:
            raise Terminated(signum)
        raise KeyboardInterrupt

    def objective(self, objective: Callable[[optuna.Trial], Any]) -> Callable[[optuna.Trial], Any]:
        def run(trial: optuna.Trial) -> Any:
            if self.pending is not None:
                self._raise()
            self.in_objective = True
            try:
                return objective(trial)
            finally:
                self.in_objective = False

        return run

    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """An Optuna callback: the trial is recorded, a signal that waited is raised now."""
        if self.pending is not None:
            self._raise()


def run_trials(
    study: optuna.Study, objective: Objective, search: SearchConfig, callbacks: list[Any], trials: int | None
) -> None:
    """Run ``trials`` trials, or with ``total`` until the study holds that many finished trials."""
    with SignalsBetweenTrials() as signals:
        run = signals.objective(objective)
        if not search.total:
            study.optimize(run, n_trials=trials, timeout=search.timeout, callbacks=[signals.after_trial, *callbacks])
            return
        assert search.trials is not None
        # Running trials count as claimed, so parallel workers stop together instead of overshooting.
        claimed = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        if len(study.get_trials(deepcopy=False, states=claimed)) >= search.trials:
            return
        callbacks = [signals.after_trial, *callbacks, MaxTrialsCallback(search.trials, states=claimed)]
        study.optimize(run, n_trials=None, timeout=search.timeout, callbacks=callbacks)


def _worker(plan: SearchPlan, worker: int, trials: int | None, threads: int, errors: Any) -> None:
    """One worker process: its own data copy and sampler, the shared study, its share of trials."""
    import torch

    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        torch.set_num_threads(threads)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        prepared = prepare(plan.config, augmentations=plan.augmentations(), methods=plan.methods)
        storage = open_storage(plan.storage_url, heartbeat=plan.search.heartbeat)
        study = optuna.load_study(
            study_name=plan.study_name, storage=storage, sampler=plan.sampler(worker), pruner=plan.pruner()
        )
        if worker > 0:
            _let_earlier_workers_claim_first(study, worker)
        run_trials(study, plan.objective(prepared), plan.search, [], trials)
    except KeyboardInterrupt as exc:
        sys.exit(143 if isinstance(exc, Terminated) else 130)
    except UserError as exc:
        # A ConfigError stays one (it pickles), so the parent says its field as a flag.
        errors.put(("user", exc if isinstance(exc, ConfigError) else UserError(str(exc))))
        sys.exit(2)
    except Exception:  # noqa: BLE001 - a bug in a worker: its traceback goes to the parent
        errors.put(("bug", traceback.format_exc()))
        sys.exit(1)


def _let_earlier_workers_claim_first(study: optuna.Study, worker: int, timeout: float = 120.0) -> None:
    """Hold worker k back until the k workers before it have each claimed one of the enqueued trials.

    SQLite has no row locks, so two workers asking for a trial at the same moment could both claim
    the same waiting trial. Workers start together, so that moment is the start: staggering the
    first claims removes it (later claims fall at trial ends, seconds apart). A study across methods
    starts with one waiting trial per method, so workers do not wait for all of them to be taken.
    The wait is bounded, so a stuck worker cannot hold the others forever.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        trials = study.get_trials(deepcopy=False)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        claimed = sum(t.state != TrialState.WAITING for t in trials if "baseline" in t.user_attrs)
        if waiting == 0 or claimed >= worker:
            return
        time.sleep(0.2)


def _shares(search: SearchConfig) -> list[int | None]:
    if search.trials is None or search.total:
        return [search.trials if search.total else None] * search.n_jobs
    shares = [
        search.trials // search.n_jobs + (1 if i < search.trials % search.n_jobs else 0) for i in range(search.n_jobs)
    ]
    return [s for s in shares if s]


def run_workers(plan: SearchPlan, study: optuna.Study, bar: TrialProgress) -> None:
    """Worker processes on the same study, CPU threads split between them; signals reach them all."""
    import torch

    context = multiprocessing.get_context("spawn")
    errors = context.Queue()
    shares = _shares(plan.search)
    threads = max(1, torch.get_num_threads() // len(shares))
    workers = [
        context.Process(target=_worker, args=(plan, i, share, threads, errors), daemon=True)
        for i, share in enumerate(shares)
    ]
    for process in workers:
        process.start()
    try:
        while any(p.is_alive() for p in workers):
            workers[0].join(timeout=1.0)
            bar.poll()
    except KeyboardInterrupt as exc:
        _stop_workers(workers, forward=isinstance(exc, Terminated))
        raise
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    for kind, error in failures:
        if kind == "user":
            raise error
    if failures:
        raise RuntimeError("a worker failed:\n" + failures[0][1])
    died = [(i, p.exitcode) for i, p in enumerate(workers) if p.exitcode]
    if died:
        # Dead before it could say why (killed, out of memory, a crash, or its start-up failed): never
        # a silent success, whatever the other workers finished.
        i, code = died[0]
        raise RunFailedError(
            f"worker {i + 1} of {len(workers)} stopped with {_exit_reason(code)} before the study finished "
            f"(its stderr, above, may say why); study {shown(plan.study_name)} keeps the trials recorded so far"
        )


def _exit_reason(code: int) -> str:
    """``exit code 1``, or the signal that ended the process (a negative exit code)."""
    if code > 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"
    return f"{name} (killed: out of memory?)" if -code == signal.SIGKILL else name


def _stop_workers(workers: list[Any], *, forward: bool) -> None:
    """Let every worker close its running trial, then make sure none is left.

    SIGTERM reached this process only: it is passed on at once. Ctrl-C in a terminal reached the
    whole process group, so the workers are already closing their trials; those that are still
    running after a moment (the signal was sent to this process alone) get SIGTERM too.
    """
    if not forward:
        deadline = time.monotonic() + 2.0
        for process in workers:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in workers:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + WORKER_GRACE_SECONDS
    for process in workers:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
