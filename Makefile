# Two commands for a fresh machine: `make demo` (the main job end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel on these machines; on a GPU box use e.g. TORCH_SPEC="torch" to get a CUDA build.
TORCH_SPEC ?= torch==2.13.0
PHOTOS ?= ../shared/data/photos
DEMO ?= runs/demo

BIN := $(VENV)/bin

.PHONY: install test lint demo clean services

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# PostgreSQL and Redis on their standard local ports: the running ones, else the machine's own servers
# started, else the exact command to install them.
services:
	@sh deploy/local/ensure-services.sh

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

# Builds a small real/fake folder from the photos (each fake aligned with the real crop of the same
# name, so the paired layout feeds RPR), then trains PPL and the baseline on it with the tiny CPU config.
demo: install
	rm -rf $(DEMO)
	$(BIN)/python -m ppl_model.data.toy --photos $(PHOTOS) --out $(DEMO)/data
	$(BIN)/ppl train --config configs/tiny.toml --data $(DEMO)/data --out $(DEMO)/ppl --set data.layout=paired
	$(BIN)/ppl train --config configs/tiny.toml --data $(DEMO)/data --out $(DEMO)/baseline --set data.layout=paired \
		--baseline
	@echo "model directories: $(DEMO)/ppl $(DEMO)/baseline (metrics in metrics.jsonl)"

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
