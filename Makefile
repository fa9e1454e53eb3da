# Two commands for a new user: `make demo` and `make test`. Both bootstrap .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast check lock venv clean

CLIENTS := .venv-clients
CLIENTS_STAMP := $(CLIENTS)/.installed

venv: $(STAMP) $(CLIENTS_STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r requirements.txt
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

# The Open Inference Protocol clients the gateway is tested with (tests/integration/test_oip_clients.py), in their
# own environment: kserve's pins cannot be resolved together with Airflow's.
$(CLIENTS_STAMP): tests/clients/requirements.txt $(STAMP)
	test -x $(CLIENTS)/bin/python || $(PYTHON) -m venv $(CLIENTS)
	$(BIN)/uv pip install --quiet --python $(CLIENTS)/bin/python -r tests/clients/requirements.txt
	touch $(CLIENTS_STAMP)

demo: $(STAMP)
	$(BIN)/releasegate demo

# Lint, format and types first: a minute, before half an hour of tests.
check: $(STAMP)
	$(BIN)/ruff check include plugins dags tests benchmarks examples
	$(BIN)/ruff format --check include plugins dags tests benchmarks examples
	$(BIN)/mypy

# TEST_WORKERS=2: both cores, one test module (tests/system as a whole) per unit of work, slowest first
# (tests/conftest.py); 0, the default: one process, as CI runs it until the suite passes both ways.
TEST_WORKERS ?= 0
test: check $(CLIENTS_STAMP)
	$(BIN)/python -m pytest -ra --durations=25 -n $(TEST_WORKERS)

test-fast: check
	$(BIN)/python -m pytest -ra tests/unit tests/dags

# docker compose refuses to start without its secrets: this makes them (.env, TLS, the signing key
# pair under deploy/secrets/), never overwriting one. Needs only openssl, not the venv.
.PHONY: secrets
secrets:
	scripts/make-secrets.sh

lock:
	uv pip compile requirements.in -o requirements.txt --python-version 3.11
	uv pip compile tests/clients/requirements.in -o tests/clients/requirements.txt --python-version 3.11

clean:
	rm -rf $(VENV) $(CLIENTS) .releasegate
