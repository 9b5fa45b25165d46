#!/usr/bin/env bash
# Run every test suite. In CI (CI=true) nothing may be skipped for a missing component.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest "$@"
