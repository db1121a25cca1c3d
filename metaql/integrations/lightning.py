"""Capture inside PyTorch Lightning: `MetaQLCallback` stores each training sample's gradient factors
while `Trainer.fit` trains, with the LightningModule unchanged.

    trainer = L.Trainer(max_epochs=3, callbacks=[MetaQLCallback(con, layers="*")])
    trainer.fit(module, loader)          # checkpoints epoch1, epoch2, epoch3

What the callback needs of the training:
- each batch carries the samples' ids (those registered with con.add_samples): the last element of
  a tuple/list batch, or the "sample_id" key of a dict batch (`ids=` names another key or index, or
  is a function of the batch);
- the loss `training_step` returns is the batch MEAN of each sample's own loss (as
  F.cross_entropy(..., reduction="mean") gives), or their sum with `reduction="sum"`; the same
  per-sample loss as the capture's `task`, which every replay uses (default classification:
  cross-entropy);
- one backward pass per batch (automatic optimization, or manual_backward once per batch).

Loss scale: each sample's stored factors are those of its own loss, unscaled: the callback divides
out the batch mean (or not, for a sum), Lightning's division by accumulate_grad_batches and a
mixed-precision GradScaler's scale, so gradient accumulation gives the same factors as one large
batch. A checkpoint is opened at its first training batch (saving the weights and the optimizer's
learning rate then) and closed at the end of its epoch, or every `every` optimizer steps, and at the
end of training; an exception closes it unfinished: it is never scored, and verify() names it.

Under DDP (strategy='ddp', any backend): each rank captures its own samples into its own shards and
rank 0 commits them with the checkpoint (metaql.distributed.ddp), so give rank 0 the connection and
every other rank the store's path (they must not open it: a store has one writer):

    con = metaql.connect(path) if trainer.global_rank == 0 else path   # or os.environ["RANK"]
    trainer = L.Trainer(strategy="ddp", devices=2, callbacks=[MetaQLCallback(con)])

The stored factors are those of each sample's own loss, as in one process: DDP averages the ranks'
parameter gradients, but the gradients at a layer's output that the capture reads are those of the
rank's own batch mean, so dividing out the rank's batch size is exact. Every sample must be on one
rank once per checkpoint: a DistributedSampler pads the last batch with repeated samples unless the
training set divides into whole global batches (or drop_last=True), and a repeated id is refused.

`lightning` (import lightning.pytorch) is used when installed, else `pytorch_lightning`.
"""
from __future__ import annotations

import numpy as np
import torch

from metaql.engine.errors import InvalidInputException

try:
    import lightning.pytorch as pl
except ImportError:       # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl
    except ImportError as e:
        raise ImportError("metaql.integrations.lightning needs Lightning: pip install 'metaql[lightning]'") from e


