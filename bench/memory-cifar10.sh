#!/bin/bash
# Peak memory of one kd epoch on CIFAR-10: the old data path (float32 splits in RAM) and the new (uint8, mapped),
# each first with empty caches (decode and teacher outputs built) and then with the caches warm.
set -e
ARGS="train --method kd --dataset imagefolder --data-dir ../shared/datasets/cifar10-jpeg --epochs 1 --teacher bench/teachers/deepnn-cifar10-jpeg-strong-val5000.pt --device cpu -q"
for run in "cold" "warm"; do
  cd /work/before && KDSEARCH_HOME=/work/mem-home-before PYTHONPATH=/work/before /work/main/.venv/bin/python /work/main/bench/memory.py --label "kd, 1 epoch, float32 splits (2b0bfda), caches $run" -- kdsearch $ARGS
  cd /work/after && KDSEARCH_HOME=/work/mem-home-after PYTHONPATH=/work/after /work/main/.venv/bin/python /work/main/bench/memory.py --label "kd, 1 epoch, uint8 memory-mapped (7eb9b35), caches $run" -- kdsearch $ARGS
done
