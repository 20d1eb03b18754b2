"""The edgeface command, run as a user runs it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest


def run(*args, check=True, cwd=None):
    # Run outside the checkout, as an installed command would be.
    proc = subprocess.run([sys.executable, "-m", "edgeface", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd or Path(__file__).resolve().parents[2])
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_detect_image_writes_annotated_image_and_json(astronaut_path, tmp_path):
    proc = run("detect", astronaut_path, "--out", tmp_path, "--json")
    record = json.loads(proc.stdout)
    assert record["width"] == 512 and len(record["faces"]) == 1
    assert json.loads((tmp_path / "astronaut.json").read_text()) == record
    drawn = cv2.imread(str(tmp_path / "astronaut.jpg"))
    assert drawn.shape == (512, 512, 3) and not (drawn == cv2.imread(str(astronaut_path))).all()


def test_detect_folder_keeps_structure(astronaut_path, tmp_path):
    src = tmp_path / "in" / "sub"
    src.mkdir(parents=True)
    shutil.copy(astronaut_path, src / "a.jpg")
    shutil.copy(astronaut_path, tmp_path / "in" / "b.png")
    proc = run("detect", tmp_path / "in", "--out", tmp_path / "out")
    assert (tmp_path / "out" / "sub" / "a.json").is_file() and (tmp_path / "out" / "b.jpg").is_file()
    assert "2 face(s) in 2 image(s)" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["detect", "no/such/image.jpg"], "no such image or folder"),
        (["detect", "{asset}", "--weights", "no/such.pth"], "neither a file nor a known weights name"),
        (["detect", "{asset}", "--backbone", "mnet25"], "did you mean"),
        (["detect", "{asset}", "--resize", "100x100"], "multiple of 32"),
        (["eval", "widerface", "--gt", "no/such/dir"], "wider_face_val.mat"),
    ],
)
def test_bad_input_exits_2_with_a_message(args, message, astronaut_path):
    proc = run(*[a.replace("{asset}", str(astronaut_path)) for a in args], check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_eval_scores_prediction_folders(reference_dir, wider_gt):
    proc = run("eval", "widerface", "--gt", wider_gt, "--preds", reference_dir / "biubug6_final_dev")
    assert "834 images" in proc.stdout
    assert "easy   AP 0.8942" in proc.stdout and "hard   AP 0.7050" in proc.stdout


def test_eval_runs_detector_and_writes_wider_predictions(wider_images, wider_gt, final_retinaface, tmp_path):
    proc = run("eval", "widerface", "--images", wider_images, "--gt", wider_gt, "--limit", 6,
               "--weights", final_retinaface, "--save-preds", tmp_path / "preds", "--json", tmp_path / "r.json")
    assert "WIDER FACE:" not in proc.stderr  # no progress bar when stderr is not a terminal
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["num_images"] == 6 and set(result["ap"]) == {"easy", "medium", "hard"}
    files = sorted((tmp_path / "preds").rglob("*.txt"))
    assert len(files) == 6
    again = run("eval", "widerface", "--gt", wider_gt, "--preds", tmp_path / "preds")
    assert f"easy   AP {result['ap']['easy']:.4f}" in again.stdout  # written files score the same
