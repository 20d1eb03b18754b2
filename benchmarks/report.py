"""Bench reports: load and validate the JSON records, render them as Markdown and CSV tables, and merge the reports
of many devices into one cross-device table."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeface.benchmarks.bench import SCHEMA, SCHEMA_VERSION

from edgeface.core.errors import EdgefaceError, first_line
from edgeface.core.files import atomic_write

# AP as a fraction (0-1), as WIDER FACE publishes it; its change against FP32 PyTorch in AP points (1 point = 0.01),
# as the README states targets. threads and cores tell apart runs of one device.
COLUMNS = ("device", "board", "artifact", "target", "precision", "runtime", "threads", "cores", "size_mb",
           "ap_images", "ap_easy", "ap_medium", "ap_hard", "delta_easy_pts", "delta_medium_pts", "delta_hard_pts",
           "latency_size", "p50_ms", "infer_p50_ms", "fps", "placement", "status", "reason")
CSV_HEADER = ",".join(COLUMNS[:3])  # how a bench table written by to_csv starts


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """A ``bench.json`` record, checked: readable JSON, an object of the edgeface.bench schema at this version, and
    every field the tables and plots read of the type ``edgeface bench`` writes. Raises
    :class:`~edgeface.core.errors.EdgefaceError` in one line naming the file (and the field)."""
    path = Path(path)
    expected = "expected a bench.json written by `edgeface bench`"
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:  # missing, a folder, permissions; a binary file
        raise EdgefaceError(f"cannot read bench report {path}: {first_line(exc)} ({expected})") from None
    if not text.strip():
        raise EdgefaceError(f"bench report {path} is empty; {expected}")
    for start, kind in ((CSV_HEADER, "CSV"), ("| device |", "Markdown"), ("# edgeface bench", "Markdown")):
        if text.lstrip().startswith(start):
            raise EdgefaceError(f"{path} is a bench table ({kind}), not a bench report; merge the bench.json files "
                                "that `edgeface bench` writes beside the tables")
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else first_line(exc)
        raise EdgefaceError(f"bench report {path} is not valid JSON ({reason}); {expected}") from None
    if not isinstance(record, dict):
        raise EdgefaceError(f"bench report {path} holds {_describe(record)}, not a JSON object; {expected}")
    if record.get("schema") != SCHEMA:
        raise EdgefaceError(f"{path} is not an edgeface bench report (schema {_short(record.get('schema'))}, "
                            f"expected {SCHEMA!r})")
    if record.get("schema_version") != SCHEMA_VERSION:
        raise EdgefaceError(f"{path}: bench report schema version {_short(record.get('schema_version'))} is not "
                            f"{SCHEMA_VERSION}; re-run `edgeface bench` with this version")
    problem = _check(record, REPORT_FIELDS, "")
    if problem:
        raise EdgefaceError(f"bench report {path}: {problem} (as `edgeface bench` writes it); re-run the bench or "
                            "fix the file")
    return record


# What the tables (rows, header) and plots read of a record, with the types `edgeface bench` writes. A dict maps
# field -> spec; {"*": spec} is a mapping of any keys; a one-item list is a list of that; a tuple holds the types
# allowed; "!" after a field name marks it required. Other fields are not read and not checked.
_NUM, _TEXT, _NONE = (int, float), (str,), (type(None),)
_MS = {"p50!": _NUM, "p90": _NUM, "p99": _NUM}
_LATENCY = {"size!": _TEXT, "image": ([int], *_NONE), "input": ([int], *_NONE), "total_ms!": _MS,
            "infer_ms": (_MS, *_NONE), "pre_ms": (_MS, *_NONE), "post_ms": (_MS, *_NONE), "fps": (*_NUM, *_NONE)}
_ACCURACY = {"num_images": (int, *_NONE), "ap": {"*": _NUM}, "delta_ap": ({"*": (*_NUM, *_NONE)}, *_NONE),
             "pr_curves": {"*": [[_NUM]]}}
_RESULT = {"name!": _TEXT, "status": (str, *_NONE), "target": (str, *_NONE), "precision": (str, *_NONE),
           "runtime": ({"runtime": (str, *_NONE),
                        "placement": ({"npu_nodes": int, "total_nodes": int, "cpu_fallback": [str]}, *_NONE)},
                       str, *_NONE),
           "size_bytes": (*_NUM, *_NONE),
           "reason": (str, *_NONE), "latency": ([_LATENCY], *_NONE), "accuracy": (_ACCURACY, *_NONE)}
REPORT_FIELDS = {
    "created": _TEXT,
    "device!": {"hostname": (str, *_NONE), "board": (str, *_NONE), "cores": (int, *_NONE), "cpu": (str, *_NONE),
                "os": (str, *_NONE), "gpu": (str, *_NONE), "libraries": ({"*": (str, *_NONE)}, *_NONE)},
    "settings": ({"threads": (int, *_NONE), "cpus": ([int], *_NONE), "sizes": ([str], *_NONE),
                  "warmup": (int, *_NONE), "iters": (int, *_NONE), "limit": (int, *_NONE),
                  "baseline": (str, *_NONE)}, *_NONE),
    "results!": [_RESULT],
}
_TYPE_NAMES = {int: "a whole number", float: "a number", str: "a string", type(None): "null", dict: "an object",
               list: "a list"}


def _check(value: Any, spec: Any, field: str) -> str | None:
    """The first place where ``value`` does not match ``spec`` (see REPORT_FIELDS), as "field X is ..., expected
    ...", or None."""
    options = spec if isinstance(spec, tuple) else (spec,)
    for option in options:
        if isinstance(option, dict) and isinstance(value, dict):
            return _check_object(value, option, field)
        if isinstance(option, list) and isinstance(value, list):
            for i, item in enumerate(value):
                problem = _check(item, option[0], f"{field}[{i}]")
                if problem:
                    return problem
            return None
        if isinstance(option, type) and isinstance(value, option) and not (isinstance(value, bool)
                                                                            and option is not bool):
            if option in (int, float) and not _in_float_range(value):
                # Infinity, or an integer no float holds: the tables and plots could not use it
                return f"field {field or '(top level)'} is {_describe(value)}, expected a finite number"
            return None
    names = dict.fromkeys(_TYPE_NAMES[o if isinstance(o, type) else type(o)] for o in options)
    if "a number" in names:
        names.pop("a whole number", None)
    wanted = " or ".join(names)
    return f"field {field or '(top level)'} is {_describe(value)}, expected {wanted}"


