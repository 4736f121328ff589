"""The ``kdsearch`` command line: each command builds a config and calls one function below it.

The options are derived from the config's declarations (``kdsearch.config``): a knob declared
there is an option here, with its help, its default and its range, and a wrong value is reported
under the option's name. Every user mistake ends as one line on stderr and exit code 2 (``main``
turns ``UserError`` and click's usage errors into that); anything else is a bug and keeps its
traceback. Nothing here imports torch until a command runs, so ``--help`` is quick.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import statistics
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from kdsearch.config import (
    DEFAULT_TEACHER_PRESET,
    DEVICE_KNOB,
    KNOBS,
    RECIPE_SPACE,
    TEACHER_PRESETS,
    DataConfig,
    ModelsConfig,
    RecipeConfig,
    RunConfig,
    SearchConfig,
    flag,
)
from kdsearch.errors import ConfigError, RunFailedError, Terminated, UserError, raise_terminated
from kdsearch.knobs import Knob, knobs_of
from kdsearch.strategies import METHODS

EXIT_USAGE = 2
EXIT_RUN_FAILED = 1  # valid input, a run that could not finish (a diverged loss)
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def echo_error(message: str) -> None:
    one_line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    click.echo(f"kdsearch: error: {one_line}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the click group with errors flattened to one line and exit 2.

    SIGINT exits 130 and SIGTERM 143, after the running trials have been closed in the storage.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        cli.main(args=argv, prog_name="kdsearch", standalone_mode=False)
    except UserError as exc:
        echo_error(str(exc))
        sys.exit(EXIT_USAGE)
    except click.UsageError as exc:
        echo_error(exc.format_message())
        sys.exit(EXIT_USAGE)
    except RunFailedError as exc:
        echo_error(str(exc))
        sys.exit(EXIT_RUN_FAILED)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        echo_error(exc.format_message())
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt) as exc:
        # click wraps Ctrl-C (and our SIGTERM, raised as a KeyboardInterrupt) in Abort.
        if isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated):
            click.echo("kdsearch: terminated", err=True)
            sys.exit(143)
        click.echo("kdsearch: interrupted", err=True)
        sys.exit(130)


def log(message: str) -> None:
    click.echo(f"kdsearch: {message}", err=True)


def emit(result: dict[str, Any], as_json: bool, lines: Callable[[dict[str, Any]], list[str]]) -> None:
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
    else:
        for line in lines(result):
            click.echo(line)


# --- options derived from the config ------------------------------------------------------------


def knob_option(name: str, rule: Knob, default: Any) -> Decorator:
    """The click option of one knob: its flag, type, range, default and help from the declaration."""
    kwargs: dict[str, Any] = {"default": default, "help": rule.help, "envvar": rule.envvar}
    if rule.kind is bool:
        names = [f"{flag(name)}/--no-{name.replace('_', '-')}"] if default else [flag(name)]
        return click.option(*names, name, is_flag=True, **kwargs)
    if rule.kind is tuple:
        return click.option(flag(name), name, multiple=True, metavar="NAME=VALUE", **kwargs)
    kwargs["show_default"] = default is not None
    if rule.choices is not None:
        kwargs["type"] = click.Choice([str(c) for c in rule.choices])
    elif rule.path is not None:
        kwargs["type"] = click.Path(dir_okay=rule.path == "dir", file_okay=rule.path == "file")
    elif rule.kind is int:
        kwargs["type"] = click.IntRange(rule.low, rule.high)
    elif rule.kind is float:
        kwargs["type"] = click.FloatRange(rule.low, rule.high, min_open=rule.low_open)
    return click.option(flag(name), name, **kwargs)


def options(*sections: type, defaults: dict[str, Any] | None = None) -> Decorator:
    """One option per knob of ``sections``, in declaration order (``defaults`` overrides a few)."""
    overrides = defaults or {}

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for section in reversed(sections):
            defaults_of = {f.name: f.default for f in dataclasses.fields(section)}
            for name, rule in reversed(list(knobs_of(section))):
                fn = knob_option(name, rule, overrides.get(name, defaults_of[name]))(fn)
        return fn

    return decorate


device_option = knob_option("device", DEVICE_KNOB, "auto")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
method_option = click.option("--method", type=click.Choice(METHODS), default="kd", show_default=True)
storage_option = knob_option("storage", dict(knobs_of(SearchConfig))["storage"], None)


def build(section: type, values: dict[str, Any]) -> Any:
    """A config section from option values, a wrong value named by its option."""
    try:
        return section(**{name: values[name] for name, _ in knobs_of(section) if name in values})
    except ConfigError as exc:
        raise UserError(f"{flag(exc.name)} {exc.problem}") from None


def run_config(flat: dict[str, Any]) -> RunConfig:
    """A run config from option values by knob name, ``method``, ``device`` and ``hyperparameters``."""
    try:
        return RunConfig.from_flat(flat, origin="from the command line")
    except ConfigError as exc:
        option = "--hp" if exc.name not in (*KNOBS, "method", "device") else flag(exc.name)
        raise UserError(f"{option} {exc.problem}") from None


def given_on_command_line(ctx: click.Context, names: list[str]) -> list[str]:
    sources = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return [name for name in names if ctx.get_parameter_source(name) in sources]


# --- commands -------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kdsearch")
def cli() -> None:
    """Hyperparameter search for knowledge distillation, on Optuna."""


@cli.command()
@options(DataConfig, defaults={"val_size": 0})
@click.option("--model", default="deepnn", show_default=True, help="deepnn or package.module:Class.")
@click.option(
    "--preset",
    type=click.Choice(TEACHER_PRESETS),
    default=DEFAULT_TEACHER_PRESET,
    show_default=True,
    help="A measured recipe: strong (the search's default teacher; see the README) or tutorial (10 epochs of "
    "Adam 1e-3, for reproduction); recipe options given here override it.",
)
@options(RecipeConfig)
@device_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Checkpoint path [default: studies/teachers/<model>-<dataset>-<data id>[-<recipe id>][-val<N>].pt, the "
    "teacher that runs with the same --val-size use by default].",
)
@json_option
@quiet_option
@click.pass_context
def teacher(
    ctx: click.Context, model: str, preset: str, device: str, out: str | None, as_json: bool, quiet: bool, **values: Any
) -> None:
    """Train a teacher (by default the strong preset, the one a search trains when given none) and save it."""
    from kdsearch.teacher import TeacherConfig, run_teacher

    try:
        DEVICE_KNOB.validate("device", device)
    except ConfigError as exc:
        raise UserError(f"--device {exc.problem}") from None
    recipe_names = [name for name, _ in knobs_of(RecipeConfig)]
    given = {name: values[name] for name in given_on_command_line(ctx, recipe_names)}
    recipe = build(RecipeConfig, TEACHER_PRESETS[preset] | given)
    config = TeacherConfig(build(DataConfig, values), model, recipe, device)
    result = run_teacher(config, out, progress=not quiet and not as_json)
    emit(
        result,
        as_json,
        lambda r: [
            f"teacher {r['model']} on {r['dataset']}: test accuracy {r['test_accuracy']:.2f}%"
            + (f", validation {r['val_accuracy']:.2f}%" if r["val_accuracy"] is not None else ""),
            f"{r['params']:,} parameters, {sum(r['epoch_seconds']):.0f} s, saved to {r['checkpoint']}",
        ],
    )


@cli.command()
@method_option
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML/JSON run config (as `kdsearch export` writes); options given here override it.",
)
@click.option(
    "--rank", type=click.IntRange(1), default=1, show_default=True, help="Which config of an `export --top K` file."
)
@options(DataConfig, ModelsConfig, RecipeConfig)
@device_option
@click.option(
    "--hp",
    "hp_items",
    multiple=True,
    metavar="NAME=VALUE",
    help="A method hyperparameter or recipe knob (repeatable), e.g. --hp temperature=4; unset ones take the "
    "tutorial's values.",
)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Save the trained student here.")
@json_option
@quiet_option
@click.pass_context
def train(
    ctx: click.Context,
    config_path: str | None,
    rank: int,
    hp_items: tuple[str, ...],
    out: str | None,
    as_json: bool,
    quiet: bool,
    **values: Any,
) -> None:
    """Run one distillation with given hyperparameters and report test accuracy."""
    from kdsearch.distill import run_training
    from kdsearch.export import load_config
    from kdsearch.fsutil import refuse_overwriting_inputs
    from kdsearch.spaces import parse_assignments

    refuse_overwriting_inputs({"--out": out}, (config_path,))
    hp = parse_assignments(hp_items, "--hp")
    if config_path is None:
        flat = values | {"hyperparameters": hp}
    else:
        base = load_config(config_path, rank)
        given = {name: values[name] for name in given_on_command_line(ctx, list(values))}
        # Another --method than the file's starts from that method's tutorial values, not the file's.
        kept = dict(base.loss.params) if given.get("method", base.method) == base.method else {}
        flat = base.flat() | {"device": base.device} | given | {"hyperparameters": kept | hp}
    config = run_config(flat)
    out_path = Path(out) if out else None
    result = run_training(config, out=out_path, progress=not quiet and not as_json, log=log)
    emit(
        result,
        as_json,
        lambda r: (
            [
                f"{r['method']} on {r['dataset']}: test accuracy {r['test_accuracy']:.2f}%"
                + (f", validation {r['val_accuracy']:.2f}%" if r["val_accuracy"] is not None else ""),
                f"{r['params']:,} student parameters, {sum(r['epoch_seconds']):.1f} s training, "
                f"{r['teacher_outputs_seconds']:.1f} s teacher outputs",
                "recipe: " + ", ".join(f"{k}={v}" for k, v in r["config"]["recipe"].items()),
                "method: " + ", ".join(f"{k}={v}" for k, v in sorted(r["config"]["loss"]["params"].items())),
            ]
            + ([f"saved to {r['checkpoint']}"] if r.get("checkpoint") else [])
        ),
    )


@cli.command()
@click.option("--checkpoint", type=click.Path(dir_okay=False), required=True)
@click.option(
    "--model",
    default=None,
    help="deepnn, lightnn or package.module:Class [default: a built-in name the checkpoint records].",
)
@click.option(
    "--width",
    type=click.FloatRange(0, 16, min_open=True),
    default=None,
    help="Width multiplier [default: from the checkpoint, else 1].",
)
@options(DataConfig)
@device_option
@json_option
def evaluate(
    checkpoint: str, model: str | None, width: float | None, device: str, as_json: bool, **values: Any
) -> None:
    """Report a checkpoint's test (and validation) accuracy."""
    from kdsearch.distill import run_evaluation

    result = run_evaluation(checkpoint, model, width, build(DataConfig, values), device)
    emit(
        result,
        as_json,
        lambda r: [
            f"{r['model']} from {r['checkpoint']} on {r['dataset']}: test accuracy {r['test_accuracy']:.2f}%"
            + (f", validation {r['val_accuracy']:.2f}%" if r["val_accuracy"] is not None else ""),
            f"{r['params']:,} parameters",
        ],
    )


