"""The random projection of one layer and its error bound.

A layer's canonical gradient is G = D^T [X | 1] (dout x din', din' = din + bias). Projected, it is
G~ = P_out^T G P_in = (D P_out)^T ([X | 1] P_in): the factors are projected row by row (LoGra's
Kronecker-factored projection), so a projected gradient is never built from the full one. P_in
(din' x k_in) and P_out (dout x k_out) have independent N(0, 1/k) entries drawn from the layer's
seed; a side whose k is None is not projected (identity).

Unbiased: E[P P^T] = I on each side, so E<G~_a, G~_b> = <G_a, G_b>.
Variance (Gaussian P; proof in README "Approximation"):
    Var <G~_a, G~_b>  <=  v * ||G_a||_F^2 ||G_b||_F^2,   v = 2/k_in + 2/k_out + 4/(k_in k_out)
(a term is absent for a side not projected). So the relative error e = |err| / (||G_a|| ||G_b||)
has standard deviation at most sqrt(v), and by Chebyshev P(e > t sqrt(v)) <= 1/t^2 for any t > 1.
`max_error` and `error=` are stated in this unit: the standard deviation of the relative error.
"""
from __future__ import annotations

import functools
import math
import zlib

import torch

from metaql.errors import InvalidInputException
from metaql.storage.quantize import quantization_variance


def variance_factor(k_in: int | None, k_out: int | None) -> float:
    """v of the bound above (0 when neither side is projected)."""
    v = 0.0
    if k_in:
        v += 2.0 / k_in
    if k_out:
        v += 2.0 / k_out
    if k_in and k_out:
        v += 4.0 / (k_in * k_out)
    return v


def spec_variance(spec: dict) -> float:
    """v of a layer's recorded projection, its dense sketch included: a sketch R (m rows, N(0, 1/m))
    of the projected gradient adds (2/m) E[||G~_a||^2 ||G~_b||^2] <= (2/m)(1 + v) ||G_a||^2 ||G_b||^2."""
    v = variance_factor(spec["k_in"], spec["k_out"])
    m = spec.get("sketch")
    v = v + 2.0 / m * (1.0 + v) if m else v
    # a sketch stored in 8 or 4 bits: the rounding's q^2/4 relative variance (storage/quantize.py), of the
    # sketches' norms, whose squares' product is at most (1 + v) times the gradients' in expectation
    return v + quantization_variance(spec.get("bits")) * (1.0 + v)


def relative_error(k_in: int | None, k_out: int | None, sketch: int | None = None, bits: int | None = None) -> float:
    """sqrt(v): the bound on the relative error's standard deviation."""
    return math.sqrt(spec_variance({"k_in": k_in, "k_out": k_out, "sketch": sketch, "bits": bits}))


def chebyshev_radius(k_in: int | None, k_out: int | None, delta: float, sketch: int | None = None,
                     bits: int | None = None) -> float:
    """eps such that P(|err| > eps ||G_a|| ||G_b||) <= delta (Chebyshev)."""
    return math.sqrt(spec_variance({"k_in": k_in, "k_out": k_out, "sketch": sketch, "bits": bits}) / delta)


def dims_for_error(din: int, dout: int, max_error: float) -> tuple[int | None, int | None]:
    """The smallest equal k on both sides with sqrt(v) <= max_error; a side whose width is not
    above k stays unprojected (identity: exact on that side, no error from it)."""
    if not (isinstance(max_error, (int, float)) and 0 < max_error <= 1):
        raise InvalidInputException(f"max_error must be a number in (0, 1], not {max_error!r:.40}")
    e2 = float(max_error) ** 2
    k = math.ceil((2 + 2 * math.sqrt(1 + e2)) / e2)       # both sides: 4/k + 4/k^2 <= e^2
    if din > k and dout > k:
        return k, k
    k1 = math.ceil(2 / e2)                                # one side: 2/k <= e^2
    if dout >= din:
        return None, (k1 if dout > k1 else None)
    return (k1 if din > k1 else None), None


