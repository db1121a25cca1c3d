"""Rigorous upper bounds on a matrix's spectral norm ||m||_2, cheapest first.

The index TOPK's certificate (metaql.approx.indexed) needs an upper bound on ||R||_2 and
||R P_in||_2 of every indexed layer's query residual R; a full symmetric eigensolve of the
smaller Gram matrix (`eigen_bound`) was 60% of the query's split on the MiniLM (36 layers,
R up to 1536 x 385). The query gradient is nearly rank one there (stable rank 1.1-2), so a
few Lanczos steps find its top eigenvalue, and the rest of the spectrum is bounded by traces:

A = m^T m (or m m^T, the smaller; positive semidefinite). Lanczos gives a unit Ritz vector x with
Rayleigh quotient theta and residual rho = ||A x - theta x||; some eigenvalue lam_j of A lies in
[theta - rho, theta + rho] (Weinstein's bound for a symmetric A), so with lo = max(theta - rho, 0)
and the other eigenvalues non-negative,
    lam_max <= max(theta + rho, tr(A) - lo)                    (`trace_bound`: tr(A) = ||m||_F^2)
    lam_max <= max(theta + rho, (tr(A^4) - lo^4)^(1/4))        (`quartic_bound`: tr(A^4) = ||A^2||_F^2)
The first costs the Lanczos matrix-vector products only; the second the Gram matrix and its
square (cheaper than its eigensolve). `spectral_norm` takes the first of trace, quartic and
eigensolve whose bound is within TIGHT of theta (a lower bound on lam_max), so the bound used is
at most (1 + TIGHT) lam_max, 0.5% on the norm: the certificate's sigmas move by at most that.
Every bound includes its floating-point rounding margins (see each function).
"""
from __future__ import annotations

import torch

U32, U64 = 2.0 ** -24, 2.0 ** -53
TIGHT = 0.01           # a cheap bound on lam_max is used when at most 1 + TIGHT times the Ritz value
STEPS = 8              # Lanczos steps (the MiniLM's query residuals: theta within 1e-6 of lam_max in 4-6)


def gram_side(m: torch.Tensor) -> bool:
    """True when A = m^T m is the smaller Gram matrix (m is at least as tall as wide)."""
    return m.shape[0] >= m.shape[1]


