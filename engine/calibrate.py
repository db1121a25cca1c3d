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
import threading

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
    from metaql.engine.cost import work_clock
    pause()
    fn()
    best, spent = float("inf"), 0.0
    for _ in range(runs):
        pause()
        t0 = work_clock()
        fn()
        took = work_clock() - t0
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
    layers = layer_weights(store, consts)       # weights against these base constants, not a re-measure
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
            rows += [(f"layer_{key}", layer, name, w[key]) for key in LAYER_WEIGHTS + ("query_large",) if key in w]
    return pa.table({"constant": [r[0] for r in rows], "family": [r[1] for r in rows],
                     "strategy": [r[2] for r in rows], "value": pa.array([float(r[3]) for r in rows], pa.float64())})


# ---- per layer: each strategy timed on the store's own factors ----------------------------------------
# A kind family's two synthetic layers cannot stand for every shape (a convolution of 512 channels
# on 2x2 pixels runs at a fraction of the efficiency of one of 32 channels on 4x4), so the PRAGMA
# also times every strategy's real chunked scan on stored samples of each layer (views of the first
# shard, as the executor reads them), with other stored samples of it as the query side, and fits
# per layer and strategy
#     seconds = fixed x chunks + scan x price(the formula's per-sample work without the query)
#               + query x price(the formula's work per training sample and query row)
#               + prep + prep_each x B                     (building the query side once)
# The three scan weights are efficiencies against the base constants, one per regime the formula
# separates: reading and unfolding the stored factors (B-independent), the products against the
# query rows (iterate's Gram products grow with B), and the fixed cost of one chunk (operator
# set-up a small layer's scan never amortises). Timing at two sizes of N and, where the formula has
# a B term, two sizes of B lets the estimate extrapolate along both instead of scaling one point.
LAYER_WEIGHTS = ("fixed", "scan", "query", "prep", "prep_each")     # what the PRAGMA shows per layer
QUERY_ROWS = 32         # the larger query batch timed (the smaller is one sample)
LARGE_QUERY_ROWS = 128  # the query weight once more at this batch (engine.cost.query_weight)
LARGE_SECONDS = 0.5     # ... unless one training sample would take longer (a layer it never suits)
POINT_SECONDS = 0.12    # about this long per timed run: enough samples to see per-sample cost
MAX_ROWS = 256          # training samples timed at most, unless they fit in the cache (timed_rows)


