"""Where the gradients RBC and GBC cluster come from, as factor blocks (pivotal.gradients).

RBC (Eq. 11-12): the last linear layer's gradient of softmax cross-entropy is (p - onehot(y)) x h^T,
with h its input and p the softmax of its output: a forward pass gives both factors. GBC (Eq. 13-14):
every layer's factors, stored by capture (the whole gradient) or replayed (the label-free part),
importance-sampled by layer with probability A(l)/A.

The label-free part: for cross-entropy, grad f = sum_c p_c grad z_c - grad z_y, and the first term
is the gradient of logsumexp(z); it needs no label, so noisy labels do not steer the selection.
RBC's label-free D is p. Checkpoints are averaged: each block is scaled by 1/T, so the squared
distances are the mean over the cached checkpoints of the per-checkpoint distances.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from metaql.errors import BinderException, InvalidInputException
from metaql.pivotal.gradients import CHUNK, Block, FactoredGradients
from metaql.storage.hooks import LayerHooks, watched_modules
from metaql.storage.inputs import call_model
from metaql.storage.layers import kind_named
from metaql.storage.layers.base import LayerMeta
from metaql.storage.replay import replay_batches, stored_batches
from metaql.storage.tasks import Classification, model_output, task_at

FREE = "label_free"     # the replay target: logsumexp of the logits


class LabelFreeTask(Classification):
    """Classification whose replay loss is the label-free part of cross-entropy: logsumexp(z)."""

    def check_target(self, target: str) -> None:
        if target != FREE:
            super().check_target(target)

    def losses(self, output, inputs, targets, target="label", attention_mask=None):
        if target != FREE:
            return super().losses(output, inputs, targets, target, attention_mask)
        z = model_output(output)
        return torch.logsumexp(z.reshape(z.shape[0], -1), dim=1)


def classification_at(store, ckpt: str) -> Classification:
    """The checkpoint's task, which must be softmax cross-entropy (the label-free part and Eq. 12 are its)."""
    task = task_at(store, ckpt)
    if not isinstance(task, Classification):
        raise InvalidInputException(f"pivotal samples and re-weighting need a classification model (softmax "
                                    f"cross-entropy); checkpoint '{ckpt}' trains a {task.name} task")
    return task


def labels_of(store, ckpt: str, ids: np.ndarray) -> torch.Tensor:
    return classification_at(store, ckpt).stored_targets(store, ids, "label").long()


def last_linear(model: nn.Module, layers) -> tuple[str, nn.Linear]:
    """The layer RBC reads: the one named in layers=, else the model's last nn.Linear."""
    named = dict(model.named_modules())
    if layers not in (None, "*", ("*",), ["*"]):
        names = [layers] if isinstance(layers, str) else list(layers)
        if len(names) != 1 or names[0] not in named:
            raise BinderException(f"method='rbc' reads one layer, the model's output layer; layers={names} does not "
                                  "name one module of the model (leave layers= out for its last nn.Linear)")
        name = names[0]
    else:
        linears = [n for n, m in named.items() if isinstance(m, nn.Linear)]
        if not linears:
            raise BinderException("method='rbc' needs the model's output layer to be an nn.Linear; use method='gbc'")
        name = linears[-1]
    if not isinstance(named[name], nn.Linear):
        raise BinderException(f"layer '{name}' is a {type(named[name]).__name__}; method='rbc' needs an nn.Linear "
                              "output layer (use method='gbc')")
    return name, named[name]


def rbc_block(store, ckpt: str, ids: np.ndarray, layers, label_free: bool, batch: int = 256) -> Block:
    """The output layer's factors (X = h, D = p - onehot(y), or p) from forward passes only."""
    classification_at(store, ckpt)
    model = store.model_at(ckpt).eval()
    name, layer = last_linear(model, layers)
    y = None if label_free else labels_of(store, ckpt, ids)
    seen: dict = {}
    handle = layer.register_forward_hook(lambda m, i, o: seen.update(h=i[0], z=o))
    xs, ds, where = [], [], []
    try:
        with torch.no_grad():
            for pos, x in store.input_batches(ids, batch):
                logits = model_output(call_model(model, x))
                h, z = seen["h"], seen["z"]
                if z.shape != logits.shape or not torch.equal(z, logits):
                    raise BinderException(f"layer '{name}' does not compute the model's output (the logits); "
                                          "name the output layer in layers=, or use method='gbc'")
                d = torch.softmax(z.double(), dim=1)
                if y is not None:
                    d[torch.arange(len(pos)), y[torch.from_numpy(pos)]] -= 1.0
                xs.append(h.float().reshape(len(pos), 1, -1))
                ds.append(d.float().reshape(len(pos), 1, -1))
                where.append(pos)
    finally:
        handle.remove()
    order = torch.from_numpy(np.argsort(np.concatenate(where)))
    meta = LayerMeta(name, "linear", layer.in_features, layer.out_features, layer.bias is not None)
    return Block(f"{ckpt}/{name}", kind_named("linear"), meta, {"X": torch.cat(xs)[order], "D": torch.cat(ds)[order]})


