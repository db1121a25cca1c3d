"""Capture in the user's training loop, and the shard writer shared with replay.

    with con.capture(model, layers=["fc1", "fc2"], checkpoint="epoch3", lr=0.05) as cap:
        for x, y, ids in loader:
            loss = F.cross_entropy(model(x), y)      # mean over the batch, or sum, or per sample
            cap.backward(loss, ids)                  # instead of loss.backward()
            opt.step(); opt.zero_grad()

Entering saves the weights as the checkpoint's; each sample's factors are those of its own loss at
the step it was seen (TracIn's approximation of the checkpoint; exact for models without
cross-sample layers such as BatchNorm in train mode; use `con.replay` for exact factors at the
saved weights). Each layer skips the ids it already stored for the checkpoint, so a killed run resumes.
"""
from __future__ import annotations

import json
import math
import threading
import time
import warnings

import numpy as np
import torch
from torch import nn

from metaql.errors import InvalidInputException, ProgrammingError, user_stacklevel
from metaql.errors import Warning as MetaQLWarning
from metaql.storage.hooks import LayerHooks, select_layers
from metaql.storage.layers import LayerMeta
from metaql.storage.store import Store, _as_ids

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# factors of full-stored layers handed to the writer thread at once (see ShardWriter._resolve_full)
FULL_HANDOVER_BYTES = 4 << 20
# a flush comes at shard_size rows or at this many bytes buffered, whichever is first: at the
# default 2,048 rows a MiniLM over all its layers (2.4 MB a sample) buffered 5 GB, and with the
# writer thread's flush beside it a 2,000-sample capture reached 11 GB of memory
MAX_BUFFER_BYTES = 1 << 30
# a settled layer's batches are packed (ShardWriter._packed) while its factors of a batch are at most
# this many bytes: packing saves 20-25 us of per-factor work (the digits MLP's step: 230 -> 130 us of
# bookkeeping), as long as copying 256 KiB takes; a larger factor's copy is its cost, and a block of
# a GPT-2's every layer (10 MiB a batch) was slower to fill than its copies one by one
PACK_MAX_BYTES = 256 << 10
# a capture leaves the copies its last flush was done with (at most this many bytes) to the next
# capture on the store: a capture per epoch on digits (1,297 samples: one flush, at its end) never
# reused one, and a copy into new memory costs 7x one into memory touched before (the MLP's block of
# a batch: 68 against 9 us, its page faults)
KEPT_COPIES_MAX_BYTES = 64 << 20
# a capture warns when training waited for its writer thread longer than both of these
WRITER_WAIT_WARN_S = 1.0
WRITER_WAIT_WARN_SHARE = 0.2


