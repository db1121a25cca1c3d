"""The cost model's per-strategy constants, measured by micro-benchmarks of the engine's own operators.

The base constants (seconds per flop of a large matrix product, seconds per byte of a large sum)
price an ideal kernel; the operators reach a fraction of it that depends on the strategy and on
the layer's kind (a convolution builds im2col rows, a thin batched product is bound by its writes).
So each strategy is timed on two synthetic layers per kind family, one compute-heavy and one
traffic-heavy, and two non-negative weights are fitted so that
    seconds = a * flops * sec_per_flop + b * bytes * sec_per_byte
reproduces both timings. Nothing is tuned to a machine: `PRAGMA metaql_calibrate` re-measures.
"""
from __future__ import annotations

import re
import time

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from metaql.engine import operators as ops
from metaql.engine.strategies import STRATEGIES

FAMILIES = ("linear", "conv")
# the matrix strategies are priced like their one-query counterparts, a full layer's norms like its dot
BORROWED = {"each_iterate": "iterate", "each_gradient": "batch_average", "each_reconstruct": "reconstruct",
            "each_full_dot": "full_dot", "self_norm": "full_dot"}
# re-compute is a baseline whose formula is a lower bound (the whole model's replay is extra): unweighted
TIMED = ("iterate", "batch_average", "reconstruct", "self_gram", "self_full", "full_dot")


def family_of(kind: str) -> str:
    return "conv" if kind == "conv" else "linear"


def _layers(family: str):
    """Two (module, N, B, input shape) of a family: compute-heavy first, traffic-heavy second."""
    if family == "linear":
        return [(nn.Linear(192, 192), 64, 8, (1, 192)), (nn.Linear(32, 32), 32, 4, (16, 32))]
    return [(nn.Conv2d(32, 32, 3, padding=1), 32, 4, (32, 4, 4)), (nn.Conv2d(4, 4, 3, padding=1), 16, 2, (4, 12, 12))]


def _factors(kind, module, n: int, shape) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, *shape, generator=g)
    with torch.no_grad():
        out = module(x)
    return kind.factors(module, [x], [torch.randn(out.shape, generator=g)])


def shapes_of(kind, meta, factors, n: int, b: int, stored: str):
    from metaql.engine.cost import Shapes
    s = kind.positions(meta, factors)
    return Shapes(n=n, s=s, b=b, sq=s, din=meta.din + int(meta.bias), dout=meta.dout, stored=stored, kind=meta.kind)


def _timed(fn, runs: int = 7, budget: float = 0.05) -> float:
    """The best of up to `runs` runs after a warm-up, stopping once `budget` seconds were spent:
    the minimum sees past other processes' time slices on a shared machine."""
    fn()
    best, spent = float("inf"), 0.0
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        took = time.perf_counter() - t0
        best, spent = min(best, took), spent + took
        if spent > budget:
            break
    return best


def _run(name: str, kind, meta, train: dict, q: dict):
    """The executor's work for one strategy over the training factors, chunked as it chunks."""
    from metaql.engine.executor import chunk_rows
    strat = STRATEGIES[name]
    n = next(iter(train.values())).shape[0]
    step = chunk_rows(train, q, name, meta)
    for lo in range(0, n, step):
        chunk = {k: v[lo:lo + step] for k, v in train.items()}
        if name == "full_dot":
            ops.full_dot(chunk["G"], q)
        elif strat.self_influence:
            ops.squared_norm(kind, meta, chunk, strat.form)
        else:
            strat.scores(kind, meta, chunk, q)


def measurements(family: str) -> dict[str, list[tuple[dict, float]]]:
    """{strategy: [(its estimate {flops, bytes}, measured seconds)] on the family's two layers}."""
    from metaql.storage.layers import find_kind
    out: dict[str, list] = {name: [] for name in TIMED}
    for module, n, b, shape in _layers(family):
        kind, _ = find_kind(module)
        meta = kind.meta("calibration", module)
        train, query = _factors(kind, module, n, shape), _factors(kind, module, b, shape)
        q = ops.query_side(kind, meta, query, None, norm=True)
        full = {"G": kind.full(meta, train)}
        for name in TIMED:
            stored = "full" if name == "full_dot" else "factored"
            est = STRATEGIES[name].estimate(shapes_of(kind, meta, train, n, b, stored))
            t = _timed(lambda: _run(name, kind, meta, full if stored == "full" else train, q))
            out[name].append((est, t))
    return out


def fit(points: list[tuple[dict, float]], base: dict[str, float]) -> dict[str, float]:
    """Non-negative weights (flops, bytes) that reproduce the measured seconds of the points."""
    from scipy.optimize import nnls
    a = np.array([[e["flops"] * base["sec_per_flop"], e["bytes"] * base["sec_per_byte"]] for e, _ in points])
    t = np.array([s for _, s in points])
    # relative residuals: each point weighs the same whatever its length
    w, _ = nnls(a / t[:, None], np.ones(len(t)))
    if not np.isfinite(w).all() or w.sum() == 0:
        w = np.array([float(np.median(t / a.sum(1))), 0.0])
    return {"flops": float(w[0]), "bytes": float(w[1])}


