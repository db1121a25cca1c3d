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
    """Buffers per-layer factors and writes one shard per layer each time the buffers are full.

    Every layer receives the same sample ids in each batch, so the buffers fill in lockstep and
    flush together; that lets a layer whose input is another watched layer's input (Q, K and V
    projections) point at that layer's stored suffix instead of storing it again."""

    def __init__(self, store: Store, checkpoint: str, hooks: LayerHooks, shard_size: int = 2048,
                 dtype: str = "float32", storage: dict[str, str] | None = None):
        if dtype not in STORAGE_DTYPES:
            raise InvalidInputException(f"dtype must be one of {', '.join(STORAGE_DTYPES)}")
        self.store, self.checkpoint, self.hooks = store, checkpoint, hooks
        self.shard_size, self.dtype, self.storage = shard_size, STORAGE_DTYPES[dtype], storage or {}
        store.check_storage_override(self.storage)    # before any training step depends on it
        self.modes: dict[str, str] = {}
        self.suffix_of: dict[str, str] = {}
        self.buffers: dict[str, list[dict[str, torch.Tensor]]] = {}
        self.ids: list[np.ndarray] = []
        self.done: set[int] | None = None
        self.rows_written = 0

    def add(self, ids: np.ndarray, factors: dict[str, dict[str, torch.Tensor]]) -> None:
        keep = self._new_rows(ids)
        if not keep.any():
            return
        rows = torch.from_numpy(np.nonzero(keep)[0])
        for layer, fs in factors.items():
            if not all(torch.isfinite(v).all() for v in fs.values() if v.is_floating_point()):
                raise InvalidInputException(f"layer '{layer}' has NaN or infinite activations or gradients in "
                                            "this batch; nothing of it was stored (check the inputs and the lr)")
        shared = self._shared_suffixes(factors)
        for layer, fs in factors.items():
            kind = self.hooks.kinds[layer]
            mode = self._mode(layer, fs, shared.get(layer))
            if mode == "full":
                fs = {"G": kind.full(kind.meta(layer, self.hooks.modules[layer]), fs)}
            elif layer in self.suffix_of:
                fs = {k: v for k, v in fs.items() if k != kind.suffix_name()}
            self.buffers.setdefault(layer, []).append({k: self._to_storage(v[rows]) for k, v in fs.items()})
        self.ids.append(ids[keep])
        self.done.update(ids[keep].tolist())
        if sum(len(i) for i in self.ids) >= self.shard_size:
            self.flush()

    def _to_storage(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", self.dtype if t.is_floating_point() else t.dtype)

    def _new_rows(self, ids: np.ndarray) -> np.ndarray:
        """Ids not stored yet for this checkpoint (a resumed capture skips the others)."""
        if self.done is None:
            first = next(iter(self.hooks.modules))
            self.done = set(self.store.stored_ids(self.checkpoint, first).tolist())
        return np.fromiter((int(i) not in self.done for i in ids), bool, len(ids))

    def _shared_suffixes(self, factors) -> dict[str, str]:
        """{layer: earlier layer} for layers whose stored input is the very same tensor."""
        seen, shared = {}, {}
        for layer, fs in factors.items():
            name = self.hooks.kinds[layer].suffix_name()
            if name is None or name not in fs or len(self.hooks.inputs[layer]) != 1:
                continue
            t = self.hooks.inputs[layer][0]   # the input as the module saw it (factors may be copies)
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if key in seen:
                shared[layer] = seen[key]
            else:
                seen[key] = layer
        return shared

    def _mode(self, layer: str, fs: dict[str, torch.Tensor], shares_with: str | None) -> str:
        if layer not in self.modes:
            kind, module = self.hooks.kinds[layer], self.hooks.modules[layer]
            meta = kind.meta(layer, module)
            numbers = kind.stored_numbers(meta, {k: v[:1] for k, v in fs.items()})
            if shares_with and self.modes.get(shares_with) == "factored":
                meta.extra["suffix_of"] = shares_with
                # the shared input is stored once, by the layer it is shared with
                numbers -= int(np.prod(fs[kind.suffix_name()].shape[1:]))
            mode = self.store.register_layer(meta, kind.positions(meta, fs), numbers, kind.factored,
                                             self.storage.get(layer))
            self.modes[layer] = mode
            stored_meta, _ = self.store.layer_meta(layer)
            if mode == "factored" and stored_meta.extra.get("suffix_of"):
                self.suffix_of[layer] = stored_meta.extra["suffix_of"]
        if layer in self.suffix_of and self.suffix_of[layer] != shares_with:
            raise InvalidInputException(
                f"layer '{layer}' stopped reading the same input as '{self.suffix_of[layer]}' "
                "mid-capture; capture them into separate stores or without sharing")
        return self.modes[layer]

    def flush(self) -> None:
        if not self.ids:
            return
        ids = np.concatenate(self.ids)
        files: dict[str, str] = {}
        # layers that own their suffix first, so dependents can name the file that holds it
        for name in sorted(self.buffers, key=lambda n: n in self.suffix_of):
            parts = self.buffers[name]
            tensors = {k: _cat_rows([p[k] for p in parts]) for k in parts[0]}
            files[name] = self.store.write_factor_shard(self.checkpoint, name, ids, tensors, self.modes[name],
                                                        suffix_file=files.get(self.suffix_of.get(name)))
        self.rows_written += len(ids)
        self.buffers, self.ids = {}, []


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
                      progress=None, storage: dict[str, str] | None = None) -> int:
    """Computes exact factors of registered samples at a saved checkpoint and stores them.
    ``storage`` overrides the space formula per layer ({layer: 'factored' | 'full'}), as in capture."""
    from metaql.storage.replay import iter_replay

    ids = _as_ids(ids)
    model = store.model_at(checkpoint)
    hooks = LayerHooks(watched_modules(model, layers))
    writer = ShardWriter(store, checkpoint, hooks, shard_size, dtype, storage)
    labels = torch.as_tensor(store.sample_columns(ids, ["label"])["label"].astype(np.int64)) \
        if target == "label" else None
    inputs = store.inputs(ids)
    batches = iter_replay(model, hooks, inputs, labels, target, batch_size)
    for rows, factors in (progress(batches, total=-(-len(ids) // batch_size), desc=f"replay {checkpoint}")
                          if progress else batches):
        writer.add(ids[rows], factors)
    writer.flush()
    return writer.rows_written
