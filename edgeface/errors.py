"""The one exception type users see: its message says what was wrong and what to do."""


class EdgefaceError(Exception):
    """A problem with the user's input or environment, reported without a traceback by the CLI."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name (libraries raise multi-line C++
    reports, and some raise with no message at all)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
