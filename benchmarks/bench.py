"""``edgeface bench``: accuracy and latency of one artifact on this device, as a versioned JSON record that a
device lab collects from every board."""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from edgeface.runtimes import get_runtime_class, list_runtimes

from edgeface.core.bundle import Bundle
from edgeface.core.errors import EdgefaceError
from edgeface.core.files import sha256_file
from edgeface.core.images import ASTRONAUT, load_image
from edgeface.core.parity import compare
from edgeface.core.versions import library_versions
from edgeface.evaluation.accuracy import WIDER_SETTINGS, evaluate_detector, fp32_baseline, select_images, spread
from edgeface.evaluation.widerface import load_ground_truth
from edgeface.inference.detector import Detector

SCHEMA = "edgeface.bench"
SCHEMA_VERSION = 1
AGREEMENT_IMAGES = 20  # images compared face by face with FP32 PyTorch (landmark error)
# Timed runs stop early once a size has taken this long (and has MIN_RUNS): 50 runs of PyTorch at 4k on one thread
# would take minutes, and percentiles of slow runs settle quickly.
LATENCY_BUDGET_S = 30.0
MIN_RUNS = 10
SIZES = {"vga": (480, 640), "hd": (720, 1280), "4k": (2160, 3840)}
# Recorded in every report: these, then each registered runtime's ``libraries`` (absent ones are left out).
LIBRARIES = ("edgeface", "numpy", "opencv-python-headless")


def libraries() -> list[str]:
    """The distributions a report records versions of: :data:`LIBRARIES` and every runtime's own."""
    names = list(LIBRARIES)
    for runtime in list_runtimes():
        names += [n for n in get_runtime_class(runtime).libraries if n not in names]
    return names


def parse_sizes(text: str) -> dict[str, tuple[int, int]]:
    sizes = {}
    for name in text.split(","):
        name = name.strip().lower()
        if name in SIZES:
            sizes[name] = SIZES[name]
        elif "x" in name and all(p.isdigit() for p in name.split("x")) and name.count("x") == 1:
            h, w = map(int, name.split("x"))
            if not (32 <= h <= 8192 and 32 <= w <= 8192):
                raise EdgefaceError(f"size {name!r}: each side must be 32-8192 pixels (e.g. 720x1280)")
            sizes[name] = (h, w)
        else:
            raise EdgefaceError(f"unknown size {name!r}: use vga, hd, 4k or HxW (e.g. 720x1280)")
    return sizes


def device_info(board=None) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return {"hostname": platform.node(), "cpu": cpu, "arch": platform.machine(), "cores": os.cpu_count(),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(), "gpu": gpu,
            "board": board.name if board else None, "libraries": library_versions(*libraries())}


def _percentiles(values: list[float]) -> dict[str, float]:
    ms = np.asarray(values) * 1e3
    return {f"p{q}": round(float(np.percentile(ms, q)), 3) for q in (50, 90, 99)}


def measure_latency(candidates: Sequence, image: np.ndarray, *, warmup: int, iters: int,
                    budget_s: float | None = LATENCY_BUDGET_S) -> list[dict[str, Any]]:
    """Per-stage latency percentiles of each candidate (a Detector, or a baseline with its ``detect_arrays``) on
    one image, after ``warmup`` untimed runs; ``iters`` timed runs, fewer (at least MIN_RUNS) once they have
    taken ``budget_s``. Candidates take turns run by run, so that a change in the machine's load or clock affects
    them alike and their ratio stays fair."""
    for _ in range(warmup):
        for candidate in candidates:
            candidate.detect_arrays([image])
    stages = [{"pre": [], "infer": [], "post": [], "total": []} for _ in candidates]
    budget_start = time.perf_counter()
    for run in range(iters):
        if budget_s is not None and run >= MIN_RUNS and time.perf_counter() - budget_start > budget_s:
            break
        for candidate, record in zip(candidates, stages):
            timings: dict[str, float] = {}
            started = time.perf_counter()
            candidate.detect_arrays([image], timings=timings)
            record["total"].append(time.perf_counter() - started)
            for stage in ("pre", "infer", "post"):
                record[stage].append(timings[stage])
    results = []
    for record in stages:
        result = {f"{stage}_ms": _percentiles(values) for stage, values in record.items()}
        result["fps"] = round(1.0 / float(np.median(record["total"])), 2)
        result["runs"] = len(record["total"])
        results.append(result)
    return results