def gbc_blocks(store, catalog, ckpt: str, ids: np.ndarray, layers: list[str], label_free: bool) -> list[Block]:
    """Every listed layer's factors at a checkpoint: stored ones for the whole gradient, replayed
    with the label-free loss otherwise."""
    classification_at(store, ckpt)
    if label_free:
        factors = _replayed(store, ckpt, ids, layers)
    else:
        factors = {layer: _stored(catalog, ckpt, layer, ids) for layer in layers}
    blocks = []
    for layer in layers:
        meta, storage = catalog.layer_meta(layer)
        if layer not in factors:
            raise InvalidInputException(f"layer '{layer}' got no gradient at checkpoint '{ckpt}'; leave it out of layers=")
        kind = kind_named(meta.kind)
        blocks.append(Block(f"{ckpt}/{layer}", kind, meta, _in_storage_form(kind, meta, storage, factors[layer])))
    return blocks


def _in_storage_form(kind, meta, storage: str, factors: dict) -> dict:
    """Replayed factors in the form the store keeps the layer in: a layer whose full gradient has
    fewer numbers than its factors (capture's rule; digits' first convolution: 60 against 448) is
    held full, so the K-means products read 60 numbers per sample, not 64 rows of patches."""
    if storage != "full" or "G" in factors:
        return factors
    n = next(iter(factors.values())).shape[0]
    return {"G": torch.cat([kind.full(meta, {k: v[i:i + CHUNK] for k, v in factors.items()})
                            for i in range(0, n, CHUNK)])}


def _replayed(store, ckpt, ids, layers) -> dict:
    model = store.model_at(ckpt)
    hooks = LayerHooks(watched_modules(model, layers))
    parts: dict = {}
    where = []
    for pos, fs in replay_batches(model, hooks, stored_batches(store, ids, None, 256), FREE, LabelFreeTask()):
        where.append(pos)
        for layer, f in fs.items():
            for k, v in f.items():
                parts.setdefault(layer, {}).setdefault(k, []).append(v)
    order = torch.from_numpy(np.argsort(np.concatenate(where)))
    return {layer: {k: _cat(v)[order] for k, v in f.items()} for layer, f in parts.items()}


def _cat(parts):
    from metaql.storage.replay import _cat_padded
    return _cat_padded(parts)


def _stored(catalog, ckpt: str, layer: str, ids: np.ndarray) -> dict:
    """The stored factors of `ids` (in that order) at a checkpoint and layer."""
    got_ids, parts = [], {}
    for row in catalog.factor_shards(ckpt, layer):
        shard_ids, tensors = catalog.shard_tensors(row)
        keep = np.nonzero(np.isin(shard_ids, ids))[0]
        if len(keep):
            got_ids.append(np.asarray(shard_ids)[keep])
            for n, t in tensors.items():
                parts.setdefault(n, []).append(t[torch.from_numpy(keep)])
    got = np.concatenate(got_ids) if got_ids else np.zeros(0, np.int64)
    missing = np.setdiff1d(ids, got)
    if len(missing):
        raise InvalidInputException(
            f"{len(missing)} samples (e.g. {missing[:3].tolist()}) have no stored factors for layer '{layer}' at "
            f"checkpoint '{ckpt}': capture them, or use label_free=true (which replays the label-free gradient)")
    _, first = np.unique(got, return_index=True)       # a sample stored twice counts once
    order = first[np.searchsorted(got[first], ids)]
    return {n: _cat(v)[torch.from_numpy(order)] for n, v in parts.items()}


def importance_scales(energy: list[float], draws: int, gen: np.random.Generator) -> list[float]:
    """GBC's layer sampling (Eq. 14): `draws` layers drawn with replacement with probability
    A(l)/A; a layer drawn c times gets scale c * A / (draws * A(l)), so the sampled inner product
    is an unbiased estimate of the sum over all layers. Layers with A(l) = 0 are never drawn.
    draws=0: no sampling, every layer at scale 1 (the exact sum the draws estimate; the upper bound
    on what more draws can give)."""
    a = np.asarray(energy, dtype=np.float64)
    if draws == 0:
        return [1.0] * len(a)
    total = a.sum()
    if total <= 0:
        return [1.0] * len(a)         # every batch average is zero: nothing to sample by
    counts = np.bincount(gen.choice(len(a), size=draws, p=a / total), minlength=len(a))
    return [float(c * total / (draws * al)) if c else 0.0 for c, al in zip(counts, a)]


def gradients(store, catalog, ids, method: str, checkpoints: list[str], layers, label_free: bool,
              draws: int, seed: int) -> FactoredGradients:
    """The factored gradients a method clusters, averaged over the checkpoints (scale 1/T)."""
    t = len(checkpoints)
    if method in ("rbc", "rbc_kmeans"):
        blocks = [rbc_block(store, c, ids, layers, label_free) for c in checkpoints]
        return FactoredGradients([Block(b.name, b.kind, b.meta, b.factors, 1.0 / t) for b in blocks])
    names = catalog.layer_names(layers)
    gen = np.random.default_rng(seed)
    out = []
    for c in checkpoints:
        g = FactoredGradients(gbc_blocks(store, catalog, c, ids, names, label_free))
        # one draw per checkpoint, shared by every sample (footnote 3: equal dimensions for all)
        out += g.scaled([s / t for s in importance_scales(g.layer_energy(), draws, gen)]).blocks
    return FactoredGradients([b for b in out if b.scale > 0])
