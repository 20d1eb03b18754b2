"""Publishing a bundle (export, build-engine) and repairing an interrupted publication never lose a user's folder:
recovery publishes, restores or deletes only what a publication put there, deletes only under trash names, says
in one line what it left alone, and works where the folder cannot be listed or locked."""

import errno
import hashlib
import json
import os
import shutil

import pytest
from edgeface.export.pipeline import export_bundle

from edgeface.core import bundle as bundle_module
from edgeface.core.bundle import (
    check_output_folder,
    load_bundle,
    recover_publication,
    staging_dir,
    update_bundle,
    write_manifest,
)
from edgeface.core.errors import EdgefaceError

pytest.importorskip("onnxsim", reason="ONNX export needs the onnx extra: pip install edgeface[onnx]")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_bundle("onnx", precision="fp32", imgsz=(320, 320), verify=False, progress=False,
                         out=tmp_path_factory.mktemp("publication") / "b").path


def _snapshot(folder):
    """Every file under ``folder`` (relative path -> sha256): what must not change."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _users_folder(path):
    path.mkdir()
    (path / "holiday.jpg").write_bytes(b"the user's photo")
    (path / "notes").mkdir()
    (path / "notes" / "todo.txt").write_text("mine")
    return _snapshot(path)


def _one_warning(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("edgeface: warning: "), err
    return lines[0]


# --- recovery never replaces or deletes what is not its own -------------------------------------------------------

def test_a_finished_bundle_does_not_replace_a_users_folder_at_name(exported, tmp_path, capsys):
    """Killed with the new bundle staged as .b.new; meanwhile the user put their own folder at b."""
    shutil.copytree(exported, tmp_path / ".b.new")
    mine = _users_folder(tmp_path / "b")
    recover_publication(tmp_path / "b")
    assert _snapshot(tmp_path / "b") == mine
    assert (tmp_path / ".b.new" / "manifest.json").is_file()  # kept, not lost either
    assert "stays in .b.new" in _one_warning(capsys)


def test_old_without_a_manifest_is_not_rolled_back_nor_deleted(tmp_path, capsys):
    mine = _users_folder(tmp_path / ".b.old")
    recover_publication(tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert _snapshot(tmp_path / ".b.old") == mine
    assert ".b.old is left as it is" in _one_warning(capsys)


def test_old_holding_a_users_folder_beside_a_bundle_is_not_deleted(exported, tmp_path, capsys):
    shutil.copytree(exported, tmp_path / "b")
    mine = _users_folder(tmp_path / ".b.old")
    recover_publication(tmp_path / "b")
    assert _snapshot(tmp_path / ".b.old") == mine
    assert "not an edgeface bundle" in _one_warning(capsys)
    assert load_bundle(tmp_path / "b").manifest.target == "onnx"


def test_a_half_deleted_old_is_not_restored(exported, tmp_path, capsys):
    """A previous bundle that lost its model (a deletion cut short) is no bundle to roll back to."""
    shutil.copytree(exported, tmp_path / ".b.old")
    (tmp_path / ".b.old" / "model.onnx").unlink()
    recover_publication(tmp_path / "b")
    assert not (tmp_path / "b").exists() and (tmp_path / ".b.old" / "manifest.json").is_file()
    assert "model.onnx" in _one_warning(capsys)


def test_staging_refuses_a_users_folder_in_the_way_and_keeps_it(tmp_path, capsys):
    mine = _users_folder(tmp_path / ".b.old")
    with pytest.raises(EdgefaceError, match=r"\.b\.old is in the way .* move it away"):
        with staging_dir(tmp_path / "b"):
            pytest.fail("the export must not start")
    assert _snapshot(tmp_path / ".b.old") == mine
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.old"]


def test_publication_replaces_a_previous_bundle_and_leaves_no_siblings(exported, tmp_path):
    shutil.copytree(exported, tmp_path / "b")
    shutil.copytree(exported, tmp_path / ".b.old")  # a leftover of an earlier run: an edgeface bundle, may go
    with staging_dir(tmp_path / "b") as staging:
        shutil.copytree(exported, staging, dirs_exist_ok=True)
        (staging / "parity" / "reference.json").unlink()
        manifest = load_bundle(staging).manifest
        write_manifest(staging, manifest)
    assert not (tmp_path / "b" / "parity" / "reference.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# --- deletion happens under trash names only ---------------------------------------------------------------------

def test_a_crash_while_deleting_the_previous_bundle_leaves_it_under_a_trash_name(exported, tmp_path, monkeypatch):
    shutil.copytree(exported, tmp_path / "b")
    real_rmtree = shutil.rmtree

    def crash_midway(path, ignore_errors=False):
        if ".b.trash-" in str(path):  # the previous bundle: delete part of it, then "crash"
            (path / "model.onnx").unlink()
            raise KeyboardInterrupt
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(bundle_module.shutil, "rmtree", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        with staging_dir(tmp_path / "b") as staging:
            shutil.copytree(exported, staging, dirs_exist_ok=True)
    monkeypatch.setattr(bundle_module.shutil, "rmtree", real_rmtree)
    trash, published = sorted(p.name for p in tmp_path.iterdir())
    assert published == "b" and trash.startswith(f".b.trash-{os.getpid()}-")
    assert not (tmp_path / ".b.old").exists()  # nothing half-deleted under a name recovery would restore
    monkeypatch.setattr(bundle_module, "_alive", lambda pid: False)  # as the next run sees it once we are gone
    recover_publication(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert load_bundle(tmp_path / "b").manifest.target == "onnx"


def test_only_staging_and_trash_of_dead_processes_are_removed(tmp_path, monkeypatch):
    dead, alive = 2**22 + 12345, os.getpid()
    stale = [tmp_path / f".b.staging-{dead}-abc_12", tmp_path / f".b.trash-{dead}-0f0f0f0f"]
    kept = [tmp_path / f".b.trash-{alive}-1a2b3c4d",  # being deleted by a running process
            tmp_path / ".b.trash-1.new",  # another bundle's (named b.trash-1) publication, not ours
            tmp_path / ".b.staging-notes"]  # not a name edgeface makes
    for folder in stale + kept:
        folder.mkdir()
        (folder / "file").write_text("x")
    monkeypatch.setattr(bundle_module, "_alive", lambda pid: pid == alive)
    recover_publication(tmp_path / "b")
    assert not any(f.exists() for f in stale) and all(f.exists() for f in kept)


# --- what may be replaced -------------------------------------------------------------------------------------------

def test_only_an_unchanged_bundle_or_an_empty_folder_is_replaced(exported, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"")
    assert check_output_folder(tmp_path / "empty") == tmp_path / "empty"
    partial = tmp_path / "partial"  # a bundle with files deleted: nothing of the user's is in it
    shutil.copytree(exported, partial)
    shutil.rmtree(partial / "parity")
    (partial / "model.onnx").unlink()
    assert check_output_folder(partial) == partial

    changed = tmp_path / "changed"  # the user edited the model: it is theirs now
    shutil.copytree(exported, changed)
    with open(changed / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EdgefaceError, match="'model.onnx' was changed since export"):
        check_output_folder(changed)

    invalid = tmp_path / "invalid"  # looks like a bundle, but its manifest is not a valid one
    shutil.copytree(exported, invalid)
    manifest = json.loads((invalid / "manifest.json").read_text())
    del manifest["outputs"]
    (invalid / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgefaceError, match="not an edgeface bundle edgeface may replace .*outputs"):
        check_output_folder(invalid)

    only_manifest = tmp_path / "only-manifest"
    only_manifest.mkdir()
    (only_manifest / "manifest.json").write_text("[]")
    with pytest.raises(EdgefaceError, match="JSON list"):
        check_output_folder(only_manifest)
    for folder in (changed, invalid, only_manifest):
        assert (folder / "manifest.json").is_file()


def test_a_fifo_in_a_bundle_is_refused_not_read(exported, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(exported, copy)
    os.mkfifo(copy / "pipe")
    with pytest.raises(EdgefaceError, match="'pipe', which is not a regular file"):
        load_bundle(copy)
    with pytest.raises(EdgefaceError, match="not a regular file"):
        check_output_folder(copy)


# --- failures of the file system: one line or a warning, never a traceback --------------------------------------

def test_an_unreadable_parent_is_a_warning_on_load_and_one_line_on_export(exported, tmp_path, monkeypatch, capsys):
    shutil.copytree(exported, tmp_path / "b")

    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(bundle_module.os, "scandir", denied)
    recover_publication(tmp_path / "b")
    assert "Permission denied" in _one_warning(capsys)
    with pytest.raises(EdgefaceError) as error:
        recover_publication(tmp_path / "b", strict=True)
    assert "Permission denied" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(EdgefaceError, match="Permission denied"):
        with staging_dir(tmp_path / "b"):
            pass
    monkeypatch.undo()
    assert load_bundle(tmp_path / "b").manifest.target == "onnx"


@pytest.mark.parametrize("code", sorted({errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOLCK}))
def test_publication_goes_on_where_the_file_system_has_no_locks(exported, tmp_path, monkeypatch, code):
    import fcntl

    def no_locks(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    shutil.copytree(exported, tmp_path / ".b.old")  # recovery needs the lock too
    assert load_bundle(tmp_path / "b").manifest.target == "onnx"
    with staging_dir(tmp_path / "b2") as staging:
        shutil.copytree(exported, staging, dirs_exist_ok=True)
    assert load_bundle(tmp_path / "b2").manifest.target == "onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "b2"]


def test_other_lock_failures_are_reported(tmp_path, monkeypatch):
    import fcntl

    def broken(fd, operation):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match="Input/output error"):
        with bundle_module._folder_lock(tmp_path):
            pass


# --- permissions and one umask helper ------------------------------------------------------------------------------

def test_staging_takes_the_umask_from_the_one_helper(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle_module, "_umask", lambda: 0o027)
    with staging_dir(tmp_path / "b") as staging:
        assert staging.stat().st_mode & 0o777 == 0o750
        (staging / "x").write_text("x")
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o750


# --- updating a published bundle ------------------------------------------------------------------------------------

def test_update_publishes_only_a_complete_change(exported, tmp_path):
    shutil.copytree(exported, tmp_path / "b")
    before = _snapshot(tmp_path / "b")
    with pytest.raises(RuntimeError):
        with update_bundle(tmp_path / "b") as staged:
            (staged.path / "extra.bin").write_bytes(b"half")
            raise RuntimeError("failed half-way")
    assert _snapshot(tmp_path / "b") == before
    with update_bundle(tmp_path / "b") as staged:
        (staged.path / "extra.bin").write_bytes(b"whole")
        staged.manifest.notes.append("updated")
        write_manifest(staged.path, staged.manifest)
    updated = load_bundle(tmp_path / "b")
    assert updated.manifest.notes[-1] == "updated" and (tmp_path / "b" / "extra.bin").read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_update_refuses_when_the_bundle_changed_meanwhile(exported, tmp_path):
    shutil.copytree(exported, tmp_path / "b")
    with pytest.raises(EdgefaceError, match="changed by someone else"):
        with update_bundle(tmp_path / "b") as staged:
            other = load_bundle(tmp_path / "b").manifest  # another process rewrites the bundle meanwhile
            other.notes.append("theirs")
            write_manifest(tmp_path / "b", other)
            staged.manifest.notes.append("ours")
            write_manifest(staged.path, staged.manifest)
    assert load_bundle(tmp_path / "b").manifest.notes[-1] == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
