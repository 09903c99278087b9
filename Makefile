# The two commands that matter: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Integration tests use these servers when they answer; otherwise they skip (and CI,
# where .ci/run starts them, fails instead of skipping).
export PALIMPSEST_TEST_POSTGRES_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test
export PALIMPSEST_TEST_REDIS_URL ?= redis://127.0.0.1:6379

.PHONY: venv demo test pytest lint format bench clean

$(STAMP): pyproject.toml examples/palimpsest-example-architectures/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# The example architecture plugin (docs/byo-models.md): the plugin tests use it.
	$(PY) -m pip install -q --no-deps -e examples/palimpsest-example-architectures
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/palimpsest demo

test: $(STAMP) lint pytest

pytest: $(STAMP)
	$(PY) -m pytest -q -ra --timeout=900

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache palimpsest-data *.sqlite
