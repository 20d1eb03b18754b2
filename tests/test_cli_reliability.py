"""The command line on bad input: batch jobs go on past bad files, damaged streams say so, system errors become one
line, every command a message suggests exists. Bad inputs are made here, small, in tmp_path."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeface.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def mixed_folder(tmp_path, astronaut_path):
    """One good photograph and the bad files of every kind a batch meets, sorted good first."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(astronaut_path, folder / "a_good.jpg")
    (folder / "b_empty.jpg").write_bytes(b"")
    (folder / "c_text.jpg").write_text("not an image\n")
    (folder / "sub" / "d_truncated.jpg").write_bytes(astronaut_path.read_bytes()[:3000])
    return folder


BAD = ("b_empty.jpg", "c_text.jpg", "d_truncated.jpg")


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("edgeface: error:")]


def test_detect_folder_reports_each_bad_file_and_goes_on(mixed_folder, tmp_path, capsys):
    assert main(["detect", str(mixed_folder), "--json", "--out", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["image"]).name for r in records] == ["a_good.jpg", *BAD]  # every file, in order
    assert len(records[0]["faces"]) == 1 and "error" not in records[0]
    assert all(r["error"] and "faces" not in r for r in records[1:])
    errors = _error_lines(err)
    assert len(errors) == 3 and all(name in line for name, line in zip(BAD, errors))
    assert "1 face(s) in 1 image(s), 3 failed" in err
    assert "Traceback" not in err and "\r" not in err  # no progress bar in a log
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_good.jpg", "a_good.json"]


def test_detect_strict_stops_at_the_first_bad_file(mixed_folder, capsys):
    assert main(["detect", str(mixed_folder), "--json", "--strict"]) == 2
    out, err = capsys.readouterr()
    assert [Path(json.loads(line)["image"]).name for line in out.splitlines()] == ["a_good.jpg"]
    (error,) = _error_lines(err)
    assert "b_empty.jpg" in error


def test_run_folder_goes_on_and_ends_with_its_summary(mixed_folder, capsys):
    assert main(["run", "--source", str(mixed_folder), "--json"]) == 2
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["frame"] for r in records] == ["a_good", "b_empty", "c_text", "sub/d_truncated"]
    assert len(records[0]["faces"]) == 1 and all("error" in r for r in records[1:])
    assert len(_error_lines(err)) == 3
    assert "end of stream after 1 frame(s), 3 failed" in err


