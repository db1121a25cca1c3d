"""A sketch of the query side on exact factors: the query's average gradient truncated to its
leading singular directions, with a deterministic bound.

For a layer stored exactly, Gbar (dout x din') = U S V^T; keeping the r leading terms,
    <g_i, Gbar> = <g_i, Gbar_r> + <g_i, R>,   |<g_i, R>| <= ||g_i||_F ||R||_F <= ||X_i||_F ||D_i||_F ||R||_F
(||D^T X||_F <= ||D||_F ||X||_F; the bias column counts in X), and r is the smallest with
||R||_F <= tol ||Gbar||_F. A training sample then costs S r (din + dout) instead of S din dout
(batch_average). Summed over layers, sum_l ||g_il|| ||R_l|| <= tol ||g_i|| ||Gbar||: the relative
error is at most tol, deterministically. Used only under error= (the optimizer never picks it:
it is registered without a storage mode, so no estimate of it is made or shown)."""
from __future__ import annotations

import torch

from metaql.engine.strategies import ScanStrategy, register

DENSE_KINDS = ("linear", "hf_conv1d")     # rows that are the layer's own tensors (no unfolding)


class LowRankQuery(ScanStrategy):
    name, stored, baseline, needs = "lowrank_query", (), True, frozenset({"gbar"})

    def applies_to(self, kind) -> bool:
        return kind.kind in DENSE_KINDS

    def extra_numbers(self, meta, tensors, q, per_sample):
        return per_sample * 2

    def scores(self, kind, meta, chunk, q):
        left, right = truncated(q, meta)
        x, d = kind.rows(meta, chunk)
        xr = x @ right[:meta.din]
        if meta.bias:
            xr += right[meta.din]
        return (d @ left).mul_(xr).sum(dim=(1, 2))


def truncated(q: dict, meta) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r S_r, V_r) of the query side's Gbar at its tolerance, computed once per query side."""
    if "lowrank" not in q:
        gbar = q["gbar"].double()
        u, s, vh = torch.linalg.svd(gbar, full_matrices=False)
        tail = torch.cumsum((s ** 2).flip(0), 0).flip(0)         # tail[j] = sum_{l >= j} s_l^2
        allowed = (q["tolerance"] * s.norm()) ** 2
        r = int((tail > allowed).sum())                           # the residual of rank r is tail[r]
        r = max(r, 1)
        q["lowrank"] = ((u[:, :r] * s[:r]).float(), vh[:r].T.float().contiguous())
        q["residual"] = float(tail[r].sqrt()) if r < len(s) else 0.0
        q["rank"] = r
    return q["lowrank"]


def rank_pays(meta, rank: int) -> bool:
    """Whether rank r costs less than Lemma 7 per row: r (din + dout) < din dout."""
    return rank * (meta.din + int(meta.bias) + meta.dout) < (meta.din + int(meta.bias)) * meta.dout


def row_norm_bound(kind, meta, chunk) -> torch.Tensor:
    """||X_i||_F ||D_i||_F per sample (bias column included): a bound on ||g_i||_F."""
    x, d = kind.rows(meta, chunk)
    xs = x.pow(2).sum(dim=(1, 2)) + (x.shape[1] if meta.bias else 0)
    return (xs * d.pow(2).sum(dim=(1, 2))).sqrt()


STRATEGY = register(LowRankQuery())
