"""Capture inside the Hugging Face Trainer: `MetaQLTrainer` is a `transformers.Trainer` that stores
each training sample's gradient factors while it trains.

    trainer = MetaQLTrainer(model=model, args=args, train_dataset=train, con=con, layers="*",
                            task="sequence_classification")
    trainer.train()                      # checkpoints epoch1, epoch2, ... each complete at its end

The dataset gives each sample's id in a column (`id_column`, default "sample_id"), kept out of the
model's inputs; the ids are those registered with con.add_samples. The Trainer trains on the loss of
the capture's task (metaql.storage.tasks), the mean of its per-sample losses over the batch: the same
loss every replay and query side uses. A checkpoint is opened at its first training step (saving the
weights and the optimizer's learning rate then) and closed at the end of its epoch, or every
`every` optimizer steps, and at the end of training. An exception in training closes the open
checkpoint unfinished: it is never scored, and verify() names it.

Loss scale: each sample's stored factors are those of its own loss, unscaled. Whatever the Trainer
multiplies that loss by before backpropagating (1/batch size for the mean, 1/gradient accumulation
steps, a mixed-precision loss scale), the factor is read from autograd on the per-sample loss vector
and divided out, so gradient accumulation gives the same factors as one large batch.

Under DDP (torchrun or any launcher setting RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): each rank
captures its own samples into its own shards and rank 0 commits them with the checkpoint
(metaql.distributed.ddp); pass con= the connection on rank 0 and the store's path on every other
rank (they must not open it). The factors are those of each sample's own loss, as in one process:
the scale is read from the rank's own backward pass, which DDP leaves unscaled.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch

from metaql.engine.errors import InvalidInputException

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:      # pragma: no cover - the extra is not installed
    raise ImportError("metaql.integrations.huggingface needs transformers and accelerate: "
                      "pip install 'metaql[huggingface]'") from e


class MetaQLTrainer(Trainer):
    """A transformers.Trainer that captures into `con` (a metaql connection).

    con          the metaql connection to capture into (its samples registered with add_samples)
    layers       names or glob patterns of the layers to capture, as con.capture takes them ('*': all)
    task         the loss, as con.capture takes it (default classification; Hugging Face models
                 returning .logits work with it or 'sequence_classification')
    checkpoint   the checkpoint name, a format string of {epoch} (1, 2, ...), {step} (the optimizer
                 step the checkpoint starts at) and {index} (0, 1, ...); default "epoch{epoch}", or
                 "step{step}" when `every` is a number of steps
    every        "epoch", or a number of optimizer steps per checkpoint
    id_column    the dataset column of sample ids
    lr           the learning rate recorded for TracIn's weighting: None (the optimizer's at the
                 checkpoint's first step), a number, or a function of the trainer
    capture_kwargs  further keyword arguments of con.capture (dtype, shard_size, storage, factory, kwargs)
    """

    def __init__(self, *args, con, layers="*", task=None, checkpoint: str | None = None, every="epoch",
                 id_column: str = "sample_id", lr=None, capture_kwargs: dict | None = None, **kwargs):
        if kwargs.get("compute_loss_func") is not None:
            raise InvalidInputException("MetaQLTrainer trains on the loss of its task (the loss every replay "
                                        "uses); pass task= instead of compute_loss_func")
        if every != "epoch" and not (isinstance(every, int) and not isinstance(every, bool) and every > 0):
            raise InvalidInputException(f"every must be 'epoch' or a positive number of steps, got {every!r}")
        super().__init__(*args, **kwargs)
        from metaql.storage.tasks import make_task, task_spec
        self.metaql_con, self.metaql_layers, self.metaql_every = con, layers, every
        self.metaql_task_arg = task
        self.metaql_task = make_task(*task_spec(task))
        self.metaql_checkpoint = checkpoint or ("epoch{epoch}" if every == "epoch" else "step{step}")
        self.metaql_id_column, self.metaql_lr = id_column, lr
        self.metaql_capture_kwargs = dict(capture_kwargs or {})
        self.metaql_checkpoints: list[str] = []      # the names this trainer has captured, in order
        self._capture = None
        self._closer = None     # what closes the capture: itself, or under DDP its distributed_capture
        self._epoch = 1
        self._pending = None        # (ids, d backpropagated loss / d per-sample losses) of this step
        # the loss is a per-batch mean, so the Trainer itself divides it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self.add_callback(_Boundaries(self))

    # ---- the ids and labels travel past the Trainer's column filter ----------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in (self.metaql_id_column, "labels", "label"):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    # ---- loss ----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        inputs = dict(inputs)
        ids = inputs.pop(self.metaql_id_column, None)
        labels = next((inputs.pop(k) for k in [*(self.label_names or []), "labels", "label"] if k in inputs), None)
        outputs = model(**inputs)
        losses = self.metaql_task.losses(outputs, inputs.get("input_ids"), labels, "label",
                                         inputs.get("attention_mask"))
        if model.training and torch.is_grad_enabled() and self._capture is not None:
            if ids is None:
                raise InvalidInputException(
                    f"the training batch has no '{self.metaql_id_column}' column: add each sample's id (as "
                    "registered with con.add_samples) to the dataset, or name its column with id_column=")
            self._pending = [np.asarray(torch.as_tensor(ids).detach().cpu()).reshape(-1), None]
            losses.register_hook(self._keep_loss_grad)
        loss = losses.mean()
        return (loss, outputs) if return_outputs else loss

    def _keep_loss_grad(self, grad: torch.Tensor) -> None:
        self._pending[1] = grad.detach().double().cpu()

    # ---- capture -------------------------------------------------------------------------------
    def training_step(self, model, inputs, *args, **kwargs):
        if self._capture is None:
            self._open_capture()
        self._pending = None
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self._pending is None or self._pending[1] is None:
            self._capture.hooks.clear()
            raise InvalidInputException("the training step ran no backward pass through the task's per-sample "
                                         "losses, so no sample's factors could be kept")
        ids, dloss = self._pending
        self._pending = None
        self._capture.record(ids, _per_sample_scale(dloss))
        return loss

    def train(self, *args, **kwargs):
        try:
            out = super().train(*args, **kwargs)
        except BaseException:
            self._close_capture(*sys.exc_info())
            raise
        self._close_capture(None, None, None)
        return out

    def _open_capture(self) -> None:
        if getattr(self.args, "n_gpu", 1) > 1:
            raise InvalidInputException(
                f"the Trainer wraps the model in nn.DataParallel over {self.args.n_gpu} GPUs, whose replicas reach "
                "MetaQL's hooks from threads in any order, so no sample's factors could be matched to its id: "
                "train on one GPU (CUDA_VISIBLE_DEVICES=0), or launch with torchrun (DDP) and capture on one rank")
        from metaql.integrations._ranks import open_capture
        epoch, step = self._epoch, int(self.state.global_step)
        name = self.metaql_checkpoint.format(epoch=epoch, step=step, index=len(self.metaql_checkpoints))
        self._capture, self._closer = open_capture(
            "MetaQLTrainer", self.metaql_con, self.model, layers=self.metaql_layers, checkpoint=name,
            lr=self._learning_rate(), epoch=epoch, step=step, task=self.metaql_task_arg,
            **self.metaql_capture_kwargs)
        self.metaql_checkpoints.append(name)

    def _learning_rate(self) -> float:
        if self.metaql_lr is None:
            return float(self.optimizer.param_groups[0]["lr"])
        return float(self.metaql_lr(self) if callable(self.metaql_lr) else self.metaql_lr)

    def _close_capture(self, exc_type, exc, tb) -> None:
        closer, self._capture, self._closer = self._closer, None, None
        if closer is not None:
            closer.__exit__(exc_type, exc, tb)


class _Boundaries(TrainerCallback):
    """Closes the trainer's checkpoint where its period ends."""

    def __init__(self, trainer: MetaQLTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        # a run resumed mid-epoch starts at a fractional state.epoch (1.5: half of epoch 2 done); a
        # hair of slack keeps an epoch's float sum of step fractions from landing just under it
        self.trainer._epoch = int(math.floor((state.epoch or 0) + 1e-6)) + 1

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.trainer.metaql_every == "epoch":
            self.trainer._close_capture(None, None, None)

    def on_step_end(self, args, state, control, **kwargs):
        every = self.trainer.metaql_every
        if every != "epoch" and state.global_step % every == 0:
            self.trainer._close_capture(None, None, None)


def _per_sample_scale(dloss: torch.Tensor) -> float:
    """1 / (d backpropagated loss / d loss_i), the same for every sample of a mean."""
    c = dloss.reshape(-1)
    if len(c) == 0 or not torch.isfinite(c).all() or (c <= 0).any() or (c.max() - c.min()) > 1e-6 * c.max():
        raise InvalidInputException(f"the per-sample losses were backpropagated with weights {c[:5].tolist()}, "
                                    "not one positive weight for all (a loss scale overflowed?); no factors "
                                    "of this batch were kept")
    return float(1.0 / c.mean())
