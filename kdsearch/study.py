"""Running a study: create or join it, then run its trials (``kdsearch.workers``).

A study's identity (method, data, teacher, epochs…: the config's identity knobs) is recorded in
its user attributes when it is created, and a later run joins it only when that identity agrees,
so one study never mixes trials of different set-ups. Workers on one machine are processes that
share the study through the storage; each samples with its own seed. Ctrl-C or SIGTERM reaches
every worker: the running trials close as failed, no new trial starts.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.trial import TrialState

from kdsearch import __version__
from kdsearch.artifacts import ArtifactDirectory
from kdsearch.config import MAX_SEED, RunConfig
from kdsearch.distill import Prepared, check_loss_shapes, prepare
from kdsearch.errors import ConfigError, shown
from kdsearch.objective import Objective
from kdsearch.paths import check_artifact_root
from kdsearch.progress import TrialProgress
from kdsearch.samplers import make_pruner, make_sampler
from kdsearch.search_config import OBJECTIVES, SearchConfig
from kdsearch.spaces import (
    MethodSpaces,
    Space,
    baseline_params,
    build_methods_space,
    build_space,
    methods_baselines,
    parse_assignments,
)
from kdsearch.storage import (
    check_storage_url,
    counts,
    default_storage_url,
    is_kdsearch_study,
    open_storage,
    pareto_front,
    redact,
    refuse_read_only,
)
from kdsearch.strategies import AUTO, METHODS, get_strategy
from kdsearch.workers import run_trials, run_workers


def teacher_saw_validation(prepared: Prepared) -> bool:
    """Whether the frozen teacher was trained on (some of) the images this search validates on.

    Then its outputs carry those images' labels, and a student that imitates the teacher closely
    scores high on validation for that reason alone. Validation rows are the first ``val_size``
    rows of one fixed permutation, so a teacher trained with ``val_size`` V never saw the
    validation rows of a search with ``val_size <= V``; a checkpoint with no record (the
    tutorial's own) is taken to have trained on everything.
    """
    if prepared.teacher is None:
        return False
    held_out = (prepared.teacher_metadata.get("data") or {}).get("val_size") or 0
    return held_out < prepared.config.data.val_size


def identity_keys(config: RunConfig) -> tuple[str, ...]:
    """Study attributes that must agree when a run adds trials to an existing study."""
    return ("objectives", "data_fingerprint", "teacher_sha256", *config.identity())


def study_attributes(
    prepared: Prepared, space: Space, objectives: tuple[str, ...], methods: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Everything `export` needs to rebuild a run from the study alone: the config's knobs and provenance.

    A study across methods records ``method`` as its label (``auto``, ``kd,dkd``) and ``methods``;
    each trial's method is then its ``method`` parameter.
    """
    config = prepared.config
    attrs = config.flat()
    if len(methods) > 1:
        attrs |= {"method": method_label(methods), "methods": list(methods), "hyperparameters": {}}
    attrs["data_dir"] = str(Path(config.data.data_dir).resolve()) if config.data.data_dir else None
    attrs["teacher"] = str(prepared.teacher_path.resolve()) if prepared.teacher_path else None
    return attrs | {
        "data_fingerprint": prepared.splits.fingerprint,
        "teacher_sha256": prepared.teacher_checksum,
        "objectives": list(objectives),
        "search_space": _space_json(space),
        "teacher_saw_validation": teacher_saw_validation(prepared),
        "kdsearch_version": __version__,
    }


def _space_json(space: Space) -> dict[str, Any]:
    """A space as JSON for the study's attributes: Optuna's distribution JSON, arms nested by method."""
    return {
        name: (
            {"arms": {m: _space_json(sub) for m, sub in p.spaces.items()}}
            if isinstance(p, MethodSpaces)
            else distribution_to_json(p)
            if isinstance(p, BaseDistribution)
            else p
        )
        for name, p in space.items()
    }


def changed_choices(recorded: Any, wanted: dict[str, Any]) -> tuple[str, list[Any], list[Any]] | None:
    """A categorical parameter whose choices differ between a study's recorded space and this run's.

    Optuna refuses a categorical whose choices change within a study (the trial would fail), while
    numeric ranges may move; so joining a study with other choices is refused before any trial.
    """
    if not isinstance(recorded, dict):
        return None
    for name, now in wanted.items():
        before = recorded.get(name)
        if isinstance(now, dict) and isinstance(before, dict) and "arms" in now and "arms" in before:
            for method, space in now["arms"].items():
                found = changed_choices(before["arms"].get(method), space)
                if found is not None:
                    return found
            continue
        old_choices, new_choices = _choices(before), _choices(now)
        if old_choices is not None and new_choices is not None and old_choices != new_choices:
            return name, old_choices, new_choices
    return None


def _choices(distribution: Any) -> list[Any] | None:
    if isinstance(distribution, str) and "CategoricalDistribution" in distribution:
        return list(json.loads(distribution)["attributes"]["choices"])
    return None


def method_label(methods: tuple[str, ...]) -> str:
    """How a study across methods is named and listed: ``auto`` for every method, else the list."""
    return AUTO if set(methods) == set(METHODS) else ",".join(methods)


def load_or_create_study(
    storage: optuna.storages.BaseStorage,
    study_name: str,
    attrs: dict[str, Any],
    keys: tuple[str, ...],
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
) -> optuna.Study:
    """Create the study, or add to it when its identity (method, data, teacher, epochs…) agrees."""
    objectives = attrs["objectives"]
    try:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        study = None
    if study is not None:
        if not is_kdsearch_study(study):
            raise ConfigError("study_name", f"{shown(study_name)} names a study that was not created by kdsearch")
        if "confirms" in study.user_attrs:
            raise ConfigError(
                "study_name",
                f"{shown(study_name)} holds the confirmation runs of {shown(study.user_attrs['confirms'])}",
            )
        existing = study.user_attrs
        changed = changed_choices(existing.get("search_space"), attrs["search_space"])
        if changed is not None:
            name, before, now = changed
            raise ConfigError(
                "study_name",
                f"{shown(study_name)} searched {name} over {shown(before)}, not {shown(now)}: Optuna keeps one set of "
                "choices per study; choose another",
            )
        for key in keys:
            if key in existing and existing[key] != attrs[key]:
                raise ConfigError(
                    "study_name",
                    f"{shown(study_name)} names a study created with {key}={shown(existing[key])}, not "
                    f"{shown(attrs[key])}; choose another",
                )
        return study
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        directions=[OBJECTIVES[name] for name in objectives],
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(objectives))  # named axes in the dashboard and reports
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    return study


