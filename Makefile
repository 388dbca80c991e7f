# The two commands of the README: `make quickstart` and `make test`.
# Both set up everything they need on a fresh machine (Python 3.11, Java 17+).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test lint clean

$(STAMP): pyproject.toml
	@bash scripts/check_java.sh
	@test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,mlflow]'
	@touch $(STAMP)

setup: $(STAMP)

# The Java check runs every time, not only at install: Java may change after set-up.
quickstart: $(STAMP)
	@bash scripts/check_java.sh
	$(VENV)/bin/python jobs/quickstart.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	@bash scripts/check_java.sh
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf data runs
