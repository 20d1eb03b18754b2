#!/usr/bin/env bash
# Creates (or reuses) .venv and installs the working tree, editable, with the tested, pinned dependency versions:
# tests and `edgeface` always run the code in this checkout (the design card's export/, runtimes/, benchmarks/ and
# boards/ folders are mapped in as edgeface.* by pyproject's package-dir). No build/ copy is left behind.
# Usage: scripts/setup-venv.sh [EXTRAS]   e.g. scripts/setup-venv.sh all,test (the development environment, what
# scripts/test.sh uses); without extras it is the device install: no PyTorch, no converters, no scipy.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned to the CPU build in constraints.txt; a looser requirement could pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet -c constraints.txt --editable ".${extras:+[$extras]}"
rm -rf build
