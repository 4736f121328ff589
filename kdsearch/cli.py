"""The ``kdsearch`` command line: thin commands that parse options and call one function each.

Every user mistake ends as one line on stderr and exit code 2 (``main`` turns ``UserError`` and
click's usage errors into that); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from kdsearch.data import DATASETS
from kdsearch.errors import UserError
from kdsearch.loop import PRECISIONS
from kdsearch.strategies import METHODS

EXIT_USAGE = 2


def echo_error(message: str) -> None:
    one_line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    click.echo(f"kdsearch: error: {one_line}", err=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so Optuna closes the running trial (as failed) before we exit."""


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the click group with errors flattened to one line and exit 2.

    SIGINT exits 130 and SIGTERM 143, after the running trial has been closed in the storage.
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        cli.main(args=argv, prog_name="kdsearch", standalone_mode=False)
    except UserError as exc:
        echo_error(str(exc))
        sys.exit(EXIT_USAGE)
    except click.UsageError as exc:
        echo_error(exc.format_message())
        sys.exit(EXIT_USAGE)
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


def parse_assignments(items: tuple[str, ...], option: str) -> dict[str, Any]:
    from kdsearch.spaces import parse_fixes

    try:
        return dict(parse_fixes(items))
    except UserError as exc:
        raise UserError(str(exc).replace("--fix", option)) from None


def data_options(default_val_size: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The dataset options every command shares."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(
            [
                click.option(
                    "--dataset",
                    type=click.Choice(DATASETS),
                    default="cifar10",
                    show_default=True,
                    help="cifar10/cifar100/fashion-mnist (torchvision format, downloaded if missing) or imagefolder.",
                ),
                click.option(
                    "--data-dir",
                    type=click.Path(file_okay=False),
                    default=None,
                    help="Dataset folder (imagefolder: train/<class>/ and test/<class>/).",
                ),
                click.option(
                    "--val-size",
                    type=int,
                    default=default_val_size,
                    show_default=True,
                    help="Train images held out for validation (fixed split; 0 = none).",
                ),
                click.option("--limit-train", type=int, default=None, help="Keep only N training images (quick runs)."),
                click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
            ]
        ):
            fn = option(fn)
        return fn

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kdsearch")
def cli() -> None:
    """Hyperparameter search for knowledge distillation, on Optuna."""


