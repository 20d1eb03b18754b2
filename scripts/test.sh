#!/usr/bin/env bash
# Sets up a fresh machine (venv + pinned dependencies) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh all,test
exec .venv/bin/pytest "$@"
