"""`kdsearch confirm`: re-train a study's best configs with several seeds before believing the winner.

A search picks its best trial on one seed, while seeds move a 10-epoch run by points. Confirmation
re-trains the K best configs with N seeds each on the search's own split, ranks them by mean
validation accuracy, and only then looks at the test split — for the chosen config and, seed for
seed, for the baselines it is compared with: the hand-set config and/or a control (the best config
of another study, a CE search say). Each difference is reported as the mean of the paired per-seed
differences with a 95 % confidence interval (Student's t).

Seeds are raced (``race``, the default): successive halving over seeds spends them where they
decide something. With n candidates, each first gets ``seeds / 2^k`` seeds (k = ⌈log₂ n⌉), the better
half by mean validation accuracy goes on to twice as many, and so on until one candidate has all
``seeds``; the baselines always get every seed, so the chosen config's paired test intervals are the
same as without racing. A run the storage already holds is not trained again: a search trial that
is exactly an arm's run with the first seed (same config and seed, all epochs, its student kept as an
artifact) becomes that run, its student tested from the artifact.

A study across methods is confirmed on the best config of each of its ``top`` best methods (ce
aside), against its own best ce trial (``control-ce``) and, with ``against``, another study's.

The runs are trials of a companion study ``<study>-confirm`` in the same storage, enqueued with
their arm and seed (the seed a parameter, the arm a user attribute, so later confirms may race other
arms): an interrupted confirm resumes where it stopped (finished runs are not redone), several
processes or hosts can share the work, and the dashboard shows it.
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import IntDistribution
from optuna.trial import FrozenTrial, TrialState

from kdsearch.artifacts import ARTIFACT_ID, ARTIFACT_SHA256, fetch_artifact
from kdsearch.checkpoints import load_checkpoint, load_weights
from kdsearch.config import MAX_SEED, RECIPE_SPACE, RunConfig
from kdsearch.distill import Prepared, build_student, prepare, train_student
from kdsearch.errors import ConfigError, DivergedError, UserError, shown
from kdsearch.export import best_of_each_method, best_trials, confirmation, confirmed_first, trial_run_config
from kdsearch.knobs import default_of
from kdsearch.loop import evaluate
from kdsearch.racing import paired_interval, race_rungs, survivors_of
from kdsearch.search_config import SearchConfig
from kdsearch.settings import HAND_SET
from kdsearch.storage import load_existing_study, open_storage, redact, refuse_read_only
from kdsearch.strategies import get_strategy

# The arm of a study across methods that is its own control: its best ce trial.
OWN_CONTROL = "control-ce"

# Seconds between a confirmation run's heartbeats, a search's default: a run whose worker died goes
# stale after two missed beats and is failed and enqueued again, so waiting workers never wait forever.
HEARTBEAT_SECONDS: int = default_of(SearchConfig, "heartbeat")
# The user attribute that marks a run kdsearch enqueued, holding its {"arm", "seed"} (older versions: True).
ENQUEUED = "enqueued"
# How often a worker with nothing left to run looks whether the others' runs have finished.
POLL_SECONDS = 2.0


def companion_name(study_name: str) -> str:
    return f"{study_name}-confirm"


@dataclass
class Arms:
    """The configs to re-train: candidates (one is chosen), baselines (compared with it), and the
    search trials that already are an arm's run with the study's seed."""

    configs: dict[str, RunConfig]
    candidates: list[str]
    sources: dict[str, FrozenTrial] = field(default_factory=dict)

    @property
    def baselines(self) -> list[str]:
        return [arm for arm in self.configs if arm not in self.candidates]


def arms_of(study: optuna.Study, top: int, against: str, storage_url: str | None) -> Arms:
    """The configs to re-train: the K best trials (across methods: each of the K best methods' best),
    and the baselines they are compared with."""
    across = "methods" in study.user_attrs
    firsts = best_of_each_method(study) if across else {}
    best = _distillers(study, firsts, top) if across else best_trials(study, top)
    configs = {f"trial-{t.number}": trial_run_config(study, t) for t in best}
    sources = {f"trial-{t.number}": t for t in best}
    candidates = list(configs)
    base = next(iter(configs.values()))
    if across:
        if "ce" in firsts:
            configs[OWN_CONTROL], sources[OWN_CONTROL] = trial_run_config(study, firsts["ce"]), firsts["ce"]
    else:
        attrs = {key: value for key, value in study.user_attrs.items() if key in ("method", *base.flat())}
        configs[HAND_SET] = RunConfig.from_flat(
            attrs | {"hyperparameters": {}}, origin=f"of study {shown(study.study_name)}"
        )
        hand_set = [t for t in study.trials if t.user_attrs.get("baseline") and t.state == TrialState.COMPLETE]
        if hand_set:
            sources[HAND_SET] = hand_set[0]
    if against != HAND_SET:
        configs[f"control-{against}"] = _control(study, against, storage_url, base, across)
    return Arms(configs, candidates, sources)


def _distillers(study: optuna.Study, firsts: dict[str, FrozenTrial], top: int) -> list[FrozenTrial]:
    """The best trial of each method but ce (``firsts``: each method's best), best methods first, ``top`` of them."""
    ranked = [t for method, t in firsts.items() if method != "ce"]
    if not ranked:
        raise UserError(f"study {shown(study.study_name)} has no completed trial of a distillation method to confirm")
    return ranked[:top]


def _control(study: optuna.Study, against: str, storage_url: str | None, base: RunConfig, across: bool) -> RunConfig:
    control_study, control_url = load_existing_study(storage_url, against)
    if control_study.user_attrs.get("data_fingerprint") != study.user_attrs.get("data_fingerprint") or (
        control_study.user_attrs.get("val_size") != study.user_attrs.get("val_size")
    ):
        raise ConfigError("against", f"{shown(against)} names a study of other data or another validation split")
    # The control's own confirmed winner when it has been confirmed (a pick over seeds, as this
    # study's is), else its best trial.
    (best,) = confirmed_first(control_study, best_trials(control_study, 1), confirmation(control_study, control_url), 1)
    control = trial_run_config(control_study, best)
    if get_strategy(control.method).uses_teacher and (across or control.method != base.method):
        raise ConfigError(
            "against",
            f"{shown(against)} names a {control.method} study: a control needs no teacher (ce) or shares the method",
        )
    return control


@dataclass
class ConfirmObjective:
    """Runs one enqueued (arm, seed) of the companion study; trials nobody enqueued are turned away."""

    prepared: Prepared
    arms: dict[str, RunConfig]
    seeds: list[int]

    def __call__(self, trial: optuna.Trial) -> float:
        enqueued = trial.user_attrs.get(ENQUEUED)
        if not isinstance(enqueued, dict) or enqueued.get("arm") not in self.arms:
            raise optuna.TrialPruned("nothing left to confirm")  # another worker took the last run
        arm = str(enqueued["arm"])
        seed = trial.suggest_int("seed", 0, MAX_SEED)
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
    """A confirmation run's (arm, seed), from our own user attribute (older versions: its parameters).

    Never from Optuna's record of enqueued parameters (internal).
    """
    enqueued = trial.user_attrs.get(ENQUEUED)
    run = enqueued if isinstance(enqueued, dict) else trial.params
    return run.get("arm", trial.params.get("arm")), trial.params.get("seed", run.get("seed"))


def _enqueue(study: optuna.Study, wanted: list[tuple[str, int]]) -> None:
    """Every wanted (arm, seed) not yet finished, running or waiting; a run that failed is enqueued again."""
    finished = {
        run_of(t)
        for t in study.get_trials(deepcopy=False)
        if t.state != TrialState.FAIL and t.user_attrs.get(ENQUEUED) and "duplicate_of" not in t.user_attrs
    }
    for arm, seed in wanted:
        if (arm, seed) not in finished:
            study.enqueue_trial({"seed": seed}, user_attrs={ENQUEUED: {"arm": arm, "seed": seed}})


def _runs(study: optuna.Study, arms: dict[str, RunConfig], seeds: list[int]) -> dict[str, dict[int, FrozenTrial]]:
    runs: dict[str, dict[int, FrozenTrial]] = {arm: {} for arm in arms}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        arm, seed = run_of(t)
        if t.user_attrs.get(ENQUEUED) and arm in runs and seed in seeds:
            runs[arm][seed] = t
    return runs


def reuse_search_runs(companion: optuna.Study, arms: Arms, prepared: Prepared, seed: int) -> list[str]:
    """Record, as the run (arm, ``seed``), each search trial that is exactly that run; returns those arms.

    A trial qualifies when it trained every epoch with ``seed`` and kept its student (an artifact):
    its validation accuracy is the run's, its student is tested here. Nothing is trained.
    """
    have = {run_of(t) for t in companion.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE}
    reused = []
    for arm, trial in arms.sources.items():
        config = arms.configs[arm].with_values({"seed": seed})
        artifact = trial.user_attrs.get(ARTIFACT_ID)
        if (arm, seed) in have or artifact is None or trial.user_attrs.get("seed") != seed or trial.value is None:
            continue
        if len(trial.intermediate_values) != config.recipe.epochs:
            continue
        test = _tested_artifact(prepared, config, str(artifact), trial.user_attrs.get(ARTIFACT_SHA256))
        if test is None:
            continue
        companion.add_trial(
            optuna.trial.create_trial(
                params={"seed": seed},
                distributions={"seed": IntDistribution(0, MAX_SEED)},
                value=trial.value,
                user_attrs={ENQUEUED: {"arm": arm, "seed": seed}, "test_accuracy": test, "reused_trial": trial.number},
            )
        )
        reused.append(arm)
    return reused


def _same_run(recorded: Any, wanted: dict[str, Any]) -> bool:
    """Whether a checkpoint's recorded config is this run's. The teacher and the data are compared by the
    study's identity (their checksums), not by path: a search given no teacher records none and its
    study the file, and a relative data folder is recorded as given, the study's resolved."""
    if not isinstance(recorded, dict) or not all(isinstance(recorded.get(s), dict) for s in ("models", "data")):
        return False

    def without_paths(config: dict[str, Any]) -> dict[str, Any]:
        return config | {
            "models": {k: v for k, v in config["models"].items() if k != "teacher"},
            "data": {k: v for k, v in config["data"].items() if k != "data_dir"},
        }

    return without_paths(recorded) == without_paths(wanted)


def _tested_artifact(prepared: Prepared, config: RunConfig, artifact_id: str, sha256: str | None) -> float | None:
    """Test accuracy of a kept student (None when its artifact is gone, damaged or not this config's student:
    the run is then trained instead)."""
    folder = Path(tempfile.mkdtemp(prefix="kdsearch-"))
    try:
        path = folder / "student.pt"
        try:
            fetch_artifact(artifact_id, path, sha256)
            loaded = load_checkpoint(path)
        except (UserError, OSError):
            return None
        if not _same_run(loaded.metadata.get("config"), config.to_dict()):
            return None
        student = build_student(config, prepared.splits)
        load_weights(student, loaded, source=artifact_id, model_name=config.models.student_model)
        return evaluate(student.to(prepared.device), prepared.splits.test, prepared.device)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_confirm(
    storage_url: str | None,
    study_name: str,
    *,
    top: int,
    seeds: int,
    against: str = HAND_SET,
    race: bool = True,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Re-train (raced over seeds), rank on validation, test the chosen config against the baselines; resumable."""
    study, url = load_existing_study(storage_url, study_name)
    refuse_read_only(url)
    if len(study.directions) != 1:
        raise UserError(f"study {shown(study_name)} has several objectives; confirm ranks on validation accuracy alone")
    if "confirms" in study.user_attrs:
        raise UserError(
            f"study {shown(study_name)} holds confirmation runs; confirm {shown(study.user_attrs['confirms'])}"
        )
    arms = arms_of(study, top, against, storage_url)
    base = arms.configs[arms.candidates[0]]
    if base.recipe.seed + seeds - 1 > MAX_SEED:
        raise ConfigError("seeds", f"{seeds} seeds from the study's seed {base.recipe.seed} go past {MAX_SEED}")
    seed_list = [base.recipe.seed + i for i in range(seeds)]
    views = tuple(sorted({config.recipe.augment for config in arms.configs.values()}))
    methods = tuple(dict.fromkeys(config.method for config in arms.configs.values()))
    prepared = prepare(base, augmentations=views, methods=methods, progress=progress, log=log)
    storage = open_storage(url, heartbeat=HEARTBEAT_SECONDS)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    companion = optuna.create_study(
        storage=storage, study_name=companion_name(study_name), direction="maximize", load_if_exists=True
    )
    label = study.user_attrs.get("method", base.method)
    for key, value in {"confirms": study_name, "method": label, "objectives": ["accuracy"]}.items():
        companion.set_user_attr(key, value)
    objective = ConfirmObjective(prepared, arms.configs, seed_list)
    rungs = race_rungs(len(arms.candidates), seeds) if race else [seeds]
    if race:
        reuse_search_runs(companion, arms, prepared, seed_list[0])
    survivors = list(arms.candidates)
    dropped: dict[str, int] = {}
    for i, rung in enumerate(rungs):
        wanted = [(arm, s) for arm in arms.baselines for s in seed_list]
        _enqueue(companion, wanted + [(arm, s) for arm in survivors for s in seed_list[:rung]])
        work_through(companion, objective)
        if i == len(rungs) - 1:
            break
        means = _means(companion, arms.configs, seed_list[:rung], survivors)
        kept = survivors_of(means, max(1, math.ceil(len(survivors) / 2)))
        dropped |= {arm: rung for arm in survivors if arm not in kept}
        survivors = kept
    summary = summarise(companion, arms.configs, seed_list, arms.baselines)
    summary |= {"storage": redact(url), "race": {"rungs": rungs, "dropped_after_seeds": dropped} if race else None}
    companion.set_user_attr("summary", summary)
    return summary


def _means(companion: optuna.Study, arms: dict[str, RunConfig], seeds: list[int], among: list[str]) -> dict[str, float]:
    """Mean validation accuracy of each arm over ``seeds``; an arm missing a run (diverged) ranks last."""
    runs = _runs(companion, arms, seeds)
    return {
        arm: statistics.fmean(t.value for t in runs[arm].values()) if len(runs[arm]) == len(seeds) else -math.inf
        for arm in among
    }


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


def summarise(
    companion: optuna.Study, arms: dict[str, RunConfig], seeds: list[int], baselines: list[str] | None = None
) -> dict[str, Any]:
    """Rank candidates on mean validation accuracy; compare the chosen one on test, seed for seed.

    Only candidates with every seed can be chosen; a candidate raced out early is listed with the
    seeds it ran. Baselines are paired with the chosen config on all seeds.
    """
    baselines = [arm for arm in arms if not arm.startswith("trial-")] if baselines is None else baselines
    runs = _runs(companion, arms, seeds)
    complete = {arm for arm, by_seed in runs.items() if len(by_seed) == len(seeds)}
    candidates = [arm for arm in arms if arm in complete and arm not in baselines]
    if not candidates:
        raise UserError(f"no candidate of {shown(companion.study_name)} finished all {len(seeds)} seeds (diverged?)")

    def val_mean(arm: str) -> float:
        return statistics.fmean(t.value for t in runs[arm].values())

    chosen = max(candidates, key=val_mean)

    def tests(arm: str) -> list[float]:
        return [runs[arm][seed].user_attrs["test_accuracy"] for seed in seeds]

    listed = [arm for arm in arms if runs[arm] and (arm not in baselines or arm in complete)]
    rows = [
        {
            "arm": arm,
            "chosen": arm == chosen,
            "baseline": arm in baselines,
            "val_mean": val_mean(arm),
            "seeds_run": len(runs[arm]),
            # Test accuracy is looked at for the chosen config and the baselines only.
            "test_runs": tests(arm) if arm == chosen or arm in baselines else None,
            # Every recipe knob a search may set, not only the familiar ones: a winner's label smoothing
            # or weight decay is part of what it found.
            "params": {k: v for k, v in arms[arm].flat().items() if k == "method" or k in RECIPE_SPACE}
            | arms[arm].loss.params,
        }
        for arm in listed
    ]
    comparisons = {
        arm: {"interval": str(interval), "mean": interval.mean, "half_width": interval.half_width}
        for arm in baselines
        if arm in complete
        for interval in [paired_interval(tests(chosen), tests(arm))]
    }
    return {"study": companion.user_attrs.get("confirms"), "seeds": seeds, "chosen": chosen, "rows": rows,
            "chosen_minus": comparisons}  # fmt: skip
