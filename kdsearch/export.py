"""Reading studies back out: the ``studies`` listing, ``export`` of best configs, the dashboard.

An exported config is a ``RunConfig`` (what `kdsearch train --config` reads) built from the study's
user attributes and the trial's parameters alone, plus a ``source`` block saying where it came
from. It re-trains on the whole train split (``val_size: 0``) and reports test accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.artifacts import download_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState

from kdsearch import __version__
from kdsearch.errors import UserError
from kdsearch.fsutil import atomic_write
from kdsearch.search import (
    ArtifactDirectory,
    artifact_root,
    check_storage_url,
    counts,
    default_storage_url,
    open_storage,
    redact,
)

FORMATS = ("table", "json", "yaml")


def _sqlite_file(url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        check_storage_url(url, create_parent=False)
        raise
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        return Path(parsed.database)
    check_storage_url(url, create_parent=False)
    return None


def _storage(url: str | None) -> tuple[optuna.storages.BaseStorage | None, str]:
    """Open a storage for reading; a SQLite file that does not exist yet is not created (None)."""
    url = url or default_storage_url()
    sqlite_file = _sqlite_file(url)
    if sqlite_file is not None and not sqlite_file.exists():
        return None, url
    return open_storage(url), url


def list_studies(storage_url: str | None) -> list[dict[str, Any]]:
    """One row per study: name, method, dataset, trial counts by state, best value."""
    storage, _ = _storage(storage_url)
    if storage is None:
        return []
    rows = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        attrs = study.user_attrs
        row: dict[str, Any] = {
            "name": summary.study_name,
            "method": attrs.get("method"),
            "dataset": attrs.get("dataset"),
            **counts(study),
        }
        try:
            row["best_value"] = study.best_value if len(study.directions) == 1 else None
        except ValueError:
            row["best_value"] = None
        rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]], fmt: str) -> str:
    """``table`` (aligned columns), ``json`` or ``yaml``, as Optuna's own CLI offers."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "yaml":
        return yaml.safe_dump(rows, sort_keys=False).rstrip()
    if not rows:
        return "no studies"
    columns = list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def load_existing_study(storage_url: str | None, study_name: str) -> tuple[optuna.Study, str]:
    storage, url = _storage(storage_url)
    if storage is None:
        raise UserError(f"no study named {study_name!r} in {redact(url)}: the storage file does not exist yet")
    try:
        return optuna.load_study(study_name=study_name, storage=storage), url
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        raise UserError(
            f"no study named {study_name!r} in {redact(url)}; studies there: {', '.join(names) or 'none'}"
        ) from None


def trial_config(study: optuna.Study, trial: FrozenTrial, url: str) -> dict[str, Any]:
    """A `train --config` file for ``trial``: the study's settings, the trial's hyperparameters."""
    attrs = study.user_attrs
    if "method" not in attrs:
        raise UserError(f"study {study.study_name!r} was not created by kdsearch (no method recorded)")
    hyperparameters = dict(trial.user_attrs.get("fixed_params", {}))  # pinned by that trial's run
    hyperparameters.update(trial.params)
    return {
        "method": attrs["method"],
        "dataset": attrs["dataset"],
        "data_dir": attrs.get("data_dir"),
        "val_size": 0,
        "limit_train": attrs.get("limit_train"),
        "epochs": attrs["epochs"],
        "batch_size": attrs.get("batch_size", 128),
        "seed": trial.user_attrs.get("seed", attrs.get("seed", 42)),
        "teacher": attrs.get("teacher"),
        "teacher_model": attrs.get("teacher_model"),
        "student_model": attrs.get("student_model", "lightnn"),
        "teacher_layer": attrs.get("teacher_layer", "features"),
        "student_layer": attrs.get("student_layer", "features"),
        "width": hyperparameters.get("width", attrs.get("width", 1.0)),  # searched or pinned, else the study's
        "precision": attrs.get("precision", "fp32"),
        "hyperparameters": {k: v for k, v in hyperparameters.items() if k != "width"},
        "source": {
            "study": study.study_name,
            "storage": redact(url),
            "trial": trial.number,
            "val_accuracy": trial.values[0],
            "objectives": dict(zip(attrs.get("objectives", ["accuracy"]), trial.values, strict=True)),
            "artifact_id": trial.user_attrs.get("artifact_id"),
            "teacher_sha256": attrs.get("teacher_sha256"),
            "search_val_size": attrs.get("val_size"),
        },
        "kdsearch_version": __version__,
    }


