"""The tutorial's five runs on the shared CIFAR-10 JPEG copy, through the real CLI.

Runs `kdsearch teacher` (skipped when the dataset's default teacher already exists, unless
--retrain-teacher) and `kdsearch train --method M --val-size 0` for ce, kd, cosine and regressor with
the tutorial's hyperparameters, then prints each test accuracy beside the reference run of the
tutorial's own recipe on the same JPEG copy, and writes bench/results/tutorial.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from cli_runner import kdsearch

# The tutorial's own recipe on this JPEG copy (seed 42, one run each), from the project brief.
REFERENCE = {"teacher": 72.96, "ce": 69.24, "kd": 69.74, "cosine": 69.06, "regressor": 70.56}
TOLERANCE = 1.0
RESULTS = Path(__file__).resolve().parent / "results"


def default_teacher(data: list[str]) -> Path:
    from kdsearch.config import RecipeConfig
    from kdsearch.data import load_splits
    from kdsearch.paths import cache_dir
    from kdsearch.teacher import TUTORIAL_TEACHER, default_teacher_path

    splits = load_splits("imagefolder", data[3], val_size=0, cache_dir=cache_dir())
    return default_teacher_path(splits, TUTORIAL_TEACHER, RecipeConfig())


def parse_args() -> argparse.Namespace:
    """The command line: where the JPEG copy is, the device, and whether to train the teacher again."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="../shared/datasets/cifar10-jpeg")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--retrain-teacher", action="store_true")
    return parser.parse_args()


def teacher_row(data: list[str], retrain: bool) -> dict[str, Any]:
    """The teacher's row: trained by `kdsearch teacher`, or read from the default checkpoint if one exists.

    Training the teacher is the slowest of the five runs, so an existing one is reused (its own
    metadata gives the accuracy and time) unless ``retrain`` asks for a fresh one.
    """
    teacher_path = default_teacher(data)
    if retrain or not teacher_path.exists():
        start = time.perf_counter()
        result, shown = kdsearch("teacher", *data, "--preset", "tutorial")
        return {
            "run": "teacher",
            "command": shown,
            "test_accuracy": result["test_accuracy"],
            "seconds": time.perf_counter() - start,
        }
    from kdsearch.checkpoints import load_checkpoint

    meta = load_checkpoint(teacher_path).metadata
    return {
        "run": "teacher",
        "command": f"kdsearch teacher {' '.join(data)}  (reused {teacher_path})",
        "test_accuracy": meta["test_accuracy"],
        "seconds": sum(meta["epoch_seconds"]),
    }


def student_row(data: list[str], method: str) -> dict[str, Any]:
    """One student run, `kdsearch train --val-size 0` as the tutorial trains on all 50,000 images."""
    start = time.perf_counter()
    result, shown = kdsearch(
        "train", "--method", method, *data, "--teacher-preset", "tutorial", "--val-size", "0", "-q"
    )
    return {
        "run": method,
        "command": shown,
        "test_accuracy": result["test_accuracy"],
        "seconds": time.perf_counter() - start,
        "epoch_seconds": result["epoch_seconds"],
        "teacher_outputs_seconds": result["teacher_outputs_seconds"],
    }


def compare_and_print(rows: list[dict[str, Any]]) -> bool:
    """Adds each row's reference, delta and verdict (they go into the JSON too), printing the table as it goes.

    Returns whether every run lands within TOLERANCE of the tutorial's own recipe.
    """
    ok = True
    print(f"{'run':<10} {'kdsearch':>9} {'reference':>9} {'delta':>7}  seconds")
    for row in rows:
        row["reference"] = REFERENCE[row["run"]]
        row["delta"] = row["test_accuracy"] - row["reference"]
        row["within_tolerance"] = abs(row["delta"]) <= TOLERANCE
        ok &= row["within_tolerance"]
        print(
            f"{row['run']:<10} {row['test_accuracy']:>9.2f} {row['reference']:>9.2f} {row['delta']:>+7.2f}  "
            f"{row['seconds']:.0f}"
        )
    return ok


def main() -> int:
    """The teacher, then the four students; exit status 1 when any run misses its reference."""
    args = parse_args()
    data = ["--dataset", "imagefolder", "--data-dir", args.data_dir, "--device", args.device]
    rows = [teacher_row(data, args.retrain_teacher)]
    rows += [student_row(data, method) for method in ("ce", "kd", "cosine", "regressor")]
    ok = compare_and_print(rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tutorial.json").write_text(json.dumps(rows, indent=2))
    print(f"all within ±{TOLERANCE} point of the reference: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