class ShardWriter:
    """Buffers per-layer factors and writes one shard per layer each time a layer's buffer is full.

    Each layer keeps the ids it has not stored yet for the checkpoint (a resumed capture fills in
    exactly what each layer lacks; a layer that never runs blocks nothing), and a flush commits
    every layer's shard as one unit (Store.write_factor_shards). A layer whose input is another
    watched layer's input (Q, K and V projections) points at that layer's stored suffix when both
    buffered the same ids, and stores the suffix itself otherwise."""

    def __init__(self, store: Store, checkpoint: str, hooks: LayerHooks, shard_size: int = 2048,
                 dtype: str = "float32", storage: dict[str, str] | None = None, background: bool = False,
                 projection=None):
        if dtype not in STORAGE_DTYPES:
            raise InvalidInputException(f"dtype must be one of {', '.join(STORAGE_DTYPES)}")
        from metaql.approx.capture import ProjectionRequest
        self.projection = projection if projection is not None else ProjectionRequest(storage)
        self.store, self.checkpoint, self.hooks = store, checkpoint, hooks
        self.shard_size, self.dtype, self.storage = shard_size, STORAGE_DTYPES[dtype], self.projection.exact
        self.background = background      # flushes written by a BackgroundWriter thread (storage/writer.py)
        self._worker = None
        self._pending_full: list = []      # full-stored batches not yet handed to the writer thread
        self._pending_bytes = 0
        self._metas: dict = {}
        self._held: bool | None = None
        self._finishing = False      # the last flush was asked for: the caller publishes the catalog (flush)
        self._layers: dict | None = None
        self._stored: dict[str, tuple[LayerMeta, str]] = {}    # per layer: (meta, mode) as the catalog holds them
        self._settled: set[str] = set()     # layers whose batches of new ids are packed (_settle, _packed)
        self.modes: dict[str, str] = {}
        self.suffix_of: dict[str, str] = {}
        # one dict per batch: {layer: (ids kept, tensors, suffix is the owner's very tensor)}
        self.batches: list[dict[str, tuple[np.ndarray, dict[str, torch.Tensor], bool]]] = []
        self.seen: list[int | None] = []           # per batch: the capture batch whose weights it saw
        self.stored: dict[str, set[int]] = {}      # per layer: ids committed for this checkpoint
        self._counts: dict[str, int] = {}          # per layer: rows waiting for the next flush
        self._buffer_bytes = 0                     # bytes of the factors waiting for the next flush
        # per layer: the ids waiting for the next flush, built only once a batch repeats ids (None until then)
        self._buffered: dict[str, set[int]] | None = None
        self._claimed: set[int] = set()            # every id some layer stored or buffered: the fast test
        self._before: set[int] = set()             # ids an earlier run stored for the checkpoint (resumed)
        self._warned_repeat = False
        self.rows_written = 0
        self.flushes = 0                           # flushes handed over (or written inline)
        self.factor_bytes = 0                      # bytes of the factors buffered for writing
        self._wait_busy = [0.0, 0.0]               # writer_seconds() of writer threads already closed
        # the copies of flushes written, for the next batches' copies (take_kept_copies: the last
        # capture's at first)
        self.recycled = _Recycled()
        self._scaled: set[str] = set()     # layers whose gradient factors the buffer scaled
        self.projected: dict = {}      # per layer: its CaptureProjection (metaql.approx), or None: exact
        self.projection.check_layers(list(hooks.modules))
        self.projection.check(self._registered())
        store.check_storage_override(self.storage)    # before any training step depends on it

    @property
    def ids(self) -> list[np.ndarray]:
        """The buffered ids of the fullest layer, batch by batch."""
        per_layer: dict[str, list[np.ndarray]] = {}
        for batch in self.batches:
            for layer, (ids, _, _) in batch.items():
                per_layer.setdefault(layer, []).append(ids)
        return max(per_layer.values(), key=lambda parts: sum(map(len, parts)), default=[])

    def add(self, ids: np.ndarray, factors: dict[str, dict[str, torch.Tensor]], seen: int | None = None,
            checked: bool = False, scale: float = 1.0, unscaled: dict[str, tuple[str, ...]] | None = None,
            listed: list[int] | None = None) -> None:
        """Buffers the batch's new rows of every layer; raises before buffering anything. `seen`: the
        number of the training batch (counted from the checkpoint's weights) whose weights computed
        these factors; None when they are the checkpoint's own weights (replay). `ids` is buffered as
        it is (every layer's rows share it): the caller's own array, which it does not change.
        `checked`: the caller checked that the ids are unique. `unscaled`: {layer: factors still to be
        multiplied by `scale`} (LayerHooks.factors(deferred=True)): multiplied into the copies the
        buffer keeps, rather than into new tensors that are then copied or kept. `listed`:
        ids.tolist(), when the caller made it already."""
        ids = np.asarray(ids)
        listed = ids.tolist() if listed is None else listed
        if not checked:
            check_unique_ids(ids, listed)
        self.check()
        unscaled = dict(unscaled or {})
        packed = self._packed(ids, factors, scale, unscaled, listed)
        rest = {layer: fs for layer, fs in factors.items() if layer not in packed} if packed else factors
        batch, keeps = self._unpacked(ids, rest, scale, unscaled, listed) if rest else ({}, {})
        self._scaled.update(unscaled)
        if packed and batch:
            batch = {layer: packed[layer] if layer in packed else batch[layer]
                     for layer in factors if layer in packed or layer in batch}
        elif packed:
            batch = packed      # every layer settled: the usual step
        if not batch:
            return
        self._append(batch, seen, listed, full=bool(rest))
        if rest:
            self._settle(batch, keeps)

    def _unpacked(self, ids: np.ndarray, factors: dict, scale: float, unscaled: dict, listed: list[int]
                  ) -> tuple[dict, dict]:
        """(the layers' buffered rows, {layer: keep mask}) by the full path: projection, registration
        on a layer's first batch, repeated ids, inputs shared among layers, full-stored layers."""
        factors = self._project(factors, scale, unscaled)
        # unscaled gradients are finite exactly when the scaled ones are, but for an overflow of the
        # product (gradients above 3e38 / scale), which the flush checks (_entry): rare enough to leave
        # to the writer thread the sum it costs
        _check_finite(factors)
        shared = self._shared_suffixes(factors)
        modes = {layer: self._mode(layer, fs, shared.get(layer)) for layer, fs in factors.items()}
        keeps = self._keeps(factors, ids, listed)
        batch = {}
        for layer, fs in factors.items():
            if keeps[layer] is None or keeps[layer].any():
                scales = dict.fromkeys(unscaled.get(layer, ()), scale)
                batch[layer] = self._layer_rows(layer, fs, modes[layer], ids, keeps, batch, scales)
        return batch, keeps

    def _packed(self, ids: np.ndarray, factors: dict, scale: float, unscaled: dict, listed: list[int]) -> dict:
        """{layer: its buffered rows} of the batch's settled layers (see _settle), when the ids are
        new: their factors copied into one block (one concatenation) and tested finite (one sum),
        the views of it and the scaling of the gradient factors left to the flush (_Packed). On an
        MLP the full path's per-factor copies, sums and views and its other steps (nothing to do for
        a settled layer) cost as much as the training step."""
        if not self._settled or self._buffered is not None or not self._claimed.isdisjoint(listed) \
                or not all(layer in self.modes for layer in factors):
            # a layer new to this capture may read a settled layer's input: the full path sees both
            return {}
        flat, layouts, start, dtype = [], {}, 0, None
        for layer, fs in factors.items():
            if layer not in self._settled:
                continue
            # one dtype in the block: each factor is then converted and scaled as the full path does
            # it; on the CPU only (a device's factors go through the full path's copies to the CPU)
            dtype = dtype or next(iter(fs.values())).dtype
            if not all(v.dtype == dtype and v.device.type == "cpu" for v in fs.values()) \
                    or sum(v.numel() for v in fs.values()) * dtype.itemsize > PACK_MAX_BYTES:
                continue
            names, layout, first = unscaled.get(layer, ()), [], start
            for k, v in fs.items():
                flat.append(v.detach().reshape(-1))
                layout.append((k, start, v.shape, k in names))
                start += flat[-1].numel()
            layouts[layer] = (layout, start - first)
        if not flat:
            return {}
        block = self.recycled.block(start, dtype)
        torch.cat(flat, out=block)
        if not _finite(block):
            _check_finite({layer: _Packed(block, layout, n, 1.0, dtype).tensors()
                           for layer, (layout, n) in layouts.items()})
        return {layer: (ids, _Packed(block, layout, n, scale, self.dtype), False) for layer, (layout, n) in layouts.items()}

    def _settle(self, batch: dict, keeps: dict) -> None:
        """Adds to the settled layers (packed from the next batch on: _packed) those of the batch
        registered factored and exact, sharing no input with another layer (neither as the layer
        that stores it nor as one that points at it), that kept all their rows as copies (a factor
        the kind made for the batch is kept as it is by the full path, not copied once more), of
        at most PACK_MAX_BYTES."""
        owners = self._owners()
        self._settled -= owners         # a layer another one points at since (registered later)
        for layer, (_, tensors, _) in batch.items():
            if layer in self._settled or not isinstance(tensors, dict) or keeps[layer] is not None \
                    or self.modes.get(layer) != "factored" or self.projected.get(layer, False) is not None:
                continue
            if layer in self.suffix_of or layer in owners:
                continue
            if all(getattr(t, _Recycled.MARK, False) and t.is_floating_point() for t in tensors.values()) \
                    and sum(t.nbytes for t in tensors.values()) <= PACK_MAX_BYTES:
                self._settled.add(layer)

    def _owners(self) -> set[str]:
        """Layers whose stored input another layer points at, in this capture or in the store."""
        registered = (meta.extra.get("suffix_of") for _, meta in self._registered().values())
        return set(self.suffix_of.values()) | {owner for owner in registered if owner}

    def _append(self, batch: dict, seen: int | None, listed: list[int], full: bool) -> None:
        """Buffers a batch's rows (one step: an interrupt leaves the batch wholly in or out) and
        flushes when a layer's buffer or the bytes held reach their limit. `full`: some rows came
        by the full path (a full-stored layer may be among them)."""
        self.batches.append(batch)
        self.seen.append(seen)
        if full:
            self._resolve_full([t for _, t, _ in batch.values() if isinstance(t, _FullRows)])
        self._claimed.update(listed)
        for layer, (kept, _, _) in batch.items():
            self._counts[layer] = self._counts.get(layer, 0) + len(kept)
            if self._buffered is not None:
                self._buffered.setdefault(layer, set()).update(kept.tolist())
        self._buffer_bytes += _batch_bytes(batch)
        self.factor_bytes += _batch_bytes(batch, stored=True)
        if max(self._counts.values()) >= self.shard_size or self._buffer_bytes >= MAX_BUFFER_BYTES:
            self.flush()

    def _kind(self, layer: str):
        """The kind the layer is stored as: its own, or 'projected' (metaql.approx)."""
        return self.projected.get(layer) or self.hooks.kinds[layer]

    def _project(self, factors: dict, scale: float = 1.0, unscaled: dict | None = None) -> dict:
        """The batch's factors with those of projected layers projected (decided on a layer's first
        batch: its stored form if the store holds it, else the capture's storage= request); a
        projected layer's `unscaled` factors are scaled first (and dropped from `unscaled`)."""
        if all(self.projected.get(layer, False) is None for layer in factors):
            return factors      # every layer decided, none projected: the usual exact capture's step
        out = {}
        undecided = {l: fs for l, fs in factors.items() if l not in self.projected}
        if undecided and self.projection.sketch_budget:
            self.projection.allocate({l: (self.hooks.kinds[l], self.hooks.modules[l],
                                          _scaled(fs, scale, (unscaled or {}).get(l, ())))
                                      for l, fs in undecided.items() if l not in self._registered()})
        for layer, fs in factors.items():
            if layer not in self.projected:
                self.projected[layer] = self.projection.decide(layer, self.hooks.kinds[layer],
                                                               self.hooks.modules[layer], fs, self._registered())
            if self.projected[layer] is None:
                out[layer] = fs
                continue
            if unscaled and layer in unscaled:
                fs = _scaled(fs, scale, unscaled.pop(layer))
            out[layer] = self.projected[layer].project(layer, self.hooks.modules[layer], fs)
        return out

    def _layer_rows(self, layer, fs, mode, ids, keeps, batch, scales: dict[str, float]
                    ) -> tuple[np.ndarray, dict[str, torch.Tensor], bool]:
        """(the kept ids, the layer's buffered factors, whether its suffix is the owner's very
        tensor); `scales`: {factor: the scale it is still to be multiplied by}."""
        kind, keep = self._kind(layer), keeps[layer]
        rows = None if keep is None or keep.all() else torch.from_numpy(np.nonzero(keep)[0])
        kept = ids if rows is None else ids[keep]
        held = self._held_storages(layer)
        if mode == "full":
            # the per-sample gradients are computed where the flush is written (the writer thread)
            # from copies of the whole batch's factors, exactly as inline
            copies = {k: self._copy(v, held, scales.get(k)) for k, v in fs.items()}
            return kept, _FullRows(kind, self._meta(layer), copies, rows, self._to_storage, self.recycled), False
        owner, suffix = self.suffix_of.get(layer), kind.suffix_name()
        if owner in batch and _same_rows(keeps[owner], keep):
            tensors = {k: self._rows(v, rows, held, scales.get(k)) for k, v in fs.items() if k != suffix}
            tensors[suffix] = batch[owner][1][suffix]    # no copy: the owner's rows are these rows
            return kept, tensors, True
        return kept, {k: self._rows(v, rows, held, scales.get(k)) for k, v in fs.items()}, False

    def _held_storages(self, layer: str) -> set[int] | None:
        """The storages of the tensors the hooks hold for the layer's calls (its inputs as the module
        saw them, its output gradients as autograd handed them over), or None when they hold none
        (then every factor is copied). A factor on any other storage was computed by the kind for
        this batch (a concatenation, the scaled gradient, a projection): nothing else references it,
        so it is buffered as it is instead of copied once more."""
        hooks = self.hooks
        if not hooks.inputs.get(layer):
            return None
        calls = hooks.inputs[layer]
        tensors = calls if all(isinstance(t, torch.Tensor) for t in calls) else _tensors(calls)
        held = {t.untyped_storage().data_ptr() for t in tensors}
        held.update(g.untyped_storage().data_ptr() for g in hooks.grads[layer].values())
        return held

    def _meta(self, layer: str):
        if layer not in self._metas:
            self._metas[layer] = self._kind(layer).meta(layer, self.hooks.modules[layer])
        return self._metas[layer]

    def _rows(self, v: torch.Tensor, rows: torch.Tensor | None, held: set[int] | None = None,
              scale: float | None = None) -> torch.Tensor:
        """The kept rows in the storage dtype (times `scale`, if given): a copy unless `v` is the
        kind's own result for this batch (see _held_storages), as the hooks' tensors may be the
        model's input or activations, which the caller may change in place before the flush is
        written. Copies go to tensors an earlier flush is done with (self.recycled)."""
        if rows is not None:
            return self._to_storage(v[rows] if scale is None else v[rows] * scale)
        v = v.detach()
        dtype = self.dtype if v.is_floating_point() else v.dtype
        if scale is None and _owned(v, held) and v.dtype == dtype and v.device.type == "cpu":
            return v
        return self.recycled.copy(v, dtype, scale)

    def _copy(self, v: torch.Tensor, held: set[int] | None, scale: float | None) -> torch.Tensor:
        """`v` (times `scale`, if given) in its own dtype on the CPU: a copy unless the kind made it."""
        v = v.detach()
        if scale is None and _owned(v, held) and v.device.type == "cpu":
            return v
        return self.recycled.copy(v, v.dtype, scale)

    def _to_storage(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", self.dtype if t.is_floating_point() else t.dtype)

    def _keeps(self, layers, ids: np.ndarray, listed: list[int]) -> dict[str, np.ndarray | None]:
        """{layer: mask of the ids it has neither stored for the checkpoint nor buffered, or None
        for all of them}. One set test settles the usual case (ids no layer has seen) for every
        layer at once; a resumed capture or a second epoch asks each layer."""
        for layer in layers:
            if layer not in self.stored:
                self.stored[layer] = (set(self.store.stored_ids(self.checkpoint, layer).tolist())
                                      if self._resumed() else set())
                self._claimed.update(self.stored[layer])
                self._before.update(self.stored[layer])
        if self._claimed.isdisjoint(listed):
            return dict.fromkeys(layers)
        self._warn_repeats(listed)
        if self._buffered is None:      # kept up to date from now until the next flush
            self._buffered = {}
            for batch in self.batches:
                for layer, (kept, _, _) in batch.items():
                    self._buffered.setdefault(layer, set()).update(kept.tolist())
        return {layer: self._new_rows(layer, ids, listed) for layer in layers}

    def _warn_repeats(self, listed: list[int]) -> None:
        """Once per capture: ids seen again in the same capture (a second epoch under one checkpoint)
        keep the factors of their first batch, which a user may not expect; a resumed capture's
        skipping of what an earlier run stored is silent, as it should be."""
        if self._warned_repeat:
            return
        again = [i for i in listed if i in self._claimed and i not in self._before]
        if again:
            self._warned_repeat = True
            warnings.warn(f"sample ids {again[:5]} were already captured for checkpoint '{self.checkpoint}' earlier "
                          "in this capture: a checkpoint keeps one set of factors per sample (from the first batch "
                          "that saw it), so their rows of this batch are not stored; capture each epoch under a "
                          "checkpoint of its own", MetaQLWarning, stacklevel=user_stacklevel())

    def _new_rows(self, layer: str, ids: np.ndarray, listed: list[int]) -> np.ndarray | None:
        """Ids this layer has neither stored for the checkpoint nor buffered (a resumed capture
        skips the others); None: all of them."""
        stored, buffered = self.stored[layer], self._buffered.get(layer, set())
        if stored.isdisjoint(listed) and buffered.isdisjoint(listed):
            return None
        return np.fromiter((i not in stored and i not in buffered for i in listed), bool, len(ids))

    def _shared_suffixes(self, factors) -> dict[str, str]:
        """{layer: earlier layer} for layers whose stored input is the very same tensor."""
        seen, shared = {}, {}
        for layer, fs in factors.items():
            name = self._kind(layer).suffix_name()
            if name is None or name not in fs or len(self.hooks.inputs[layer]) != 1:
                continue
            t = self.hooks.inputs[layer][0]   # the input as the module saw it (factors may be copies)
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if key in seen:
                shared[layer] = seen[key]
            else:
                seen[key] = layer
        return shared

    def _resumed(self) -> bool:
        """Whether the checkpoint held factors when this writer began (one query instead of one per
        layer; asked before this writer's first flush, so only earlier runs' shards count)."""
        if self._held is None:
            self._held = self.store.sql("SELECT count(*) FROM shards WHERE kind = 'factors' AND checkpoint = ?",
                                        [self.checkpoint]).fetchone()[0] > 0
        return self._held

    def _registered(self) -> dict[str, tuple[str, LayerMeta]]:
        """{layer: (storage mode, meta)} of the layers the store held when this writer began, read
        once: a capture of many layers asks for each one's mode."""
        if self._layers is None:
            self._layers = {r["name"]: (r["storage"], LayerMeta(**json.loads(r["meta"]))) for r in self.store.layers()}
        return self._layers

    def _mode(self, layer: str, fs: dict[str, torch.Tensor], shares_with: str | None) -> str:
        if layer not in self.modes and layer in self._registered():
            mode, stored_meta = self._registered()[layer]
            self.modes[layer] = mode
            self._stored[layer] = (stored_meta, mode)
            if mode == "factored" and stored_meta.extra.get("suffix_of"):
                self.suffix_of[layer] = stored_meta.extra["suffix_of"]
        if layer not in self.modes:
            kind, module = self._kind(layer), self.hooks.modules[layer]
            meta = kind.meta(layer, module)
            numbers = kind.stored_numbers(meta, {k: v[:1] for k, v in fs.items()})
            if shares_with and self.modes.get(shares_with) == "factored":
                meta.extra["suffix_of"] = shares_with
                # the shared input is stored once, by the layer it is shared with
                numbers -= int(np.prod(fs[kind.suffix_name()].shape[1:]))
            mode = self.store.register_layer(meta, kind.positions(meta, fs), numbers, kind.factored,
                                             self.projection.exact_mode(layer))
            self.modes[layer] = mode
            stored_meta, _ = self._stored[layer] = self.store.layer_meta(layer)
            if mode == "factored" and stored_meta.extra.get("suffix_of"):
                self.suffix_of[layer] = stored_meta.extra["suffix_of"]
        if layer in self.suffix_of and self.suffix_of[layer] != shares_with:
            raise InvalidInputException(
                f"layer '{layer}' stopped reading the same input as '{self.suffix_of[layer]}' "
                "mid-capture; capture them into separate stores or without sharing")
        return self.modes[layer]

    def flush(self, last: bool = False) -> None:
        """Writes every layer's buffered rows as one unit. The buffers are taken first, so a flush
        that fails or is interrupted is never written again (its ids are captured on resume).
        `last`: the capture's final flush. From then on no flush publishes its commit for readers
        (one still queued for the writer thread included): the finish_checkpoint that follows
        publishes them all at once (a snapshot copies the whole catalog: 40-180 ms on a small
        store, about 0.9 s at 3.3 million norm rows)."""
        if last and not self._finishing:
            self._finishing = True
            self.store.hold_publishing()
        batches, seen, self.batches, self.seen = self.batches, self.seen, [], []
        self._counts, self._buffered, self._buffer_bytes = {}, None, 0
        self._pending_full, self._pending_bytes = [], 0     # resolved by the flush's own write
        if not batches:
            return
        self.flushes += 1
        if not self.background:
            for layer, ids in self._write(self.store, batches, seen).items():
                self.stored[layer].update(ids.tolist())
            return
        self._start()
        # counted as stored at hand-over: a failed write stops the capture (BackgroundWriter.check)
        for layer in self._layers_in(batches):
            self.stored[layer].update(np.concatenate([b[layer][0] for b in batches if layer in b]).tolist())
        self._worker.submit(lambda store: self._write(store, batches, seen))

    def finished(self) -> None:
        """After the capture's finish_checkpoint (which published the catalog) or its failure: a
        commit from now on (a flush the writer thread still writes after a Ctrl-C at the exit)
        publishes itself again, and what committed is published if the finish did not."""
        self._finishing = False
        self.store.committed(force=False)     # two stat calls when the finish published

    def _resolve_full(self, fulls: list) -> None:
        """Full-stored layers' gradients of a batch, computed ahead of the flush (on the writer
        thread when there is one) so that a buffer holds them rather than the larger factors.
        The writer gets them a few MiB of factors at a time, not every step: each hand-over wakes
        the writer thread, whose turn at the GIL the training thread then waits out; a flush
        computes those still pending (_FullRows.tensors)."""
        if not fulls:
            return
        if not self.background:
            for f in fulls:
                f.resolve()
            return
        self._pending_full += fulls
        self._pending_bytes += sum(f.nbytes() for f in fulls)
        if self._pending_bytes >= FULL_HANDOVER_BYTES:
            self._hand_over_full()

    def _hand_over_full(self) -> None:
        fulls, self._pending_full, self._pending_bytes = self._pending_full, [], 0
        if fulls:
            self._start()
            self._worker.submit(lambda store: [f.resolve() for f in fulls], bounded=False)

    def take_kept_copies(self) -> None:
        """Starts from the copies the store's last capture left (Capture.__enter__: a writer built
        and never used, or a replay's, would drop them)."""
        kept = self.store.take_capture_copies()
        if kept is not None:
            self.recycled = kept

    def _start(self) -> None:
        if self._worker is None:
            from metaql.storage.writer import BackgroundWriter
            self._worker = BackgroundWriter(self.store, self.checkpoint)

    def check(self) -> None:
        """Raises the background writer's error (a flush it could not write), if any."""
        if self._worker is not None:
            self._worker.check()

    def close(self, raise_error: bool = True) -> None:
        """Waits for the background writer to write every flush handed to it; raises its error
        unless told not to. Leaves the recycled copies to the store's next capture, up to
        KEPT_COPIES_MAX_BYTES (a Capture the caller keeps would hold a flush's worth of memory)."""
        thread, self._worker = self._worker, None
        try:
            if thread is not None:
                thread.close(raise_error)
        finally:
            if thread is not None:
                self._wait_busy[0] += thread.waited
                self._wait_busy[1] += thread.busy
            self.store.keep_capture_copies(self.recycled.trimmed(KEPT_COPIES_MAX_BYTES))
            self.recycled = _Recycled()

    def writer_seconds(self) -> tuple[float, float]:
        """(seconds the training thread waited to hand flushes to the writer thread, seconds that
        thread spent writing), over this writer's life so far."""
        live = self._worker
        wait, busy = self._wait_busy
        return (wait + live.waited, busy + live.busy) if live is not None else (wait, busy)

    def _write(self, store: Store, batches, seen: list[int | None]) -> dict[str, np.ndarray]:
        """Writes the batches' rows of every layer as one unit; {layer: ids written}."""
        entries = [self._entry(layer, batches, seen) for layer in self._layers_in(batches)]
        self.give_back(batches)
        # the metas the catalog holds, as read when each layer's mode was settled: no round trip a flush
        store.write_factor_shards(self.checkpoint, entries, {e["layer"]: self._stored[e["layer"]] for e in entries},
                                  publish=lambda: not self._finishing)
        self.rows_written += len(np.unique(np.concatenate([e["ids"] for e in entries])))
        return {e["layer"]: e["ids"] for e in entries}

    def give_back(self, batches) -> None:
        """Hands a flush's copies (per-factor copies, packed blocks) to the next batches: called
        once the flush's entries hold concatenations of them."""
        self.recycled.give_back([t for b in batches for _, ts, _ in b.values() if not isinstance(ts, _FullRows)
                                 for t in ([ts.block] if isinstance(ts, _Packed) else ts.values())], flush=True)

    def _layers_in(self, batches) -> list[str]:
        return list(dict.fromkeys(layer for batch in batches for layer in batch))

    def _entry(self, layer: str, batches, seen: list[int | None]) -> dict:
        rows = [batch[layer] for batch in batches if layer in batch]
        ids = np.concatenate([r[0] for r in rows])
        owner, suffix = self.suffix_of.get(layer), self._kind(layer).suffix_name()
        shares = owner is not None and all(r[2] for r in rows) and np.array_equal(
            ids, np.concatenate([batch[owner][0] for batch in batches if owner in batch]))
        made = [_run_tensors(run) for run in _runs([r[1] for r in rows])]
        names = [k for k in made[0][0] if not (shares and k == suffix)]
        steps = [n for n, batch in zip(seen, batches) if layer in batch and n is not None]
        if len(made) == 1 and made[0][1]:       # one run's new tensors: nothing else holds them
            tensors = {k: made[0][0][k] for k in names}
        else:   # concatenated: the buffered copies go back to the next batches before the shard is written
            tensors = {k: _cat_rows([piece[k] for piece, _ in made]) for k in names}
        if layer in self._scaled or "G" in tensors:     # a gradient built at the flush may overflow float16 too
            self._check_scaled(layer, tensors)
        return dict(layer=layer, ids=ids, tensors=tensors,
                    storage=self.modes[layer], suffix_of=owner if shares else None,
                    seen=(min(steps), max(steps)) if steps else None)

    def _check_scaled(self, layer: str, tensors: dict[str, torch.Tensor]) -> None:
        """Raises if scaling a layer's finite gradients by the loss's reduction (the batch size), or
        storing the gradients built at the flush in the capture's dtype, overflowed."""
        names = ("G",) if "G" in tensors else self._kind(layer).gradient_factors
        if not all(_finite(tensors[k]) for k in names if k in tensors):
            raise InvalidInputException(
                f"layer '{layer}' has gradients that overflow to infinity once multiplied back by the batch size "
                "(the mean loss's reduction) or stored in the capture's dtype; nothing of this flush was stored "
                "(check the inputs and the lr; with dtype='float16', try 'bfloat16')")


class _Recycled:
    """Tensors a flush is done with (the batches' copies, once concatenated; a full-stored layer's
    factors, once turned into gradients), taken by the copies of the next batches. Copying into
    memory the process has touched costs a tenth of copying into new memory: 30 us against 300 us
    (126 page faults) for 512 KiB, the digits CNN's conv2 output gradient of a batch, and a buffer
    that keeps its batches until the flush got new memory for every copy (blocks that size go back
    to the system when freed). It keeps what the latest flush gave back (the shapes the next
    batches copy), replacing what is left of the one before, so it holds at most about one flush's
    worth: memory a flush used to free and the next one allocate again. Shared by two threads."""
    MARK = "_metaql_recycled"      # set on the tensors it made: only those are taken back

    def __init__(self):
        self._lock = threading.Lock()
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def copy(self, v: torch.Tensor, dtype: torch.dtype, scale: float | None = None) -> torch.Tensor:
        """`v` (times `scale`) in `dtype` on the CPU, in a tensor of its own: the same values as
        v.to("cpu", dtype, copy=True) or (v * scale).to(...)."""
        out = self._empty(tuple(v.shape), dtype)
        if scale is None:
            out.copy_(v)
        elif v.dtype == dtype and v.device.type == "cpu":
            torch.mul(v, scale, out=out)
        else:
            out.copy_(v * scale)
        return out

    def block(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat tensor of `numel` elements for a batch's factors (_Packed)."""
        return self._empty((numel,), dtype)

    def _empty(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            free = self._free.get((shape, dtype))
            if free:
                return free.pop()
        t = torch.empty(shape, dtype=dtype)
        setattr(t, self.MARK, True)
        return t

    def trimmed(self, max_bytes: int) -> "_Recycled | None":
        """Itself, holding at most `max_bytes` (what is over dropped), or None if it holds nothing."""
        with self._lock:
            kept, total = {}, 0
            for key, free in self._free.items():
                for t in free:
                    if total + t.nbytes <= max_bytes:
                        kept.setdefault(key, []).append(t)
                        total += t.nbytes
            self._free = kept
        return self if kept else None

    def give_back(self, tensors, flush: bool = False) -> None:
        """Takes back the tensors it made among `tensors` (nothing else may hold them); `flush`:
        they are a whole flush's, which replace what is left."""
        mine = {id(t): t for t in tensors if getattr(t, self.MARK, False)}    # a shared suffix or block once
        with self._lock:
            if flush:
                self._free = {}
            for t in mine.values():
                self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)


def _batch_bytes(batch: dict, stored: bool = False) -> int:
    """Bytes a buffered batch holds (a full-stored layer's factors until resolved; a suffix shared
    with another layer counted with each: an upper bound); `stored`: a packed layer's rows counted
    in the storage dtype (as the full path's copies are), not in the dtype its block holds them in."""
    total = 0
    for _, tensors, _ in batch.values():
        if isinstance(tensors, _Packed) and stored:
            total += tensors.numel * tensors.dtype.itemsize
        elif not isinstance(tensors, dict):
            total += tensors.held_bytes()
        else:
            total += sum(t.nbytes for t in tensors.values())
    return total


class _Packed:
    """A layer's rows of a settled capture's batch (ShardWriter._packed): a part of the block that
    holds the whole batch's factors in their own dtype, made into tensors where the flush is written:
    the gradient factors multiplied by the loss's scale (in place: the block is the capture's), then
    each converted to the storage dtype, the very operations and order of the full path's copies."""

    def __init__(self, block: torch.Tensor, layout: list[tuple[str, int, torch.Size, bool]], numel: int,
                 scale: float, dtype: torch.dtype):
        self.block, self.layout, self.scale, self.dtype = block, layout, scale, dtype
        self.numel = numel          # of the block's elements, the layer's; layout: (name, start, shape, scaled)
        self._tensors: dict[str, torch.Tensor] | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors = {}
            for name, start, shape, scaled in self.layout:
                v = self.block[start:start + math.prod(shape)].view(shape)
                if scaled and self.scale != 1.0:
                    v.mul_(self.scale)
                self._tensors[name] = v.to(self.dtype)
        return self._tensors

    def held_bytes(self) -> int:
        return self.numel * self.block.element_size()

    def same_layout(self, other: "_Packed") -> bool:
        """Its factors lie where the other's do, of the same shapes (each with a row axis: a run is cut
        by rows), scale and dtypes."""
        return (self.layout == other.layout and self.scale == other.scale and self.dtype == other.dtype
                and self.block.dtype == other.block.dtype and all(shape for _, _, shape, _ in self.layout))


def _runs(parts: list) -> list[list]:
    """A layer's rows of a flush, batch by batch, as runs of consecutive batches made into
    tensors together: packed batches of one layout and scale (the steps of an epoch but its
    last), and each other batch on its own."""
    runs: list[list] = []
    for p in parts:
        last = runs[-1][-1] if runs else None
        if isinstance(p, _Packed) and isinstance(last, _Packed) and p.same_layout(last):
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def _run_tensors(run: list) -> tuple[dict[str, torch.Tensor], bool]:
    """({factor: its rows over the run}, whether they are new tensors nothing else holds). Packed
    batches are stacked once and each factor cut from the stack: a few operations a flush instead
    of a view, a product and a conversion per factor and batch, which on the writer thread held the
    GIL the training step waits for (a tenth of an MLP's flush)."""
    first = run[0]
    if not isinstance(first, _Packed):
        return (first if isinstance(first, dict) else first.tensors()), False
    if len(run) == 1:
        return first.tensors(), False
    start = first.layout[0][1]
    stacked = torch.stack([p.block[start:start + p.numel] for p in run])
    out = {}
    for name, at, shape, scaled in first.layout:
        v = stacked[:, at - start:at - start + math.prod(shape)].reshape(len(run) * shape[0], *shape[1:])
        if scaled and first.scale != 1.0:
            v = v * first.scale     # the full path's order: scaled in the factor's dtype, then converted
        out[name] = v.to(first.dtype)
    return out, True


class _FullRows:
    """A full-stored layer's batch: copies of its factors, turned into per-sample gradients (and
    the kept rows, in the storage dtype) when the flush is written."""

    def __init__(self, kind, meta, factors, rows, to_storage, recycled=None):
        self.kind, self.meta, self.factors, self.rows, self.to_storage = kind, meta, factors, rows, to_storage
        self.recycled = recycled

    def resolve(self) -> None:
        """Computes the gradients and drops the factors (larger than them: why the layer is stored full)."""
        if self.factors is not None:
            g = self.kind.full(self.meta, self.factors)
            self.g = self.to_storage(g if self.rows is None else g[self.rows])
            if self.recycled is not None:     # a factor that is g itself ("G", stored as it is) stays
                kept = self.g.untyped_storage().data_ptr()
                self.recycled.give_back([f for f in self.factors.values() if f.untyped_storage().data_ptr() != kept])
            self.factors = None

    def tensors(self) -> dict[str, torch.Tensor]:
        self.resolve()
        return {"G": self.g}

    def nbytes(self) -> int:
        """Bytes of the factors it holds until resolved."""
        return sum(v.numel() * v.element_size() for v in self.factors.values()) if self.factors is not None else 0

    def held_bytes(self) -> int:
        """Bytes it holds: its factors until resolved, then its gradients."""
        return self.nbytes() if self.factors is not None else self.g.numel() * self.g.element_size()


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside nn.DataParallel: its layers' names and weights are the model's own (no
    'module.' prefix), so replay rebuilds it. On several devices DataParallel runs replicas in
    threads, each on a slice of the batch, and their calls would reach the hooks in any order:
    refused rather than stored against the wrong ids."""
    if not isinstance(model, nn.DataParallel):
        return model
    if len(model.device_ids or []) > 1:
        raise InvalidInputException(
            f"nn.DataParallel over {len(model.device_ids)} devices splits each batch among threads, whose "
            "layer calls MetaQL cannot match to sample ids; capture with the model on one device (or wrapped "
            "in DataParallel(device_ids=[0])), or train with DistributedDataParallel and capture on one rank")
    return model.module


def _owned(v: torch.Tensor, held: set[int] | None) -> bool:
    """Whether `v` is on none of the storages the hooks hold (see ShardWriter._held_storages) and
    spans the whole of its own (a slice of a larger result would keep all of it alive until the flush)."""
    if held is None:
        return False
    storage = v.untyped_storage()
    return storage.data_ptr() not in held and storage.nbytes() == v.numel() * v.element_size()


def _same_rows(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Whether two keep masks (None: every row) keep the same rows."""
    if a is None or b is None:
        return (a is None or bool(a.all())) and (b is None or bool(b.all()))
    return np.array_equal(a, b)


def _tensors(value):
    from metaql.storage.hooks import _tensors as tensors
    return tensors(value)


def _check_finite(factors: dict[str, dict[str, torch.Tensor]]) -> None:
    for layer, fs in factors.items():
        if any(v.is_floating_point() and not _finite(v) for v in fs.values()):
            raise InvalidInputException(f"layer '{layer}' has NaN or infinite activations or gradients in "
                                        "this batch; nothing of it was stored (check the inputs and the lr)")


def _finite(v: torch.Tensor) -> bool:
    """Whether every element is finite. A NaN or an infinity makes the sum NaN or infinite, so a
    finite sum settles it in one vectorised pass (70x cheaper than isfinite().all(), which builds a
    mask), read as a Python float (torch.isfinite on the sum cost 14 us, 4x the sum); a sum that
    overflowed on finite numbers is told apart by the exact check."""
    total = v.sum(dtype=torch.float32) if v.element_size() < 4 else v.sum()
    return math.isfinite(total.item()) or bool(torch.isfinite(v).all())


def _in_sorted(ids: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """A mask of the ids found in a sorted array (a binary search each: B log N, not a set of N)."""
    pos = np.minimum(np.searchsorted(sorted_ids, ids), max(len(sorted_ids) - 1, 0))
    return (sorted_ids[pos] == ids) if len(sorted_ids) else np.zeros(len(ids), bool)


def _cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    from metaql.storage.replay import _cat_padded
    return _cat_padded(parts)


class Capture:
    def __init__(self, store: Store, model: nn.Module, layers=None, checkpoint: str = "ckpt0",
                 lr: float = 1.0, epoch: int | None = None, step: int | None = None,
                 factory: str | None = None, kwargs: dict | None = None, shard_size: int = 2048,
                 dtype: str = "float32", storage: dict[str, str] | str | None = None, task=None,
                 background: bool = True, max_error=None, proj_dim: int | None = None, proj_seed: int = 0,
                 sketch_dim: int | None = None, sketch_budget: int | None = None, sketch_dist: str = "gaussian",
                 sketch_bits: int | None = None):
        from metaql.storage.tasks import make_task, task_spec
        model = unwrapped(model)
        self.store, self.model, self.checkpoint = store, model, checkpoint
        spec, trusted_loss = task_spec(task)
        self.task = make_task(spec, trusted_loss)
        self.hooks = LayerHooks(select_layers(model, layers))
        self._ckpt_args = dict(lr=lr, epoch=epoch, step=step, factory=factory, kwargs=kwargs, task=task)
        # background=False writes each flush in the training thread (the same shards, byte for byte)
        # storage='projected' | 'auto' with max_error= or proj_dim=: projected layers (metaql.approx)
        from metaql.approx.capture import ProjectionRequest
        self.writer = ShardWriter(store, checkpoint, self.hooks, shard_size, dtype, storage, background,
                                  ProjectionRequest(storage, max_error, proj_dim, proj_seed, sketch_dim,
                                                    sketch_budget, sketch_dist, sketch_bits))
        self.samples = 0
        self.batches_seen = 0       # training batches so far: the weights moved after each one
        self._registered: np.ndarray | None = None     # sorted registered sample ids, read at need
        self._registered_span: tuple[int, int] | None = None
        # off only for another rank's part store (distributed/ddp.py): the samples are in rank 0's catalog
        self.require_registered = True
        self._state = "new"         # "open" inside the `with`, "closed" after it
        self._began: float | None = None
        self._ended: float | None = None

    def __enter__(self) -> "Capture":
        self.store.begin_checkpoint(self.checkpoint, self.model, **self._ckpt_args)
        self._set_registered(self.store.registered_ids() if self.require_registered else None)
        self.hooks.attach()
        self.writer.take_kept_copies()
        self._state = "open"
        self.store.open_captures.add(self.checkpoint)     # DROP CHECKPOINT refuses it until __exit__
        self._began = time.perf_counter()
        return self

    @property
    def stats(self) -> dict:
        """What the capture did so far: training batches and samples seen, flushes, bytes of
        factors buffered for writing, seconds since it began (to its end once exited), and of
        those, the seconds the training thread waited to hand a flush to the writer thread
        (`writer_wait_s`: the disk or the writer is the bottleneck when this grows) and the seconds
        the writer thread spent writing (`writer_busy_s`)."""
        wait, busy = self.writer.writer_seconds()
        end = self._ended if self._ended is not None else time.perf_counter()
        return {"batches": self.batches_seen, "samples": self.samples, "flushes": self.writer.flushes,
                "factor_bytes": self.writer.factor_bytes, "seconds": 0.0 if self._began is None else end - self._began,
                "writer_wait_s": wait, "writer_busy_s": busy}

    def _warn_if_writer_bound(self) -> None:
        """Says so when training spent a noticeable share of the capture waiting for the writer:
        a silent slowdown otherwise, which a user would blame on the model or on MetaQL's hooks."""
        st = self.stats
        wait, total = st["writer_wait_s"], st["seconds"]
        if wait > max(WRITER_WAIT_WARN_S, WRITER_WAIT_WARN_SHARE * total):
            warnings.warn(
                f"capture '{self.checkpoint}': training waited {wait:.1f} s of {total:.1f} s ({100 * wait / total:.0f}%) "
                f"for the capture's writer thread, which wrote {st['factor_bytes'] / 2**20:.0f} MiB of factors in "
                f"{st['flushes']} flushes: the disk or the writer is the bottleneck; capture fewer layers (layers=[...]), "
                "store half precision (dtype='float16'), put the store on a faster disk, or leave the writer a free "
                "core (cap.stats has the figures)", MetaQLWarning, stacklevel=user_stacklevel())

    def _warn_if_nothing_seen(self) -> None:
        """A loop that called loss.backward() instead of cap.backward() trains as usual and stores
        nothing: without a word, the checkpoint would look captured."""
        if self.batches_seen == 0:
            warnings.warn(
                f"capture '{self.checkpoint}' saw no batch: nothing but the weights was stored. In the training "
                "loop call cap.backward(loss, ids) instead of loss.backward() (or cap.record(ids) after a "
                "framework's own backward pass); to save weights for con.replay alone, con.checkpoint(model, name, "
                "lr) says so", MetaQLWarning, stacklevel=user_stacklevel())

    def _require_open(self, call: str) -> None:
        """Outside its `with` a capture has no hooks on the model: a batch would train and store
        nothing, without a word (checkpoint never begun, or already finished)."""
        if self._state == "open":
            return
        when = ("before its `with` began" if self._state == "new" else
                f"after its `with` ended (checkpoint '{self.checkpoint}' is finished)")
        raise ProgrammingError(f"cap.{call}() was called {when}, so nothing of this batch would be captured "
                               f"and the loss was not backpropagated; call it inside "
                               f"`with con.capture(model, ..., checkpoint='{self.checkpoint}') as cap:`")

    def loss(self, output, targets=None, inputs=None, attention_mask=None) -> torch.Tensor:
        """Per-sample losses of the capture's task, the very loss every later replay uses:
        `cap.backward(cap.loss(model(x), y), ids)`. A causal LM reads its labels from `inputs` (the
        input ids) unless `targets` are given."""
        if inputs is None and self.task.name == "causal_lm":
            inputs = targets
        return self.task.losses(output, inputs, targets, "label", attention_mask)

    def backward(self, loss: torch.Tensor, ids, reduction: str = "mean") -> torch.Tensor:
        """Backpropagates `loss` (as loss.backward() would) and keeps each sample's factors.

        `loss` is the batch loss with the given reduction ('mean' or 'sum'), or a vector of
        per-sample losses (then reduced with `reduction` for the backward pass). A refused batch
        stores nothing and leaves the capture ready for the next one. Raises the background
        writer's error, if a flush failed, before anything else."""
        self._require_open("backward")
        try:
            self.writer.check()
            return self._backward(loss, ids, reduction)
        finally:
            self.hooks.clear()      # the forward pass's inputs: stale for the next batch either way
            self.batches_seen += 1  # a refused batch too: the caller may still step the optimizer

    def _backward(self, loss: torch.Tensor, ids, reduction: str) -> torch.Tensor:
        ids, listed = _unique_ids(ids)
        if reduction not in ("mean", "sum"):
            raise InvalidInputException("reduction must be 'mean' or 'sum'")
        if loss.dim() == 1:
            if loss.shape[0] != len(ids):
                raise InvalidInputException(f"{loss.shape[0]} per-sample losses for {len(ids)} ids")
            loss = loss.mean() if reduction == "mean" else loss.sum()
        elif loss.dim() != 0:
            raise InvalidInputException("loss must be a scalar or a vector of per-sample losses")
        if not math.isfinite(loss.item()):     # a Python float: torch.isfinite costs 14 us more
            raise InvalidInputException("the loss is NaN or infinite; nothing was captured for this batch")
        loss.backward()
        # d(mean)/d(out_i) is d(loss_i)/d(out_i) / B: scale back to each sample's own loss
        self._keep_factors(ids, float(len(ids)) if reduction == "mean" else 1.0, listed)
        return loss

    def record(self, ids, scale: float = 1.0) -> None:
        """Keeps each sample's factors of a backward pass that a framework ran itself (the Hugging
        Face Trainer, Lightning; see metaql.integrations). `scale` is 1 / (d backpropagated loss /
        d loss_i): it turns the gradients at each layer's output into those of each sample's own
        loss. A refused batch stores nothing and leaves the capture ready for the next one."""
        self._require_open("record")
        try:
            self.writer.check()
            ids, listed = _unique_ids(ids)
            if not (np.isfinite(scale) and scale > 0):
                raise InvalidInputException(f"the loss scale must be a positive finite number, got {scale!r}")
            self._keep_factors(ids, float(scale), listed)
        finally:
            self.hooks.clear()
            self.batches_seen += 1

    def _require_registered(self, ids: np.ndarray, listed: list[int]) -> None:
        """Factors of ids the catalog does not know belong to no split or set, so no query reaches
        them (con.verify flags them): the batch is refused. Samples registered while the capture
        runs are found by reading the ids again when one is new."""
        if self._registered_span is not None and self._registered_span[0] <= min(listed) \
                and max(listed) <= self._registered_span[1]:
            return      # every id lies in a run with no gaps: no search (done every training step)
        known = None if self._registered is None else _in_sorted(ids, self._registered)
        if known is None or not known.all():
            self._set_registered(self.store.registered_ids())
            known = _in_sorted(ids, self._registered)
        missing = ids[~known]
        if len(missing):
            raise InvalidInputException(
                f"{len(missing)} of the {len(ids)} ids of this batch are not registered samples (e.g. "
                f"{missing[:3].tolist()}); nothing of this batch was stored: register them first with "
                "con.add_samples(ids, split, labels, inputs)")

    def _set_registered(self, ids: np.ndarray | None) -> None:
        """Keeps the sorted registered ids, and their first and last when they are a run with no gaps."""
        self._registered = ids
        contiguous = ids is not None and len(ids) and int(ids[-1]) - int(ids[0]) + 1 == len(ids)
        self._registered_span = (int(ids[0]), int(ids[-1])) if contiguous else None

    def _keep_factors(self, ids: np.ndarray, scale: float, listed: list[int]) -> None:
        if self.require_registered and listed:
            self._require_registered(ids, listed)
        # hooks.factors refuses (or, under a pattern, skips on the first batch) a layer called on
        # fewer rows than the batch, such as BERT's position embeddings: see LayerHooks._broadcast
        factors, unscaled = self.hooks.factors(scale=scale, deferred=True)
        for layer, fs in factors.items():
            rows = next(iter(fs.values())).shape[0]
            if rows != len(ids):
                raise InvalidInputException(f"layer '{layer}' saw a batch of {rows} but {len(ids)} ids were given; "
                                            "nothing of this batch was stored (give one id per sample of the batch)")
        self.writer.add(ids, factors, seen=self.batches_seen, checked=True, scale=scale, unscaled=unscaled,
                        listed=listed)
        self.samples += len(ids)

    def __exit__(self, exc_type, exc, tb) -> None:
        complete = False
        try:
            try:
                self.writer.flush(last=True)
            finally:
                # drains the writer; its error is raised unless another one is already on its way
                self.writer.close(raise_error=exc_type is None)
            complete = exc_type is None
        finally:
            self._state = "closed"
            self.store.open_captures.discard(self.checkpoint)
            self._ended = time.perf_counter()
            self.hooks.detach()
            try:
                self.store.finish_checkpoint(self.checkpoint, "complete" if complete else "partial")
            finally:
                self.writer.finished()
        if complete:
            self._warn_if_writer_bound()
            self._warn_if_nothing_seen()


def _unique_ids(ids) -> tuple[np.ndarray, list[int]]:
    """(a batch's ids as a new int64 array, the same as a list), refused if any repeats."""
    ids = _as_ids(ids)
    listed = ids.tolist()
    check_unique_ids(ids, listed)
    return ids, listed


def check_unique_ids(ids: np.ndarray, listed: list | None = None) -> None:
    listed = ids.tolist() if listed is None else listed
    if len(set(listed)) == len(listed):     # a set of Python ints: 10x faster than np.unique on a batch
        return
    values, counts = np.unique(ids, return_counts=True)
    raise InvalidInputException(
        f"sample ids {values[counts > 1][:5].tolist()} repeat within one batch; a sample's factors are "
        "stored once per checkpoint, so pass each id once per cap.backward call")


def replay_into_store(store: Store, checkpoint: str, ids, layers=None, target: str = "label",
                      batch_size: int = 256, shard_size: int = 2048, dtype: str = "float32",
                      progress=None, storage: dict[str, str] | None = None) -> int:
    """Computes exact factors of registered samples at a saved checkpoint and stores them.
    ``storage`` overrides the space formula per layer ({layer: 'factored' | 'full'}), as in capture.
    Inputs are read from the store a batch at a time and factors written a shard at a time, so
    memory does not grow with the number of samples."""
    from metaql.storage.replay import replay_batches, stored_batches

    ids = _as_ids(ids)
    from metaql.storage.tasks import task_at
    model, task = store.model_at(checkpoint), task_at(store, checkpoint)
    labels = task.stored_targets(store, ids, target)
    hooks = LayerHooks(select_layers(model, replayed_layers(store, model, checkpoint, layers)))
    writer = ShardWriter(store, checkpoint, hooks, shard_size, dtype, storage)
    batches = replay_batches(model, hooks, stored_batches(store, ids, labels, batch_size), target, task)
    for pos, factors in (progress(batches, total=-(-len(ids) // batch_size), desc=f"replay {checkpoint}")
                         if progress else batches):
        writer.add(ids[pos], factors)
    writer.flush()
    store.finish_repair(checkpoint)     # complete again once what con.verify(repair=True) dropped is back
    return writer.rows_written


def replayed_layers(store: Store, model: nn.Module, checkpoint: str, layers):
    """`layers` as given, else the layers the store already holds (a replay fills in what a capture
    stored, not every layer of the model), else every layer ('*') of a store that holds none."""
    if layers is not None:
        return layers
    held = [row["name"] for row in store.layers()]
    if not held:
        return "*"
    names = {n for n, _ in model.named_modules()}
    lacking = [n for n in held if n not in names]
    if lacking:
        from metaql.errors import CatalogException
        raise CatalogException(
            f"the store holds layers {lacking[:5]} that the model of checkpoint '{checkpoint}' lacks; attach the "
            "model the store was captured with (con.attach_model) or pass layers=[...] to con.replay")
    return held


def _scaled(factors: dict, scale: float, names) -> dict:
    """A layer's factors with those still unscaled (`names`) multiplied by `scale`, as stored."""
    return {k: v * scale if k in names else v for k, v in factors.items()} if names else factors