@dataclass
class SearchPlan:
    """What every worker process needs to join the study and run its share of trials."""

    config: RunConfig
    search: SearchConfig
    study_name: str
    storage_url: str
    space: Space
    sampler_seed: int
    methods: tuple[str, ...] = ()  # a study across methods: its arms (the space's ``method``)

    @property
    def across_methods(self) -> bool:
        return len(self.methods) > 1

    def augmentations(self) -> tuple[str, ...]:
        """The augmentations trials may draw, so the teacher's outputs are cached for their views."""
        param = self.space.get("augment", self.config.recipe.augment)
        return tuple(map(str, getattr(param, "choices", (param,))))

    def objective(self, prepared: Prepared) -> Objective:
        return Objective(
            prepared, self.space, ArtifactDirectory(study_name=self.study_name), self.search.objective_names
        )

    def sampler(self, worker: int) -> optuna.samplers.BaseSampler:
        # Each worker gets its own sampler seed: identical seeds would propose identical trials.
        seed = (self.sampler_seed + worker) % (MAX_SEED + 1)
        return make_sampler(self.search.sampler, seed, self.space, self.search.trials)

    def pruner(self) -> optuna.pruners.BasePruner:
        return make_pruner(self.search, self.config.recipe.epochs)


def plan_search(config: RunConfig, search: SearchConfig, methods: tuple[str, ...] = ()) -> SearchPlan:
    """Validate everything that can be checked without data: the space, the sampler's grid, the storage URL.

    ``methods`` (two or more) makes it one study across those methods, ``config.method`` among them.
    """
    if config.data.val_size <= 0:
        raise ConfigError("val_size", "must be positive: a search needs a validation split to choose on")
    fixes = parse_assignments(search.fix, "fix")
    if len(methods) > 1:
        if "method" in fixes:
            raise ConfigError("fix", "cannot pin method in a study across methods; pass that one method as {method}")
        strategies = [get_strategy(m) for m in methods]
        label = method_label(methods)
        space = build_methods_space(strategies, label, search.space, fixes, search_width=search.multi_objective)
    else:
        label, methods = config.method, ()
        space = build_space(get_strategy(config.method), search.space, fixes, search_width=search.multi_objective)
    url = search.storage or default_storage_url()
    # Without --sampler-seed each process draws its own, so two `optimize` processes on one study
    # (another host, or a second terminal) never propose the same trials.
    seed = search.sampler_seed if search.sampler_seed is not None else random.SystemRandom().randrange(MAX_SEED)
    name = search.study_name or f"{label}-{config.data.dataset}"
    plan = SearchPlan(config, search, name, url, space, seed, methods)
    plan.sampler(0)  # a grid too large to enumerate fails here, before anything is created
    if search.storage is not None:
        check_storage_url(url, create_parent=False)
    refuse_read_only(url)
    return plan


