"""Rigorous upper bounds on a matrix's spectral norm ||m||_2, cheapest first.

The index TOPK's certificate (metaql.approx.indexed) needs an upper bound on ||R||_2 and
||R P_in||_2 of every indexed layer's query residual R; a full symmetric eigensolve of the
smaller Gram matrix (`eigen_bound`) was 60% of the query's split on the MiniLM (36 layers,
R up to 1536 x 385). A few power steps find its top
eigenvalue, and the rest of the spectrum is bounded by traces of powers of the Gram matrix, which
cost matrix products, not an eigensolve:

A = m^T m (or m m^T, the smaller; positive semidefinite), formed in float32 (A32) as the eigensolve
did; every bound below is on lam_max(A32), raised by ||A - A32||_2 <= gamma_{n+2} ||m||_F^2 (Weyl;
n the inner dimension, 2 for rounding m's entries to float32, 1 for symmetrising). Power steps
with A32^2 give a unit vector x with Rayleigh quotient theta and residual rho = ||A32 x - theta x||; some eigenvalue lam_j
of A32 lies in [theta - rho, theta + rho] (Weinstein's bound for a symmetric matrix), so with
lo = max(theta - rho, 0) and the other eigenvalues at least -||A - A32||_2 (near zero; taken as 0
after the shift below),
    lam_max <= max(theta + rho, (tr(A^(2^j)) - lo^(2^j))^(2^-j))     j = 0, 2, 3: tr(A), ||A^2||_F^2,
                                                                      ||A^4||_F^2
(`power_bounds`). Each squaring costs one p x p product (p the Gram's order), the eigensolve about
ten. `spectral_bound` takes the first whose bound is within TIGHT of theta (a lower bound on
lam_max), else the eigensolve, so the bound used is at most (1 + TIGHT) lam_max, 0.5% on the norm:
the certificate's sigmas move by at most that. On the MiniLM's query residuals R (N = 1,000 store,
72 norms) the trace never was (R keeps a spread spectrum once the index's top-2 subspaces are
taken out), tr(A^4) was in 68, tr(A^8) in 2, 2 went to the eigensolve; the norms took 0.31 s of CPU
against the eigensolve's 0.35 (the Gram, 0.14 s, is in both). Every bound includes its
floating-point rounding margins.
"""
from __future__ import annotations

import math

import torch

U32, U64 = 2.0 ** -24, 2.0 ** -53
TIGHT = 0.01           # a cheap bound on lam_max is used when at most 1 + TIGHT times the Ritz value
STEPS = 20             # power steps with A32^2 (each costs p^2; the squarings p^3): on the MiniLM N = 1,000
                       # residuals, 4 steps left 37 of 72 norms to the eigensolve, 10 left 7, 20 left 2


