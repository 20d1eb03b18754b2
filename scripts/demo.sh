#!/usr/bin/env bash
# The main job on its embedded default: detect the faces in the sample photograph edgeface ships, write the
# annotated image and JSON, and evaluate WIDER FACE when the shared data is beside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh all
out="${EDGEFACE_OUT:-runs/demo}"
shared="${EDGEFACE_SHARED:-../shared}"
sample="$(.venv/bin/python -I -c 'from importlib.resources import files; print(files("edgeface") / "assets" / "astronaut.jpg")')"
.venv/bin/edgeface detect "$sample" --out "$out" --json
if [ -d "$shared/data/widerface/val/images" ]; then
  .venv/bin/edgeface eval widerface --images "$shared/data/widerface/val/images" \
    --gt "$shared/data/widerface/ground_truth" --save-preds "$out/widerface_preds" --json "$out/widerface.json"
else
  echo "WIDER FACE data not found at $shared: skipped the evaluation (set EDGEFACE_SHARED)" >&2
fi
