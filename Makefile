# Two commands for a new user: `make demo` and `make test`. Both bootstrap .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast check lock venv clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r requirements.txt
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/releasegate demo

# Lint, format and types first: a minute, before half an hour of tests.
check: $(STAMP)
	$(BIN)/ruff check include plugins dags tests benchmarks examples
	$(BIN)/ruff format --check include plugins dags tests benchmarks examples
	$(BIN)/mypy

test: check
	$(BIN)/python -m pytest -ra --durations=25

test-fast: check
	$(BIN)/python -m pytest -ra tests/unit tests/dags

# docker compose refuses to start without its secrets: this makes them (.env, TLS, the signing key
# pair under deploy/secrets/), never overwriting one. Needs only openssl, not the venv.
.PHONY: secrets
secrets:
	scripts/make-secrets.sh

lock:
	uv pip compile requirements.in -o requirements.txt --python-version 3.11

clean:
	rm -rf $(VENV) .releasegate
