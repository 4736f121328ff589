"""Which sampler and pruner find a good config for the fewest training epochs? (`make bench-efficiency`)

One `kdsearch optimize --method auto` study per (configuration, sampler seed) at reduced fidelity —
10,000 training images, 2,000 validation images, 5 epochs, the committed strong teacher — for:

- ``default``: what `optimize` does unless told otherwise (TPE multivariate with ``group=True``, ASHA);
- ``tpe-median``: TPE with the median pruner (the default before);
- ``tpe-none``: TPE without pruning;
- ``random-none``: random search without pruning, the yardstick.

Each study's curve is the best validation accuracy of its completed trials against the epochs its
trials trained so far (pruned trials' epochs counted), in trial order. The medians over sampler
seeds are compared: the epochs each configuration needs to reach the best accuracy random search
reaches with all its epochs. Each final pick (the study's best trial) is also tested on the 10,000
test images. Studies live in bench/studies/efficiency.db (`--total`, so a re-run resumes them);
rows land in bench/results/efficiency.json as they finish; the plot goes to docs/efficiency.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import cli_runner

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "efficiency.json"
STORAGE = f"sqlite:///{BENCH / 'studies' / 'efficiency.db'}"
TEACHER = BENCH / "teachers" / "deepnn-cifar10-jpeg-strong-val5000.pt"
PLOT = BENCH.parent / "docs" / "efficiency.png"
# name → (sampler, pruner, trials): unpruned searches get fewer trials for a similar epoch budget.
CONFIGS: dict[str, tuple[str, str, int]] = {
    "default": ("tpe", "asha", 60),
    "tpe-median": ("tpe", "median", 30),
    "tpe-none": ("tpe", "none", 20),
    "random-none": ("random", "none", 20),
}
YARDSTICK = "random-none"


def data_args(args: argparse.Namespace) -> list[str]:
    return ["--dataset", "imagefolder", "--data-dir", args.data_dir, "--limit-train", str(args.limit_train),
            "--val-size", str(args.val_size)]  # fmt: skip


def study_name(config: str, seed: int) -> str:
    return f"eff-{config}-s{seed}"


def start_study(config: str, seed: int, args: argparse.Namespace, threads: int) -> cli_runner.Running:
    sampler, pruner, trials = CONFIGS[config]
    command = cli_runner.kdsearch_command([
        "optimize", "--method", "auto", *data_args(args), "--epochs", str(args.epochs), "--teacher", str(TEACHER),
        "--trials", str(trials), "--total", "--sampler", sampler, "--pruner", pruner, "--sampler-seed", str(seed),
        "--study-name", study_name(config, seed), "--storage", args.storage, "-q",
    ])  # fmt: skip
    return cli_runner.start(command, os.environ | {"OMP_NUM_THREADS": str(threads)})


def curve(study_name_: str, storage: str) -> tuple[list[int], list[float | None], Any]:
    """Epochs trained after each trial, the best completed validation accuracy by then, the best trial."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=study_name_, storage=storage)
    epochs, best, total, top, pick = [], [], 0, None, None
    for trial in sorted(study.trials, key=lambda t: t.number):
        total += len(trial.intermediate_values)
        if trial.state == TrialState.COMPLETE and (top is None or trial.value > top):
            top, pick = trial.value, trial
        epochs.append(total)
        best.append(top)
    return epochs, best, pick


