"""The convolution's scan paths of issue #19 equal per-sample autograd gradients: per-sample
gradients by the grouped weight-gradient kernel (reconstruct, each_reconstruct, the matrix query
side), and the X Gram of a few-pixel input as one product with a dense tap matrix (iterate and
each_iterate on VGG's 2x2 and 1x1 maps), every query sample kept apart."""
import pytest
import torch
from hypothesis import example, given, settings

from metaql.engine import operators as ops
from metaql.storage.layers import conv, kind_named
from tests.test_operators import _conv_grads, conv_dims, conv_module

MATRIX = {"each_iterate": ops.pairwise_iterate, "each_gradient": ops.pairwise_gradient,
          "each_reconstruct": ops.pairwise_reconstruct}


def _case(p):
    gen = torch.Generator().manual_seed(p["seed"])
    module = conv_module(p)
    size = (p["size"],) * p["dims"]
    inputs = torch.randn(p["n"] + p["b"], module.in_channels, *size, generator=gen)
    with torch.no_grad():
        out_shape = module(inputs[:1]).shape[1:]
    dout = torch.randn(p["n"] + p["b"], *out_shape, generator=gen)
    n = p["n"]
    return module, {"I": inputs[:n], "DO": dout[:n]}, {"I": inputs[n:], "DO": dout[n:]}


def _usable(p) -> bool:
    return ((p["k"] - 1) * p["dilation"] + 1 <= p["size"] + 2 * p["padding"]
            and (p["mode"] == "zeros" or p["padding"] < p["size"]))


@settings(max_examples=10, deadline=None)
@given(conv_dims)
@example({"dims": 2, "groups": 1, "cin_per": 3, "cout_per": 2, "k": 3, "stride": 1, "dilation": 1, "padding": 1,
          "mode": "zeros", "size": 2, "bias": True, "n": 3, "b": 3, "seed": 1})    # VGG conv13's 2x2: dense taps
@example({"dims": 2, "groups": 1, "cin_per": 2, "cout_per": 3, "k": 3, "stride": 2, "dilation": 1, "padding": 1,
          "mode": "zeros", "size": 2, "bias": False, "n": 2, "b": 2, "seed": 5})    # a 1x1 output
def test_conv_matrix_strategies_equal_autograd(p):
    from hypothesis import assume
    assume(_usable(p))
    module, train, query = _case(p)
    kind = kind_named("conv")
    meta = kind.meta("conv", module)
    g, gq = _conv_grads(module, train["I"], train["DO"]), _conv_grads(module, query["I"], query["DO"])
    expected = g @ gq.T                                                          # (N, B)
    scale = g.norm(dim=1)[:, None] * gq.norm(dim=1)[None, :]
    assert (ops.gradients(kind, meta, train).double().flatten(1) - g).abs().max() <= 1e-4 * g.abs().max() + 1e-12
    for name, fn in MATRIX.items():
        q = ops.pairwise_query_side(kind, meta, query, {"rows", "grads", "flat"}, norms=False)
        got = fn(kind, meta, train, q).double()
        assert got.shape == expected.shape, name
        assert ((got - expected).abs() <= 1e-4 * scale + 1e-12).all(), name


@pytest.mark.parametrize("size,padding,dense", [((2, 2), 1, True), ((1, 1), 1, True), ((3, 3), 0, True),
                                                 ((2, 3), 1, True)])