@cli.command()
@data_options(default_val_size=0)
@click.option("--model", default="deepnn", show_default=True, help="deepnn or package.module:Class.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Checkpoint path [default: studies/teachers/<model>-<dataset>-<data id>[-val<N>].pt, the teacher that "
    "runs with the same --val-size use by default].",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def teacher(
    dataset: str,
    data_dir: str | None,
    val_size: int,
    limit_train: int | None,
    device: str,
    model: str,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    out: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Train the tutorial's teacher (10 epochs, Adam 1e-3, batch 128, seed 42) and save it."""
    from kdsearch.data import load_splits
    from kdsearch.loop import resolve_device
    from kdsearch.models import resolve_model_class
    from kdsearch.teacher import TeacherRecipe, cache_dir, default_teacher_path, train_teacher

    recipe = TeacherRecipe(model=model, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    for name in ("epochs", "batch_size"):
        if getattr(recipe, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(recipe, name)}")
    if lr <= 0:
        raise UserError(f"--lr must be positive, got {lr}")
    resolve_model_class(model)
    torch_device = resolve_device(device)
    splits = load_splits(dataset, data_dir, val_size=val_size, limit_train=limit_train, cache_dir=cache_dir())
    path = Path(out) if out else default_teacher_path(splits, recipe, val_size, limit_train)
    result = train_teacher(
        splits.to(torch_device),
        recipe,
        torch_device,
        path,
        progress=not quiet and not as_json,
        data_settings={"val_size": val_size, "limit_train": limit_train, "data_dir": data_dir},
    )
    result["checkpoint"] = str(path)
    emit(
        result,
        as_json,
        lambda r: [
            f"teacher {r['model']} on {r['dataset']}: test accuracy {r['test_accuracy']:.2f}%"
            + (f", validation {r['val_accuracy']:.2f}%" if r["val_accuracy"] is not None else ""),
            f"{r['params']:,} parameters, {sum(r['epoch_seconds']):.0f} s, saved to {r['checkpoint']}",
        ],
    )


# `train` and `optimize` take the same --precision (RunConfig.precision).
precision_option = click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="fp32",
    show_default=True,
    help="Student forward pass: fp32, or autocast bf16 (CPU/CUDA) or fp16 (CUDA); losses stay float32.",
)

RUN_OPTIONS = (
    "method",
    "dataset",
    "data_dir",
    "val_size",
    "limit_train",
    "device",
    "epochs",
    "batch_size",
    "seed",
    "teacher",
    "teacher_model",
    "student_model",
    "teacher_layer",
    "student_layer",
    "width",
    "precision",
)


@cli.command()
@click.option("--method", type=click.Choice(METHODS), default="kd", show_default=True)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML/JSON run config (as `kdsearch export` writes); options given here override it.",
)
@data_options(default_val_size=5000)
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option(
    "--teacher",
    type=click.Path(dir_okay=False),
    default=None,
    help="Teacher checkpoint [default: the dataset's tutorial teacher, trained once if missing].",
)
@click.option("--teacher-model", default=None, help="Teacher architecture [default: from the checkpoint, else deepnn].")
@click.option("--student-model", default="lightnn", show_default=True, help="lightnn or package.module:Class.")
@click.option("--teacher-layer", default="features", show_default=True, help="Teacher layer tapped for features.")
@click.option("--student-layer", default="features", show_default=True, help="Student layer tapped for features.")
@click.option("--width", type=float, default=1.0, show_default=True, help="Student width multiplier.")
@precision_option
@click.option(
    "--rank", type=int, default=1, show_default=True, help="Which config of an `export --top K` file (1 = best)."
)
@click.option(
    "--hp",
    "hp_items",
    multiple=True,
    metavar="NAME=VALUE",
    help="A hyperparameter (repeatable), e.g. --hp temperature=4; unset ones take the tutorial's values.",
)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Save the trained student here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def train(
    ctx: click.Context,
    config_path: str | None,
    rank: int,
    hp_items: tuple[str, ...],
    out: str | None,
    as_json: bool,
    quiet: bool,
    **options: Any,
) -> None:
    """Run one distillation with given hyperparameters and report test accuracy."""
    from kdsearch.distill import RunConfig, config_from_dict, load_config, run_training

    base = load_config(config_path, rank).to_dict() if config_path else RunConfig().to_dict()
    for name in RUN_OPTIONS:
        if config_path is None or ctx.get_parameter_source(name) in (
            ParameterSource.COMMANDLINE,
            ParameterSource.ENVIRONMENT,
        ):
            base[name] = options[name]
    base["hyperparameters"] = {**base.get("hyperparameters", {}), **parse_assignments(hp_items, "--hp")}
    config = config_from_dict(base, origin=config_path or "from the command line")
    result = run_training(config, out=Path(out) if out else None, progress=not quiet and not as_json, log=log)
    emit(
        result,
        as_json,
        lambda r: (
            [
                f"{r['method']} on {r['dataset']}: test accuracy {r['test_accuracy']:.2f}%"
                + (f", validation {r['val_accuracy']:.2f}%" if r["val_accuracy"] is not None else ""),
                f"{r['params']:,} student parameters, {sum(r['epoch_seconds']):.1f} s training, "
                f"{r['teacher_outputs_seconds']:.1f} s teacher outputs",
                "hyperparameters: " + ", ".join(f"{k}={v}" for k, v in sorted(r["hyperparameters"].items())),
            ]
            + ([f"saved to {r['checkpoint']}"] if r.get("checkpoint") else [])
        ),
    )


@cli.command()
@click.option("--checkpoint", type=click.Path(dir_okay=False), required=True)
@click.option("--model", default=None, help="deepnn, lightnn or package.module:Class [default: from the checkpoint].")
@click.option("--width", type=float, default=None, help="Width multiplier [default: from the checkpoint, else 1].")
@data_options(default_val_size=5000)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(
    checkpoint: str,
    model: str | None,
    width: float | None,
    dataset: str,
    data_dir: str | None,
    val_size: int,
    limit_train: int | None,
    device: str,
    as_json: bool,
) -> None:
    """Report a checkpoint's test (and validation) accuracy."""
    from kdsearch.distill import run_evaluation

    result = run_evaluation(
        checkpoint,
        model,
        width,
        dataset=dataset,
        data_dir=data_dir,
        val_size=val_size,
        limit_train=limit_train,
        device=device,
    )
    emit(
        result,
        as_json,
        lambda r: [
            f"{r['model']} from {r['checkpoint']} on {r['dataset']}: test accuracy {r['test_accuracy']:.2f}%"
            + (f", validation {r['val_accuracy']:.2f}%" if r["val_accuracy"] is not None else ""),
            f"{r['params']:,} parameters",
        ],
    )


def study_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--storage",
        envvar="KDSEARCH_STORAGE",
        default=None,
        help="SQLAlchemy URL [env KDSEARCH_STORAGE; default: sqlite:///studies/kdsearch.db].",
    )(fn)


