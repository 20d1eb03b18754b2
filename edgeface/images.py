"""Reading images into the one form the pipeline takes (H x W x 3 BGR uint8), and drawing results."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from edgeface.errors import EdgefaceError
from edgeface.face import Face

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Largest image edgeface decodes, in pixels (width x height as the file declares it). 200 megapixels lets the
# largest phone photos through (200 MP sensors: 16320 x 12240; 108 MP: 12000 x 9000) and keeps a decoded image
# under 600 MB (3 bytes a pixel). $EDGEFACE_MAX_PIXELS overrides it.
MAX_PIXELS = 200_000_000
# Most bytes a file may hold per declared pixel, plus a fixed allowance for metadata (EXIF, ICC, thumbnails, a
# motion photo's video): 8 is 16-bit RGBA uncompressed, more than any supported format needs.
MAX_BYTES_PER_PIXEL = 8
METADATA_BYTES = 64 * 2**20

ImageInput = str | os.PathLike | np.ndarray | Image.Image | bytes | bytearray | memoryview
ACCEPTED = ("a path (str or os.PathLike), a numpy array (H x W x 3 BGR uint8), a PIL.Image, "
            "or the bytes of an encoded image (JPEG, PNG, ...)")


def max_pixels() -> int:
    """The pixel limit in force: $EDGEFACE_MAX_PIXELS if set, else :data:`MAX_PIXELS`."""
    return env_limit("EDGEFACE_MAX_PIXELS", MAX_PIXELS)


def env_limit(name: str, default: int) -> int:
    """A positive whole number from environment variable ``name`` (``_`` separators allowed), else ``default``."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise EdgefaceError(f"{name}={text!r} is not a positive whole number of pixels (e.g. {default})")
    return value