def test_dense_taps_matrix_is_used_and_exact(size, padding, dense):
    """The dense tap matrix is taken on few-pixel inputs and gives the patches' Gram exactly."""
    module = torch.nn.Conv2d(3, 2, 3, padding=padding)
    kind = kind_named("conv")
    meta = kind.meta("dense", module)
    torch.manual_seed(0)
    inp = torch.randn(4, 3, *size)
    with torch.no_grad():
        out = module(inp)
    factors = {"I": inp, "DO": torch.randn_like(out)}
    xr = kind.flat_rows(meta, kind.rows(meta, {"I": torch.randn(5, 3, *size), "DO": torch.randn(5, *out.shape[1:])})[0])
    made = conv._dense_taps(meta, *conv._conv_input(meta, inp)[:1], xr, conv._conv_input(meta, inp)[1])
    assert (made is not None) == dense
    x = kind.rows(meta, factors)[0]
    want = torch.einsum("nsi,ri->nsr", x.double(), xr.double()) + 1.0
    assert (kind.gram_x_factors(meta, factors, xr).double() - want).abs().max() < 1e-4 * want.abs().max()


def _small_case(seed):
    """A 2->2 3x3 convolution on 4x4 inputs, 5 training and 3 query samples, and their autograd
    gradients: (kind, meta, train factors, query factors, g, gq)."""
    module = torch.nn.Conv2d(2, 2, 3, padding=1, bias=True)
    kind = kind_named("conv")
    torch.manual_seed(seed)
    train = {"I": torch.randn(5, 2, 4, 4), "DO": torch.randn(5, 2, 4, 4)}
    query = {"I": torch.randn(3, 2, 4, 4), "DO": torch.randn(3, 2, 4, 4)}
    g, gq = _conv_grads(module, train["I"], train["DO"]), _conv_grads(module, query["I"], query["DO"])
    return kind, kind.meta("conv", module), train, query, g, gq


def test_reconstruct_in_blocks_of_samples(monkeypatch):
    """reconstruct and each_reconstruct build the gradients a few samples at a time: the blocks
    put together give every sample's scores, in order."""
    monkeypatch.setattr(ops, "GRADIENT_BLOCK_NUMBERS", 100)       # 2 samples a block of 49 params
    kind, meta, train, query, g, gq = _small_case(3)       # params: 2 * (18 + 1) = 38
    assert len(list(ops.gradient_blocks(meta, train))) == 3
    q = ops.pairwise_query_side(kind, meta, query, {"flat"}, norms=False)
    assert (ops.pairwise_reconstruct(kind, meta, train, q).double() - g @ gq.T).abs().max() < 1e-4
    single = ops.query_side(kind, meta, query)
    assert (ops.reconstruct(kind, meta, train, single).double() - (g @ gq.T).mean(1)).abs().max() < 1e-4


def test_forward_convolutions_in_blocks_of_samples(monkeypatch):
    """batch_average and each_gradient run the convolution a block of samples at a time (its output
    in cache): the blocks together give every sample's scores, in order."""
    monkeypatch.setattr(conv, "CONV_BLOCK_NUMBERS", 40)      # outputs of 2 x 16 = 32: one sample a block
    kind, meta, train, query, g, gq = _small_case(4)
    assert len(conv.sample_blocks(5, 32)) == 5
    single = ops.query_side(kind, meta, query)
    assert (ops.batch_average(kind, meta, train, single).double() - (g @ gq.T).mean(1)).abs().max() < 1e-4
    q = ops.pairwise_query_side(kind, meta, query, {"grads"}, norms=False)
    assert (ops.pairwise_gradient(kind, meta, train, q).double() - g @ gq.T).abs().max() < 1e-4


def test_dense_tap_matrix_is_shared_by_chunks_and_dropped_with_the_query():
    import gc
    kind = kind_named("conv")
    meta = kind.meta("cache", torch.nn.Conv2d(4, 4, 3, padding=1))
    xr = torch.randn(8, 36)
    first = kind.gram_x_factors(meta, {"I": torch.randn(3, 4, 2, 2)}, xr)
    made = conv._DENSE_CACHE[0][2]
    kind.gram_x_factors(meta, {"I": torch.randn(2, 4, 2, 2)}, xr)          # the next chunk
    assert conv._DENSE_CACHE[0][2] is made and first.shape == (3, 4, 8)
    del xr
    gc.collect()
    assert not conv._DENSE_CACHE


