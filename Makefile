# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8765
export PORT
# Pinned so that a fresh clone builds the same .venv; pip-tools 7.6.2 works with this pip.
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.6.2
# The lock files carry a hash for every file of every transitive dependency, and no
# index or find-links setting of the machine that compiled them.
PIP_COMPILE := $(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	--no-emit-index-url --no-emit-find-links --no-emit-trusted-host $(LOCK_FLAGS)

.PHONY: run test install install-echo install-dev lock system-packages lint format migrate bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==$(PIP_VERSION)

# The lock files are installed in hash-checking mode. The client library in ./clients/python is
# local (nothing to hash): it is installed on its own, without dependencies (its one
# dependency, websockets, is in requirements.lock).
install: $(BIN)/python  ## Create .venv and install the server's dependencies (requirements.lock).
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock

install-echo: install  ## Also install the echo bot's: aiortc and the client library.
	$(BIN)/pip install --quiet --require-hashes -r requirements-echo.lock
	$(BIN)/pip install --quiet --no-deps -e ./clients/python

install-dev: $(BIN)/python  ## Install the server, echo bot, test and client-library dependencies.
	$(BIN)/pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e ./clients/python

# Each lock is compiled against the ones before it (the .in files say -c), so a package
# has one version in all three. Existing pins are kept unless the .in files need others;
# `make lock LOCK_FLAGS=--upgrade` moves every package to the newest version allowed.
lock: $(BIN)/python  ## Recompile requirements*.lock from requirements*.in.
	$(BIN)/pip install --quiet pip-tools==$(PIP_TOOLS_VERSION)
	CUSTOM_COMPILE_COMMAND="make lock" $(PIP_COMPILE) --output-file requirements.lock requirements.in
	CUSTOM_COMPILE_COMMAND="make lock" $(PIP_COMPILE) --output-file requirements-echo.lock requirements-echo.in
	CUSTOM_COMPILE_COMMAND="make lock" $(PIP_COMPILE) --output-file requirements-dev.lock requirements-dev.in

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

test: system-packages install-dev protocol-deps lint  ## Set up and run every test.
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/run-tests.sh

.PHONY: protocol-docs protocol-deps
protocol-docs: install-dev  ## Render docs/protocol.md from the protocol spec, protocol/asyncapi.yaml.
	$(BIN)/python -m protocol.render

# The reference AsyncAPI parser (pinned in protocol/package-lock.json), which the tests run
# on the spec (protocol/validate.mjs). Needs node 20 and npm.
protocol-deps:  ## Install the AsyncAPI parser that validates protocol/asyncapi.yaml.
	npm ci --prefix protocol --ignore-scripts --no-audit --no-fund

bench: system-packages install-dev  ## Run the benchmarks and print their figures.
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench

.PHONY: bench-admin
bench-admin: system-packages install-dev  ## Time the admin's calls dashboard and call list on a million calls.
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench.admin_dashboard

clean:
	rm -rf $(VENV) db.sqlite3 staticfiles .pytest_cache .ruff_cache
