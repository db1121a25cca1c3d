"""nn.Embedding: stored as the token ids and the output-gradient rows.

The weight (vocab x dim) has gradient sum_s onehot(id_s)^T D_s. In the canonical form the one-hot
rows play D (width vocab) and the gradient rows play X (width dim); the one-hots are never built:
their Gram products are id equalities and products with Gbar are row gathers.
"""
from __future__ import annotations

import torch
from torch import nn

from metaql.storage.layers.base import LayerKind, LayerMeta, register


@register(nn.Embedding)
class Embedding(LayerKind):
    kind = "embedding"

    def meta(self, name: str, module: nn.Module) -> LayerMeta:
        return LayerMeta(name, self.kind, module.embedding_dim, module.num_embeddings, False,
                         {"weight": list(module.weight.shape)})

    def factors(self, module, inputs, grad_outputs):
        b = inputs[0].shape[0]
        ids = torch.cat([i.reshape(b, -1) for i in inputs], dim=1)
        d = torch.cat([g.reshape(b, -1, g.shape[-1]) for g in grad_outputs], dim=1)
        if module.padding_idx is not None:
            # torch gives the padding row no gradient: its rows drop out of the factors too
            d = d * (ids != module.padding_idx).unsqueeze(-1)
        return {"ids": ids.long(), "D": d}

    def rows(self, meta: LayerMeta, factors):
        # X: the gradient rows (dim wide); "D": the ids, standing for one-hot rows (vocab wide)
        return factors["D"].float(), factors["ids"].long()

    def positions(self, meta, factors):
        return factors["ids"].shape[1]

    def gram_d(self, meta, ids, ids_r):
        return (ids.unsqueeze(-1) == ids_r.reshape(1, 1, -1)).float()

    def self_gram_d(self, meta, ids):
        return (ids.unsqueeze(-1) == ids.unsqueeze(-2)).float()

    def flat_rows(self, meta, t):
        return t.reshape(-1) if t.dtype == torch.long else t.reshape(-1, t.shape[-1])

    def apply_average(self, meta, x, ids, gbar):
        return (x * gbar[ids]).sum(dim=(1, 2))

    def outer(self, meta, x, ids):
        n, s, dim = x.shape
        out = torch.zeros(n, meta.dout, dim, dtype=x.dtype, device=x.device)
        return out.scatter_add_(1, ids.unsqueeze(-1).expand(n, s, dim), x)

    def average(self, meta, x, ids):
        out = torch.zeros(meta.dout, x.shape[-1], dtype=x.dtype, device=x.device)
        return out.index_add_(0, ids.reshape(-1), x.reshape(-1, x.shape[-1])) / x.shape[0]

    def torch_grad_vector(self, meta, grads):
        return grads["weight"].reshape(grads["weight"].shape[0], -1)
