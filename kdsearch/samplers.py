"""The sampler and the pruner of a study, by name: what `--sampler` and `--pruner` make.

TPE is multivariate with constant liar (parallel workers see each other's running trials), and
models a study across methods with ``group=True``; ASHA is the default pruner (README "Choosing the
sampler and pruner" has the benchmark that chose it).
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from kdsearch.errors import ConfigError
from kdsearch.search_config import SearchConfig
from kdsearch.spaces import METHOD, Space, grid_of, is_conditional

# Across methods, this share of a study's trials is spread evenly over the methods before TPE picks
# the method: TPE alone settles on one method after a handful of trials (measured: one method took 39
# of 60 trials, another 26 of 60, whichever happened to lead its first completed trials).
EVEN_SHARE = 0.5


def make_sampler(name: str, seed: int | None, space: Space, trials: int | None = None) -> optuna.samplers.BaseSampler:
    """TPE (multivariate, constant liar for parallel workers), random, CMA-ES or grid.

    Across methods TPE models each method's parameters as their own group (``group=True``), the way
    Optuna's TPE handles a define-by-run space, and the method itself is drawn by ``EvenMethods``
    until every method has had its share of the study's ``trials``; CMA-ES and grid need one fixed
    space and refuse it.
    """
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    conditional = is_conditional(space)
    if conditional and name == "cmaes":
        raise ConfigError("sampler", "cmaes samples one fixed space; a study across methods needs tpe or random")
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(
            seed=seed, warn_independent_sampling=False, independent_sampler=optuna.samplers.TPESampler(seed=seed)
        )
    if name == "grid":
        return optuna.samplers.GridSampler(grid_of(space), seed=seed)
    if not conditional:
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # `group` is experimental
        tpe = optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True, n_startup_trials=10
        )
    arms = space[METHOD]
    return EvenMethods(tpe, arms.methods, even_floor(trials, len(arms.methods)))


def even_floor(trials: int | None, methods: int) -> int:
    """Trials each method gets before TPE chooses: ``EVEN_SHARE`` of the study's, spread evenly (2 at least)."""
    return max(2, int(EVEN_SHARE * (trials or 0)) // methods)


class EvenMethods(optuna.samplers.BaseSampler):
    """TPE for everything but the method, which goes to the least-tried method until each has ``floor`` trials.

    A wrapper in the manner of Optuna's ``PartialFixedSampler``: the method leaves TPE's relative
    search space and is drawn here; once every method has ``floor`` trials (finished, running or
    failed), TPE draws it too. Counting running trials keeps parallel workers from piling onto one
    method.
    """

    def __init__(self, base: optuna.samplers.BaseSampler, methods: tuple[str, ...], floor: int) -> None:
        self.base, self.methods, self.floor = base, methods, floor
        self._drawn: dict[int, str | None] = {}  # trial number -> its method drawn here (None: TPE's to draw)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        space = self.base.infer_relative_search_space(study, trial)
        self._drawn = {trial.number: self._least_tried(study, trial)}  # one scan of the trials per trial
        return {name: d for name, d in space.items() if name != METHOD or self._drawn[trial.number] is None}

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self.base.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        if param_name == METHOD:
            drawn = self._drawn
            least = drawn[trial.number] if trial.number in drawn else self._least_tried(study, trial)
            if least is not None:
                return least
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: list[float] | None
    ) -> None:
        self.base.after_trial(study, trial, state, values)

    def _least_tried(self, study: optuna.Study, trial: FrozenTrial) -> str | None:
        """The method with the fewest trials (the first listed on a tie), while it has fewer than ``floor``."""
        tried = Counter(
            t.params.get(METHOD) for t in study.get_trials(deepcopy=False) if t.number != trial.number and t.params
        )
        least = min(self.methods, key=lambda m: tried[m])
        return least if tried[least] < self.floor else None


def make_pruner(search: SearchConfig, epochs: int) -> optuna.pruners.BasePruner:
    """ASHA by default (README "Choosing the sampler and pruner"); none for several objectives.

    ASHA's rungs sit at epochs r, 3r, 9r… (r = epochs/10, at least 1: 1, 3 and 9 of a 10-epoch run,
    1 and 3 of a 5-epoch one); at each, a trial goes on only when it is in the best third of the
    trials that reached it. An epoch's accuracy already ranks the trials well enough for the first
    cut (README "The flagship study's cost": the replayed curves keep the winner at rung 1). Median and
    percentile prune nothing in the first trials or before their warm-up epochs.
    """
    if search.multi_objective or search.pruner == "none":
        return optuna.pruners.NopPruner()  # Optuna prunes single-objective studies only
    if search.pruner == "asha":
        first_rung = max(1, epochs // 10) if search.pruner_warmup is None else max(1, search.pruner_warmup)
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_rung, reduction_factor=3)
    warm = max(0, epochs // 4) if search.pruner_warmup is None else search.pruner_warmup
    if search.pruner == "percentile":
        return optuna.pruners.PercentilePruner(25.0, n_startup_trials=search.pruner_startup, n_warmup_steps=warm)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    return optuna.pruners.MedianPruner(n_startup_trials=search.pruner_startup, n_warmup_steps=warm)
