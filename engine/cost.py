"""The cost model: flops and bytes of every strategy for one layer, weighted into seconds.

Formulas follow MetaStore (papers/000 §17-18, DESIGN.md "The math"), per query over N training
samples with S rows each, a query batch of B samples with Sq rows each, a layer of Din x Dout
(Din includes the bias column). The two constants (seconds per flop, seconds per byte read) are
measured on this machine at first use and kept in the catalog's meta table.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from metaql.engine.strategies import BYTES_PER_NUMBER, STRATEGIES, applicable  # noqa: F401


@dataclass
class Shapes:
    n: int          # training samples
    s: int          # rows per training sample
    b: int          # query samples
    sq: int         # rows per query sample
    din: int        # X width (bias column included)
    dout: int
    stored: str     # "factored" | "full"
    each: bool = False      # the train x query matrix: every query sample scored apart
    self_influence: bool = False    # SELF_INFLUENCE: each training sample against itself
    kind: str = ""          # the layer's kind: a matrix strategy may not be exact for every kind


def estimates(sh: Shapes) -> dict[str, dict[str, float]]:
    """{strategy: {flops, bytes}} for every registered strategy that reads a layer stored as `sh.stored`
    (engine/strategies.py holds each strategy's formula); matrix strategies add `space`."""
    kind = None
    if sh.kind:
        from metaql.storage.layers import kind_named
        kind = kind_named(sh.kind)
    return {s.name: s.estimate(sh) for s in applicable(sh.stored, sh.each, kind, sh.self_influence)}


# ---- the train x query matrix's space -----------------------------------------------------------
# A matrix strategy whose query side would hold more numbers than this is picked only when no
# other fits (B per-sample gradients of a 4096 x 4096 layer at B = 1000 would be 64 GiB).
SPACE_LIMIT = 2 ** 28
# The block of training samples scored at once against all B query samples: its (M, B) float64
# sums are what a query with top-k holds besides the k best per query sample.
BLOCK_NUMBERS = 4 * 2 ** 20


def block_rows(b: int) -> int:
    """M, the training samples of one block: M * B sums stay under BLOCK_NUMBERS."""
    return max(1, BLOCK_NUMBERS // max(b, 1))


def matrix_space(n: int, b: int, topk: int | None, directions: int = 1) -> dict[str, int]:
    """The result's rows and the numbers held for it: the whole N x B matrix, or with top-k only
    the k best per query sample (per direction) and one block of sums."""
    if not topk:
        return {"rows": n * b, "held": n * b}
    kept = min(topk, n) * b * directions
    return {"rows": kept, "held": 2 * kept + min(n, block_rows(b)) * b}


# Strategies shown by EXPLAIN and run when forced (benchmarks), never picked by cost: their
# formula is a lower bound (re-compute's real cost includes the whole model's forward/backward).
BASELINES = tuple(n for n, s in STRATEGIES.items() if s.baseline)


MODEL_VERSION = 3     # per-layer fits of three regimes (engine/calibrate.py); 2: fixed + factor; 1: base only


def plain_seconds(est: dict[str, float], consts: dict) -> float:
    """Flops and bytes priced by the base constants alone (an ideal kernel)."""
    return est["flops"] * consts["sec_per_flop"] + est["bytes"] * consts["sec_per_byte"]


def split(estimate, sh: Shapes, consts: dict) -> tuple[float, float]:
    """(scan, query) base seconds of a strategy's formula `estimate` for the shapes: the work over
    the N training samples that does not depend on the query batch (reading, unfolding, products
    with one average gradient), and the part that grows with N x the query rows (iterate's Gram
    products). The query side built once (Gbar) is in neither: it does not grow with N."""
    from dataclasses import replace

    def price(n, b):
        return plain_seconds(estimate(replace(sh, n=n, b=b)), consts)
    scan = price(sh.n, 0) - price(0, 0)
    query = price(sh.n, sh.b) - price(sh.n, 0) - price(0, sh.b) + price(0, 0)
    return max(scan, 0.0), (query if query > 1e-9 * scan else 0.0)    # rounding is no query part


def seconds(est: dict[str, float], consts: dict, strategy: str | None = None, kind: str = "",
            layer: str | None = None, shapes: Shapes | None = None) -> float:
    """The estimate in seconds: flops and bytes priced by the base constants; after PRAGMA
    metaql_calibrate, the layer's own fit (with `shapes`: engine/calibrate.py's three regimes and
    the query side, timed on its stored factors) or else the strategy's weights for the kind's
    family (1 where none was measured)."""
    from metaql.engine.calibrate import family_of
    fit = consts.get("layers", {}).get(layer or "", {}).get(strategy or "")
    if fit is not None and "scan" in fit and shapes is not None:
        return layer_seconds(fit, strategy, shapes, consts)
    if fit is not None and "factor" in fit:           # kept by MODEL_VERSION 2
        return fit["fixed"] + fit["factor"] * plain_seconds(est, consts)
    w = consts.get("weights", {}).get(family_of(kind), {}).get(strategy or "", {"flops": 1.0, "bytes": 1.0})
    return est["flops"] * consts["sec_per_flop"] * w["flops"] + est["bytes"] * consts["sec_per_byte"] * w["bytes"]


def layer_seconds(fit: dict[str, float], strategy: str, sh: Shapes, consts: dict) -> float:
    """fixed x chunks + scan x (B-independent work) + query x (work per query row) + the query
    side (prep + prep_each x B): the layer's fitted weights on the formula's parts."""
    scan, query = split(STRATEGIES[strategy].estimate, sh, consts)
    chunks = -(-sh.n // max(1, int(fit.get("rows", 1)))) if sh.n else 0
    side = fit["prep"] + fit["prep_each"] * sh.b if sh.b else 0.0
    return fit["fixed"] * chunks + fit["scan"] * scan + query_weight(fit, sh.b) * query + side


def query_weight(fit: dict, b: int) -> float:
    """The weight of the query part at a batch of b: the one timed at the smaller calibration
    batch up to it, the one timed at the larger from it on, interpolated in log B between."""
    if "query_large" not in fit or b <= fit["query_b"][0]:
        return fit["query"]
    lo, hi = fit["query_b"]
    if b >= hi:
        return fit["query_large"]
    f = math.log(b / lo) / math.log(hi / lo)
    return fit["query"] + f * (fit["query_large"] - fit["query"])




def calibrated_constants() -> dict:
    """The base constants and every strategy's fitted weights (engine/calibrate.py): what PRAGMA
    metaql_calibrate measures and keeps. Not measured on first use: the micro-benchmarks take
    seconds, and on a machine shared with other jobs their timings (and so the picks they drive)
    are only as steady as the machine; run the PRAGMA when it is quiet."""
    from metaql.engine.calibrate import strategy_weights
    base = measure_base()
    return {**base, "weights": strategy_weights(base), "version": MODEL_VERSION}


def measure_constants() -> dict[str, float]:
    """The base constants, measured on a store's first query (no per-strategy weights yet)."""
    return measure_base()


def measure_base() -> dict[str, float]:
    """Times a matrix product (flops) and a large sum (bytes read) on this machine: the best of
    several runs each, since on a shared machine a run may lose a time slice to another job (the
    per-layer weights are relative to these, so their noise would scale every estimate)."""
    a = torch.randn(512, 512)
    flop = _best(lambda: a @ a, 12) / (512 ** 3 * 2)
    big = torch.randn(16 * 2 ** 20)           # 64 MiB
    byte = _best(big.sum, 6) / (big.numel() * 4)
    return {"sec_per_flop": flop, "sec_per_byte": byte}


def _best(fn, runs: int) -> float:
    fn()
    best = float("inf")
    for _ in range(runs):
        t0 = work_clock()
        fn()
        best = min(best, work_clock() - t0)
    return best


def work_clock() -> float:
    """The clock calibration times with: the calling thread's CPU time when torch runs one thread
    (what a query costs on an idle machine, and not the time slices other jobs take: on a 2-core
    machine at load 9 a scan's wall time was 3-4x its CPU time and varied 2x from run to run, its
    CPU time 10%; the thread's, not the process's, so a calibration in a background thread
    (engine/autocalibrate.py) and a query do not count each other's work); wall time with several
    threads, whose CPU times add up."""
    return time.thread_time() if work_is_cpu() else time.perf_counter()


def work_is_cpu() -> bool:
    """Whether work_clock reads the process's CPU time (one torch thread) or wall time."""
    return torch.get_num_threads() == 1
