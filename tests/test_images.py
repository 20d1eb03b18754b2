"""Reading images safely: decompression bombs, files that are not images, extreme sizes (issue 9)."""

import os
import struct
import threading
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from edgeface import Detector, EdgefaceError
from edgeface.core.images import load_image, output_names

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
    assert str(error.value) == (f"{padded} is 8192 MiB, far more than a 512x512 JPEG image needs: not a valid "
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
    empty = r"^image bytes \(0 bytes\) could not be decoded as an image: it is empty \(0 bytes\)$"
    with pytest.raises(EdgefaceError, match=empty):
        load_image(b"")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path, astronaut_jpeg):
    path = tmp_path / "private.jpg"
    path.write_bytes(astronaut_jpeg)
    path.chmod(0)
    with pytest.raises(EdgefaceError) as error:
        load_image(path)
    assert str(error.value) == f"cannot read {path}: permission denied (check the file's permissions)"


def test_truncated_files_give_one_line(tmp_path, astronaut_path, astronaut_jpeg):
    """The library answers in one line; libpng may print its own warning on stderr before it (the process's stderr
    is the application's: the edgeface command silences it, tests/test_cli_reliability.py)."""
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


BOMBS = {"20000x20000 PNG": (lambda jpeg: _png(20000, 20000), "20000x20000 PNG image (400.0 megapixels)"),
         "65000x65000 JPEG": (lambda jpeg: _jpeg_claiming(jpeg, 65000, 65000),
                              "65000x65000 JPEG image (4225.0 megapixels)")}


@pytest.mark.parametrize("pillow_limit", [None, 1000, Image.MAX_IMAGE_PIXELS])
def test_pillow_limit_is_the_applications_and_never_changed(astronaut_path, astronaut_jpeg, pillow_limit,
                                                             monkeypatch):
    """edgeface's limit decides, whatever the application set as Pillow's (None: no check; 1000: stricter than any
    photo; Pillow's default), and Pillow's setting is the same before, during and after every load."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    seen = []
    real_open = Image.open

    def spying_open(*args, **kwargs):
        seen.append(Image.MAX_IMAGE_PIXELS)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", spying_open)
    reference = cv2.imread(str(astronaut_path))
    np.testing.assert_array_equal(load_image(astronaut_path), reference)  # 262144 pixels: over 2 x 1000
    np.testing.assert_array_equal(load_image(astronaut_jpeg), reference)
    for name, (make, declared) in BOMBS.items():
        with pytest.raises(EdgefaceError) as error:
            load_image(make(astronaut_jpeg))
        assert str(error.value) == (f"image bytes ({len(make(astronaut_jpeg))} bytes) declares a {declared}, over "
                                    f"edgeface's limit of 200 megapixels: {LIMIT_HINT}"), name
    assert seen and all(limit == pillow_limit for limit in seen)
    assert Image.MAX_IMAGE_PIXELS == pillow_limit


def test_pillow_bomb_warning_as_an_error_does_not_refuse_a_photo(astronaut_path, monkeypatch):
    """An application that turns warnings into errors makes Pillow raise DecompressionBombWarning between its limit
    and twice it: caught where the header is read, and edgeface's own limit decides."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)  # the 512x512 photo is between 200000 and 400000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Image.DecompressionBombWarning):
            Image.open(astronaut_path)
        np.testing.assert_array_equal(load_image(astronaut_path), cv2.imread(str(astronaut_path)))
        monkeypatch.setenv("EDGEFACE_MAX_PIXELS", "100000")
        with pytest.raises(EdgefaceError) as error:
            load_image(astronaut_path)
    assert str(error.value) == (f"{astronaut_path} declares a 512x512 JPEG image (0.3 megapixels), over edgeface's "
                                f"limit of 0.1 megapixels: {LIMIT_HINT}")


def test_a_format_that_checks_pillows_limit_itself_is_one_line(astronaut_jpeg, monkeypatch):
    import edgeface.core.images

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)

    def refusing(file):
        raise Image.DecompressionBombError("Image size (262144 pixels) exceeds limit of 2000 pixels, could be "
                                           "decompression bomb DOS attack.")

    monkeypatch.setattr(edgeface.core.images, "_open_past_pillow_limit", refusing)
    with pytest.raises(EdgefaceError) as error:
        load_image(astronaut_jpeg)
    assert str(error.value) == (
        f"image bytes ({len(astronaut_jpeg)} bytes) was refused by Pillow as a possible decompression bomb (Image "
        "size (262144 pixels) exceeds limit of 2000 pixels, could be decompression bomb DOS attack.); edgeface "
        "reads images of at most 200 megapixels")


