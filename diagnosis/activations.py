"""Activations in the store: forward-hook capture by replay at a checkpoint, and reading them back.

A neuron is a unit of a layer whose output is (N, units), or a channel (axis 1) of a layer whose
output has more axes (a convolution's (N, C, H, W)); the channel's value is the spatial max or mean
of its map (`reduce`, recorded in the shard row's `storage` column; 'none' when nothing was reduced).
Activations are shard files of kind 'activations' in the same `shards` table as factors, written
through the store's crash-safe path, so no catalog table or column is added and old stores read
as before.

Replay runs the checkpoint's model in eval mode under no_grad: the activations are those the model
computes at those weights, not the training-mode ones of the training loop.

Reuse: where a layer's output is the very tensor another layer (a linear one, stored factored)
takes as input, the store already holds it as that layer's factor X when its factors were replayed
at the same checkpoint. Such factor shards are named as activation rows (bytes 0) instead of being
written again; a probe batch checks both that the tensor is the same object and that the stored
rows equal fresh ones (training-loop factors, captured in train mode at moving weights, do not,
and are then not reused).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn

from metaql.errors import CatalogException, InvalidInputException
from metaql.storage.catalog import require_name
from metaql.storage.inputs import call_model

REDUCTIONS = ("max", "mean")
SHARD_ROWS = 4096


def neuron_values(output: torch.Tensor, reduce: str) -> tuple[torch.Tensor, str]:
    """(N, neurons) float32 of a layer's output, and the reduction applied ('none' for 2-D)."""
    if reduce not in REDUCTIONS:
        raise InvalidInputException(f"reduce= must be one of {', '.join(REDUCTIONS)}, not {reduce!r}")
    out = output.detach()
    if out.dim() == 2:
        return out.float(), "none"
    if out.dim() < 2:
        raise InvalidInputException(f"a layer output of shape {tuple(out.shape)} has no neurons axis; "
                                    "pick a layer whose output is (batch, units) or (batch, channels, ...)")
    flat = out.flatten(2)
    return (flat.amax(2) if reduce == "max" else flat.mean(2)).float(), reduce


def resolve_checkpoint(store, checkpoint: str | None) -> str:
    names = [c["name"] for c in store.checkpoints()]
    if not names:
        raise CatalogException("the store has no checkpoint; register one (con.checkpoint or con.capture) first")
    if checkpoint in (None, "", "last"):
        return names[-1]
    require_name("checkpoint", str(checkpoint), names)
    return str(checkpoint)


