"""Every strategy equals brute force on explicitly built full gradients."""
import torch
from hypothesis import given
from hypothesis import strategies as st

from metaql.engine import operators as ops
from tests.bruteforce import rel_err

dims = st.fixed_dictionaries({"n": st.integers(1, 6), "b": st.integers(1, 5), "s": st.integers(1, 4),
                              "sq": st.integers(1, 4), "din": st.integers(1, 6), "dout": st.integers(1, 6),
                              "seed": st.integers(0, 2**16)})


def _factors(n, s, din, dout, gen):
    return torch.randn(n, s, din, generator=gen), torch.randn(n, s, dout, generator=gen)


@given(dims)
def test_strategies_equal_full_gradient_inner_products(p):
    gen = torch.Generator().manual_seed(p["seed"])
    x, d = _factors(p["n"], p["s"], p["din"], p["dout"], gen)
    # the query side may have a different number of rows per sample
    xq, dq = _factors(p["b"], p["sq"], p["din"], p["dout"], gen)
    g = torch.einsum("nso,nsi->noi", d, x).reshape(p["n"], -1)
    gq = torch.einsum("bso,bsi->boi", dq, xq).reshape(p["b"], -1)
    expected = (g @ gq.T).mean(dim=1)
    gbar = ops.average_gradient(xq, dq)
    assert rel_err(ops.dot_batch_average(x, d, gbar), expected) < 1e-4
    assert rel_err(ops.dot_iterate(x, d, xq, dq), expected) < 1e-4
    assert rel_err(ops.dot_reconstruct(x, d, gbar), expected) < 1e-4
    assert rel_err(ops.dot_full(g, gbar), expected) < 1e-4
    assert rel_err(ops.squared_norm(x, d), (g * g).sum(1)) < 1e-4
