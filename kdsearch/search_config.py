"""How a study runs, declared once: its size, storage, sampler and pruner, workers and objectives.

The other half of the declarations beside ``kdsearch.config`` (what one run is): these fields are
``optimize``'s options and a study's settings; none of them changes what a trial trains, so none
is part of a study's identity.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdsearch.config import MAX_SEED
from kdsearch.errors import ConfigError, shown
from kdsearch.knobs import Section, knob

SAMPLERS = ("tpe", "random", "cmaes", "grid")
PRUNERS = ("asha", "median", "hyperband", "percentile", "none")
# Objectives and their directions: validation accuracy, student parameters, latency (ms per image).
OBJECTIVES = {"accuracy": "maximize", "params": "minimize", "latency": "minimize"}
MAX_STUDY_NAME = 128


def _study_name_problem(name: str) -> str | None:
    """Names become folder names (artifacts) and URL parts (the dashboard): keep them plain."""
    if name in (".", "..") or len(name) > MAX_STUDY_NAME or "/" in name or "\\" in name:
        return f"must be 1-{MAX_STUDY_NAME} characters, no slashes, and not '.' or '..', got {shown(name[:40])}"
    if any(not c.isprintable() for c in name):
        return "must not hold control characters"
    return None


def _objectives_problem(text: str) -> str | None:
    names = [n.strip() for n in text.split(",")]
    if any(n not in OBJECTIVES for n in names) or names[0] != "accuracy" or len(set(names)) != len(names):
        return f"must start with accuracy and may add params and latency (each once), got {shown(text)}"
    return None


@dataclass(frozen=True)
class SearchConfig(Section):
    """How a study runs: its size, its storage, the sampler and pruner, its workers."""

    trials: int | None = knob(
        None,
        "Trials this invocation runs (all {n_jobs} workers together); with {total}, the study's total.",
        kind=int,
        low=1,
    )
    timeout: float | None = knob(
        None, "Stop starting trials after this many seconds.", kind=float, low=0.0, low_open=True
    )
    study_name: str | None = knob(
        None,
        "[default: <method>-<dataset>]; an existing study gets more trials.",
        kind=str,
        check=_study_name_problem,
    )
    storage: str | None = knob(
        None,
        "SQLAlchemy URL [env KDSEARCH_STORAGE; default: sqlite:///studies/kdsearch.db].",
        kind=str,
        envvar="KDSEARCH_STORAGE",
    )
    sampler: str = knob("tpe", "tpe (multivariate, constant liar), random, cmaes or grid.", choices=SAMPLERS)
    sampler_seed: int | None = knob(
        None,
        "Seed of this process's sampler [default: a fresh one per process, so workers never propose the same "
        "trials; give one to make a single-process study repeatable].",
        kind=int,
        low=0,
        high=MAX_SEED,
    )
    pruner: str = knob(
        "asha",
        "asha (successive halving on epochs: rungs at epochs r, 3r, 9r…, a third promoted at each), median, "
        "hyperband, percentile or none.",
        choices=PRUNERS,
    )
    pruner_startup: int = knob(5, "Trials completed before median/percentile pruning starts.", low=0, high=1_000_000)
    pruner_warmup: int | None = knob(
        None,
        "Epochs before a trial can be pruned: asha's first rung r [default: epochs/10, at least 1], "
        "median/percentile's warm-up [default: epochs/4].",
        kind=int,
        low=0,
    )
    space: str | None = knob(
        None,
        "Search-space YAML/JSON (see studies/spaces/); overrides the method's defaults.",
        kind=str,
        path="file",
    )
    fix: tuple[str, ...] = knob((), "Pin a hyperparameter: NAME=VALUE (repeatable).", kind=tuple)
    n_jobs: int = knob(1, "Worker processes on this machine, sharing the study and the CPU threads.", low=1, high=256)
    total: bool = knob(False, "{trials} is the study's total of finished trials (all workers, all hosts).")
    heartbeat: int = knob(
        30, "Seconds between a trial's heartbeats; trials of dead workers are failed and retried.", low=1, high=86_400
    )
    objectives: str = knob(
        "accuracy",
        "accuracy, or a multi-objective search: accuracy,params and/or latency (adds width to the space).",
        check=_objectives_problem,
    )
    baseline: bool = knob(
        True, "Start a new study with the tutorial's hand-set values as trial 0 (not with {sampler} grid)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.trials is None and self.timeout is None:
            raise ConfigError("trials", "or {timeout} SECONDS must be given (or both)")
        if self.total and self.trials is None:
            raise ConfigError("total", "needs {trials} N (the study's total of finished trials)")

    @property
    def objective_names(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in self.objectives.split(","))

    @property
    def multi_objective(self) -> bool:
        return len(self.objective_names) > 1
