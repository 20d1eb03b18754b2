"""``edgeface bench --all``: export every target x precision this machine can convert and bench each where its
runtime runs (needs PyTorch and the converters: the ``export`` extra)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgeface.benchmarks.bench import bench
from edgeface.export import specs
from edgeface.export.pipeline import export_bundle

from edgeface.core.errors import EdgefaceError

# Timed runs per size for a target whose runtime here is an emulator (TargetSpec.bench_limit).
EMULATED_ITERS = 10


def all_artifacts() -> list[tuple[str, str, tuple[int, int] | None]]:
    """Every (target, precision, input size) `bench --all` tries, from the targets' specs (``TargetSpec.bench``):
    dynamic models run at original scale (size None), static ones at their size."""
    return [(spec.name, precision, size) for spec in specs() for precision, size in spec.bench]


def bench_all(make_detector, *, out, weights: Any = "default", calib=None, calib_n: int = 100,
              progress: bool = True, **bench_options: Any) -> list[dict[str, Any]]:
    """Export every target x precision this machine can convert, bench each where its runtime runs, and record
    why any step failed (the table's status and reason columns). ``make_detector(bundle_dir)`` opens a bundle."""

    results = bench(lambda: make_detector(None), **bench_options, progress=progress)  # FP32 PyTorch first
    limits = {spec.name: spec.bench_limit for spec in specs()}
    for target, precision, imgsz in all_artifacts():
        name = f"{target}-{precision}-{'dynamic' if imgsz is None else f'{imgsz[0]}x{imgsz[1]}'}"
        entry: dict[str, Any] = {"name": name, "target": target, "precision": precision}
        try:
            started = time.perf_counter()
            bundle = export_bundle(target, precision=precision, out=Path(out) / "bundles" / name, weights=weights,
                                   imgsz=imgsz, dynamic=imgsz is None, calib=calib, calib_n=calib_n,
                                   progress=progress)
            entry["export_seconds"] = round(time.perf_counter() - started, 1)
        except EdgefaceError as exc:
            results.append({**entry, "status": "failed", "reason": f"export: {exc}"})
            continue
        options, cap = dict(bench_options), limits[target]
        if cap:  # the runtime here is an emulator (seconds per image): AP on a stated subset, few timed runs
            data = options.get("data")
            if data and not 0 < (data.get("limit") or 0) <= cap:
                options["data"] = {**data, "limit": cap}
            options["warmup"] = min(options.get("warmup", 5), 1)
            options["iters"] = min(options.get("iters", 50), EMULATED_ITERS)
        try:
            (result,) = bench(lambda: make_detector(bundle.path), **options, progress=progress)
        except EdgefaceError as exc:  # e.g. Core ML off macOS, TensorRT without TensorRT
            results.append({**entry, "status": "exported", "size_bytes": bundle.model_bytes(),
                            "reason": f"bench: {exc}"})
            continue
        if cap:
            entry["reason"] = (f"emulated here: AP on at most {cap} images, latency of the emulator "
                               f"({EMULATED_ITERS} runs), not the device's")
        results.append({**result, **entry})
    return results
