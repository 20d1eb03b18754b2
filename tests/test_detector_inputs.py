"""Detector.detect takes every common image form, and refuses the rest in one line (issue 9)."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from edgeface import EdgefaceError

ACCEPTED = ("give a path (str or os.PathLike), a numpy array (H x W x 3 BGR uint8), a PIL.Image, or the bytes of "
            "an encoded image (JPEG, PNG, ...)")


@pytest.fixture(scope="module")
def astronaut(astronaut_path):
    return cv2.imread(str(astronaut_path))


@pytest.fixture(scope="module")
def reference(default_detector, astronaut):
    (face,) = default_detector.detect(astronaut)
    return face


def _one(faces):
    assert len(faces) == 1, faces
    return faces[0]


def test_encoded_bytes_and_paths(default_detector, astronaut_path, reference):
    data = astronaut_path.read_bytes()
    for image in (data, bytearray(data), memoryview(data), str(astronaut_path), astronaut_path):
        assert _one(default_detector.detect(image)) == reference, type(image)
    png = cv2.imencode(".png", cv2.imread(str(astronaut_path)))[1].tobytes()
    assert _one(default_detector.detect(png)) == reference  # lossless: the same pixels


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "CMYK"])
def test_pil_colour_images_are_reordered_to_bgr(default_detector, astronaut, reference, mode):
    pil = Image.fromarray(cv2.cvtColor(astronaut, cv2.COLOR_BGR2RGB))
    assert pil.mode == "RGB"
    face = _one(default_detector.detect(pil.convert(mode)))
    tolerance = 3 if mode == "P" else 0.01  # the palette has 256 colours
    assert face.box == pytest.approx(reference.box, abs=tolerance) and face.score > 0.99


def test_pil_grayscale_modes(default_detector, astronaut):
    gray = cv2.cvtColor(astronaut, cv2.COLOR_BGR2GRAY)
    expected = _one(default_detector.detect(gray))
    for image in (Image.fromarray(gray), Image.fromarray(gray).convert("LA"),
                  Image.fromarray(gray.astype(np.uint16) * 257)):  # 16-bit: the high byte is the 8-bit value
        assert image.mode in ("L", "LA", "I;16")
        assert _one(default_detector.detect(image)) == expected, image.mode


def test_pil_image_from_an_open_file_and_its_limit(default_detector, astronaut_path, reference, monkeypatch):
    with Image.open(astronaut_path) as lazy:  # not decoded yet
        face = _one(default_detector.detect(lazy))
    assert face.box == pytest.approx(reference.box, abs=1.5)  # Pillow's JPEG decoder, not OpenCV's
    monkeypatch.setenv("EDGEFACE_MAX_PIXELS", "250000")
    with Image.open(astronaut_path) as lazy, pytest.raises(EdgefaceError) as error:
        default_detector.detect(lazy)
    assert str(error.value) == ("PIL image of 512x512 pixels is over edgeface's limit of 0.25 megapixels: set "
                                "EDGEFACE_MAX_PIXELS to raise it")


def test_views_and_non_contiguous_arrays(default_detector, astronaut, reference):
    rgb = cv2.cvtColor(astronaut, cv2.COLOR_BGR2RGB)
    assert _one(default_detector.detect(rgb[..., ::-1])) == reference  # negative stride
    assert _one(default_detector.detect(np.asfortranarray(astronaut))) == reference
    assert _one(default_detector.detect(astronaut.transpose(1, 0, 2).transpose(1, 0, 2))) == reference
    padded = np.zeros((600, 600, 3), np.uint8)
    padded[50:562, 40:552] = astronaut
    crop = _one(default_detector.detect(padded[50:562, 40:552]))  # a view into a larger buffer
    assert crop == reference
    for view in (astronaut[:, ::-1], astronaut[::2, ::2], astronaut[100:400:3, 7::2]):  # strided views
        assert not view.flags.c_contiguous
        assert _one(default_detector.detect(view)) == _one(default_detector.detect(view.copy()))
    frozen = astronaut.copy()
    frozen.flags.writeable = False
    assert _one(default_detector.detect(frozen)) == reference


def test_mixed_list_and_empty_list(default_detector, astronaut, astronaut_path, reference):
    data = astronaut_path.read_bytes()
    pil = Image.fromarray(cv2.cvtColor(astronaut, cv2.COLOR_BGR2RGB))
    results = default_detector.detect([astronaut, str(astronaut_path), data, pil])
    assert [len(faces) for faces in results] == [1, 1, 1, 1]
    assert all(faces[0].box == pytest.approx(reference.box, abs=0.01) for faces in results)
    assert default_detector.detect((astronaut,))[0] == [reference]
    assert default_detector.detect([]) == []


@pytest.mark.parametrize("bad, message", [
    (42, f"cannot read an image from an object of type int: {ACCEPTED}"),
    (None, f"cannot read an image from an object of type NoneType: {ACCEPTED}"),
    ({"image": "a.jpg"}, f"cannot read an image from an object of type dict: {ACCEPTED}"),
    (io.BytesIO(b"\xff\xd8"), f"cannot read an image from an object of type BytesIO: {ACCEPTED}"),
    (b"GIF? no, plain text", "image bytes (19 bytes) could not be decoded as an image: not an image file (or a "
                             "truncated one); supported formats include .jpg, .jpeg, .png, .bmp, .webp, .tif, .tiff"),
    (np.zeros((4, 8, 8, 3), np.uint8), "image array has shape (4, 8, 8, 3); expected H x W x 3 (BGR), H x W x 4 "
                                       "(BGRA) or H x W (grayscale)"),
    (np.zeros((8, 8, 3), np.float32), "image array has dtype float32; edgeface takes uint8 pixels 0-255 (for float "
                                      "images in 0-1 use (image * 255).round().astype(np.uint8))"),
])
def test_other_inputs_are_refused_in_one_line(default_detector, bad, message):
    with pytest.raises(EdgefaceError) as error:
        default_detector.detect(bad)
    assert str(error.value) == message
    with pytest.raises(EdgefaceError) as error:
        default_detector.detect([np.zeros((8, 8, 3), np.uint8), bad])
    assert str(error.value) == message
