"""Which files a store owns, and the crash-atomic way it adds shard files.

A flush of several shard files (one per layer) commits as one unit or not at all:

  1. one catalog transaction lists the files about to be written in `pending_files`;
  2. each file is written to a temporary name, fsynced and renamed (tensorfile.write_shard; a flush
     stages every layer's file first and fsyncs and renames them after, tensorfile.stage_shard);
  3. one transaction inserts every file's `shards` row and deletes its `pending_files` row.

A kill before (3) commits leaves files that only `pending_files` names; the next writable open
deletes exactly those (DROP CHECKPOINT uses the same list the other way round: the transaction that
deletes a checkpoint's rows lists its files, which are deleted after it commits), and the store's own temporary files, by name pattern, inside the store's
real directory and never through a symlink. Nothing else is ever deleted: a file the user put
under tensors/ stays.
"""
from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

_SHARD_NAME = r"\d{6,}(-[0-9a-f]{8})?\.arrow"
# every file the store may delete: shards (only when pending_files lists them) and temporaries
# (a checkpoint's weights and activation shards too: DROP CHECKPOINT lists them in pending_files)
_OWN_FILE = re.compile(rf"^((tensors|activations)/[^/]+/[^/]+/{_SHARD_NAME}(\.tmp)?|inputs/{_SHARD_NAME}(\.tmp)?"
                       r"|weights/[^/]+\.safetensors(\.tmp)?)$")
_TEMP_FILE = re.compile(rf"^({_SHARD_NAME}|[^/]+\.safetensors)\.tmp$")
TEMP_DIRS = ("tensors", "inputs", "weights")


def shard_name(seq: int) -> str:
    """A shard's file name: the sequence number orders files, the random token keeps a reused
    number (a sequence rolled back with its transaction) from ever naming an existing file."""
    return f"{seq:06d}-{secrets.token_hex(4)}.arrow"


def own_file(root: Path, rel: str) -> Path | None:
    """The regular file `rel` names inside the store when it has a name the store writes and no
    component of its path is a symlink; None otherwise (nothing to delete)."""
    if not _OWN_FILE.match(rel) or ".." in rel.split("/"):
        return None
    path = root
    for i, part in enumerate(rel.split("/")):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return None
        last = i == rel.count("/")
        if not (stat.S_ISREG(mode) if last else stat.S_ISDIR(mode)):
            return None
    return path


def remove_own(root: Path, rels) -> int:
    """Deletes the files among `rels` the store owns; returns how many."""
    removed = 0
    for rel in rels:
        path = own_file(root, rel)
        if path is not None:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def temp_files(root: Path) -> list[str]:
    """Store-relative names of the temporaries a killed writer left (real directories only)."""
    found = []
    for sub in TEMP_DIRS:
        top = root / sub
        if not top.is_dir() or top.is_symlink():
            continue
        for dirpath, _, names in os.walk(top, followlinks=False):
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            found += [f"{rel_dir}/{n}" for n in names if _TEMP_FILE.match(n)]
    return found


def remove_empty_folders(root: Path, rels) -> None:
    """Removes the folders among `rels` (store-relative, deepest first) that are real, empty
    directories: what DROP CHECKPOINT leaves of tensors/<checkpoint>/<layer>/. A folder that still
    holds a file (one the user put there) stays, as does one reached through a symlink."""
    for rel in rels:
        path = root
        for part in rel.split("/"):
            path = path / part
            try:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    break
            except OSError:
                break
        else:
            try:
                path.rmdir()
            except OSError:     # not empty
                pass
