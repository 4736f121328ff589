# kdsearch: `make setup` then `make test` is the whole set-up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED_CIFAR ?= ../shared/datasets/cifar10-jpeg
# The GPU machine has its own torch and no .venv: bench-gpu runs with whichever python has torch there.
PYTHON_FOR_GPU ?= $(shell [ -x $(BIN)/python ] && echo $(BIN)/python || echo python3)

.PHONY: setup test test-fast lint bench bench-tutorial bench-studies bench-speed bench-pareto bench-efficiency bench-auto bench-flagship bench-scale bench-gpu bench-gpu-prepare soak clean

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,postgres,mysql,timm]'

# Every test; `make test-fast` is the inner loop: all but the end-to-end ones (real trainings, child
# processes, servers), which are marked slow. One pytest-xdist worker per core, one torch thread each
# (tests/conftest.py): the end-to-end tests mostly wait on child processes, so two workers on two
# cores keep both busy.
test:
	$(BIN)/python -m pytest -q -n auto tests

test-fast:
	$(BIN)/python -m pytest -q -n auto -m 'not slow' tests

lint:
	$(BIN)/ruff check kdsearch tests bench

# Speed and accuracy targets live here, never in timed tests. The first run trains the teacher (~35 min).
bench: bench-tutorial bench-speed bench-studies bench-pareto bench-efficiency bench-auto

bench-tutorial:
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python bench/tutorial.py --data-dir $(SHARED_CIFAR)

# Tutorial loop vs kdsearch loop, distillation overhead, 1 vs 2 workers, storage share, bf16, and a
# 50-trial 10-epoch study from the command line (about 30 min on 2 CPU cores; needs a teacher).
bench-speed:
	$(BIN)/python bench/speed.py --data-dir $(SHARED_CIFAR)

# One 30-trial, 10-epoch study per method (ce first: the control), each confirmed with `kdsearch confirm
# --top 3 --seeds 5` against the hand-set config and the CE study; resumable, rows in bench/results/studies.json.
bench-studies:
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python bench/studies.py --data-dir $(SHARED_CIFAR) --methods ce,kd,dkd,cosine,regressor,hybrid --n-jobs 2 \
		--teacher bench/teachers/deepnn-cifar10-jpeg-strong-val5000.pt

# Which sampler and pruner: --method auto studies at reduced fidelity (10,000 images, 5 epochs), 3 sampler
# seeds each for the default (TPE + ASHA), TPE + median, TPE unpruned and random unpruned; resumable,
# rows in bench/results/efficiency.json, plot in docs/efficiency.png.
bench-efficiency:
	cd bench && ../$(BIN)/python efficiency.py --data-dir ../$(SHARED_CIFAR)

# One study across every method and its racing confirm, beside the six per-method studies of
# bench-studies (same storage, teacher and split); resumable, rows in bench/results/auto.json.
bench-auto:
	cd bench && ../$(BIN)/python auto.py --data-dir ../$(SHARED_CIFAR) --n-jobs 2

# The flagship study's cost: `optimize --method cosine --trials 50` (default pruner, --n-jobs 2) start to exit,
# in CE epochs of the same machine; the same study unpruned, and each one's pick re-trained with 3 seeds to
# show what pruning lost; resumable, rows in bench/results/flagship.json.
bench-flagship:
	cd bench && ../$(BIN)/python flagship.py --data-dir ../$(SHARED_CIFAR)

# Images larger than memory as float32: a 224 px copy of the train split (7.5 GB as uint8) decoded, its
# teacher logits cached and one kd epoch trained, peak anonymous memory polled; rows in bench/results/scale.json.
bench-scale:
	cd bench && ../$(BIN)/python scale.py --data-dir ../$(SHARED_CIFAR)

# Accuracy against size: a 30-trial multi-objective kd study, its Pareto front tested and plotted.
bench-pareto:
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python bench/pareto.py --data-dir $(SHARED_CIFAR) --n-jobs 2

# The GPU checks (tests on CUDA, CPU vs GPU accuracy, fp32/bf16/fp16 epochs, 1 vs 4 workers on one GPU,
# a GPU checkpoint on the CPU) in one run of at most 8 minutes; without a GPU it says so and exits 0.
# The GPU machine reaches no registry: `make bench-gpu-prepare` (here) has pip resolve and download the
# wheels it lacks, and copies a CIFAR-10 slice, into bench/gpu-bundle/, which travels with the run.
bench-gpu:
	$(PYTHON_FOR_GPU) bench/gpu.py

bench-gpu-prepare:
	$(BIN)/python bench/gpu_bundle.py --data-dir $(SHARED_CIFAR)

# Fault soak on the PostgreSQL server at 127.0.0.1:5432 (KDSEARCH_SOAK_STORAGE to use another).
soak:
	$(BIN)/python bench/soak.py --data-dir $(SHARED_CIFAR)

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
