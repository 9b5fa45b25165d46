#!/usr/bin/env bash
# Run every test suite. In CI (CI=true) nothing may be skipped for a missing component.
#
#   1. the whole pytest suite: in-process tests on SQLite and the in-memory layer, and
#      the suites that start their own redis-server, PostgreSQL and daphne processes;
#   2. the tests that use the Django database in-process (marker `database`) again,
#      against a throwaway PostgreSQL cluster (pytest-django creates its test database
#      there), so both database backends the server supports are exercised.
#
# With arguments, only pass 1 runs, with those arguments (e.g. one test file).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$#" -gt 0 ]; then
  exec python -m pytest "$@"
fi

echo "== pass 1: every test (SQLite, in-memory layer, real services) =="
python -m pytest

echo "== pass 2: in-process database tests against PostgreSQL =="
if ! { ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null; }; then
  if [ "${CI:-}" = "true" ]; then
    echo "PostgreSQL is not installed, and CI=true: failing (run make system-packages)" >&2
    exit 1
  fi
  echo "PostgreSQL is not installed: skipping pass 2 (make system-packages installs it)" >&2
  exit 0
fi
python -m calls.testing.services with-postgres -- python -m pytest -m database
