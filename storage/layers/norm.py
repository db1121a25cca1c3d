"""LayerNorm and BatchNorm affine parameters: small, so stored as full per-sample gradients.

grad weight = sum over positions of D * x_hat, grad bias = sum of D, with x_hat the normalized
input. LayerNorm normalizes each sample by itself (exact). BatchNorm uses its running statistics in
eval mode (exact, what replay does); in train mode the batch statistics mix samples, so in-training
capture of BatchNorm is not a per-sample gradient: use replay.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaql.storage.layers.base import LayerKind, LayerMeta, register


class _Norm(LayerKind):
    factored = False

    def meta(self, name: str, module: nn.Module) -> LayerMeta:
        if getattr(module, "weight", None) is None:
            from metaql.errors import BinderException
            raise BinderException(f"layer '{name}' has no affine parameters: nothing to capture")
        n = module.weight.numel()
        shapes = {"weight": list(module.weight.shape)}
        if module.bias is not None:
            shapes["bias"] = list(module.bias.shape)
        # canonical shape: one "row" of width n per parameter vector; full storage only
        return LayerMeta(name, self.kind, 1, n, module.bias is not None, shapes)

    def factors(self, module, inputs, grad_outputs):
        gw = sum(self._weight_grad(module, x, g) for x, g in zip(inputs, grad_outputs))
        parts = [gw]
        if module.bias is not None:
            parts.append(sum(self._sum_positions(module, g) for g in grad_outputs))
        # layout of `full`: row o of the (n, 1 + bias) matrix is [grad w_o, grad b_o]
        return {"G": torch.stack(parts, dim=2).reshape(gw.shape[0], -1)}

    def stored_numbers(self, meta, factors):
        return meta.params

    def rows(self, meta, factors):
        raise NotImplementedError("norm layers are stored as full gradients only")

    def positions(self, meta, factors):
        return 1

    def torch_grad_vector(self, meta, grads):
        w = grads["weight"].reshape(grads["weight"].shape[0], -1, 1)
        if meta.bias:
            w = torch.cat([w, grads["bias"].reshape(w.shape[0], -1, 1)], dim=2)
        return w.reshape(w.shape[0], -1)


@register(nn.LayerNorm)
class LayerNorm(_Norm):
    kind = "layernorm"

    def _normalized(self, module, x):
        # torch's own kernel without the affine part: one pass instead of five (mean, var, minus,
        # square root, divide), and the very normalization the module's forward computed
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)

    def _weight_grad(self, module, x, g):
        n, rows = module.weight.numel(), x.shape[0]
        # the product in place in the normalized input (a new tensor) and summed over positions: the
        # einsum "bsn,bsn->bn" this replaces ran B * n dot products of length S as a batched product,
        # 4.5-12x slower (one thread: 196 -> 28 us on GPT-2's 16 x 32 x 128, 168 -> 22 us on MiniLM's
        # 8 x 16 x 384, 35 -> 7.7 ms on 64 x 128 x 768)
        return self._normalized(module, x).reshape(rows, -1, n).mul_(g.reshape(rows, -1, n)).sum(1)

    def _sum_positions(self, module, g):
        return g.reshape(g.shape[0], -1, module.weight.numel()).sum(1)


@register(nn.BatchNorm1d, nn.BatchNorm2d)
class BatchNorm(_Norm):
    kind = "batchnorm"

    def _normalized(self, module, x):
        shape = [1, -1] + [1] * (x.dim() - 2)
        if module.training or module.running_mean is None:
            dims = [0] + list(range(2, x.dim()))
            mean, var = x.mean(dim=dims, keepdim=True), x.var(dim=dims, unbiased=False, keepdim=True)
        else:
            mean, var = module.running_mean.reshape(shape), module.running_var.reshape(shape)
        return (x - mean) / torch.sqrt(var + module.eps)

    def _weight_grad(self, module, x, g):
        return (g * self._normalized(module, x)).reshape(x.shape[0], x.shape[1], -1).sum(2)

    def _sum_positions(self, module, g):
        return g.reshape(g.shape[0], g.shape[1], -1).sum(2)
