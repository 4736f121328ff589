"""Accuracy against size on the shared CIFAR-10 copy: a multi-objective study and its Pareto front.

Runs `kdsearch optimize --objectives accuracy,params` (kd by default: 30 trials x 10 epochs, width
searched in [0.25, 2], no pruning, seed 42, 5,000 validation images; its first trial is the
tutorial's kd recipe on the tutorial's LightNN, width 1), exports every Pareto-optimal trial with
its checkpoint, evaluates each checkpoint on the test split, and trains the tutorial's CE-only
LightNN on the same train/val split as the yardstick. Prints a Markdown table, writes
bench/results/pareto.json and a plot (bench/results/pareto.png unless --png says otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import cli_runner
import yaml
from cli_runner import kdsearch
from tutorial import RESULTS

LIGHTNN_PARAMS = 267_738


def plot(path: Path, trials: list[dict], front: list[dict], ce: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([t["params"] for t in trials], [t["val"] for t in trials], c="0.7", s=18, label="trials")
    front = sorted(front, key=lambda r: r["params"])
    ax.plot(
        [r["params"] for r in front], [r["val_accuracy"] for r in front], "o-", c="tab:blue", label="Pareto front (kd)"
    )
    label = "tutorial LightNN, CE only"
    ax.scatter([ce["params"]], [ce["val_accuracy"]], marker="*", s=220, c="tab:red", zorder=5, label=label)
    baseline = [t for t in trials if t["baseline"]]
    ax.scatter(
        [t["params"] for t in baseline],
        [t["val"] for t in baseline],
        marker="D",
        s=60,
        facecolors="none",
        edgecolors="tab:green",
        zorder=6,
        label="tutorial LightNN, tutorial kd (trial 0)",
    )
    ax.axvline(LIGHTNN_PARAMS, c="tab:red", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("student parameters")
    ax.set_ylabel("validation accuracy %")
    ax.set_title("kdsearch optimize --objectives accuracy,params (shared CIFAR-10 JPEG copy)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args() -> argparse.Namespace:
    """The command line: the study's size and name, the data and where the plot goes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="../shared/datasets/cifar10-jpeg")
    parser.add_argument("--method", default="kd")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n-jobs", type=int, default=1)
    parser.add_argument("--val-size", default="5000")
    parser.add_argument("--study-name", default="bench-pareto")
    parser.add_argument("--png", type=Path, default=RESULTS / "pareto.png")
    return parser.parse_args()


def run_study(args: argparse.Namespace, data: list[str]) -> tuple[str, float]:
    """The two-objective `kdsearch optimize`, as a user types it; returns the command shown and its wall seconds."""
    start = time.perf_counter()
    _, command = kdsearch(
        "optimize", "--method", args.method, *data, "--objectives", "accuracy,params", "--trials", str(args.trials),
        "--epochs", str(args.epochs), "--n-jobs", str(args.n_jobs), "--study-name", args.study_name, "-q",
    )  # fmt: skip
    return command, time.perf_counter() - start


def evaluate_front(study_name: str, data: list[str]) -> list[dict[str, Any]]:
    """The Pareto-optimal trials, exported with their checkpoints, each scored on the test split.

    The study only knows validation accuracy; the test split says whether the front holds up.
    """
    exported, checkpoints = RESULTS / f"{study_name}.yaml", RESULTS / study_name
    export = ["export", "--study-name", study_name, "--pareto", "-o", str(exported)]
    export += ["--checkpoint", str(checkpoints)]
    cli_runner.run(cli_runner.kdsearch_command(export, as_json=False)).check()  # export writes YAML, not JSON
    front = []
    for config in yaml.safe_load(exported.read_text())["configs"]:
        trial = config["source"]["trial"]
        scored, _ = kdsearch("evaluate", "--checkpoint", str(checkpoints / f"trial-{trial}.pt"), *data)
        front.append(
            {
                "trial": trial,
                "width": config["models"]["width"],
                "params": int(config["source"]["objectives"]["params"]),
                "val_accuracy": config["source"]["val_accuracy"],
                "test_accuracy": scored["test_accuracy"],
                "hyperparameters": {**config["recipe"], **config["loss"]["params"]},
            }
        )
    return front


def study_trials(study_name: str) -> list[dict[str, Any]]:
    """Every finished trial's size and validation accuracy, for the plot's grey cloud behind the front."""
    import optuna

    from kdsearch.storage import default_storage_url

    study = optuna.load_study(study_name=study_name, storage=default_storage_url())
    return [
        {"params": t.values[1], "val": t.values[0], "baseline": "baseline" in t.user_attrs}
        for t in study.get_trials(deepcopy=False)
        if t.values
    ]


def summarize(
    command: str, wall: float, trials: list[dict[str, Any]], front: list[dict[str, Any]], ce: dict[str, Any]
) -> dict[str, Any]:
    """pareto.json: the front by size, the CE yardstick, and which front trials beat it while smaller than LightNN."""
    yardstick = {"params": ce["params"], "val_accuracy": ce["val_accuracy"], "test_accuracy": ce["test_accuracy"]}
    smaller = [r for r in front if r["params"] < LIGHTNN_PARAMS and r["test_accuracy"] >= ce["test_accuracy"]]
    return {
        "command": command,
        "wall_seconds": round(wall, 1),
        "trials": len(trials),
        "front": sorted(front, key=lambda r: r["params"]),
        "ce_lightnn": yardstick,
        "smaller_and_at_least_as_accurate": [r["trial"] for r in smaller],
    }


def print_table(result: dict[str, Any], wall: float, png: Path) -> None:
    """The Markdown table of the front, the CE-only LightNN as its last row."""
    print("| trial | width | params | val % | test % |")
    print("|---|---|---|---|---|")
    for r in result["front"]:
        mark = " (smaller than LightNN, >= CE test)" if r["trial"] in result["smaller_and_at_least_as_accurate"] else ""
        print(
            f"| {r['trial']} | {r['width']:.2f} | {r['params']:,} | {r['val_accuracy']:.2f} | "
            f"{r['test_accuracy']:.2f}{mark} |"
        )
    ce = result["ce_lightnn"]
    print(f"| CE-only LightNN | 1.00 | {ce['params']:,} | {ce['val_accuracy']:.2f} | {ce['test_accuracy']:.2f} |")
    print(f"{result['trials']} trials in {wall / 60:.0f} min; plot: {png}")


def main() -> int:
    """The study, its front on the test split, the CE yardstick; then the plot, the JSON and the table."""
    args = parse_args()
    data = ["--dataset", "imagefolder", "--data-dir", args.data_dir, "--val-size", args.val_size]
    RESULTS.mkdir(exist_ok=True)
    command, wall = run_study(args, data)
    front = evaluate_front(args.study_name, data)
    ce, _ = kdsearch("train", "--method", "ce", *data, "-q")
    trials = study_trials(args.study_name)
    plot(args.png, trials, front, ce)
    result = summarize(command, wall, trials, front, ce)
    (RESULTS / "pareto.json").write_text(json.dumps(result, indent=2))
    print_table(result, wall, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
