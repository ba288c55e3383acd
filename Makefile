PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: venv slurm demo test test-fast lint format clean

# Rebuilt only when setup.cfg/pyproject.toml change (the stamp is newer otherwise).
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 || $(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/python -m lesionkit.demo

# The Slurm tests run a real scheduler on this host (Debian's slurmctld/slurmd/munge, installed as root).
slurm:
	@bash .ci/install-slurm.sh

test: venv slurm
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check lesionkit benchmarks tests
	$(BIN)/ruff format --check lesionkit benchmarks tests

format: venv
	$(BIN)/ruff format lesionkit benchmarks tests
	$(BIN)/ruff check --fix lesionkit benchmarks tests

# The inner loop: everything but the long tests (demo, kill -9, Slurm, DDP, memory, official scorer).
test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs wandb shards/demo
