# The two commands of the README: `make run` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run test lint typecheck unit bench soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/stateline serve $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -x -q

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# Every benchmark beside its peer; `make bench ARGS=--quick` for a short pass.
bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py $(ARGS)

# The long reliability pass and the long OpenAPI fuzz (at most about 30 minutes); figures go to bench/results/reliability.json.
soak: $(STAMP)
	STATELINE_SOAK=1 STATELINE_RELIABILITY_REPORT=bench/results/reliability.json \
		$(BIN)/pytest tests/reliability tests/api/test_fuzz.py -q --timeout 1800
	cat bench/results/reliability.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
