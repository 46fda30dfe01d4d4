# Every target creates .venv and installs the project when missing, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The stack of the GPU machines and of the export's users: torch 2.11, transformers 5.x, none of the
# training libraries (pyproject.toml's dependency group `compat`). Only `make test` needs it.
COMPAT := .venv-compat
COMPAT_PY := $(COMPAT)/bin/python
COMPAT_STAMP := $(COMPAT)/.installed
# What runs on that stack: the plain-PyTorch core, the export and gpu_check (its test runs it --tiny).
COMPAT_TESTS := tests/pipeline/model tests/pipeline/diffusion tests/pipeline/hf_artifact tests/benchmarks
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: setup setup-compat test test-compat test-fast lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

setup-compat: $(COMPAT_STAMP)

$(COMPAT_STAMP): pyproject.toml
	@test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT)
	$(COMPAT_PY) -m pip install --quiet --upgrade pip
	$(COMPAT_PY) -m pip install --quiet --group compat
	@touch $(COMPAT_STAMP)

# The full suite, as CI runs it (slow and multi-process tests included), then the core, the export
# and gpu_check again on the GPU machines' torch and transformers 5.x (.venv-compat). The first run
# compares gpu_check's JSON across the two torch versions. Both halves run on WORKERS pytest-xdist
# workers (tests/conftest.py; 2 by default, for the 2-core machines); WORKERS=0 runs them in one process.
WORKERS ?= 2
test: $(STAMP) $(COMPAT_STAMP)
	BD3_COMPAT_PYTHON=$(CURDIR)/$(COMPAT_PY) $(PY) -m pytest -q -n $(WORKERS) --dist loadgroup $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-compat

# The cross-version comparison of gpu_check runs once, from .venv (`make test`).
test-compat: $(COMPAT_STAMP)
	PYTHONPATH=$(CURDIR) $(COMPAT_PY) -m pytest -q -n $(WORKERS) $(COMPAT_TESTS) $(PYTEST_ARGS) \
		--deselect tests/benchmarks/test_gpu_check.py::test_the_same_keys_and_memory_plan_on_the_gpu_machines_torch

# Skips the slow and multi-process tests, for quick local iteration.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not multiprocess" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	$(PY) -m pipeline.demo --out $(DEMO_OUT)

bench: $(STAMP)
	$(PY) -m benchmarks.bench_data_prep
	$(PY) -m benchmarks.bench_model
	$(PY) -m benchmarks.bench_sampler
	$(PY) -m benchmarks.bench_train
	$(PY) -m benchmarks.bench_block_sizes
	$(PY) -m benchmarks.bench_object_storage
	$(PY) -m benchmarks.bench_read --streams 3
	$(PY) -m benchmarks.bench_lm_eval
	$(PY) -m benchmarks.bench_universal

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
