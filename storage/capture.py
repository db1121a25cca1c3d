"""Capture in the user's training loop, and the shard writer shared with replay.

    with con.capture(model, layers=["fc1", "fc2"], checkpoint="epoch3", lr=0.05) as cap:
        for x, y, ids in loader:
            loss = F.cross_entropy(model(x), y)      # mean over the batch, or sum, or per sample
            cap.backward(loss, ids)                  # instead of loss.backward()
            opt.step(); opt.zero_grad()

Entering saves the weights as the checkpoint's; each sample's factors are those of its own loss at
the step it was seen (TracIn's approximation of the checkpoint; exact for models without
cross-sample layers such as BatchNorm in train mode; use `con.replay` for exact factors at the
saved weights). Ids already stored for the checkpoint are skipped, so a killed run resumes.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from metaql.engine.errors import InvalidInputException
from metaql.storage.hooks import LayerHooks, watched_modules
from metaql.storage.store import Store, _as_ids

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ShardWriter:
    """Buffers per-layer factors and writes a shard each time a layer's buffer is full."""

    def __init__(self, store: Store, checkpoint: str, hooks: LayerHooks, shard_size: int = 2048,
                 dtype: str = "float32", storage: dict[str, str] | None = None):
        if dtype not in STORAGE_DTYPES:
            raise InvalidInputException(f"dtype must be one of {', '.join(STORAGE_DTYPES)}")
        self.store, self.checkpoint, self.hooks = store, checkpoint, hooks
        self.shard_size, self.dtype, self.storage = shard_size, STORAGE_DTYPES[dtype], storage or {}
        self.modes: dict[str, str] = {}
        self.buffers: dict[str, list[tuple[np.ndarray, dict[str, torch.Tensor]]]] = {}
        self.done: dict[str, set[int]] = {}
        self.rows_written = 0

    def add(self, ids: np.ndarray, factors: dict[str, dict[str, torch.Tensor]]) -> None:
        for layer, fs in factors.items():
            keep = self._new_rows(layer, ids)
            if not keep.any():
                continue
            mode = self._mode(layer, fs)
            if mode == "full":
                meta = self.hooks.kinds[layer].meta(layer, self.hooks.modules[layer])
                fs = {"G": self.hooks.kinds[layer].full(meta, fs)}
            rows = torch.from_numpy(np.nonzero(keep)[0])
            fs = {k: v.detach()[rows].to("cpu", self.dtype if v.is_floating_point() else v.dtype)
                  for k, v in fs.items()}
            self.buffers.setdefault(layer, []).append((ids[keep], fs))
            self.done[layer].update(ids[keep].tolist())
            if sum(len(i) for i, _ in self.buffers[layer]) >= self.shard_size:
                self.flush(layer)

    def _new_rows(self, layer: str, ids: np.ndarray) -> np.ndarray:
        if layer not in self.done:
            self.done[layer] = set(self.store.stored_ids(self.checkpoint, layer).tolist())
        done = self.done[layer]
        return np.fromiter((int(i) not in done for i in ids), bool, len(ids))

    def _mode(self, layer: str, fs: dict[str, torch.Tensor]) -> str:
        if layer not in self.modes:
            kind, module = self.hooks.kinds[layer], self.hooks.modules[layer]
            meta = kind.meta(layer, module)
            positions = kind.positions(meta, fs)
            self.modes[layer] = self.store.register_layer(meta, positions, self.storage.get(layer))
        return self.modes[layer]

    def flush(self, layer: str | None = None) -> None:
        for name in [layer] if layer else list(self.buffers):
            parts = self.buffers.pop(name, [])
            if not parts:
                continue
            ids = np.concatenate([i for i, _ in parts])
            tensors = {k: _cat_rows([p[k] for _, p in parts]) for k in parts[0][1]}
            self.store.write_factor_shard(self.checkpoint, name, ids, tensors, self.modes[name])
            self.rows_written += len(ids)


def _cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    from metaql.storage.replay import _cat_padded
    return _cat_padded(parts)


class Capture:
    def __init__(self, store: Store, model: nn.Module, layers=None, checkpoint: str = "ckpt0",
                 lr: float = 1.0, epoch: int | None = None, step: int | None = None,
                 factory: str | None = None, kwargs: dict | None = None, shard_size: int = 2048,
                 dtype: str = "float32", storage: dict[str, str] | None = None):
        self.store, self.model, self.checkpoint = store, model, checkpoint
        self.hooks = LayerHooks(watched_modules(model, layers))
        self._ckpt_args = dict(lr=lr, epoch=epoch, step=step, factory=factory, kwargs=kwargs)
        self.writer = ShardWriter(store, checkpoint, self.hooks, shard_size, dtype, storage)
        self.samples = 0

    def __enter__(self) -> "Capture":
        self.store.begin_checkpoint(self.checkpoint, self.model, **self._ckpt_args)
        self.hooks.attach()
        return self

    def backward(self, loss: torch.Tensor, ids, reduction: str = "mean") -> torch.Tensor:
        """Backpropagates `loss` (as loss.backward() would) and keeps each sample's factors.

        `loss` is the batch loss with the given reduction ('mean' or 'sum'), or a vector of
        per-sample losses (then reduced with `reduction` for the backward pass)."""
        ids = _as_ids(ids)
        if reduction not in ("mean", "sum"):
            raise InvalidInputException("reduction must be 'mean' or 'sum'")
        if loss.dim() == 1:
            if loss.shape[0] != len(ids):
                raise InvalidInputException(f"{loss.shape[0]} per-sample losses for {len(ids)} ids")
            loss = loss.mean() if reduction == "mean" else loss.sum()
        elif loss.dim() != 0:
            raise InvalidInputException("loss must be a scalar or a vector of per-sample losses")
        if not torch.isfinite(loss):
            raise InvalidInputException("the loss is NaN or infinite; nothing was captured for this batch")
        loss.backward()
        # d(mean)/d(out_i) is d(loss_i)/d(out_i) / B: scale back to each sample's own loss
        factors = self.hooks.factors(scale=float(len(ids)) if reduction == "mean" else 1.0)
        for layer, fs in factors.items():
            b = next(iter(fs.values())).shape[0]
            if b != len(ids):
                raise InvalidInputException(f"layer '{layer}' saw a batch of {b} but {len(ids)} ids were given")
        self.writer.add(ids, factors)
        self.hooks.clear()
        self.samples += len(ids)
        return loss

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.writer.flush()
        finally:
            self.hooks.detach()
            self.store.finish_checkpoint(self.checkpoint, "complete" if exc_type is None else "partial")


def replay_into_store(store: Store, checkpoint: str, ids, layers=None, target: str = "label",
                      batch_size: int = 256, shard_size: int = 2048, dtype: str = "float32",
                      progress=None) -> int:
    """Computes exact factors of registered samples at a saved checkpoint and stores them."""
    from metaql.storage.replay import iter_replay

    ids = _as_ids(ids)
    model = store.model_at(checkpoint)
    hooks = LayerHooks(watched_modules(model, layers))
    writer = ShardWriter(store, checkpoint, hooks, shard_size, dtype)
    labels = torch.as_tensor(store.sample_columns(ids, ["label"])["label"].astype(np.int64)) \
        if target == "label" else None
    inputs = store.inputs(ids)
    batches = iter_replay(model, hooks.modules, inputs, labels, target, batch_size)
    for rows, factors in (progress(batches, total=-(-len(ids) // batch_size), desc=f"replay {checkpoint}")
                          if progress else batches):
        writer.add(ids[rows], factors)
    writer.flush()
    return writer.rows_written
