"""One seeded study per strategy on the shared CIFAR-10 copy, then searched vs hand-set test accuracy.

For each method: `kdsearch optimize` (default 30 trials x 10 epochs, median pruning, seed 42, 5,000
validation images), `kdsearch export` of the best trial, `kdsearch train --config` on the whole train
split for its test accuracy, beside `kdsearch train --method M --val-size 0` with the tutorial's
hand-set hyperparameters (read from bench/results/tutorial.json when that run exists). Prints a
Markdown table and writes bench/results/studies.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from tutorial import RESULTS, kdsearch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="../shared/datasets/cifar10-jpeg")
    parser.add_argument("--methods", default="ce,kd,cosine,regressor")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prefix", default="bench")
    parser.add_argument("--n-jobs", type=int, default=1, help="Worker processes per study.")
    args = parser.parse_args()
    data = ["--dataset", "imagefolder", "--data-dir", args.data_dir, "--device", args.device]
    hand_set = {}
    tutorial_json = RESULTS / "tutorial.json"
    if tutorial_json.exists():
        hand_set = {row["run"]: row["test_accuracy"] for row in json.loads(tutorial_json.read_text())}
    out_path = RESULTS / "studies.json"
    rows = json.loads(out_path.read_text()) if out_path.exists() else []
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
            "--json",
            "-q",
        )
        wall = time.perf_counter() - start
        config = RESULTS / f"{name}.yaml"
        print(f"$ kdsearch export --study-name {name} -o {config}", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "kdsearch", "export", "--study-name", name, "-o", str(config)], check=True
        )
        searched, _ = kdsearch("train", "--config", str(config), "--device", args.device, "--json", "-q")
        if method == "hybrid" and "ce" in hand_set:
            hand_set[method] = hand_set["ce"]  # hybrid's hand-set values are CE alone, bit for bit (a test)
        if method not in hand_set:
            hand, _ = kdsearch("train", "--method", method, *data, "--val-size", "0", "--json", "-q")
            hand_set[method] = hand["test_accuracy"]
        row = {
            "method": method,
            "study": name,
            "trials": summary["complete"] + summary["pruned"] + summary["failed"],
            "pruned": summary["pruned"],
            "n_jobs": args.n_jobs,
            "best_val_accuracy": summary["best_value"],
            "searched_test_accuracy": searched["test_accuracy"],
            "hand_set_test_accuracy": hand_set[method],
            "wall_seconds": round(wall, 1),
            "best_params": summary["best_params"],
            "command": optimize_cmd,
        }
        rows = [r for r in rows if r["method"] != method] + [row]
        RESULTS.mkdir(exist_ok=True)
        out_path.write_text(json.dumps(rows, indent=2))
        print(json.dumps(row), flush=True)
    print("| method | trials | pruned | best val % | searched test % | hand-set test % | wall |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['trials']} | {r['pruned']} | {r['best_val_accuracy']:.2f} | "
            f"{r['searched_test_accuracy']:.2f} | {r['hand_set_test_accuracy']:.2f} | "
            f"{r['wall_seconds'] / 60:.0f} min |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
