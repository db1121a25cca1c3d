"""A layer kind registered from user code (importable, so another process can load it from the
catalog when it trusts 'tests.user_kind:GainKind')."""
import torch
from torch import nn

from metaql.storage.layers import LayerKind, LayerMeta, register


class Gain(nn.Module):
    """y = x * weight over the last dimension."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return x * self.weight


@register(Gain)
class GainKind(LayerKind):
    kind = "user_gain"
    factored = False

    def meta(self, name, module):
        n = module.weight.numel()
        return LayerMeta(name, self.kind, 1, n, False, {"weight": [n]})

    def factors(self, module, inputs, grad_outputs):
        b = inputs[0].shape[0]
        return {"G": sum((x * g).reshape(b, -1, x.shape[-1]).sum(1) for x, g in zip(inputs, grad_outputs))}

    def stored_numbers(self, meta, factors):
        return meta.params

    def positions(self, meta, factors):
        return 1


class GainNet(nn.Module):
    def __init__(self, n: int = 4, classes: int = 3):
        super().__init__()
        self.metaql_config = {"n": n, "classes": classes}
        self.gain = Gain(n)
        self.head = nn.Linear(n, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.gain(x)))
