"""Warm scans without per-scan fixed costs (issue #19): the D Gram of a few-position convolution
as one product with a block-diagonal matrix of the query rows (exact on drawn shapes), the matrix
strategies' tap matrices made once per scan and not once per chunk, and a shard's tensor views
made once per open shard."""
from unittest import mock

import numpy as np
import torch
from hypothesis import assume, example, given, settings, strategies as st

from metaql.engine import executor, matrix, operators as ops
from metaql.engine.plan import Strategy
from metaql.storage.layers import conv, kind_named
from metaql.storage.tensorfile import Shard, write_shard
from tests.test_operators import _conv_grads, conv_module

# convolutions whose outputs have few positions (1-4: the block-diagonal D Gram), any stride,
# dilation and padding mode; groups > 1 take the general rows and must give the same scores
few_positions = st.fixed_dictionaries({
    "dims": st.sampled_from([1, 2]), "groups": st.sampled_from([1, 1, 2]), "cin_per": st.integers(1, 3),
    "cout_per": st.integers(1, 3), "k": st.integers(1, 3), "stride": st.integers(1, 3), "dilation": st.integers(1, 2),
    "padding": st.sampled_from([0, 1]), "mode": st.sampled_from(["zeros", "reflect", "circular"]),
    "size": st.integers(1, 4), "bias": st.booleans(), "n": st.integers(1, 5), "b": st.integers(1, 3),
    "seed": st.integers(0, 2**16)})


def _drawn(p):
    """(kind, meta, train factors, query factors, autograd gradients of both) of a draw, or None
    where the shapes are not a valid convolution."""
    if (p["k"] - 1) * p["dilation"] + 1 > p["size"] + 2 * p["padding"] or \
            (p["mode"] != "zeros" and p["padding"] >= p["size"]):
        return None
    # in float64: a sum over positions can cancel to far below its terms, and float32 rounding of
    # the terms (in autograd's answer as in the engine's) then exceeded any tolerance scaled to the result
    module = conv_module(p).double()
    gen = torch.Generator().manual_seed(p["seed"])
    inputs = torch.randn(p["n"] + p["b"], module.in_channels, *(p["size"],) * p["dims"], generator=gen,
                         dtype=torch.float64)
    with torch.no_grad():
        out_shape = module(inputs[:1]).shape[1:]
    dout = torch.randn(p["n"] + p["b"], *out_shape, generator=gen, dtype=torch.float64)
    n = p["n"]
    train, query = {"I": inputs[:n], "DO": dout[:n]}, {"I": inputs[n:], "DO": dout[n:]}
    kind = kind_named("conv")
    return (kind, kind.meta("conv", module), train, query,
            _conv_grads(module, train["I"], train["DO"]), _conv_grads(module, query["I"], query["DO"]))


@settings(max_examples=40, deadline=None)
@given(few_positions)
@example({"dims": 2, "groups": 1, "cin_per": 3, "cout_per": 2, "k": 3, "stride": 1, "dilation": 1, "padding": 1,
          "mode": "zeros", "size": 2, "bias": True, "n": 4, "b": 1, "seed": 1})     # VGG conv13's 2x2, B = 1
@example({"dims": 2, "groups": 1, "cin_per": 2, "cout_per": 3, "k": 2, "stride": 2, "dilation": 2, "padding": 1,
          "mode": "zeros", "size": 3, "bias": False, "n": 3, "b": 2, "seed": 7})     # stride and dilation, 2x2 out
@example({"dims": 2, "groups": 1, "cin_per": 1, "cout_per": 1, "k": 1, "stride": 1, "dilation": 1, "padding": 1,
          "mode": "zeros", "size": 3, "bias": False, "n": 1, "b": 3, "seed": 1977})  # a sum that cancels (below)
def test_iterate_on_few_positions_equals_autograd(p):
    """iterate and each_iterate, whose D Gram on <= 4 output positions is one block-diagonal
    product, equal torch autograd's per-sample gradients; the block-diagonal product is taken
    wherever the stored output gradient is plain and the query rows few."""
    case = _drawn(p)
    assume(case is not None)
    kind, meta, train, query, g, gq = case
    expected = g @ gq.T
    # the engine computes in float32: its rounding is relative to the terms summed over positions,
    # which may cancel to far below them (seed 1977: 1.0e-6 off a score of 2.1e-3 whose terms are
    # ~100x larger), so the tolerance holds a part scaled to the factors' norms (taps: unfold's
    # copies of each input value)
    taps = p["k"] ** p["dims"]
    terms = _factor_norms(train, taps)[:, None] * _factor_norms(query, taps)[None, :]
    scale = g.norm(dim=1)[:, None] * gq.norm(dim=1)[None, :] + 1e-2 * terms + 1e-12   # tolerance 1e-4 x scale
    with mock.patch.object(conv, "_block_diagonal", wraps=conv._block_diagonal) as spy:
        pair = ops.pairwise_iterate(kind, meta, train, ops.pairwise_query_side(kind, meta, query, {"rows"}, norms=False))
        single = ops.iterate(kind, meta, train, ops.query_side(kind, meta, query, {"rows"}, norm=False))
    made = [c.args[1] for c in spy.call_args_list]
    assert ((pair.double() - expected).abs() <= 1e-4 * scale).all()
    assert ((single.double() - expected.mean(1)).abs() <= 1e-4 * scale.mean(1)).all()
    positions = kind.positions(meta, train)
    if conv._plain(meta, train["I"]) and positions <= conv.BLOCK_DIAGONAL_MAX_POSITIONS \
            and positions * p["b"] < conv.TAPS_ONE_PRODUCT_BELOW:
        assert made and set(made) == {positions}


