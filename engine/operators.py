"""Physical operators on the canonical linear form of a layer (X rows, D rows per sample).

For samples i, j of one layer: grad_i = D_i^T X_i, and
    <grad_i, grad_j> = sum((D_i D_j^T) * (X_i X_j^T))          (factored, no restore)
    <grad_i, Gbar>   = sum(D_i * (X_i Gbar^T))                  (Lemma 7, batch average)
Every function here is batched over the training samples of one shard chunk.
"""
from __future__ import annotations

import torch


def average_gradient(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Gbar (Dout, Din): the mean over the batch of D_b^T X_b."""
    return torch.einsum("bso,bsi->oi", d, x) / x.shape[0]


def dot_batch_average(x: torch.Tensor, d: torch.Tensor, gbar: torch.Tensor) -> torch.Tensor:
    """<grad_n, Gbar> for each training sample n, without building grad_n."""
    return torch.einsum("nso,nso->n", d, x @ gbar.T)


def dot_iterate(x: torch.Tensor, d: torch.Tensor, xq: torch.Tensor, dq: torch.Tensor) -> torch.Tensor:
    """mean over query samples q of <grad_n, grad_q>, from Gram products of the rows only."""
    xr, dr = xq.reshape(-1, xq.shape[-1]), dq.reshape(-1, dq.shape[-1])
    gx = torch.einsum("nsi,ri->nsr", x, xr)
    gd = torch.einsum("nso,ro->nsr", d, dr)
    return (gx * gd).sum(dim=(1, 2)) / xq.shape[0]


def dot_reconstruct(x: torch.Tensor, d: torch.Tensor, gbar: torch.Tensor) -> torch.Tensor:
    """Builds each training gradient, then one inner product with Gbar (the paper's baseline)."""
    full = torch.einsum("nso,nsi->noi", d, x)
    return (full * gbar).sum(dim=(1, 2))


def dot_full(g: torch.Tensor, gbar: torch.Tensor) -> torch.Tensor:
    """Stored full gradients (N, Dout*Din) against Gbar."""
    return g.float() @ gbar.reshape(-1)


def squared_norm(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """||grad_n||^2 = sum((D_n D_n^T) * (X_n X_n^T)), cost S^2 (Din + Dout)."""
    return (torch.einsum("nsi,nti->nst", x, x) * torch.einsum("nso,nto->nst", d, d)).sum(dim=(1, 2))
