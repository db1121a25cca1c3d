"""The general kind: any module with parameters of its own that no specialised kind captures exactly
(PReLU, GroupNorm, RMSNorm, ConvTranspose, Conv3d, a subclass with its own forward, a user's module).

Per-sample gradients are computed exactly with torch.func: for each sample, the vector-Jacobian
product of the module (its own parameters only, from the sample's input as the hooks kept it) with
the gradient of the sample's loss w.r.t. the module's output; a module called several times sums
its calls. They are stored full ('G', every own parameter flattened in `named_parameters` order),
which the engine scores by its full-gradient path.

It needs a module that maps one tensor (batch first, samples independent) to a tensor or a tuple of
tensors (an LSTM's output, (h, c)): a tuple is handed on as views of one packed tensor, whose
gradient gathers every output's, and each output's batch dimension is found by comparing its shape
with a one-sample call's. A call with several inputs or keyword arguments is refused by the hooks
(skipped under a pattern, an error for a named layer), and modules known to take several inputs
(attention, Bilinear) are refused up front. A module that mixes samples (batch statistics) gets per-sample recomputed values,
not the batch's: only BatchNorm does that among torch's modules, and it has its own kind.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from metaql.errors import InvalidInputException
from metaql.storage.layers.base import LayerKind, LayerMeta, register_fallback

# one tensor in is what the per-sample recomputation needs; these are not
NOT_ONE_TENSOR = (nn.MultiheadAttention, nn.Bilinear, nn.Transformer, nn.TransformerEncoderLayer,
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
        if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in _leaves(output)):
            return "returns other than floating-point tensors, which the fallback kind cannot capture"
        return ""

    def saved_call(self, module, args, kwargs):
        # an RNN that is not batch_first reads (T, B, F): kept batch first like every other input
        return (args[0].detach().transpose(0, 1) if _time_first(module) else args[0].detach()), ""

    def call_output(self, output):
        leaves = _leaves(output)
        if len(leaves) == 1 and isinstance(output, torch.Tensor):
            return output, None
        packed = torch.cat([t.reshape(-1) for t in leaves])
        views, start = [], 0
        for t in leaves:
            views.append(packed[start:start + t.numel()].view(t.shape))
            start += t.numel()
        return packed, _rebuilt(output, iter(views))

    def meta(self, name: str, module: nn.Module) -> LayerMeta:
        shapes = {n: list(p.shape) for n, p in module.named_parameters(recurse=False)}
        total = sum(math.prod(s) for s in shapes.values())
        return LayerMeta(name, self.kind, 1, total, False, shapes, {"module": type(module).__name__})

    def factors(self, module, inputs, grad_outputs):
        params = {n: p.detach() for n, p in module.named_parameters(recurse=False)}

        def one(p, x, g):
            out, pull = vjp(lambda q: functional_call(module, q, (_one(module, x),)), p)
            return pull(g.unsqueeze(0).to(out.dtype))[0]
        try:
            packed = _packed(module, inputs[0])
            grads = [_tuple_grads(module, params, x, g) if packed else per_sample(one, (None, 0, 0), (params, x, g))
                     for x, g in zip(inputs, grad_outputs)]
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


def _leaves(output) -> list:
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _leaves(o)]
    return [output]


def _rebuilt(output, views):
    if isinstance(output, (tuple, list)):
        return type(output)(_rebuilt(o, views) for o in output) if not hasattr(output, "_fields") \
            else type(output)(*(_rebuilt(o, views) for o in output))
    return next(views)


def _packed(module, x) -> bool:
    """True when `g` is the gradient of a packed tuple output (see call_output)."""
    with torch.no_grad():
        return not isinstance(module(_batch(module, x[:1])), torch.Tensor)


def _time_first(module) -> bool:
    return isinstance(module, nn.RNNBase) and not module.batch_first


def _batch(module, x):
    """A batch-first saved input as the module reads it."""
    return x.transpose(0, 1) if _time_first(module) else x


def _one(module, xi):
    """One sample's input as a batch of one, in the module's layout."""
    return xi.unsqueeze(1) if _time_first(module) else xi.unsqueeze(0)


def _tuple_grads(module, params, x, g):
    """Per-sample gradients of a module with a tuple output: each output's gradient cut out of the
    packed one, its batch dimension found by comparing shapes with a one-sample call."""
    with torch.no_grad():
        full, single = _leaves(module(_batch(module, x))), _leaves(module(_batch(module, x[:1])))
    parts = list(torch.split(g, [t.numel() for t in full]))
    dims = tuple(_batch_dim(tuple(t.shape), tuple(s.shape), x.shape[0]) for t, s in zip(full, single))
    cots = tuple(p.reshape(t.shape) for p, t in zip(parts, full))

    def one(p, xi, gs):
        out, pull = vjp(lambda q: tuple(_leaves(functional_call(module, q, (_one(module, xi),)))), p)
        return pull(tuple(gi.unsqueeze(d).to(o.dtype) for gi, d, o in zip(gs, dims, out)))[0]
    return per_sample(one, (None, 0, dims), (params, x, cots))


def per_sample(fn, in_dims: tuple, args: tuple) -> dict:
    """vmap(fn) over the samples; where torch.func cannot batch the module (nn.RNN and nn.GRU build
    their initial state with ops vmap has no rule for), the same function one sample at a time:
    exact either way, the loop only slower."""
    try:
        return vmap(fn, in_dims=in_dims)(*args)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        if "random" in str(e).lower():   # a recomputation draws new dropout masks: never exact, refused
            raise
    b = next(a.shape[d] if isinstance(a, torch.Tensor) else a[0].shape[d[0] if isinstance(d, tuple) else d]
             for a, d in zip(args, in_dims) if d is not None)
    rows = [fn(*(a if d is None else _row(a, d, i) for a, d in zip(args, in_dims))) for i in range(b)]
    return {n: torch.stack([r[n] for r in rows]) for n in rows[0]}


def _row(a, d, i):
    """Sample i of a batched argument (a tensor, or a tuple of tensors with one batch dim each)."""
    if isinstance(a, torch.Tensor):
        return a.select(d, i)
    return tuple(t.select(di, i) for t, di in zip(a, d))


def _batch_dim(full: tuple, single: tuple, batch: int) -> int:
    """The one dimension where a batch's output has `batch` rows and a sample's has one."""
    if len(full) != len(single):
        raise ValueError("an output's rank depends on the batch")
    dims = [d for d, (a, b) in enumerate(zip(full, single)) if a != b]
    if batch == 1:
        dims = [d for d, (a, b) in enumerate(zip(full, single)) if a == b == 1][:1]
    if len(dims) != 1 or full[dims[0]] != batch or single[dims[0]] != 1:
        raise ValueError(f"no single batch dimension in an output of shape {full}")
    return dims[0]