def best_trials(study: optuna.Study, top: int) -> list[FrozenTrial]:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    if not complete:
        raise UserError(f"study {study.study_name!r} has no completed trial to export")
    return sorted(complete, key=lambda t: (-t.values[0], t.number))[:top]


def export_study(
    storage_url: str | None,
    study_name: str,
    *,
    output: str | None,
    checkpoint: str | None,
    top: int,
    pareto: bool = False,
) -> str:
    """Write (or return, without ``output``) the best trials' configs; optionally fetch checkpoints.

    ``pareto`` exports every Pareto-optimal trial of a multi-objective study; then ``checkpoint`` is
    a directory receiving ``trial-<n>.pt`` for each.
    """
    if top <= 0:
        raise UserError(f"--top must be positive, got {top}")
    if output is not None and Path(output).suffix not in (".yaml", ".yml", ".json"):
        raise UserError(f"-o {output}: the file must end in .yaml, .yml or .json")
    if pareto and checkpoint is not None and Path(checkpoint).exists() and not Path(checkpoint).is_dir():
        raise UserError(f"--checkpoint {checkpoint} must be a directory with --pareto")
    study, url = load_existing_study(storage_url, study_name)
    if pareto:
        trials = sorted(study.best_trials, key=lambda t: t.values[1:]) if study.get_trials(deepcopy=False) else []
        if not trials:
            raise UserError(f"study {study_name!r} has no completed trial to export")
    else:
        trials = best_trials(study, top)
    configs = [trial_config(study, t, url) for t in trials]
    document: dict[str, Any] = configs[0] if top == 1 and not pareto else {"configs": configs}
    as_json = output is not None and output.endswith(".json")
    text = json.dumps(document, indent=2) if as_json else yaml.safe_dump(document, sort_keys=False)
    if checkpoint is not None:
        chosen = trials if pareto else trials[:1]
        missing = [t.number for t in chosen if t.user_attrs.get("artifact_id") is None]
        if missing:
            raise UserError(f"trials {missing} of {study_name!r} kept no checkpoint artifact")
        for trial in chosen:
            target = Path(checkpoint) / f"trial-{trial.number}.pt" if pareto else Path(checkpoint)
            fetch_artifact(trial.user_attrs["artifact_id"], target)
    if output is not None:
        atomic_write(output, lambda tmp: tmp.write_text(text))
    return text


def fetch_artifact(artifact_id: str, target: Path) -> None:
    """Download an artifact atomically to ``target``."""
    store = ArtifactDirectory(artifact_root())

    def fetch(tmp: Path) -> None:
        tmp.unlink()  # optuna refuses to overwrite; atomic_write still renames into place
        download_artifact(artifact_store=store, file_path=str(tmp), artifact_id=artifact_id)

    try:
        atomic_write(target, fetch)
    except ArtifactNotFound:
        raise UserError(f"checkpoint artifact {artifact_id} is missing from {artifact_root()}") from None


def dashboard_app(storage_url: str | None) -> Any:
    """optuna-dashboard's WSGI app on the study storage, with kdsearch's artifact store."""
    import optuna_dashboard

    storage, url = _storage(storage_url)
    if storage is None:
        raise UserError(f"no studies in {redact(url)} yet: run `kdsearch optimize` first")
    return optuna_dashboard.wsgi(storage, artifact_store=ArtifactDirectory(artifact_root()))
