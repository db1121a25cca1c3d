"""Shard files read where the scan runs: on a Ray worker, from a local store directory or from
object storage through pyarrow.fs, checksum-verified on first read and kept in a small LRU per
process (a worker that scans the same shards again maps or downloads them once)."""
from __future__ import annotations

import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa

from metaql.errors import IOException
from metaql.storage import files
from metaql.storage.tensorfile import Shard, file_checksum

CACHE_SHARDS = 32
_cache: OrderedDict[tuple[str, str], Shard] = OrderedDict()
_verified: set[tuple[str, str]] = set()


class BufferShard(Shard):
    """A shard read whole into memory (object storage has no mmap); the same views as Shard."""

    def __init__(self, where: str, data: pa.Buffer):
        # one reading with Shard's (its per-shard tensor views among it: a copy of this code lacked them)
        self._open(where, lambda: pa.BufferReader(data), "run con.verify() on the store to list damaged files")


def is_remote(location: str) -> bool:
    return "://" in location


def open_shard(location: str, rel: str, checksum: str) -> Shard:
    """The shard `rel` of the store at `location` (a directory or an s3://... URI)."""
    key = (location, rel)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    shard = _remote_shard(location, rel, checksum) if is_remote(location) else _local_shard(location, rel, checksum)
    _cache[key] = shard
    if len(_cache) > CACHE_SHARDS:
        _cache.popitem(last=False)
    return shard


def _local_shard(location: str, rel: str, checksum: str) -> Shard:
    path = files.inside(Path(location), rel)
    if not path.exists():
        raise IOException(f"shard file {path} is missing on this worker; a Ray worker on another machine "
                          "needs the store on shared storage or object storage (s3://...)")
    if (location, rel) not in _verified:
        if file_checksum(path) != checksum:
            raise IOException(f"shard file {path} is corrupt (checksum mismatch); con.verify(repair=True) on the "
                              "driver drops it from the catalog so that a replay stores its samples again")
        _verified.add((location, rel))
    return Shard(path)


def _remote_shard(location: str, rel: str, checksum: str) -> Shard:
    from metaql.distributed.objectstore import read_bytes
    data = read_bytes(location, rel)
    if f"crc32:{zlib.crc32(memoryview(data)):08x}" != checksum:
        raise IOException(f"shard file {location}/{rel} is corrupt (checksum mismatch); upload the store again")
    return BufferShard(f"{location}/{rel}", data)


def shard_tensors(location: str, spec: dict) -> tuple[np.ndarray, dict]:
    """A factor shard's ids and tensors, with a shared input suffix from its owner's shard (as
    Store.shard_tensors does; the driver resolved the owner's checksum from its catalog)."""
    from metaql.storage.quantize import decoded
    shard = open_shard(location, spec["file"], spec["checksum"])
    tensors = decoded({n: shard.tensor(n) for n in shard.names()})
    if spec.get("suffix_file"):
        if spec.get("suffix_checksum") is None:
            raise IOException(f"shard {spec['file']} shares its input with {spec['suffix_file']}, "
                              "which the catalog does not list; run con.verify(repair=True) on the driver")
        other = open_shard(location, spec["suffix_file"], spec["suffix_checksum"])
        tensors.update({n: other.tensor(n) for n in other.names() if n not in tensors and n in ("X", "I")})
    return shard.ids, tensors
