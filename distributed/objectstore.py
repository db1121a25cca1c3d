"""Stores on object storage through pyarrow.fs: S3 and S3-compatible servers, GCS, local paths.

A store's shard, input and weight files are immutable once named by the catalog (each write makes
a new file name), so they live on object storage as they are. The catalog stays a DuckDB file:
object storage has no atomic rename or locking for DuckDB to write through, so a store is written
locally (capture, replay) and published with `upload_store(path, uri)`: every file first, the
catalog (a consistent copy of its last commit) last, so a reader of the URI never sees a catalog
that names a file not yet there. `Publisher(path, uri)` does the same round after round while the
store is written (a capture in progress), sending only the files new since its last round.

`metaql.connect('s3://bucket/store')` opens such a store read-only (RemoteStore): the catalog is
copied to a temporary folder, every other file is downloaded there on first use, checksummed as
usual, and nothing is ever written to the bucket. Under config={'engine': 'ray'} workers read the
shard files from the URI themselves (distributed/shards.py), not through the driver.

URIs are pyarrow's: s3://[KEY:SECRET@]bucket/path?endpoint_override=host:port&scheme=http&region=...
(credentials otherwise from the usual AWS environment variables or files); gs://bucket/path;
file:///abs/path.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from metaql.errors import IOException
from metaql.storage import files
from metaql.storage.store import Store

_filesystems: dict[str, tuple] = {}


def public_uri(uri: str) -> str:
    """The URI without credentials and options, for messages."""
    return re.sub(r"//[^/@]*@", "//", uri).split("?", 1)[0]


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow FileSystem, base path) of a store URI, made once per process."""
    if uri not in _filesystems:
        try:
            _filesystems[uri] = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as e:
            raise IOException(f"cannot open {public_uri(uri)}: {e}; a store URI looks like "
                              "s3://bucket/path?endpoint_override=host:port&scheme=http") from None
    fs, base = _filesystems[uri]
    return fs, base.rstrip("/")


READ_TRIES = 5     # reads of a file that a Publisher may replace meanwhile (the catalog)


def read_bytes(uri: str, rel: str, replaced: bool = False) -> pa.Buffer:
    """The whole file `rel` of the store at `uri`. A file a Publisher replaces (`replaced`: the
    catalog) is read between two looks at its size and time, again until they agree: an object
    store answers a read by ranges of the size it reported when the file was opened, so a
    replacement in between gives the new object's bytes cut at the old size (seen in CI: DuckDB
    refused the cut catalog with "Could not read enough bytes")."""
    fs, base = filesystem(uri)
    path = f"{base}/{rel}"
    if not replaced:
        return _read(fs, path, uri, rel)
    for _ in range(READ_TRIES):
        before = _version(fs, path, uri, rel)
        data = _read(fs, path, uri, rel)
        if _version(fs, path, uri, rel) == before and data.size == before[0]:
            return data
    raise IOException(f"{public_uri(uri)}/{rel} was replaced during each of {READ_TRIES} reads (a Publisher "
                      "uploading very often?); open the store again")


def _read(fs, path: str, uri: str, rel: str) -> pa.Buffer:
    try:
        with fs.open_input_file(path) as f:
            return f.read_buffer()
    except FileNotFoundError:
        raise _missing(uri, rel) from None
    except OSError as e:
        raise IOException(f"cannot read {public_uri(uri)}/{rel}: {e}") from None


def _version(fs, path: str, uri: str, rel: str) -> tuple:
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise IOException(f"cannot read {public_uri(uri)}/{rel}: {e}") from None
    if info.type != pafs.FileType.File:
        raise _missing(uri, rel)
    return info.size, info.mtime_ns


def _missing(uri: str, rel: str) -> IOException:
    return IOException(f"{public_uri(uri)}/{rel} is missing; upload the store again "
                       "(metaql.distributed.objectstore.upload_store)")


def download(uri: str, rel: str, target: Path, replaced: bool = False) -> None:
    """`rel` copied to `target` through a temporary name, so a half-copied file is never used."""
    data = read_bytes(uri, rel, replaced)
    target.parent.mkdir(parents=True, exist_ok=True)
    # a temporary of its own: two cursors may fetch the same file at once
    fd, part = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
        os.replace(part, target)
    except BaseException:
        if os.path.lexists(part):
            os.unlink(part)
        raise


class RemoteStore(Store):
    """A read-only store on object storage: the catalog copied locally, files fetched on first use."""

    def __init__(self, uri: str):
        fs, base = filesystem(uri)
        try:
            found = fs.get_file_info(f"{base}/{files.CATALOG}").type == pafs.FileType.File
        except OSError as e:       # unreachable, refused, no permission
            raise IOException(f"cannot open {public_uri(uri)}: {e}") from None
        if not found:
            raise IOException(f"no MetaQL store at {public_uri(uri)} ({files.CATALOG} is missing); publish "
                              "one with metaql.distributed.objectstore.upload_store(path, uri)")
        local = Path(tempfile.mkdtemp(prefix="metaql-remote-"))
        try:
            download(uri, files.CATALOG, local / files.CATALOG, replaced=True)
            super().__init__(local, read_only=True)
        except BaseException:
            import shutil
            shutil.rmtree(local, ignore_errors=True)
            raise
        self._tmpdir = str(local)     # removed on close, like an in-memory store's folder
        self.uri = uri

    def _inside(self, rel: str) -> Path:
        path = files.inside(self.root, rel)
        if not path.exists():
            download(self.uri, rel, path)
        return path

    def cursor(self) -> "RemoteStore":
        child = super().cursor()
        child.__class__ = RemoteStore
        child.uri = self.uri
        return child