def test_an_8000x6000_photo_is_read(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_png(8000, 6000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning from Pillow (48 megapixels)
        image = load_image(path)
    assert image.shape == (6000, 8000, 3) and image.dtype == np.uint8 and not image.any()


def test_decoding_leaves_file_descriptors_alone(tmp_path, astronaut_path, monkeypatch):
    """No process-wide redirection of stderr while decoding: another thread's messages must get through."""
    image = cv2.imread(str(astronaut_path))
    png = cv2.imencode(".png", image)[1].tobytes()
    (tmp_path / "cut.png").write_bytes(png[:len(png) // 2])

    def forbidden(*args):
        raise AssertionError("load_image redirected a file descriptor")

    with monkeypatch.context() as patched:  # only around the loads: pytest's own capture uses dup2
        patched.setattr(os, "dup", forbidden)
        patched.setattr(os, "dup2", forbidden)
        np.testing.assert_array_equal(load_image(astronaut_path), image)
        with pytest.raises(EdgefaceError) as error:
            load_image(tmp_path / "cut.png")
    assert str(error.value) == (f"{tmp_path / 'cut.png'} could not be decoded: a 512x512 PNG file that is "
                                "truncated or corrupt (or a format OpenCV cannot read)")


@pytest.mark.parametrize("stage", ["header", "decode"])
def test_threads_read_headers_and_decode_at_the_same_time(astronaut_path, stage, monkeypatch):
    """Two threads are inside Pillow's header reading (or OpenCV's decoding) together: nothing serialises them.
    With a lock around either, the barrier would never fill and the loads would fail."""
    barrier = threading.Barrier(2, timeout=20)
    module, name = (Image, "open") if stage == "header" else (cv2, "imdecode")
    real = getattr(module, name)

    def meeting(*args, **kwargs):
        barrier.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, meeting)
    results: list = [None, None]

    def load(i):
        try:
            results[i] = load_image(astronaut_path)
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[i] = exc

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    reference = cv2.imread(str(astronaut_path))
    for result in results:
        assert isinstance(result, np.ndarray), result
        np.testing.assert_array_equal(result, reference)


def test_opencv_errors_are_one_line_without_its_source_location(astronaut_jpeg, monkeypatch):
    """A cv2.error (e.g. over $OPENCV_IO_MAX_IMAGE_PIXELS) reads as OpenCV's reason, not its C++ file and line."""
    def failing(*args):
        return cv2.cvtColor(np.zeros((2, 2, 5), np.uint8), cv2.COLOR_BGR2GRAY)  # raises cv2.error

    with pytest.raises(cv2.error) as raised:
        failing()
    monkeypatch.setattr(cv2, "imdecode", failing)
    with pytest.raises(EdgefaceError) as error:
        load_image(astronaut_jpeg)
    message = str(error.value)
    assert message == (f"image bytes ({len(astronaut_jpeg)} bytes) could not be decoded by OpenCV: Invalid number "
                       "of channels in input image: 'VScn::contains(scn)' where 'scn' is 5")
    assert "\n" in raised.value.err and str(raised.value).startswith("OpenCV(")  # what the message must not be


def test_output_names_never_give_two_images_one_name(tmp_path):
    names = ["a.jpg", "a.png", "a.jpg.png", "b.v1.jpg", "b.v2.jpg", "sub/a.jpg", "sub/c.PNG"]
    paths = [tmp_path / name for name in names]
    assert output_names(paths, tmp_path) == {
        tmp_path / "a.jpg": "a.jpg", tmp_path / "a.png": "a.png", tmp_path / "a.jpg.png": "a.jpg.png",
        tmp_path / "b.v1.jpg": "b.v1", tmp_path / "b.v2.jpg": "b.v2", tmp_path / "sub/a.jpg": str(Path("sub/a")),
        tmp_path / "sub/c.PNG": str(Path("sub/c"))}


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
