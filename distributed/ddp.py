"""Capture under torch.distributed (DDP): each rank captures its own samples into its own shards;
rank 0 commits the catalog rows.

    dist.init_process_group("gloo", ...)            # or nccl
    ddp = DDP(model)
    target = con if rank == 0 else "runs/digits.mq"  # rank 0 holds the store; the others name it
    with distributed_capture(target, ddp, layers=["fc1", "fc2"], checkpoint="epoch3", lr=0.1) as cap:
        for x, y, ids in loader:                     # this rank's share of each global batch
            cap.backward(F.cross_entropy(ddp(x), y), ids)
            opt.step(); opt.zero_grad()

A store has one writer (its lock), so ranks other than 0 capture into a part store of their own,
STORE.ranks/<checkpoint>/rank-<r>, written crash-safe like any store. Rank 0 captures into the
store itself, waits for every rank (a barrier), then adopts the parts' shard files: it lists their
new names in pending_files, links (or copies) them in, and names them all in `shards` with the
checkpoint marked complete in one transaction; then it deletes the parts. The checkpoint stays
'capturing' until that commit, so no reader ever scores a checkpoint with a rank's samples missing.
Every rank learns the outcome: when any rank failed, or rank 0's commit did not hold, the capture
raises on every rank, and the ranks leave it together.

Exactly once: a rank that dies and is restarted resumes its part store (each layer stores exactly
the samples it lacks, as any resumed capture); a rank 0 that dies after the commit but before the
parts are deleted finds, when run again, their samples already stored and adopts nothing twice.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from metaql.errors import InvalidInputException, OperationalError


def parts_dir(store_root: Path, checkpoint: str) -> Path:
    """Where the ranks other than 0 keep their part stores of a checkpoint, beside the store."""
    return Path(f"{store_root}.ranks") / checkpoint


def part_dir(store_root: Path, checkpoint: str, rank: int) -> Path:
    return parts_dir(store_root, checkpoint) / f"rank-{rank}"


@contextmanager
def distributed_capture(target, model, layers=None, checkpoint: str = "ckpt0", lr: float = 1.0, **kwargs):
    """A Capture (storage/capture.py; the same arguments) for this rank of the default process
    group. `target`: rank 0's metaql.Connection to the store; on other ranks, the store's path."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from metaql.storage.capture import Capture
    if not dist.is_initialized():
        raise InvalidInputException("distributed_capture needs torch.distributed initialised "
                                    "(dist.init_process_group); use con.capture in a single process")
    rank, world = dist.get_rank(), dist.get_world_size()
    store, own, failed = None, False, None
    try:
        store, own = rank_store(target, rank, checkpoint)
        # DDP runs its module in this process: hooks on the inner layers see every call, named as
        # the model's own (no 'module.' prefix), so replay rebuilds it
        inner = model.module if isinstance(model, DistributedDataParallel) else model
        cap = Capture(store, inner, layers, checkpoint, lr, **kwargs)
        cap.require_registered = rank == 0     # a part store has no samples; rank 0's catalog holds them
        with _finish_deferred(store) if rank == 0 else nullcontext():
            cap.__enter__()
            try:
                yield cap
            except BaseException as e:
                failed = e
                raise
            finally:
                cap.__exit__(*((type(failed), failed, None) if failed else (None, None, None)))
    except BaseException as e:
        failed = failed or e
        raise
    finally:
        if own and store is not None:
            store.close()
        # every rank reaches this exchange, a failed one too (even before its capture began), so
        # that rank 0 never waits forever
        done = [None] * world
        dist.all_gather_object(done, "complete" if failed is None else f"failed ({type(failed).__name__})")
    failed_ranks = [r for r, status in enumerate(done) if status != "complete"]
    if failed_ranks:
        if rank == 0:
            adopt_parts(store, checkpoint, world, done)       # marks the checkpoint partial and raises
        raise OperationalError(f"ranks {failed_ranks} did not finish capturing checkpoint '{checkpoint}'; run "
                               "the capture again on every rank: each stores only the samples it lacks")
    _commit_on_rank0(store, checkpoint, rank, world, done)


def _commit_on_rank0(store, checkpoint: str, rank: int, world: int, done: list) -> None:
    """Rank 0 adopts the parts and every rank learns whether that commit held: no rank reports a
    capture the store lacks, and the ranks leave together (a rank tearing its process group down
    while rank 0 still commits has aborted gloo's threads at exit)."""
    import torch.distributed as dist
    error = None
    if rank == 0:
        try:
            adopt_parts(store, checkpoint, world, done)
        except BaseException as e:
            error = e
    verdict = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(verdict, src=0)
    if error is not None:
        raise error
    if verdict[0] is not None:
        raise OperationalError(f"rank 0 could not commit checkpoint '{checkpoint}' ({verdict[0]}); the capture "
                               "is not in the store: run it again on every rank")


