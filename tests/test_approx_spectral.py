"""The index certificate's spectral-norm bounds (metaql.approx.spectral): each is an upper bound on
||m||_2 (against torch.linalg.matrix_norm(ord=2) in float64) on hypothesis-drawn matrices, with the
Lanczos Ritz pair converged or not, and the cascade is within TIGHT of the norm."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaql.approx.spectral import RULES, TIGHT, cheap_bounds, eigen_bound, gram, ritz_pair, spectral_bound

SPECTRA = ("flat", "decaying", "rank_one_noise", "two_equal", "cluster", "zero")


def drawn(rows: int, cols: int, spectrum: str, scale_exp: int, seed: int) -> torch.Tensor:
    """A float64 rows x cols matrix U diag(s) V^T of the named singular-value profile, scaled by
    10^scale_exp."""
    g = torch.Generator().manual_seed(seed)
    p = min(rows, cols)
    u = torch.linalg.qr(torch.randn(rows, p, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, p, generator=g, dtype=torch.float64))[0]
    i = torch.arange(p, dtype=torch.float64)
    s = {"flat": torch.rand(p, generator=g, dtype=torch.float64) * 0.2 + 0.8,
         "decaying": torch.rand(p, generator=g, dtype=torch.float64) ** 4,
         "rank_one_noise": torch.where(i == 0, 1.0, 1e-3 * torch.rand(p, generator=g, dtype=torch.float64)),
         "two_equal": torch.where(i < 2, 1.0, 0.3 * torch.rand(p, generator=g, dtype=torch.float64)),
         "cluster": 1.0 - 0.05 * i / max(p, 1),
         "zero": torch.zeros(p, dtype=torch.float64)}[spectrum]
    return (u * s) @ v.T * 10.0 ** scale_exp


matrices = st.builds(drawn, st.integers(1, 70), st.integers(1, 70), st.sampled_from(SPECTRA),
                     st.integers(-6, 6), st.integers(0, 2 ** 16))


@settings(max_examples=150, deadline=None)
@given(m=matrices, steps=st.integers(1, 8), transpose=st.booleans())
def test_every_bound_is_above_the_spectral_norm(m, steps, transpose):
    """The trace, tr(A^4) and tr(A^8) bounds (all three, whether or not the cascade would accept
    them, from a Ritz pair of 1-8 Lanczos steps, so often unconverged) and eigen_bound are >=
    ||m||_2^2; the Ritz value itself is not an upper bound (and not what the certificate may use)."""
    m = m.T if transpose else m
    lam = float(torch.linalg.matrix_norm(m, ord=2)) ** 2
    bounds, theta = cheap_bounds(m, steps)
    assert len(bounds) == len(RULES)
    assert theta <= lam * (1 + 1e-5) + 1e-300          # a Rayleigh quotient of the float32 Gram
    assert all(b >= lam for b in bounds), (bounds, lam)
    assert eigen_bound(m) >= lam
    bound, rule = spectral_bound(m)
    assert bound >= math.sqrt(lam)
    assert bound <= math.sqrt(1.0 + TIGHT) * math.sqrt(lam) * (1 + 1e-6) + 1e-300 or rule == "eigen"


@settings(max_examples=60, deadline=None)
@given(m=matrices)
def test_the_cascade_is_within_tight_of_the_norm(m):
    """The bound the certificate uses is at most sqrt(1 + TIGHT) (0.5%) above ||m||_2 (plus the
    eigensolve's rounding margins when it falls back to it)."""
    exact = float(torch.linalg.matrix_norm(m, ord=2))
    bound, _ = spectral_bound(m)
    assert exact <= bound <= math.sqrt(1.0 + TIGHT) * exact * (1 + 1e-5) + 1e-300


def test_an_unconverged_ritz_value_is_below_the_norm():
    """Why the residual and trace terms are needed: one Lanczos step on a flat spectrum leaves the
    Ritz value well below lam_max (a bound that returned it would fail the tests above)."""
    m = drawn(60, 40, "flat", 0, 3)
    lam = float(torch.linalg.matrix_norm(m, ord=2)) ** 2
    theta, rho = ritz_pair(gram(m), 1)
    assert theta < 0.99 * lam and rho > 0
    assert min(cheap_bounds(m, 1)[0]) >= lam


@pytest.mark.parametrize("values,rule", [([1.0] + [1e-3] * 49, "trace"), ([1.0, 1.0] + [1e-3] * 48, "trace"),
                                         ([1.0] + [0.5 ** 0.5] * 3, "quartic"),
                                         ([1.0] + [0.6 ** 0.5] * 12, "octic"),
                                         ([1.0 - 0.05 * i / 40 for i in range(40)], "eigen")])
def test_the_cascade_stops_at_the_cheapest_tight_bound(values, rule):
    """Nearly rank one (the MiniLM's query residuals) and a repeated top value stop at the trace
    bound; singular values 1 and sqrt(1/2) x 3 (traces: 1 + 1.5 in A, 1 + 3/16 in A^4) at the quartic
    one; 1 and sqrt(0.6) x 12 (rest of A^4: 1.55^(1/4), of A^8: 0.20^(1/8)) at the tr(A^8) one; a cluster
    of 40 values within 5% goes to the eigensolve."""
    g = torch.Generator().manual_seed(0)
    p = len(values)
    u = torch.linalg.qr(torch.randn(80, p, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(60, p, generator=g, dtype=torch.float64))[0]
    m = (u * torch.tensor(values, dtype=torch.float64)) @ v.T
    bound, got = spectral_bound(m)
    assert got == rule
    assert float(torch.linalg.matrix_norm(m, ord=2)) <= bound
