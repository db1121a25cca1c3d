"""State kept by table functions (ELITE detectors, LANCET sessions), saved and loaded as one unit.

An artifact lives in a slot directory:

    SLOT/CURRENT              the name of the current version; replaced atomically (os.replace)
    SLOT/v-<ns>-<hex>/        one complete version: the artifact's files and MANIFEST.json
    SLOT/.tmp-<hex>/          a version being written (a crash leaves it; the next save removes it)

A save writes every file of a new version into a temporary directory, fsyncs them, writes the
manifest (size and SHA-256 of every file) last, renames the directory to its version name, and
only then replaces CURRENT. A crash at any point leaves CURRENT naming a complete version, the old
one or the new one: a loader never sees new weights with an old threshold. Loading checks the
version against its manifest, so a damaged file raises instead of loading. Readers never write or
delete; a save keeps the previous version, so a reader that resolved it just before the swap can
finish (and retries once if it could not). A directory without CURRENT holding an artifact's files
directly (saved by an older MetaQL) loads as it is, unchecked.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, TypeVar

from metaql.errors import IOException, Warning as MetaQLWarning, user_stacklevel
from metaql.storage.tensorfile import fsync_path

POINTER = "CURRENT"
MANIFEST = "MANIFEST.json"
_VERSION = re.compile(r"^v-[0-9]+-[0-9a-f]+$")
_TMP_PREFIX = ".tmp-"
T = TypeVar("T")


def save_unit(slot: str | Path, write: Callable[[Path], Any]) -> Path:
    """Runs `write(directory)` into a fresh version of `slot` and makes it current atomically;
    returns the version's directory."""
    slot = Path(slot)
    slot.mkdir(parents=True, exist_ok=True)
    _remove_unfinished(slot)
    tmp = slot / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        write(tmp)
        _write_manifest(tmp)
        version = f"v-{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        os.rename(tmp, slot / version)
        fsync_path(slot)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    previous = _pointed(slot)
    pointer_tmp = slot / f"{_TMP_PREFIX}{POINTER}"
    _write_synced(pointer_tmp, version.encode())
    os.replace(pointer_tmp, slot / POINTER)
    fsync_path(slot)
    _remove_old_versions(slot, keep={version, previous})
    return slot / version


def load_unit(slot: str | Path, load: Callable[[Path], T]) -> T:
    """`load(directory)` of the slot's current version, checked against its manifest; raises
    IOException when nothing is saved there or the version is damaged."""
    slot = Path(slot)
    for attempt in range(2):
        version = current_version(slot)
        try:
            if version != slot:
                problems = version_problems(version)
                if problems:
                    raise IOException(f"the artifact at {slot} is damaged ({'; '.join(problems[:3])}); "
                                      "run the function that saved it again to replace it")
            return load(version)
        except (IOException, OSError):
            # a writer may have replaced the version while we read it: try the new one once
            if attempt == 0 and _pointed(slot) not in (None, version.name):
                continue
            raise
    raise AssertionError  # pragma: no cover - the loop returns or raises


def current_version(slot: str | Path) -> Path:
    """The directory to read: the version CURRENT names, or the slot itself for an old flat save."""
    slot = Path(slot)
    name = _pointed(slot)
    if name is None:
        if slot.is_dir() and any(f.is_file() for f in slot.iterdir()):
            return slot
        raise IOException(f"nothing is saved at {slot}")
    if not _VERSION.match(name):
        raise IOException(f"{slot / POINTER} names '{name[:40]}', not a version; the artifact is damaged, "
                          "run the function that saved it again")
    version = slot / name
    if not version.is_dir():
        raise IOException(f"{slot / POINTER} names version {name}, which is missing; run the function "
                          "that saved it again")
    return version


def is_saved(slot: str | Path) -> bool:
    return (Path(slot) / POINTER).is_file()


def saved_at(slot: str | Path) -> float:
    """When the slot's current version was made current (the pointer's mtime)."""
    return (Path(slot) / POINTER).stat().st_mtime


def version_problems(version: Path) -> list[str]:
    """What is wrong with one version against its manifest: missing, resized or changed files."""
    try:
        manifest = json.loads((version / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{version.name} has no readable {MANIFEST}"]
    problems = []
    for name, want in files.items():
        path = version / name
        if not path.is_file():
            problems.append(f"missing {name}")
        elif path.stat().st_size != want.get("bytes") or _sha256(path) != want.get("sha256"):
            problems.append(f"corrupt {name}")
    return problems


def artifact_problems(root: str | Path) -> list[str]:
    """Torn or corrupt artifacts under a store's `artifacts/` folder (`root` is the store's root),
    one line each; empty when all is well. Unfinished temporaries are not problems: they were
    never current."""
    base = Path(root) / "artifacts"
    if not base.is_dir():
        return []
    problems = []
    for pointer in sorted(base.rglob(POINTER)):
        slot = pointer.parent
        rel = slot.relative_to(base).as_posix()
        try:
            version = current_version(slot)
        except IOException as e:
            problems.append(f"artifact {rel}: {e}")
            continue
        problems += [f"artifact {rel}: {p}" for p in version_problems(version)]
    return problems


_warned: "weakref.WeakKeyDictionary[Any, set[str]]" = weakref.WeakKeyDictionary()


def warn_not_saved(store: Any, what: str) -> None:
    """Warns once per store and kind of artifact that a read-only store keeps nothing."""
    seen = _warned.setdefault(store, set())
    if what not in seen:
        seen.add(what)
        warnings.warn(f"the store is open read-only: {what} is computed but not saved; reopen it without "
                      "read_only to keep it", MetaQLWarning, stacklevel=user_stacklevel())


# ---- files ------------------------------------------------------------------------------------------
def _write_manifest(directory: Path) -> None:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        fsync_path(path)
        files[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    _write_synced(directory / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1).encode())
    fsync_path(directory)


def _pointed(slot: Path) -> str | None:
    try:
        return (slot / POINTER).read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return ""


def _remove_unfinished(slot: Path) -> None:
    for tmp in slot.glob(f"{_TMP_PREFIX}*"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _remove_old_versions(slot: Path, keep: set) -> None:
    for version in slot.iterdir():
        if _VERSION.match(version.name) and version.name not in keep and version.is_dir() \
                and not version.is_symlink():
            shutil.rmtree(version, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
