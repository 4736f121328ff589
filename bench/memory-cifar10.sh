#!/bin/bash
# Peak memory of one kd epoch on CIFAR-10 for two checkouts of kdsearch (say the float32 data path of 2b0bfda
# and a later one), each first with empty caches (decode and teacher outputs built), then with them warm.
#   bash bench/memory-cifar10.sh OLD_CHECKOUT OLD_LABEL NEW_CHECKOUT NEW_LABEL   (rows in bench/results/memory.json)
set -euo pipefail
BENCH="$(cd "$(dirname "$0")" && pwd)"
DATA="${SHARED_CIFAR:-$BENCH/../../shared/datasets/cifar10-jpeg}"
ARGS=(train --method kd --dataset imagefolder --data-dir "$DATA" --epochs 1 --device cpu -q
      --teacher "$BENCH/teachers/deepnn-cifar10-jpeg-strong-val5000.pt")
HOMES="$(mktemp -d)"
for run in cold warm; do
  for side in old new; do
    if [ "$side" = old ]; then tree="$1"; label="$2"; else tree="$3"; label="$4"; fi
    (cd "$tree" && KDSEARCH_HOME="$HOMES/$side" PYTHONPATH="$tree" python "$BENCH/memory.py" \
      --label "kd, 1 epoch, $label, caches $run" -- kdsearch "${ARGS[@]}")
  done
done