def rank_store(target, rank: int, checkpoint: str):
    """(the store this rank captures into, whether it opened it)."""
    from metaql.storage.store import Store
    if rank == 0:
        if not hasattr(target, "store"):
            raise InvalidInputException("on rank 0 pass the store's metaql.Connection (it commits the catalog)")
        return target.store, False
    if hasattr(target, "store"):
        raise InvalidInputException(f"rank {rank} must not open the store (one writer: rank 0); pass its path")
    return Store(part_dir(Path(target).resolve(), checkpoint, rank)), True


@contextmanager
def _finish_deferred(store):
    """On rank 0 the capture's own 'complete' waits for the parts' commit (adopt_parts)."""
    finish = store.finish_checkpoint
    store.finish_checkpoint = lambda name, status="complete": finish(name, status) if status != "complete" else None
    try:
        yield
    finally:
        del store.finish_checkpoint


def adopt_parts(store, checkpoint: str, world: int, statuses: list) -> None:
    """Rank 0: the other ranks' shards named in the store, the checkpoint complete, one commit."""
    from metaql.storage.catalog import transaction
    from metaql.storage.store import Store, _shard_row
    missing = [r for r in range(1, world) if statuses[r] != "complete"]
    if missing:
        store.finish_checkpoint(checkpoint, "partial")
        raise OperationalError(f"ranks {missing} did not finish capturing checkpoint '{checkpoint}' (statuses "
                               f"{[statuses[r] for r in missing]}); run the capture again on every rank: each "
                               "stores only the samples it lacks")
    stored = {layer: set(ids) for layer, ids in stored_ids(store, checkpoint).items()}
    parts = [part_dir(store.root, checkpoint, r) for r in range(1, world)]
    rows, links, rels = [], [], []
    for part in parts:
        src = Store(part, read_only=True)
        try:
            names = {}
            for row in sorted(src._shard_rows("factors", checkpoint), key=lambda r: r["shard_id"]):
                ids = src.open_shard(row["file"], row["checksum"]).ids
                held = stored.setdefault(row["layer"], set())
                if held.intersection(ids.tolist()):
                    if not held.issuperset(ids.tolist()):
                        raise OperationalError(f"shard {row['file']} of {part} overlaps samples the store holds for "
                                               f"layer {row['layer']}: some ids captured by two ranks; give each "
                                               "rank its own samples")
                    continue          # adopted by an earlier run that died before deleting the part
                held.update(ids.tolist())
                seq, rel = store._new_shard_file("factors", checkpoint, row["layer"])
                names[row["file"]] = rel
                links.append((part / row["file"], rel))
                rows.append(_shard_row(seq, rel, "factors", checkpoint, row["layer"], np.asarray(ids),
                                       row["bytes"], row["checksum"], row["storage"], row["suffix_file"],
                                       (row["seen_from_batch"], row["seen_to_batch"])
                                       if row["seen_from_batch"] is not None else None))
            for r in rows[len(rels):]:
                if r[11] is not None:
                    r[11] = names[r[11]]          # a shared input names its owner by the new name
            rels.extend(r[4] for r in rows[len(rels):])
        finally:
            src.close()
    store._record_pending(rels)
    for source, rel in links:
        place(source, store._path_for_write(rel))
    with transaction(store.db):
        if rows:
            store._insert_shard_rows(rows)
            store.db.execute("DELETE FROM pending_files WHERE file IN (SELECT unnest(?))", [rels])
        store.finish_checkpoint(checkpoint, "complete")
    store.committed()
    shutil.rmtree(parts_dir(store.root, checkpoint), ignore_errors=True)


def stored_ids(store, checkpoint: str) -> dict[str, np.ndarray]:
    out: dict[str, list] = {}
    for row in store._shard_rows("factors", checkpoint):
        out.setdefault(row["layer"], []).append(store.open_shard(row["file"], row["checksum"]).ids)
    return {k: np.concatenate(v) for k, v in out.items()}


def place(source: Path, target: Path) -> None:
    """`source` at `target`: a hard link on the same file system, else a copy; fsynced."""
    from metaql.storage.tensorfile import fsync_path
    try:
        os.link(source, target)
    except FileExistsError:
        os.unlink(target)
        os.link(source, target)
    except OSError:
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(source, tmp)
        fsync_path(tmp)
        os.replace(tmp, target)
    fsync_path(target.parent)
