"""What the training integrations share under torch.distributed (DDP): which rank this is, and rank
0's decisions made the same on every rank, so that no rank waits at a checkpoint's end for one that
refused to open it."""
from __future__ import annotations

import os

from metaql.engine.errors import CatalogException, InvalidInputException


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


def open_capture(owner: str, target, model, **kwargs):
    """(the entered capture of checkpoint kwargs['checkpoint'], the context whose __exit__ closes it:
    under DDP the distributed_capture around it, which waits for every rank and, on rank 0, adopts
    their shards). `target`: the connection, or on ranks other than 0 of DDP the store's path."""
    world = world_size()
    if world == 1 and is_path(target):
        raise InvalidInputException(f"{owner} got a store path outside torch.distributed; pass the "
                                    "metaql connection (only ranks other than 0 of DDP take a path)")
    refusal = done_refusal(target, kwargs["checkpoint"]) if world == 1 or rank() == 0 else None
    if world > 1:
        refusal = agreed(refusal)      # every rank raises, or none waits for it at the checkpoint's end
    if refusal:
        raise CatalogException(refusal)
    if world == 1:
        cap = target.capture(model, **kwargs)
        return cap.__enter__(), cap
    from metaql.distributed.ddp import distributed_capture
    context = distributed_capture(target, model, **kwargs)
    return context.__enter__(), context     # a failure in __enter__ has already met the other ranks