def upload_store(path: str | os.PathLike, uri: str) -> dict:
    """Publishes the store at `path` (which may be open for writing elsewhere) to `uri`: its
    files, then its last committed catalog. Files already there with the same size are skipped
    (a named file never changes). Returns {'files': uploaded, 'skipped': n, 'bytes': uploaded}."""
    return Publisher(path, uri).publish()


class Publisher:
    """Publishes a store to `uri` as it is written, round after round: each round takes the
    store's last committed catalog (the snapshot a reader gets), uploads the files that are new
    since the last round, then the catalog, last. A reader of the URI sees one committed catalog
    after another, each naming only files already uploaded; a round that fails leaves the previous
    catalog in place, and the next round sends what is missing.

        with Publisher("runs/digits.mq", "s3://bucket/digits", every=30) as pub:   # a background thread
            with con.capture(model, ...) as cap:
                ...
        # leaving the `with` publishes once more: the finished checkpoint

    `publish()` runs one round in the caller's thread."""

    def __init__(self, path: str | os.PathLike, uri: str, every: float = 30.0):
        self.path, self.uri, self.every = path, uri, float(every)
        self.sent: dict[str, int] = {}        # files uploaded (or found there) by size
        self.catalog_sent: bytes | None = None
        self.rounds, self.error = 0, None
        self._thread = None
        import threading
        self._stop = threading.Event()

    def publish(self) -> dict:
        fs, base = filesystem(self.uri)
        src = Store(self.path, read_only=True)
        try:
            with tempfile.TemporaryDirectory(prefix="metaql-upload-") as tmp:
                catalog = Path(tmp) / files.CATALOG
                export_catalog(src, catalog)      # before the listing: every file it names is on disk
                counts = {"files": 0, "skipped": 0, "bytes": 0}
                try:
                    fs.create_dir(base, recursive=True)
                    for rel in store_files(src.root):
                        size = (src.root / rel).stat().st_size
                        if self.sent.get(rel) != size:
                            put(fs, src.root / rel, f"{base}/{rel}", counts)
                            self.sent[rel] = size
                    content = catalog.read_bytes()
                    if content != self.catalog_sent:
                        put(fs, catalog, f"{base}/{files.CATALOG}", counts, force=True)
                        self.catalog_sent = content
                except OSError as e:
                    raise IOException(f"uploading to {public_uri(self.uri)} failed: {e}; the catalog there is the "
                                      "previous one (it goes last), so readers are unaffected: publish again") from None
        finally:
            src.close()
        self.rounds += 1
        return counts

    def __enter__(self) -> "Publisher":
        import threading
        self._thread = threading.Thread(target=self._run, name="metaql-publisher", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.publish()
                self.error = None
            except Exception as e:      # kept for close(): the next round retries
                self.error = e

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        self.publish()         # the last committed state, in the caller's thread: its error is raised


def export_catalog(store: Store, target: Path) -> None:
    """A consistent copy of the store's last committed catalog (a reader's snapshot), as one file."""
    name = store.db.execute("SELECT current_database()").fetchone()[0]
    store.db.execute(f"ATTACH '{target}' AS metaql_upload (READ_WRITE)")
    try:
        store.db.execute(f'COPY FROM DATABASE "{name}" TO metaql_upload')
    finally:
        store.db.execute("DETACH metaql_upload")


def store_files(root: Path) -> list[str]:
    """The store's data files (relative paths), without temporaries; symlinks were refused on open."""
    out = []
    for folder in files.FOLDERS:
        for dirpath, _, names in os.walk(root / folder, followlinks=False):
            for n in sorted(names):
                if not n.endswith((".tmp", ".part")):
                    out.append(Path(dirpath, n).relative_to(root).as_posix())
    return sorted(out)


def put(fs, source: Path, dest: str, counts: dict, force: bool = False) -> None:
    size = source.stat().st_size
    if not force:
        info = fs.get_file_info(dest)
        if info.type == pafs.FileType.File and info.size == size:
            counts["skipped"] += 1
            return
    local = isinstance(fs, pafs.LocalFileSystem)
    if local:      # object stores have no folders to make
        fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
    # an object appears whole when its upload completes; a local file through a temporary name
    target = dest + ".part" if local else dest
    with open(source, "rb") as fin, fs.open_output_stream(target) as out:
        while chunk := fin.read(8 << 20):
            out.write(chunk)
    if local:
        fs.move(target, dest)
    counts["files"] += 1
    counts["bytes"] += size
