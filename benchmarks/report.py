"""Bench reports: load and validate the JSON records, render them as Markdown and CSV tables, and merge the reports
of many devices into one cross-device table."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeface.benchmarks.bench import SCHEMA, SCHEMA_VERSION
from edgeface.errors import EdgefaceError
from edgeface.files import atomic_write

COLUMNS = ("device", "board", "artifact", "target", "precision", "runtime", "size_mb", "ap_easy", "ap_medium",
           "ap_hard", "delta_hard", "latency_size", "p50_ms", "infer_p50_ms", "fps", "status", "reason")


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise EdgefaceError(f"cannot read bench report {path}: {exc}") from None
    if record.get("schema") != SCHEMA:
        raise EdgefaceError(f"{path} is not an edgeface bench report (schema {record.get('schema')!r})")
    if record.get("schema_version") != SCHEMA_VERSION:
        raise EdgefaceError(f"{path}: bench report schema version {record.get('schema_version')} is not "
                            f"{SCHEMA_VERSION}; re-run edgeface bench with this version")
    return record


def rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per benchmarked artifact; latency at the first measured size."""
    device = record["device"]
    out = []
    for result in record["results"]:
        accuracy = result.get("accuracy") or {}
        ap, delta = accuracy.get("ap") or {}, accuracy.get("delta_ap") or {}
        first = (result.get("latency") or [{}])[0]
        runtime = result.get("runtime") or {}
        out.append({
            "device": device.get("hostname"), "board": device.get("board") or "",
            "artifact": result.get("name"), "target": result.get("target"), "precision": result.get("precision"),
            "runtime": runtime.get("runtime") if isinstance(runtime, dict) else runtime,
            "size_mb": round(result["size_bytes"] / 1e6, 2) if result.get("size_bytes") else "",
            "ap_easy": ap.get("easy", ""), "ap_medium": ap.get("medium", ""), "ap_hard": ap.get("hard", ""),
            "delta_hard": delta.get("hard", ""),
            "latency_size": first.get("size", ""), "p50_ms": (first.get("total_ms") or {}).get("p50", ""),
            "infer_p50_ms": (first.get("infer_ms") or {}).get("p50", ""), "fps": first.get("fps", ""),
            "status": result.get("status"), "reason": result.get("reason") or "",
        })
    return out


def _cell(column: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if column.startswith(("ap_", "delta_")) else f"{value:.4g}"
    return "" if value is None else str(value)


def to_markdown(table: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(c, row[c]).replace("|", "/") for c in COLUMNS) + " |" for row in table]
    return "\n".join(lines) + "\n"


def to_csv(table: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()


def write_tables(table: Sequence[dict[str, Any]], markdown_path: str | os.PathLike) -> tuple[Path, Path]:
    """``X.md`` and ``X.csv`` side by side."""
    markdown_path = Path(markdown_path)
    atomic_write(markdown_path, lambda tmp: tmp.write_text(to_markdown(table)))
    csv_path = atomic_write(markdown_path.with_suffix(".csv"), lambda tmp: tmp.write_text(to_csv(table)))
    return markdown_path, csv_path
