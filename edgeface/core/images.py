"""Reading images into the one form the pipeline takes (H x W x 3 BGR uint8), and drawing results."""

from __future__ import annotations

import io
import os
import stat
import struct
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from edgeface.core.errors import EdgefaceError
from edgeface.core.face import Face

# The bundled public-domain photograph (NASA, astronaut Eileen Collins): parity references, checks and examples.
ASTRONAUT = Path(str(resources.files("edgeface") / "assets" / "astronaut.jpg"))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Largest image edgeface decodes, in pixels (width x height as the file declares it). 200 megapixels lets the
# largest phone photos through (200 MP sensors: 16320 x 12240; 108 MP: 12000 x 9000) and keeps a decoded image
# under 573 MiB (3 bytes a pixel). $EDGEFACE_MAX_PIXELS overrides it. It is edgeface's own limit, independent of
# Pillow's (PIL.Image.MAX_IMAGE_PIXELS, which guards decoding with Pillow and is the application's to set):
# edgeface only reads the header with Pillow and decodes with OpenCV.
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
    declared pixel plus 64 MiB of metadata. PIL images are held to the same pixel limit. Pillow's own
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, the application's setting) is never changed, and
    edgeface's limit is the one that decides: where Pillow's stops it from opening a header, the declared size is
    read past it (Pillow's limit guards decoding with Pillow; edgeface decodes with OpenCV).

    Safe to call from many threads at once: nothing is locked and no process-wide setting (file descriptors,
    Pillow's or OpenCV's settings) is changed. The C image libraries may print their own warning on a damaged
    file (e.g. ``libpng error: ...``) on the process's stderr before the :class:`EdgefaceError`; the ``edgeface``
    command silences them, a program using the library decides for itself.

    Raises :class:`~edgeface.core.errors.EdgefaceError`, with one line saying what is wrong, for: a missing,
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
        raise EdgefaceError(f"{what} is {size / 2**20:.0f} MiB, far more than a {width}x{height} {kind} image "
                            "needs: not a valid image file")
    if data is None:
        try:
            file.seek(0)
            data = np.frombuffer(file.read(), np.uint8)
        except OSError as exc:  # an I/O error on a damaged disk or a network file system
            raise EdgefaceError(f"cannot read {what}: {exc.strerror or exc}") from None
    try:
        decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error as exc:  # e.g. over OpenCV's own size limit ($OPENCV_IO_MAX_IMAGE_PIXELS)
        # OpenCV's reason (cv2.error.err, e.g. "pixels <= CV_IO_MAX_IMAGE_PIXELS"; its lines quoted with "> ") on
        # one line, without the C++ file and line that fill the first line of str(exc).
        lines = (getattr(exc, "err", "") or str(exc)).splitlines()
        reason = " ".join(" ".join(line.strip().removeprefix(">").split()) for line in lines if line.strip())
        raise EdgefaceError(f"{what} could not be decoded by OpenCV: {reason or type(exc).__name__}") from None
    if decoded is None:
        raise EdgefaceError(f"{what} could not be decoded: a {width}x{height} {kind} file that is truncated or "
                            "corrupt (or a format OpenCV cannot read)")
    return decoded


def _header(file, what: str) -> tuple[int, int, str]:
    """(width, height, format) as the file's header declares them, read by Pillow without decoding pixels.

    Pillow's own decompression-bomb check (``PIL.Image.MAX_IMAGE_PIXELS``: a warning above it, an error above
    twice it) is the application's setting for decoding with Pillow; edgeface leaves it as it is. Where it stops
    :func:`PIL.Image.open` (``DecompressionBombError``, or ``DecompressionBombWarning`` where the application turns
    warnings into errors), the declared size is read by the format's own header parser instead, and edgeface's
    limit decides, so that a bomb gets edgeface's message and a photo within edgeface's limit is still read."""
    try:
        try:
            with Image.open(file) as header:
                return header.width, header.height, header.format or "image"
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            with _open_past_pillow_limit(file) as header:
                return header.width, header.height, header.format or "image"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # A format whose parser checks Pillow's limit itself while reading its header (GIF frames, ICO, ICNS).
        raise EdgefaceError(f"{what} was refused by Pillow as a possible decompression bomb ({exc}); edgeface "
                            f"reads images of at most {max_pixels() / 1e6:g} megapixels") from None
    except Image.UnidentifiedImageError:
        raise EdgefaceError(f"{what} could not be decoded as an image: not an image file (or a truncated one); "
                            f"supported formats include {', '.join(IMAGE_SUFFIXES)}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # what Pillow raises on a broken header
        raise EdgefaceError(f"{what} is truncated or corrupt: its image header cannot be read ({exc})") from None


def _open_past_pillow_limit(file) -> Image.Image:
    """What :func:`PIL.Image.open` does, less its decompression-bomb check: the first format plugin (in Pillow's
    registration order) that accepts the first bytes and parses the header. Nothing is decoded."""
    Image.init()
    file.seek(0)
    prefix = file.read(16)
    for name in list(Image.ID):
        factory, accept = Image.OPEN[name]
        accepted = not accept or accept(prefix)
        if not accepted or isinstance(accepted, str):  # a str is Pillow's reason for not opening it
            continue
        file.seek(0)
        try:
            return factory(file, "")
        except (SyntaxError, IndexError, TypeError, struct.error):  # not this format: try the next, as Pillow does
            continue
    raise Image.UnidentifiedImageError("cannot identify image file")


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


def output_names(paths: Sequence[Path], root: str | os.PathLike) -> dict[Path, str]:
    """The name each image under ``root`` gives its results (``detect --out``, ``run --save`` and ``run``'s frame
    names): its path relative to ``root`` without the extension (``sub/a.jpg`` -> ``sub/a``), or with it where
    that would be the name of another image's results too (``a.jpg`` and ``a.png`` -> ``a.jpg`` and ``a.png``), so
    that no image's results replace another's."""
    relative = {p: Path(p).relative_to(root) for p in paths}
    names = {p: str(r.with_suffix("")) for p, r in relative.items()}
    while True:
        counts = Counter(names.values())
        clashing = [p for p, name in names.items() if counts[name] > 1 and name != str(relative[p])]
        if not clashing:  # full relative paths are unique: this ends
            return names
        for p in clashing:
            names[p] = str(relative[p])


# BGR colours per landmark, in LANDMARK_NAMES order.
_LANDMARK_COLORS = ((0, 0, 255), (0, 255, 255), (255, 0, 255), (0, 255, 0), (255, 0, 0))


def draw_faces(image: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
    """A copy of ``image`` with boxes, scores (``#track_id score`` for a tracked face) and landmarks drawn."""
    canvas = image.copy()
    thickness = max(1, round(max(canvas.shape[:2]) / 500))
    for face in faces:
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 255, 0), thickness)
        label = f"{face.score:.2f}" if face.track_id is None else f"#{face.track_id} {face.score:.2f}"
        (_, text_height), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness, thickness)
        # above the box, or inside its top when the box touches the image's top edge
        text_y = y1 - 4 if y1 - 4 >= text_height else max(y1, 0) + text_height + 4
        cv2.putText(canvas, label, (max(x1, 0), text_y), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness, (255, 255, 255),
                    thickness)
        for (x, y), color in zip(face.landmarks, _LANDMARK_COLORS):
            cv2.circle(canvas, (int(round(x)), int(round(y))), thickness + 1, color, -1)
    return canvas