def _factor_norms(factors: dict, taps: int) -> torch.Tensor:
    """Per sample ||unfold(I)||_F ||DO||_F >= the sum over positions of |x_t| |d_t| (Cauchy-Schwarz)."""
    return factors["I"].flatten(1).norm(dim=1) * taps ** 0.5 * factors["DO"].flatten(1).norm(dim=1)


def test_block_diagonal_d_gram_equals_the_per_sample_products():
    """conv13's shapes (512 channels, 2x2 outputs, R = 4 query rows): the block-diagonal product
    equals the per-sample products it replaces, and is kept for the chunks of one scan."""
    torch.manual_seed(0)
    kind = kind_named("conv")
    meta = kind.meta("c13", torch.nn.Conv2d(512, 512, 3, padding=1))
    dout, dr = torch.randn(7, 512, 2, 2), torch.randn(4, 512)
    d = kind.d_rows(meta, {"DO": dout})
    want = torch.einsum("nlc,rc->nlr", d.double(), dr.double())
    assert (kind.gram_d(meta, d, dr).double() - want).abs().max() < 1e-4 * want.abs().max()
    first = conv._BLOCK_CACHE[0][2]
    kind.gram_d(meta, kind.d_rows(meta, {"DO": torch.randn(3, 512, 2, 2)}), dr)
    assert conv._BLOCK_CACHE[0][2] is first


class _Catalog:
    def __init__(self, meta):
        self.meta = meta

    def layer_meta(self, layer):
        return self.meta, "factored"


class _Ctx:
    def check_interrupt(self):
        pass


def test_matrix_scan_makes_the_dense_tap_matrix_once_for_all_chunks(monkeypatch):
    """each_iterate over several chunks of a 2x2 convolution builds its dense tap matrix once (a
    fresh query slice per chunk rebuilt it every chunk), with the scores of one chunk at a time."""
    torch.manual_seed(1)
    module = torch.nn.Conv2d(3, 2, 3, padding=1)
    kind = kind_named("conv")
    meta = kind.meta("conv", module)
    train = {"I": torch.randn(9, 3, 2, 2), "DO": torch.randn(9, 2, 2, 2)}
    query = {"I": torch.randn(2, 3, 2, 2), "DO": torch.randn(2, 2, 2, 2)}
    q = ops.pairwise_query_side(kind, meta, query, {"rows"}, norms=False)
    builds = []
    original = conv._kept_for

    def counted(cache, key, rows, build):
        return original(cache, key, rows, lambda: builds.append(cache is conv._DENSE_CACHE) or build())
    monkeypatch.setattr(conv, "_kept_for", counted)
    monkeypatch.setattr(executor, "CHUNK_NUMBERS", 2000)     # 2 samples a chunk, both query samples at once
    source = [(np.arange(9), np.arange(9), train)]
    parts = list(matrix.layer_block(_Catalog(meta), Strategy("c0", "conv", "each_iterate"), source, q, 0, 9,
                                    False, "cpu", _Ctx()))
    assert len(parts) >= 3
    assert builds.count(True) == 1
    got = np.concatenate([s for _, s, _ in parts])
    expected = (_conv_grads(module, train["I"], train["DO"]) @ _conv_grads(module, query["I"], query["DO"]).T).numpy()
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()


def test_shard_tensors_are_made_once_per_open_shard(tmp_path):
    """A warm scan asks an open shard for its tensors every time: the same views come back, equal
    to what was written."""
    t = torch.randn(5, 3, 2)
    write_shard(tmp_path / "s.arrow", np.arange(5), {"I": t})
    for shard in (Shard(tmp_path / "s.arrow"), _buffer_shard(tmp_path / "s.arrow")):
        first = shard.tensor("I")
        assert shard.tensor("I") is first
        assert torch.equal(first, t) and list(shard.ids) == list(range(5))


def _buffer_shard(path):
    """The object-storage form a Ray worker reads (distributed/shards.py); its own copy of Shard's
    reading lacked the views' cache, so every scan from S3 failed with an AttributeError."""
    import pyarrow as pa
    from metaql.distributed.shards import BufferShard
    return BufferShard(str(path), pa.py_buffer(path.read_bytes()))
