# kdsearch: `make setup` then `make test` is the whole set-up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED_CIFAR ?= ../shared/datasets/cifar10-jpeg

.PHONY: setup test lint bench tutorial clean

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,postgres]'

test:
	$(BIN)/python -m pytest -q tests

lint:
	$(BIN)/ruff check kdsearch tests bench

# Speed and accuracy targets live here, never in timed tests.
bench:
	$(BIN)/python bench/tutorial.py --data-dir $(SHARED_CIFAR)

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
