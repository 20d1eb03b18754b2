"""`detect --out DIR` and `run --save DIR` never lose a user's file: edgeface writes where nothing is, or over its
own results of an earlier run (and says so); a user's file of the same name, an input image, a folder in the way
or the input folder itself is refused in one line naming it, before anything is written. Files are made here,
small, in tmp_path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeface.cli import OUTPUT_MARK, main


def _error(err: str) -> str:
    (line,) = [line for line in err.splitlines() if line.startswith("edgeface: error:")]
    return line


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def photos(tmp_path, astronaut_path) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(astronaut_path, folder / "holiday.jpg")
    shutil.copy(astronaut_path, folder / "sub" / "party.jpg")
    return folder


def _video(path: Path, frames: int = 3) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(frames):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    return path


USER_PHOTO = b"\xff\xd8\xff\xe0 the user's own photograph, not edgeface's"


@pytest.mark.parametrize("existing", ["holiday.jpg", "holiday.json", "sub/party.jpg"])
def test_detect_refuses_to_write_over_a_users_file(photos, tmp_path, existing, capsys):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    user_file = out / existing
    user_file.write_bytes(USER_PHOTO if existing.endswith(".jpg") else b'{"album": "summer 2024"}')
    before = _tree(out)
    assert main(["detect", str(photos), "--out", str(out)]) == 2
    assert _error(capsys.readouterr().err) == (
        f"edgeface: error: --out: {user_file} already exists and edgeface did not write it (edgeface replaces only "
        "its own earlier results): move it away or choose another folder")
    assert _tree(out) == before  # refused before anything was written


def test_detect_again_replaces_its_own_results_and_says_so(photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["detect", str(photos), "--out", str(out)]) == 0
    first = _tree(out)
    assert sorted(first) == ["holiday.jpg", "holiday.json", "sub/party.jpg", "sub/party.json"]
    assert "replaced" not in capsys.readouterr().err
    for name in ("holiday.jpg", "sub/party.jpg"):  # marked as edgeface's, and still a plain JPEG
        assert OUTPUT_MARK in first[name][:64]
        drawn = cv2.imdecode(np.frombuffer(first[name], np.uint8), cv2.IMREAD_COLOR)
        assert drawn.shape == (512, 512, 3)
    assert json.loads(first["holiday.json"])["image"] == str(photos / "holiday.jpg")
    (out / "notes.txt").write_text("the user's notes beside the results")
    assert main(["detect", str(photos), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"2 face(s) in 2 image(s); annotated images and JSON in {out} (4 file(s) of an "
                                    "earlier edgeface run replaced)")
    second = _tree(out)
    assert second.pop("notes.txt") == b"the user's notes beside the results"
    assert second == first


def test_a_folder_in_the_way_and_an_output_path_that_is_a_file(photos, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "holiday.json").mkdir(parents=True)
    assert main(["detect", str(photos), "--out", str(out)]) == 2
    assert _error(capsys.readouterr().err) == (
        f"edgeface: error: --out: {out / 'holiday.json'} is a folder, where edgeface would write a file; move it "
        "away or choose another folder")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    assert main(["detect", str(photos), "--out", str(notes)]) == 2
    assert main(["run", "--source", str(photos), "--save", str(notes)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("edgeface: error:")]
    assert errors == [f"edgeface: error: {option} {notes} is a file, not a folder: give a folder for the results "
                      "(it is created if missing)" for option in ("--out", "--save")]
    assert notes.read_text() == "keep me"


def test_output_folder_inside_the_input_folder_is_not_read_as_input(photos, capsys):
    """`detect photos --out photos/faces`, run twice: the second run reads the same two photos, not its results."""
    out = photos / "faces"
    for _ in range(2):
        assert main(["detect", str(photos), "--out", str(out), "--json"]) == 0
        out_lines, err = capsys.readouterr()
        assert [Path(json.loads(line)["image"]).name for line in out_lines.splitlines()] == ["holiday.jpg",
                                                                                             "party.jpg"]
    assert "(4 file(s) of an earlier edgeface run replaced)" in err
    assert sorted(_tree(out)) == ["holiday.jpg", "holiday.json", "sub/party.jpg", "sub/party.json"]
    shutil.rmtree(out)  # else run would read detect's results: they are not in its own --save folder
    for _ in range(2):
        assert main(["run", "--source", str(photos), "--save", str(photos / "frames"), "--json"]) == 0
        out_lines, err = capsys.readouterr()
        assert [json.loads(line)["frame"] for line in out_lines.splitlines()] == ["holiday", "sub/party"]
    assert "(2 file(s) of an earlier edgeface run replaced)" in err
    assert sorted(_tree(photos / "frames")) == ["holiday.jpg", "sub/party.jpg"]


def test_images_sharing_a_name_keep_their_own_results(tmp_path, astronaut_path, capsys):
    """photo.jpg and photo.png in one folder: two sets of results, neither replacing the other."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(astronaut_path, folder / "photo.jpg")
    cv2.imwrite(str(folder / "photo.png"), cv2.imread(str(astronaut_path))[:, ::-1])  # mirrored: other results
    assert main(["detect", str(folder), "--out", str(tmp_path / "out")]) == 0
    results = _tree(tmp_path / "out")
    assert sorted(results) == ["photo.jpg.jpg", "photo.jpg.json", "photo.png.jpg", "photo.png.json"]
    assert json.loads(results["photo.jpg.json"])["image"] == str(folder / "photo.jpg")
    assert json.loads(results["photo.png.json"])["image"] == str(folder / "photo.png")
    assert main(["run", "--source", str(folder), "--save", str(tmp_path / "frames"), "--json"]) == 0
    assert [json.loads(line)["frame"] for line in capsys.readouterr().out.splitlines()[-2:]] == ["photo.jpg",
                                                                                                 "photo.png"]
    assert sorted(_tree(tmp_path / "frames")) == ["photo.jpg.jpg", "photo.png.jpg"]


