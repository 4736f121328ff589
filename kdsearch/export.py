"""Reading studies back out: the ``studies`` listing and ``export`` of best configs and students.

An exported config is a ``RunConfig`` (what `kdsearch train --config` reads) rebuilt from the
study's user attributes and the trial's values alone, plus a ``source`` block saying where it
came from. It re-trains on the whole train split (``val_size: 0``) and reports test accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsearch import __version__
from kdsearch.artifacts import ARTIFACT_ID, ARTIFACT_SHA256, fetch_artifact
from kdsearch.config import KNOBS, RunConfig
from kdsearch.errors import ConfigError, UserError, about, shown
from kdsearch.fsutil import PlannedFile, refuse_overwriting_inputs, write_together
from kdsearch.paths import data_folder
from kdsearch.storage import (
    check_storage_url,
    counts,
    is_kdsearch_study,
    load_existing_study,
    open_existing_storage,
    pareto_front,
    redact,
)
from kdsearch.structured import dump_yaml, read_structured_file

EXPORT_SUFFIXES = (".yaml", ".yml", ".json")


def list_studies(storage_url: str | None) -> tuple[list[dict[str, Any]], str]:
    """One row per study (name, method, dataset, trial counts by state, best value), and the storage's URL.

    Listing never writes: a storage that does not exist, or holds no Optuna tables, lists nothing.
    """
    storage, url = open_existing_storage(storage_url)
    if storage is None:
        return [], url
    rows = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        attrs = study.user_attrs
        row: dict[str, Any] = {
            "name": summary.study_name,
            "method": attrs.get("method") if is_kdsearch_study(study) else "(not kdsearch)",
            "dataset": attrs.get("dataset"),
            **counts(study),
            "best_value": None,
        }
        if len(study.directions) == 1 and study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            row["best_value"] = study.best_value
        rows.append(row)
    return rows, url


def format_rows(rows: list[dict[str, Any]], fmt: str, empty: str = "no studies") -> str:
    """``table`` (aligned columns, or ``empty`` for no rows), ``json`` or ``yaml``, as Optuna's own CLI offers."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "yaml":
        return dump_yaml(rows).rstrip()
    if not rows:
        return empty
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


def trial_run_config(study: optuna.Study, trial: FrozenTrial) -> RunConfig:
    """The run a trial was: the study's knobs with the trial's pinned and searched values, its seed.

    Pinned values are the trial's ``pinned`` attribute (``fixed_params`` in studies of older versions).
    In a study across methods the trial's ``method`` parameter says which method it ran.
    """
    attrs = study.user_attrs
    base = {key: attrs[key] for key in ("method", *KNOBS) if key in attrs}
    if "method" in trial.params:  # a study across methods: the trial's own method
        base["method"] = trial.params["method"]
    config = RunConfig.from_flat(base, origin=f"of study {shown(study.study_name)}")
    pinned = trial.user_attrs.get("pinned", trial.user_attrs.get("fixed_params", {}))
    config = config.with_values({**pinned, **trial.params})
    return config.with_values({"seed": trial.user_attrs.get("seed", config.recipe.seed)})


