"""The one exception type users see: its message says what was wrong and what to do."""


class EdgefaceError(Exception):
    """A problem with the user's input or environment, reported without a traceback by the CLI."""
