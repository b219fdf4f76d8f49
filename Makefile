# One task runner for people and CI: `make dev`, `make test`, `make bench`.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install dev test unit lint fmt bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

## Run the daemon on its embedded default: local broker + Postgres + example pipelines.
dev: $(STAMP)
	$(VENV)/bin/orchestrator dev $(ARGS)

## Lint, type-check and run the whole suite (starts its own broker and Postgres).
test: $(STAMP) lint
	$(PY) -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) .orchestrator .mypy_cache .ruff_cache .pytest_cache
