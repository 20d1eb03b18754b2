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

# AP as a fraction (0-1), as WIDER FACE publishes it; its change against FP32 PyTorch in AP points (1 point = 0.01),
# as the README states targets. threads and cores tell apart runs of one device.
COLUMNS = ("device", "board", "artifact", "target", "precision", "runtime", "threads", "cores", "size_mb",
           "ap_images", "ap_easy", "ap_medium", "ap_hard", "delta_easy_pts", "delta_medium_pts", "delta_hard_pts",
           "latency_size", "p50_ms", "infer_p50_ms", "fps", "status", "reason")


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise EdgefaceError(f"cannot read bench report {path}: {exc}") from None
    if record.get("schema") != SCHEMA:
        raise EdgefaceError(f"{path} is not an edgeface bench report (schema {record.get('schema')!r})")
    if record.get("schema_version") != SCHEMA_VERSION:
        raise EdgefaceError(f"{path}: bench report schema version {record.get('schema_version')} is not "
                            f"{SCHEMA_VERSION}; re-run `edgeface bench` with this version")
    return record


def rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per benchmarked artifact; latency at the first measured size."""
    device = record["device"]
    settings = record.get("settings") or {}
    cpus = settings.get("cpus")
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
            "threads": _or_blank(settings.get("threads")),
            "cores": len(cpus) if cpus else _or_blank(device.get("cores")),
            "size_mb": round(result["size_bytes"] / 1e6, 2) if result.get("size_bytes") else "",
            "ap_images": _or_blank(accuracy.get("num_images")),
            "ap_easy": ap.get("easy", ""), "ap_medium": ap.get("medium", ""), "ap_hard": ap.get("hard", ""),
            **{f"delta_{k}_pts": round(delta[k] * 100, 2) if delta.get(k) is not None else ""
               for k in ("easy", "medium", "hard")},
            "latency_size": first.get("size", ""), "p50_ms": (first.get("total_ms") or {}).get("p50", ""),
            "infer_p50_ms": (first.get("infer_ms") or {}).get("p50", ""), "fps": first.get("fps", ""),
            "status": result.get("status"), "reason": result.get("reason") or "",
        })
    return out


def _or_blank(value: Any) -> Any:
    return "" if value is None else value


def _cell(column: str, value: Any) -> str:
    if isinstance(value, float):
        if column.startswith("delta_"):
            return f"{value:+.2f}"
        return f"{value:.4f}" if column.startswith("ap_") else f"{value:.4g}"
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


def header(record: dict[str, Any]) -> str:
    """Title, date, device, image count and settings of one bench record, in Markdown, for above its table."""
    device, settings = record.get("device") or {}, record.get("settings") or {}
    name = device.get("board") or device.get("hostname") or "unknown device"
    images = sorted({(r.get("accuracy") or {}).get("num_images") for r in record.get("results") or []} - {None})
    cpus = settings.get("cpus")
    lines = [f"# edgeface bench on {name}", "",
             f"- created: {record.get('created', 'unknown')}",
             f"- device: {device.get('hostname')}, {device.get('cpu')}, {device.get('cores')} cores, "
             f"{device.get('os')}, GPU {device.get('gpu') or 'none'}, edgeface "
             f"{(device.get('libraries') or {}).get('edgeface', '?')}",
             f"- settings: threads {settings.get('threads') or 'runtime default'}, cores "
             f"{', '.join(map(str, cpus)) if cpus else 'all'}, sizes {', '.join(settings.get('sizes') or [])}, "
             f"warmup {settings.get('warmup')}, iters {settings.get('iters')}"
             + (f", baseline {settings['baseline']}" if settings.get("baseline") else ""),
             "- accuracy: " + (f"WIDER FACE val AP on {', '.join(map(str, images))} images (spread over all events); "
                               "delta_*_pts: change in AP points (1 point = 0.01 AP) against FP32 PyTorch on the same "
                               "images and input" if images else "not measured"),
             "- latency: end to end (pre + infer + post), p50 in ms, at the first size", ""]
    return "\n".join(lines) + "\n"


def table_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``X.md`` and ``X.csv`` beside each other, whichever of them (or neither) ``path`` names."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix.lower() in (".md", ".csv", ".markdown", ".txt") else path
    return base.parent / f"{base.name}.md", base.parent / f"{base.name}.csv"


def write_tables(table: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str = "") -> tuple[Path, Path]:
    """``X.md`` (``title`` above the table) and ``X.csv`` side by side."""
    markdown_path, csv_path = table_paths(path)
    atomic_write(markdown_path, lambda tmp: tmp.write_text(title + to_markdown(table)))
    atomic_write(csv_path, lambda tmp: tmp.write_text(to_csv(table)))
    return markdown_path, csv_path
