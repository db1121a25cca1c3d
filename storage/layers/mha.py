"""nn.MultiheadAttention, factored: its packed in-projection and its out-projection as one layer.

torch multiplies by `in_proj_weight` inside F.multi_head_attention_forward and uses `out_proj`'s
weights without calling `out_proj`, so no hook sees the projections. The forward hook keeps the
call's query, key and value inputs (and masks); `factors` recomputes the attention from the
projected q, k, v with identity projections (multiplying by 1 and adding zeros is exact) to get
the gradients w.r.t. the projected q, k, v and the attention output `a` that feeds out_proj.

Canonical form, one matrix per sample, (4E x 2E [+1]): its top-left 3E x E block is the gradient
of in_proj_weight and its bottom-right E x E block that of out_proj.weight; the bias column holds
[in_proj_bias | out_proj.bias]. Rows: X = [x | 0], D = [dq dk dv | 0] per input token and
X = [0 | a], D = [0 0 0 | g] per output token. Self-attention (query is key is value) stores one
input row per token with D = [dq dk dv]; cross-attention stores the query, key and value tokens
as rows of their own, with D zero outside their block. Stored: X (B, R, E), DQKV (B, R, 3E),
A (B, T, E), DO (B, T, E). The off-diagonal blocks are zero, so the `full` form is twice the
parameters: factored storage is what this kind is for.

Exact for any masks, need_weights, batch_first both ways. Not modelled (the module is refused
and `layers='*'` skips it with a notice): kdim/vdim other than embed_dim (separate projection
weights), add_bias_kv, add_zero_attn, and dropout > 0 in train mode (the dropout mask cannot be
recomputed; capture in eval mode or replay the checkpoint).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from metaql.storage.layers.base import LayerKind, LayerMeta, register

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


@register(nn.MultiheadAttention)
class MultiheadAttention(LayerKind):
    kind = "multihead_attention"
    param_names = ("in_proj_weight", "in_proj_bias")
    covers_children = ("out_proj",)       # out_proj's weights are this layer's; it is never called

    def unfit(self, module: nn.Module) -> str:
        if not module._qkv_same_embed_dim:
            return "has kdim/vdim other than embed_dim (separate projection weights), which no kind models yet"
        if module.bias_k is not None or module.add_zero_attn:
            return "uses add_bias_kv or add_zero_attn, which no kind models yet"
        if (module.in_proj_bias is None) != (module.out_proj.bias is None):
            return "has a bias on only one of its projections, which no kind models yet"
        return ""

    def meta(self, name: str, module: nn.Module) -> LayerMeta:
        e = module.embed_dim
        bias = module.in_proj_bias is not None
        shapes = {"in_proj_weight": [3 * e, e], "out_proj.weight": [e, e]}
        if bias:
            shapes.update({"in_proj_bias": [3 * e], "out_proj.bias": [e]})
        return LayerMeta(name, self.kind, 2 * e, 4 * e, bias, shapes,
                         {"embed_dim": e, "num_heads": module.num_heads})

    # ---- capture ------------------------------------------------------------------------------
    def saved_call(self, module: nn.Module, args: tuple, kwargs: dict):
        call = _SIGNATURE.bind(module, *args, **kwargs).arguments
        call.pop("self")
        q, k, v = call["query"], call["key"], call["value"]
        if module.training and module.dropout > 0:
            return None, (f"uses attention dropout ({module.dropout}) in train mode, whose mask cannot be "
                          "recomputed: capture with the model in eval mode, or replay the checkpoint")
        if q.dim() != 3:
            return None, "is called with unbatched inputs; MetaQL needs a batch of samples"
        first = (lambda t: t) if module.batch_first else (lambda t: t.transpose(0, 1))
        saved = {n: (t.detach() if isinstance(t, torch.Tensor) else t) for n, t in call.items()}
        saved.update(query=first(q.detach()), key=first(k.detach()), value=first(v.detach()),
                     self_attention=q is k and k is v)
        return saved, ""

    def call_batch(self, saved) -> int:
        return saved["query"].shape[0]

    def call_output(self, output):
        return (output[0] if isinstance(output, tuple) else output), None

    def factors(self, module, inputs, grad_outputs):
        xs, dqkvs, attns, douts = [], [], [], []
        for call, g in zip(inputs, grad_outputs):
            g = g if module.batch_first else g.transpose(0, 1)       # (B, T, E)
            x, dqkv, a = _input_rows(module, call, g)
            xs.append(x), dqkvs.append(dqkv), attns.append(a), douts.append(g)
        return {"X": torch.cat(xs, 1), "DQKV": torch.cat(dqkvs, 1), "A": torch.cat(attns, 1),
                "DO": torch.cat(douts, 1)}

    # ---- canonical form ---------------------------------------------------------------------
    def rows(self, meta: LayerMeta, factors):
        x, dqkv, a, g = (factors[k].float() for k in ("X", "DQKV", "A", "DO"))
        zx, za = torch.zeros_like(a), torch.zeros_like(x)
        xr = torch.cat([torch.cat([x, za], 2), torch.cat([zx, a], 2)], 1)
        dr = torch.cat([torch.cat([dqkv, torch.zeros_like(za)], 2),
                        torch.cat([torch.zeros(*g.shape[:2], dqkv.shape[2], dtype=g.dtype), g], 2)], 1)
        return xr, dr

    def positions(self, meta, factors):
        return factors["X"].shape[1] + factors["A"].shape[1]

    def torch_grad_vector(self, meta: LayerMeta, grads):
        """torch's per-sample gradients ('in_proj_weight', 'out_proj.weight', biases) in the
        layout of `full`: the (4E x 2E [+1]) block matrix, off-diagonal blocks zero."""
        e = meta.extra["embed_dim"]
        w_in, w_out = grads["in_proj_weight"], grads["out_proj.weight"]
        n = w_in.shape[0]
        m = torch.zeros(n, 4 * e, 2 * e + int(meta.bias), dtype=w_in.dtype)
        m[:, :3 * e, :e], m[:, 3 * e:, e:2 * e] = w_in, w_out
        if meta.bias:
            m[:, :3 * e, 2 * e], m[:, 3 * e:, 2 * e] = grads["in_proj_bias"], grads["out_proj.bias"]
        return m.reshape(n, -1)


def _input_rows(module: nn.MultiheadAttention, call: dict, g: torch.Tensor):
    """(X rows, their [dq dk dv] rows, the attention output a), batch first, for one call."""
    e = module.embed_dim
    w, b = module.in_proj_weight.detach(), module.in_proj_bias
    ws, bs = w.chunk(3), (b.detach().chunk(3) if b is not None else (None,) * 3)
    srcs = [call["query"]] if call["self_attention"] else [call["query"], call["key"], call["value"]]
    with torch.enable_grad():
        if call["self_attention"]:
            q, k, v = (F.linear(srcs[0], wi, bi).detach().requires_grad_() for wi, bi in zip(ws, bs))
        else:
            q, k, v = (F.linear(s, wi, bi).detach().requires_grad_() for s, wi, bi in zip(srcs, ws, bs))
        eye = torch.eye(e, dtype=q.dtype, device=q.device)
        a, _ = F.multi_head_attention_forward(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), e, module.num_heads, None, None, None, None,
            False, module.dropout, eye, None, training=module.training,
            key_padding_mask=_canonical(call.get("key_padding_mask"), call.get("attn_mask"), q, "key_padding_mask"),
            need_weights=call.get("need_weights", True),
            attn_mask=_canonical(call.get("attn_mask"), None, q, "attn_mask"),
            use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
            average_attn_weights=call.get("average_attn_weights", True), is_causal=call.get("is_causal", False))
        a = a.transpose(0, 1)
        dq, dk, dv = torch.autograd.grad(a, (q, k, v), g @ module.out_proj.weight.detach())
    if call["self_attention"]:
        return srcs[0], torch.cat([dq, dk, dv], 2), a.detach()
    z = lambda t: torch.zeros_like(t)     # noqa: E731
    rows = torch.cat(srcs, 1)
    d = torch.cat([torch.cat([dq, z(dq), z(dq)], 2), torch.cat([z(dk), dk, z(dk)], 2),
                   torch.cat([z(dv), z(dv), dv], 2)], 1)
    return rows, d, a.detach()


def _canonical(mask, other, q, name):
    """The mask as nn.MultiheadAttention.forward hands it on (bool masks become float -inf)."""
    if name == "key_padding_mask":
        return F._canonical_mask(mask=mask, mask_name=name, other_type=F._none_or_dtype(other),
                                 other_name="attn_mask", target_type=q.dtype)
    return F._canonical_mask(mask=mask, mask_name=name, other_type=None, other_name="", target_type=q.dtype,
                             check_other=False)
