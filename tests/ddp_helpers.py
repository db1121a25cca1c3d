"""What the torch.distributed tests share: a free TCP port for the gloo rendezvous, a store's factors
keyed by (layer, sample id) to compare a DDP capture with a one-process one, and the ranks' end."""
from __future__ import annotations

import socket

import metaql


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def factors_by_id(path: str, checkpoint: str) -> dict:
    """{(layer, sample id): {factor name: tensor}} of `checkpoint` in the store at `path`."""
    out = {}
    with metaql.connect(path, read_only=True) as con:
        store = con.store
        for row in store._shard_rows("factors", checkpoint):
            ids, tensors = store.shard_tensors(row)
            for i, sid in enumerate(ids):
                out[(row["layer"], int(sid))] = {n: t[i].clone() for n, t in tensors.items()}
    return out


def assert_same_factors(got_path: str, want_path: str, checkpoint: str, n: int, atol: float) -> None:
    """The two stores hold the same (layer, sample id) pairs, `n` of them, each once, and the same
    factors within `atol`."""
    import torch
    got, want = factors_by_id(got_path, checkpoint), factors_by_id(want_path, checkpoint)
    assert sorted(got) == sorted(want) and len(want) == n
    for key, tensors in want.items():
        for name, t in tensors.items():
            torch.testing.assert_close(got[key][name], t, atol=atol, rtol=1e-5)


def leave_group(clean: bool) -> None:
    """The end of a rank whose process group a trainer (Lightning, accelerate) set up and left: the
    ranks meet (after a clean run only: a failed rank's peer would wait forever) and the group is
    destroyed. A gloo group still alive at interpreter exit can abort the process (SIGABRT,
    "terminate called without an active exception"): seen once in CI on the HF two-rank test."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()