def test_run_refuses_to_write_over_a_users_file(photos, tmp_path, capsys):
    save = tmp_path / "frames"
    save.mkdir()
    (save / "holiday.jpg").write_bytes(USER_PHOTO)
    assert main(["run", "--source", str(photos), "--save", str(save)]) == 2
    assert _error(capsys.readouterr().err) == (
        f"edgeface: error: --save: {save / 'holiday.jpg'} already exists and edgeface did not write it (edgeface "
        "replaces only its own earlier results): move it away or choose another folder")
    assert _tree(save) == {"holiday.jpg": USER_PHOTO}
    assert main(["run", "--source", str(photos / "holiday.jpg"), "--save", str(save)]) == 2
    assert "--save: " + str(save / "holiday.jpg") + " already exists" in _error(capsys.readouterr().err)
    assert _tree(save) == {"holiday.jpg": USER_PHOTO}


def test_run_on_a_video_stops_at_a_users_file_and_replaces_its_own(tmp_path, capsys):
    """A video's frame names are known only as they come: the first frame whose file is the user's stops the run
    there (the frames before are edgeface's own); a re-run over edgeface's frames replaces them and says so."""
    video = _video(tmp_path / "clip.avi")
    save = tmp_path / "frames"
    assert main(["run", "--source", str(video), "--save", str(save)]) == 0
    first = _tree(save)
    assert sorted(first) == ["clip_000001.jpg", "clip_000002.jpg", "clip_000003.jpg"]
    assert all(OUTPUT_MARK in data[:64] for data in first.values())
    capsys.readouterr()
    assert main(["run", "--source", str(video), "--save", str(save)]) == 0
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"; annotated frames in {save} (3 file(s) of an earlier edgeface run replaced)")
    (save / "clip_000002.jpg").write_bytes(USER_PHOTO)
    assert main(["run", "--source", str(video), "--save", str(save)]) == 2
    assert _error(capsys.readouterr().err) == (
        f"edgeface: error: --save: {save / 'clip_000002.jpg'} already exists and edgeface did not write it "
        "(edgeface replaces only its own earlier results): move it away or choose another folder")
    assert (save / "clip_000002.jpg").read_bytes() == USER_PHOTO
    assert sorted(_tree(save)) == ["clip_000001.jpg", "clip_000002.jpg", "clip_000003.jpg"]  # no temporary file
