# The README's commands: simulate and test (what a user runs), lint (what CI runs first). Each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# Flower's SuperLink/SuperNode start flwr-serverapp / flwr-clientapp by name: the venv's must come first.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup simulate test test-fast lint clean

setup:
	@bash scripts/setup.sh

simulate: setup
	$(VENV)/bin/privatune simulate --overwrite  # a demo: replaces the previous runs/latest

test: setup
	$(PY) -m pytest -q --durations=25  # the slowest tests, so the suite's time can be watched

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# ruff (lint, then format) and mypy, configured in pyproject.toml; .pre-commit-config.yaml runs the same three.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf runs .pytest_cache
