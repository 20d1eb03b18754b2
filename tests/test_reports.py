"""Bench reports as a reader meets them: titled and dated, deltas in AP points, rows of one device told apart,
Markdown and CSV side by side, log latency axes, files readable by others (umask), defaults a user can wait for."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import stat

import numpy as np
import pytest
from edgeface.benchmarks.bench import report
from edgeface.benchmarks.report import header, rows, to_markdown, write_tables

from edgeface.cli import build_parser, main
from edgeface.core.files import atomic_write


def _result(name, p50, delta_hard, images=100):
    return {"name": name, "status": "ok", "target": "onnx", "precision": "int8", "runtime": {"runtime": "onnxruntime"},
            "size_bytes": 640_000, "latency": [{"size": "vga", "image": [480, 640], "total_ms": {"p50": p50},
                                                "infer_ms": {"p50": p50 - 1}, "fps": round(1000 / p50, 2)}],
            "accuracy": {"num_images": images, "ap": {"easy": 0.8914, "medium": 0.8633, "hard": 0.7049},
                         "delta_ap": {"easy": -0.0028, "medium": -0.0018, "hard": delta_hard}}}


def _record(threads, cpus=None, results=None):
    return report(results or [_result("onnx-int8-dynamic", 20.0, -0.0002)],
                  device={"hostname": "lab-1", "board": None, "cores": 2, "cpu": "Xeon", "os": "Linux",
                          "libraries": {"edgeface": "0.1.0"}},
                  settings={"threads": threads, "cpus": cpus, "warmup": 5, "iters": 50, "sizes": ["vga"],
                            "limit": 100, "baseline": None})


def test_rows_give_deltas_in_ap_points_and_threads_and_cores():
    (one,) = rows(_record(1))
    (pinned,) = rows(_record(4, cpus=[0]))
    assert (one["threads"], one["cores"]) == (1, 2) and (pinned["threads"], pinned["cores"]) == (4, 1)
    assert (one["delta_easy_pts"], one["delta_medium_pts"], one["delta_hard_pts"]) == (-0.28, -0.18, -0.02)
    assert one["ap_images"] == 100
    markdown = to_markdown([one]).splitlines()
    assert "delta_hard_pts" in markdown[0] and "delta_hard |" not in markdown[0]
    assert "| 0.8914 | 0.8633 | 0.7049 | -0.28 | -0.18 | -0.02 |" in markdown[2]


def test_bench_header_has_title_date_images_and_settings():
    text = header(_record(1))
    lines = text.splitlines()
    assert lines[0] == "# edgeface bench on lab-1"
    created = _record(1)["created"]
    assert f"created: {created[:10]}" in text
    assert "threads 1" in text and "cores all" in text and "iters 50" in text
    assert "AP on 100 images" in text and "AP points" in text


@pytest.mark.parametrize("out", ["lab.csv", "lab.md", "lab", "lab.CSV"])
def test_merge_writes_markdown_and_csv_whatever_suffix(tmp_path, out, capsys):
    paths = []
    for threads in (1, 2):  # one device, two settings: the rows differ in their threads column
        path = tmp_path / f"t{threads}.json"
        path.write_text(json.dumps(_record(threads)))
        paths.append(str(path))
    assert main(["report", "merge", *paths, "--out", str(tmp_path / "merged" / out)]) == 0
    merged = tmp_path / "merged"
    table = list(csv.DictReader((merged / "lab.csv").open()))
    assert [(r["device"], r["threads"], r["delta_hard_pts"]) for r in table] == [("lab-1", "1", "-0.02"),
                                                                             ("lab-1", "2", "-0.02")]
    markdown = (merged / "lab.md").read_text().splitlines()
    assert len(markdown) == 4 and markdown[0].startswith("| device |")
    expected = {"lab.md", "lab.csv"} | ({"lab.png"} if importlib.util.find_spec("matplotlib") else set())
    assert {p.name for p in merged.iterdir()} == expected


def test_files_written_atomically_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        written = atomic_write(tmp_path / "r.md", lambda tmp: tmp.write_text("x"))
        assert stat.S_IMODE(written.stat().st_mode) == 0o644
        os.umask(0o027)
        md, table_csv = write_tables(rows(_record(1)), tmp_path / "t.md")
        assert stat.S_IMODE(md.stat().st_mode) == stat.S_IMODE(table_csv.stat().st_mode) == 0o640
        os.chmod(written, 0o600)  # a file the user keeps private stays private when replaced
        atomic_write(written, lambda tmp: tmp.write_text("y"))
        assert stat.S_IMODE(written.stat().st_mode) == 0o600 and written.read_text() == "y"
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.md", "t.csv", "t.md"]  # no temporaries


def test_latency_axes_are_logarithmic(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install 'edgeface[bench]')")
    from edgeface.benchmarks import plots

    figures = {}
    real_save = plots._save

    def keep(fig, path):
        figures[path.name] = fig
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    slow = _result("torch-fp32-dynamic", 900.0, 0.0)
    record = _record(1, results=[_result("onnx-int8-dynamic", 9.0, -0.0002), slow])
    old = os.umask(0o022)
    try:
        written = plots.plot_report(record, tmp_path)
        merged = plots.plot_merged([record], tmp_path / "lab.png")
    finally:
        os.umask(old)
    assert figures["latency_vs_ap.png"].axes[0].get_xscale() == "log"
    assert figures["latency_vs_size.png"].axes[0].get_yscale() == "log"
    assert figures["lab.png"].axes[0].get_xscale() == "log"
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in [*written, merged])


def test_bench_defaults_bound_the_images_and_the_threads():
    args = build_parser().parse_args(["bench"])
    assert args.limit == 100 and args.threads is None  # resolved to 1 by the command


def test_latency_runs_stop_at_the_time_budget(default_detector):
    from edgeface.benchmarks.bench import MIN_RUNS, measure_latency

    image = np.full((64, 64, 3), 128, np.uint8)
    (capped,) = measure_latency([default_detector], image, warmup=0, iters=50, budget_s=0.0)
    (few,) = measure_latency([default_detector], image, warmup=0, iters=3, budget_s=0.0)
    assert capped["runs"] == MIN_RUNS and few["runs"] == 3


def test_short_bench_with_default_threads_writes_a_titled_report(tmp_path, wider_images, wider_gt, capsys):
    assert main(["bench", "--data", str(wider_images), "--gt", str(wider_gt), "--limit", "3", "--sizes", "64x64",
                 "--warmup", "0", "--iters", "2", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err  # no progress bars in a log
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["settings"]["threads"] == 1 and record["settings"]["limit"] == 3
    (result,) = record["results"]
    assert result["accuracy"]["delta_ap"] == {"easy": 0.0, "medium": 0.0, "hard": 0.0}
    markdown = (tmp_path / "bench.md").read_text()
    assert markdown.startswith("# edgeface bench on ")
    assert f"created: {record['created']}" in markdown and "threads 1" in markdown
    assert "AP on 3 images" in markdown
    (row,) = csv.DictReader((tmp_path / "bench.csv").open())
    assert row["threads"] == "1" and row["delta_hard_pts"] == "0.0" and row["ap_images"] == "3"
    assert stat.S_IMODE((tmp_path / "bench.md").stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_npu_placement_and_cpu_fallback_are_in_the_table():
    on_npu = {**_result("qnn-int8-640x640", 900.0, -0.004), "target": "qnn",
              "runtime": {"runtime": "qnn", "placement": {"npu_nodes": 487, "total_nodes": 487, "cpu_fallback": []}}}
    fallback = {**on_npu, "name": "qnn-fallback", "runtime": {"runtime": "qnn", "placement": {
        "npu_nodes": 480, "total_nodes": 487, "cpu_fallback": [f"Resize /fpn/Resize_{i}" for i in range(7)]}}}
    cpu = _result("onnx-int8-dynamic", 20.0, -0.0002)
    by_name = {r["artifact"]: r for r in rows(_record(1, results=[on_npu, fallback, cpu]))}
    assert by_name["qnn-int8-640x640"]["placement"] == "NPU 487/487"
    assert by_name["qnn-fallback"]["placement"] == ("NPU 480/487; CPU fallback: Resize /fpn/Resize_0, "
                                                    "Resize /fpn/Resize_1, Resize /fpn/Resize_2 and 4 more")
    assert by_name["onnx-int8-dynamic"]["placement"] == ""
    assert "CPU fallback: Resize /fpn/Resize_0" in to_markdown(rows(_record(1, results=[fallback])))
