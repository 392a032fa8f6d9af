#!/usr/bin/env bash
# Set up (scripts/setup.sh serve), import the real weights on first use, and run the server.
# Extra arguments go to `rt-server serve` (see docs/configuration.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh serve
exec .venv/bin/rt-server serve "$@"
