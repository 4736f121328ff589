"""The flagship study's cost, as a user runs it (`make bench-flagship`).

`kdsearch optimize --method cosine --trials 50 --epochs 10 --n-jobs 2` on the shared CIFAR-10 copy with
the committed strong teacher (5,000 validation images, sampler seed 42), timed from the command line to
its exit, divided by one CE epoch's time measured in the same run on the same machine: the study's cost
in CE epochs. The CE epoch is the median steady epoch (the first, which warms up, left out) of a short
`kdsearch train --method ce`, run before and after the study so that a drift of the machine shows.

The study's start-up (loading the data, building the teacher-output cache when it is not on disk yet,
starting the workers) is the wall time less the span of its trials, and is part of the cost as run; the
cost with warm caches puts in its place the start-up of the same command once the caches exist.

The same study without pruning (`--pruner none`, same sampler seed) is the yardstick for what the pruner
may lose: each study's best config is exported and re-trained with --seeds seeds, and the pruned pick's
test accuracy is set against the unpruned pick's, paired by seed. Studies use `--total`, so an interrupted
run resumes (its wall time is then marked as resumed, not a cost). Rows land in bench/results/flagship.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cli_runner

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "flagship.json"
STORAGE = f"sqlite:///{BENCH / 'studies' / 'flagship.db'}"
TEACHER = BENCH / "teachers" / "deepnn-cifar10-jpeg-strong-val5000.pt"


def data_args(args: argparse.Namespace) -> list[str]:
    return ["--dataset", "imagefolder", "--data-dir", args.data_dir, "--val-size", "5000"]


def ce_epoch_seconds(args: argparse.Namespace) -> dict[str, Any]:
    """A short CE training's steady epochs: the unit the study's cost is counted in."""
    out = Path(tempfile.mkdtemp(prefix="kdsearch-flagship-")) / "ce.pt"
    summary, command = cli_runner.kdsearch(
        "train", "--method", "ce", *data_args(args), "--epochs", str(args.ce_epochs), "--out", str(out), "-q"
    )
    steady = summary["epoch_seconds"][1:]
    return {"command": command, "epoch_seconds": summary["epoch_seconds"], "steady_median": statistics.median(steady)}


def trials_in(study: str) -> int:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return len(optuna.load_study(study_name=study, storage=STORAGE).get_trials(deepcopy=False))
    except KeyError:
        return 0


def optimize_command(args: argparse.Namespace, name: str, *extra: str, storage: str = STORAGE) -> list[str]:
    return cli_runner.kdsearch_command([
        "optimize", "--method", args.method, *data_args(args), "--teacher", str(TEACHER), "--trials", str(args.trials),
        "--epochs", "10", "--total", "--n-jobs", "2", "--sampler-seed", "42", "--study-name", name,
        "--storage", storage, "-q", *extra,
    ])  # fmt: skip


def study(args: argparse.Namespace, name: str, pruner: str | None) -> dict[str, Any]:
    """One 50-trial cosine study, timed start to exit, with the epochs its trials trained."""
    resumed = trials_in(name) > 0
    command = optimize_command(args, name, *(["--pruner", pruner] if pruner else []))
    start = time.perf_counter()
    summary = cli_runner.run(command).check().json()
    wall = time.perf_counter() - start
    return {"command": cli_runner.shown(command), "study": name, "wall_seconds": wall, "resumed": resumed,
            "best_value": summary["best_value"], "epochs": epochs_trained(name)}  # fmt: skip


def warm_startup(args: argparse.Namespace) -> dict[str, Any]:
    """The same command's start-up once the caches exist (the study's first run builds the teacher-output
    cache): two one-epoch trials on a throwaway storage, wall time less the span of the trials."""
    storage = f"sqlite:///{Path(tempfile.mkdtemp(prefix='kdsearch-flagship-')) / 'startup.db'}"
    command = optimize_command(args, "startup", storage=storage)
    command[command.index("--trials") + 1], command[command.index("--epochs") + 1] = "2", "1"
    start = time.perf_counter()
    cli_runner.run(command).check()
    wall = time.perf_counter() - start
    return {"command": cli_runner.shown(command), "wall_seconds": wall,
            "startup_seconds": wall - trials_span_seconds("startup", storage)}  # fmt: skip


def epochs_trained(name: str) -> dict[str, int]:
    import optuna

    trials = optuna.load_study(study_name=name, storage=STORAGE).get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return {"total": sum(len(t.intermediate_values) for t in trials), **states}


def trials_span_seconds(name: str, storage: str = STORAGE) -> float:
    """From the first trial's start to the last one's end: the study less its start-up (loading the data,
    building the teacher-output cache on a first run, starting the workers)."""
    import optuna

    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    first = min(t.datetime_start for t in trials if t.datetime_start)
    last = max(t.datetime_complete for t in trials if t.datetime_complete)
    return (last - first).total_seconds()


def costs(result: dict[str, Any]) -> dict[str, float]:
    """The pruned study's cost in CE epochs as run (its start-up built the teacher-output cache when the
    machine had none), and with warm caches: its trials' span plus the warm start-up."""
    pruned, ce = result["pruned"], result["ce_epoch"]["steady_median"]
    span = trials_span_seconds(pruned["study"])
    warm = span + result["warm_startup"]["startup_seconds"]
    return {"as_run": pruned["wall_seconds"] / ce, "startup_seconds": pruned["wall_seconds"] - span,
            "warm_caches": warm / ce}  # fmt: skip


