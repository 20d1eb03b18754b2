"""The bundle: a directory with model file(s) and ``manifest.json`` (:mod:`edgeface.core.manifest`), the one
contract between export and every runtime. Loading checks every file against the manifest; exports and updates are
published atomically (a crash leaves the previous bundle or the new one, never half of either).
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from edgeface.core.errors import EdgefaceError, first_line
from edgeface.core.files import _umask, atomic_write, sha256_file
from edgeface.core.manifest import MANIFEST, OPTIONAL_PREFIX, Manifest, read_manifest, validate_manifest


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    def model_bytes(self, *, end2end: bool = False) -> int:
        """Size in bytes of the model file (or package directory, e.g. ``.mlpackage``) plus its separate weights
        file where the format has one (OpenVINO ``.bin``, ncnn ``.bin``): what a device has to ship. ``end2end``:
        those of the end-to-end model instead."""
        roles = ("end2end", "end2end_weights") if end2end else ("model", "weights")
        paths = [self.file(role) for role in roles if role in self.manifest.files]
        return sum(p.stat().st_size for path in paths for p in ([path] if path.is_file() else path.rglob("*"))
                   if p.is_file())

    def file(self, role: str = "model") -> Path:
        """The file of ``role`` (``model``, ``engine``): always inside the bundle (checked on load)."""
        try:
            return self.path / self.manifest.files[role]
        except KeyError:
            raise EdgefaceError(f"bundle {self.path} has no {role!r} file "
                                f"(has {sorted(self.manifest.files)})") from None


# Files an operating system drops into folders by itself; they are not part of a bundle and are ignored.
OS_LITTER = {".DS_Store", "Thumbs.db", "desktop.ini"}


def _inside(root: Path, relative: str, field: str) -> Path:
    """``root / relative``, refused unless it stays inside ``root`` once symbolic links are followed."""
    path = root / relative
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise EdgefaceError(f"bundle {root}: field {field} {relative!r} points outside the bundle; re-export it")
    return path


def _bundle_files(root: Path) -> list[str]:
    """Every file in the bundle (relative, '/'-separated) but the manifest and OS litter; symbolic links that leave
    the bundle, and anything that is not a regular file (a FIFO would block the hashing), are refused."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                _inside(root, relative, "(a symbolic link)")
            if name in filenames and relative != MANIFEST and name not in OS_LITTER:
                try:
                    regular = stat.S_ISREG(os.stat(path).st_mode)
                except OSError:  # a dangling symbolic link
                    regular = False
                if not regular:
                    raise EdgefaceError(f"bundle {root} holds {relative!r}, which is not a regular file; remove it "
                                        "or re-export the bundle")
                found.append(relative)
    return sorted(found)


