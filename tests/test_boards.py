"""Board profiles: shipped as data, validated, listed, and applied as defaults of export and run."""

import json

import pytest
from edgeface.boards.profiles import _parse, get_board, list_boards

from edgeface import EdgefaceError
from edgeface.cli import main


def test_every_profile_loads_and_is_valid():
    boards = {b.name: b for b in list_boards()}
    assert set(boards) == {"jetson-orin-nano", "jetson-nano", "raspberry-pi-4", "raspberry-pi-5", "android-arm64",
                           "iphone", "x86-avx2-laptop", "x86-nvidia-server", "intel-core-ultra", "intel-nuc-cpu",
                           "android-arm64-executorch", "raspberry-pi-5-ncnn", "snapdragon-8-gen-3", "qualcomm-iq-9075",
                           "rock-5b-rk3588", "luckfox-rv1106"}
    assert boards["jetson-nano"].target == "tensorrt" and boards["jetson-nano"].options == {"opset": 13}
    assert boards["snapdragon-8-gen-3"].options == {"soc_model": "SM8650", "activation_bits": 8}
    assert boards["qualcomm-iq-9075"].options["soc_model"] == "QCS9100"
    assert all(b.options == {} for b in boards.values() if b.target not in ("tensorrt", "qnn", "rknn")
               or b.name == "jetson-orin-nano")
    assert boards["raspberry-pi-4"].runtime == "tflite" and boards["raspberry-pi-4"].imgsz == (320, 320)
    assert boards["x86-nvidia-server"].dynamic and boards["x86-nvidia-server"].imgsz is None
    assert all(b.notes and b.arch for b in boards.values())


def test_unknown_board_suggests_the_nearest():
    with pytest.raises(EdgefaceError, match="did you mean 'raspberry-pi-5'"):
        get_board("raspbery-pi-5")


@pytest.mark.parametrize("change, message", [
    ({"gpu": "yes"}, "unknown keys"),
    ({"precision": "int4"}, "precision"),
    ({"runtime": "tensorflow"}, "unknown runtime"),
    ({"imgsz": None, "dynamic": False}, "imgsz or dynamic"),
    # what the target's and the runtime's declarations allow
    ({"runtime": "coreml"}, "runtime 'coreml' does not run tflite bundles"),
    ({"opset": 17}, "unknown keys"),  # a target option goes in the options table
    ({"options": {"opset": 17}},
     r"board profile bad.toml: --opset is not an option of the tflite target \(targets that take it: onnx, tensorrt\)"),
    ({"target": "tensorrt", "runtime": "tensorrt", "options": {"opset": 99}},
     r"--opset 99 is not supported: give 13-17 \(default 17\)"),
    ({"options": {"int8_iox": True}}, r"unknown TFLite options \['int8_iox'\]; did you mean 'int8_io'\?"),
    ({"options": 13}, "options 13: give a table of the tflite target's options"),
    ({"imgsz": None, "dynamic": True}, "dynamic = true is not available for tflite"),
])
def test_bad_profiles_are_refused(change, message):
    data = {**get_board("raspberry-pi-5").to_dict(), **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(EdgefaceError, match=message):
        _parse("bad.toml", data)


def test_board_options_are_export_defaults(monkeypatch, tmp_path):
    """A board's target options reach the export as its --opset / flags would, under the command line's, and only
    for a target that takes them."""
    import edgeface.cli as cli
    import edgeface.export.pipeline as pipeline

    seen = []

    def record(target, **kwargs):
        seen.append((target, kwargs["opset"], kwargs["options"]))
        raise EdgefaceError("recorded")

    monkeypatch.setattr(pipeline, "export_bundle", record)
    pi = get_board("raspberry-pi-5")
    board = _parse("pi.toml", {**pi.to_dict(), "options": {"int8_io": True, "keep_float": ["body.stage1"]}})
    monkeypatch.setattr(cli, "get_board", lambda name: {"pi": board}.get(name) or get_board(name))
    for argv in (["--board", "pi"], ["--board", "pi", "--target", "onnx"], ["--board", "jetson-nano"],
                 ["--board", "jetson-nano", "--opset", "14"], ["--board", "jetson-nano", "--target", "x86"],
                 ["--board", "jetson-nano", "--target", "tflite"]):
        assert main(["export", *argv, "--out", str(tmp_path / "b")]) == 2
    # onnx declares a keep_float of its own (node names, not module paths): the board's is tflite's only
    assert seen == [("tflite", None, {"int8_io": True, "keep_float": ["body.stage1"]}), ("onnx", None, {}),
                    ("tensorrt", 13, {}), ("tensorrt", 14, {}), ("x86", 13, {}), ("tflite", None, {})]
    assert board.options == {"int8_io": True, "keep_float": ["body.stage1"]}  # the profile itself is left as it was


def test_boards_command_lists_them(capsys):
    assert main(["boards", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {b["name"] for b in listed} == {b.name for b in list_boards()}
    assert main(["boards"]) == 0
    assert "jetson-orin-nano" in capsys.readouterr().out


def test_board_sets_export_defaults_and_flags_override(tmp_path):
    pytest.importorskip("onnxsim", reason="needs the onnx extra: pip install edgeface[onnx]")
    assert main(["export", "--board", "jetson-nano", "--out", str(tmp_path / "a"), "--no-verify"]) == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert (manifest["target"], manifest["precision"], manifest["converter"]["opset"]) == ("tensorrt", "fp16", 13)
    assert manifest["input"]["shape"] == [1, 3, 640, 640]
    assert main(["export", "--board", "jetson-nano", "--imgsz", "320x320", "--opset", "17",
                 "--out", str(tmp_path / "b"), "--no-verify"]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["input"]["shape"] == [1, 3, 320, 320] and manifest["converter"]["opset"] == 17


def test_board_sets_run_runtime_and_threads(tmp_path, astronaut_path, capsys):
    pytest.importorskip("onnxsim", reason="needs the onnx extra: pip install edgeface[onnx]")
    assert main(["export", "--board", "x86-avx2-laptop", "--precision", "fp32", "--imgsz", "320",
                 "--out", str(tmp_path / "x86"), "--no-verify"]) == 0
    capsys.readouterr()
    assert main(["run", "--board", "x86-avx2-laptop", "--model", str(tmp_path / "x86"),
                 "--source", str(astronaut_path), "--json"]) == 0
    captured = capsys.readouterr()
    assert "onnx/fp32 (onnxruntime)" in captured.err and len(json.loads(captured.out)["faces"]) == 1
    capsys.readouterr()

    # bench: the board's runtime, threads and input size (as the camera frame size) unless given
    board = get_board("x86-avx2-laptop")
    assert main(["bench", "--board", board.name, "--model", str(tmp_path / "x86"), "--warmup", "1", "--iters", "2",
                 "--limit", "2", "--out", str(tmp_path / "report")]) == 0
    record = json.loads((tmp_path / "report" / "bench.json").read_text())
    size = "x".join(map(str, board.imgsz)) if board.imgsz else None
    assert record["device"]["board"] == board.name and record["settings"]["threads"] == board.threads
    assert record["settings"]["sizes"] == ([size] if size else ["vga", "hd", "4k"])
    assert record["results"][0]["runtime"]["runtime"] == board.runtime
