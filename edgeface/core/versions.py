"""Versions: edgeface's own, and those of the libraries a bundle or report records."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"


def library_versions(*names: str) -> dict[str, str]:
    """``{distribution name: installed version}`` for the named distributions that are installed (absent ones are
    left out)."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
