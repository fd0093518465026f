# The two commands of the README. Both set up .venv first (idempotent, quick once done).
VENV ?= .venv
PY := $(VENV)/bin/python
# Flower's SuperLink/SuperNode start flwr-serverapp / flwr-clientapp by name: the venv's must come first.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup simulate test test-fast bench clean

setup:
	@bash scripts/setup.sh

simulate: setup
	$(VENV)/bin/privatune simulate --overwrite  # a demo: replaces the previous runs/latest

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf runs .pytest_cache
