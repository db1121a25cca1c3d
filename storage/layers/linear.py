"""nn.Linear over any leading dimensions: X = the input rows, D = the output-gradient rows.

A sample of shape (..., Din) contributes S = prod(...) rows. A module called several times in
one forward pass contributes the rows of every call: the gradient is a sum over rows either way.
"""
from __future__ import annotations

import torch
from torch import nn

from metaql.storage.layers.base import LayerKind, LayerMeta, register


@register(nn.Linear)
class Linear(LayerKind):
    kind = "linear"
    gradient_factors = ("D",)

    def meta(self, name: str, module: nn.Module) -> LayerMeta:
        shapes = {"weight": list(module.weight.shape)}
        if module.bias is not None:
            shapes["bias"] = list(module.bias.shape)
        return LayerMeta(name, self.kind, module.in_features, module.out_features,
                         module.bias is not None, shapes)

    def factors(self, module, inputs, grad_outputs):
        b = inputs[0].shape[0]
        if len(inputs) == 1:
            # one call: its rows as they are, laid out as the concatenation would lay them out (the
            # capture copies what it keeps once, not twice)
            return {"X": inputs[0].reshape(b, -1, inputs[0].shape[-1]).contiguous(),
                    "D": grad_outputs[0].reshape(b, -1, grad_outputs[0].shape[-1]).contiguous()}
        x = torch.cat([i.reshape(b, -1, i.shape[-1]) for i in inputs], dim=1)
        d = torch.cat([g.reshape(b, -1, g.shape[-1]) for g in grad_outputs], dim=1)
        return {"X": x, "D": d}

    def suffix_name(self):
        return "X"

    def rows(self, meta: LayerMeta, factors):
        return factors["X"].float(), factors["D"].float()