@cli.command()
@click.option("--method", type=click.Choice(METHODS), required=True)
@options(SearchConfig)
@options(DataConfig, ModelsConfig, RecipeConfig)
@device_option
@json_option
@quiet_option
@click.pass_context
def optimize(ctx: click.Context, as_json: bool, quiet: bool, **values: Any) -> None:
    """Search a method's hyperparameters with Optuna; the best student is kept as an artifact.

    --trials N runs N trials in this invocation (split over --n-jobs workers); with --total, workers
    on any number of hosts pointed at one --storage stop when the study holds N finished trials.
    A recipe knob the methods search (--lr, --optimizer, --augment…) given here is pinned, as with --fix.
    """
    from kdsearch.study import run_search

    pinned = [name for name in given_on_command_line(ctx, list(RECIPE_SPACE)) if name in values]
    search_values = {name: values.pop(name) for name, _ in knobs_of(SearchConfig)}
    search_values["fix"] = (*search_values["fix"], *(f"{name}={values[name]}" for name in pinned))
    search = build(SearchConfig, search_values)
    config = run_config(values)
    summary = run_search(config, search, progress=not quiet, log=log)
    emit(
        summary,
        as_json,
        lambda s: [
            f"study {s['study_name']} in {s['storage']}: {s['complete']} complete, {s['pruned']} pruned, "
            f"{s['failed']} failed",
            *_best_lines(s),
        ],
    )


