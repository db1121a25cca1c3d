"""ELITE's exact speed changes (issue #19): the 2 x 2 max pool and the written-out loss gradient
equal what they replace, bit for bit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from metaql.cleaning import pooling
from metaql.cleaning.pooling import MIN_ELEMENTS, MaxPool2x2
from metaql.cleaning.pseudo_labels import training_coefficients, training_loss


def pooled_and_grad(pool, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    out = pool(x)
    return out.detach(), torch.autograd.grad(out, x, g)[0]


@pytest.mark.parametrize("shape", [(64, 16, 8, 8), (40, 32, 7, 9), (3, 2, 5, 4)])
@pytest.mark.parametrize("values", ["normal", "ties", "nan"])
def test_max_pool_equals_max_pool2d_in_values_ties_and_gradients(shape, values):
    g = torch.Generator().manual_seed(sum(shape))
    # few distinct values make ties common (as on digits' flat background); max_pool2d keeps the
    # first maximum of a window and lets NaN win, and the gradient follows that choice
    x = torch.randn(shape, generator=g) if values == "normal" else torch.randint(0, 3, shape, generator=g).float()
    if values == "nan":
        x[0, 0, 0, 1] = x[0, 0, 1, 1] = x[-1, -1, 1, 0] = float("nan")
    grad_out = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, generator=g)
    want_out, want_grad = pooled_and_grad(lambda t: F.max_pool2d(t, 2), x, grad_out)
    got_out, got_grad = pooled_and_grad(MaxPool2x2(), x, grad_out)
    assert torch.equal(got_out.isnan(), want_out.isnan())
    assert torch.equal(got_out.nan_to_num(), want_out.nan_to_num())
    assert torch.equal(got_grad, want_grad)


def test_max_pool_fast_path_is_taken_and_twice_differentiable(monkeypatch):
    x = torch.randn(MIN_ELEMENTS // 64 + 1, 4, 4, 4, requires_grad=True)
    assert type(MaxPool2x2()(x).grad_fn).__name__ == "_MaxPool2x2Backward"
    # ELITE's meta_gradient='virtual' differentiates the backward: check it on a small map,
    # in double, with the channels-last path forced
    monkeypatch.setattr(pooling, "MIN_ELEMENTS", 0)
    small = torch.randn(1, 1, 4, 4, dtype=torch.double, requires_grad=True)
    assert type(MaxPool2x2()(small).grad_fn).__name__ == "_MaxPool2x2Backward"
    assert torch.autograd.gradgradcheck(MaxPool2x2(), (small,))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 150), seed=st.integers(0, 10_000), anomaly_loss=st.sampled_from(["hinge", "linear"]),
       eta_m=st.floats(0.1, 10.0))
def test_training_coefficients_equal_autograd_bit_for_bit(n, seed, anomaly_loss, eta_m):
    g = torch.Generator().manual_seed(seed)
    margin = 1.0
    omega = torch.rand(n, generator=g) * 2
    omega[torch.rand(n, generator=g) < 0.2] = margin                  # on the hinge's corner
    meta = torch.randn(n, generator=g) * 1e-3
    meta[torch.rand(n, generator=g) < 0.2] = 0.0                       # y = 0: no opinion
    leaf = omega.clone().requires_grad_()
    want, = torch.autograd.grad(training_loss(leaf, meta, eta_m, margin, anomaly_loss), leaf)
    assert torch.equal(training_coefficients(omega, meta, eta_m, margin, anomaly_loss), want)
