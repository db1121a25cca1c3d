"""The index's exact subspace part: top-r singular subspaces of a layer's training gradients.

With U (dout x r) and V (din' x r) orthonormal, a query gradient Gq splits into three parts,
    Gq = U U^T Gq + (I - U U^T) Gq V V^T + R,     R = (I - U U^T) Gq (I - V V^T),
so a training gradient's score is
    <G_i, Gq> = <U^T G_i, U^T Gq> + <G_i V, (I - U U^T) Gq V> + <G_i^res, R>,
    G_i^res = (I - U U^T) G_i (I - V V^T)
(U U^T and I - U U^T are symmetric projectors, and R lies in both complements, so <G_i, R> =
<G_i^res, R>). The index keeps c_i = [U^T G_i, G_i V] exactly (r (din' + dout) numbers per
sample), so the first two terms are exact at query time; only the last one is estimated, from the
random projection of G_i^res. Its error is that of the plain index with G_i -> G_i^res and
Gq -> R, whose norms (||R||_2 against ||Gq||_2: 0.02-0.7 of it per MiniLM layer at r = 2) set the
certificate's sigma. Any orthonormal U, V keep this exact; the top singular subspaces of the
training gradients only make R small. They depend on the data but not on the projection P (drawn
from the layer's seed alone), which is all the certificate's bound needs: it holds for any fixed
G_i and Gq over the draw of P.

U, V are the top eigenvectors of sum_i G_i G_i^T and sum_i G_i^T G_i over the first
BASIS_SAMPLES samples of the layer, found by a block power iteration with Rayleigh-Ritz (a few
passes over the Gram matrix, float64), then orthonormalised by QR.
"""
from __future__ import annotations

import torch

BASIS_SAMPLES = 64        # training samples the subspaces are estimated from
POWER_STEPS = 6           # block power iterations (their quality only sets how small R is)
OVERSAMPLE = 8            # extra columns of the iterated block


def with_bias(x: torch.Tensor, bias: bool) -> torch.Tensor:
    """[X | 1]: the canonical input rows (the bias's gradient is the last column of G)."""
    if not bias:
        return x
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)], dim=-1)


def bases(x: torch.Tensor, d: torch.Tensor, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U dout x r, V din' x r) float64, orthonormal: the top eigenvectors of sum G G^T and
    sum G^T G of the samples' gradients G = D^T X (x with its bias column already)."""
    # sum_i D_i^T (X_i X_i^T) D_i and sum_i X_i^T (D_i D_i^T) X_i, never forming a G_i
    gram_u, gram_v = _sum_gram(d, x), _sum_gram(x, d)
    g = torch.Generator().manual_seed(int(seed) + 2)
    return top_eigenvectors(gram_u, r, g), top_eigenvectors(gram_v, r, g)


def _sum_gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_i A_i^T (B_i B_i^T) A_i for a (n, S, p), b (n, S, q): the (p x p) Gram of sum_i G G^T
    with G_i = A_i^T B_i; summed in float32 (only the bases' quality depends on it, not the
    exactness of the split), returned float64."""
    a, b = a.float(), b.float()
    m = torch.bmm(b, b.transpose(1, 2))                          # (n, S, S)
    ma = torch.bmm(m, a)                                         # (n, S, p)
    gram = (a.reshape(-1, a.shape[-1]).T @ ma.reshape(-1, a.shape[-1])).double()
    return (gram + gram.T) / 2


def top_eigenvectors(gram: torch.Tensor, r: int, gen: torch.Generator) -> torch.Tensor:
    """An orthonormal (p x r) basis close to the top-r eigenvectors of the symmetric PSD `gram`."""
    p = gram.shape[0]
    r = min(r, p)
    if r == 0:
        return torch.zeros(p, 0, dtype=torch.float64)
    q = torch.linalg.qr(torch.randn(p, min(p, r + OVERSAMPLE), generator=gen, dtype=torch.float64))[0]
    for _ in range(POWER_STEPS):
        q = torch.linalg.qr(gram @ q)[0]
    w, z = torch.linalg.eigh(q.T @ gram @ q)                     # Rayleigh-Ritz in the block
    top = q @ z[:, -r:].flip(1)
    return torch.linalg.qr(top)[0]                               # orthonormal to float64 rounding


def exact_coordinates(x: torch.Tensor, d: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """c_i = [U^T G_i (r x din'), G_i V (dout x r)] flattened, (n, r (din' + dout)), float64."""
    x, d = x.double(), d.double()
    ug = torch.einsum("nsr,nsi->nri", d @ u, x)                  # U^T D^T X
    gv = torch.einsum("nso,nsr->nor", d, x @ v)                  # D^T X V
    return torch.cat([ug.reshape(len(x), -1), gv.reshape(len(x), -1)], 1)


def residual_rows(x: torch.Tensor, d: torch.Tensor, u: torch.Tensor, v: torch.Tensor):
    """(X (I - V V^T), D (I - U U^T)): the rows of G_i^res = (I - U U^T) D^T X (I - V V^T)."""
    x, d = x.double(), d.double()
    return x - (x @ v) @ v.T, d - (d @ u) @ u.T


def residual_squared_norms(xr: torch.Tensor, dr: torch.Tensor) -> torch.Tensor:
    """||D^T X||_F^2 per sample from the rows' Gram matrices (no dout x din' matrix formed)."""
    return (torch.bmm(xr, xr.transpose(1, 2)) * torch.bmm(dr, dr.transpose(1, 2))).sum((1, 2))


def query_split(gq: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the query's exact coordinates [U^T Gq, (I - U U^T) Gq V] flattened, R), float64."""
    gq = gq.double()
    ug = u.T @ gq                                                # r x din'
    rest = gq - u @ ug                                           # (I - U U^T) Gq
    rv = rest @ v                                                # dout x r
    return torch.cat([ug.reshape(-1), rv.reshape(-1)]), rest - rv @ v.T
