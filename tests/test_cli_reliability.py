"""The command line on bad input: batch jobs go on past bad files, damaged streams say so, system errors become one
line, every command a message suggests exists. Bad inputs are made here, small, in tmp_path."""

from __future__ import annotations

import argparse
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
    """The input folder as the output folder is refused (more in tests/test_cli_outputs.py); so is an output
    folder where a single input image's results would replace it."""
    shutil.copy(astronaut_path, tmp_path / "a.jpg")
    before = (tmp_path / "a.jpg").read_bytes()
    assert main(["detect", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert main(["run", "--source", str(tmp_path), "--save", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    for option in ("--out", "--save"):
        assert (f"edgeface: error: {option} {tmp_path} is the input folder: the annotated images would replace or "
                f"mix with the input images; give another folder, e.g. {tmp_path / 'faces'}") in err
    assert main(["detect", str(tmp_path / "a.jpg"), "--out", str(tmp_path)]) == 2
    assert main(["run", "--source", str(tmp_path / "a.jpg"), "--save", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    for option in ("--out", "--save"):
        assert f"edgeface: error: {option} would overwrite the input image {tmp_path / 'a.jpg'}" in err
    assert (tmp_path / "a.jpg").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg"]


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
def test_camera_numbers_out_of_range(source, message, capfd, monkeypatch):
    monkeypatch.delenv("OPENCV_FFMPEG_LOGLEVEL", raising=False)  # restored after main(program=True) sets it
    assert main(["run", "--source", source], program=True) == 2  # as the command: OpenCV's warnings silenced
    err = capfd.readouterr().err
    assert message in err and "Traceback" not in err and "WARN" not in err


@pytest.fixture
def noisy_folder(tmp_path, astronaut_path):
    """A good photograph and a PNG cut in half: libpng prints "libpng error: ..." on file descriptor 2 for it."""
    folder = tmp_path / "noisy"
    folder.mkdir()
    shutil.copy(astronaut_path, folder / "a_good.jpg")
    png = cv2.imencode(".png", cv2.imread(str(astronaut_path)))[1].tobytes()
    (folder / "b_cut.png").write_bytes(png[:len(png) // 2])
    return folder


CUT_PNG = "could not be decoded: a 512x512 PNG file that is truncated or corrupt (or a format OpenCV cannot read)"


def test_the_command_silences_the_image_libraries(noisy_folder):
    """Run as the program (the `edgeface` command, `python -m edgeface`), stderr holds edgeface's own lines only:
    libpng's message on the cut PNG is silenced."""
    proc = subprocess.run([sys.executable, "-m", "edgeface", "detect", str(noisy_folder)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"edgeface: error: {noisy_folder / 'b_cut.png'} {CUT_PNG}",
                                        "1 face(s) in 1 image(s), 1 failed (listed above)"]


@pytest.mark.parametrize("command", [["detect"], ["run", "--source"]])
def test_main_as_the_program_silences_the_image_libraries(noisy_folder, command, capfd, monkeypatch):
    """main(argv, program=True), as a harness running the command in-process would call it: the same silence,
    around decoding only; the library itself prints libpng's line (the application's stderr is its own)."""
    from edgeface.core.errors import EdgefaceError
    from edgeface.core.images import load_image

    with pytest.raises(EdgefaceError):
        load_image(noisy_folder / "b_cut.png")
    assert "libpng error" in capfd.readouterr().err  # what there is to silence
    monkeypatch.delenv("OPENCV_FFMPEG_LOGLEVEL", raising=False)
    assert main([*command, str(noisy_folder), "--json"], program=True) == 2
    out, err = capfd.readouterr()
    assert [json.loads(line).get("error") for line in out.splitlines()] == [
        None, f"{noisy_folder / 'b_cut.png'} {CUT_PNG}"]
    assert "libpng" not in err and f"edgeface: error: {noisy_folder / 'b_cut.png'} {CUT_PNG}" in err
    assert all(line.startswith(("edgeface", "  ", "1 face(s)")) for line in err.splitlines()), err
    assert os.environ["OPENCV_FFMPEG_LOGLEVEL"] == "0"  # the program's own environment


def test_main_called_from_python_leaves_file_descriptors_alone(noisy_folder, monkeypatch, capsys):
    """main(argv) in a Python program changes no process-wide setting: no redirection of its stdout or stderr
    (they are its other threads' too), no environment variable."""
    def forbidden(*args):
        raise AssertionError("main() redirected a file descriptor")

    environment = dict(os.environ)
    with monkeypatch.context() as patched:
        patched.setattr(os, "dup", forbidden)
        patched.setattr(os, "dup2", forbidden)
        assert main(["detect", str(noisy_folder), "--json"]) == 2
        assert main(["run", "--source", str(noisy_folder), "--json"]) == 2
    assert dict(os.environ) == environment
    out, err = capsys.readouterr()
    assert [json.loads(line).get("error") for line in out.splitlines()] == [
        None, f"{noisy_folder / 'b_cut.png'} {CUT_PNG}", None, f"{noisy_folder / 'b_cut.png'} {CUT_PNG}"]


def test_a_failure_is_reported_on_its_first_line(capsys):
    """One line per bad file, the same helper as the runtimes' (edgeface.core.errors.first_line)."""
    from edgeface.cli import _report_failure
    from edgeface.core.errors import EdgefaceError

    _report_failure("x.jpg", EdgefaceError("\n  x.jpg could not be decoded  \nC++ backtrace:\n  frame 1"), True,
                    key="image")
    out, err = capsys.readouterr()
    assert err == "edgeface: error: x.jpg could not be decoded\n"
    assert json.loads(out) == {"image": "x.jpg", "error": "x.jpg could not be decoded"}
    _report_failure("y.jpg", EdgefaceError("not an image"), False, key="image")
    assert capsys.readouterr() == ("", "edgeface: error: y.jpg: not an image\n")


@pytest.mark.parametrize("module, extra", [
    ("torch", "export"), ("onnxsim", "onnx"), ("litert_torch", "tflite"), ("ai_edge_litert.interpreter", "litert"),
    ("coremltools", "coreml"), ("tensorrt", "tensorrt"), ("scipy.io", "eval"), ("matplotlib.pyplot", "bench"),
    ("albumentations", "train"),
])
def test_a_missing_optional_library_names_its_extra(module, extra, monkeypatch, capsys):
    """An optional library imported where no require() guards it: one line naming the extra, which the registries
    (each target's and runtime's libraries and extra) give."""
    import edgeface.cli as cli

    def missing(args):
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)

    monkeypatch.setattr(cli, "cmd_boards", missing)
    assert main(["boards"]) == 2
    assert capsys.readouterr().err == (f"edgeface: error: the boards command needs {module}, which is not installed "
                                       f"here; install it with `pip install edgeface[{extra}]`\n")


def test_a_missing_base_or_unknown_library_is_not_given_an_extra(monkeypatch):
    """onnxruntime is in the base install (its runtime declares no extra): no extra installs it, nor a library no
    registry declares; their errors stay as they are."""
    import edgeface.cli as cli

    assert "onnxruntime" not in cli.optional_extras() and "edgeface" not in cli.optional_extras()
    monkeypatch.setattr(cli, "cmd_boards", lambda args: __import__("no_such_module_here"))
    with pytest.raises(ModuleNotFoundError):
        main(["boards"])


def _resize_help(command: list[str]) -> tuple[str, str]:
    parser = build_parser()
    for word in command:  # down to the subcommand's parser
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
    helps = {a.dest: " ".join(a.help.split()) for a in parser._actions if a.help}
    return helps["resize"], helps["threads"]


def test_each_command_states_its_own_resize_default(monkeypatch):
    """The help states the default the command really uses, from the same value (bench: original, for timing each
    size as given; eval: original, the WIDER protocol; detect / run: processing.DEFAULT_RESIZE)."""
    import edgeface.cli
    from edgeface.cli import BENCH_RESIZE, BENCH_THREADS, _detector
    from edgeface.core.processing import DEFAULT_RESIZE
    from edgeface.evaluation.accuracy import WIDER_SETTINGS

    opened = []

    class Recorder:
        def __init__(self, **options):
            opened.append(options)

    monkeypatch.setattr(edgeface.cli, "Detector", Recorder)
    expected = {("detect",): (str(DEFAULT_RESIZE), "the runtime library's own choice"),
                ("run",): (str(DEFAULT_RESIZE), "the runtime library's own choice"),
                ("bench",): (BENCH_RESIZE, f"{BENCH_THREADS}; with --cpus, their count"),
                ("eval", "widerface"): (WIDER_SETTINGS["default_resize"], "the runtime library's own choice")}
    assert str(DEFAULT_RESIZE) == "max:640" and BENCH_RESIZE == WIDER_SETTINGS["default_resize"] == "original"
    for command, (default, threads) in expected.items():
        resize_help, threads_help = _resize_help(list(command))
        assert f"(default: {default}," in resize_help, (command, resize_help)
        assert f"(default: {threads}" in threads_help, (command, threads_help)
        argv = [*command, "x"] if command == ("detect",) else [*command, "--source", "x"] if command == ("run",) \
            else [*command, "--gt", "x"] if command[0] == "eval" else list(command)
        _detector(build_parser().parse_args(argv))
        assert str(opened[-1]["default_resize"]) == default, command


def test_export_reports_sizes_in_binary_units(monkeypatch, capsys):
    """Sizes are in MiB / GiB, as the README's limits (the model file: 1 MiB = 2**20 bytes)."""
    import types

    import edgeface.export.pipeline

    manifest = types.SimpleNamespace(target="onnx", precision="fp32", parity={"status": "passed"}, accuracy=None)
    bundle = types.SimpleNamespace(path=Path("bundles/x"), manifest=manifest, model_bytes=lambda: 3 * 2**19)
    monkeypatch.setattr(edgeface.export.pipeline, "export_bundle", lambda *args, **kwargs: bundle)
    assert main(["export", "--target", "onnx", "--no-verify"]) == 0
    assert capsys.readouterr().out == f"{Path('bundles/x')}: onnx fp32, 1.50 MiB, parity passed\n"


def test_a_file_name_too_long_is_one_line(capsys):
    assert main(["detect", "x" * 300 + ".jpg"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("edgeface: error: xxx") and "File name too long" in line


def test_running_out_of_memory_is_one_line(monkeypatch, capsys):
    import edgeface.cli

    def exhausted():
        raise MemoryError

    monkeypatch.setattr(edgeface.cli, "list_boards", exhausted)
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
