"""Checkpoints as users think of them: the weights a model has now, registered for replay.

    con.checkpoint(model, "epoch3", lr=0.05)     # after the epoch, with the lr it trained at
    con.replay("epoch3", "train")                # exact factors at exactly these weights

Nothing is captured: the checkpoint is complete at once, and queries get its factors by replay
(con.replay for training samples; query samples are always replayed). Unlike a capture, whose
factors are taken during the epoch while the weights move, every factor then comes from the same
weights the checkpoint saved.
"""
from __future__ import annotations

from torch import nn

from metaql.errors import CatalogException, InvalidInputException
from metaql.storage.catalog import transaction
from metaql.storage.store import Store


def register_checkpoint(store: Store, model: nn.Module, name: str, lr: float, epoch: int | None = None,
                        step: int | None = None, factory: str | None = None, kwargs: dict | None = None,
                        task=None) -> dict:
    """Saves `model`'s weights as a new complete checkpoint; returns its catalog row. `task` (see
    metaql.storage.tasks) is the loss every replay at this checkpoint uses."""
    if not isinstance(model, nn.Module):
        raise InvalidInputException(f"con.checkpoint takes a torch.nn.Module, got {type(model).__name__}")
    from metaql.storage.capture import unwrapped
    model = unwrapped(model)
    if name in {c["name"] for c in store.checkpoints()}:
        raise CatalogException(f"checkpoint '{name}' already exists with its own weights; register these "
                               f"weights under a new name, or remove it first (DROP CHECKPOINT {name})")
    # one transaction: the row appears complete or not at all (never 'capturing')
    with transaction(store.db):
        store.begin_checkpoint(name, model, lr=lr, epoch=epoch, step=step, factory=factory, kwargs=kwargs,
                               task=task)
        store.finish_checkpoint(name, "complete")
    store.committed()          # readers see it once it has committed
    return store.checkpoint(name)