class MetaQLCallback(pl.Callback):
    """Captures into `con` (a metaql connection) during Trainer.fit.

    layers, task    as con.capture takes them (default every layer, '*', and classification)
    checkpoint      the checkpoint name, a format string of {epoch} (1, 2, ...), {step} (the optimizer
                    step it starts at) and {index} (0, 1, ...); default "epoch{epoch}", or
                    "step{step}" when `every` is a number of steps
    every           "epoch", or a number of optimizer steps per checkpoint
    ids             where a batch keeps its sample ids: None (a dict's "sample_id", a tuple's last
                    element), a dict key, a tuple index, or a function of the batch
    reduction       "mean" or "sum": how training_step reduces the per-sample losses
    lr              the learning rate recorded for TracIn: None (the first optimizer's at the
                    checkpoint's first batch), a number, or a function of the trainer
    capture_kwargs  further keyword arguments of con.capture (dtype, shard_size, storage, factory, kwargs)
    """

    def __init__(self, con, layers="*", task=None, checkpoint: str | None = None, every="epoch", ids=None,
                 reduction: str = "mean", lr=None, capture_kwargs: dict | None = None):
        if every != "epoch" and not (isinstance(every, int) and not isinstance(every, bool) and every > 0):
            raise InvalidInputException(f"every must be 'epoch' or a positive number of steps, got {every!r}")
        if reduction not in ("mean", "sum"):
            raise InvalidInputException("reduction must be 'mean' or 'sum' (how training_step reduces the "
                                        "per-sample losses)")
        self.con, self.layers, self.task, self.every = con, layers, task, every
        self.checkpoint = checkpoint or ("epoch{epoch}" if every == "epoch" else "step{step}")
        self.ids, self.reduction, self.lr = ids, reduction, lr
        self.capture_kwargs = dict(capture_kwargs or {})
        self.checkpoints: list[str] = []      # the names this callback has captured, in order
        self._capture = None
        self._closer = None     # what closes the capture: itself, or under DDP its distributed_capture
        self._opened_at = 0
        self._batch_ids = None

    # ---- checkpoint boundaries -----------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._capture is None:
            self._open(trainer, pl_module)
        self._capture.hooks.clear()      # a batch whose step skipped backward left its inputs behind
        self._batch_ids = _ids_of(batch, self.ids)

    def on_after_backward(self, trainer, pl_module):
        if self._capture is None or self._batch_ids is None:
            return
        ids, self._batch_ids = self._batch_ids, None
        self._capture.record(ids, self._scale(trainer, pl_module, len(ids)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every != "epoch" and trainer.global_step >= self._opened_at + self.every:
            self._close(None, None, None)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.every == "epoch":
            self._close(None, None, None)

    def on_train_end(self, trainer, pl_module):
        self._close(None, None, None)

    def on_exception(self, trainer, pl_module, exception):
        self._close(type(exception), exception, exception.__traceback__)

    # ---- capture -------------------------------------------------------------------------------
    def _open(self, trainer, pl_module) -> None:
        epoch, step = int(trainer.current_epoch) + 1, int(trainer.global_step)
        name = self.checkpoint.format(epoch=epoch, step=step, index=len(self.checkpoints))
        from metaql.integrations._ranks import open_capture
        self._capture, self._closer = open_capture(
            "MetaQLCallback", self.con, pl_module, layers=self.layers, checkpoint=name,
            lr=self._learning_rate(trainer), epoch=epoch, step=step, task=self.task, **self.capture_kwargs)
        self._opened_at = step
        self.checkpoints.append(name)

    def _learning_rate(self, trainer) -> float:
        if self.lr is not None:
            return float(self.lr(trainer) if callable(self.lr) else self.lr)
        if not trainer.optimizers:
            raise InvalidInputException("the trainer has no optimizer to read the learning rate from; pass lr=")
        return float(trainer.optimizers[0].param_groups[0]["lr"])

    def _scale(self, trainer, pl_module, batch: int) -> float:
        """1 / (d backpropagated loss / d loss_i)."""
        scale = float(batch) if self.reduction == "mean" else 1.0
        if pl_module.automatic_optimization:
            scale *= trainer.accumulate_grad_batches      # Lightning divides the step's loss by it
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale /= float(scaler.get_scale())
        return scale

    def _close(self, exc_type, exc, tb) -> None:
        closer, self._capture, self._closer, self._batch_ids = self._closer, None, None, None
        if closer is not None:
            closer.__exit__(exc_type, exc, tb)


def _ids_of(batch, where) -> np.ndarray:
    if callable(where):
        ids = where(batch)
    elif isinstance(batch, dict):
        key = "sample_id" if where is None else where
        if key not in batch:
            raise InvalidInputException(f"the training batch has no '{key}' key: add each sample's id (as "
                                        "registered with con.add_samples) to the batches, or name it with ids=")
        ids = batch[key]
    elif isinstance(batch, (tuple, list)) and batch:
        ids = batch[-1 if where is None else where]
    else:
        raise InvalidInputException(f"cannot find sample ids in a {type(batch).__name__} batch; pass ids= (a "
                                    "dict key, a tuple index, or a function of the batch)")
    ids = torch.as_tensor(ids).detach().cpu() if not isinstance(ids, np.ndarray) else ids
    return np.asarray(ids).reshape(-1)
