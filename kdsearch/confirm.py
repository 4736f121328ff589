"""`kdsearch confirm`: re-train a study's best configs with several seeds before believing the winner.

A search picks its best trial on one seed, while seeds move a 10-epoch run by points. Confirmation
re-trains the K best configs with N seeds each on the search's own split, ranks them by mean
validation accuracy, and only then looks at the test split — for the chosen config and, seed for
seed, for the baselines it is compared with: the hand-set config and/or a control (the best config
of another study, a CE search say). Each difference is reported as the mean of the paired per-seed
differences with a 95 % confidence interval (Student's t).

The runs are trials of a companion study ``<study>-confirm`` in the same storage, enqueued with
their arm and seed as parameters: an interrupted confirm resumes where it stopped (finished runs
are not redone), several processes or hosts can share the work, and the dashboard shows it.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsearch.config import RECIPE_SPACE, RunConfig
from kdsearch.distill import Prepared, prepare, train_student
from kdsearch.errors import ConfigError, DivergedError, UserError
from kdsearch.export import best_trials, confirmation, confirmed_first, trial_run_config
from kdsearch.knobs import default_of
from kdsearch.loop import evaluate
from kdsearch.search_config import SearchConfig
from kdsearch.settings import HAND_SET
from kdsearch.storage import load_existing_study, open_storage, redact
from kdsearch.strategies import get_strategy

# Seconds between a confirmation run's heartbeats, a search's default: a run whose worker died goes
# stale after two missed beats and is failed and enqueued again, so waiting workers never wait forever.
HEARTBEAT_SECONDS: int = default_of(SearchConfig, "heartbeat")
# The user attribute that marks a run kdsearch enqueued, holding its {"arm", "seed"} (older versions: True).
ENQUEUED = "enqueued"
# How often a worker with nothing left to run looks whether the others' runs have finished.
POLL_SECONDS = 2.0
# Two-sided 95 % quantiles of Student's t by degrees of freedom; past 30 the normal's 1.96 is within 2 %.
T_975 = (
    *(12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131),
    *(2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042),
)


def t_quantile(degrees: int) -> float:
    return T_975[degrees - 1] if degrees <= len(T_975) else 1.96


@dataclass(frozen=True)
class Interval:
    mean: float
    half_width: float | None  # None with a single pair: no spread to estimate
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.half_width is not None and abs(self.mean) > self.half_width

    def __str__(self) -> str:
        spread = f" ± {self.half_width:.2f}" if self.half_width is not None else " (one seed: no interval)"
        return f"{self.mean:+.2f}{spread}"


def paired_interval(first: list[float], second: list[float]) -> Interval:
    """Mean of the per-seed differences ``first − second`` with its 95 % t interval."""
    differences = [a - b for a, b in zip(first, second, strict=True)]
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return Interval(mean, None, len(differences))
    half = t_quantile(len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return Interval(mean, half, len(differences))


def companion_name(study_name: str) -> str:
    return f"{study_name}-confirm"


def arms_of(study: optuna.Study, top: int, against: str, storage_url: str | None) -> dict[str, RunConfig]:
    """The configs to re-train: the K best trials, and the baselines they are compared with."""
    arms = {f"trial-{t.number}": trial_run_config(study, t) for t in best_trials(study, top)}
    base = next(iter(arms.values()))
    attrs = {key: value for key, value in study.user_attrs.items() if key in ("method", *base.flat())}
    arms[HAND_SET] = RunConfig.from_flat(attrs | {"hyperparameters": {}}, origin=f"of study {study.study_name!r}")
    if against != HAND_SET:
        control_study, control_url = load_existing_study(storage_url, against)
        if control_study.user_attrs.get("data_fingerprint") != study.user_attrs.get("data_fingerprint") or (
            control_study.user_attrs.get("val_size") != study.user_attrs.get("val_size")
        ):
            raise ConfigError("against", f"{against!r} names a study of other data or another validation split")
        # The control's own confirmed winner when it has been confirmed (a pick over seeds, as this
        # study's is), else its best trial.
        (best,) = confirmed_first(
            control_study, best_trials(control_study, 1), confirmation(control_study, control_url), 1
        )
        control = trial_run_config(control_study, best)
        if get_strategy(control.method).uses_teacher and control.method != base.method:
            raise ConfigError(
                "against",
                f"{against!r} names a {control.method} study: a control needs no teacher (ce) or shares the method",
            )
        arms[f"control-{against}"] = control
    return arms


@dataclass
class ConfirmObjective:
    """Runs one enqueued (arm, seed) of the companion study; trials nobody enqueued are turned away."""

    prepared: Prepared
    arms: dict[str, RunConfig]
    seeds: list[int]

    def __call__(self, trial: optuna.Trial) -> float:
        if not trial.user_attrs.get(ENQUEUED):
            raise optuna.TrialPruned("nothing left to confirm")  # another worker took the last run
        arm = str(trial.suggest_categorical("arm", list(self.arms)))
        seed = trial.suggest_int("seed", min(self.seeds), max(self.seeds))
        # Two workers starting together may both enqueue a run: the second copy is not trained.
        duplicate = next(
            (
                t.number
                for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                if t.number != trial.number
                and run_of(t) == (arm, seed)
                and (t.state == TrialState.COMPLETE or t.number < trial.number)
            ),
            None,
        )
        if duplicate is not None:
            trial.set_user_attr("duplicate_of", duplicate)
            raise optuna.TrialPruned(f"(arm, seed) already run by trial {duplicate}")
        config = self.arms[arm].with_values({"seed": seed})
        try:
            result = train_student(self.prepared, config)
        except DivergedError as exc:
            trial.set_user_attr("failure", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        trial.set_user_attr("test_accuracy", evaluate(result.model, self.prepared.splits.test, self.prepared.device))
        assert result.val_accuracy is not None
        return result.val_accuracy


def run_of(trial: FrozenTrial) -> tuple[Any, Any]:
    """A confirmation run's (arm, seed): its parameters, or while it waits, the run it was enqueued for.

    Read from our own user attribute, not from Optuna's record of enqueued parameters (internal).
    """
    enqueued = trial.user_attrs.get(ENQUEUED)
    run = trial.params or (enqueued if isinstance(enqueued, dict) else {})
    return run.get("arm"), run.get("seed")


def _enqueue(study: optuna.Study, arms: dict[str, RunConfig], seeds: list[int]) -> None:
    """Every (arm, seed) not yet finished, running or waiting; a run that failed is enqueued again."""
    finished = {
        run_of(t)
        for t in study.get_trials(deepcopy=False)
        if t.state != TrialState.FAIL and t.user_attrs.get(ENQUEUED) and "duplicate_of" not in t.user_attrs
    }
    for arm in arms:
        for seed in seeds:
            if (arm, seed) not in finished:
                run = {"arm": arm, "seed": seed}
                study.enqueue_trial(run, user_attrs={ENQUEUED: run})


def _runs(study: optuna.Study, arms: dict[str, RunConfig], seeds: list[int]) -> dict[str, dict[int, FrozenTrial]]:
    runs: dict[str, dict[int, FrozenTrial]] = {arm: {} for arm in arms}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get(ENQUEUED) and t.params.get("arm") in runs and t.params.get("seed") in seeds:
            runs[t.params["arm"]][t.params["seed"]] = t
    return runs


def run_confirm(
    storage_url: str | None,
    study_name: str,
    *,
    top: int,
    seeds: int,
    against: str = HAND_SET,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Re-train, rank on validation, test the chosen config against the baselines; resumable."""
    study, url = load_existing_study(storage_url, study_name)
    if len(study.directions) != 1:
        raise UserError(f"study {study_name!r} has several objectives; confirm ranks on validation accuracy alone")
    arms = arms_of(study, top, against, storage_url)
    base = next(iter(arms.values()))
    seed_list = [base.recipe.seed + i for i in range(seeds)]
    views = tuple(sorted({config.recipe.augment for config in arms.values()}))
    prepared = prepare(base, augmentations=views, progress=progress, log=log)
    storage = open_storage(url, heartbeat=HEARTBEAT_SECONDS)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    companion = optuna.create_study(
        storage=storage, study_name=companion_name(study_name), direction="maximize", load_if_exists=True
    )
    for key, value in {"confirms": study_name, "method": base.method, "objectives": ["accuracy"]}.items():
        companion.set_user_attr(key, value)
    _enqueue(companion, arms, seed_list)
    work_through(companion, ConfirmObjective(prepared, arms, seed_list))
    summary = summarise(companion, arms, seed_list)
    summary["storage"] = redact(url)
    companion.set_user_attr("summary", summary)
    return summary