def layer_seed(seed: int, layer: str) -> int:
    """Each layer's own seed: layers' projections are independent, and reproducible by name."""
    return (int(seed) * 1_000_003 + zlib.crc32(layer.encode())) % (2 ** 31 - 1)


@functools.lru_cache(maxsize=64)
def matrices(seed: int, din: int, k_in: int | None, dout: int, k_out: int | None):
    """(P_in or None, P_out or None), float32 on the CPU, the same in every process for a seed."""
    g = torch.Generator().manual_seed(int(seed))
    p_in = torch.randn(din, k_in, generator=g) / math.sqrt(k_in) if k_in else None
    p_out = torch.randn(dout, k_out, generator=g) / math.sqrt(k_out) if k_out else None
    return p_in, p_out


def project_rows(x: torch.Tensor, d: torch.Tensor, bias: bool, spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical rows (B, S, din), (B, S, dout) -> projected rows (B, S, k_in), (B, S, k_out); the
    bias column of ones is appended to X before projecting (so G~ includes the bias's gradient)."""
    x, d = x.float(), d.float()
    if bias:
        x = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)], dim=-1)
    p_in, p_out = matrices(spec["seed"], x.shape[-1], spec["k_in"], d.shape[-1], spec["k_out"])
    if p_in is not None:
        x = x @ p_in.to(x.device)
    if p_out is not None:
        d = d @ p_out.to(d.device)
    return x, d


SKETCH_NUMBERS = 2 ** 25      # the largest dense sketch matrix (m x k_in k_out) built: 128 MiB


SKETCH_DISTS = ("gaussian", "count")


def sketched(g: torch.Tensor, spec: dict) -> torch.Tensor:
    """(n, width) flattened gradients -> their sketches (n, m): by the dense Gaussian R, or, with
    spec['sketch_dist'] = 'count', by a count sketch (each coordinate added, with a random sign, to
    one of m buckets: S has one +-1 per column). A count sketch is unbiased, needs no m x width
    matrix (so an unprojected layer of millions of numbers can be sketched) and its variance,
    (||a||^2 ||b||^2 + <a, b>^2 - 2 sum_i a_i^2 b_i^2) / m, is never above the Gaussian's, so
    spec_variance's 2/m bound holds for both."""
    m = spec["sketch"]
    if spec.get("sketch_dist", "gaussian") == "count":
        buckets, signs = count_sketch(spec["seed"], m, g.shape[1])
        return torch.zeros(g.shape[0], m, dtype=g.dtype, device=g.device).index_add_(
            1, buckets.to(g.device), g * signs.to(g.device, g.dtype))
    return g @ sketch_matrix(spec["seed"], m, g.shape[1]).to(g.device, g.dtype).T


@functools.lru_cache(maxsize=64)
def count_sketch(seed: int, m: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bucket of each coordinate (width,), its sign (width,)) from a stream of its own (the layer's
    seed + 2), the same in every process."""
    g = torch.Generator().manual_seed((int(seed) + 2) % (2 ** 31 - 1))
    buckets = torch.randint(0, m, (width,), generator=g)
    signs = torch.randint(0, 2, (width,), generator=g).float().mul_(2).sub_(1)
    return buckets, signs


@functools.lru_cache(maxsize=8)
def sketch_matrix(seed: int, m: int, width: int) -> torch.Tensor:
    """R (m x width), N(0, 1/m) entries from a stream of its own (the layer's seed + 1)."""
    if m * width > SKETCH_NUMBERS:
        raise InvalidInputException(
            f"a sketch of {m} numbers of a {width}-number projected gradient needs a {m} x {width} matrix, above "
            f"{SKETCH_NUMBERS:,} numbers: lower proj_dim (k per side) or sketch_dim")
    g = torch.Generator().manual_seed((int(seed) + 1) % (2 ** 31 - 1))
    return torch.randn(m, width, generator=g) / math.sqrt(m)
