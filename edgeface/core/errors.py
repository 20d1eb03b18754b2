"""The one exception type users see (its message says what was wrong and what to do), and the helpers that
word one."""

import importlib


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
