#!/usr/bin/env bash
# Creates (or reuses) .venv and installs edgeface with the tested, pinned dependency versions.
# Usage: scripts/setup-venv.sh [EXTRAS]   e.g. scripts/setup-venv.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned to the CPU build in constraints.txt; a looser requirement could pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet -c constraints.txt ".${extras:+[$extras]}"