def work_through(companion: optuna.Study, objective: ConfirmObjective) -> None:
    """Run waiting runs, then wait for the runs other workers hold, so every worker's summary is whole.

    A run whose worker died stops beating; ``fail_stale_trials`` fails it, the storage's retry
    callback enqueues it again, and this worker runs it.
    """
    while True:
        if companion.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            companion.optimize(objective, n_trials=1)
            continue
        running = companion.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not any(t.user_attrs.get(ENQUEUED) for t in running):
            return
        with warnings.catch_warnings():  # experimental in Optuna, but the one public way to reap dead runs
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(companion)
        time.sleep(POLL_SECONDS)


def summarise(companion: optuna.Study, arms: dict[str, RunConfig], seeds: list[int]) -> dict[str, Any]:
    """Rank candidates on mean validation accuracy; compare the chosen one on test, seed for seed."""
    runs = _runs(companion, arms, seeds)
    complete = {arm: by_seed for arm, by_seed in runs.items() if len(by_seed) == len(seeds)}
    candidates = [arm for arm in complete if arm.startswith("trial-")]
    if not candidates:
        raise UserError(f"no candidate of {companion.study_name!r} finished all {len(seeds)} seeds (diverged?)")
    chosen = max(candidates, key=lambda arm: statistics.fmean(t.value for t in complete[arm].values()))

    def tests(arm: str) -> list[float]:
        return [complete[arm][seed].user_attrs["test_accuracy"] for seed in seeds]

    rows = [
        {
            "arm": arm,
            "chosen": arm == chosen,
            "baseline": not arm.startswith("trial-"),
            "val_mean": statistics.fmean(t.value for t in complete[arm].values()),
            # Test accuracy is looked at for the chosen config and the baselines only.
            "test_runs": tests(arm) if arm == chosen or not arm.startswith("trial-") else None,
            # Every recipe knob a search may set, not only the familiar ones: a winner's label smoothing
            # or weight decay is part of what it found.
            "params": {k: v for k, v in arms[arm].flat().items() if k == "method" or k in RECIPE_SPACE}
            | arms[arm].loss.params,
        }
        for arm in complete
    ]
    comparisons = {
        arm: {"interval": str(interval), "mean": interval.mean, "half_width": interval.half_width}
        for arm in complete
        if not arm.startswith("trial-")
        for interval in [paired_interval(tests(chosen), tests(arm))]
    }
    return {"study": companion.user_attrs.get("confirms"), "seeds": seeds, "chosen": chosen, "rows": rows,
            "chosen_minus": comparisons}  # fmt: skip