def trial_config(
    study: optuna.Study, trial: FrozenTrial, url: str, confirmed: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A `train --config` document for ``trial``: re-trains on the whole train split."""
    config = trial_run_config(study, trial)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, val_size=0))
    attrs = study.user_attrs
    return config.to_dict() | {
        "source": {
            "study": study.study_name,
            "storage": redact(url),
            "trial": trial.number,
            "val_accuracy": trial.values[0],
            "objectives": dict(zip(attrs.get("objectives", ["accuracy"]), trial.values, strict=True)),
            "artifact_id": trial.user_attrs.get("artifact_id"),
            "teacher_sha256": attrs.get("teacher_sha256"),
            "search_val_size": attrs.get("val_size"),
            "confirmed": (
                {"seeds": confirmed["seeds"], "chosen_minus": confirmed["chosen_minus"]}
                if confirmed and confirmed.get("chosen") == f"trial-{trial.number}"
                else None
            ),
        },
        "kdsearch_version": __version__,
    }


def load_config(path: str | Path, rank: int = 1) -> RunConfig:
    """A YAML or JSON run config, such as `kdsearch export` writes.

    A file from ``export --top K`` holds ``configs: [...]`` best first; ``rank`` picks one.
    """
    return load_config_and_source(path, rank)[0]


def load_config_and_source(path: str | Path, rank: int = 1) -> tuple[RunConfig, dict[str, Any]]:
    """``load_config``, and the config's ``source`` block (where an export came from; {} when absent)."""
    data = read_structured_file(path, "config file")
    if "configs" in data:
        configs = data["configs"]
        if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
            raise UserError(f"config file {path}: 'configs' must be a list of run configs")
        if not 1 <= rank <= len(configs):
            raise ConfigError("rank", f"{rank} is out of range: config file {path} holds {len(configs)} configs")
        data = configs[rank - 1]
    elif rank != 1:
        raise ConfigError("rank", f"{rank} is out of range: config file {path} holds one config")
    source = data.get("source")
    return RunConfig.from_dict(data, origin=str(path)), dict(source) if isinstance(source, dict) else {}


def best_trials(study: optuna.Study, top: int) -> list[FrozenTrial]:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    if not complete:
        raise UserError(f"study {shown(study.study_name)} has no completed trial to export")
    return sorted(complete, key=lambda t: (-t.values[0], t.number))[:top]


def best_of_each_method(study: optuna.Study) -> dict[str, FrozenTrial]:
    """A study across methods: each method's best completed trial, ranked as ``best_trials`` ranks them."""
    firsts: dict[str, FrozenTrial] = {}
    for trial in best_trials(study, len(study.trials)):
        firsts.setdefault(str(trial.params.get("method")), trial)
    return firsts


def confirmation(study: optuna.Study, url: str) -> dict[str, Any]:
    """The summary `kdsearch confirm` left for this study ({} when it was never confirmed)."""
    storage, _ = open_existing_storage(url)
    try:
        companion = optuna.load_study(study_name=f"{study.study_name}-confirm", storage=storage)
    except KeyError:
        return {}
    return dict(companion.user_attrs.get("summary") or {})


def confirm_table(summary: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The table of a `kdsearch confirm` summary, as the command prints it and the report shows it.

    One row per config over the same seeds (chosen and baseline marked; test accuracy only for
    those), then the chosen config's paired test differences to each baseline.
    """
    seeds = len(summary["seeds"])
    rows = [
        {
            "config": row["arm"]
            + (" (chosen)" if row["chosen"] else " (baseline)" if row["baseline"] else "")
            + (f" (raced out after {_seeds(row['seeds_run'])})" if row.get("seeds_run", seeds) < seeds else ""),
            "validation % (mean)": row["val_mean"],
            "test % (mean)": statistics.fmean(row["test_runs"]) if row["test_runs"] else None,
            "params": row["params"],
        }
        for row in summary["rows"]
    ]
    differences = [
        f"{summary['chosen']} − {arm}: {c['interval']} test points (paired by seed, mean ± 95 % CI)"
        for arm, c in summary["chosen_minus"].items()
    ]
    return rows, differences


def _seeds(count: int) -> str:
    return f"{count} seed" + ("s" if count != 1 else "")


def confirmed_first(
    study: optuna.Study, ranked: list[FrozenTrial], summary: dict[str, Any], top: int
) -> list[FrozenTrial]:
    """The best trials, led by the winner of `kdsearch confirm` when the study has been confirmed.

    One seed's best validation score is a noisy pick; the config that won on the mean over seeds is
    the one to re-train.
    """
    chosen = str(summary.get("chosen", ""))
    if not chosen.startswith("trial-"):
        return ranked
    winner = study.trials[int(chosen.removeprefix("trial-"))]
    return [winner, *[t for t in ranked if t.number != winner.number]][:top]


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
    a folder receiving ``trial-<n>.pt`` for each. Every path is checked before anything is written:
    no output may be the storage, another output, or lie in the study's data folder. The config and
    the checkpoints are written together (``fsutil.write_together``): all of them, or none and the
    files already there untouched.
    """
    if output is not None and Path(output).suffix not in EXPORT_SUFFIXES:
        raise ConfigError("output", f"{output} must end in .yaml, .yml or .json")
    if pareto and checkpoint is not None and Path(checkpoint).exists() and not Path(checkpoint).is_dir():
        raise ConfigError("checkpoint", f"{checkpoint} must be a folder with {{pareto}}")
    study, url = load_existing_study(storage_url, study_name)
    if "confirms" in study.user_attrs:
        confirms = shown(study.user_attrs["confirms"])
        raise UserError(
            f"study {shown(study_name)} holds the confirmation runs of {confirms}; export that study (its confirmed "
            "winner comes first)"
        )
    attrs = study.user_attrs
    inputs = (check_storage_url(url, create_parent=False), data_folder(attrs.get("dataset"), attrs.get("data_dir")))
    summary: dict[str, Any] = {}
    if pareto:
        trials = pareto_front(study)
        if not trials:
            raise UserError(f"study {shown(study_name)} has no completed trial to export")
    else:
        summary = confirmation(study, url)
        trials = confirmed_first(study, best_trials(study, top), summary, top)
    chosen = (trials if pareto else trials[:1]) if checkpoint is not None else []
    targets = [Path(str(checkpoint)) / f"trial-{t.number}.pt" if pareto else Path(str(checkpoint)) for t in chosen]
    with about("output"):
        refuse_overwriting_inputs({"output": output}, inputs, others=targets)
    for target in targets:
        with about("checkpoint"):
            refuse_overwriting_inputs({"checkpoint": target}, inputs, others=(output,))
    missing = [t.number for t in chosen if t.user_attrs.get("artifact_id") is None]
    if missing:
        raise UserError(f"trials {missing} of {shown(study_name)} kept no checkpoint artifact")
    configs = [trial_config(study, t, url, summary) for t in trials]
    document: dict[str, Any] = configs[0] if top == 1 and not pareto else {"configs": configs}
    as_json = output is not None and output.endswith(".json")
    text = json.dumps(document, indent=2) if as_json else dump_yaml(document)
    files: list[PlannedFile] = [
        ("checkpoint", target, _artifact_writer(trial.user_attrs[ARTIFACT_ID], trial.user_attrs.get(ARTIFACT_SHA256)))
        for trial, target in zip(chosen, targets, strict=True)
    ]
    if output is not None:
        files.append(("output", output, lambda tmp: tmp.write_text(text)))
    write_together(files)
    return text


def _artifact_writer(artifact_id: str, sha256: str | None) -> Callable[[Path], None]:
    """Write an artifact's checked bytes to a temporary file (``write_together`` renames it into place)."""

    def fetch(tmp: Path) -> None:
        tmp.unlink()  # optuna refuses to overwrite a file
        fetch_artifact(artifact_id, tmp, sha256)

    return fetch
