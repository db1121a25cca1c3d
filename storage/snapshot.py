"""Readers beside a writer: the writer publishes catalog snapshots; readers query private copies.

DuckDB lets one process hold a database file for writing and then refuses every other process,
read-only ones included, and a read-only holder in turn blocks the writer. So a reader never opens
the store's catalog.duckdb with DuckDB at all:

- The writer (holding STORE/writer.lock, storage/files.py) publishes a consistent snapshot of its
  catalog after every commit: `COPY FROM DATABASE` into STORE/catalog.snapshot.duckdb.tmp (one
  read transaction, so a snapshot never shows half a commit), then an atomic rename over
  STORE/catalog.snapshot.duckdb. `Publisher.publish` first compares the catalog's and its WAL's
  (inode, size, mtime): DuckDB appends to the WAL on every commit and rewrites the file on every
  checkpoint, so an unchanged fingerprint means nothing was committed and publishing costs two
  stat calls. The writer publishes once when it opens, then writes 'PID ready' into the lock file.
- A reader copies the last committed catalog to a private file in its own temp folder, outside
  the store, opens that copy read-only with DuckDB and unlinks it (the open descriptor keeps it).
  Which catalog: if it can take LOCK_SH on writer.lock, no writer is active and the catalog
  cannot change while it holds that lock, so it copies catalog.duckdb and its WAL (DuckDB
  replays the WAL into the copy); otherwise it copies the published snapshot, which is never
  changed in place (a new one is renamed over it), once the writer says it is ready.
- Before each statement the reader compares the source's fingerprint with its copy's and copies
  again only when they differ, so it sees the last committed state at statement granularity and
  never blocks the writer for longer than one file copy (the writer retries its lock meanwhile).

A reader writes nothing inside the store: it only reads files and takes shared flocks.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

import duckdb

from metaql.errors import IOException
from metaql.storage.catalog import open_catalog
from metaql.storage.files import CATALOG, LOCK, SNAPSHOT, holder_pid, writer_ready

READY_WAIT = 10.0
MIN_INTERVAL = 1.0      # seconds between two snapshots of frequent commits (force=False)
COPY_SHARE_INVERSE = 10  # ... or 10x the last snapshot's copy: copies take at most a tenth of the writer's time
_RETRY = object()


def _stat_key(path: Path):
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def catalog_fingerprint(root: Path) -> tuple:
    return ("catalog", _stat_key(root / CATALOG), _stat_key(root / (CATALOG + ".wal")))


class Publisher:
    """The writer's side: publishes STORE/catalog.snapshot.duckdb when the catalog changed. It
    copies through its own cursor on the writer's database, outside any transaction a user opened
    on theirs, so a snapshot holds committed rows only."""

    def __init__(self, root: Path, db: duckdb.DuckDBPyConnection):
        self.root = root
        self.db = db.cursor()
        self._mutex = threading.RLock()   # cursors of one writer share the publisher
        self._published = None
        self._last = float("-inf")
        self._timer: threading.Timer | None = None
        self._closed = False
        self.last_ms = 0.0

    def publish(self, force: bool = True) -> bool:
        """Publishes a snapshot if anything was committed since the last one; True if it did. A
        publish copies the whole catalog, so frequent commits (a capture's flushes, bulk loads) pass
        force=False: then at most one snapshot per `interval()`, the last one by a timer thread."""
        with self._mutex:
            if self._closed:
                return False
            fp = catalog_fingerprint(self.root)   # taken first: a commit during the copy republishes
            if fp == self._published:
                return False
            if not force and time.monotonic() - self._last < self.interval():
                self._defer()
                return False
            self._last = time.monotonic()
            t0 = time.perf_counter()
            try:
                self._snapshot()
            except (duckdb.Error, OSError) as e:
                # the commit itself stands; readers keep seeing the previous snapshot
                warnings.warn(f"MetaQL could not publish the catalog snapshot for readers ({e}); "
                              "readers see the previous committed state until the next commit", stacklevel=3)
                return False
            self._published = fp
            self.last_ms = (time.perf_counter() - t0) * 1e3
            if self._timer is not None:   # this snapshot holds what the timer was to publish
                self._timer.cancel()
                self._timer = None
            return True

    def interval(self) -> float:
        """Seconds between two snapshots of frequent commits: MIN_INTERVAL, or COPY_SHARE_INVERSE
        times the last copy where that is longer. A snapshot copies the whole catalog, whose
        per-sample norms grow with the store (0.26-0.29 s at 111,000 rows, a MiniLM store of 3,000
        samples; 0.88 s at 3.3 million, about 90,000 samples of 37 layers): at one a second a large
        capture's writer thread would spend most of its time copying."""
        return max(MIN_INTERVAL, COPY_SHARE_INVERSE * self.last_ms / 1e3)

    def _snapshot(self) -> None:
        """Copies the committed catalog to the snapshot's temporary name and renames it into place."""
        tmp = self.root / (SNAPSHOT + ".tmp")
        for p in (tmp, Path(str(tmp) + ".wal")):
            if os.path.lexists(p):
                os.unlink(p)   # the store's own temporary, by its exact name (unlink never follows)
        name = self.db.execute("SELECT current_database()").fetchone()[0].replace('"', '""')
        self.db.execute(f"ATTACH '{str(tmp).replace(chr(39), chr(39) * 2)}' AS metaql_snapshot")
        try:
            self.db.execute(f'COPY FROM DATABASE "{name}" TO metaql_snapshot')
        finally:
            self.db.execute("DETACH metaql_snapshot")
        os.replace(tmp, self.root / SNAPSHOT)

    def _defer(self) -> None:
        if self._timer is None:
            # due when the interval since the last snapshot ends, not a whole interval from now: a
            # timer started just before a snapshot would otherwise publish again right after it
            due = max(self._last + self.interval() - time.monotonic(), 0.0)
            self._timer = threading.Timer(due, self._deferred)
            self._timer.daemon = True
            self._timer.start()

    def _deferred(self) -> None:
        with self._mutex:
            self._timer = None
            self.publish()

    def hold(self) -> None:
        """Cancels a deferred snapshot: the caller publishes soon (a capture that is finishing)."""
        with self._mutex:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def close(self) -> None:
        with self._mutex:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.db.close()


class ReaderCopy:
    """A reader's private, read-only copy of the store's last committed catalog."""

    def __init__(self, root: Path):
        self.root = root
        self.dir = Path(tempfile.mkdtemp(prefix="metaql-reader-"))
        self.db: duckdb.DuckDBPyConnection | None = None
        self.source = None
        self._copies = 0
        try:
            self.refresh()
        except BaseException:
            self.close()
            raise

    def refresh(self) -> bool:
        """Copies the store's committed catalog again if it changed; True when `db` was replaced."""
        deadline = time.monotonic() + READY_WAIT
        while True:
            got = self._copy_if_changed()
            if got is not _RETRY:
                return got
            if time.monotonic() > deadline:
                raise IOException(f"the writer of {self.root} (process {holder_pid(self.root / LOCK)}) has not "
                                  "published its catalog yet; try again in a moment")
            time.sleep(0.02)

    def _copy_if_changed(self):
        lock = self.root / LOCK
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC) if os.path.lexists(lock) else None
        try:
            if fd is None or _try_shared(fd):
                return self._from_catalog(stable=fd is not None)
            if not writer_ready(lock):
                return _RETRY
            return self._from_snapshot()
        finally:
            if fd is not None:
                os.close(fd)   # drops the shared lock

    def _from_catalog(self, stable: bool):
        fp = catalog_fingerprint(self.root)
        if fp == self.source:
            return False
        if fp[1] is None:
            raise IOException(f"{self.root / CATALOG} is missing; restore it from a backup")
        target = self._next_path()
        shutil.copyfile(self.root / CATALOG, target, follow_symlinks=False)
        if fp[2] is not None:
            shutil.copyfile(self.root / (CATALOG + ".wal"), str(target) + ".wal", follow_symlinks=False)
        if not stable and catalog_fingerprint(self.root) != fp:
            # no lock file to hold: a writer started during the copy; copy again
            _unlink_copy(target)
            return _RETRY
        return self._open(target, fp)

    def _from_snapshot(self):
        try:
            src = os.open(self.root / SNAPSHOT, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return _RETRY
        try:
            st = os.fstat(src)
            fp = ("snapshot", (st.st_ino, st.st_size, st.st_mtime_ns))
            if fp == self.source:
                return False
            target = self._next_path()
            with os.fdopen(os.dup(src), "rb") as fin, open(target, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        finally:
            os.close(src)
        return self._open(target, fp)

    def _next_path(self) -> Path:
        # the same file name as the store's, so SQL that names the database ("catalog") still works
        self._copies += 1
        folder = self.dir / str(self._copies)
        folder.mkdir()
        return folder / CATALOG

    def _open(self, target: Path, fp) -> bool:
        try:
            db = open_catalog(target, read_only=True, shown=self.root / "catalog.duckdb")
        finally:
            _unlink_copy(target)   # DuckDB keeps its descriptor; nothing piles up in the temp folder
        old, self.db, self.source = self.db, db, fp
        if old is not None:
            old.close()
        return True

    def close(self) -> None:
        try:
            if self.db is not None:
                self.db.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _try_shared(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise


def _unlink_copy(target: Path) -> None:
    for p in (target, Path(str(target) + ".wal")):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    shutil.rmtree(target.parent, ignore_errors=True)