def _best_lines(summary: dict[str, Any]) -> list[str]:
    if "pareto_front" in summary:
        names = summary["objectives"]
        return [f"Pareto front ({', '.join(names)}): {len(summary['pareto_front'])} trials"] + [
            f"  trial {t['trial']}: " + ", ".join(f"{n} {v:.4g}" for n, v in zip(names, t["values"], strict=True))
            for t in summary["pareto_front"]
        ]
    if summary["best_value"] is None:
        return ["no completed trial yet"]
    return [
        f"best: trial {summary['best_trial']}, validation accuracy {summary['best_value']:.2f}%, "
        f"artifact {summary['best_artifact_id']}"
    ]


@cli.command()
@click.option("--study-name", required=True, help="The study whose best configs are confirmed.")
@storage_option
@click.option("--top", type=click.IntRange(1), default=3, show_default=True, help="How many of its best configs.")
@click.option("--seeds", type=click.IntRange(1), default=5, show_default=True, help="Seeds per config.")
@click.option(
    "--against",
    default="hand-set",
    show_default=True,
    help="The baseline, besides the hand-set config: hand-set alone, or the name of a study (a CE control) "
    "whose best config is re-trained with the same seeds.",
)
@json_option
@quiet_option
def confirm(
    study_name: str, storage: str | None, top: int, seeds: int, against: str, as_json: bool, quiet: bool
) -> None:
    """Re-train a study's best configs with several seeds; test the winner against the baselines, paired.

    Runs are trials of the companion study <name>-confirm: re-running resumes, workers can share it.
    """
    from kdsearch.confirm import run_confirm

    summary = run_confirm(storage, study_name, top=top, seeds=seeds, against=against, progress=not quiet, log=log)
    emit(summary, as_json, _confirm_lines)


