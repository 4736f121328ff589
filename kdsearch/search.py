"""The Optuna glue: storages, samplers, pruners, the objective, best-student artifacts.

This is the one module (with ``export``) that imports optuna. A trial is: suggest hyperparameters
from the strategy's space, run the shared training loop with ``trial.report`` / ``should_prune`` after
every epoch, and, when the trial beats the study's best so far, upload the student's weights and
config as an Optuna artifact. Studies live in any RDB storage Optuna supports (SQLite by default).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import TrialState

from kdsearch import __version__
from kdsearch.checkpoints import save_checkpoint
from kdsearch.distill import Prepared, RunConfig, prepare, student_metadata, train_student
from kdsearch.errors import UserError
from kdsearch.loop import DivergedError, EpochReport, check_precision, resolve_device
from kdsearch.spaces import (
    CategoricalParam,
    FloatParam,
    IntParam,
    Space,
    is_distribution,
    load_space_file,
    parse_fixes,
    space_to_dict,
)
from kdsearch.strategies import Strategy, get_strategy
from kdsearch.teacher import home_dir

SAMPLERS = ("tpe", "random", "cmaes", "grid")
PRUNERS = ("median", "hyperband", "percentile", "none")
# Seconds between a running trial's heartbeats; a trial silent for twice that (its worker died) is
# marked failed and retried by the next worker that starts a trial.
DEFAULT_HEARTBEAT = 30
# Attempts to open a storage whose tables another worker is creating at the same moment.
TABLE_RACE_RETRIES = 5
# The student's width multiplier, searched when the student's size is an objective.
WIDTH_SPACE = FloatParam(0.25, 2.0, log=True)
# Objectives and their directions: validation accuracy, student parameters, latency (ms per image).
OBJECTIVES = {"accuracy": "maximize", "params": "minimize", "latency": "minimize"}
# Points per float parameter when --sampler grid must discretise a continuous range.
GRID_POINTS = 4


# --- storage ---------------------------------------------------------------------------------


def default_storage_url() -> str:
    """``KDSEARCH_STORAGE`` if set, else a SQLite file under the studies home."""
    return os.environ.get("KDSEARCH_STORAGE") or f"sqlite:///{home_dir() / 'kdsearch.db'}"


def redact(url: str) -> str:
    """The URL with any password masked: what may appear in output, logs and exported files."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown without its credentials part
        return url.split("@")[-1] if "@" in url else url