def replayed(name: str, epochs: int = 10) -> dict[str, Any]:
    """The unpruned study's learning curves, in trial order, replayed through Optuna's own pruners.

    Each curve is reported epoch by epoch to a fresh in-memory study with the pruner (the last epoch
    never pruned, as kdsearch does): the epochs each pruner would have trained on these very trials,
    and the best final validation accuracy among the trials it lets finish. Sequential, where the
    real studies run two workers at a time; and on the unpruned study's proposals, which pruning
    would have changed.
    """
    import optuna

    from kdsearch.samplers import make_pruner
    from kdsearch.search_config import SearchConfig

    trials = optuna.load_study(study_name=name, storage=STORAGE).get_trials(deepcopy=False)
    curves = [[t.intermediate_values[e] for e in sorted(t.intermediate_values)] for t in trials if t.value is not None]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = SearchConfig(trials=len(trials))
    pruners = {
        "none": make_pruner(dataclasses.replace(search, pruner="none"), epochs),
        "asha (default: rungs at epochs 1, 3, 9)": make_pruner(search, epochs),
        "asha, rungs at epochs 2, 6 (the default before)": make_pruner(
            dataclasses.replace(search, pruner_warmup=2), epochs
        ),
        "median (the default before that)": make_pruner(dataclasses.replace(search, pruner="median"), epochs),
    }
    rows = {}
    for label, pruner in pruners.items():
        study = optuna.create_study(direction="maximize", pruner=pruner)
        trained, finals = 0, []
        for curve in curves:
            trial = study.ask()
            for step, value in enumerate(curve, 1):
                trial.report(value, step)
                trained += 1
                if step < len(curve) and trial.should_prune():
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    break
            else:
                study.tell(trial, curve[-1])
                finals.append(curve[-1])
        rows[label] = {"epochs": trained, "completed": len(finals), "best_value": max(finals)}
    return {"trials": len(curves), "pruners": rows}


def retrained(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The study's best config, exported and re-trained with each seed: test accuracy per seed."""
    config = Path(tempfile.mkdtemp(prefix="kdsearch-flagship-")) / f"{name}.yaml"
    cli_runner.run(cli_runner.kdsearch_command(
        ["export", "--study-name", name, "--storage", STORAGE, "-o", str(config)], as_json=False
    )).check()  # fmt: skip
    runs = []
    for seed in range(1, args.seeds + 1):
        out = config.with_name(f"{name}-{seed}.pt")
        summary, _ = cli_runner.kdsearch("train", "--config", str(config), "--seed", str(seed), "--out", str(out), "-q")
        runs.append(summary["test_accuracy"])
    return {"config": config.read_text(), "test_runs": runs, "test_median": statistics.median(runs)}


def write(result: dict[str, Any]) -> None:
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/datasets/cifar10-jpeg")
    parser.add_argument("--method", default="cosine")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--ce-epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3, help="re-trainings of each study's best config")
    args = parser.parse_args()
    result: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    pruned, unpruned = f"flagship-{args.method}-asha-1-3-9", f"flagship-{args.method}-unpruned"
    if result.get("pruned", {}).get("study") == f"flagship-{args.method}":  # run with the rungs of before
        result["rungs_2_6"] = {k: result.pop(k) for k in ("pruned", "ce_epoch", "study_cost_ce_epochs")}
        write(result)
    if "pruned" not in result:
        before = ce_epoch_seconds(args)
        result["pruned"] = study(args, pruned, None)
        after = ce_epoch_seconds(args)
        ce = statistics.median([*before["epoch_seconds"][1:], *after["epoch_seconds"][1:]])
        result["ce_epoch"] = {"before": before, "after": after, "steady_median": ce}
        write(result)
    if "warm_startup" not in result:
        result["warm_startup"] = warm_startup(args)
        write(result)
    if "unpruned" not in result:
        result["unpruned"] = study(args, unpruned, "none")
        write(result)
    for key, name in (("pruned_pick", pruned), ("unpruned_pick", unpruned)):
        if key not in result:
            result[key] = retrained(args, name)
            write(result)
    result["study_cost_ce_epochs"] = costs(result)
    result["replayed"] = replayed(unpruned)
    pairs = zip(result["pruned_pick"]["test_runs"], result["unpruned_pick"]["test_runs"], strict=True)
    diffs = [a - b for a, b in pairs]
    result["pruned_minus_unpruned"] = {"per_seed": diffs, "median": statistics.median(diffs)}
    write(result)
    minutes, ce = result["pruned"]["wall_seconds"] / 60, result["ce_epoch"]["steady_median"]
    cost = result["study_cost_ce_epochs"]
    print(f"study cost: {cost['as_run']:.0f} CE epochs as run ({minutes:.1f} min, CE epoch {ce:.2f} s, "
          f"start-up {cost['startup_seconds']:.0f} s), {cost['warm_caches']:.0f} with warm caches")  # fmt: skip
    print(f"pruned pick − unpruned pick, test %, per seed: {', '.join(f'{d:+.2f}' for d in diffs)}")
    for label, row in result["replayed"]["pruners"].items():
        print(f"replayed on the unpruned curves, {label}: {row['epochs']} epochs, best {row['best_value']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