def layer_weights(store, base: dict | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """{layer: {strategy: fit}} for every layer with stored factors (fit: see `_layer_fit`): weights
    against the base constants `base` (measured here if None), which the estimates must use too."""
    from metaql.engine import cost
    out: dict[str, dict] = {}
    for row in store.layers():
        found = layer_inputs(store, row["name"])
        if found is None:
            continue
        base = base or cost.measure_base()
        out[row["name"]] = {name: _layer_fit(name, *found, base) for name in fitted_strategies(found[0], found[2])}
    return out


def layer_inputs(store, layer: str, checkpoint: str | None = None):
    """(kind, meta, stored, tensors of the first factor shard) of a layer (of `checkpoint`'s shards
    when given and it has some), or None when it has no shard of two samples or more."""
    from metaql.storage.layers import kind_named
    shards = (store.factor_shards(checkpoint, layer) if checkpoint is not None else []) \
        or store.factor_shards(None, layer)
    if not shards:
        return None
    meta, stored = store.layer_meta(layer)
    _, tensors = store.shard_tensors(shards[0])
    if next(iter(tensors.values())).shape[0] < 2:
        return None
    return kind_named(meta.kind), meta, stored, tensors


def fitted_strategies(kind, stored: str) -> list[str]:
    """The strategies a layer's calibration fits: every one that reads it as stored, not a baseline."""
    from metaql.engine.strategies import applicable
    return [s.name for s in applicable(stored, False, kind, False) + applicable(stored, False, kind, True)
            if not s.baseline]


def fit_layer(name: str, inputs, base: dict) -> dict[str, float]:
    """One strategy's fit on a layer's `layer_inputs`, against the base constants `base`."""
    return _layer_fit(name, *inputs, base)


def _query(kind, meta, stored, tensors, b: int, name: str):
    """(query side, seconds to build it) of the shard's last b samples, as the executor builds it."""
    query = {k: v[v.shape[0] - b:] for k, v in tensors.items()}
    needs = STRATEGIES[name].needs
    if stored == "full":
        def build():
            return {"count": b, "gbar_flat": kind.full(meta, query).mean(0)}
    else:
        def build():
            return ops.query_side(kind, meta, query, needs, norm=False)
    q = build()
    return q, _timed(build, runs=3, budget=0.02)


def _layer_fit(name, kind, meta, stored, tensors, base) -> dict[str, float]:
    """{fixed, scan, query, prep, prep_each, rows}: the weights of the model above (rows: the
    training samples of one chunk at B = 1, the unit the fixed cost is paid per)."""
    from metaql.engine.executor import chunk_rows
    n_all = next(iter(tensors.values())).shape[0]
    strat = STRATEGIES[name]
    run = name if name != "self_norm" else "full_dot"
    bs = (1,) if strat.self_influence else (1, min(QUERY_ROWS, max(1, n_all // 4)))
    points, preps, rows = [], [], n_all
    for b in bs:
        q, prep = (None, 0.0) if strat.self_influence else _query(kind, meta, stored, tensors, b, name)
        preps.append((b, prep))
        step = min(n_all, chunk_rows(tensors, q, run, meta))
        rows = rows if b > 1 else step
        if b > 1 and not _grows_with_b(name):
            continue                  # B moves only the query side here: timed above, not the scan
        n_max = max(1, min(timed_rows(tensors), n_all - (0 if strat.self_influence else b), step))
        for n in _sizes(lambda n: _run(run, kind, meta, _head(tensors, n), q), n_max):
            train = _head(tensors, n)
            t = _timed(lambda: _run(run, kind, meta, train, q), runs=20, budget=0.1)
            points.append(([-(-n // step)] + _terms(name, shapes_of(kind, meta, train, n, b, stored), base), t))
    (b0, p0), (b1, p1) = preps[0], preps[-1]
    each = (p1 - p0) / (b1 - b0) if b1 > b0 and p1 > p0 else p1 / max(b1, 1)
    fit = {**_fit_terms(points), "prep": max(p0 - each * b0, 0.0), "prep_each": each, "rows": int(rows)}
    if len(bs) > 1 and _grows_with_b(name):
        fit.update(_large_query(name, kind, meta, stored, tensors, base, fit, bs[-1]))
    return fit


def _large_query(name, kind, meta, stored, tensors, base, fit, b_small) -> dict:
    """The query weight again at LARGE_QUERY_ROWS query samples, the other weights kept: the
    products against many query rows run at another efficiency than against a few (iterate on
    VGG16 conv7 at B = 512 took 2.8x the estimate from B = 32). {} when the shard holds too few
    samples or one training sample would take more than LARGE_SECONDS."""
    from metaql.engine.executor import chunk_rows
    n_all = next(iter(tensors.values())).shape[0]
    b = min(LARGE_QUERY_ROWS, n_all // 4)
    probe = shapes_of(kind, meta, _head(tensors, 1), 1, b, stored)
    scan1, query1 = _terms(name, probe, base)
    if b < 2 * b_small or fit["scan"] * scan1 + fit["query"] * query1 > LARGE_SECONDS:
        return {}
    q, _ = _query(kind, meta, stored, tensors, b, name)
    step = min(n_all, chunk_rows(tensors, q, name, meta))
    weights = []
    for n in _sizes(lambda n: _run(name, kind, meta, _head(tensors, n), q), max(1, min(timed_rows(tensors), n_all - b, step))):
        train = _head(tensors, n)
        t = _timed(lambda: _run(name, kind, meta, train, q), runs=20, budget=0.1)
        scan, query = _terms(name, shapes_of(kind, meta, train, n, b, stored), base)
        if query > 0:
            weights.append(max(t - fit["fixed"] * -(-n // step) - fit["scan"] * scan, 0.0) / query)
    return {"query_large": float(np.median(weights)), "query_b": [b_small, b]} if weights else {}


def timed_rows(tensors: dict) -> int:
    """The most training samples one timed run reads: MAX_ROWS, or more where MAX_ROWS samples of
    the layer fit in the last-level cache. A query's scan streams the stored factors from memory; a
    timed run over a cache-sized head, repeated, reads them from the cache (iterate on the MLP's
    4096 x 4096 layer: 256 samples are 8 MB, the fit's scan weight came out 0.39 and a point query
    over 4,096 samples, 134 MB, took 2.1-3x its estimate). Enough samples to pass twice the cache
    make each run stream them as the query does."""
    per_sample = sum(t[:1].numel() * t.element_size() for t in tensors.values())
    return max(MAX_ROWS, -(-2 * cache_bytes() // max(per_sample, 1)))


def cache_bytes() -> int:
    """The last-level cache's size (Linux sysfs; 32 MiB where it cannot be read)."""
    import glob
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
            sizes.append(int(text[:-1]) * {"K": 2 ** 10, "M": 2 ** 20}[text[-1]] if text[-1] in "KM" else int(text))
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 * 2 ** 20)


def _grows_with_b(name: str) -> bool:
    """True when the strategy's scan (not only its query side) grows with the query batch."""
    from dataclasses import replace
    from metaql.engine.cost import Shapes
    sh = Shapes(n=10, s=3, b=1, sq=3, din=5, dout=4, stored="factored")
    return len(set(map(tuple, (_terms(name, replace(sh, b=b), {"sec_per_flop": 1.0, "sec_per_byte": 1.0})
                               for b in (1, 2))))) > 1


def _head(tensors: dict, n: int) -> dict:
    """The first n samples: views of the (memory-mapped) shard, no copies, as the executor reads."""
    return {k: v[:n] for k, v in tensors.items()}


def _sizes(run, n_max: int) -> list[int]:
    """Two sample counts, both in the regime a query runs in: the most one chunk holds (up to
    n_max: its intermediates are as large as a query's, so allocation and cache effects match;
    fewer if a run would pass POINT_SECONDS) and a quarter of that (a size of a few samples runs
    from cache, several times faster per sample than a query's chunk). A probe doubling from one
    sample says how long a sample takes, without a long first run on a slow layer."""
    probe, took = 1, 0.0
    while True:
        pause()
        run(probe)                                  # warm: the pages of the shard, the allocator
        t0 = _clock()
        run(probe)
        took = _clock() - t0
        if took > POINT_SECONDS / 8 or 2 * probe > max(1, n_max // 4):
            break
        probe *= 2
    per = max(took, 1e-9) / probe
    big = int(min(n_max, max(probe, POINT_SECONDS / per)))
    return sorted({max(1, big // 4), big})


# A calibration in a background thread (engine/autocalibrate.py) sets a hook here that waits while a
# query's scan runs in this process (so neither slows or pollutes the other's timings) and raises
# to stop when the store closes; PRAGMA metaql_calibrate runs in the caller's thread, without one.
BACKGROUND = threading.local()


def pause() -> None:
    hook = getattr(BACKGROUND, "hook", None)
    if hook is not None:
        hook()


def _clock() -> float:
    from metaql.engine.cost import work_clock
    return work_clock()


def _terms(name: str, sh, base) -> list[float]:
    """[scan seconds, query seconds] of the base formula for the shapes (engine.cost.split)."""
    from metaql.engine import cost
    return list(cost.split(STRATEGIES[name].estimate, sh, base))


def _fit_terms(points) -> dict[str, float]:
    """Non-negative weights (fixed, scan, query) that reproduce the points' timings. Absolute
    residuals: the larger points, whose chunks are as large as a query's, decide the per-sample
    weights (a smaller chunk may still run from cache, faster per sample); a term no point
    exercises keeps weight 1. Where noise leaves no per-sample weight, the largest point's time
    over its terms."""
    from scipy.optimize import nnls
    a = np.array([p for p, _ in points], dtype=float)
    t = np.array([s for _, s in points], dtype=float)
    used = a.max(0) > 1e-9 * a[:, 1:].max()          # a part the formula leaves out is 0 up to rounding
    w = np.ones(a.shape[1])
    sol, _ = nnls(a[:, used] / t.max(), t / t.max())
    w[used] = sol
    if not np.isfinite(w).all() or (w[1:] * a[:, 1:]).sum() == 0:
        top = int(np.argmax(t))
        w = np.array([0.0, 1.0, 1.0]) * t[top] / max(a[top, 1:].sum(), 1e-30)
    return {"fixed": float(w[0]), "scan": float(w[1]), "query": float(w[2])}
