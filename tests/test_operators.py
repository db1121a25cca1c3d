"""Every strategy equals brute force on explicitly built full gradients, for every layer kind's
canonical-form primitives (dense rows; an embedding's id rows)."""
import torch
from hypothesis import given
from hypothesis import strategies as st

from metaql.engine import operators as ops
from metaql.storage.layers import LayerMeta, kind_named
from tests.bruteforce import rel_err

dims = st.fixed_dictionaries({"n": st.integers(1, 6), "b": st.integers(1, 5), "s": st.integers(1, 4),
                              "sq": st.integers(1, 4), "din": st.integers(1, 6), "dout": st.integers(1, 6),
                              "kind": st.sampled_from(["linear", "embedding"]), "seed": st.integers(0, 2**16)})


def _factors(kind, n, s, din, dout, gen):
    if kind == "embedding":   # din = embedding dim, dout = vocabulary
        return {"ids": torch.randint(0, dout, (n, s), generator=gen), "D": torch.randn(n, s, din, generator=gen)}
    return {"X": torch.randn(n, s, din, generator=gen), "D": torch.randn(n, s, dout, generator=gen)}


@given(dims)
def test_strategies_equal_full_gradient_inner_products(p):
    gen = torch.Generator().manual_seed(p["seed"])
    kind = kind_named(p["kind"])
    meta = LayerMeta("l", p["kind"], p["din"], p["dout"], p["kind"] == "linear")
    train = _factors(p["kind"], p["n"], p["s"], p["din"], p["dout"], gen)
    query = _factors(p["kind"], p["b"], p["sq"], p["din"], p["dout"], gen)   # may have other row counts
    g, gq = kind.full(meta, train).double(), kind.full(meta, query).double()
    expected = (g @ gq.T).mean(dim=1)
    q = ops.query_side(kind, meta, query)
    for name, strategy in ops.FACTORED.items():
        assert rel_err(strategy(kind, meta, train, q), expected) < 1e-4, name
    assert rel_err(ops.full_dot(g.float(), q), expected) < 1e-4
    assert rel_err(ops.squared_norm(kind, meta, train), (g * g).sum(1)) < 1e-4