def test_output_folder_may_not_overwrite_the_inputs(tmp_path, astronaut_path, capsys):
    shutil.copy(astronaut_path, tmp_path / "a.jpg")
    before = (tmp_path / "a.jpg").read_bytes()
    assert main(["detect", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert main(["run", "--source", str(tmp_path), "--save", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("would overwrite the input image") == 2
    assert (tmp_path / "a.jpg").read_bytes() == before


def test_names_with_dots_keep_their_own_outputs(tmp_path, astronaut_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(astronaut_path, folder / "shot.v1.jpg")
    shutil.copy(astronaut_path, folder / "shot.v2.jpg")
    assert main(["detect", str(folder), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "shot.v1.jpg", "shot.v1.json", "shot.v2.jpg", "shot.v2.json"]


def _video(path: Path, frames: int) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    writer.release()
    return path


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    damaged = path.with_name("truncated.avi")
    damaged.write_bytes(data[: len(data) // 3])
    return damaged


def _zeroed(path: Path) -> Path:
    """A block of the middle overwritten: the file keeps its length and its index, frames in between are lost."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4 * len(data) // 40] = bytes(4 * len(data) // 40)
    damaged = path.with_name("zeroed.avi")
    damaged.write_bytes(bytes(data))
    return damaged


@pytest.mark.parametrize("damage", [_truncated, _zeroed])
def test_a_damaged_video_says_it_ended_early(tmp_path, damage):
    video = damage(_video(tmp_path / "clip.avi", 40))
    # A process of its own: FFmpeg's log level is set once, when OpenCV first starts it (here: the VideoWriter).
    proc = subprocess.run([sys.executable, "-m", "edgeface", "run", "--source", str(video), "--resize", "original"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    err = proc.stderr
    m = re.search(r"ended early: (\d+) of its 40 frames read", err)
    assert m and int(m.group(1)) < 40
    assert f"stream ended early after {m.group(1)} frame(s)" in err
    # Only edgeface's own lines: no OpenCV / FFmpeg warnings before them.
    assert all(line.startswith(("edgeface", "  ")) for line in err.splitlines()), err


def test_an_intact_video_ends_normally(tmp_path, capsys):
    video = _video(tmp_path / "clip.avi", 40)
    assert main(["run", "--source", str(video), "--resize", "original"]) == 0
    assert "end of stream after 40 frame(s)" in capsys.readouterr().err


@pytest.mark.parametrize("source, message", [("camera:99999999999999999999", "no camera 99999999999999999999"),
                                             ("camera:123456", "could not open camera 123456")])
def test_camera_numbers_out_of_range(source, message, capfd):
    assert main(["run", "--source", source]) == 2
    err = capfd.readouterr().err
    assert message in err and "Traceback" not in err and "WARN" not in err


def test_a_file_name_too_long_is_one_line(capsys):
    assert main(["detect", "x" * 300 + ".jpg"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("edgeface: error: xxx") and "File name too long" in line


def test_running_out_of_memory_is_one_line(monkeypatch, capsys):
    import edgeface.board_profiles

    def exhausted():
        raise MemoryError

    monkeypatch.setattr(edgeface.board_profiles, "list_boards", exhausted)
    assert main(["boards"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("edgeface: error: out of memory")


def test_a_closed_pipe_ends_quietly(tmp_path, astronaut_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(6):
        shutil.copy(astronaut_path, folder / f"{i}.jpg")
    proc = subprocess.Popen([sys.executable, "-m", "edgeface", "detect", str(folder), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = json.loads(proc.stdout.readline())  # `| head -1`
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 1
    assert first["image"].endswith("0.jpg")
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err


def test_version():
    from edgeface import __version__

    proc = subprocess.run([sys.executable, "-m", "edgeface", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"edgeface {__version__}"


def test_detect_one_image_shows_its_faces(astronaut_path, capsys):
    assert main(["detect", str(astronaut_path), "--json"]) == 0
    (face,) = json.loads(capsys.readouterr().out)["faces"]
    assert main(["detect", str(astronaut_path)]) == 0
    out, err = capsys.readouterr()
    (line,) = out.splitlines()
    score, _, box, _, *marks = line.split()
    assert float(score) == pytest.approx(face["score"], abs=5e-4) and face["score"] > 0.9
    assert [float(v) for v in box.split(",")] == pytest.approx(face["box"], abs=0.51)
    assert [float(v) for m in marks for v in m.split(",")] == pytest.approx(
        [v for point in face["landmarks"].values() for v in point], abs=0.51)
    assert "1 face(s) in 1 image(s)" in err


def test_board_of_another_input_size_warns(tmp_path, astronaut_path, capsys):
    pytest.importorskip("onnxsim", reason="needs the onnx extra: pip install edgeface[onnx]")
    from edgeface.export.pipeline import export_bundle

    bundle = export_bundle("onnx", precision="fp32", imgsz=(320, 320), out=tmp_path / "b", verify=False,
                           progress=False).path
    assert main(["run", "--model", str(bundle), "--board", "x86-avx2-laptop", "--source", str(astronaut_path)]) == 0
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert "x86-avx2-laptop takes input 640x640 but the bundle's is 320x320" in warning


def _messages(path: Path):
    """The text of every string in a module except docstrings; f-string fields become {}."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    inside_fstrings = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and id(node) not in inside_fstrings):
            yield node.lineno, node.value


def _suggested_commands() -> list[tuple[str, str]]:
    found = []
    for folder in ("edgeface", "export", "runtimes", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for lineno, text in _messages(path):
                for command in re.findall(r"`+(edgeface [^`]+)`+", text):
                    found.append((f"{path.relative_to(ROOT)}:{lineno}", command))
    return found


# Values for placeholders (BUNDLE, DIR, N, an f-string field) where the option checks its value.
PLACEHOLDER_VALUES = {"--board": "raspberry-pi-5", "--imgsz": "640x640", "--limit": "1", "--calib-n": "1",
                      "--iters": "1", "--warmup": "1", "--opset": "17", "--threads": "1", "--workspace-mb": "64",
                      "--precision": "fp16", "--target": "onnx"}


def test_suggested_commands_are_collected():
    commands = dict(_suggested_commands())
    assert any(c.startswith("edgeface export --board") for c in commands.values())  # an f-string
    assert "edgeface bench" in commands.values()


@pytest.mark.parametrize("where, command", _suggested_commands())
def test_every_suggested_command_parses(where, command):
    words = shlex.split(command)[1:]
    for i, word in enumerate(words):
        if word == "{}" or re.fullmatch(r"[A-Z][A-Z0-9_]*", word):
            words[i] = PLACEHOLDER_VALUES.get(words[i - 1] if i else "", "x")
    try:
        build_parser().parse_args(words)
    except SystemExit as exc:
        pytest.fail(f"{where}: `{command}` is not an edgeface command line (argparse exit {exc.code})")
