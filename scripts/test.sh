#!/usr/bin/env bash
# Set up (scripts/setup.sh test) and run every check CI runs: lint, format, types, the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
.venv/bin/ruff check rt_server tests bench
.venv/bin/ruff format --check rt_server tests bench
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