def strategy_weights(base: dict[str, float]) -> dict[str, dict[str, dict[str, float]]]:
    """{family: {strategy: {flops, bytes}}} for every exact strategy (metaql.approx prices its own)."""
    out = {}
    for family in FAMILIES:
        fitted = {name: fit(points, base) for name, points in measurements(family).items()}
        for name in STRATEGIES:
            if name in BORROWED:
                fitted[name] = fitted[BORROWED[name]]
        out[family] = fitted
    return out


# ---- PRAGMA metaql_calibrate ------------------------------------------------------------------------
_PRAGMA = re.compile(r"^\s*pragma\s+metaql_calibrate\s*(\(\s*\))?\s*;?\s*$", re.I)


def is_calibrate(text: str) -> bool:
    return bool(_PRAGMA.match(text))


def calibrate_store(store) -> pa.Table:
    """Re-measures the cost constants and keeps them in the catalog's meta table (a read-only
    store keeps them for this process only); returns them, one row per weight."""
    from metaql.engine import cost
    from metaql.storage import store as store_module
    consts = cost.calibrated_constants()
    layers = layer_weights(store)
    # a read-only store cannot keep them: they hold for this process (its layers' factors with them)
    store_module._MEASURED[cost.measure_constants] = {**consts, "layers": layers} if store.read_only else dict(consts)
    consts["layers"] = layers
    if not store.read_only:
        store.keep_cost_constants(consts)
    rows = [("sec_per_flop", "", "", consts["sec_per_flop"]), ("sec_per_byte", "", "", consts["sec_per_byte"])]
    for family, weights in consts["weights"].items():
        for name, w in weights.items():
            rows += [("flops_weight", family, name, w["flops"]), ("bytes_weight", family, name, w["bytes"])]
    for layer, weights in consts["layers"].items():
        for name, w in weights.items():
            rows += [("layer_factor", layer, name, w["factor"]), ("layer_fixed_seconds", layer, name, w["fixed"])]
    return pa.table({"constant": [r[0] for r in rows], "family": [r[1] for r in rows],
                     "strategy": [r[2] for r in rows], "value": pa.array([float(r[3]) for r in rows], pa.float64())})


# ---- per layer: each strategy timed on the store's own factors ----------------------------------------
# A kind family's two synthetic layers cannot stand for every shape (a convolution of 512 channels
# on 2x2 pixels runs at a fraction of the efficiency of one of 32 channels on 4x4), so the PRAGMA
# also times every strategy on stored samples of each layer (two sizes, SAMPLE_ROWS, as far as the
# first shard holds them), against QUERY_ROWS others as the query side, and fits per layer
# seconds = fixed + factor * (the base estimate): the fixed part is the per-scan overhead that a
# small layer's scan never amortises.
SAMPLE_ROWS, QUERY_ROWS = (32, 256), 8


def layer_weights(store) -> dict[str, dict[str, dict[str, float]]]:
    """{layer: {strategy: {"fixed": seconds, "factor": x}}} for every layer with stored factors."""
    from metaql.engine.strategies import applicable
    from metaql.storage.layers import kind_named
    base = None
    out: dict[str, dict] = {}
    for row in store.layers():
        shards = store.factor_shards(None, row["name"])
        if not shards:
            continue
        meta, stored = store.layer_meta(row["name"])
        kind = kind_named(meta.kind)
        _, tensors = store.shard_tensors(shards[0])
        n_all = next(iter(tensors.values())).shape[0]
        b = min(QUERY_ROWS, max(1, n_all // 4))
        sizes = sorted({max(1, min(s, n_all - b)) for s in SAMPLE_ROWS})
        query = {k: v[n_all - b:] for k, v in tensors.items()}
        q = ops.query_side(kind, meta, query, None, norm=True) if stored != "full" else \
            {"count": b, "gbar_flat": kind.full(meta, query).mean(0)}
        base = base or _base_of(store)
        names = [s.name for s in applicable(stored, False, kind, False) + applicable(stored, False, kind, True)
                 if not s.baseline]
        out[row["name"]] = {name: _layer_fit(name, kind, meta, stored, tensors, q, sizes, b, base) for name in names}
    return out


def _base_of(store) -> dict[str, float]:
    from metaql.engine import cost
    return cost.measure_base()


def _layer_fit(name, kind, meta, stored, tensors, q, sizes, b, base) -> dict[str, float]:
    from metaql.engine import cost
    points = []
    for n in sizes:
        train = {k: v[:n].contiguous() for k, v in tensors.items()}
        est = STRATEGIES[name].estimate(shapes_of(kind, meta, train, n, b, stored))
        t = _timed(lambda: _run(name if name != "self_norm" else "full_dot", kind, meta, train, q))
        points.append((cost.seconds(est, base), t))
    (e0, t0), (e1, t1) = points[0], points[-1]
    if len(points) == 1 or e1 <= e0 or t1 <= t0:      # one size, or timings too noisy to split
        return {"fixed": 0.0, "factor": t1 / max(e1, 1e-30)}
    factor = (t1 - t0) / (e1 - e0)
    return {"fixed": max(t0 - factor * e0, 0.0), "factor": factor}