def run_search(
    config: RunConfig,
    search: SearchConfig,
    *,
    methods: tuple[str, ...] = (),
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """`kdsearch optimize`: validate everything, then open the study and run its trials.

    ``search.trials`` is per run (split over ``n_jobs`` worker processes), or with ``total`` the
    study's total of finished (complete or pruned) trials, whoever runs them. With ``baseline``, a
    new study's first trial is the tutorial's hand-set config (``spaces.baseline_params``).
    """
    plan = plan_search(config, search, methods)
    check_artifact_root()
    storage_url_given = search.storage is not None
    # Data and teacher outputs are prepared (and cached) once here, before any worker starts.
    prepared = prepare(config, augmentations=plan.augmentations(), methods=plan.methods, progress=progress, log=log)
    for method in plan.methods or (config.method,):
        check_loss_shapes(prepared, method)
    storage = open_storage(plan.storage_url, heartbeat=search.heartbeat, create_parent=not storage_url_given)
    # The progress bar replaces per-trial log lines; a failing trial's error reaches the user anyway.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    attrs = study_attributes(prepared, plan.space, search.objective_names, plan.methods)
    study = load_or_create_study(storage, plan.study_name, attrs, identity_keys(config), plan.sampler(0), plan.pruner())
    if attrs["teacher_saw_validation"] and log is not None:
        # Fields are mentioned as {name}: the command line's log says them as its flags.
        log(
            f"warning: the teacher was trained on this search's {config.data.val_size} validation images, so "
            "imitating it inflates validation accuracy; for searches, train one with "
            f"`kdsearch teacher {{val_size}} {config.data.val_size}` and pass it as {{teacher}}"
        )
    if search.baseline and search.sampler != "grid" and not study.get_trials(deepcopy=False):
        # skip_if_exists: two processes starting the same new study enqueue it once. Across methods,
        # every method's hand-set config: ce's is the study's own control.
        if plan.across_methods:
            baselines = methods_baselines(plan.space)
        else:
            baselines = [baseline_params(get_strategy(config.method), plan.space)]
        for baseline in baselines:
            study.enqueue_trial(baseline, user_attrs={"baseline": "tutorial"}, skip_if_exists=True)
    start = time.perf_counter()
    before = sum(counts(study)[k] for k in ("complete", "pruned"))
    bar = TrialProgress(_bar_total(search, before), progress, study, before)
    try:
        if search.n_jobs == 1:
            run_trials(study, plan.objective(prepared), search, [bar.callback], search.trials)
        else:
            del prepared  # each worker loads its own copy (from the caches just built)
            run_workers(plan, study, bar)
    finally:
        bar.close()
    return summarise(study, plan, time.perf_counter() - start)


def _bar_total(search: SearchConfig, finished_before: int) -> int | None:
    if search.trials is None:
        return None
    return max(search.trials - finished_before, 0) if search.total else search.trials


def summarise(study: optuna.Study, plan: SearchPlan, seconds: float) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "study_name": plan.study_name,
        "storage": redact(plan.storage_url),
        **counts(study),
        "wall_seconds": round(seconds, 2),
        "best_value": None,
        "best_trial": None,
        "best_params": {},
        "best_artifact_id": None,
    }
    if plan.search.multi_objective:
        front = pareto_front(study)
        summary["objectives"] = list(plan.search.objective_names)
        summary["pareto_front"] = [
            {"trial": t.number, "values": t.values, "params": t.params, "artifact_id": t.user_attrs.get("artifact_id")}
            for t in front
        ]
        return summary
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        best = study.best_trial
        summary |= {
            "best_value": best.value,
            "best_trial": best.number,
            "best_params": best.params,
            "best_artifact_id": best.user_attrs.get("artifact_id"),
        }
    return summary
