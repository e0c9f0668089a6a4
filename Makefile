# Quickstart: `make run` (whole pipeline on bundled digits, CPU) and `make test`.
# Both create .venv on first use and refresh it whenever pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= all

.PHONY: run test test-fast paper report lint clean-results help
help:
	@echo "make run     - whole pipeline on the bundled digits data (CPU, ~10 min)"
	@echo "make test    - the test suite (what CI runs)"
	@echo "make paper   - the CIFAR paper grid (GPU; downloads CIFAR)"
	@echo "make report  - HTML report of the last pipeline run"
	@echo "make lint    - ruff + snakemake --lint"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing msr and its pinned dependencies into $(VENV) (first time: a few minutes)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

paper: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --workflow-profile workflow/profiles/paper

report: $(STAMP)
	mkdir -p results
	$(BIN)/snakemake --report results/report.html

lint: $(STAMP)
	$(BIN)/ruff check src tests workflow/scripts
	$(BIN)/snakemake --lint

clean-results:
	rm -rf results figures/*.png figures/*.pdf figures/*.csv figures/*.md figures/*.tex figures/MANIFEST.json
