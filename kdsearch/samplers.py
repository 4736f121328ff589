"""The sampler and the pruner of a study, by name: what `--sampler` and `--pruner` make.

TPE is multivariate with constant liar (parallel workers see each other's running trials), and
models a study across methods with ``group=True``; ASHA is the default pruner (README "Choosing the
sampler and pruner" has the benchmark that chose it).
"""

from __future__ import annotations

import warnings

import optuna

from kdsearch.errors import ConfigError
from kdsearch.search_config import SearchConfig
from kdsearch.spaces import Space, grid_of, is_conditional


def make_sampler(name: str, seed: int | None, space: Space) -> optuna.samplers.BaseSampler:
    """TPE (multivariate, constant liar for parallel workers), random, CMA-ES or grid.

    Across methods TPE models each method's parameters as their own group (``group=True``), the way
    Optuna's TPE handles a define-by-run space; CMA-ES and grid need one fixed space and refuse it.
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
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True, n_startup_trials=10
        )


def make_pruner(search: SearchConfig, epochs: int) -> optuna.pruners.BasePruner:
    """ASHA by default (README "Choosing the sampler and pruner"); none for several objectives.

    ASHA's rungs sit at epochs r, 3r, 9r… (r = epochs/5: 2 and 6 of a 10-epoch run); at each, a
    trial goes on only when it is in the best third of the trials that reached it. Median and
    percentile prune nothing in the first trials or before their warm-up epochs.
    """
    if search.multi_objective or search.pruner == "none":
        return optuna.pruners.NopPruner()  # Optuna prunes single-objective studies only
    if search.pruner == "asha":
        first_rung = max(1, epochs // 5) if search.pruner_warmup is None else max(1, search.pruner_warmup)
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_rung, reduction_factor=3)
    warm = max(0, epochs // 4) if search.pruner_warmup is None else search.pruner_warmup
    if search.pruner == "percentile":
        return optuna.pruners.PercentilePruner(25.0, n_startup_trials=search.pruner_startup, n_warmup_steps=warm)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    return optuna.pruners.MedianPruner(n_startup_trials=search.pruner_startup, n_warmup_steps=warm)
