# Quickstart: `make run` (whole pipeline on bundled digits, CPU) and `make test`.
# Both create .venv on first use and refresh it whenever pyproject.toml changes.
#   make run PROFILE=fashion-cpu     another config set (workflow/profiles/<PROFILE>)
#   make run ARGS="--configfile my.yaml"   anything else for snakemake
#   make run SETUP= BIN=$$CONDA_PREFIX/bin   use an existing environment instead of .venv
#   make run PREFORK=                plain snakemake, without msr's fork server
#   make run PROFILE=slurm           the paper grid on a SLURM cluster (README, "On a SLURM cluster")
PYTHON  ?= python3
VENV    := .venv
BIN     ?= $(VENV)/bin
STAMP   := $(VENV)/.installed
SETUP   ?= $(STAMP)
CORES   ?= all
PROFILE ?=
ARGS    ?=
# a fork server that starts every `msr train` job without re-importing torch (msr.infra.prefork) -
# not when the profile's executor runs jobs elsewhere (slurm): a job handing its work to a server
# on this host would train outside its allocation (workflow/rules/cluster.smk drops it too)
EXECUTOR = $(if $(PROFILE),$(shell sed -n 's/^executor:[[:space:]]*\([A-Za-z0-9_-]*\).*/\1/p' workflow/profiles/$(PROFILE)/config.yaml 2>/dev/null))
PREFORK ?= $(if $(filter-out local,$(EXECUTOR)),,$(BIN)/msr prefork --)
# the config set (its `name:`): each profile's set is named after the profile
SET     ?= $(if $(PROFILE),$(PROFILE),digits)
SNAKEMAKE_OPTS = --cores $(CORES) $(if $(PROFILE),--workflow-profile workflow/profiles/$(PROFILE)) $(ARGS)

.PHONY: run test test-fast test-slurm paper report lint clean help
help:
	@echo "make run     - whole pipeline on the bundled digits data (CPU, ~10 min); after a kill, run it again"
	@echo "make run PROFILE=fashion-cpu - the Fashion-MNIST study on CPU (fashion: on one GPU)"
	@echo "make test    - the test suite (what CI runs)"
	@echo "make test-slurm - the smoke set through a real one-node Slurm cluster on this machine (root, apt; CI runs it too)"
	@echo "make paper   - the CIFAR paper grid (GPU; downloads CIFAR)"
	@echo "make report  - HTML report of the last pipeline run (results/<set>/report.html)"
	@echo "make lint    - ruff + snakemake --lint"
	@echo "make clean SET=digits - delete one config set's results/ and figures/"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing msr and its pinned dependencies into $(VENV) (first time: a few minutes)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

# Recovery after any kill is this same command: a lock left by a dead Snakemake is removed
# (never one of a Snakemake still running here), and jobs it left incomplete are rerun.
run: $(SETUP)
	$(BIN)/python workflow/scripts/unlock_stale.py
	$(PREFORK) $(BIN)/snakemake $(SNAKEMAKE_OPTS) --rerun-incomplete

test: $(STAMP)
	$(BIN)/python -m pytest

# Installs Slurm (apt) and starts a one-node cluster on this machine (tools/slurm_local.sh; root),
# runs the smoke set through the SLURM executor, then stops the cluster (~5 min). Without root it
# skips, saying why; MSR_TEST_SLURM=required turns that skip into a failure (CI).
MSR_TEST_SLURM ?= 1
test-slurm: $(STAMP)
	MSR_TEST_SLURM=$(MSR_TEST_SLURM) $(BIN)/python -m pytest -rs tests/test_slurm.py

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

paper: $(SETUP)
	$(MAKE) run PROFILE=paper

report: $(SETUP)
	mkdir -p results/$(SET)
	$(BIN)/snakemake $(SNAKEMAKE_OPTS) --report results/$(SET)/report.html

lint: $(STAMP)
	$(BIN)/ruff check src tests workflow/scripts
	$(BIN)/snakemake --lint

# one config set only: the others' runs and figures stay (SET is the config's `name:`)
clean:
	@test -n "$(SET)" || { echo "make clean: name the set, e.g. SET=digits"; exit 1; }
	rm -rf results/$(SET) figures/$(SET)