def apply_gram(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A x for the smaller Gram matrix A of m, without forming A."""
    return m.T @ (m @ x) if gram_side(m) else m @ (m.T @ x)


def ritz_pair(m: torch.Tensor, steps: int = STEPS) -> tuple[torch.Tensor, float, float]:
    """(x, theta, rho): the top Ritz vector (unit) of `steps` Lanczos steps on the smaller Gram
    matrix of m (float64, full reorthogonalisation, a seeded start: the same in every process),
    its Rayleigh quotient and residual ||A x - theta x||, both computed explicitly from x."""
    m = m.double()
    p = min(m.shape)
    q = torch.randn(p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    basis = [q / q.norm()]
    alphas, betas = [], []
    for _ in range(min(steps, p)):
        w = apply_gram(m, basis[-1])
        alphas.append(float(basis[-1] @ w))
        qs = torch.stack(basis, 1)
        w = w - qs @ (qs.T @ w)
        w = w - qs @ (qs.T @ w)                  # twice: the basis stays orthonormal to rounding
        beta = float(w.norm())
        if beta <= 1e-12 * max(abs(alphas[0]), 1e-300) or len(basis) == p:
            break                                # an invariant subspace: the Ritz values are eigenvalues
        betas.append(beta)
        basis.append(w / beta)
    k = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[:k - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    _, vecs = torch.linalg.eigh(t)
    x = torch.stack(basis[:k], 1) @ vecs[:, -1]
    x = x / x.norm()
    ax = apply_gram(m, x)
    theta = float(x @ ax)
    return x, theta, float((ax - theta * x).norm())


def _product_margin(m: torch.Tensor, fro2: float) -> float:
    """A bound on the float64 rounding of theta and rho (A x through m^T (m x), ||x|| = 1):
    |fl(A x) - A x| <= gamma_{n+p} |m|^T |m| |x| in norm <= gamma ||m||_F^2, taken 4x with the
    inner products and the normalisation of x."""
    n = sum(m.shape) + 8
    return 4.0 * n * U64 / (1.0 - n * U64) * fro2


def trace_bound(m: torch.Tensor, ritz=None) -> tuple[float, float]:
    """(an upper bound on lam_max(A) from the Ritz pair and tr(A) = ||m||_F^2, theta) (module
    docstring), float64 rounding included."""
    x, theta, rho = ritz or ritz_pair(m)
    fro2 = float((m.double() ** 2).sum())
    tr = fro2 * (1.0 + m.numel() * U64 * 2)
    d = _product_margin(m, fro2)
    lo = max(theta - rho - d, 0.0)
    return max(theta + rho + d, tr - lo), theta


def quartic_bound(m: torch.Tensor, ritz=None) -> tuple[float, float]:
    """(an upper bound on lam_max(A) from the Ritz pair and tr(A^4) = ||A^2||_F^2, theta). A is
    formed in float32 (A32, as `eigen_bound` does); the bound is on lam_max(A32) raised by
    ||A - A32||_2 <= gamma_{n+2} ||m||_F^2 (Weyl). A32's square is float32 too: ||fl(A32^2) -
    A32^2||_F <= gamma_p ||A32||_F^2; the Ritz pair's residual is taken again on A32 in float64."""
    x, theta, _ = ritz or ritz_pair(m)
    n, p = max(m.shape), min(m.shape)
    m32 = m.float()
    a32 = m32.T @ m32 if gram_side(m) else m32 @ m32.T
    a = a32.double()
    afro = float(a.norm())
    ax = a @ x
    th = float(x @ ax)
    d = 4.0 * (p + 8) * U64 / (1.0 - (p + 8) * U64) * afro      # as _product_margin, on A32
    rho = float((ax - th * x).norm()) + d
    sq = (a32 @ a32).double()
    t4 = (float(sq.norm()) * (1.0 + p * p * U64) + p * U32 / (1.0 - p * U32) * afro ** 2) ** 2
    lo = max(th - rho, 0.0)
    fro2 = float((m.double() ** 2).sum())
    gram_error = (n + 2) * U32 / (1.0 - (n + 2) * U32) * fro2
    return max(th + rho, max(t4 - lo ** 4, 0.0) ** 0.25) + gram_error, theta


def eigen_bound(m: torch.Tensor) -> float:
    """An upper bound on lam_max(A): the largest eigenvalue of the smaller Gram matrix, both
    computed in float32, raised by the float32 rounding bounds: the Gram's, |fl(A) - A| <=
    gamma_{n+2} |m|^T |m| so ||fl(A) - A||_2 <= gamma_{n+2} ||m||_F^2 (n the inner dimension; the
    2 for rounding m's float64 entries to float32, which a 1 x 1 float64 m showed), and the
    symmetric eigensolver's backward error, taken as 4 p u ||A||_2 (p the Gram's order; LAPACK's is
    a small multiple of p u)."""
    n, p = max(m.shape), min(m.shape)
    m32 = m.float()
    gram = m32.T @ m32 if gram_side(m) else m32 @ m32.T
    top = float(torch.linalg.eigvalsh(gram)[-1].clamp(min=0))
    fro2 = float((m.double() ** 2).sum())
    return top * (1.0 + 4.0 * p * U32) + (n + 2) * U32 / (1.0 - (n + 2) * U32) * fro2


def spectral_bound(m: torch.Tensor) -> tuple[float, str]:
    """(an upper bound on ||m||_2, the rule that gave it: "trace", "quartic" or "eigen"): the
    cheapest bound on lam_max within TIGHT of the Ritz value (module docstring)."""
    if m.numel() == 0:
        return 0.0, "trace"
    ritz = ritz_pair(m)
    bound, theta = trace_bound(m, ritz)
    if bound <= (1.0 + TIGHT) * theta:
        return bound ** 0.5, "trace"
    quartic, _ = quartic_bound(m, ritz)
    if quartic <= (1.0 + TIGHT) * theta:
        return min(bound, quartic) ** 0.5, "quartic"
    return min(bound, quartic, eigen_bound(m)) ** 0.5, "eigen"