@settings(max_examples=15, deadline=None)
@given(conv_dims)
def test_conv_positions_from_shapes_equal_the_unfolded_rows(p):
    """S from the output gradient's shape equals the rows the canonical form unfolds, groups and
    stacked calls (a module called twice per sample) included."""
    from hypothesis import assume
    from metaql.storage.layers.base import LayerKind
    assume(_usable(p))
    module, train, _ = _case(p)
    kind = kind_named("conv")
    meta = kind.meta("conv", module)
    assert kind.positions(meta, train) == LayerKind.positions(kind, meta, train)
    calls = {name: torch.stack([t, t], dim=1) for name, t in train.items()}
    assert kind.positions(meta, calls) == LayerKind.positions(kind, meta, calls)


@settings(max_examples=12, deadline=None)
@given(conv_dims)
@example({"dims": 2, "groups": 1, "cin_per": 3, "cout_per": 2, "k": 3, "stride": 1, "dilation": 1, "padding": 1,
          "mode": "zeros", "size": 2, "bias": True, "n": 3, "b": 3, "seed": 7})     # VGG conv13's 2x2
@example({"dims": 2, "groups": 1, "cin_per": 2, "cout_per": 3, "k": 3, "stride": 1, "dilation": 1, "padding": 1,
          "mode": "reflect", "size": 2, "bias": False, "n": 2, "b": 2, "seed": 8})  # padded before the taps
def test_forward_convolutions_on_few_pixels_by_the_dense_tap_matrix(p):
    """batch_average and each_gradient on inputs of a few pixels run as one product with the dense
    tap matrix of Gbar (or of every query gradient), no convolution kernel called, and equal
    per-sample autograd gradients."""
    from hypothesis import assume
    assume(_usable(p) and p["groups"] == 1)
    p = dict(p, size=min(p["size"], 2))
    assume(_usable(p))
    module, train, query = _case(p)
    kind = kind_named("conv")
    meta = kind.meta("conv", module)
    g, gq = _conv_grads(module, train["I"], train["DO"]), _conv_grads(module, query["I"], query["DO"])
    single = ops.query_side(kind, meta, query)
    matrix = ops.pairwise_query_side(kind, meta, query, {"grads"}, norms=False)
    inp, padding = conv._conv_input(meta, train["I"])
    dense = conv.dense_forward(meta, inp, single["gbar"][:, :meta.din], padding, single["gbar"]) is not None
    called, kernel = [], conv._conv
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conv, "_conv", lambda *a, **k: called.append(1) or kernel(*a, **k))
        got_single = ops.batch_average(kind, meta, train, single).double()
        got_matrix = ops.pairwise_gradient(kind, meta, train, matrix).double()
    assert not (dense and called), "a few-pixel input with dense taps ran the convolution kernel"
    scale = g.norm(dim=1)[:, None] * gq.norm(dim=1)[None, :]
    assert ((got_matrix - g @ gq.T).abs() <= 1e-4 * scale + 1e-12).all()
    assert ((got_single - (g @ gq.T).mean(1)).abs() <= 1e-4 * scale.mean(1) + 1e-12).all()


def test_dense_forward_is_taken_on_2x2_and_refused_on_larger_maps_or_matrices(monkeypatch):
    kind = kind_named("conv")
    meta = kind.meta("d", torch.nn.Conv2d(4, 5, 3, padding=1))
    w = torch.randn(5, 36)
    assert conv.dense_forward(meta, torch.randn(2, 4, 2, 2), w, (1, 1), w) is not None
    assert conv.dense_forward(meta, torch.randn(2, 4, 8, 8), w, (1, 1), w) is None          # many pixels
    monkeypatch.setattr(conv, "DENSE_MAX_NUMBERS", 100)
    assert conv.dense_forward(meta, torch.randn(2, 4, 2, 2), w, (1, 1), w) is None          # matrix too large
