#!/usr/bin/env bash
# Sets up a fresh machine (venv + pinned dependencies, all extras) and runs the test suite; without arguments it
# then runs the tflite runtime's checks again in a Raspberry Pi-like environment (tflite-runtime, numpy < 2), and
# the rknn target's tests in its own environment (rknn-toolkit2 pins an old torch / numpy / onnx), and the ARM check
# (scripts/arm64-check.sh: where this machine can run arm64 programs under qemu).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh all,test
.venv/bin/pytest "$@"
if [ $# -eq 0 ]; then
  scripts/test-tflite-runtime.sh
  scripts/test-rknn.sh
  # the bundles on arm64 (an emulated Debian root) against x86; exit 2: this machine cannot run it (said why)
  status=0
  scripts/arm64-check.sh || status=$?
  [ "$status" -eq 0 ] || [ "$status" -eq 2 ]
fi
