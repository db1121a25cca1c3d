"""Hugging Face's Conv1D (GPT-2's c_attn, c_proj, c_fc): a Linear whose weight is stored transposed.

y = x @ W + b with W of shape (nx, nf), so the weight's gradient is X^T D: the Linear kind's
factors (input rows X, output-gradient rows D) with the canonical matrix D^T X being the
transposed gradient. Registered lazily: MetaQL does not import transformers, a GPT-2 model has.
"""
from __future__ import annotations

from torch import nn

from metaql.storage.layers.base import LayerMeta, register_lazy
from metaql.storage.layers.linear import Linear


@register_lazy("transformers.pytorch_utils", "Conv1D")
class HFConv1D(Linear):
    kind = "hf_conv1d"

    def meta(self, name: str, module: nn.Module) -> LayerMeta:
        nx, nf = module.weight.shape
        shapes = {"weight": [nx, nf]}
        if module.bias is not None:
            shapes["bias"] = [nf]
        return LayerMeta(name, self.kind, nx, nf, module.bias is not None, shapes)

    def torch_grad_vector(self, meta, grads):
        transposed = {**grads, "weight": grads["weight"].transpose(1, 2)}
        return super().torch_grad_vector(meta, transposed)