def test_accuracy(study: str, args: argparse.Namespace) -> float:
    """The study's pick, its kept student tested on the test split (what a user would deploy)."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(Path(tmp) / "best.pt")
        cli_runner.run(cli_runner.kdsearch_command(
            ["export", "--study-name", study, "--storage", args.storage, "--checkpoint", checkpoint], as_json=False
        )).check()  # fmt: skip
        result, _ = cli_runner.kdsearch("evaluate", "--checkpoint", checkpoint, *data_args(args))
    return float(result["test_accuracy"])


def best_at(epochs: list[int], best: list[float | None], budget: int) -> float | None:
    """The best accuracy a study had found once it had trained ``budget`` epochs (None: nothing yet)."""
    found = [b for e, b in zip(epochs, best, strict=True) if e <= budget and b is not None]
    return found[-1] if found else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per configuration, over seeds: the median curve, final best, test accuracy of the pick, and the
    epochs its median curve needs to reach the yardstick's median final best."""
    by_config: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_config.setdefault(row["config"], []).append(row)
    out: dict[str, Any] = {}
    for config, runs in by_config.items():
        horizon = max(r["epochs"][-1] for r in runs)
        grid = list(range(1, horizon + 1))
        medians = []
        for budget in grid:
            values = [best_at(r["epochs"], r["best"], budget) for r in runs]
            medians.append(statistics.median(v for v in values if v is not None) if None not in values else None)
        out[config] = {
            "seeds": [r["seed"] for r in runs],
            "epochs_trained": statistics.median(r["epochs"][-1] for r in runs),
            "best_val_accuracy": statistics.median(r["best"][-1] for r in runs),
            "test_accuracy_of_pick": statistics.median(r["test_accuracy"] for r in runs),
            "median_curve": {"epochs": grid, "best_val_accuracy": medians},
        }
    if YARDSTICK in out:
        target = out[YARDSTICK]["best_val_accuracy"]
        for summary in out.values():
            curve_ = summary["median_curve"]
            reached = [e for e, v in zip(curve_["epochs"], curve_["best_val_accuracy"], strict=True)
                       if v is not None and v >= target]  # fmt: skip
            summary["epochs_to_reach_yardstick"] = reached[0] if reached else None
        out["yardstick"] = {"config": YARDSTICK, "best_val_accuracy": target,
                            "epochs": out[YARDSTICK]["epochs_trained"]}  # fmt: skip
    return out


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    for config in CONFIGS:
        if config in summary:
            c = summary[config]["median_curve"]
            axes.plot(c["epochs"], c["best_val_accuracy"], label=config, drawstyle="steps-post")
    if "yardstick" in summary:
        axes.axhline(summary["yardstick"]["best_val_accuracy"], color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("epochs trained by the study (pruned trials included)")
    axes.set_ylabel("best validation accuracy so far, % (median over seeds)")
    axes.set_title("kdsearch optimize --method auto, 10,000 images, 5 epochs")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--limit-train", type=int, default=10_000)
    parser.add_argument("--val-size", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=2, help="studies run at once (threads split between them)")
    parser.add_argument("--threads", type=int, default=None, help="threads per study [default: cores / parallel]")
    parser.add_argument("--storage", default=STORAGE)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    parser.add_argument("--trials-scale", type=float, default=1.0, help="scale every configuration's trials")
    args = parser.parse_args()
    for name, (sampler, pruner, trials) in CONFIGS.items():
        CONFIGS[name] = (sampler, pruner, max(1, round(trials * args.trials_scale)))
    rows = json.loads(args.results.read_text())["rows"] if args.results.exists() else []
    done = {(r["config"], r["seed"]) for r in rows}
    todo = [(c, s) for s in range(1, args.seeds + 1) for c in args.configs.split(",") if (c, s) not in done]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    while todo:
        batch, todo = todo[: args.parallel], todo[args.parallel :]
        running = [(config, seed, start_study(config, seed, args, threads)) for config, seed in batch]
        for config, seed, process in running:
            process.wait().check()
            epochs, best, pick = curve(study_name(config, seed), args.storage)
            rows.append({"config": config, "sampler": CONFIGS[config][0], "pruner": CONFIGS[config][1],
                         "seed": seed, "trials": len(epochs), "epochs": epochs, "best": best,
                         "pick_trial": pick.number, "pick_params": pick.params,
                         "test_accuracy": test_accuracy(study_name(config, seed), args)})  # fmt: skip
            write(args.results, rows)
    summary = summarise(rows)
    write(args.results, rows, summary)
    plot(summary, args.plot)
    for config in CONFIGS:
        if config in summary:
            s = summary[config]
            print(f"{config:12s} epochs {s['epochs_trained']:>5} best val {s['best_val_accuracy']:.2f} "
                  f"test of pick {s['test_accuracy_of_pick']:.2f} "
                  f"epochs to reach {YARDSTICK}'s best: {s.get('epochs_to_reach_yardstick')}")  # fmt: skip
    return 0


def write(path: Path, rows: list[dict[str, Any]], summary: dict[str, Any] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
