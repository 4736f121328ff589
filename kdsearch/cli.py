"""The ``kdsearch`` command line: each command builds a config and calls one function below it.

The options are derived from the declarations (``kdsearch.config``, ``kdsearch.settings``) by
``kdsearch.cli_options``: a knob declared there is an option here, with its help and its default,
and its value is checked by the knob. The layers below name fields; the command line says them as
flags, in one place (``cli_options.Command``). Every user mistake ends as one line on stderr and
exit code 2 (``main`` turns ``UserError`` and click's usage errors into that); anything else is a
bug and keeps its traceback. Nothing here imports torch until a command runs, so ``--help`` is quick.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from kdsearch.cli_options import Group, build, flag, given_on_command_line, options, say_as, words
from kdsearch.config import (
    KNOBS,
    RECIPE_SPACE,
    TEACHER_PRESETS,
    DataConfig,
    LossConfig,
    ModelsConfig,
    RecipeConfig,
    RunConfig,
    file_key,
)
from kdsearch.errors import Interrupted, RunFailedError, Terminated, UserError, raise_terminated, speak
from kdsearch.knobs import knobs_of
from kdsearch.search_config import SearchConfig
from kdsearch.settings import (
    ConfirmSettings,
    DashboardSettings,
    EvaluateSettings,
    ExportSettings,
    LayersSettings,
    Printing,
    ReportSettings,
    StudiesSettings,
    TeacherConfig,
    TeacherSettings,
    TrainSettings,
)

EXIT_USAGE = 2
EXIT_RUN_FAILED = 1  # valid input, a run that could not finish (a diverged loss)
# A run's fields as the command line takes them: every knob, the method and the device.
RUN_FIELDS = (*KNOBS, "method", "device")


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
    except Interrupted as exc:
        click.echo(f"kdsearch: {exc}", err=True)
        sys.exit(143 if exc.terminated else 130)
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
    """A progress line on stderr; fields it mentions (``{val_size}``) are said as this command's flags."""
    click.echo(f"kdsearch: {speak(message, words(click.get_current_context(silent=True)))}", err=True)


def emit(result: dict[str, Any], as_json: bool, lines: Callable[[dict[str, Any]], list[str]]) -> None:
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
    else:
        for line in lines(result):
            click.echo(line)


# --- commands -------------------------------------------------------------------------------------


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kdsearch")
def cli() -> None:
    """Hyperparameter search for knowledge distillation, on Optuna."""


@cli.command()
@options(DataConfig, TeacherConfig, TeacherSettings, RecipeConfig, Printing, defaults={"val_size": 0})
@click.pass_context
def teacher(ctx: click.Context, **values: Any) -> None:
    """Train a teacher (by default the strong preset, the one a search trains when given none) and save it."""
    from kdsearch.teacher import run_teacher

    settings, printing = build(TeacherSettings, values), build(Printing, values)
    given = {name: values[name] for name in given_on_command_line(ctx, [name for name, _ in knobs_of(RecipeConfig)])}
    recipe = build(RecipeConfig, TEACHER_PRESETS[settings.preset] | given)
    config = build(TeacherConfig, values, data=build(DataConfig, values), recipe=recipe)
    result = run_teacher(config, settings.out, progress=not printing.quiet and not printing.json)
    emit(
        result,
        printing.json,
        lambda r: [
            f"teacher {r['model']} on {r['dataset']}: test accuracy {r['test_accuracy']:.2f}%"
            + (f", validation {r['val_accuracy']:.2f}%" if r["val_accuracy"] is not None else ""),
            f"{r['params']:,} parameters, {sum(r['epoch_seconds']):.0f} s, saved to {r['checkpoint']}",
        ],
    )


@cli.command()
@options(LossConfig, TrainSettings, DataConfig, ModelsConfig, RecipeConfig, RunConfig, Printing)
@click.pass_context
def train(ctx: click.Context, **values: Any) -> None:
    """Run one distillation with given hyperparameters and report test accuracy."""
    from kdsearch.distill import run_training
    from kdsearch.fsutil import refuse_overwriting_inputs

    settings, printing = build(TrainSettings, values), build(Printing, values)
    refuse_overwriting_inputs({flag("out"): settings.out}, (settings.config,))
    document, teacher_sha256 = _train_document(ctx, settings, values)
    config = RunConfig.read(document)
    out = Path(settings.out) if settings.out else None
    result = run_training(
        config, out=out, progress=not printing.quiet and not printing.json, log=log, teacher_sha256=teacher_sha256
    )
    emit(result, printing.json, _train_lines)


