"""Decoding the shared CIFAR-10 JPEG copy: the first load (decode + write the cache) and the second
(from the decoded cache), each into normalised train/validation/test tensors. Uses a fresh cache
folder, so the first load really decodes."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="../shared/datasets/cifar10-jpeg")
    args = parser.parse_args()
    from kdsearch.data import load_splits

    cache = tempfile.mkdtemp(prefix="kdsearch-decode-")
    for label in ("first load (decode)", "second load (cache)"):
        start = time.perf_counter()
        splits = load_splits("imagefolder", args.data_dir, val_size=5000, cache_dir=cache)
        print(
            f"{label:<22} {time.perf_counter() - start:6.2f} s  "
            f"train {len(splits.train)}, val {len(splits.val or [])}, test {len(splits.test)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