def _in_float_range(value: float) -> bool:
    try:
        return not math.isinf(float(value))  # NaN passes: bench writes it for an AP it could not compute
    except OverflowError:
        return False


def _check_object(value: dict, spec: dict, field: str) -> str | None:
    prefix = f"{field}." if field else ""
    if "*" in spec:
        for key, item in value.items():
            problem = _check(item, spec["*"], f"{prefix}{key}")
            if problem:
                return problem
        return None
    for key, item_spec in spec.items():
        name = key.rstrip("!")
        if name not in value:
            if key.endswith("!"):
                return f"field {prefix}{name} is missing"
            continue
        problem = _check(value[name], item_spec, f"{prefix}{name}")
        if problem:
            return problem
    return None


def _describe(value: Any) -> str:
    """A JSON value for an error message: its kind and its (shortened) text."""
    if isinstance(value, bool):
        return f"the boolean {_short(value)}"
    if value is None:
        return "null"
    return f"{_TYPE_NAMES.get(type(value), type(value).__name__)} {_short(value)}"


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
            "placement": _placement(runtime), "status": result.get("status"), "reason": result.get("reason") or "",
        })
    return out


def _placement(runtime: Any) -> str:
    """Where an NPU artifact's graph runs, as its manifest records it (the runtime's ``placement``): "NPU 487/487",
    or with the nodes that fall back to the CPU named, never hidden. Blank for CPU / GPU runtimes."""
    place = runtime.get("placement") if isinstance(runtime, dict) else None
    if not place:
        return ""
    text = f"NPU {place['npu_nodes']}/{place['total_nodes']}"
    fallback = place.get("cpu_fallback") or []
    if fallback:
        shown = ", ".join(fallback[:3]) + (f" and {len(fallback) - 3} more" if len(fallback) > 3 else "")
        text += f"; CPU fallback: {shown}"
    return text


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