def bench(
    make_detector,
    *,
    sizes: dict[str, tuple[int, int]],
    warmup: int = 5,
    iters: int = 50,
    data: dict[str, Any] | None = None,
    baseline=None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One artifact: load time, latency at each size, WIDER FACE AP (with ``data``: images, gt, limit), its delta
    to FP32 PyTorch and agreement with it, model file size, peak memory. With ``baseline`` (see
    :mod:`edgeface.benchmarks.baseline`) that is timed side by side, run by run, and returned as a second result."""
    started = time.perf_counter()
    detector = make_detector()
    load_seconds = time.perf_counter() - started
    manifest = detector.runtime.manifest
    candidates = [detector] + ([baseline] if baseline else [])
    photo = load_image(ASTRONAUT)
    latency: list[list[dict[str, Any]]] = [[] for _ in candidates]
    for name, (h, w) in sizes.items():
        image = cv2.resize(photo, (w, h), interpolation=cv2.INTER_LINEAR)
        inputs = [_input_hw(detector, (h, w)), [h, w]]  # the baseline runs at the image's own size
        measured = measure_latency(candidates, image, warmup=warmup, iters=iters)
        for records, record, input_hw in zip(latency, measured, inputs):
            records.append({"size": name, "image": [h, w], "input": input_hw, **record})
    rss_mb = _resident_mb()  # while the model is loaded and warm, before the accuracy run
    accuracy = _accuracy(detector, data, progress) if data else None
    size_bytes = _model_bytes(detector)
    runtime = detector.runtime.describe()
    detector.close()
    results = [{
        "name": artifact_name(manifest, detector.runtime.end2end),
        "status": "ok",
        "target": manifest.target,
        "precision": manifest.precision,
        "runtime": runtime,
        "model": detector.runtime.source,
        "size_bytes": size_bytes,
        "load_seconds": round(load_seconds, 3),
        "rss_mb": rss_mb,
        # The process's high-water mark: with --all it includes the artifacts benched before this one. (The
        # kernel updates it lazily, so it can trail the resident figure read a moment earlier.)
        "peak_rss_mb": max(_peak_mb(), rss_mb or 0.0),
        "latency": latency[0],
        "accuracy": accuracy,
    }]
    if baseline:
        results.append({"name": baseline.name, "status": "ok", "reference": True, "target": "onnx",
                        "precision": "fp32", "runtime": baseline.describe(), "model": baseline.requirement,
                        "size_bytes": baseline.size_bytes, "latency": latency[1], "accuracy": None})
        results[0]["speedup_vs_baseline"] = speedups(results[0], results[1])
    return results


def artifact_name(manifest, end2end: bool = False) -> str:
    """``onnx-int8-dynamic``, ``tflite-int8-640x640``, ``torch-fp32-dynamic``, ``onnx-fp32-640x640-end2end``:
    target, precision, input, and whether the end-to-end model ran."""
    if manifest.dynamic and ("height" in manifest.dynamic or "width" in manifest.dynamic):
        shape = "dynamic"
    else:
        shape = manifest.preprocessing["resize"].replace("fixed:", "").replace(":", "")
    return f"{manifest.target}-{manifest.precision}-{shape}" + ("-end2end" if end2end else "")


def speedups(result: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """End-to-end p50 latency ratio baseline / artifact at each size."""
    return {a["size"]: round(b["total_ms"]["p50"] / a["total_ms"]["p50"], 3)
            for a, b in zip(result["latency"], baseline["latency"])}


def _peak_mb() -> float:
    """The process's peak resident memory in MB (getrusage counts KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def _resident_mb() -> float | None:
    """Resident memory of this process now (Linux), in MB."""
    try:
        with open("/proc/self/statm") as statm:
            return round(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def _input_hw(detector, image_hw: tuple[int, int]) -> list[int]:
    policy = detector.resize
    if policy.mode == "fixed":
        return list(policy.size)
    scale = policy.scale_for(image_hw)
    return [round(image_hw[0] * scale), round(image_hw[1] * scale)]


def _model_bytes(detector) -> int | None:
    manifest = detector.runtime.manifest
    if not manifest.files:
        return None
    bundle = Bundle(Path(detector.runtime.source), manifest)
    return bundle.model_bytes(end2end=detector.runtime.end2end)


def _accuracy(detector, data: dict[str, Any], progress: bool) -> dict[str, Any]:
    gt = load_ground_truth(data["gt"])
    wider = Detector(runtime=detector.runtime, **WIDER_SETTINGS)
    manifest = detector.runtime.manifest
    name = artifact_name(manifest, detector.runtime.end2end)
    log = (lambda message: print(f"edgeface bench: {name}: {message}", file=sys.stderr)) if progress else (
        lambda message: None)
    log(f"WIDER FACE AP, {data.get('limit') or 'all'} images")
    result = evaluate_detector(wider.detect_arrays, data["images"], gt, limit=data.get("limit"), progress=progress)
    out = {**result.to_dict(), "resize": str(wider.resize),
           "pr_curves": {k: np.round(v, 5).tolist() for k, v in result.pr_curves.items()}}
    if _is_fp32_torch(detector):  # it is its own reference: evaluating PyTorch again would only double the time
        reference, base = detector.runtime.network, dict(result.ap)
    else:
        weights = data.get("weights") or _recorded_weights(manifest.model.get("weights") or {})
        if weights is None:
            source = manifest.model["weights"].get("source")
            return {**out, "delta_ap": None, "delta_reason": f"no FP32 reference: the bundle's weights are a local "
                    f"checkpoint ({source}) not found here with the recorded sha256; name it with --weights PATH"}
        try:
            from edgeface.models import get_model  # deferred: PyTorch, absent on a device install

            reference = get_model(manifest.model["name"], weights=weights)
        except ImportError:
            return {**out, "delta_ap": None, "delta_reason": "no FP32 reference: PyTorch is not installed "
                    "(`pip install edgeface[export]`)"}
        except EdgefaceError as exc:  # e.g. a bundle exported from a local checkpoint: --weights names it
            return {**out, "delta_ap": None, "delta_reason": f"no FP32 reference: {exc}"}
        base = fp32_baseline(reference, wider.resize, data, gt, progress, log)  # cached per weights and images
    out.update(fp32_torch_ap=base, delta_ap={k: round(result.ap[k] - base[k], 5) for k in result.ap},
               vs_fp32_torch=_agreement(reference, wider, data, gt))
    return out


def _recorded_weights(recorded: dict[str, Any]) -> str | None:
    """The FP32 reference weights of a bundle from its manifest's ``model.weights``: the registered name; else the
    local checkpoint it was exported from (``source``) when that file is here with the recorded sha256; else None.
    A manifest recording no weights means the default ones."""
    if recorded.get("name"):
        return recorded["name"]
    if not recorded.get("sha256"):
        return "default"
    source = recorded.get("source")
    if source and Path(source).is_file() and sha256_file(source) == recorded["sha256"]:
        return source
    return None


def _is_fp32_torch(detector) -> bool:
    runtime = detector.runtime
    return runtime.name == "torch" and str(getattr(runtime, "device", "")) == "cpu"


def _agreement(reference_model, detector, data: dict[str, Any], gt) -> dict[str, Any]:
    """Detection agreement and landmark error against FP32 PyTorch on a spread of the evaluated images."""

    paths = spread(select_images(data["images"], gt, data.get("limit")), AGREEMENT_IMAGES)
    reference = Detector.for_model(reference_model, resize=detector.resize)
    return compare(reference, detector, [load_image(p) for p in paths]).to_dict()


def report(results: list[dict[str, Any]], *, device: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
            "settings": settings, "results": results}
