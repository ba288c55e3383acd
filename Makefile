PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: venv slurm demo test test-fast lint format clean

# The torch wheel flavour: unset = PyPI's default build; TORCH_INDEX=cpu on CPU-only machines (CPU wheels,
# a far smaller download); cu126, cu128, ... for the CUDA the nodes' driver supports (the trainer's device
# check names a mismatch). `make venv TORCH_INDEX=cpu` remembers it in .venv/.torch-index; a new value
# reinstalls torch.
TORCH_INDEX ?= $(shell cat $(VENV)/.torch-index 2>/dev/null)
TORCH_FROM  := $(if $(TORCH_INDEX),--index-url https://download.pytorch.org/whl/$(TORCH_INDEX))

.PHONY: FORCE
$(VENV)/.torch-index: FORCE
	@mkdir -p $(VENV); [ -f $@ ] && [ "$$(cat $@)" = "$(TORCH_INDEX)" ] || echo "$(TORCH_INDEX)" > $@

# Rebuilt only when setup.cfg/pyproject.toml or the torch flavour change (the stamp is newer otherwise).
$(STAMP): setup.cfg pyproject.toml $(VENV)/.torch-index
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_FROM) torch==2.14.1 torchvision==0.29.1 || $(BIN)/pip install -q $(TORCH_FROM) torch torchvision
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/python -m lesionkit.demo

# The Slurm tests run a real scheduler on this host (Debian's slurmctld/slurmd/munge, installed as root).
slurm:
	@bash .ci/install-slurm.sh

# Two pytest workers: most tests run single-threaded subprocesses (OMP_NUM_THREADS=1), so one worker leaves a
# core idle. tests/conftest.py hands each worker whole units, longest first: a file, or the files sharing a
# session fixture (the Slurm tests: one worker, one throwaway cluster). Measured on the 2-core EPYC: 1,483 s
# serial; 1,288 and 1,384 s with xdist's per-test spreading (a cluster per worker, each submitting all of
# test_slurm.py's jobs); 1,041 s with the units at nice 19 beside a training job, 646 s on a quiet machine
# (400 tests, 2026-12-03).
PYTEST := $(BIN)/python -m pytest -q -n 2

test: venv slurm
	$(PYTEST)

lint: venv
	$(BIN)/ruff check lesionkit benchmarks tests
	$(BIN)/ruff format --check lesionkit benchmarks tests

format: venv
	$(BIN)/ruff format lesionkit benchmarks tests
	$(BIN)/ruff check --fix lesionkit benchmarks tests

# The inner loop: everything but the long tests (demo, kill -9, Slurm, DDP, memory, official scorer).
test-fast: venv
	$(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) runs wandb shards/demo
