# `make run` and `make test` set everything up on a fresh machine (creating .venv when missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup chromium run serve test lint bench soak

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(MAKE) --no-print-directory chromium
	touch $(STAMP)

# The dashboard's browser test drives Debian's chromium (never a downloaded browser). Installed when
# missing and we are root; without it that one test is skipped, so a failed install does not fail setup.
chromium:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		(export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq chromium >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)) || \
		echo "chromium could not be installed: the dashboard's browser test will be skipped"

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/conveyor serve

generate: $(STAMP)
	$(BIN)/conveyor generate "The capital of France is" --max-tokens 32

test: $(STAMP)
	$(BIN)/ruff check conveyor tests
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -x --durations=15 tests

lint: $(STAMP)
	$(BIN)/ruff check conveyor tests
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/conveyor bench throughput

# Mixed traffic with random disconnects for SOAK_MINUTES against the default model (docs/reliability.md).
SOAK_MINUTES ?= 10
soak: $(STAMP)
	$(BIN)/python -m tests.soak --minutes $(SOAK_MINUTES)
