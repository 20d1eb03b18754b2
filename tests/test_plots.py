"""Bench report figures: which PNGs are written for which records, that they decode, and that errors leave nothing."""

from __future__ import annotations

import copy
import sys

import cv2
import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install 'edgeface[bench]')")

from edgeface.benchmarks import plots  # noqa: E402
from edgeface.benchmarks.plots import plot_merged, plot_report  # noqa: E402

from edgeface.core.errors import EdgefaceError  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_THREE = {"latency_vs_ap.png", "pr_curves.png", "latency_vs_size.png"}


def _ms(p50: float) -> dict[str, float]:
    return {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.2}


def _latency(vga_ms: float) -> list[dict]:
    return [{"size": size, "image": hw, "input": hw, "pre_ms": _ms(0.1 * scale * vga_ms),
             "infer_ms": _ms(0.8 * scale * vga_ms), "post_ms": _ms(0.1 * scale * vga_ms),
             "total_ms": _ms(scale * vga_ms), "fps": round(1000 / (scale * vga_ms), 2)}
            for size, hw, scale in (("vga", [480, 640], 1.0), ("hd", [720, 1280], 3.0))]


def _accuracy(hard_ap: float) -> dict:
    ap = {"easy": hard_ap + 0.3, "medium": hard_ap + 0.25, "hard": hard_ap}
    recall = np.linspace(0.05, 0.9, 8)
    curves = {subset: [[round(float(p), 4), round(float(r), 4)] for p, r in zip(np.linspace(1.0, 0.4 * a, 8), recall)]
              for subset, a in ap.items()}  # [precision, recall] pairs, as the bench record stores them
    return {"ap": ap, "pr_curves": curves, "delta_ap": {s: 0.001 for s in ap}, "num_images": 30, "resize": "original"}


def make_record(hostname: str = "lab-x86", board: str | None = None, cpu: str = "AMD EPYC") -> dict:
    """A bench record as `edgeface bench` writes it: a measured artifact with accuracy, one without, an outside
    reference, a failed and an export-only artifact."""
    return {
        "schema": "edgeface.bench", "schema_version": 1, "created": "2026-01-01T00:00:00+00:00",
        "device": {"hostname": hostname, "cpu": cpu, "arch": "x86_64", "cores": 4, "os": "Linux", "gpu": None,
                   "board": board, "libraries": {"edgeface": "0.1.0"}},
        "settings": {"threads": None, "warmup": 2, "iters": 5, "sizes": ["vga", "hd"], "limit": 30},
        "results": [
            {"name": "onnx-int8-original", "status": "ok", "target": "onnx", "precision": "int8",
             "size_bytes": 637812, "latency": _latency(7.7), "accuracy": _accuracy(0.65)},
            {"name": "tflite-fp16-original", "status": "ok", "target": "tflite", "precision": "fp16",
             "size_bytes": 900000, "latency": _latency(12.0), "accuracy": None},
            {"name": "upstream-retinaface", "status": "ok", "reference": True, "target": "torch",
             "precision": "fp32", "size_bytes": 1800000, "latency": _latency(30.0), "accuracy": _accuracy(0.64)},
            {"name": "coreml-fp16-original", "status": "failed", "reason": "coremltools runs on macOS only",
             "target": "coreml", "precision": "fp16"},
            {"name": "tensorrt-fp16-original", "status": "exported", "reason": "no GPU on this device",
             "target": "tensorrt", "precision": "fp16"},
        ],
    }


def _assert_png(path, min_side: int = 200) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE
    image = cv2.imread(str(path))
    assert image is not None and image.ndim == 3
    assert min(image.shape[:2]) >= min_side and max(image.shape[:2]) <= 4000


def test_full_record_writes_all_three_figures(tmp_path):
    written = plot_report(make_record(), tmp_path / "plots")
    assert {p.name for p in written} == ALL_THREE
    assert all(p.parent == tmp_path / "plots" for p in written)
    for path in written:
        _assert_png(path)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(ALL_THREE)  # no temporaries left


def test_record_without_accuracy_writes_only_latency_vs_size(tmp_path):
    record = make_record()
    for result in record["results"]:
        result.pop("accuracy", None)
    written = plot_report(record, tmp_path)
    assert [p.name for p in written] == ["latency_vs_size.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency_vs_size.png"]
    _assert_png(written[0])


def test_record_with_nothing_measured_writes_nothing(tmp_path):
    record = make_record()
    record["results"] = [r for r in record["results"] if r["status"] != "ok"]
    assert plot_report(record, tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_merged_plot_of_two_devices(tmp_path):
    arm = make_record(hostname="rpi", board="raspberry-pi-5", cpu="Cortex-A76")
    arm["results"][0]["latency"] = _latency(41.0)
    path = plot_merged([make_record(), arm], tmp_path / "merged" / "latency.png")
    assert path == tmp_path / "merged" / "latency.png"
    _assert_png(path, min_side=150)


def test_merged_plot_without_latency_raises(tmp_path):
    record = make_record()
    record["results"] = [r for r in record["results"] if r["status"] != "ok"]
    with pytest.raises(EdgefaceError, match="no bench report has a measured latency"):
        plot_merged([record, copy.deepcopy(record)], tmp_path / "merged.png")
    with pytest.raises(EdgefaceError, match="no bench report has a measured latency"):
        plot_merged([], tmp_path / "merged.png")
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    # None in sys.modules makes `import matplotlib` raise ImportError, as when it is not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(EdgefaceError, match=r"matplotlib.*pip install edgeface\[bench\]"):
        plot_report(make_record(), tmp_path)
    with pytest.raises(EdgefaceError, match=r"matplotlib.*pip install edgeface\[bench\]"):
        plot_merged([make_record()], tmp_path / "merged.png")
    assert list(tmp_path.iterdir()) == []


def test_failing_savefig_leaves_no_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def fail_halfway(self, fname, **kwargs):
        with open(fname, "wb") as partial:  # a real failure can leave a truncated file behind
            partial.write(PNG_SIGNATURE)
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        plot_report(make_record(), tmp_path)
    with pytest.raises(OSError, match="disk full"):
        plot_merged([make_record()], tmp_path / "merged.png")
    assert list(tmp_path.iterdir()) == []


def test_reference_is_drawn_apart():
    reference, measured = make_record()["results"][2], make_record()["results"][0]
    assert plots._style(reference, 0)["color"] == "black" and "reference" in plots._style(reference, 0)["label"]
    assert plots._style(measured, 0)["color"] != "black"