def _train_document(
    ctx: click.Context, settings: TrainSettings, values: dict[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """The flat config `train` runs: its options, or its config file with the options given here over it;
    and the checksum of the teacher the file says it was searched with (None: no file, no record, or
    another --teacher given here).

    Values the file set are said as the file's keys in errors, so a run-time error about one (a
    validation split larger than the data) points into the file, not at a flag nobody typed.
    """
    from kdsearch.export import load_config_and_source
    from kdsearch.spaces import parse_assignments

    hp = parse_assignments(settings.hp, "hp")
    if settings.config is None:
        return {name: values[name] for name in RUN_FIELDS} | {"hyperparameters": hp}, None
    base, source = load_config_and_source(settings.config, settings.rank)
    given = {name: values[name] for name in given_on_command_line(ctx, list(RUN_FIELDS))}
    say_as(ctx, {n: f"config {settings.config}: {file_key(n)}" for n in RUN_FIELDS if n not in given and n not in hp})
    # Another --method than the file's starts from that method's tutorial values, not the file's.
    kept = dict(base.loss.params) if given.get("method", base.method) == base.method else {}
    recorded = source.get("teacher_sha256") if "teacher" not in given and "teacher_model" not in given else None
    document = base.flat() | {"device": base.device} | given | {"hyperparameters": kept | hp}
    return document, recorded if isinstance(recorded, str) else None


def _train_lines(r: dict[str, Any]) -> list[str]:
    return [
        f"{r['method']} on {r['dataset']}: test accuracy {r['test_accuracy']:.2f}%"
        + (f", validation {r['val_accuracy']:.2f}%" if r["val_accuracy"] is not None else ""),
        f"{r['params']:,} student parameters, {sum(r['epoch_seconds']):.1f} s training, "
        f"{r['teacher_outputs_seconds']:.1f} s teacher outputs",
        "recipe: " + ", ".join(f"{k}={v}" for k, v in r["config"]["recipe"].items()),
        "method: " + ", ".join(f"{k}={v}" for k, v in sorted(r["config"]["loss"]["params"].items())),
    ] + ([f"saved to {r['checkpoint']}"] if r.get("checkpoint") else [])


@cli.command()
@options(EvaluateSettings, DataConfig, Printing, drop=("quiet",))
def evaluate(**values: Any) -> None:
    """Report a checkpoint's test (and validation) accuracy."""
    from kdsearch.distill import run_evaluation

    settings, data = build(EvaluateSettings, values), build(DataConfig, values)
    result = run_evaluation(settings.checkpoint, settings.model, settings.width, data, settings.device)
    emit(
        result,
        build(Printing, values).json,
        lambda r: [
            f"{r['model']} from {r['checkpoint']} on {r['dataset']}: test accuracy {r['test_accuracy']:.2f}%"
            + (f", validation {r['val_accuracy']:.2f}%" if r["val_accuracy"] is not None else ""),
            f"{r['params']:,} parameters",
        ],
    )


@cli.command()
@options(LayersSettings, DataConfig, Printing, drop=("quiet", "val_size", "limit_train"))
def layers(**values: Any) -> None:
    """List a model's layers with their output shapes at the dataset's image size, to pick the tapped layers."""
    from kdsearch.distill import run_layers

    settings, data = build(LayersSettings, values), build(DataConfig, values)
    result = run_layers(settings.model, settings.width, data)
    emit(result, build(Printing, values).json, _layer_lines)


def _layer_lines(r: dict[str, Any]) -> list[str]:
    size = "x".join(map(str, r["image_size"]))
    lines = [f"{r['model']} on {r['dataset']} ({r['in_channels']}x{size} images, {r['params']:,} parameters):"]
    name_width = max((len(layer["name"]) for layer in r["layers"]), default=4)
    kind_width = max((len(layer["kind"]) for layer in r["layers"]), default=4)
    for layer in r["layers"]:
        shape = "x".join(map(str, layer["shape"])) if layer["shape"] is not None else "-"
        lines.append(f"  {layer['name']:<{name_width}}  {layer['kind']:<{kind_width}}  {shape}")
    return lines


@cli.command()
@options(LossConfig, SearchConfig, DataConfig, ModelsConfig, RecipeConfig, RunConfig, Printing, required=("method",))
@click.pass_context
def optimize(ctx: click.Context, **values: Any) -> None:
    """Search a method's hyperparameters with Optuna; the best student is kept as an artifact.

    --method auto (or a list, kd,dkd,ce) searches across methods in one study: the method is a
    parameter, each method's own parameters are drawn only for it, and ce is the study's own control.

    --trials N runs N trials in this invocation (split over --n-jobs workers); with --total, workers
    on any number of hosts pointed at one --storage stop when the study holds N finished trials.
    A recipe knob the methods search (--lr, --optimizer, --augment…) given here is pinned, as with --fix.
    """
    from kdsearch.strategies import methods_of
    from kdsearch.study import run_search

    pinned = given_on_command_line(ctx, list(RECIPE_SPACE))
    search_values = {name: values[name] for name, _ in knobs_of(SearchConfig)}
    search_values["fix"] = (*search_values["fix"], *(f"{name}={values[name]}" for name in pinned))
    search = build(SearchConfig, search_values)
    # --method auto or a list (kd,dkd,ce): one study across them; the config names the first.
    methods = methods_of(values["method"])
    config = RunConfig.read({name: values[name] for name in RUN_FIELDS} | {"method": methods[0]})
    printing = build(Printing, values)
    summary = run_search(config, search, methods=methods, progress=not printing.quiet, log=log)
    emit(
        summary,
        printing.json,
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
@options(ConfirmSettings, Printing)
def confirm(**values: Any) -> None:
    """Re-train a study's best configs with several seeds; test the winner against the baselines, paired.

    Runs are trials of the companion study <name>-confirm: re-running resumes, workers can share it.
    """
    from kdsearch.confirm import run_confirm

    s, printing = build(ConfirmSettings, values), build(Printing, values)
    summary = run_confirm(
        s.storage,
        s.study_name,
        top=s.top,
        seeds=s.seeds,
        against=s.against,
        race=s.race,
        progress=not printing.quiet,
        log=log,
    )
    emit(summary, printing.json, _confirm_lines)


def _confirm_lines(summary: dict[str, Any]) -> list[str]:
    from kdsearch.export import confirm_table

    rows, differences = confirm_table(summary)
    lines = [f"confirmed {summary['study']} with seeds {summary['seeds']} (ranked on mean validation accuracy)"]
    for row in rows:
        test = row["test % (mean)"]
        shown = f", test {test:.2f}% mean" if test is not None else ""
        lines.append(f"  {row['config']}: validation {row['validation % (mean)']:.2f}% mean{shown}")
    return lines + [f"  {line}" for line in differences]


@cli.command()
@options(StudiesSettings)
def studies(**values: Any) -> None:
    """List studies: method, dataset, trials by state, best value. Listing never writes to the storage."""
    from kdsearch.export import format_rows, list_studies
    from kdsearch.storage import no_studies_in

    settings = build(StudiesSettings, values)
    rows, url = list_studies(settings.storage)
    if not rows and settings.format != "table":
        log(no_studies_in(url))  # stdout stays the empty list a script parses
    click.echo(format_rows(rows, settings.format, empty=no_studies_in(url)))


@cli.command()
@options(ExportSettings)
def export(**values: Any) -> None:
    """Export the best trial's config (feeds `kdsearch train --config`)."""
    from kdsearch.export import export_study

    s = build(ExportSettings, values)
    text = export_study(s.storage, s.study_name, output=s.output, checkpoint=s.checkpoint, top=s.top, pareto=s.pareto)
    if s.output is None:
        click.echo(text.rstrip())


@cli.command()
@options(DashboardSettings)
def dashboard(**values: Any) -> None:
    """Serve optuna-dashboard on the study storage, with best-student checkpoints downloadable."""
    from kdsearch.dashboard import serve

    settings = build(DashboardSettings, values)
    serve(settings.storage, settings.host, settings.port, log)


@cli.command()
@options(ReportSettings)
def report(**values: Any) -> None:
    """A self-contained HTML report of a study: history, pruning, importances, front, best trials."""
    from kdsearch.report import write_report

    settings = build(ReportSettings, values)
    result = write_report(settings.storage, settings.study_name, settings.output, settings.png)
    log(f"wrote {result['report']} ({', '.join(result['plots'])})")
    for name, reason in result["skipped"].items():
        log(f"skipped {name}: {reason}")