def check_storage_url(url: str, *, create_parent: bool) -> None:
    """Reject malformed URLs before anything connects or creates a file."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(
            f"malformed storage URL {redact(url)!r}; expected e.g. sqlite:///studies/kdsearch.db "
            "or postgresql+psycopg2://user@host/db"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if not database or database == ":memory:":
            raise UserError("an in-memory SQLite storage would lose the study; give a file, e.g. sqlite:///study.db")
        parent = Path(database).parent
        if not parent.exists():
            if create_parent:
                parent.mkdir(parents=True, exist_ok=True)
            else:
                raise UserError(f"storage directory {parent} does not exist")


def open_storage(url: str, *, heartbeat: int | None = None, create_parent: bool = False) -> optuna.storages.RDBStorage:
    """An RDB storage; SQLite waits for locks instead of failing, and dead workers' trials are retried."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError, SQLAlchemyError

    check_storage_url(url, create_parent=create_parent)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        # Heartbeats are marked experimental in Optuna 5, yet they are its documented way to
        # recover trials of dead workers; the warning would print once per worker.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        heartbeat_kwargs: dict[str, Any] = {}
        if heartbeat is not None:
            heartbeat_kwargs = {
                "heartbeat_interval": heartbeat,
                "grace_period": 2 * heartbeat + 1,
                "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
            }
        for attempt in range(TABLE_RACE_RETRIES + 1):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat_kwargs)
            except (IntegrityError, ProgrammingError, OperationalError) as exc:
                # Workers started together on an empty database race to create Optuna's tables;
                # the losers see "duplicate key" / "already exists" and succeed on a retry.
                racing = any(word in str(exc) for word in ("already exists", "duplicate", "Duplicate"))
                if not racing or attempt == TABLE_RACE_RETRIES:
                    raise UserError(f"cannot open storage {redact(url)}: {_first_line(exc)}") from None
                time.sleep(0.5 * (attempt + 1))
            except (SQLAlchemyError, ImportError, ValueError) as exc:
                raise UserError(f"cannot open storage {redact(url)}: {_first_line(exc)}") from None
    raise AssertionError("unreachable")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class ArtifactDirectory:
    """A file-system artifact store with one folder per study (``<root>/<study>/<artifact id>``).

    Uploads go to the study's folder; reads search every study's folder, so one store can serve
    the dashboard for all studies in a storage. Implements optuna's ``ArtifactStore`` protocol.
    """

    def __init__(self, root: str | os.PathLike[str], study_name: str = "_dashboard") -> None:
        self.root = Path(root)
        self.study_name = study_name

    def _writer(self) -> FileSystemArtifactStore:
        folder = self.root / safe_name(self.study_name)
        folder.mkdir(parents=True, exist_ok=True)
        return FileSystemArtifactStore(str(folder))

    def _find(self, artifact_id: str) -> Path:
        if "/" in artifact_id or artifact_id.startswith("."):
            raise ArtifactNotFound(f"invalid artifact id {artifact_id!r}")
        for path in self.root.glob(f"*/{artifact_id}"):
            if path.is_file():
                return path
        raise ArtifactNotFound(f"artifact {artifact_id} not found under {self.root}")

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return open(self._find(artifact_id), "rb")

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self._writer().write(artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self._find(artifact_id).unlink()


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


def artifact_root() -> Path:
    """``KDSEARCH_ARTIFACTS`` (a directory every worker host mounts, for distributed studies), else
    ``<home>/artifacts``."""
    return Path(os.environ.get("KDSEARCH_ARTIFACTS") or home_dir() / "artifacts")


# --- spaces, samplers, pruners ---------------------------------------------------------------


def build_space(
    strategy: Strategy, space_file: str | None, fixes: tuple[str, ...] | list[str], *, search_width: bool = False
) -> Space:
    """The strategy's default space, overlaid by the user's file, then ``--fix`` pins; all validated.

    With ``search_width`` (a size objective) the student's width multiplier joins the space.
    """
    space: Space = dict(strategy.space)
    extra: Space = {"width": WIDTH_SPACE} if search_width else {}
    layers: list[Space] = []
    if space_file is not None:
        layers.append(load_space_file(space_file, strategy.name))
    layers.append(dict(parse_fixes(fixes)))
    for layer in layers:
        if "width" in layer:
            if not search_width:
                raise UserError("width is searched only with a size objective: --objectives accuracy,params")
            extra["width"] = _checked_width(layer.pop("width"))
        strategy.check_space(layer)
        space.update(layer)
    strategy.hyperparameters({k: v for k, v in space.items() if not is_distribution(v)})
    return {**space, **extra}


def _checked_width(param: Any) -> Any:
    low = param.low if isinstance(param, (FloatParam, IntParam)) else param
    if isinstance(param, CategoricalParam) or isinstance(low, bool) or not isinstance(low, (int, float)) or low <= 0:
        raise UserError("search space: width must be a positive number or a float range above 0")
    return param


def suggest(trial: optuna.Trial, space: Space) -> dict[str, Any]:
    """Sample every distribution of ``space``; constants pass through (and are recorded as attrs)."""
    hp: dict[str, Any] = {}
    for name, param in space.items():
        if isinstance(param, FloatParam):
            hp[name] = trial.suggest_float(name, param.low, param.high, log=param.log)
        elif isinstance(param, IntParam):
            hp[name] = trial.suggest_int(name, param.low, param.high, step=param.step, log=param.log)
        elif isinstance(param, CategoricalParam):
            hp[name] = trial.suggest_categorical(name, list(param.choices))
        else:
            hp[name] = param
    return hp


def _holds(param: Any, value: Any) -> bool:
    if isinstance(param, (FloatParam, IntParam)):
        return not isinstance(value, bool) and isinstance(value, (int, float)) and param.low <= value <= param.high
    if isinstance(param, CategoricalParam):
        return value in param.choices
    return False


def baseline_params(strategy: Strategy, space: Space) -> dict[str, Any]:
    """The tutorial's hand-set values of the searched parameters, where the space can hold them.

    Enqueued as a new study's first trial, they make the hand-set config one of the candidates, so
    the best trial is never worse on validation than the tutorial, and a size search (width 1 is the
    tutorial's LightNN) shows the tutorial's student on its front. Parameters the tutorial does not
    set, or whose value the user's space excludes, are left to the sampler.
    """
    values = {**strategy.hyperparameters(), "width": 1.0}
    return {name: values[name] for name, param in space.items() if name in values and _holds(param, values[name])}


def grid_of(space: Space) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for name, param in space.items():
        if isinstance(param, FloatParam):
            if param.log:
                lo, hi = math.log(param.low), math.log(param.high)
                grid[name] = [math.exp(lo + (hi - lo) * i / (GRID_POINTS - 1)) for i in range(GRID_POINTS)]
            else:
                grid[name] = [param.low + (param.high - param.low) * i / (GRID_POINTS - 1) for i in range(GRID_POINTS)]
        elif isinstance(param, IntParam):
            grid[name] = list(range(param.low, param.high + 1, param.step))
        elif isinstance(param, CategoricalParam):
            grid[name] = list(param.choices)
    return grid


def make_sampler(name: str, seed: int | None, space: Space) -> optuna.samplers.BaseSampler:
    """TPE (multivariate, constant liar for parallel workers), random, CMA-ES or grid."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=10)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(
            seed=seed, warn_independent_sampling=False, independent_sampler=optuna.samplers.TPESampler(seed=seed)
        )
    if name == "grid":
        return optuna.samplers.GridSampler(grid_of(space), seed=seed)
    raise UserError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def make_pruner(name: str, epochs: int, startup: int, warmup: int | None) -> optuna.pruners.BasePruner:
    """Median by default: no pruning in the first ``startup`` trials or before ``warmup`` epochs."""
    warm = max(0, epochs // 4) if warmup is None else warmup
    if startup < 0 or warm < 0:
        raise UserError("--pruner-startup and --pruner-warmup must be 0 or more")
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warm)
    if name == "percentile":
        return optuna.pruners.PercentilePruner(25.0, n_startup_trials=startup, n_warmup_steps=warm)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}")


# --- the objective ---------------------------------------------------------------------------


@dataclass
class Objective:
    """Train one student per trial; report every epoch; keep the best students as artifacts.

    Single-objective: validation accuracy after the last epoch, reported every epoch for pruning.
    Multi-objective: (accuracy, parameters, latency…) with no pruning (Optuna cannot prune
    multi-objective trials on intermediate values), and every trial on the Pareto front so far keeps
    its student.
    """

    prepared: Prepared
    space: Space
    artifacts: ArtifactDirectory
    objectives: tuple[str, ...] = ("accuracy",)

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        config = self.prepared.config
        hp = suggest(trial, self.space)
        width = hp.pop("width", None)
        trial.set_user_attr("seed", config.seed)
        # Pinned values are not trial params; recorded here so export rebuilds this trial exactly even
        # when another run of the same study pinned something else.
        trial.set_user_attr("fixed_params", {k: v for k, v in self.space.items() if not is_distribution(v)})
        accuracies: list[float] = []
        seconds: list[float] = []

        def on_epoch(report: EpochReport) -> None:
            assert report.val_accuracy is not None
            accuracies.append(report.val_accuracy)
            seconds.append(round(report.seconds, 3))
            trial.set_user_attr("epoch_val_accuracy", accuracies)
            trial.set_user_attr("epoch_seconds", seconds)
            if self.multi:
                return
            trial.report(report.val_accuracy, report.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {report.epoch} with {report.val_accuracy:.2f}%")

        try:
            result = train_student(self.prepared, hp, on_epoch=on_epoch, width=width)
        except DivergedError as exc:
            trial.set_user_attr("failure", str(exc))
            if self.multi:
                raise  # Optuna cannot prune multi-objective trials: it ends failed, with the reason
            raise optuna.TrialPruned(str(exc)) from None
        trial.set_user_attr("params", result.params)
        accuracy = result.val_accuracy
        assert accuracy is not None
        values: dict[str, float] = {"accuracy": accuracy, "params": float(result.params)}
        if "latency" in self.objectives:
            values["latency"] = latency_ms(result.model, self.prepared)
            trial.set_user_attr("latency_ms", values["latency"])
        chosen = tuple(values[name] for name in self.objectives)
        if self._is_best_so_far(trial, chosen):
            self._keep_student(trial, result, accuracy)
        return chosen if self.multi else accuracy

    def _is_best_so_far(self, trial: optuna.Trial, values: tuple[float, ...]) -> bool:
        """Better than every finished trial (single objective), or dominated by none (several)."""
        signs = [1.0 if OBJECTIVES[name] == "maximize" else -1.0 for name in self.objectives]
        mine = [s * v for s, v in zip(signs, values, strict=True)]
        for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            theirs = [s * v for s, v in zip(signs, other.values, strict=True)]
            if all(t >= m for t, m in zip(theirs, mine, strict=True)) and (
                not self.multi or any(t > m for t, m in zip(theirs, mine, strict=True))
            ):
                return False
        return True

    def _keep_student(self, trial: optuna.Trial, result: Any, value: float) -> None:
        metadata = student_metadata(self.prepared, result) | {
            "study": trial.study.study_name,
            "trial": trial.number,
            "val_accuracy": value,
        }
        tmp_dir = Path(tempfile.mkdtemp(prefix="kdsearch-"))
        try:
            path = tmp_dir / f"student-trial-{trial.number}.pt"
            save_checkpoint(path, result.model, metadata)
            artifact_id = upload_artifact(
                artifact_store=self.artifacts,
                file_path=str(path),
                study_or_trial=trial,
                mimetype="application/octet-stream",
            )
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        trial.set_user_attr("artifact_id", artifact_id)


def latency_ms(model: Any, prepared: Prepared, repeats: int = 50) -> float:
    """Median milliseconds for one image (batch of 1) on the running device, after a warm-up."""
    import statistics

    import torch

    from kdsearch.loop import predict

    sample = prepared.splits.val.images[:1] if prepared.splits.val is not None else prepared.splits.train.images[:1]
    times = []
    for i in range(repeats + 10):
        if prepared.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        predict(model, sample, prepared.device)
        if prepared.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 10:
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


# --- running a study -------------------------------------------------------------------------

# Study user attributes that must agree when a run adds trials to an existing study.
IDENTITY_KEYS = (
    "objectives",
    "method",
    "dataset",
    "data_fingerprint",
    "epochs",
    "val_size",
    "limit_train",
    "batch_size",
    "teacher_sha256",
    "student_model",
    "width",
    "teacher_layer",
    "student_layer",
    "precision",
)


def study_attributes(prepared: Prepared, space: Space) -> dict[str, Any]:
    """Everything `export` needs to rebuild a run from the study alone."""
    config = prepared.config
    return {
        "method": config.method,
        "dataset": config.dataset,
        "data_dir": str(Path(config.data_dir).resolve()) if config.data_dir else None,
        "data_fingerprint": prepared.splits.fingerprint,
        "epochs": config.epochs,
        "val_size": config.val_size,
        "limit_train": config.limit_train,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "teacher": str(prepared.teacher_path.resolve()) if prepared.teacher_path else None,
        "teacher_sha256": prepared.teacher_checksum,
        "teacher_model": config.teacher_model,
        "student_model": config.student_model,
        "teacher_layer": config.teacher_layer,
        "student_layer": config.student_layer,
        "width": config.width,
        "precision": config.precision,
        "search_space": space_to_dict(space),
        "kdsearch_version": __version__,
    }


def teacher_saw_validation(prepared: Prepared) -> bool:
    """Whether the frozen teacher was trained on (some of) the images this search validates on.

    Then its outputs carry those images' labels, and a student that imitates the teacher closely
    scores high on validation for that reason alone: the search favours strong distillation more
    than the test split bears out. Validation rows are the first ``val_size`` rows of one fixed
    permutation, so a teacher trained with ``--val-size V`` never saw the validation rows of a
    search with ``val_size <= V``; a checkpoint with no record (the tutorial's own) is taken to
    have trained on everything.
    """
    if prepared.teacher is None:
        return False
    held_out = (prepared.teacher_metadata.get("data") or {}).get("val_size") or 0
    return held_out < prepared.config.val_size


def check_objectives(objectives: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    names = tuple(objectives)
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown or not names or names[0] != "accuracy" or len(set(names)) != len(names):
        raise UserError(
            f"--objectives must start with accuracy and may add params and latency (each once), got {','.join(names)}"
        )
    return names


def load_or_create_study(
    storage: optuna.storages.BaseStorage,
    study_name: str,
    attrs: dict[str, Any],
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    objectives: tuple[str, ...] = ("accuracy",),
) -> optuna.Study:
    """Create the study, or add to it when its identity (method, data, teacher, space…) agrees."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        study = None
    if study is not None:
        existing = study.user_attrs
        for key in IDENTITY_KEYS:
            if key in existing and existing[key] != attrs[key]:
                raise UserError(
                    f"study {study_name!r} was created with {key}={existing[key]!r}, not {attrs[key]!r}; "
                    f"use another --study-name"
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


def counts(study: optuna.Study) -> dict[str, int]:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return {
        "complete": states.count(TrialState.COMPLETE),
        "pruned": states.count(TrialState.PRUNED),
        "failed": states.count(TrialState.FAIL),
        "running": states.count(TrialState.RUNNING),
    }


@dataclass
class SearchPlan:
    """What every worker process needs to join the study and run its share of trials."""

    config: RunConfig
    study_name: str
    storage_url: str
    space: Space
    sampler_name: str
    pruner_name: str
    pruner_startup: int
    pruner_warmup: int | None
    heartbeat: int | None
    trials: int | None
    timeout: float | None
    total: bool
    objectives: tuple[str, ...] = ("accuracy",)

    def augmentations(self) -> tuple[str, ...]:
        """The augmentations trials may draw, so the teacher's outputs are cached for their views."""
        param = self.space.get("augment", "none")
        return tuple(map(str, param.choices)) if isinstance(param, CategoricalParam) else (str(param),)

    def objective(self, prepared: Prepared) -> Objective:
        return Objective(prepared, self.space, ArtifactDirectory(artifact_root(), self.study_name), self.objectives)

    def sampler(self, worker: int) -> optuna.samplers.BaseSampler:
        # Each worker gets its own sampler seed: identical seeds would propose identical startup trials.
        return make_sampler(self.sampler_name, self.config.seed + worker, self.space)

    def pruner(self) -> optuna.pruners.BasePruner:
        if len(self.objectives) > 1:
            return optuna.pruners.NopPruner()  # Optuna prunes single-objective studies only
        return make_pruner(self.pruner_name, self.config.epochs, self.pruner_startup, self.pruner_warmup)


def run_search(
    config: RunConfig,
    *,
    study_name: str | None,
    storage_url: str | None,
    trials: int | None,
    timeout: float | None,
    sampler_name: str = "tpe",
    pruner_name: str = "median",
    pruner_startup: int = 5,
    pruner_warmup: int | None = None,
    space_file: str | None = None,
    fixes: tuple[str, ...] | list[str] = (),
    n_jobs: int = 1,
    heartbeat: int | None = DEFAULT_HEARTBEAT,
    total: bool = False,
    objectives: tuple[str, ...] = ("accuracy",),
    baseline: bool = True,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """`kdsearch optimize`: validate everything, then open the study and run its trials.

    ``trials`` is per run (split over ``n_jobs`` worker processes), or with ``total`` the study's
    total of finished (complete or pruned) trials, whoever runs them. With ``baseline``, a new study's
    first trial is the tutorial's hand-set config (`baseline_params`).
    """
    if trials is not None and trials <= 0:
        raise UserError(f"--trials must be positive, got {trials}")
    if trials is None and timeout is None:
        raise UserError("give --trials N or --timeout SECONDS (or both)")
    if total and trials is None:
        raise UserError("--total needs --trials N (the study's total of finished trials)")
    if timeout is not None and timeout <= 0:
        raise UserError(f"--timeout must be positive, got {timeout}")
    if n_jobs <= 0:
        raise UserError(f"--n-jobs must be positive, got {n_jobs}")
    if heartbeat is not None and heartbeat <= 0:
        raise UserError(f"--heartbeat must be positive, got {heartbeat}")
    if config.val_size <= 0:
        raise UserError("a search needs a validation split to choose on: --val-size must be positive")
    config.check()
    check_precision(config.precision, resolve_device(config.device))  # before the storage folder is made
    objectives = check_objectives(objectives)
    strategy = get_strategy(config.method)
    space = build_space(strategy, space_file, fixes, search_width=len(objectives) > 1)
    url = storage_url or default_storage_url()
    plan = SearchPlan(
        config,
        study_name or f"{config.method}-{config.dataset}",
        url,
        space,
        sampler_name,
        pruner_name,
        pruner_startup,
        pruner_warmup,
        heartbeat,
        trials,
        timeout,
        total,
        objectives,
    )
    plan.sampler(0), plan.pruner()  # unknown names and bad pruner settings fail before anything is created
    check_storage_url(url, create_parent=storage_url is None)
    # Data and teacher outputs are prepared (and cached) once here, before any worker starts.
    prepared = prepare(config, augmentations=plan.augmentations(), progress=progress, log=log)
    _check_feature_shapes(prepared, strategy, space)
    storage = open_storage(url, heartbeat=heartbeat, create_parent=storage_url is None)
    # The progress bar replaces per-trial log lines; a failing trial's error reaches the user anyway.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    leaky = teacher_saw_validation(prepared)
    attrs = study_attributes(prepared, space) | {"objectives": list(objectives), "teacher_saw_validation": leaky}
    study = load_or_create_study(storage, plan.study_name, attrs, plan.sampler(0), plan.pruner(), objectives)
    if leaky and log is not None:
        log(
            f"warning: the teacher was trained on this search's {config.val_size} validation images, so "
            f"imitating it inflates validation accuracy; for searches, train one with "
            f"`kdsearch teacher --val-size {config.val_size}` and pass --teacher"
        )
    if baseline and sampler_name != "grid" and not study.get_trials(deepcopy=False):
        # skip_if_exists: two processes starting the same new study enqueue it once.
        study.enqueue_trial(baseline_params(strategy, space), user_attrs={"baseline": "tutorial"}, skip_if_exists=True)
    start = time.perf_counter()
    before = sum(counts(study)[k] for k in ("complete", "pruned"))
    if n_jobs == 1:
        bar = _ProgressBar(_bar_total(plan, before), progress)
        try:
            _optimize(study, plan.objective(prepared), plan, [bar])
        finally:
            bar.close()
    else:
        del prepared  # each worker loads its own copy (from the caches just built)
        _run_workers(plan, n_jobs, study, progress, before)
    return _summary(study, plan, time.perf_counter() - start)


def _bar_total(plan: SearchPlan, finished_before: int) -> int | None:
    if plan.trials is None:
        return None
    return max(plan.trials - finished_before, 0) if plan.total else plan.trials


def _optimize(
    study: optuna.Study, objective: Objective, plan: SearchPlan, callbacks: list[Any], trials: int | None = None
) -> None:
    """Run ``trials`` trials, or with ``plan.total`` until the study holds that many finished trials."""
    if not plan.total:
        study.optimize(objective, n_trials=trials or plan.trials, timeout=plan.timeout, callbacks=callbacks)
        return
    deadline = None if plan.timeout is None else time.monotonic() + plan.timeout
    assert plan.trials is not None
    while deadline is None or time.monotonic() < deadline:
        c = counts(study)
        # Running trials count as claimed, so parallel workers stop together instead of overshooting.
        if c["complete"] + c["pruned"] + c["running"] >= plan.trials:
            break
        study.optimize(objective, n_trials=1, callbacks=callbacks)


def _worker(plan: SearchPlan, worker: int, trials: int | None, threads: int) -> None:
    """One worker process: its own data copy and sampler, the shared study, its share of trials."""
    import torch

    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    prepared = prepare(plan.config, augmentations=plan.augmentations())
    storage = open_storage(plan.storage_url, heartbeat=plan.heartbeat)
    study = optuna.load_study(
        study_name=plan.study_name, storage=storage, sampler=plan.sampler(worker), pruner=plan.pruner()
    )
    if worker > 0:
        _let_worker_0_take_waiting_trials(study)
    _optimize(study, plan.objective(prepared), plan, [], trials)


def _let_worker_0_take_waiting_trials(study: optuna.Study, timeout: float = 120.0) -> None:
    """Hold this worker back until the enqueued baseline trial has been claimed by worker 0.

    SQLite has no row locks, so two workers asking for a trial at the same moment could both try to
    claim the one waiting trial; letting one worker take it first removes the race at the cost of a
    moment's delay at start-up (bounded, so a stuck worker 0 cannot hold the others forever).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        time.sleep(0.2)


def _run_workers(plan: SearchPlan, n_jobs: int, study: optuna.Study, progress: bool, before: int) -> None:
    """``n_jobs`` joblib worker processes on the same study, CPU threads split between them."""
    import threading

    import torch
    from joblib import Parallel, delayed

    threads = max(1, torch.get_num_threads() // n_jobs)
    if plan.trials is None or plan.total:
        shares: list[int | None] = [plan.trials if plan.total else None] * n_jobs
    else:
        shares = [plan.trials // n_jobs + (1 if i < plan.trials % n_jobs else 0) for i in range(n_jobs)]
        shares = [s for s in shares if s]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            Parallel(n_jobs=len(shares), backend="loky")(
                delayed(_worker)(plan, i, share, threads) for i, share in enumerate(shares)
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    bar = _ProgressBar(_bar_total(plan, before), progress)
    seen = before
    try:
        while runner.is_alive():
            runner.join(timeout=2.0)
            seen = bar.poll(study, seen)
    finally:
        bar.close()
    if errors:
        raise errors[0]


def _summary(study: optuna.Study, plan: SearchPlan, seconds: float) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "study_name": plan.study_name,
        "storage": redact(plan.storage_url),
        **counts(study),
        "wall_seconds": round(seconds, 2),
    }
    if len(plan.objectives) > 1:
        front = study.best_trials
        summary |= {
            "objectives": list(plan.objectives),
            "pareto_front": [
                {
                    "trial": t.number,
                    "values": t.values,
                    "params": t.params,
                    "artifact_id": t.user_attrs.get("artifact_id"),
                }
                for t in sorted(front, key=lambda t: t.values[1:])
            ],
            "best_value": None,
            "best_trial": None,
            "best_params": {},
            "best_artifact_id": None,
        }
        return summary
    try:
        best = study.best_trial
        summary |= {
            "best_value": best.value,
            "best_trial": best.number,
            "best_params": best.params,
            "best_artifact_id": best.user_attrs.get("artifact_id"),
        }
    except ValueError:
        summary |= {"best_value": None, "best_trial": None, "best_params": {}, "best_artifact_id": None}
    return summary


def _check_feature_shapes(prepared: Prepared, strategy: Strategy, space: Space) -> None:
    """Build the loss once (first choices, upper bounds: every weight on) so shape mismatches fail early."""
    if not strategy.uses_features:
        return
    from kdsearch.distill import build_student
    from kdsearch.loop import feature_shape

    probe = {
        k: (v.choices[0] if isinstance(v, CategoricalParam) else v.high if is_distribution(v) else v)
        for k, v in space.items()
    }
    hp = strategy.hyperparameters(probe)
    student = build_student(prepared.config, prepared.splits).to(prepared.device)
    student_shape = feature_shape(student, prepared.config.student_layer, prepared.splits.train.images, prepared.device)
    assert prepared.teacher is not None and prepared.teacher.features is not None
    strategy.build_loss(hp, student_shape, tuple(prepared.teacher.features.shape[1:]))


class _ProgressBar:
    """Trials done, best value so far and pruned count, as a study callback."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="trial", dynamic_ncols=True)
        self.pruned = 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.bar is None:
            return
        if trial.state == TrialState.PRUNED:
            self.pruned += 1
        try:
            best = f"{study.best_value:.2f}%"
        except ValueError:
            best = "-"
        self.bar.set_postfix(best=best, pruned=self.pruned)
        self.bar.update(1)

    def poll(self, study: optuna.Study, seen: int) -> int:
        """Multi-process mode: advance by the trials finished since ``seen`` (read from the storage)."""
        c = counts(study)
        finished = c["complete"] + c["pruned"]
        if self.bar is not None and finished > seen:
            self.pruned = c["pruned"]
            try:
                best = f"{study.best_value:.2f}%"
            except ValueError:
                best = "-"
            self.bar.set_postfix(best=best, pruned=self.pruned)
            self.bar.update(finished - seen)
        return max(seen, finished)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