def _confirm_lines(summary: dict[str, Any]) -> list[str]:
    lines = [f"confirmed {summary['study']} with seeds {summary['seeds']} (ranked on mean validation accuracy)"]
    for row in summary["rows"]:
        mark = " (chosen)" if row["chosen"] else " (baseline)" if row["baseline"] else ""
        tests = row["test_runs"]
        shown = f", test {statistics.fmean(tests):.2f}% mean" if tests else ""
        lines.append(f"  {row['arm']}{mark}: validation {row['val_mean']:.2f}% mean{shown}")
    for arm, comparison in summary["chosen_minus"].items():
        lines.append(f"  {summary['chosen']} − {arm}, test, paired: {comparison['interval']} points (95 % CI)")
    return lines


@cli.command()
@storage_option
@click.option("-f", "--format", "fmt", type=click.Choice(("table", "json", "yaml")), default="table", show_default=True)
def studies(storage: str | None, fmt: str) -> None:
    """List studies: method, dataset, trials by state, best value."""
    from kdsearch.export import format_rows, list_studies

    click.echo(format_rows(list_studies(storage), fmt))


@cli.command()
@click.option("--study-name", required=True)
@storage_option
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write to FILE.yaml or FILE.json [default: print YAML].",
)
@click.option(
    "--checkpoint",
    type=click.Path(),
    default=None,
    help="Also save the best trial's student checkpoint here (a folder with --pareto).",
)
@click.option("--top", type=click.IntRange(1), default=1, show_default=True, help="Export the K best trials.")
@click.option(
    "--pareto", is_flag=True, help="Every Pareto-optimal trial of a multi-objective study (--checkpoint: a folder)."
)
def export(
    study_name: str, storage: str | None, output: str | None, checkpoint: str | None, top: int, pareto: bool
) -> None:
    """Export the best trial's config (feeds `kdsearch train --config`)."""
    from kdsearch.export import export_study

    text = export_study(storage, study_name, output=output, checkpoint=checkpoint, top=top, pareto=pareto)
    if output is None:
        click.echo(text.rstrip())


@cli.command()
@storage_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless you say so).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
def dashboard(storage: str | None, host: str, port: int) -> None:
    """Serve optuna-dashboard on the study storage, with best-student checkpoints downloadable."""
    from kdsearch.dashboard import serve

    serve(storage, host, port, log)


@cli.command()
@click.option("--study-name", required=True)
@storage_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="The HTML file to write.")
@click.option("--png", "png_dir", type=click.Path(file_okay=False), default=None, help="Also write PNGs here.")
def report(study_name: str, storage: str | None, output: str, png_dir: str | None) -> None:
    """A self-contained HTML report of a study: history, pruning, importances, front, best trials."""
    from kdsearch.report import write_report

    result = write_report(storage, study_name, output, png_dir)
    log(f"wrote {result['report']} ({', '.join(result['plots'])})")
    for name, reason in result["skipped"].items():
        log(f"skipped {name}: {reason}")
