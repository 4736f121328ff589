"""`kdsearch report`: one self-contained HTML file (and optionally PNGs) describing a study.

The plots are Optuna's own (``optuna.visualization``, plotly), with plotly's JavaScript inlined
once so the file opens without network access; ``--png DIR`` writes the same plots through
``optuna.visualization.matplotlib``. A plot that needs more trials than the study has is listed
with the reason instead of failing the report.
"""

from __future__ import annotations

import contextlib
import html
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsearch.errors import ConfigError, UserError, about, shown
from kdsearch.export import best_of_each_method, best_trials, confirm_table, confirmation
from kdsearch.fsutil import PlannedFile, refuse_overwriting_inputs, write_together
from kdsearch.paths import data_folder
from kdsearch.storage import load_existing_study, pareto_front, sqlite_path
from kdsearch.strategies import METHODS, get_strategy


def _plot_calls(study: optuna.Study, module: Any) -> dict[str, Callable[[], Any]]:
    """The plots that fit this study, by name, each a thunk over ``module`` (plotly or matplotlib)."""
    names = list(study.metric_names or ["accuracy"])
    if len(study.directions) == 1:
        return {
            "optimization_history": lambda: module.plot_optimization_history(study, target_name=names[0]),
            "intermediate_values": lambda: _intermediate_values(study, module),
            "param_importances": lambda: module.plot_param_importances(study, target_name=names[0]),
            "parallel_coordinate": lambda: module.plot_parallel_coordinate(study, target_name=names[0]),
        }

    def accuracy(t: FrozenTrial) -> float:
        return t.values[0]

    return {
        "pareto_front": lambda: module.plot_pareto_front(study, target_names=names),
        # Optuna's default evaluator (PED-ANOVA) ranks parameters for *low* targets: negate accuracy.
        "param_importances": lambda: module.plot_param_importances(
            study, target=lambda t: -t.values[0], target_name=f"{names[0]} (higher is better)"
        ),
        "parallel_coordinate": lambda: module.plot_parallel_coordinate(study, target=accuracy, target_name=names[0]),
    }


def _intermediate_values(study: optuna.Study, module: Any) -> Any:
    """The per-epoch curves, or ``ValueError`` (a skipped plot, with its reason) when no trial has any.

    A ``-confirm`` study's runs report no epochs; Optuna would draw an empty plot and log a warning
    about pruning, which does not apply to them.
    """
    if not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        raise ValueError("no trial reported a value per epoch")
    return module.plot_intermediate_values(study)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the plots' experimental notices, warnings and log lines (PED-ANOVA's reminder: we negate
    accuracy), and matplotlib's, drawn or saved (``tight_layout`` warns at ``savefig``)."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # Optuna's and matplotlib's notes on small or multi-objective studies (too few trials for
            # a plot, a target needed, margins too small for a long label…) would break the one-line
            # promise; a plot that cannot be drawn is listed with its reason instead.
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def _best_rows(study: optuna.Study, trials: list[FrozenTrial] | None = None) -> list[dict[str, Any]]:
    """The Pareto front of a multi-objective study, else its 10 best trials, ranked as `export` ranks them.

    Parameters are shown at readable precision (3 significant digits); the exported config keeps them whole.
    """
    if trials is None:
        trials = pareto_front(study) if len(study.directions) > 1 else best_trials(study, 10)
    names = list(study.metric_names or ["accuracy"])
    return [
        {
            "trial": t.number,
            **{name: value for name, value in zip(names, t.values, strict=True)},
            "params": {name: _rounded(value) for name, value in t.params.items()},
            "checkpoint": t.user_attrs.get("artifact_id") or "-",
        }
        for t in trials
    ]


def _best_per_method(study: optuna.Study) -> str:
    """A study across methods: each method's best trial, side by side (best methods first)."""
    if "methods" not in study.user_attrs or len(study.directions) > 1:
        return ""
    firsts = best_of_each_method(study)
    shown = _best_rows(study, list(firsts.values()))
    rows = [{"method": method, **row} for method, row in zip(firsts, shown, strict=True)]
    return f"<h2>best trial of each method</h2>{_table(rows)}"


