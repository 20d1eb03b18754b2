#!/usr/bin/env bash
# Sets up a fresh machine (venv + pinned dependencies, all extras) and runs the test suite; without arguments it
# then runs the tflite runtime's checks again in a Raspberry Pi-like environment (tflite-runtime, numpy < 2), and
# the rknn target's tests in its own environment (rknn-toolkit2 pins an old torch / numpy / onnx).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh all,test
.venv/bin/pytest "$@"
if [ $# -eq 0 ]; then
  scripts/test-tflite-runtime.sh
  scripts/test-rknn.sh
fi