def load_image(image: ImageInput) -> np.ndarray:
    """An image as H x W x 3 BGR uint8 (C-contiguous).

    ``image`` is one of:

    - a path (``str`` or ``os.PathLike``) of a JPEG, PNG, BMP, WebP or TIFF file, decoded with OpenCV
      (``cv2.IMREAD_COLOR``: EXIF orientation applied, 16-bit scaled to 8, alpha dropped);
    - ``bytes`` / ``bytearray`` / ``memoryview`` holding such a file's contents, decoded the same way;
    - a numpy array as OpenCV gives it: H x W x 3 BGR, H x W x 4 BGRA (alpha dropped), H x W or H x W x 1
      grayscale, dtype uint8; views and non-contiguous arrays are copied into a contiguous one;
    - a ``PIL.Image`` (RGB, RGBA, L, LA, P, 1, CMYK, I;16 and other modes Pillow converts to RGB), reordered to
      BGR; 16-bit grayscale is scaled to 8 bits as OpenCV does (value >> 8).

    Files and bytes are checked before decoding: the header (read with Pillow) must declare at most
    ``max_pixels()`` pixels, width x height: :data:`MAX_PIXELS` = 200 000 000 by default, set
    ``EDGEFACE_MAX_PIXELS`` to change it (decoding takes 3 bytes a pixel); the file may hold at most 8 bytes a
    declared pixel plus 64 MB of metadata. PIL images are held to the same pixel limit.

    Raises :class:`~edgeface.errors.EdgefaceError`, with one line saying what is wrong, for: a missing,
    unreadable (permission), empty or directory path; data that is not an image; a truncated or corrupt file
    OpenCV cannot decode; an image over the pixel limit; an array of another dtype or shape; any other type.
    """
    if isinstance(image, np.ndarray):
        return _as_bgr(image, "image array")
    if isinstance(image, Image.Image):
        return _from_pil(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = np.frombuffer(image, np.uint8)
        return _decode(io.BytesIO(image), data, f"image bytes ({data.size} bytes)")
    if isinstance(image, (str, os.PathLike)):
        return _load_file(Path(image))
    raise EdgefaceError(f"cannot read an image from an object of type {type(image).__qualname__}: give {ACCEPTED}")


def _load_file(path: Path) -> np.ndarray:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise EdgefaceError(f"image not found: {path}") from None
    except (OSError, ValueError) as exc:  # a name longer than the file system allows, a NUL byte, ...
        raise EdgefaceError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if stat.S_ISDIR(mode):
        raise EdgefaceError(f"{path} is a directory, not an image file")
    if not stat.S_ISREG(mode):  # a pipe or a device would block or never end
        raise EdgefaceError(f"{path} is not a regular file (a pipe, socket or device); give an image file")
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise EdgefaceError(f"image not found: {path}") from None
    except PermissionError:
        raise EdgefaceError(f"cannot read {path}: permission denied (check the file's permissions)") from None
    except (OSError, ValueError) as exc:  # e.g. a name with a NUL byte, an I/O error
        raise EdgefaceError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    with file:
        return _decode(file, None, str(path), os.fstat(file.fileno()).st_size)


def _decode(file, data: np.ndarray | None, what: str, size: int | None = None) -> np.ndarray:
    """Checks the header of ``file`` (a binary file object) and decodes it with OpenCV; ``data`` is its contents
    when already in memory (read from ``file`` otherwise, only once the header has passed)."""
    size = data.size if data is not None else size
    if size == 0:
        raise EdgefaceError(f"{what} could not be decoded as an image: it is empty (0 bytes)")
    width, height, kind = _header(file, what)
    limit = max_pixels()
    if width * height > limit:
        raise EdgefaceError(
            f"{what} declares a {width}x{height} {kind} image ({width * height / 1e6:.1f} megapixels), over "
            f"edgeface's limit of {limit / 1e6:g} megapixels: set EDGEFACE_MAX_PIXELS to raise it if the image is "
            "genuine")
    if size > width * height * MAX_BYTES_PER_PIXEL + METADATA_BYTES:
        raise EdgefaceError(f"{what} is {size / 2**20:.0f} MB, far more than a {width}x{height} {kind} image "
                            "needs: not a valid image file")
    if data is None:
        file.seek(0)
        data = np.frombuffer(file.read(), np.uint8)
    try:
        with _quiet_stderr():  # libjpeg / libpng print their own warnings; the outcome is reported below
            decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error as exc:  # e.g. over OpenCV's own size limit ($OPENCV_IO_MAX_IMAGE_PIXELS)
        raise EdgefaceError(f"{what} could not be decoded by OpenCV: {' '.join(str(exc).split())}") from None
    if decoded is None:
        raise EdgefaceError(f"{what} could not be decoded: a {width}x{height} {kind} file that is truncated or "
                            "corrupt (or a format OpenCV cannot read)")
    return decoded


def _header(file, what: str) -> tuple[int, int, str]:
    """(width, height, format) as the file's header declares them, read by Pillow without decoding pixels."""
    with _PILLOW_LOCK:
        # edgeface applies its own (configurable) limit to the declared size; Pillow's would refuse before
        # telling the size. Restored at once; the lock keeps concurrent loads from restoring it early.
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(file) as header:
                return header.width, header.height, header.format or "image"
        except Image.UnidentifiedImageError:
            raise EdgefaceError(f"{what} could not be decoded as an image: not an image file (or a truncated one); "
                                f"supported formats include {', '.join(IMAGE_SUFFIXES)}") from None
        except (OSError, SyntaxError, ValueError) as exc:  # what Pillow raises on a broken header
            raise EdgefaceError(f"{what} is truncated or corrupt: its image header cannot be read ({exc})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


_PILLOW_LOCK = threading.Lock()
_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_stderr():
    """Sends file descriptor 2 to the null device for the duration: the C image libraries write there directly,
    below OpenCV's log level."""
    with _STDERR_LOCK:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all: nothing to silence
            yield
            return
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(null)


def _from_pil(image: Image.Image) -> np.ndarray:
    limit = max_pixels()
    if image.width * image.height > limit:  # a lazily opened image would decode on conversion
        raise EdgefaceError(f"PIL image of {image.width}x{image.height} pixels is over edgeface's limit of "
                            f"{limit / 1e6:g} megapixels: set EDGEFACE_MAX_PIXELS to raise it")
    if image.mode.startswith("I;16"):  # 16-bit grayscale: keep the high byte, as OpenCV does for 16-bit files
        return _as_bgr((np.asarray(image) >> 8).astype(np.uint8), "PIL image")
    if image.mode in ("L", "LA"):
        return _as_bgr(np.asarray(image.convert("L")), "PIL image")
    try:
        rgb = np.asarray(image.convert("RGB"))
    except (ValueError, OSError) as exc:
        raise EdgefaceError(f"PIL image of mode {image.mode} cannot be converted to RGB ({exc})") from None
    return np.ascontiguousarray(rgb[..., ::-1])


def _as_bgr(array: np.ndarray, what: str) -> np.ndarray:
    if array.size == 0:
        raise EdgefaceError(f"{what} is empty (shape {array.shape})")
    if array.dtype != np.uint8:
        raise EdgefaceError(
            f"{what} has dtype {array.dtype}; edgeface takes uint8 pixels 0-255 "
            "(for float images in 0-1 use (image * 255).round().astype(np.uint8))"
        )
    array = np.ascontiguousarray(array)  # views (crops, strides, [..., ::-1]) become plain arrays for OpenCV
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1):
        return cv2.cvtColor(array.reshape(array.shape[:2]), cv2.COLOR_GRAY2BGR)
    if array.ndim == 3 and array.shape[2] == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2BGR)
    if array.ndim == 3 and array.shape[2] == 3:
        return array
    raise EdgefaceError(
        f"{what} has shape {array.shape}; expected H x W x 3 (BGR), H x W x 4 (BGRA) or H x W (grayscale)"
    )


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


# BGR colours per landmark, in LANDMARK_NAMES order.
_LANDMARK_COLORS = ((0, 0, 255), (0, 255, 255), (255, 0, 255), (0, 255, 0), (255, 0, 0))


def draw_faces(image: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
    """A copy of ``image`` with boxes, scores and landmarks drawn."""
    canvas = image.copy()
    thickness = max(1, round(max(canvas.shape[:2]) / 500))
    for face in faces:
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 255, 0), thickness)
        cv2.putText(canvas, f"{face.score:.2f}", (x1, max(0, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4 * thickness, (255, 255, 255), thickness)
        for (x, y), color in zip(face.landmarks, _LANDMARK_COLORS):
            cv2.circle(canvas, (int(round(x)), int(round(y))), thickness + 1, color, -1)
    return canvas
