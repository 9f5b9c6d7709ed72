# The two commands of the README's quick start: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test lint bench peer-tests gpu-suite

# Keep an installed torch. Without one, take the CPU build on machines with no GPU:
# a bare `pip install torch` would download several GB of CUDA packages.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || { \
		if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install torch; \
		else $(PIP) install torch==2.13.0; fi; }
	$(PIP) install -q -e ".[dev]"

# DPO on the bundled hh-rlhf subset through TRL's DPOTrainer with dpo_fast inside: a tiny random
# Llama on CPU (1-2 minutes on 2 cores), a larger one with the Triton kernels on a GPU. Outputs
# (final model, checkpoints, training_curves.png) go to build/demo, emptied first: a run refuses
# to write over an earlier run's checkpoints.
demo: install
	rm -rf build/demo
	$(PYTHON) -m dpo_fast.app.cli train --output_dir build/demo

test: install
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

bench: install
	$(PYTHON) benchmarks/bench_logprobs.py

# The peers' own suites against dpo_fast: Liger 0.8.5's chunked-loss tests (fetched from PyPI)
# and, with DPO_FAST_TRL_SOURCE=<a TRL checkout>, TRL's DPO trainer tests in every mode.
peer-tests: install
	$(PYTHON) tests/peers/run.py $(if $(DPO_FAST_TRL_SOURCE),all,liger)

# Everything a lent GPU should run, results in benchmarks/results/<device>-<date>/ (see
# benchmarks/gpu_suite.py; SUITE_ARGS="--quick", "--only tests", ...). No install step: the GPU
# machines reach no registry; the peers travel as wheels (benchmarks/peer_wheels.py).
# DRY_RUN=1: every step on CPU at toy sizes, kernels under Triton's interpreter (as CI does).
gpu-suite:
	$(PYTHON) benchmarks/gpu_suite.py $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run) $(SUITE_ARGS)
