# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8765
export PORT

.PHONY: run test install install-dev system-packages lint format migrate bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python  ## Create .venv and install the server's dependencies.
	$(BIN)/pip install --quiet -r requirements.txt

install-dev: $(BIN)/python  ## Install the server, test and client-library dependencies.
	$(BIN)/pip install --quiet -r requirements-dev.txt

migrate: install
	$(BIN)/python manage.py migrate --noinput

run: migrate  ## Set up and start the server on 0.0.0.0:$(PORT) (ws://localhost:8765/).
	PATH="$(CURDIR)/$(BIN):$$PATH" bin/serve

system-packages:  ## Install the system services the tests use (redis, PostgreSQL, Chromium, coturn).
	bash scripts/install-system-packages.sh

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: system-packages install-dev lint  ## Set up and run every test.
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/run-tests.sh

bench: system-packages install-dev  ## Run the benchmarks and print their figures.
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench

clean:
	rm -rf $(VENV) db.sqlite3 staticfiles .pytest_cache .ruff_cache