def capture_activations(store, layers: Iterable[str] | str, ids, checkpoint: str | None = None,
                        reduce: str = "max", batch_size: int = 256, reuse: bool = True,
                        shard_size: int = SHARD_ROWS, progress=None) -> dict[str, int]:
    """Stores the activations of `layers` for registered samples `ids` at `checkpoint` (default the
    last one); ids already stored for a (layer, reduction) are skipped. Returns {layer: rows now
    held for these ids by new files}, with reused rows counted under reused_rows(...)."""
    store._writable()
    checkpoint = resolve_checkpoint(store, checkpoint)
    layers = [layers] if isinstance(layers, str) else list(layers)
    if not layers:
        raise InvalidInputException("capture_activations needs at least one layer")
    if reduce not in REDUCTIONS:
        raise InvalidInputException(f"reduce= must be one of {', '.join(REDUCTIONS)}, not {reduce!r}")
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    model = store.model_at(checkpoint).eval()
    modules = dict(model.named_modules())
    for name in layers:
        require_name("layer", name, [n for n in modules if n])
    todo = {name: ids[~np.isin(ids, stored_activation_ids(store, checkpoint, name, reduce))] for name in layers}
    if reuse:
        for name in layers:
            todo[name] = _reuse_factor_inputs(store, model, modules, checkpoint, name, todo[name])
    needed = np.unique(np.concatenate([t for t in todo.values()])) if todo else ids
    written = {name: 0 for name in layers}
    if len(needed) == 0:
        return written
    wanted = {name: np.asarray(todo[name]) for name in layers}
    buffers: dict[str, list] = {name: [] for name in layers}
    batches = store.input_batches(needed, batch_size)
    if progress is not None:
        batches = progress(batches, total=-(-len(needed) // batch_size), desc=f"activations {checkpoint}")
    for pos, outputs in _forward_batches(model, {n: modules[n] for n in layers}, batches):
        rows_ids = needed[np.asarray(pos)]
        for name, out in outputs.items():
            values, how = neuron_values(out, reduce)
            keep = np.isin(rows_ids, wanted[name])
            if keep.any():
                buffers[name].append((rows_ids[keep], values[torch.from_numpy(keep)], how))
            if sum(len(b[0]) for b in buffers[name]) >= shard_size:
                written[name] += _flush(store, checkpoint, name, buffers[name])
    for name in layers:
        written[name] += _flush(store, checkpoint, name, buffers[name])
    return written


def _forward_batches(model: nn.Module, modules: dict[str, nn.Module], batches):
    """Yields (positions, {layer: output}) per batch: forward hooks only, no gradient."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(_keeper(outputs, name)) for name, m in modules.items()]
    try:
        with torch.no_grad():
            for pos, x in batches:
                outputs.clear()
                call_model(model, x)
                missing = [n for n in modules if n not in outputs]
                if missing:
                    raise InvalidInputException(f"layer(s) {missing} did not run in the model's forward pass; "
                                                "name layers the forward pass calls")
                yield pos, dict(outputs)
    finally:
        for h in handles:
            h.remove()


def _keeper(outputs: dict, name: str):
    def hook(module, inputs, output):
        if isinstance(output, tuple):
            output = output[0]
        if not isinstance(output, torch.Tensor):
            raise InvalidInputException(f"layer '{name}' returns {type(output).__name__}, not a tensor; "
                                        "name a layer whose output is a tensor")
        # a module called twice in one pass (shared weights): the first call's output is kept
        outputs.setdefault(name, output)
    return hook


def _flush(store, checkpoint: str, layer: str, buffer: list) -> int:
    if not buffer:
        return 0
    ids = np.concatenate([b[0] for b in buffer])
    values = torch.cat([b[1] for b in buffer])
    how = buffer[0][2]
    buffer.clear()
    store.write_activation_shard(checkpoint, layer, ids, values, how)
    return len(ids)


# ---- reuse of stored layer inputs -------------------------------------------------------------
def _reuse_factor_inputs(store, model, modules, checkpoint: str, layer: str, ids: np.ndarray) -> np.ndarray:
    """Names the factor shards that hold `layer`'s output as a consumer's input X (see the module
    docstring); returns the ids still to compute."""
    if len(ids) == 0:
        return ids
    for consumer, rows in _factored_linear_shards(store, checkpoint).items():
        if consumer not in modules or consumer == layer:
            continue
        # factors captured in training saw weights that moved after each batch: only those replayed
        # at the checkpoint's weights (seen_from_batch NULL) can be its activations, and each shard
        # is probed (a store written before seen_* was recorded says NULL for both)
        held = [r for r in _shards_with(store, rows, ids) if r.get("seen_from_batch") is None
                and _same_tensor_and_values(store, model, modules[layer], modules[consumer], r)]
        if not held:
            continue
        store.reference_activation_shards(checkpoint, layer, [_x_owner(store, r) for r in held])
        covered = np.concatenate([store._shard_ids(r["file"]) for r in held])
        ids = ids[~np.isin(ids, covered)]
        if len(ids) == 0:
            break
    return ids


def _factored_linear_shards(store, checkpoint: str) -> dict[str, list[dict]]:
    kinds = {l["name"]: (l["kind"], l["storage"]) for l in store.layers()}
    out: dict[str, list[dict]] = {}
    for row in store.factor_shards(checkpoint, None):
        if kinds.get(row["layer"]) == ("linear", "factored"):
            out.setdefault(row["layer"], []).append(row)
    return out


def _shards_with(store, rows: list[dict], ids: np.ndarray) -> list[dict]:
    return [r for r in rows if np.isin(store._shard_ids(r["file"]), ids).any()]


def _x_owner(store, row: dict) -> dict:
    """The shard row whose file holds X: the row itself, or the layer whose shard it shares X with."""
    if not row.get("suffix_file"):
        return row
    owner = store.db.execute("SELECT * FROM shards WHERE file = ? AND kind = 'factors'", [row["suffix_file"]]).fetchone()
    cols = [d[0] for d in store.db.description]
    return dict(zip(cols, owner))


def _same_tensor_and_values(store, model, producer: nn.Module, consumer: nn.Module, row: dict) -> bool:
    """One probe batch (up to 32 of the shard's first samples and 32 of its last): the producer's
    output is the consumer's input object, with one row per sample, and the stored X equals it."""
    sids, tensors = store.shard_tensors(row)
    stored = tensors.get("X")
    if stored is None or stored.dim() != 3 or stored.shape[1] != 1:
        return False
    take = np.unique(np.concatenate([np.arange(min(32, len(sids))), np.arange(max(0, len(sids) - 32), len(sids))]))
    seen: dict[str, object] = {}
    h1 = producer.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    h2 = consumer.register_forward_hook(lambda m, i, o: seen.setdefault("in", i[0] if i else None))
    try:
        pos_x = next(iter(store.input_batches(sids[take], len(take))))
        with torch.no_grad():
            call_model(model, pos_x[1])
    finally:
        h1.remove()
        h2.remove()
    out = seen.get("out")
    if out is None or out is not seen.get("in") or out.dim() != 2:
        return False
    order = np.asarray(pos_x[0])
    fresh = out.float()
    kept = stored[torch.from_numpy(take[order])][:, 0, :].float()
    tol = 1e-5 if stored.dtype == torch.float32 else 1e-2
    return bool(torch.allclose(fresh, kept, rtol=tol, atol=tol))


# ---- reading ---------------------------------------------------------------------------------
def stored_activation_ids(store, checkpoint: str, layer: str, reduce: str) -> np.ndarray:
    rows = _rows_for(store, checkpoint, layer, reduce)
    parts = [store._shard_ids(r["file"]) for r in rows]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def _rows_for(store, checkpoint: str, layer: str, reduce: str) -> list[dict]:
    return [r for r in store.activation_shards(checkpoint, layer) if r["storage"] in (reduce, "none")]


def read_activations(store, checkpoint: str, layer: str, ids, reduce: str = "max") -> tuple[np.ndarray, np.ndarray]:
    """(ids, (N, neurons) float32) of the stored activations of `ids`, in the order of sorted ids;
    raises naming the missing ids' count and the call that captures them."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    rows = _rows_for(store, checkpoint, layer, reduce)
    if not rows:
        held = sorted({(r["layer"], r["checkpoint"]) for r in store.activation_shards()})
        raise CatalogException(
            f"no activations of layer '{layer}' ({reduce}) are stored at checkpoint '{checkpoint}'"
            f" (stored: {', '.join(f'{l}@{c}' for l, c in held[:8]) or 'none'}); capture them first: "
            f"con.capture_activations(layers=['{layer}'], samples=..., checkpoint='{checkpoint}', reduce='{reduce}')")
    found_ids, found_vals = [], []
    for r in rows:
        sids, tensors = store.shard_tensors(r)
        hit = np.isin(sids, ids)
        if not hit.any():
            continue
        t = tensors["A"] if "A" in tensors else tensors["X"][:, 0, :]
        found_ids.append(sids[hit])
        found_vals.append(t[torch.from_numpy(hit)].float().numpy())
    all_ids = np.concatenate(found_ids) if found_ids else np.zeros(0, np.int64)
    uniq, first = np.unique(all_ids, return_index=True)
    missing = len(ids) - int(np.isin(ids, uniq).sum())
    if missing:
        raise CatalogException(
            f"{missing} of the {len(ids)} samples have no stored activations of layer '{layer}' ({reduce}) at "
            f"checkpoint '{checkpoint}'; capture them: con.capture_activations(layers=['{layer}'], samples=<set>, "
            f"checkpoint='{checkpoint}', reduce='{reduce}')")
    values = np.concatenate(found_vals)[first]
    keep = np.isin(uniq, ids)
    return uniq[keep], values[keep]
