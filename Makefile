# Two commands for a fresh machine: `make demo` (the main job end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel on these machines; on a GPU box use e.g. TORCH_SPEC="torch" to get a CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO ?= runs/demo

BIN := $(VENV)/bin

.PHONY: install lock test test-fast lint demo clean services

# Exact versions from requirements.lock (every dependency but torch, whose build depends on the machine);
# the project itself is installed on top without resolving anything again.
$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# After changing dependencies in pyproject.toml: pin them again (pip-tools), then review the diff.
lock: install
	$(BIN)/pip install -q pip-tools
	$(BIN)/pip-compile --quiet --extra dev --unsafe-package torch --strip-extras --no-emit-index-url --no-emit-find-links \
		--output-file requirements.lock pyproject.toml

# PostgreSQL and Redis on their standard local ports: the running ones, else the machine's own servers
# started, else the exact command to install them.
services:
	@sh deploy/local/ensure-services.sh

# ruff, then mypy over ppl_model, worker and benchmarks (strictness, exclusions: [tool.mypy] in pyproject.toml).
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# Everything: unit, integration (PostgreSQL + Redis, started if down), slow and fault-injection tests.
test: lint services
	$(BIN)/python -m pytest

# The inner loop: the unit layer only (no services, no subprocess end-to-end runs).
test-fast: install
	$(BIN)/python -m pytest -m "not integration and not faults and not slow"

# The main job end to end (deploy/local/demo.sh): demo data and model (cached after the first run), export,
# PostgreSQL + Redis, migrations, a worker in the background, jobs from a separate producer, the verdicts.
demo: install services
	BIN=$(BIN) DEMO=$(DEMO) sh deploy/local/demo.sh

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache *.egg-info
