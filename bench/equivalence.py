"""Short runs of every method and augmentation, digested, to show a refactor changes no number.

Each run trains a LightNN for 2 epochs on 3,000 CIFAR-10 images (500 held out), with the committed
strong teacher, and records its per-epoch loss and validation accuracy, a SHA-256 of the trained
weights and the dataset fingerprint. Run it on two checkouts of kdsearch (each with its own
``KDSEARCH_HOME``: cache formats may differ) on the same machine, and compare the files: equal digests
mean bit-for-bit equal training, a far stronger check than the five accuracies of `make bench-tutorial`.
A file from another machine is no reference: the CPU's instruction set picks other kernels (AVX2 against
AVX-512), whose rounding differs in the last bits.

    PYTHONPATH=OLD_CHECKOUT python bench/equivalence.py --out before.json
    PYTHONPATH=NEW_CHECKOUT python bench/equivalence.py --out after.json --compare before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
TEACHER = BENCH / "teachers" / "deepnn-cifar10-jpeg-strong-val5000.pt"
# (method, values): the recipe knobs and each method's own parameters, every augmentation among them.
RUNS: list[tuple[str, dict[str, Any]]] = [
    ("ce", {"augment": "none"}),
    ("ce", {"augment": "flip", "label_smoothing": 0.1, "lr_schedule": "cosine", "optimizer": "adamw",
            "weight_decay": 0.01}),
    ("kd", {"augment": "flip", "temperature": 4.0, "soft_target_weight": 0.5}),
    ("kd", {"augment": "shift"}),
    ("dkd", {"augment": "shift"}),
    ("dkd", {"augment": "none", "optimizer": "sgd", "lr": 0.01}),
    ("cosine", {"augment": "flip", "reduce": "max"}),
    ("regressor", {"augment": "flip", "depth": 2, "distance": "smooth_l1"}),
    ("hybrid", {"augment": "flip", "kd_weight": 1.0, "cosine_weight": 0.5, "regressor_weight": 0.7}),
    ("hybrid", {"augment": "none"}),
]  # fmt: skip


def digest_run(method: str, values: dict[str, Any], data_dir: str) -> dict[str, Any]:
    import torch

    from kdsearch.config import RunConfig
    from kdsearch.distill import prepare, train_student

    base = RunConfig.from_flat(
        {"method": method, "dataset": "imagefolder", "data_dir": data_dir, "teacher": str(TEACHER),
         "val_size": 500, "limit_train": 3000, "epochs": 2, "device": "cpu"},
        origin="bench/equivalence.py",
    )  # fmt: skip
    config = base.with_values(values)
    views = ("none", "flip", "shift") if method in ("ce", "kd", "dkd") else ("none", "flip")
    prepared = prepare(config, augmentations=views)
    result = train_student(prepared, config)
    weights = hashlib.sha256()
    for tensor in result.model.state_dict().values():
        weights.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return {
        "train_loss": [r.train_loss for r in result.epochs],
        "val_accuracy": [r.val_accuracy for r in result.epochs],
        "weights_sha256": weights.hexdigest(),
        "data_fingerprint": prepared.splits.fingerprint,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/datasets/cifar10-jpeg")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, help="Another run's file: exit 1 unless every run is equal.")
    args = parser.parse_args()
    rows = {}
    for method, values in RUNS:
        key = f"{method} {json.dumps(values, sort_keys=True)}"
        rows[key] = digest_run(method, values, args.data_dir)
        print(key, rows[key]["val_accuracy"], rows[key]["weights_sha256"][:16], file=sys.stderr, flush=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    if args.compare is None:
        return 0
    other = json.loads(args.compare.read_text())
    differ = [key for key in rows if other.get(key) != rows[key]]
    print(f"{len(rows) - len(differ)} of {len(rows)} runs bit for bit equal to {args.compare}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
