"""Does normalising each batch (uint8 data) slow a CIFAR-10 epoch? Two checkouts side by side.

    python bench/normalise.py --old-checkout /tmp/kdsearch-2b0bfda --data-dir ../shared/datasets/cifar10-jpeg

Runs `kdsearch train --method ce --epochs 3` (45,000 training images, one thread) from the old checkout
(float32 splits normalised once, in RAM) and this one (uint8 splits memory-mapped, normalised per batch),
alternating, ``--pairs`` times, each with warm caches; an epoch's time is the loop's own (validation
included), the first epoch of each run left out as warm-up. The ratio of the medians is the cost. Run
it on an idle machine: another job on the cores moves epoch times by far more than 5 %. Rows in
bench/results/normalise.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "normalise.json"


def epoch_seconds(checkout: Path, home: Path, data_dir: str, epochs: int) -> list[float]:
    env = os.environ | {"PYTHONPATH": str(checkout), "KDSEARCH_HOME": str(home), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "kdsearch", "train", "--method", "ce", "--dataset", "imagefolder",
               "--data-dir", data_dir, "--epochs", str(epochs), "--device", "cpu", "--json", "-q"]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=checkout, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return [float(s) for s in result["epoch_seconds"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-checkout", type=Path, required=True, help="a checkout of the float32 data path")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    data_dir = str(Path(args.data_dir).resolve())
    sides = {"old": args.old_checkout.resolve(), "new": BENCH.parent}
    homes = {side: Path(tempfile.mkdtemp(prefix=f"kdsearch-normalise-{side}-")) for side in sides}
    for side, checkout in sides.items():  # caches built, not timed
        epoch_seconds(checkout, homes[side], data_dir, 1)
    times: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(args.pairs):
        for side, checkout in sides.items():
            times[side] += epoch_seconds(checkout, homes[side], data_dir, args.epochs)[1:]
    medians = {side: statistics.median(values) for side, values in times.items()}
    row = {
        "old_checkout": str(sides["old"]),
        "epoch_seconds": times,
        "median_seconds": medians,
        "new_over_old": medians["new"] / medians["old"],
    }
    RESULTS.write_text(json.dumps(row, indent=1) + "\n")
    print(json.dumps({"median_seconds": medians, "new_over_old": round(row["new_over_old"], 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