def load_bundle(path: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Read a bundle: its manifest validated against the schema, every file it names resolved inside the bundle,
    the manifest's sha256 list covering the model and every file present, and (``verify``, the default) each
    file's sha256 checked. A publication interrupted by a crash is finished or rolled back first.

    Raises :class:`EdgefaceError` with the offending field or file.
    """
    path = Path(path)
    recover_publication(path)
    return _open_bundle(path, verify=verify)


def _open_bundle(path: Path, *, verify: bool = True) -> Bundle:
    """:func:`load_bundle` without the recovery of an interrupted publication."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        what = "no such folder" if not path.exists() else f"no {MANIFEST}"
        raise EdgefaceError(f"{path} is not an edgeface bundle ({what}); create one with `edgeface export`")
    data = read_manifest(manifest_file)
    for role, relative in data["files"].items():
        file = _inside(path, relative, f"files.{role}")
        if not file.exists():
            raise EdgefaceError(f"bundle {path} is incomplete: {relative} (files.{role}) is missing; re-export it")
        if file.is_dir() != (relative.endswith(".mlpackage")):
            kind = "a folder" if file.is_dir() else "a file"
            raise EdgefaceError(f"bundle {path}: files.{role} {relative!r} is {kind}, which the {role} of a "
                                f"{data['target']} bundle is not; re-export it")
    hashes = data["sha256"]
    present = _bundle_files(path)
    unlisted = [f for f in present if f not in hashes]
    if unlisted:
        raise EdgefaceError(f"bundle {path} holds {unlisted[0]!r}, which its manifest does not list (sha256); a "
                            "bundle is only what its manifest hashes: remove the file or re-export the bundle")
    for role, relative in data["files"].items():
        covered = [relative] if relative in hashes else [k for k in hashes if k.startswith(relative + "/")]
        if not covered:
            raise EdgefaceError(f"bundle {path}: files.{role} {relative!r} has no sha256 in the manifest; "
                                "re-export the bundle")
    for relative, expected in hashes.items():
        file = _inside(path, relative, "sha256")
        if relative not in present:
            if relative.startswith(OPTIONAL_PREFIX) and not file.exists():
                continue  # the parity evidence is optional
            raise EdgefaceError(f"bundle {path} is incomplete: {relative} is missing; re-export it")
        if verify and sha256_file(file) != expected:
            raise EdgefaceError(f"bundle {path}: {relative} does not match the sha256 in its manifest "
                                "(modified or damaged); re-export it")
    try:
        manifest = Manifest.from_dict(data)
    except TypeError as exc:  # a field the schema allows but this version's dataclass does not know
        raise EdgefaceError(f"{manifest_file} is not an edgeface manifest of this version ({exc})") from None
    return Bundle(path, manifest)


def hash_files(directory: Path) -> dict[str, str]:
    return {name: sha256_file(directory / name) for name in _bundle_files(directory)}


def _checked(directory: Path, manifest: Manifest) -> dict[str, Any]:
    """``manifest`` with the sha256 of every file now in ``directory``, as JSON will hold it, validated as
    :func:`read_manifest` validates it (a manifest edgeface would refuse to load is never written)."""
    manifest.sha256 = hash_files(directory)
    try:
        data = json.loads(json.dumps(manifest.to_dict(), allow_nan=False))
    except ValueError as exc:  # NaN or infinity: JSON has no such number
        raise EdgefaceError(f"the manifest for {directory} holds a number JSON cannot store ({exc})") from None
    return validate_manifest(data, f"the manifest for {directory}")


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` into ``directory`` (atomically), with the sha256 of every file there; raises
    :class:`EdgefaceError` if the manifest fails its own schema or rules."""
    text = json.dumps(_checked(directory, manifest), indent=2) + "\n"
    atomic_write(directory / MANIFEST, lambda tmp: tmp.write_text(text))


def staged_bundle(directory: Path, manifest: Manifest) -> Bundle:
    """The bundle being built in ``directory`` (an export's staging folder) as :func:`load_bundle` will read it
    once :func:`write_manifest` has written ``manifest``: validated, its files hashed, the manifest through JSON.
    The export runs its parity check and evaluation on it, then writes the complete manifest once."""
    return Bundle(directory, Manifest.from_dict(_checked(directory, manifest)))


# Publishing a bundle at NAME, under a lock on the parent folder: the finished staging folder is renamed to
# .NAME.new, the previous bundle (if any) to .NAME.old, .NAME.new to NAME, and .NAME.old to a trash name
# (.NAME.trash-PID-xxxx), which is then deleted. A crash at any point leaves a state recover_publication()
# finishes (a complete bundle in .NAME.new) or rolls back (a bundle in .NAME.old and nothing at NAME); folders
# are only ever deleted under a staging or trash name, which recovery never publishes, so a crash in the middle of
# a deletion cannot leave a half-deleted folder under a name recovery trusts. Staging and trash folders of
# processes that are no longer running are removed.
def _sibling(final: Path, what: str) -> Path:
    return final.with_name(f".{final.name}.{what}")


def _staging_prefix(final: Path) -> str:
    return f".{final.name}.staging-"


def _trash_prefix(final: Path) -> str:
    return f".{final.name}.trash-"


def _to_trash(folder: Path, final: Path) -> Path:
    """Rename ``folder`` to a fresh trash name beside ``final`` (to be deleted by the caller, or by the recovery
    of a later run if this process dies first)."""
    trash = final.with_name(f"{_trash_prefix(final)}{os.getpid()}-{secrets.token_hex(4)}")
    folder.rename(trash)
    return trash


# flock() on a file system without it (some network and FUSE file systems): publication goes on unlocked.
_NO_LOCKS = {getattr(errno, name) for name in ("ENOTSUP", "EOPNOTSUPP", "ENOLCK") if hasattr(errno, name)}


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Serialise publication and recovery in one folder between processes: flock where the system and the file
    system have it; elsewhere (Windows, a file system without locks, a folder that cannot be opened for reading)
    the block runs without the lock."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks on folders
        fcntl = None
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY)
        except PermissionError:
            fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            os.close(fd)
            fd = None
            if exc.errno not in _NO_LOCKS:
                raise
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _warn(message: str) -> None:
    print(f"edgeface: warning: {message}", file=sys.stderr)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return first_line(exc)


def recover_publication(final: str | os.PathLike, *, strict: bool = False) -> None:
    """Finish or roll back a publication of ``final`` that a crash interrupted, and remove the staging and trash
    folders of processes that are no longer running. Costs one listing of the parent folder when there is
    nothing to do.

    Nothing but a previous edgeface bundle at ``final`` is ever replaced, and ``.NAME.new`` / ``.NAME.old`` are
    only published, restored or deleted when they hold what a publication puts there (see
    :func:`_not_replaceable`); what is left alone is said in one line. A failure (an unreadable or read-only
    folder) never raises a traceback: with ``strict`` it raises :class:`EdgefaceError` in one line, else it is
    reported as a warning on stderr and loading goes on with what is there.
    """
    final = Path(os.path.abspath(final))
    try:
        left = _recover(final)
    except (OSError, ValueError, EdgefaceError) as exc:
        message = f"could not finish or roll back an interrupted publication of {final} ({_reason(exc)})"
        if strict:
            raise EdgefaceError(f"{message}; fix the folder's permissions or choose another --out") from None
        _warn(message)
        return
    if left:
        _warn("; ".join(left))


def _recover(final: Path) -> list[str]:
    """The recovery itself; returns what it left alone and why."""
    parent = final.parent
    if not parent.is_dir():
        return []
    new, old = _sibling(final, "new"), _sibling(final, "old")
    prefixes = (_staging_prefix(final), _trash_prefix(final))
    with os.scandir(parent) as entries:
        stale = [(parent / e.name, prefix) for e in entries for prefix in prefixes if e.name.startswith(prefix)]
    if not (os.path.lexists(new) or os.path.lexists(old) or stale):
        return []
    left: list[str] = []
    trash: list[Path] = []
    kept: set[Path] = set()
    with _folder_lock(parent):
        if os.path.lexists(new) and _incomplete(new) is None:  # complete: it was being published
            problem = _not_replaceable(final) if os.path.lexists(final) else None
            if problem is None:
                if os.path.lexists(final):
                    trash.append(_to_trash(final, final))
                new.rename(final)
            else:
                left.append(f"{final} is not an edgeface bundle ({_clip(problem)}), so the bundle whose "
                            f"publication was interrupted stays in {new.name}")
                kept.add(new)
        elif not os.path.lexists(final) and os.path.lexists(old) and _incomplete(old, empty_ok=True) is None:
            old.rename(final)  # roll back to the previous bundle
        # What is left of the publication goes only once a whole bundle is at NAME; beside anything else it stays.
        settled = os.path.lexists(final) and _incomplete(final) is None
        for leftover in (new, old):
            if not os.path.lexists(leftover) or leftover in kept:
                continue
            problem = _not_replaceable(leftover) if settled else _incomplete(leftover, empty_ok=True)
            if settled and problem is None:
                trash.append(_to_trash(leftover, final))
            elif settled:
                left.append(f"{leftover} is left as it is: it is not an edgeface bundle ({_clip(problem)})")
            else:
                left.append(f"{leftover} is left as it is: there is no complete edgeface bundle at {final} to "
                            f"replace it with" + (f", and it is none either ({_clip(problem)})" if problem else ""))
        for folder, prefix in stale:  # staging and trash of processes no longer running
            owner = re.fullmatch(r"(\d+)-[0-9a-z_]+", folder.name[len(prefix):])
            if owner and not _alive(int(owner.group(1))):  # (another name, e.g. another bundle's, is not ours)
                trash.append(folder)
    for folder in trash:
        shutil.rmtree(folder, ignore_errors=True)
    return left


def _incomplete(folder: Path, *, empty_ok: bool = False) -> str | None:
    """Why ``folder`` is not a complete, intact edgeface bundle (None when it is one: what a publication puts in
    ``.NAME.new`` or moves to ``.NAME.old``); ``empty_ok``: an empty folder counts as one (a publication may have
    replaced an empty folder)."""
    if folder.is_symlink() or not folder.is_dir():
        return "not a folder"
    try:
        if empty_ok and not [e for e in os.listdir(folder) if e not in OS_LITTER]:
            return None
        _open_bundle(folder)
    except EdgefaceError as exc:
        return str(exc)
    except OSError as exc:
        return f"it cannot be read: {_reason(exc)}"
    return None


def _not_replaceable(folder: Path) -> str | None:
    """Why ``folder`` is not one edgeface may replace (None when it may).

    edgeface replaces only what it wrote there itself and nobody has changed since, so that replacing it never
    loses anything of the user's:

    - an empty folder (OS litter such as ``.DS_Store`` aside), or
    - an edgeface bundle: a real folder (not a symbolic link) whose ``manifest.json`` is a valid manifest of this
      schema version (:func:`read_manifest`) and in which every other file (OS litter aside) is a regular file
      listed in the manifest's ``sha256`` with a matching hash. Listed files may be missing (deleting parts of a
      bundle loses nothing of the user's), but a file the manifest does not list, a listed file whose bytes
      changed, a symbolic link out of the folder or a special file make the folder the user's.

    A bundle of another schema version or with an invalid manifest is therefore not replaced either: the user
    removes it (edgeface cannot tell it from a folder that only looks like one).
    """
    if folder.is_symlink():
        return "it is a symbolic link"
    if not folder.is_dir():
        return "it is not a folder"
    try:
        if not [e for e in os.listdir(folder) if e not in OS_LITTER]:
            return None
        if not (folder / MANIFEST).is_file():
            return f"it has no {MANIFEST}"
        hashes = read_manifest(folder / MANIFEST)["sha256"]
        for relative in _bundle_files(folder):
            if relative not in hashes:
                return f"it holds {relative!r}, which its manifest does not list"
            if sha256_file(folder / relative) != hashes[relative]:
                return f"{relative!r} was changed since export (its sha256 differs from the manifest's)"
    except EdgefaceError as exc:
        return str(exc)
    except OSError as exc:
        return f"it cannot be read: {_reason(exc)}"
    return None


def _is_previous_bundle(folder: Path) -> bool:
    """Whether edgeface may replace ``folder``: empty, or an unchanged edgeface bundle (see
    :func:`_not_replaceable`)."""
    return _not_replaceable(folder) is None


def check_output_folder(final: str | os.PathLike) -> Path:
    """The absolute bundle path for ``--out``, refused (EdgefaceError) unless it is new, empty or a previous
    edgeface bundle (see :func:`_not_replaceable`): edgeface never replaces a user's files."""
    final = Path(os.path.abspath(final))
    if final.parent == final:
        raise EdgefaceError(f"--out {final}: a bundle needs a folder of its own, not the file system root")
    cwd = Path.cwd().resolve()
    if final.resolve() == cwd or final.resolve() in cwd.parents:
        raise EdgefaceError(f"--out {final} is the current folder (or holds it); give a new folder, e.g. "
                            f"--out bundles/{final.name or 'model'}")
    limit = _name_max(final.parent) - 32  # room for the staging suffix
    if len(os.fsencode(final.name)) > limit:
        raise EdgefaceError(f"--out {final.name[:40]}...: the folder name is longer than this file system allows "
                            f"for a bundle ({limit} bytes); choose a shorter name")
    if final.is_symlink():
        raise EdgefaceError(f"--out {final} is a symbolic link; give the real folder (edgeface will not replace "
                            "what a link points to)")
    if final.exists() and not final.is_dir():
        raise EdgefaceError(f"--out {final} is an existing file, not an edgeface bundle; it was left untouched: "
                            "choose another --out")
    if final.is_dir():
        problem = _not_replaceable(final)
        if problem is not None:
            raise EdgefaceError(f"--out {final} is an existing folder that is not an edgeface bundle edgeface may "
                                f"replace ({_clip(problem)}); it was left untouched: choose a new folder")
    return final


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder if folder.exists() else folder.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _clear_siblings(final: Path) -> list[Path]:
    """Move ``.NAME.new`` / ``.NAME.old`` left by an earlier publication to trash names, or refuse (EdgefaceError)
    when one of them is not an edgeface bundle (it is then someone's folder, and stays)."""
    trash = []
    for sibling in (_sibling(final, "new"), _sibling(final, "old")):
        if not os.path.lexists(sibling):
            continue
        problem = _not_replaceable(sibling)
        if problem is not None:
            raise EdgefaceError(f"{sibling} is in the way of publishing {final.name} and is not an edgeface bundle "
                                f"({_clip(problem)}); move it away and run again")
        trash.append(_to_trash(sibling, final))
    return trash


def _manifest_digest(folder: Path) -> str | None:
    try:
        return sha256_file(folder / MANIFEST)
    except OSError:
        return None


@contextmanager
def staging_dir(final: str | os.PathLike, *, before_publish: Callable[[], None] | None = None) -> Iterator[Path]:
    """A temporary folder beside ``final`` that replaces it only if the block succeeds: a failed or killed export
    leaves no half-written bundle and an earlier bundle at ``final`` untouched. ``final`` must pass
    :func:`check_output_folder` (new, empty or a previous bundle), when the block starts and again when it is
    published. ``before_publish`` runs under the folder lock just before the renames and may refuse (raise)."""
    final = check_output_folder(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_publication(final, strict=True)
    trash: list[Path] = []
    try:
        with _folder_lock(final.parent):  # leftovers in the way are refused now rather than after the work
            trash += _clear_siblings(final)
    finally:
        for folder in trash:
            shutil.rmtree(folder, ignore_errors=True)
    trash = []
    tmp = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(final)}{os.getpid()}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; a bundle is as readable as any new folder
    try:
        yield tmp
        with _folder_lock(final.parent):
            check_output_folder(final)  # something may have appeared there during the export
            if before_publish is not None:
                before_publish()
            trash += _clear_siblings(final)
            trash += _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in trash:
            shutil.rmtree(folder, ignore_errors=True)


def _publish(tmp: Path, final: Path) -> list[Path]:
    """The renames that put the finished staging folder ``tmp`` at ``final`` (under the folder lock); returns the
    previous bundle under a trash name, for the caller to delete. A rename that fails puts everything back."""
    new, old = _sibling(final, "new"), _sibling(final, "old")
    tmp.rename(new)
    moved_old = False
    try:
        if os.path.lexists(final):
            final.rename(old)
            moved_old = True
        new.rename(final)
    except OSError:
        with suppress(OSError):  # not published: the previous bundle back, the new one discarded with the staging
            if moved_old and not os.path.lexists(final):
                old.rename(final)
            new.rename(tmp)
        raise
    if not moved_old:
        return []
    try:
        return [_to_trash(old, final)]
    except OSError:  # published all the same; the next recovery removes .NAME.old beside the complete bundle
        return []


@contextmanager
def update_bundle(path: str | os.PathLike) -> Iterator[Bundle]:
    """Change a published bundle without ever leaving it half-changed (``edgeface build-engine`` adds its engine
    this way): the block gets a staged copy of the bundle (checked like any bundle on load); when the block
    succeeds, the copy, with whatever the block wrote there and its manifest rewritten by the block
    (:func:`write_manifest`), replaces the bundle by the same renames as an export's publication. When the block
    fails, or the process is killed, the bundle stays as it was. If the bundle itself changed while the block ran,
    nothing is published (EdgefaceError)."""
    final = Path(os.path.abspath(path))
    load_bundle(final)  # a clear refusal of what is not a bundle, before anything is staged
    started: dict[str, str | None] = {}

    def unchanged() -> None:
        if _manifest_digest(final) != started["digest"]:
            raise EdgefaceError(f"bundle {final} was changed by someone else while it was being updated; nothing "
                                "was written: run again")

    with staging_dir(final, before_publish=unchanged) as tmp:
        shutil.copyfile(final / MANIFEST, tmp / MANIFEST)
        started["digest"] = sha256_file(tmp / MANIFEST)
        for relative in read_manifest(tmp / MANIFEST)["sha256"]:
            source = _inside(final, relative, "sha256")
            if not source.is_file():
                continue  # the optional parity evidence may be gone
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / relative)
        yield _open_bundle(tmp)  # the copy is what its manifest lists, hashes checked


