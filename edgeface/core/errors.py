"""The one exception type users see (its message says what was wrong and what to do), and the helpers that
word one."""

import importlib
import importlib.util

# The extra that brings PyTorch (and the ONNX exporter): a device install (`pip install edgeface`) has neither.
TORCH_EXTRA = "export"


class EdgefaceError(Exception):
    """A problem with the user's input or environment, reported without a traceback by the CLI."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name (libraries raise multi-line C++
    reports, and some raise with no message at all)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency, or raise :class:`EdgefaceError` saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EdgefaceError(
            f"{purpose} needs the Python package providing '{module}' ({first_line(exc)}); install it with "
            f"`pip install edgeface[{extra}]`"
        ) from None


def torch_installed() -> bool:
    """Whether PyTorch can be imported here, found without importing it (that alone takes about a second)."""
    return importlib.util.find_spec("torch") is not None


def needs_torch(purpose: str) -> EdgefaceError:
    """The one-line error for what only PyTorch does, on an install without it."""
    return EdgefaceError(f"{purpose} needs PyTorch, which is not installed here (without it edgeface runs exported "
                         f"bundles, --model DIR, and the default model as ONNX); install it with "
                         f"`pip install edgeface[{TORCH_EXTRA}]`")


def require_torch(purpose: str) -> None:
    """Raise :func:`needs_torch`'s error unless PyTorch is installed."""
    if not torch_installed():
        raise needs_torch(purpose)


def with_article(word: str) -> str:
    """"a tflite", "an onnx": a target's name in a message."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"
