"""Exports print edgeface's own progress lines and nothing of the converters' libraries (Python warnings, library
loggers, native output on file descriptors 1 and 2); what the libraries printed is kept only when a conversion
fails, in a log file the error names."""

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from edgeface.export.base import quiet

from edgeface import EdgefaceError

CLI = [sys.executable, "-m", "edgeface"]
ROOT = Path(__file__).resolve().parents[1]


def _log_file(message: str) -> Path:
    found = re.search(r"\(the converters' output: (\S+)\)$", message)
    assert found, message
    return Path(found.group(1))


def test_quiet_hides_every_kind_of_output_on_success(capfd):
    with quiet("test conversion"):
        os.write(1, b"native stdout\n")  # C/C++ code writing to the file descriptors
        os.write(2, b"native stderr\n")
        print("python stdout")
        print("python stderr", file=sys.stderr)
        warnings.warn("deprecated", DeprecationWarning)
        warnings.warn("future", FutureWarning)
        logging.getLogger("absl").warning("absl logger")
        logging.getLogger().warning("root logger")  # onnxruntime's quantizer logs here
    print("edgeface export: after")
    out, err = capfd.readouterr()
    assert out == "edgeface export: after\n" and err == ""
    assert logging.getLogger("absl").level == logging.NOTSET  # loggers restored


@pytest.mark.parametrize("error", [RuntimeError("converter crashed\n  at frame 1\n  at frame 2"),
                                   EdgefaceError("coremltools could not convert the model")])
def test_a_failed_conversion_is_one_line_naming_the_log_of_what_was_printed(error, capfd):
    with pytest.raises(EdgefaceError) as info:
        with quiet("tflite fp32 conversion"):
            os.write(2, b"F0000 native: the reason it failed\n")
            print("a progress bar")
            raise error
    message = str(info.value)
    assert "\n" not in message
    if isinstance(error, EdgefaceError):
        assert message.startswith("coremltools could not convert the model (the converters' output: ")
    else:
        assert message.startswith("the tflite fp32 conversion failed (RuntimeError: converter crashed) ")
        assert info.value.__cause__ is error  # the library's exception stays attached for API users
    log = _log_file(message)
    assert log.read_text().splitlines() == ["F0000 native: the reason it failed", "a progress bar"]
    log.unlink()
    assert capfd.readouterr() == ("", "")


def _export(*args):
    return subprocess.run([*CLI, "export", *args], capture_output=True, text=True, timeout=1200, cwd=ROOT)


def _assert_only_edgeface_lines(done, out, summary):
    assert done.returncode == 0, done.stderr
    noise = [line for line in done.stderr.splitlines() if not line.startswith("edgeface")]
    assert noise == []
    assert any(line.startswith("edgeface export: converting") for line in done.stderr.splitlines())
    assert done.stdout.splitlines() == [line for line in done.stdout.splitlines() if line.startswith(f"{out}: ")]
    assert len(done.stdout.splitlines()) == 1 and summary in done.stdout


def test_tflite_export_prints_only_edgeface_lines(tmp_path):
    pytest.importorskip("litert_torch", reason="TFLite export needs litert-torch: pip install edgeface[tflite]")
    out = tmp_path / "tflite"
    done = _export("--target", "tflite", "--imgsz", "320x320", "--out", str(out))
    _assert_only_edgeface_lines(done, out, "tflite fp32")


def test_onnx_int8_export_prints_only_edgeface_lines(tmp_path, wider_images):
    out = tmp_path / "onnx-int8"
    done = _export("--target", "onnx", "--precision", "int8", "--imgsz", "320x320", "--calib", str(wider_images),
                   "--calib-n", "8", "--out", str(out))
    _assert_only_edgeface_lines(done, out, "onnx int8")


def test_a_converter_failure_in_a_fresh_process_keeps_the_libraries_output_in_a_log(tmp_path, wider_images):
    """A real conversion that fails inside the converter (after its libraries were imported and printed): one
    error line, the libraries' output in the log it names, nothing else on the console."""
    pytest.importorskip("litert_torch", reason="TFLite export needs litert-torch: pip install edgeface[tflite]")
    script = (
        "import sys\n"
        "from edgeface.core.errors import EdgefaceError\n"
        "from edgeface.export.pipeline import export_bundle\n"
        "try:\n"
        f"    export_bundle('tflite', precision='int8', imgsz=(320, 320), calib={str(wider_images)!r}, calib_n=1,\n"
        f"                  out={str(tmp_path / 'b')!r}, progress=False, options={{'keep_float': ['body.nope']}})\n"
        "except EdgefaceError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(2)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 2 and done.stderr == ""
    (message,) = done.stdout.splitlines()
    assert message.startswith("keep_float: the model has no module 'body.nope'")
    if "(the converters' output: " in message:  # only when the libraries printed something
        log = _log_file(message)
        assert log.read_text().strip()
        log.unlink()
