"""The general kind: any module with parameters of its own that no specialised kind captures exactly
(PReLU, GroupNorm, RMSNorm, ConvTranspose, Conv3d, a subclass with its own forward, a user's module).

Per-sample gradients are computed exactly with torch.func: for each sample, the vector-Jacobian
product of the module (its own parameters only, from the sample's input as the hooks kept it) with
the gradient of the sample's loss w.r.t. the module's output; a module called several times sums
its calls. They are stored full ('G', every own parameter flattened in `named_parameters` order),
which the engine scores by its full-gradient path.

It needs a module that maps one tensor (batch first, samples independent) to one tensor: a call with
several inputs, keyword arguments or a tuple output is refused by the hooks (skipped under a
pattern, an error for a named layer), and modules known to be such (RNNs, attention, Bilinear) are
refused up front. A module that mixes samples (batch statistics) gets per-sample recomputed values,
not the batch's: only BatchNorm does that among torch's modules, and it has its own kind.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from metaql.errors import InvalidInputException
from metaql.storage.layers.base import LayerKind, LayerMeta, register_fallback

# one tensor in, one tensor out is what the per-sample recomputation needs; these are not
NOT_ONE_TENSOR = (nn.RNNBase, nn.MultiheadAttention, nn.Bilinear, nn.Transformer, nn.TransformerEncoderLayer,
                  nn.TransformerDecoderLayer, nn.EmbeddingBag)


@register_fallback
class Fallback(LayerKind):
    kind = "fallback"
    factored = False

    def applies(self, module: nn.Module) -> str:
        """'' when this kind captures `module` exactly, else why not."""
        if isinstance(module, NOT_ONE_TENSOR):
            return "takes several inputs, a bag with offsets or returns a tuple, which no kind models yet"
        from torch.nn.utils import parametrize
        if parametrize.is_parametrized(module):
            return "computes its weight through a parametrization, which no kind models yet"
        if not any(True for _ in module.parameters(recurse=False)):
            return "has no parameters of its own"
        return ""

    def call_problem(self, args: tuple, kwargs: dict, output) -> str:
        if len(args) != 1 or not isinstance(args[0], torch.Tensor) or any(v is not None for v in kwargs.values()):
            return "is called with other than one tensor, which the fallback kind cannot replay per sample"
        if not isinstance(output, torch.Tensor):
            return "returns other than one tensor, which the fallback kind cannot capture"
        return ""

    def meta(self, name: str, module: nn.Module) -> LayerMeta:
        shapes = {n: list(p.shape) for n, p in module.named_parameters(recurse=False)}
        total = sum(math.prod(s) for s in shapes.values())
        return LayerMeta(name, self.kind, 1, total, False, shapes, {"module": type(module).__name__})

    def factors(self, module, inputs, grad_outputs):
        params = {n: p.detach() for n, p in module.named_parameters(recurse=False)}

        def one(p, x, g):
            out, pull = vjp(lambda q: functional_call(module, q, (x.unsqueeze(0),)), p)
            return pull(g.unsqueeze(0).to(out.dtype))[0]
        try:
            grads = [vmap(one, in_dims=(None, 0, 0))(params, x, g) for x, g in zip(inputs, grad_outputs)]
        except Exception as e:   # data-dependent control flow, .item(), randomness under vmap
            raise InvalidInputException(
                f"the fallback kind cannot compute per-sample gradients of this {type(module).__name__} "
                f"({str(e).splitlines()[0]}); leave it out of layers=") from None
        b = inputs[0].shape[0]
        flat = [torch.cat([g[n].reshape(b, -1) for n in params], dim=1) for g in grads]
        return {"G": torch.stack(flat).sum(0) if len(flat) > 1 else flat[0]}

    def stored_numbers(self, meta, factors):
        return meta.params

    def rows(self, meta, factors):
        raise NotImplementedError("fallback layers are stored as full gradients only")

    def positions(self, meta, factors):
        return 1

    def torch_grad_vector(self, meta, grads):
        return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in meta.param_shapes], dim=1)
