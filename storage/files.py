"""What a store directory may hold, and the single-writer lock.

A store owns exactly its files. Opening decides from what is on disk, never by repairing it:

    path missing                      -> create (a writer); a reader is refused
    empty directory                   -> create (a writer); a reader is refused
    directory with catalog.duckdb     -> open
    store folders but no catalog      -> refused: restore catalog.duckdb from a backup (recreating an
                                         empty catalog would orphan, and then delete, every shard)
    any other non-empty directory     -> refused: it is not a store
    a file                            -> refused

No symlink is followed inside a store: the catalog files, the lock and the folders MetaQL reads or
writes (tensors/, inputs/, weights/, artifacts/ and everything below them) must be plain files and
folders, so nothing a received store contains can make MetaQL read, write or delete elsewhere.

One writer at a time: STORE/writer.lock is held with flock(LOCK_EX) for the writer's lifetime and
names its pid. The lock is per open file description, so it also refuses a second writer inside
one process. Readers take LOCK_SH on it only while they copy the catalog (storage/snapshot.py), so
a writer that opens at that moment retries for up to LOCK_WAIT seconds before it gives up.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from pathlib import Path, PurePosixPath

from metaql.errors import IOException

CATALOG = "catalog.duckdb"
LOCK = "writer.lock"
SNAPSHOT = "catalog.snapshot.duckdb"
FOLDERS = ("tensors", "inputs", "weights", "artifacts")
# files MetaQL itself keeps next to the catalog; a directory holding only these is still "empty"
_OWN_FILES = (LOCK,)
_TOP_FILES = (CATALOG, CATALOG + ".wal", LOCK, SNAPSHOT, SNAPSHOT + ".tmp", SNAPSHOT + ".tmp.wal")
# everything a store directory may hold at its top (DuckDB's spill folder included)
STORE_ENTRIES = frozenset(_TOP_FILES + FOLDERS + (CATALOG + ".tmp", "activations"))
LOCK_WAIT = 1.0
_READY = "ready"


def check_store_dir(root: Path, read_only: bool) -> bool:
    """Raises unless `root` may be opened as asked; True when a writer is to create a new store
    there (the directory exists afterwards)."""
    if os.path.lexists(root) and not root.is_dir():
        raise IOException(f"{root} is a file; a MetaQL store is a directory (pass a new path to create one)")
    if not root.exists():
        if read_only:
            raise IOException(f"no MetaQL store at {root} (it does not exist); "
                              "open it without read_only to create one")
        root.mkdir(parents=True)
        return True
    if os.path.lexists(root / CATALOG):
        return False
    entries = sorted(p.name for p in root.iterdir() if p.name not in _OWN_FILES)
    if not entries:
        if read_only:
            raise IOException(f"no MetaQL store at {root} (an empty directory); "
                              "open it without read_only to create one")
        return True
    signs = sorted(set(entries) & {*FOLDERS, SNAPSHOT, CATALOG + ".wal"})
    if signs:
        raise IOException(f"{root} looks like a MetaQL store whose {CATALOG} is missing (it has "
                          f"{', '.join(signs)}); restore {CATALOG} from a backup. MetaQL will not "
                          "recreate it: an empty catalog would disown every shard")
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise IOException(f"{root} is a non-empty directory that is not a MetaQL store (it holds {shown}); "
                      "pass a new path or an empty directory to create a store")


def refuse_symlinks(root: Path) -> None:
    """Raises if anything MetaQL reads or writes inside the store is a symlink (or not what it
    should be); walks the store's folders without following links."""
    for name in _TOP_FILES:
        p = root / name
        if p.is_symlink():
            raise _symlink_error(root, p)
        if os.path.lexists(p) and not p.is_file():
            raise IOException(f"{p} should be a file; move it out of the store")
    for name in FOLDERS:
        top = root / name
        if top.is_symlink():
            raise _symlink_error(root, top)
        if not os.path.lexists(top):
            continue
        if not top.is_dir():
            raise IOException(f"{top} should be a folder; move it out of the store")
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            for n in dirnames + filenames:
                if os.path.islink(os.path.join(dirpath, n)):
                    raise _symlink_error(root, Path(dirpath, n))
            for n in filenames:   # a FIFO or device would block or mislead every read of it
                if not stat.S_ISREG(_lstat_mode(os.path.join(dirpath, n))):
                    raise IOException(f"{Path(dirpath, n)} is not a regular file (a FIFO, socket or device); "
                                      "a store holds only plain files: remove it")
    spill = root / (CATALOG + ".tmp")         # DuckDB's spill folder: it must not lead elsewhere either
    if spill.is_symlink():
        raise _symlink_error(root, spill)


