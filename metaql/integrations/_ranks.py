"""What the training integrations share under torch.distributed (DDP): which rank this is, and rank
0's decisions made the same on every rank, so that no rank waits at a checkpoint's end for one that
refused to open it."""
from __future__ import annotations

import os


def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist
    return dist.get_rank()


def is_path(target) -> bool:
    return isinstance(target, (str, bytes, os.PathLike))


def done_refusal(con, name: str) -> str | None:
    """Why checkpoint `name` cannot be captured into `con`'s store, or None."""
    done = {c["name"]: c["status"] for c in con.store.checkpoints()}
    if done.get(name) == "complete":
        return (f"checkpoint '{name}' already exists and is complete; name this run's checkpoints apart, "
                "e.g. checkpoint='run2_epoch{epoch}'")
    return None


def agreed(refusal: str | None) -> str | None:
    """Rank 0's refusal, on every rank."""
    import torch.distributed as dist
    box = [refusal]
    dist.broadcast_object_list(box, src=0)
    return box[0]