def write_report(storage_url: str | None, study_name: str, output: str, png_dir: str | None = None) -> dict[str, Any]:
    """Write the HTML report (and PNGs); returns which plots were drawn and which were skipped, why."""
    if Path(output).suffix not in (".html", ".htm"):
        raise ConfigError("output", f"{output} must end in .html")
    study, url = load_existing_study(storage_url, study_name)
    inputs = (sqlite_path(url), data_folder(study.user_attrs.get("dataset"), study.user_attrs.get("data_dir")))
    with about("output"):
        refuse_overwriting_inputs({"output": output}, inputs)
    if png_dir is not None:
        folder = Path(png_dir)
        if folder.exists() and not folder.is_dir():
            raise ConfigError("png", f"{png_dir} is a file, not a folder")
        with about("png"):
            refuse_overwriting_inputs({"png": folder / "plot.png"}, inputs, others=(output,))
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise UserError(f"study {shown(study_name)} has no completed trial to report on")
    import optuna.visualization as plotly_plots

    sections: list[str] = []
    drawn: list[str] = []
    skipped: dict[str, str] = {}
    first = True
    for name, draw in _plot_calls(study, plotly_plots).items():
        try:
            with _quiet():
                figure = draw()
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            skipped[name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            continue
        body = figure.to_html(full_html=False, include_plotlyjs=first, config={"displaylogo": False})
        first = False
        sections.append(f"<h2>{html.escape(name.replace('_', ' '))}</h2>\n{body}")
        drawn.append(name)
    for name, reason in skipped.items():
        sections.append(f"<h2>{html.escape(name.replace('_', ' '))}</h2><p>not drawn: {html.escape(reason)}</p>")
    rows = _best_rows(study)
    table = _table(rows) + _best_per_method(study) + _confirmed_section(confirmation(study, url))
    attrs = study.user_attrs
    header = (
        f"<h1>kdsearch study {html.escape(study.study_name)}</h1><p>method {html.escape(_method(attrs))},"
        f" dataset {html.escape(str(attrs.get('dataset')))}, {attrs.get('epochs')} epochs, "
        f"{len(study.trials)} trials</p>"
    )
    document = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>kdsearch: {html.escape(study.study_name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}</style></head><body>"
        f"{header}<h2>best trials</h2>{table}\n" + "\n".join(sections) + "</body></html>\n"
    )
    files: list[PlannedFile] = [("output", output, lambda tmp: tmp.write_text(document))]
    if png_dir is not None:
        files += _png_writers(study, Path(png_dir), skipped)
    write_together(files)
    pngs = [str(path) for _, path, _ in files[1:]]
    return {"report": output, "plots": drawn, "skipped": skipped, "png": pngs, "best_trials": rows}


def _method(attrs: dict[str, Any]) -> str:
    """The method's name and what it does, in words (a study of an unknown method: the name alone)."""
    name = str(attrs.get("method"))
    if isinstance(attrs.get("methods"), list):
        return f"{name} (one study across {', '.join(map(str, attrs['methods']))})"
    return f"{name} ({get_strategy(name).summary})" if name in METHODS else name


def _rounded(value: Any) -> Any:
    """A float at 3 significant digits (an lr of 0.0029925… reads 0.00299); anything else as it is."""
    return float(f"{value:.3g}") if isinstance(value, float) else value


def _confirmed_section(summary: dict[str, Any]) -> str:
    """The table `kdsearch confirm` left (``export.confirm_table``, the one the command prints), in HTML."""
    if not summary:
        return ""
    table, differences = confirm_table(summary)
    rows = [row | {"params": {name: _rounded(value) for name, value in row["params"].items()}} for row in table]
    items = "".join(f"<li>{html.escape(line)}</li>" for line in differences)
    return f"<h2>confirmed over seeds {html.escape(str(summary['seeds']))}</h2>{_table(rows)}<ul>{items}</ul>"


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    columns = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, dict):
            return html.escape(json.dumps(value, default=str))
        return html.escape(str(value))

    body = "".join("<tr>" + "".join(f"<td>{cell(r[c])}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _png_writers(study: optuna.Study, folder: Path, skipped: dict[str, str]) -> list[PlannedFile]:
    """One writer per plot drawn in the HTML: each draws its matplotlib figure into the file it is given.

    They run inside ``write_together`` with the HTML's, so a PNG that cannot be written leaves no
    report half-done (the HTML, the other PNGs, and the files already there stay as they were).
    """
    import matplotlib

    matplotlib.use("Agg")
    import optuna.visualization.matplotlib as mpl_plots

    def writer(draw: Callable[[], Any]) -> Callable[[Path], None]:
        def write(tmp: Path) -> None:
            import matplotlib.pyplot as plt

            with _quiet():
                result = draw()
                figure = (result.flat[0] if hasattr(result, "flat") else result).figure
                try:
                    figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
                finally:
                    plt.close(figure)

        return write

    return [
        ("png", folder / f"{name}.png", writer(draw))
        for name, draw in _plot_calls(study, mpl_plots).items()
        if name not in skipped
    ]