def _lstat_mode(path: str) -> int:
    """The file's mode, a regular file's when it is gone: a writer process renames its staged
    shards (*.tmp) while a reader opening beside it walks the folders."""
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return stat.S_IFREG


def inside(root: Path, rel: str) -> Path:
    """The path of `rel` (a path the catalog or MetaQL names) inside the store, refusing absolute
    paths, '..', and any symlink on the way, so it cannot lead outside the store's real path."""
    parts = PurePosixPath(str(rel)).parts
    if not parts or PurePosixPath(str(rel)).is_absolute() or any(p in ("..", ".", "") for p in parts):
        raise IOException(f"catalog path '{rel}' points outside the store; the catalog was tampered with")
    path = root
    for part in parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            break
        if stat.S_ISLNK(mode):
            raise _symlink_error(root, path)
    # no component is a link and none is '..', so this holds by construction; kept as a backstop
    if root not in (root / rel).resolve().parents:
        raise IOException(f"catalog path '{rel}' points outside the store; the catalog was tampered with")
    return root / rel


def folder_for_write(root: Path, rel: str) -> Path:
    """Creates the folder `rel` inside the store one level at a time, refusing symlinks, and
    returns it: the one way MetaQL makes a place to write (shards, weights, artifacts)."""
    path = inside(root, rel)
    cur = root
    for part in PurePosixPath(rel).parts:
        cur = cur / part
        try:
            os.mkdir(cur)
        except FileExistsError:
            pass
        if cur.is_symlink() or not cur.is_dir():
            raise _symlink_error(root, cur) if cur.is_symlink() else IOException(
                f"{cur} should be a folder; move it out of the store")
    return path


def _symlink_error(root: Path, p: Path) -> IOException:
    target = os.readlink(p) if os.path.islink(p) else "?"
    return IOException(f"{p} is a symlink (to {target}); a MetaQL store follows no symlinks inside it, "
                       f"so nothing outside {root} is read, written or deleted. Replace it with the "
                       "real folder or file, or remove it")


class WriterLock:
    """STORE/writer.lock held with flock(LOCK_EX) by the one writer; holds its pid, then
    'pid ready' once the writer has published the catalog for readers."""

    def __init__(self, root: Path):
        self.path = root / LOCK
        self.fd = None
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            self._acquire(root)
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            self.release()
            raise

    def _acquire(self, root: Path) -> None:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise IOException(f"cannot lock {self.path}: {e}") from None
            if time.monotonic() > deadline:
                pid = holder_pid(self.path)
                who = f"process {pid}" + (" (this process)" if pid == os.getpid() else "") if pid else "another process"
                raise IOException(f"the store {root} is open for writing by {who}; open it with read_only=True "
                                  "(shell: metaql --readonly STORE) to query it while it writes, or close the "
                                  "other writer first")
            time.sleep(0.02)

    def mark_ready(self) -> None:
        os.pwrite(self.fd, f"{os.getpid()} {_READY}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)   # closing the descriptor drops the flock
            self.fd = None

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            self.release()


def holder_pid(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            word = f.read(64).split()
        return int(word[0]) if word else None
    except (OSError, ValueError):
        return None


def writer_ready(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return _READY.encode() in f.read(64)
    except OSError:
        return False
