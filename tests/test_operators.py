"""Every strategy equals brute force on explicitly built full gradients, for every layer kind's
canonical-form primitives (dense rows; an embedding's id rows)."""
import pytest
import torch
from hypothesis import example, given, settings
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


conv_dims = st.fixed_dictionaries({
    "dims": st.sampled_from([1, 2]), "groups": st.sampled_from([1, 1, 2]), "cin_per": st.integers(1, 3),
    "cout_per": st.integers(1, 3), "k": st.integers(1, 3), "stride": st.integers(1, 2), "dilation": st.integers(1, 2),
    "padding": st.sampled_from([0, 1, 2]), "mode": st.sampled_from(["zeros", "reflect", "circular"]),
    "size": st.integers(2, 6), "bias": st.booleans(), "n": st.integers(1, 4), "b": st.integers(1, 3),
    "seed": st.integers(0, 2**16)})


def _conv_grads(module, inp, dout) -> torch.Tensor:
    """Per-sample parameter gradients of sum(conv(I_n) * DO_n) by autograd, one sample at a time,
    in the engine's layout: the (Cout, Cin/groups*k [+ bias]) matrix flattened row-major."""
    rows = []
    for i in range(len(inp)):
        module.zero_grad()
        (module(inp[i:i + 1]) * dout[i:i + 1]).sum().backward()
        w = module.weight.grad.reshape(module.out_channels, -1)
        if module.bias is not None:
            w = torch.cat([w, module.bias.grad.unsqueeze(-1)], dim=-1)
        rows.append(w.reshape(-1))
    return torch.stack(rows).double()


@settings(max_examples=40)
def conv_module(p) -> torch.nn.Module:
    """The Conv1d or Conv2d a conv_dims draw describes."""
    conv_type = torch.nn.Conv1d if p["dims"] == 1 else torch.nn.Conv2d
    return conv_type(p["cin_per"] * p["groups"], p["cout_per"] * p["groups"], p["k"], stride=p["stride"],
                     padding=p["padding"], dilation=p["dilation"], groups=p["groups"], bias=p["bias"],
                     padding_mode=p["mode"])


@given(conv_dims)
@example({"dims": 1, "groups": 1, "cin_per": 1, "cout_per": 1, "k": 1, "stride": 1, "dilation": 1, "padding": 1,
          "mode": "reflect", "size": 5, "bias": False, "n": 1, "b": 1, "seed": 2722})   # a score near 0
@example({"dims": 2, "groups": 1, "cin_per": 3, "cout_per": 2, "k": 3, "stride": 1, "dilation": 1, "padding": 1,
          "mode": "zeros", "size": 2, "bias": True, "n": 3, "b": 8, "seed": 1})   # taps one by one: R = 32 rows
def test_conv_strategies_equal_autograd(p):
    """The convolution's own fast paths (correlation for iterate, a forward convolution with Gbar for
    Lemma 7, the weight-gradient kernel for Gbar) equal per-sample autograd gradients."""
    from hypothesis import assume
    assume((p["k"] - 1) * p["dilation"] + 1 <= p["size"] + 2 * p["padding"])   # an output exists
    assume(p["mode"] == "zeros" or p["padding"] < p["size"])                     # torch's own limit
    gen = torch.Generator().manual_seed(p["seed"])
    module = conv_module(p)
    size = (p["size"],) * p["dims"]
    train_in = torch.randn(p["n"], module.in_channels, *size, generator=gen)
    query_in = torch.randn(p["b"], module.in_channels, *size, generator=gen)
    with torch.no_grad():
        out_shape = module(train_in[:1]).shape[1:]
    train = {"I": train_in, "DO": torch.randn(p["n"], *out_shape, generator=gen)}
    query = {"I": query_in, "DO": torch.randn(p["b"], *out_shape, generator=gen)}
    kind = kind_named("conv")
    meta = kind.meta("conv", module)
    g, gq = _conv_grads(module, train["I"], train["DO"]), _conv_grads(module, query["I"], query["DO"])
    expected = (g @ gq.T).mean(dim=1)
    q = ops.query_side(kind, meta, query)
    # errors against the scale of the terms, not of their sum: a score near 0 by cancellation
    # carries float32 rounding of the terms (the im2col path differs from autograd there as well)
    scale = g.norm(dim=1) * gq.norm(dim=1).mean()
    assert (q["gbar_flat"] - gq.mean(0)).norm() <= 1e-4 * gq.norm(dim=1).mean()
    for name, strategy in ops.FACTORED.items():
        assert ((strategy(kind, meta, train, q) - expected).abs() <= 1e-4 * scale + 1e-12).all(), name
    assert rel_err(ops.squared_norm(kind, meta, train), (g * g).sum(1)) < 1e-4


DEVICE_CASES = {
    "conv 2x2 (taps)": (torch.nn.Conv2d(4, 4, 3, padding=1), lambda n: {"I": torch.randn(n, 4, 2, 2), "DO": torch.randn(n, 4, 2, 2)}),
    "conv groups": (torch.nn.Conv2d(4, 4, 3, padding=1, groups=2), lambda n: {"I": torch.randn(n, 4, 5, 5), "DO": torch.randn(n, 4, 5, 5)}),
    "conv 1d reflect": (torch.nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect"), lambda n: {"I": torch.randn(n, 4, 6), "DO": torch.randn(n, 4, 6)}),
    "linear": (torch.nn.Linear(4, 3), lambda n: {"X": torch.randn(n, 2, 4), "D": torch.randn(n, 2, 3)}),
    "embedding": (torch.nn.Embedding(7, 3), lambda n: {"ids": torch.randint(0, 7, (n, 2)), "D": torch.randn(n, 2, 3)}),
}


@pytest.mark.parametrize("case", sorted(DEVICE_CASES))
@pytest.mark.parametrize("b", [1, 8])
def test_operators_stay_on_the_inputs_device(case, b):
    """No operator makes a tensor on the CPU behind the caller's back (the executor runs them on
    CUDA when present). The 'meta' device stands in for a GPU: mixing it with CPU tensors raises."""
    module, make = DEVICE_CASES[case]
    kind = kind_named("conv" if "conv" in case else case)
    meta = kind.meta("l", module)
    train = {k: v.to("meta") for k, v in make(5).items()}
    q = ops.query_side(kind, meta, {k: v.to("meta") for k, v in make(b).items()})
    for name, strategy in ops.FACTORED.items():
        assert strategy(kind, meta, train, q).device.type == "meta", name
    assert ops.squared_norm(kind, meta, train).device.type == "meta"


@pytest.mark.parametrize("kind_name", ["linear", "conv", "conv groups"])
def test_strategies_accept_an_empty_chunk(kind_name):
    module = {"linear": torch.nn.Linear(4, 3), "conv": torch.nn.Conv2d(2, 3, 3, padding=1),
              "conv groups": torch.nn.Conv2d(2, 4, 3, padding=1, groups=2)}[kind_name]
    kind = kind_named(kind_name.split()[0])
    meta = kind.meta("l", module)
    shapes = {"X": (2, 4), "D": (2, 3)} if kind_name == "linear" else \
        {"I": (2, 4, 4), "DO": (module.out_channels, 4, 4)}
    q = ops.query_side(kind, meta, {k: torch.randn(2, *v) for k, v in shapes.items()})
    empty = {k: torch.zeros(0, *v) for k, v in shapes.items()}
    for name, strategy in ops.FACTORED.items():
        assert strategy(kind, meta, empty, q).shape == (0,), name
