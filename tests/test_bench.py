"""A short `edgeface bench` run: the JSON record a device lab collects."""

import json

import pytest

from edgeface import EdgefaceError
from edgeface.benchmarks.bench import SCHEMA, SCHEMA_VERSION, parse_sizes
from edgeface.cli import main


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
    assert record["settings"] == {"threads": 2, "warmup": 1, "iters": 3, "sizes": ["vga"], "limit": 4}
    (result,) = record["results"]
    assert result["status"] == "ok" and result["target"] == "torch" and result["runtime"]["runtime"] == "torch"
    (vga,) = result["latency"]
    assert vga["image"] == [480, 640] and vga["input"] == [480, 640]
    for stage in ("pre_ms", "infer_ms", "post_ms", "total_ms"):
        assert 0 < vga[stage]["p50"] <= vga[stage]["p90"] <= vga[stage]["p99"]
    assert vga["fps"] > 0 and result["load_seconds"] > 0 and result["peak_rss_mb"] > 0
    accuracy = result["accuracy"]
    assert accuracy["num_images"] == 4 and set(accuracy["ap"]) == {"easy", "medium", "hard"}
    assert accuracy["delta_ap"] == {"easy": 0.0, "medium": 0.0, "hard": 0.0}  # torch against itself
    assert len(accuracy["pr_curves"]["hard"]) == 1000
    assert "vga 640x480: total p50" in capsys.readouterr().out
