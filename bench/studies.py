"""One seeded study per strategy on the shared CIFAR-10 copy, then searched vs hand-set test accuracy.

For each method: `kdsearch optimize` (default 30 trials x 10 epochs, median pruning, seed 42, 5,000
validation images, the default search teacher, which never saw those 5,000 images), `kdsearch
export` of the best trial, and `kdsearch train --config` on the whole train split for its test
accuracy, beside `kdsearch train --method M --val-size 0` with the tutorial's hand-set
hyperparameters and the same teacher. Both are re-trained with several seeds (--test-seeds), since
one 10-epoch run moves by about half a point from seed to seed; the table gives the medians and
every run is in bench/results/studies.json. A third column re-trains the hand-set values with the
searched recipe switches (schedule, augmentation) only, to show how much of the gain they carry.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import yaml
from tutorial import RESULTS, kdsearch

RECIPE_SWITCHES = ("lr_schedule", "augment")


def test_accuracies(args: list[str], seeds: list[int]) -> list[float]:
    """Test accuracy of `kdsearch train ARGS` for each seed."""
    return [kdsearch("train", *args, "--seed", str(seed), "--json", "-q")[0]["test_accuracy"] for seed in seeds]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="../shared/datasets/cifar10-jpeg")
    parser.add_argument("--methods", default="ce,kd,cosine,regressor")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prefix", default="bench")
    parser.add_argument("--n-jobs", type=int, default=1, help="Worker processes per study.")
    parser.add_argument("--test-seeds", default="42,43,44", help="Seeds of the test re-trains (comma-separated).")
    parser.add_argument(
        "--no-recipe-column",
        action="store_true",
        help="Skip re-training the hand-set values with the searched schedule and augmentation.",
    )
    args = parser.parse_args()
    seeds = [int(s) for s in args.test_seeds.split(",")]
    data = ["--dataset", "imagefolder", "--data-dir", args.data_dir, "--device", args.device]
    out_path = RESULTS / "studies.json"
    rows = json.loads(out_path.read_text()) if out_path.exists() else []
    hand_set_runs: dict[str, list[float]] = {}
    for method in args.methods.split(","):
        name = f"{args.prefix}-{method}"
        start = time.perf_counter()
        summary, optimize_cmd = kdsearch(
            "optimize",
            "--method",
            method,
            *data,
            "--trials",
            str(args.trials),
            "--epochs",
            str(args.epochs),
            "--study-name",
            name,
            "--n-jobs",
            str(args.n_jobs),
            "--sampler-seed",
            "42",
            "--json",
            "-q",
        )
        wall = time.perf_counter() - start
        config_path = RESULTS / f"{name}.yaml"
        print(f"$ kdsearch export --study-name {name} -o {config_path}", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "kdsearch", "export", "--study-name", name, "-o", str(config_path)], check=True
        )
        config: dict[str, Any] = yaml.safe_load(config_path.read_text())
        teacher = ["--teacher", config["models"]["teacher"]] if config["models"].get("teacher") else []
        searched = test_accuracies(["--config", str(config_path), "--device", args.device], seeds)
        hand = ["--method", method, *data, "--val-size", "0", "--epochs", str(args.epochs), *teacher]
        if method == "hybrid" and "ce" in hand_set_runs:
            hand_set_runs[method] = hand_set_runs["ce"]  # hybrid's hand-set values are CE alone, bit for bit (a test)
        if method not in hand_set_runs:
            hand_set_runs[method] = test_accuracies(hand, seeds)
        switches = [f"{k}={config['recipe'][k]}" for k in RECIPE_SWITCHES]
        tutorial_recipe = all(config["recipe"][k] in ("constant", "none") for k in RECIPE_SWITCHES)
        recipe_only: list[float] = []
        if tutorial_recipe:
            recipe_only = hand_set_runs[method]
        elif not args.no_recipe_column:
            recipe_only = test_accuracies([*hand, *[a for s in switches for a in ("--hp", s)]], seeds)
        row = {
            "method": method,
            "study": name,
            "trials": summary["complete"] + summary["pruned"] + summary["failed"],
            "pruned": summary["pruned"],
            "n_jobs": args.n_jobs,
            "best_val_accuracy": summary["best_value"],
            "test_seeds": seeds,
            "searched_test_runs": searched,
            "hand_set_test_runs": hand_set_runs[method],
            "hand_set_with_searched_recipe": switches,
            "hand_set_with_searched_recipe_test_runs": recipe_only,
            "searched_test_accuracy": statistics.median(searched),
            "hand_set_test_accuracy": statistics.median(hand_set_runs[method]),
            "hand_set_with_searched_recipe_test_accuracy": statistics.median(recipe_only) if recipe_only else None,
            "teacher": config["models"].get("teacher"),
            "wall_seconds": round(wall, 1),
            "best_params": summary["best_params"],
            "command": optimize_cmd,
        }
        rows = [r for r in rows if r["method"] != method] + [row]
        RESULTS.mkdir(exist_ok=True)
        out_path.write_text(json.dumps(rows, indent=2))
        print(json.dumps(row), flush=True)
    print(
        "| method | trials | pruned | best val % | searched test % | hand-set test % "
        "| hand-set + searched recipe % | wall |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['trials']} | {r['pruned']} | {r['best_val_accuracy']:.2f} | "
            f"{r['searched_test_accuracy']:.2f} | {r['hand_set_test_accuracy']:.2f} | "
            f"{r.get('hand_set_with_searched_recipe_test_accuracy') or float('nan'):.2f} | "
            f"{r['wall_seconds'] / 60:.0f} min |"
        )
    print(f"(test accuracies: medians of re-trains with seeds {args.test_seeds}; runs in {out_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
