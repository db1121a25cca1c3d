"""Brute force for tests: per-sample gradients by torch.func (vmap of grad) and scores from
explicitly built full gradients."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap


def per_sample_grads(model, x, y, target: str = "label") -> dict[str, torch.Tensor]:
    """{param name: (B, *param shape)} gradients of each sample's own cross-entropy loss."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        logits = functional_call(model, p, (xi.unsqueeze(0),)).reshape(1, -1)
        if target == "expected":
            logp = F.log_softmax(logits, dim=1)
            return -(logp.exp() * logp).sum()
        if target == "pred":
            yi = logits.argmax(1)[0].detach()
        return F.cross_entropy(logits, yi.unsqueeze(0))

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)


def layer_grads(grads: dict, layer: str) -> dict[str, torch.Tensor]:
    return {k.rsplit(".", 1)[1]: v for k, v in grads.items() if k.rsplit(".", 1)[0] == layer}


def flat_layer(grads: dict, layer: str, meta) -> torch.Tensor:
    from metaql.storage.layers import kind_named
    return kind_named(meta.kind).torch_grad_vector(meta, layer_grads(grads, layer))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def stored_full(store, checkpoint: str, layer: str, ids):
    """(meta, per-sample full gradients in the order of `ids`) rebuilt from what the store holds."""
    from metaql.storage.layers import kind_named
    meta, _ = store.layer_meta(layer)
    kind = kind_named(meta.kind)
    out = {}
    for row in store.factor_shards(checkpoint, layer):
        shard_ids, tensors = store.shard_tensors(row)
        full = kind.full(meta, tensors)
        out.update({int(i): full[k] for k, i in enumerate(shard_ids)})
    return meta, torch.stack([out[int(i)] for i in ids])
