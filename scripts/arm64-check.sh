#!/usr/bin/env bash
# Proof on ARM: runs a set of bundles on real images inside an arm64 Debian root under qemu-user-static (both from
# Debian packages), with the runtimes' own aarch64 wheels installed by pip there (onnxruntime, ai-edge-litert, the
# pins of constraints.txt), and compares the faces with the same bundles on this x86 machine. ARM int8 kernels round
# differently: the check is agreement (faces at IoU >= 0.9, landmark error), never latency (emulated time means
# nothing).
#
#   sudo scripts/arm64-check.sh            # needs root: apt, debootstrap, chroot, binfmt_misc; and .venv (exports)
#
# EDGEFACE_ARM64_ROOT (default /var/cache/edgeface/arm64-root) keeps the root between runs (made once, minutes; a
# network that stalls apt, debootstrap or pip past its time limit counts as "cannot run here");
# EDGEFACE_ARM64_IMAGES (default 20) WIDER val images from EDGEFACE_SHARED (default ../shared); exit 0 when every
# bundle agrees (fp32: every face, landmark error < 1e-3; int8: >= 95% of faces), 1 when one does not, 2 when this
# machine cannot run the check (the reason on one line).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${EDGEFACE_ARM64_ROOT:-/var/cache/edgeface/arm64-root}
SHARED=${EDGEFACE_SHARED:-../shared}
COUNT=${EDGEFACE_ARM64_IMAGES:-20}
INSIDE=/opt/edgeface-check  # the check's wheel, images and bundles, as the arm64 root sees them
say() { echo "== arm64-check: $*"; }
cannot() { echo "arm64-check: cannot run here: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || cannot "needs root (debootstrap, chroot, binfmt_misc): run it with sudo"
[ -x .venv/bin/edgeface ] || cannot "no .venv: run scripts/setup-venv.sh all,test first (the bundles are exported here)"
IMAGES="$SHARED/data/widerface/val/images"
[ -d "$IMAGES" ] || cannot "no WIDER val images at $IMAGES (set EDGEFACE_SHARED)"

if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null \
    || ! command -v update-binfmts >/dev/null; then
  say "installing qemu-user-static, debootstrap, binfmt-support (Debian packages)"
  timeout 600 apt-get install -y -q qemu-user-static debootstrap binfmt-support >/dev/null 2>&1 \
    || cannot "apt-get could not install qemu-user-static, debootstrap and binfmt-support"
fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
    || cannot "binfmt_misc cannot be mounted (a container without that privilege)"
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64 \
  || cannot "qemu-aarch64 cannot be registered with binfmt_misc"

WORK=$(mktemp -d)
MOUNTED=()
cleanup() {
  for m in "${MOUNTED[@]}"; do umount "$m" 2>/dev/null || true; done
  rm -rf "$WORK" "$ROOT$INSIDE"
}
trap cleanup EXIT
# pip inside the root trusts what this machine trusts (its CA bundle: a proxy's own CA included)
HOST_CA=/etc/ssl/certs/host-ca-certificates.crt
in_root() {
  chroot "$1" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root LC_ALL=C.UTF-8 PIP_CERT="$HOST_CA" \
    PIP_DISABLE_PIP_VERSION_CHECK=1 "${@:2}"
}
with_proc() {
  # no /sys: onnxruntime's cpuinfo, reading this x86 machine's CPU files under emulation, crashes (it only warns
  # without them)
  mkdir -p "$1/proc"
  mount -t proc proc "$1/proc" 2>/dev/null || cannot "proc cannot be mounted in the arm64 root"
  MOUNTED+=("$1/proc")
  cp /etc/resolv.conf "$1/etc/resolv.conf"
  cp "$(python3 -c 'import ssl; print(ssl.get_default_verify_paths().openssl_cafile)')" "$1$HOST_CA"
}

# 1. The arm64 root with Python and the runtimes' aarch64 wheels, made whole or not at all.
if [ ! -x "$ROOT/opt/venv/bin/python" ]; then
  say "making the arm64 Debian root in $ROOT (debootstrap, then pip inside it under emulation: minutes, once)"
  rm -rf "$ROOT.partial"
  mkdir -p "$(dirname "$ROOT")"
  timeout 1200 debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
    "$ROOT.partial" >"$WORK/debootstrap.log" 2>&1 \
    || cannot "debootstrap of the arm64 root failed ($(tail -1 "$WORK/debootstrap.log"))"
  with_proc "$ROOT.partial"
  in_root "$ROOT.partial" true 2>/dev/null || cannot "arm64 programs do not run in a chroot here (qemu, binfmt_misc)"
  cp constraints.txt "$ROOT.partial/tmp/constraints.txt"
  in_root "$ROOT.partial" python3 -m venv /opt/venv
  timeout 900 chroot "$ROOT.partial" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root LC_ALL=C.UTF-8 \
    PIP_CERT="$HOST_CA" PIP_DISABLE_PIP_VERSION_CHECK=1 pip install -q --only-binary=:all: -c /tmp/constraints.txt \
    numpy opencv-python-headless onnxruntime tqdm pillow jsonschema ai-edge-litert ncnn >"$WORK/pip.log" 2>&1 \
    || cannot "pip could not install the aarch64 wheels in the root ($(tail -1 "$WORK/pip.log"))"
  for m in "${MOUNTED[@]}"; do umount "$m"; done; MOUNTED=()
  rm -rf "$ROOT"
  mv "$ROOT.partial" "$ROOT"
fi

# 2. edgeface itself, as a device installs it (the wheel of this checkout, no PyTorch).
say "installing this checkout's wheel in the arm64 root"
.venv/bin/pip wheel -q --no-deps -w "$WORK/wheel" . >"$WORK/wheel.log" 2>&1 || { tail -5 "$WORK/wheel.log"; exit 1; }
with_proc "$ROOT"
cp constraints.txt "$ROOT/tmp/constraints.txt"
mkdir -p "$ROOT$INSIDE"
cp "$WORK"/wheel/*.whl "$ROOT$INSIDE/"
in_root "$ROOT" sh -c "pip install -q --no-deps --force-reinstall $INSIDE/*.whl"
echo "arm64 root: $(in_root "$ROOT" uname -m), $(in_root "$ROOT" python -c 'import platform, onnxruntime, ai_edge_litert; print("Python", platform.python_version(), "onnxruntime", onnxruntime.__version__)' 2>/dev/null)"

# 3. The images and the bundles (exported here, on x86).
mkdir -p "$ROOT$INSIDE/images"
.venv/bin/python - "$IMAGES" "$ROOT$INSIDE/images" "$COUNT" <<'EOF'
import shutil, sys
from pathlib import Path
from edgeface.core.images import list_images
from edgeface.evaluation.accuracy import spread
for path in spread(list_images(sys.argv[1]), int(sys.argv[3])):
    shutil.copy(path, Path(sys.argv[2]) / path.name)
EOF
BUNDLES=(onnx-fp32 onnx-int8)
.venv/bin/python -c 'import litert_torch' 2>/dev/null && BUNDLES+=(tflite-fp32 tflite-int8)
.venv/bin/python -c 'import pnnx' 2>/dev/null && BUNDLES+=(ncnn-fp32)
in_root "$ROOT" python -c 'import ncnn' 2>/dev/null \
  || in_root "$ROOT" pip install -q --only-binary=:all: -c /tmp/constraints.txt ncnn >/dev/null 2>&1 \
  || BUNDLES=("${BUNDLES[@]/ncnn-fp32}")
BUNDLES=($(printf '%s\n' "${BUNDLES[@]}" | grep .))
for name in "${BUNDLES[@]}"; do
  say "exporting $name (320x320) on x86"
  .venv/bin/edgeface export --target "${name%-*}" --precision "${name#*-}" --imgsz 320x320 --calib-n 32 \
    --calib "$SHARED/data/widerface/train/images" --out "$ROOT$INSIDE/bundles/$name" >/dev/null 2>&1 \
    || cannot "the export of $name failed here"
done

# 4. The same bundles on both machines, compared face by face.
failed=0
for name in "${BUNDLES[@]}"; do
  .venv/bin/edgeface detect "$ROOT$INSIDE/images" --model "$ROOT$INSIDE/bundles/$name" --threshold 0.3 --json \
    >"$WORK/$name.x86.jsonl" 2>/dev/null
  in_root "$ROOT" edgeface detect "$INSIDE/images" --model "$INSIDE/bundles/$name" --threshold 0.3 --json \
    >"$WORK/$name.arm64.jsonl" 2>"$WORK/$name.arm64.err" || { tail -2 "$WORK/$name.arm64.err"; failed=1; continue; }
  .venv/bin/python - "$name" "$WORK/$name.x86.jsonl" "$WORK/$name.arm64.jsonl" <<'EOF' || failed=1
import sys
from edgeface.core.parity import compare_detections, read_detections
name, x86, arm = sys.argv[1], read_detections(sys.argv[2]), read_detections(sys.argv[3])
if sorted(x86) != sorted(arm) or not x86:
    sys.exit(f"{name}: the two machines read different images ({len(x86)} / {len(arm)})")
report = compare_detections((x86[image], arm[image]) for image in sorted(x86))
fp32 = name.endswith("fp32")
ok = report.detection_agreement >= (1.0 if fp32 else 0.95) and (report.landmark_error < 1e-3 or not fp32)
print(f"{name:12s} arm64 vs x86: {report.matched_faces}/{report.reference_faces} faces at IoU >= 0.9 "
      f"({report.detection_agreement:.1%}), {report.extra_faces} extra, landmark error {report.landmark_error:.5f} "
      f"on {report.images} images: {'agrees' if ok else 'DISAGREES'}")
sys.exit(0 if ok else 1)
EOF
done
say "done (agreement only: latency under emulation means nothing)"
exit $failed
