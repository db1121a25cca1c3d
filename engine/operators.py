"""Physical operators: the strategies, built from a layer kind's canonical-form primitives.

For samples i, j of one layer with rows (X, D): grad_i = D_i^T X_i, and
    <grad_i, grad_j> = sum((D_i D_j^T) * (X_i X_j^T))          (factored, no restore)
    <grad_i, Gbar>   = sum(D_i * (X_i Gbar^T))                  (Lemma 7, batch average)
Every function is batched over the training samples of one chunk of stored factors; q holds the
query side.
"""
from __future__ import annotations

import torch


def iterate(kind, meta, chunk, q) -> torch.Tensor:
    """Mean over the query samples of <grad_n, grad_q>, from Gram products of rows only."""
    gx = kind.gram_x_factors(meta, chunk, q["x_rows"])
    gd = kind.gram_d(meta, kind.d_rows(meta, chunk), q["d_rows"])
    return gx.mul_(gd).sum(dim=(1, 2)) / q["count"]      # gx is always a fresh product


def batch_average(kind, meta, chunk, q) -> torch.Tensor:
    return kind.average_scores(meta, chunk, q["gbar"])


def reconstruct(kind, meta, chunk, q) -> torch.Tensor:
    """Builds each training gradient, then one inner product with Gbar (the paper's baseline)."""
    x, d = kind.rows(meta, chunk)
    return (kind.outer(meta, x, d) * q["gbar"]).sum(dim=(1, 2))


def full_dot(g: torch.Tensor, q) -> torch.Tensor:
    """Stored full gradients (N, params) against the query side's flattened average gradient."""
    return g.float() @ q["gbar_flat"]


def squared_norm(kind, meta, chunk) -> torch.Tensor:
    """||grad_n||^2 = sum((D_n D_n^T) * (X_n X_n^T)), cost S^2 (din + dout), no gradient built."""
    x, d = kind.rows(meta, chunk)
    return (kind.self_gram_x(meta, x) * kind.self_gram_d(meta, d)).sum(dim=(1, 2))


FACTORED = {"iterate": iterate, "batch_average": batch_average, "reconstruct": reconstruct}


def query_side(kind, meta, factors: dict[str, torch.Tensor], needs=None, norm: bool = True) -> dict:
    """What the chosen strategies need of the query samples of one layer, computed once: `needs`
    holds "rows" (iterate) and/or "gbar" (the average gradient Gbar; also made for its norm,
    cosine), None everything (engine.strategies.needs_of turns strategy names into needs)."""
    count = next(iter(factors.values())).shape[0]
    if not kind.factored:
        g = kind.full(meta, factors)
        return {"count": count, "gbar_flat": g.mean(0)}
    side: dict = {"count": count}
    if needs is None or norm or "gbar" in needs:
        gbar = kind.average_of(meta, factors)
        side.update(gbar=gbar, gbar_flat=gbar.reshape(-1))
    if needs is None or "rows" in needs:
        x, d = kind.rows(meta, factors)
        side.update(x_rows=kind.flat_rows(meta, x), d_rows=kind.flat_rows(meta, d))
    return side