@cli.command()
@click.option("--method", type=click.Choice(METHODS), required=True)
@click.option(
    "--trials",
    type=int,
    default=None,
    help="Trials this invocation runs (all --n-jobs workers together); with --total, the study's total.",
)
@click.option("--timeout", type=float, default=None, help="Stop starting trials after this many seconds.")
@data_options(default_val_size=5000)
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option(
    "--seed", type=int, default=42, show_default=True, help="Seed of the sampler and of every trial's training."
)
@click.option("--study-name", default=None, help="[default: <method>-<dataset>]; an existing study gets more trials.")
@study_options
@click.option("--sampler", type=click.Choice(("tpe", "random", "cmaes", "grid")), default="tpe", show_default=True)
@click.option(
    "--pruner", type=click.Choice(("median", "hyperband", "percentile", "none")), default="median", show_default=True
)
@click.option(
    "--pruner-startup", type=int, default=5, show_default=True, help="Trials completed before pruning starts."
)
@click.option(
    "--pruner-warmup", type=int, default=None, help="Epochs before a trial can be pruned [default: epochs/4]."
)
@click.option(
    "--space",
    "space_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Search-space YAML/JSON (see studies/spaces/); overrides the method's defaults.",
)
@click.option("--fix", "fixes", multiple=True, metavar="NAME=VALUE", help="Pin a hyperparameter (repeatable).")
@click.option(
    "--teacher",
    type=click.Path(dir_okay=False),
    default=None,
    help="Teacher checkpoint [default: the dataset's tutorial teacher, trained once if missing].",
)
@click.option("--teacher-model", default=None)
@click.option("--student-model", default="lightnn", show_default=True)
@click.option("--teacher-layer", default="features", show_default=True)
@click.option("--student-layer", default="features", show_default=True)
@click.option("--width", type=float, default=1.0, show_default=True)
@precision_option
@click.option(
    "--n-jobs",
    type=int,
    default=1,
    show_default=True,
    help="Worker processes on this machine, sharing the study and the CPU threads.",
)
@click.option(
    "--total",
    is_flag=True,
    help="--trials is the study's total of finished trials (all workers, all hosts), not this run's.",
)
@click.option(
    "--heartbeat",
    type=int,
    default=30,
    show_default=True,
    help="Seconds between a trial's heartbeats; trials of dead workers are failed and retried.",
)
@click.option(
    "--objectives",
    default="accuracy",
    show_default=True,
    help="accuracy, or a multi-objective search: accuracy,params and/or latency (adds --width to the space).",
)
@click.option(
    "--baseline/--no-baseline",
    default=True,
    show_default=True,
    help="Start a new study with the tutorial's hand-set hyperparameters as trial 0 (not with --sampler grid).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary at the end.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def optimize(
    trials: int | None,
    timeout: float | None,
    study_name: str | None,
    storage: str | None,
    sampler: str,
    pruner: str,
    pruner_startup: int,
    pruner_warmup: int | None,
    space_file: str | None,
    fixes: tuple[str, ...],
    n_jobs: int,
    total: bool,
    heartbeat: int,
    objectives: str,
    baseline: bool,
    as_json: bool,
    quiet: bool,
    **options: Any,
) -> None:
    """Search a strategy's hyperparameters with Optuna; the best student is kept as an artifact.

    --trials N runs N trials in this invocation (split over --n-jobs workers); with --total, workers
    on any number of hosts pointed at one --storage stop when the study holds N finished trials.
    """
    from kdsearch.distill import config_from_dict
    from kdsearch.search import run_search

    config = config_from_dict(options, origin="from the command line")
    summary = run_search(
        config,
        study_name=study_name,
        storage_url=storage,
        trials=trials,
        timeout=timeout,
        sampler_name=sampler,
        pruner_name=pruner,
        pruner_startup=pruner_startup,
        pruner_warmup=pruner_warmup,
        space_file=space_file,
        fixes=fixes,
        n_jobs=n_jobs,
        heartbeat=heartbeat,
        total=total,
        objectives=tuple(o.strip() for o in objectives.split(",") if o.strip()),
        baseline=baseline,
        progress=not quiet,
        log=log,
    )
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
@study_options
@click.option("-f", "--format", "fmt", type=click.Choice(("table", "json", "yaml")), default="table", show_default=True)
def studies(storage: str | None, fmt: str) -> None:
    """List studies: method, dataset, trials by state, best value."""
    from kdsearch.export import format_rows, list_studies

    click.echo(format_rows(list_studies(storage), fmt))


@cli.command()
@click.option("--study-name", required=True)
@study_options
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
    help="Also save the best trial's student checkpoint here (a directory with --pareto).",
)
@click.option("--top", type=int, default=1, show_default=True, help="Export the K best trials.")
@click.option(
    "--pareto",
    is_flag=True,
    help="Every Pareto-optimal trial of a multi-objective study (--checkpoint is then a directory).",
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
@study_options
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
def dashboard(storage: str | None, host: str, port: int) -> None:
    """Serve optuna-dashboard on the study storage, with best-student checkpoints downloadable."""
    from wsgiref.simple_server import make_server

    from kdsearch.export import dashboard_app
    from kdsearch.search import default_storage_url, redact

    app = dashboard_app(storage)
    try:
        server = make_server(host, port, app)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    log(f"dashboard for {redact(storage or default_storage_url())} at http://{host}:{server.server_port}/")
    try:
        server.serve_forever()
    finally:
        server.server_close()


@cli.command()
@click.option("--study-name", required=True)
@study_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="The HTML file to write.")
@click.option("--png", "png_dir", type=click.Path(file_okay=False), default=None, help="Also write PNGs here.")
def report(study_name: str, storage: str | None, output: str, png_dir: str | None) -> None:
    """A self-contained HTML report of a study: history, pruning, importances, front, best trials."""
    from kdsearch.report import write_report

    result = write_report(storage, study_name, output, png_dir)
    log(f"wrote {result['report']} ({', '.join(result['plots'])})")
    for name, reason in result["skipped"].items():
        log(f"skipped {name}: {reason}")
