"""Reading images safely: decompression bombs, files that are not images, extreme sizes (issue 9)."""

import os
import struct
import zlib

import cv2
import numpy as np
import pytest

from edgeface import Detector, EdgefaceError
from edgeface.images import load_image

LIMIT_HINT = "set EDGEFACE_MAX_PIXELS to raise it if the image is genuine"


def _png(width: int, height: int) -> bytes:
    """A complete, valid 1-bit grayscale PNG of ``width`` x ``height`` black pixels: a few KB however large."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    deflate = zlib.compressobj(9)
    pixels = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def astronaut_jpeg(astronaut_path) -> bytes:
    return astronaut_path.read_bytes()


def _jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with its frame header (SOF0) declaring another size; the data stays that of the small image."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[:sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9:]


def test_files_decode_exactly_as_opencv_reads_them(tmp_path, astronaut_path):
    """The pixels behind the reproduced WIDER FACE AP: identical to cv2.imread for JPEG and PNG."""
    reference = cv2.imread(str(astronaut_path))
    cv2.imwrite(str(tmp_path / "a.png"), reference)
    for path in (astronaut_path, tmp_path / "a.png"):
        image = load_image(path)
        assert image.dtype == np.uint8 and image.shape == (512, 512, 3) and image.flags.c_contiguous
        np.testing.assert_array_equal(image, reference)


def test_png_bomb_is_refused_from_its_header(tmp_path):
    data = _png(20000, 20000)
    assert len(data) < 100_000  # 400 megapixels in a few tens of KB
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    message = (f"{path} declares a 20000x20000 PNG image (400.0 megapixels), over edgeface's limit of 200 "
               f"megapixels: {LIMIT_HINT}")
    with pytest.raises(EdgefaceError) as error:
        load_image(path)
    assert str(error.value) == message
    with pytest.raises(EdgefaceError, match=r"image bytes \(\d+ bytes\) declares a 20000x20000 PNG image"):
        load_image(data)


@pytest.mark.parametrize("side, megapixels", [(30000, 900), (65000, 4225)])
def test_jpeg_claiming_a_huge_size_is_refused(tmp_path, astronaut_jpeg, side, megapixels):
    path = tmp_path / "huge.jpg"
    path.write_bytes(_jpeg_claiming(astronaut_jpeg, side, side))
    with pytest.raises(EdgefaceError) as error:
        load_image(path)
    assert str(error.value) == (f"{path} declares a {side}x{side} JPEG image ({megapixels:.1f} megapixels), over "
                                f"edgeface's limit of 200 megapixels: {LIMIT_HINT}")


def test_pixel_limit_is_configurable(tmp_path, astronaut_path, monkeypatch):
    monkeypatch.setenv("EDGEFACE_MAX_PIXELS", "100_000")
    with pytest.raises(EdgefaceError) as error:
        load_image(astronaut_path)
    assert str(error.value) == (f"{astronaut_path} declares a 512x512 JPEG image (0.3 megapixels), over edgeface's "
                                f"limit of 0.1 megapixels: {LIMIT_HINT}")
    monkeypatch.setenv("EDGEFACE_MAX_PIXELS", "500000000")
    path = tmp_path / "wide.png"
    path.write_bytes(_png(20000, 20))
    assert load_image(path).shape == (20, 20000, 3)
    monkeypatch.setenv("EDGEFACE_MAX_PIXELS", "lots")
    with pytest.raises(EdgefaceError) as error:
        load_image(path)
    assert str(error.value) == ("EDGEFACE_MAX_PIXELS='lots' is not a positive whole number of pixels "
                                "(e.g. 200000000)")


def test_huge_sparse_files_are_not_read(tmp_path, astronaut_jpeg):
    """8 GiB files (sparse: no disk used) are refused from their first bytes, never read into memory."""
    garbage = tmp_path / "sparse.jpg"
    with open(garbage, "wb") as f:
        f.truncate(8 * 2**30)
    with pytest.raises(EdgefaceError) as error:
        load_image(garbage)
    assert str(error.value) == (f"{garbage} could not be decoded as an image: not an image file (or a truncated "
                                "one); supported formats include .jpg, .jpeg, .png, .bmp, .webp, .tif, .tiff")
    padded = tmp_path / "padded.jpg"  # a real JPEG header, then 8 GiB
    with open(padded, "wb") as f:
        f.write(astronaut_jpeg)
        f.truncate(8 * 2**30)
    with pytest.raises(EdgefaceError) as error:
        load_image(padded)
    assert str(error.value) == (f"{padded} is 8192 MB, far more than a 512x512 JPEG image needs: not a valid "
                                "image file")


def test_files_that_are_not_images(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("a shopping list, not a photo\n")
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    cases = {
        empty: f"{empty} could not be decoded as an image: it is empty (0 bytes)",
        text: f"{text} could not be decoded as an image: not an image file (or a truncated one); supported "
              "formats include .jpg, .jpeg, .png, .bmp, .webp, .tif, .tiff",
        folder: f"{folder} is a directory, not an image file",
        tmp_path / "missing.jpg": f"image not found: {tmp_path / 'missing.jpg'}",
    }
    for path, message in cases.items():
        with pytest.raises(EdgefaceError) as error:
            load_image(path)
        assert str(error.value) == message
    with pytest.raises(EdgefaceError, match=r"^image bytes \(0 bytes\) could not be decoded as an image: it is empty \(0 bytes\)$"):
        load_image(b"")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path, astronaut_jpeg):
    path = tmp_path / "private.jpg"
    path.write_bytes(astronaut_jpeg)
    path.chmod(0)
    with pytest.raises(EdgefaceError) as error:
        load_image(path)
    assert str(error.value) == f"cannot read {path}: permission denied (check the file's permissions)"


def test_truncated_files_give_one_line_and_no_library_noise(tmp_path, astronaut_path, astronaut_jpeg, capfd):
    image = cv2.imread(str(astronaut_path))
    png = cv2.imencode(".png", image)[1].tobytes()
    (tmp_path / "cut.png").write_bytes(png[:len(png) // 2])
    with pytest.raises(EdgefaceError) as error:
        load_image(tmp_path / "cut.png")
    assert str(error.value) == (f"{tmp_path / 'cut.png'} could not be decoded: a 512x512 PNG file that is "
                                "truncated or corrupt (or a format OpenCV cannot read)")
    (tmp_path / "header.jpg").write_bytes(astronaut_jpeg[:200])  # cut inside the JPEG headers
    with pytest.raises(EdgefaceError) as error:
        load_image(tmp_path / "header.jpg")
    assert str(error.value) == (f"{tmp_path / 'header.jpg'} is truncated or corrupt: its image header cannot be "
                                "read (Truncated File Read)")
    # Cut in the compressed data: OpenCV 5 refuses it, older versions return what they could decode.
    (tmp_path / "cut.jpg").write_bytes(astronaut_jpeg[:len(astronaut_jpeg) // 2])
    try:
        assert load_image(tmp_path / "cut.jpg").shape == (512, 512, 3)
    except EdgefaceError as error:
        assert "cut.jpg could not be decoded: a 512x512 JPEG file that is truncated or corrupt" in str(error)
    assert capfd.readouterr().err == ""  # libpng / libjpeg print nothing of their own


@pytest.fixture(scope="module")
def detectors():
    return {policy: Detector(resize=policy) for policy in ("original", "max:640", "longest:640", "fixed:640x640")}


def test_extreme_aspect_ratios_under_every_policy(tmp_path, detectors):
    """A 1000000 x 64 PNG (64 megapixels, 8 KB) either runs or is refused in one line: never gigabytes."""
    path = tmp_path / "panorama.png"
    path.write_bytes(_png(1_000_000, 64))
    panorama = load_image(path)
    assert panorama.shape == (64, 1_000_000, 3) and not panorama.any()
    for policy in ("max:640", "longest:640", "fixed:640x640"):
        assert detectors[policy].detect(panorama) == []  # 640 x 1 at the network (0.04 rounds up to 1)
    with pytest.raises(EdgefaceError) as error:
        detectors["original"].detect(panorama)
    assert str(error.value) == (
        "resize original would give a 1000000x64 image a 1000000x64 network input (64.0 megapixels), over "
        "edgeface's limit of 16.8 megapixels: use a resize that scales down (--resize max:1920, or "
        "resize='max:1920' in Python) or set EDGEFACE_MAX_INPUT_PIXELS to raise the limit")
    for shape in ((1, 50000, 3), (50000, 1, 3), (3, 3, 3), (1, 1, 3)):
        image = np.full(shape, 128, np.uint8)
        for policy, detector in detectors.items():
            assert detector.detect(image) == [], (shape, policy)


def test_network_input_limit_covers_upscaling_and_batches(detectors, monkeypatch):
    with pytest.raises(EdgefaceError, match=r"^resize longest:8192 would give a 3x3 image a 8192x8192 network "
                                            r"input \(67\.1 megapixels\), over edgeface's limit of 16\.8 megapixels"):
        Detector(resize="longest:8192").detect(np.zeros((3, 3, 3), np.uint8))  # refused before allocating 800 MB
    tall, wide = np.zeros((400, 1, 3), np.uint8), np.zeros((1, 400, 3), np.uint8)
    monkeypatch.setenv("EDGEFACE_MAX_INPUT_PIXELS", "100000")
    assert detectors["original"].detect(tall) == [] and detectors["original"].detect(wide) == []
    with pytest.raises(EdgefaceError, match=r"^resize original would give a batch of 2 images a 400x400 network "
                                            r"input \(0\.2 megapixels\), over edgeface's limit of 0\.1 megapixels:"):
        detectors["original"].detect([tall, wide])  # padded to a common size
    monkeypatch.setenv("EDGEFACE_MAX_INPUT_PIXELS", "200000")
    assert detectors["original"].detect([tall, wide]) == [[], []]
