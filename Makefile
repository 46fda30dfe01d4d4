# Every target creates .venv and installs the project when missing, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: setup test test-fast lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# The full suite, as CI runs it (slow and multi-process tests included).
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

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

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
