"""Arrow IPC shard files: one file holds sample ids and a few named tensors, one row per sample.

Each tensor is a FixedSizeList<float> column with the per-sample shape in the schema metadata,
so a reader memory-maps the file and views a column as a (rows, *shape) tensor without a copy.
Files are written to a temporary name, fsynced and renamed: a reader never sees half a file.
"""
from __future__ import annotations

import json
import os
import stat
import warnings
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from metaql.errors import IOException
from metaql.storage.faults import fault_point

_ARROW_TYPES = {torch.float32: pa.float32(), torch.float16: pa.float16(), torch.int64: pa.int64(),
                torch.float64: pa.float64(), torch.int32: pa.int32()}
# bfloat16 has no Arrow type: its 16-bit patterns travel as int16 and are viewed back on read.
_BF16_TAG = "bfloat16"
CHUNK = 1 << 20


def write_shard(path: Path, ids: np.ndarray, tensors: dict[str, torch.Tensor],
                extra: dict | None = None) -> tuple[int, str]:
    """Writes one shard atomically; returns (bytes, checksum)."""
    staged = stage_shard(path, ids, tensors, extra)
    staged.publish()
    fsync_path(path.parent)
    return staged.nbytes, staged.checksum


class StagedShard:
    """A shard written to its temporary name, its disk write under way (not yet durable):
    `publish` makes it durable and renames it into place; the caller then fsyncs the folder.
    A flush stages every layer's shard before publishing any, so that the disk writes the
    first files while the writer serializes the others and computes their norms."""

    def __init__(self, path: Path, tmp: Path, nbytes: int, checksum: str):
        self.path, self.tmp, self.nbytes, self.checksum = path, tmp, nbytes, checksum

    def publish(self) -> None:
        fsync_path(self.tmp)
        fault_point("shard.rename.before")
        os.replace(self.tmp, self.path)
        fault_point("shard.rename.after")


def stage_shard(path: Path, ids: np.ndarray, tensors: dict[str, torch.Tensor],
                extra: dict | None = None) -> StagedShard:
    """Writes the shard's Arrow file to its temporary name, its CRC32 taken from the bytes as they
    are written (reading the file back for it cost as much as the write), and starts the disk
    write without waiting for it."""
    table = shard_table(ids, tensors, extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        sink = _ChecksumSink(fd)
        with pa.PythonFile(sink, mode="w") as stream:
            with pa.ipc.new_file(stream, table.schema) as writer:
                writer.write_table(table)
        start_writeback(fd)
    finally:
        os.close(fd)
    return StagedShard(path, tmp, sink.size, f"crc32:{sink.crc:08x}")


def shard_table(ids: np.ndarray, tensors: dict[str, torch.Tensor], extra: dict | None = None) -> pa.Table:
    """The shard as an Arrow table: sample ids, one FixedSizeList column per tensor, shapes and
    dtypes in the schema's metadata; the tensors' memory is shared, not copied."""
    columns, fields, meta = [pa.array(np.asarray(ids, dtype=np.int64))], [pa.field("sample_id", pa.int64())], {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        meta[name] = {"shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")}
        flat = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        values = pa.array(flat.reshape(-1).numpy())
        width = int(np.prod(t.shape[1:], dtype=np.int64))
        columns.append(pa.FixedSizeListArray.from_arrays(values, width))
        fields.append(pa.field(name, columns[-1].type))
    schema = pa.schema(fields, metadata={"metaql": json.dumps({"tensors": meta, **(extra or {})})})
    return pa.Table.from_arrays(columns, schema=schema)


class _ChecksumSink:
    """A write-only file for pa.PythonFile: every byte goes to the OS file and into a CRC32."""

    closed = False

    def __init__(self, fd: int):
        self.fd, self.crc, self.size = fd, 0, 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        done = 0
        while done < len(view):
            done += os.write(self.fd, view[done:])
        self.size += done
        return done

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True


def _libc_sync_file_range():
    """Linux's sync_file_range (asks the kernel to start writing a file's dirty pages, without
    waiting and without dropping them from the page cache), or None elsewhere."""
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Starts the disk write of what was written to `fd`; the fsync that makes it durable comes
    later (StagedShard.publish). A hint only: where the call is missing or fails, fsync does it all."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, SYNC_FILE_RANGE_WRITE)


def temp_path(path: Path) -> Path:
    """Where a file is written before its rename; a writable open deletes these (Store._remove_orphans)."""
    return path.with_name(path.name + ".tmp")


def file_checksum(path: Path) -> str:
    crc = 0
    with open_regular(path) as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"crc32:{crc:08x}"


def open_regular(path: Path):
    """`path` opened for reading, refusing symlinks and anything but a regular file (a FIFO put in
    a store's place would block the read forever)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise IOException(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IOException(f"{path} is not a regular file; a store holds only plain files: remove it")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


class Shard:
    """A memory-mapped shard: `ids` and `tensor(name)` are views into the mapped file."""

    def __init__(self, path: Path):
        self._open(path, lambda: pa.memory_map(str(path), "r"),
                   "run con.verify() to list damaged files, and con.verify(repair=True) to drop them "
                   "from the catalog so that a replay or the same capture run again stores them again")

    def _open(self, where, source, fix: str) -> None:
        """Reads the Arrow file that `source()` opens (a memory map here, a buffer for object
        storage: distributed/shards.py); `fix` is what the unreadable-file error tells to do."""
        self.path = where
        try:
            # the table's buffers keep the mapping alive; the file itself is closed, so the store can
            # keep many shards open (storage/store.py SHARD_CACHE) without holding a descriptor each
            with source() as opened:
                self._table = pa.ipc.open_file(opened).read_all()
            self.meta = json.loads(self._table.schema.metadata[b"metaql"])
        except (OSError, pa.ArrowInvalid, KeyError, ValueError) as e:
            raise IOException(f"shard file {where} is unreadable ({e}); {fix}") from e
        self.ids = self._table.column("sample_id").to_numpy()
        self.rows = len(self.ids)
        self._tensors: dict[str, torch.Tensor] = {}

    def names(self) -> list[str]:
        return list(self.meta["tensors"])

    def tensor(self, name: str) -> torch.Tensor:
        """The column as a (rows, *shape) tensor viewing the mapped file, made once per open shard:
        every warm scan asks again, and making the view (Arrow chunk, numpy, torch, reshape, a
        warnings filter) cost 0.01 ms a tensor; a warm conv13 scan of one training sample took
        0.31 ms with the views made on every scan, 0.24 ms with them made once (minimum of 100, one
        thread, with conv.py's block-diagonal D Gram)."""
        if name not in self._tensors:
            self._tensors[name] = self._view(name)
        return self._tensors[name]

    def _view(self, name: str) -> torch.Tensor:
        info = self.meta["tensors"][name]
        col = self._table.column(name)
        # one chunk (as write_shard writes) is viewed in place; combine_chunks would copy the column
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        values = col.values.to_numpy(zero_copy_only=True) if self.rows else \
            np.zeros(0, np.int16 if info["dtype"] == _BF16_TAG else np.dtype(info["dtype"]))
        with warnings.catch_warnings():
            # the mapping is read-only by design; operators never write into it
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(values)
        if info["dtype"] == _BF16_TAG:
            t = t.view(torch.bfloat16)
        return t.reshape(self.rows, *info["shape"])


def fsync_path(path: Path) -> None:
    """Flushes a file or directory to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
