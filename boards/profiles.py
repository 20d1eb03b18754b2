"""Board profiles: data (``boards/*.toml``, shipped as package data ``edgeface.boards``) that set the defaults of
export, run and bench for one device: target, runtime, precision, input size, threads."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from importlib import resources
from typing import Any

import tomllib
from edgeface.export import resolve_precision, resolve_target
from edgeface.runtimes import get_runtime_class

from edgeface.core.errors import EdgefaceError


@dataclass(frozen=True)
class Board:
    name: str
    title: str
    arch: str
    cpu: str
    accelerator: str
    target: str
    runtime: str
    precision: str
    threads: int
    notes: str
    imgsz: tuple[int, int] | None = None  # None with dynamic = true
    dynamic: bool = False
    opset: int | None = None  # the newest ONNX opset the board's TensorRT parses, where it is older

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parse(name: str, data: dict[str, Any]) -> Board:
    fields = {f.name for f in dataclasses.fields(Board)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise EdgefaceError(f"board profile {name}: unknown keys {unknown} (known: {sorted(fields)})")
    if "imgsz" in data:
        data["imgsz"] = tuple(data["imgsz"])
    try:
        board = Board(**data)
    except TypeError as exc:
        raise EdgefaceError(f"board profile {name}: {exc}") from None
    resolve_precision(resolve_target(board.target), board.precision)  # raises on nonsense
    get_runtime_class(board.runtime)
    if (board.imgsz is None) != board.dynamic:
        raise EdgefaceError(f"board profile {name}: give either imgsz or dynamic = true")
    return board


def list_boards() -> list[Board]:
    files = sorted(f for f in resources.files("edgeface.boards").iterdir() if f.name.endswith(".toml"))
    return [_parse(f.name, tomllib.loads(f.read_text())) for f in files]


def get_board(name: str) -> Board:
    boards = {b.name: b for b in list_boards()}
    if name not in boards:
        close = difflib.get_close_matches(name, list(boards), n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise EdgefaceError(f"unknown board {name!r}{hint} (boards: {', '.join(boards)}; see `edgeface boards`)")
    return boards[name]
