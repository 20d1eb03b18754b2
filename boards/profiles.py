"""Board profiles: data (``boards/*.toml``, shipped as package data ``edgeface.boards``) that set the defaults of
export, run and bench for one device: target, runtime, precision, input size, threads, target options."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import tomllib
from edgeface.export import check_options, get_spec, resolve_precision, resolve_target
from edgeface.runtimes import get_runtime_class, runtimes_for

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
    # The target's options (its spec's ``options``, by name; a TOML table: ``options = { opset = 13 }``), checked
    # as an export checks them and given to `edgeface export --board` as defaults of its flags / export options.
    options: dict[str, Any] = field(default_factory=dict, hash=False)

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
    try:  # what the target and runtime declare (their specs), checked as an export or a run would
        target = resolve_target(board.target)
        resolve_precision(target, board.precision)
        if board.runtime not in runtimes_for(target):
            get_runtime_class(board.runtime)  # an unknown name first
            raise EdgefaceError(f"runtime {board.runtime!r} does not run {target} bundles (runtimes that do: "
                                f"{', '.join(runtimes_for(target))})")
        if not isinstance(board.options, dict):
            raise EdgefaceError(f"options {board.options!r}: give a table of the {target} target's options")
        check_options(target, board.options)
        if board.dynamic and not get_spec(target).dynamic:
            raise EdgefaceError(f"dynamic = true is not available for {target}: {get_spec(target).static_only}")
    except EdgefaceError as exc:
        raise EdgefaceError(f"board profile {name}: {exc}") from None
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