def gram(m: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of m (m^T m or m m^T) in float32, symmetrised (the product need not
    be exactly symmetric, and Weinstein's bound is for a symmetric matrix)."""
    m32 = m.float()
    a = m32.T @ m32 if m.shape[0] >= m.shape[1] else m32 @ m32.T
    return (a + a.T) * 0.5


def gram_error(m: torch.Tensor, fro2: float) -> float:
    """A bound on ||A - A32||_2: |fl(A) - A| <= gamma_{n+3} |m|^T |m|, whose norm is at most
    gamma_{n+3} ||m||_F^2 (n the inner dimension; 2 for rounding m's float64 entries to float32,
    which a 1 x 1 float64 m showed, 1 for the symmetrising sum; halving is exact, and the symmetric
    part of a perturbation of the symmetric A is no larger than it)."""
    n = max(m.shape) + 3
    return n * U32 / (1.0 - n * U32) * fro2


def ritz_pair(a: torch.Tensor, steps: int = STEPS, square: torch.Tensor | None = None) -> tuple[float, float]:
    """(theta, rho): the Rayleigh quotient of the symmetric a (float64) at a unit vector x, and the
    residual ||a x - theta x|| raised by its float64 rounding (|fl(a x) - a x| <= gamma_p |a| |x|,
    at most gamma_p ||a||_F, taken 4x with the inner products and x's normalisation). x is `steps`
    power steps with a's square (`square`: fl(B B) of B = a / power_scale(a), or computed) from a seeded start (the same in
    every process): a^(2 steps) separates the top eigenvalue fast, and x's own rounding does not
    matter, theta and rho being computed from it."""
    a64 = a.double()
    p = a.shape[0]
    if square is None:
        b = a.float() / power_scale(a)
        square = b @ b
    x = torch.randn(p, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    for _ in range(steps):
        y = square @ x
        norm = float(y.norm())
        if not 0.0 < norm < float("inf"):
            break                                  # a null start (or a non-finite a): x as it is
        x = y / norm
    x = x.double()
    x = x / x.norm()
    ax = a64 @ x
    theta = float(x @ ax)
    margin = 4.0 * (p + 8) * U64 / (1.0 - (p + 8) * U64) * float(a64.norm())
    return theta, float((ax - theta * x).norm()) + margin


def power_scale(a32: torch.Tensor) -> float:
    """2^e with ||A32 / 2^e||_F near 1 (dividing by it is exact): float32 powers of a Gram of 1e-11
    underflowed to subnormals (a hypothesis-drawn case), of 1e12 they would overflow."""
    return 2.0 ** round(math.log2(max(float(a32.double().norm()), 1e-300)))


def power_bounds(a32: torch.Tensor, theta: float, rho: float, shift: float, powers: int = 2,
                 square: torch.Tensor | None = None):
    """Yields upper bounds on lam_max(A) (shift: gram_error): from the Ritz pair and tr(A32), then
    ||A32^2||_F^2 = tr(A32^4) and ||A32^4||_F^2 = tr(A32^8) while `powers` allows (module
    docstring), each computed only when the one before is taken. A32's eigenvalues are at least
    -shift (A is semidefinite), so the trace's other eigenvalues are at most tr - lo + (p - 1) shift
    (p - 2 for the others below zero, 1 for lam_j itself when theta - rho < 0 and lo is taken as 0);
    the even powers need no such term (lam^4 >= 0 of either sign). Squares are float32:
    ||fl(B B) - B B||_F <= gamma_p ||B||_F^2, so the error of each computed power (e, in Frobenius
    norm) grows as e' = e (2 ||B^||_F + e) + gamma_p ||B^||_F^2; traces and norms summed in float64
    (relative error at most p^2 u64, taken 2x). square: fl(B B) of B = A32 / power_scale(A32) when
    already computed."""
    p = a32.shape[0]
    g = p * U32 / (1.0 - p * U32)
    lo = max(theta - rho, 0.0)
    top = theta + rho
    tr = float(torch.diagonal(a32).double().sum())
    tr = tr + abs(tr) * 2 * p * U64
    yield max(top, tr - lo + max(p - 1, 0) * shift) + shift
    scale = power_scale(a32)
    b, err, lo = a32 / scale, 0.0, lo / scale
    for j in range(powers):
        fro = float(b.double().norm()) * (1.0 + 2 * p * p * U64)
        b = square if j == 0 and square is not None else b @ b
        err = err * (2.0 * fro + err) + g * fro ** 2
        power = 2 ** (j + 2)                    # tr(A^power) = ||A^(power / 2)||_F^2
        trp = (float(b.double().norm()) * (1.0 + 2 * p * p * U64) + err) ** 2
        yield max(top, scale * max(trp - lo ** power, 0.0) ** (1.0 / power)) + shift


def eigen_bound(m: torch.Tensor, a32: torch.Tensor | None = None) -> float:
    """An upper bound on lam_max(A): the largest eigenvalue of A32 from the float32 symmetric
    eigensolver, raised by its backward error, taken as 4 p u ||A||_2 (p the Gram's order; LAPACK's
    is a small multiple of p u), and by gram_error."""
    a32 = gram(m) if a32 is None else a32
    p = a32.shape[0]
    top = float(torch.linalg.eigvalsh(a32)[-1].clamp(min=0))
    return top * (1.0 + 4.0 * p * U32) + gram_error(m, float((m.double() ** 2).sum()))


def cheap_bounds(m: torch.Tensor, steps: int = STEPS, powers: int = 2) -> tuple[list[float], float]:
    """([bounds on lam_max(A) from tr(A), tr(A^4), tr(A^8)], theta) (module docstring), each with
    the Gram's rounding; theta is a lower bound on lam_max(A32)."""
    a32 = gram(m)
    theta, rho = ritz_pair(a32, steps)
    return list(power_bounds(a32, theta, rho, gram_error(m, float((m.double() ** 2).sum())), powers)), theta


RULES = ("trace", "quartic", "octic")


def spectral_bound(m: torch.Tensor) -> tuple[float, str]:
    """(an upper bound on ||m||_2, the rule that gave it: "trace", "quartic", "octic" or "eigen"):
    the cheapest bound on lam_max within TIGHT of the Ritz value (module docstring)."""
    if m.numel() == 0:
        return 0.0, "trace"
    a32 = gram(m)
    b = a32 / power_scale(a32)
    square = b @ b                     # for the Ritz vector and the tr(A^4) bound
    theta, rho = ritz_pair(a32, square=square)
    best = float("inf")
    shift = gram_error(m, float((m.double() ** 2).sum()))
    for rule, bound in zip(RULES, power_bounds(a32, theta, rho, shift, square=square)):
        best = min(best, bound)
        if bound <= (1.0 + TIGHT) * theta:
            return best ** 0.5, rule
    return min(best, eigen_bound(m, a32)) ** 0.5, "eigen"
