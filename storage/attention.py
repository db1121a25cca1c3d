"""Self-attention as linear layers: an nn.MultiheadAttention stand-in with explicit projections.

torch's nn.MultiheadAttention multiplies by its packed `in_proj_weight` inside a fused function, so
no per-layer hook can see the Q, K, V projections. `ExplicitMultiheadAttention` computes the same
outputs with four nn.Linear layers (q_proj, k_proj, v_proj, out_proj) that MetaQL captures like any
linear layer over the token sequence; when Q, K and V read the same input, it is stored once.

    model = metaql.storage.attention.make_capturable(model)   # swaps every nn.MultiheadAttention
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ExplicitMultiheadAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, batch_first: bool = False,
                 kdim: int | None = None, vdim: int | None = None, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError("embed_dim must be divisible by num_heads")
        self.embed_dim, self.num_heads, self.batch_first, self.dropout = embed_dim, num_heads, batch_first, dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "ExplicitMultiheadAttention":
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported")
        has_bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, has_bias, mha.batch_first, mha.kdim, mha.vdim, mha.dropout)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for lin, w in zip((new.q_proj, new.k_proj, new.v_proj), (wq, wk, wv)):
                lin.weight.copy_(w)
            if has_bias:
                for lin, b in zip((new.q_proj, new.k_proj, new.v_proj), mha.in_proj_bias.chunk(3)):
                    lin.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, tq, _ = query.shape
        h, hd = self.num_heads, self.embed_dim // self.num_heads
        q = self.q_proj(query).reshape(b, tq, h, hd).transpose(1, 2)
        k = self.k_proj(key).reshape(b, key.shape[1], h, hd).transpose(1, 2)
        v = self.v_proj(value).reshape(b, value.shape[1], h, hd).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(tq, key.shape[1], dtype=torch.bool).triu(1)
        if attn_mask is not None:
            scores = _masked(scores, attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(b, h, tq, -1))
        if key_padding_mask is not None:
            scores = _masked(scores, key_padding_mask.reshape(b, 1, 1, -1))
        weights = F.dropout(scores.softmax(-1), self.dropout, self.training)
        out = self.out_proj((weights @ v).transpose(1, 2).reshape(b, tq, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights


def _masked(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask, float("-inf"))
    return scores + mask


def make_capturable(model: nn.Module) -> nn.Module:
    """Replaces every nn.MultiheadAttention in `model` (in place) by its explicit equivalent."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.MultiheadAttention):
            setattr(model, name, ExplicitMultiheadAttention.from_torch(child))
        else:
            make_capturable(child)
    return model
