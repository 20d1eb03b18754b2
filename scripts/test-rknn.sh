#!/usr/bin/env bash
# The rknn target (Rockchip NPUs) in its own environment: rknn-toolkit2, Rockchip's converter and NPU simulator,
# pins torch <= 2.4, numpy <= 1.26.4, onnx <= 1.18 and protobuf <= 4.25.4, so it cannot share .venv.
#   1. creates (or reuses) .venv-rknn with exactly the packages of constraints-rknn.txt (rknn-toolkit2 2.5.0 with
#      its old numpy / onnx / protobuf, torch 2.13.0 CPU installed without the dependency check: rknn-toolkit2
#      works with it), then edgeface from a copy of the checkout (no build/ left in the working tree), without
#      dependencies: they are all in the list;
#   2. runs tests/test_export_rknn.py there with EDGEFACE_RKNN_REQUIRED=1, so that a missing toolkit fails instead
#      of skipping: int8 and fp16 exports at 320x320 checked in the simulator through the shared pipeline, the
#      refusals, the manifest rules and the runtime's input/output handling (a stand-in RKNNLite).
# scripts/test.sh runs it after the main suite. Measured on the 2-core machine: about 1.5 min to create the
# environment (38 MB rknn-toolkit2 wheel, 1.7 GB environment), then about 20 s for the tests.
# Usage: scripts/test-rknn.sh [PYTEST ARGS]
# Environment: PYTHON (default python3; rknn-toolkit2 2.5.0 has wheels for CPython 3.8-3.12 on x86-64 Linux),
# EDGEFACE_SHARED (default ../shared: WIDER images for calibration and parity, else crops of the bundled photograph).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-rknn
python="${PYTHON:-python3}"
say() { printf '== test-rknn: %s\n' "$*"; }
die() { printf '== test-rknn: ERROR: %s\n' "$*" >&2; exit 1; }
started=$SECONDS

work="$(mktemp -d "${TMPDIR:-/tmp}/edgeface-rknn.XXXXXX")"
trap 'rm -rf "$work"' EXIT

if ! "$python" -c 'import platform, sys; sys.exit(not ((3, 8) <= sys.version_info[:2] <= (3, 12) and platform.machine() == "x86_64"))'; then
  die "$python is Python $("$python" -c 'import platform, sys; print(sys.version.split()[0], platform.machine())'); rknn-toolkit2 2.5.0 has x86-64 Linux wheels for Python 3.8-3.12 only"
fi
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv with $("$python" --version)"
  "$python" -m venv "$venv"
  printf '*\n' > "$venv/.gitignore"  # keep the environment out of git
  "$venv/bin/python" -m pip install --quiet --upgrade pip
else
  say "reusing $venv"
fi
t0=$SECONDS
say "installing constraints-rknn.txt (pip install --no-deps -r) and edgeface from a copy of the checkout"
# Exactly the listed versions, without pip's resolver: rknn-toolkit2 declares torch <= 2.4, edgeface[export]
# torch >= 2.4 and the tested build is 2.13.0 (README, "rknn").
"$venv/bin/python" -m pip install --quiet --no-deps -r constraints-rknn.txt
mkdir "$work/src"
tar -cf - --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude=./dist --exclude='*.egg-info' \
  --exclude=./runs --exclude=./bundles --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache . \
  | tar -xf - -C "$work/src"
"$venv/bin/python" -m pip install --quiet --no-deps --force-reinstall "$work/src" 2>&1 \
  | { grep -v -i -e 'warning' -e '^\s*$' -e '\*\*\*' -e '!!' || true; } >&2 || true
# Every requirement met but rknn-toolkit2's own torch pin (torch 2.13 works with it).
problems="$("$venv/bin/python" -m pip check 2>&1 | grep -v -e '^rknn-toolkit2 [^ ]* has requirement torch[^,]*,[^ ]* but you have torch 2.13.0+cpu' -e '^No broken' || true)"
[ -z "$problems" ] || die "pip check in $venv: $problems"
"$venv/bin/python" -I -W ignore -c '
import numpy, torch, onnx
from importlib.metadata import version
from rknn.api import RKNN  # noqa: F401
import edgeface.export.rknn
print("== test-rknn: rknn-toolkit2", version("rknn-toolkit2"), "| torch", torch.__version__, "| numpy", numpy.__version__,
      "| onnx", onnx.__version__, "| edgeface", version("edgeface"))
'
say "environment ready in $((SECONDS - t0)) s ($(du -sh "$venv" | cut -f1))"

# The tests, with the environment's pytest (not `python -m pytest`, which would put the checkout before the
# installed package on sys.path). pytest's summary stays the last line of the output.
say "set up in $((SECONDS - started)) s; pytest tests/test_export_rknn.py with $venv (EDGEFACE_RKNN_REQUIRED=1)"
status=0
EDGEFACE_RKNN_REQUIRED=1 "$venv/bin/pytest" -p no:cacheprovider tests/test_export_rknn.py "$@" || status=$?
exit "$status"
