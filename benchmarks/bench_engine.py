"""MetaStore query strategies (papers/000 Part III, §17-18, Figures 24-27) at this machine's scale.

Three stores are captured in one run: VGG16 of the CIFAR shape (conv1, conv7, conv13, fc1, fc3),
the pretrained MiniLM (self-attention layers of blocks 0, 3, 5: Q, K, V and output projection; the
head) and an MLP with a 4096x4096 linear layer ("big"). Test samples are registered with their
inputs and replayed at query time, as the engine does.

Tables (all strategies measured in this run, on factors read from the store's memory-mapped shards
with the engine's operators, metaql.engine.operators):

1. P2P per training sample (Fig. 24): factored (the `iterate` operator on stored factors) vs
   pre-compute (a matrix-vector product over full gradients held in memory) vs re-compute (replay the
   training samples' forward/backward at query time, then the inner product);
2. P2P per query while varying the number of training samples (Fig. 26);
3. P2B (the optimizer's pick per layer: Lemma 7 `batch_average`, or `iterate` batched over the query
   samples) vs the paper's Iterate (one P2P call per query sample) and Reconstruction, while varying
   the number of training samples and the query batch size (Fig. 27);
4. the end-to-end query path (metaql.connect(..., config={'force_strategy': ...}) and
   con.execute("SELECT * FROM INFLUENCE(...)")), with EXPLAIN's pick;
5. a warm P2P scan's effective bandwidth against this machine's memory bandwidth.

    python benchmarks/bench_engine.py            # full size (about 5 minutes on a 2-core machine)
    python benchmarks/bench_engine.py --quick    # smoke run, about a minute; writes engine_quick.md
    python benchmarks/bench_engine.py --models vgg --tables p2p,p2b --out engine_vgg   # a subset
    python benchmarks/bench_engine.py --clock cpu   # process CPU time (a machine loaded by other jobs)
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from metastore_common import (MINILM_BLOCKS, VGG16, Report, WideMLP, add_clock_option, add_threads_option, batches,
                              best_of, cifar_like, clock, load_minilm, log, memory_bandwidth, minilm_available,
                              sal_layers, set_clock, set_threads, table, token_sequences)

import metaql
from metaql.engine import operators as ops
from metaql.engine.executor import chunk_rows
from metaql.engine.optimizer import choose_strategies
from metaql.engine.plan import InfluenceScan, Side
from metaql.storage.hooks import watched_modules
from metaql.storage.layers import kind_named
from metaql.storage.replay import replay_factors

LR = 0.01
TEST0 = 1_000_000                 # test sample ids start here
STRATEGIES = ("iterate", "reconstruct", "batch_average")

FULL = dict(vgg_n=1000, vgg_test=512, vgg_batch=100, vgg_grid=(250, 500, 1000), vgg_b=(16, 64, 512), vgg_bp=64,
            minilm_n=256, minilm_len=32, minilm_test=64, minilm_batch=32, minilm_grid=(64, 128, 256),
            minilm_b=(4, 16, 64), minilm_bp=16,
            mlp_n=4096, mlp_test=64, mlp_batch=256, mlp_grid=(1024, 2048, 4096), mlp_b=(16, 64), mlp_bp=64,
            pre_n=256, pre_bytes=1.4e9, big_pre_n=20, re_n=32, cap_s=1.5, e2e_b=(16, 64), repeat=3, bw_mib=512)
TABLES = ("p2p", "vsn", "p2b", "e2e", "bw")     # Fig. 24, Fig. 26, Fig. 27, end-to-end, bandwidth
QUICK = dict(vgg_n=32, vgg_test=8, vgg_batch=16, vgg_grid=(16, 32), vgg_b=(2, 8), vgg_bp=4,
             minilm_n=8, minilm_len=16, minilm_test=4, minilm_batch=8, minilm_grid=(4, 8),
             minilm_b=(2, 4), minilm_bp=2,
             mlp_n=128, mlp_test=8, mlp_batch=128, mlp_grid=(64, 128), mlp_b=(2, 8), mlp_bp=4,
             pre_n=8, pre_bytes=2e8, big_pre_n=2, re_n=2, cap_s=0.3, e2e_b=(4,), repeat=1, bw_mib=128)


# ---- the stores -----------------------------------------------------------------------------------------

class Workload:
    """One captured store, the model, and the units (table rows) as lists of store layers."""

    def __init__(self, name, con, path, units: dict[str, list[str]], n_train: int, n_test: int, bp: int):
        self.name, self.con, self.path, self.units = name, con, path, units
        self.store = con.store
        self.train_ids = np.arange(n_train)
        self.test_ids = TEST0 + np.arange(n_test)
        self.bp = bp                                   # the paper-like query batch for P2B vs N
        self._parts: dict[str, list] = {}
        self._model = None
        self.query: dict[str, dict[str, torch.Tensor]] = {}
        self._sides: dict[tuple[str, int], dict] = {}
        self._meta: dict[str, tuple] = {}
        self.query_seconds = 0.0

    def parts(self, layer: str) -> list[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """The layer's shards as (ids, tensors), memory-mapped, opened once."""
        if layer not in self._parts:
            self._parts[layer] = [self.store.shard_tensors(r) for r in self.store.factor_shards("c0", layer)]
        return self._parts[layer]

    def meta(self, layer: str):
        """(LayerMeta, kind, storage mode) from the catalog, read once."""
        if layer not in self._meta:
            meta, stored = self.store.layer_meta(layer)
            self._meta[layer] = (meta, kind_named(meta.kind), stored)
        return self._meta[layer]

    def model(self):
        if self._model is None:
            self._model = self.store.model_at("c0")
        return self._model

    def bytes_per_sample(self, layer: str) -> float:
        b, r = self.con.execute("SELECT sum(bytes), sum(rows) FROM shards WHERE kind = 'factors' AND layer = ?",
                                [layer]).fetchone()
        return b / r

    def replay_queries(self) -> None:
        """Replays every test sample once at the checkpoint (what an INFLUENCE query does first)."""
        layers = [l for ls in self.units.values() for l in ls]
        model = self.model()
        labels = torch.as_tensor(self.store.sample_columns(self.test_ids, ["label"])["label"].astype(np.int64))
        inputs = self.store.inputs(self.test_ids)
        t0 = clock()
        self.query = replay_factors(model, watched_modules(model, layers), inputs, labels)
        self.query_seconds = clock() - t0

    def query_side(self, layer: str, b: int) -> dict:
        """ops.query_side of the first b test samples (computed once; the last few are kept)."""
        key = (layer, b)
        if key not in self._sides:
            meta, kind, _ = self.meta(layer)
            self._sides[key] = ops.query_side(kind, meta, {k: v[:b] for k, v in self.query[layer].items()})
            while len(self._sides) > 6:
                self._sides.pop(next(iter(self._sides)))
        return self._sides[key]

    def touch(self) -> None:
        """Reads every shard once, so the timed scans are warm (in the page cache)."""
        for ls in self.units.values():
            for l in ls:
                for _, tensors in self.parts(l):
                    for t in tensors.values():
                        t.float().sum() if t.is_floating_point() else t.sum()


def build(name, path, model, x, y, n_train, batch, units, bp, storage=None) -> Workload:
    """Registers train and test samples (with inputs) and captures the train samples' factors in a
    training loop (SGD) at checkpoint c0."""
    log(f"{name}: capturing {n_train} training samples")
    con = metaql.connect(path)
    n_test = len(x) - n_train
    train, test = np.arange(n_train), TEST0 + np.arange(n_test)
    con.add_samples(train, "train", y[:n_train].numpy(), x[:n_train])
    con.add_samples(test, "test", y[n_train:].numpy(), x[n_train:])
    layers = [l for ls in units.values() for l in ls]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    with con.capture(model, layers=layers, checkpoint="c0", lr=LR, storage=storage) as cap:
        for sl in batches(n_train, batch):
            loss = F.cross_entropy(model(x[sl]), y[sl])
            cap.backward(loss, train[sl])
            opt.step()
            opt.zero_grad()
    # the cost model's constants as a user gets them (at this run's thread count): base, per-family
    # weights and each layer's own fit; the estimates and the optimizer's picks below use them
    log(f"{name}: PRAGMA metaql_calibrate")
    t0 = clock()
    con.execute("PRAGMA metaql_calibrate")
    wl = Workload(name, con, path, units, n_train, n_test, bp)
    wl.calibrate_seconds = clock() - t0
    log(f"{name}: replaying {n_test} test samples")
    wl.replay_queries()
    wl.touch()
    return wl


# ---- timing the operators ----------------------------------------------------------------------------------

OPS = {"iterate": ops.iterate, "batch_average": ops.batch_average, "reconstruct": ops.reconstruct}


def scan(wl: Workload, layer: str, strategy: str, q: dict, n: int, cap_s: float):
    """Seconds for one strategy over the first n training samples of a layer, shard by shard and
    chunk by chunk (the engine's chunk sizes; contiguous slices of the memory-mapped shards, no
    copies), with the engine's operator on each chunk of stored factors (the kind's rows, e.g. the
    im2col of a convolution, are built inside, as in the executor). Stops after cap_s seconds and
    extrapolates linearly: (seconds, extrapolated?)."""
    meta, kind, stored = wl.meta(layer)
    op = OPS[strategy]
    done, t0 = 0, clock()
    for _, tensors in wl.parts(layer):
        rows = min(next(iter(tensors.values())).shape[0], n - done)
        step = chunk_rows(tensors, q, strategy, meta)
        for s in range(0, rows, step):
            chunk = {k: v[s:min(s + step, rows)] for k, v in tensors.items()}
            if stored == "full":
                ops.full_dot(chunk["G"], q)
            else:
                op(kind, meta, chunk, q)
            done += min(s + step, rows) - s
            if clock() - t0 > cap_s and done < n:
                return (clock() - t0) * n / done, True
        if done >= n:
            break
    return clock() - t0, False


def unit_scan(wl, unit, strategy, b, n, cap_s, repeat=3, min_seconds=0.5, layers=None):
    """A unit's layers summed (or only `layers`): (seconds, extrapolated?), the best of at least
    `repeat` runs and until min(cap_s, min_seconds) were spent (at most 30), so short scans are
    repeated enough to see past other jobs' time slices; one run when the first hit the time cap."""
    layers = wl.units[unit] if layers is None else layers
    best, extra, spent, runs = float("inf"), False, 0.0, 0
    while runs < repeat or (spent < min(cap_s, min_seconds) and runs < 30):
        total, ex = 0.0, False
        for layer in layers:
            s, e = scan(wl, layer, strategy, wl.query_side(layer, b), n, cap_s / len(layers))
            total, ex = total + s, ex or e
        if total < best:
            best, extra = total, ex
        spent, runs = spent + total, runs + 1
        if ex or spent > cap_s:
            break
    return best, extra


def query_prep(wl, layer, b) -> dict[str, float]:
    """Query-side work each strategy needs once per query, as ops.query_side builds it for a dot
    product: rows of the B query samples (iterate), their average gradient Gbar (batch_average,
    reconstruct: kind.average_of, from the factors); replay excluded (common to all)."""
    meta, kind, _ = wl.meta(layer)
    f = {k: v[:b] for k, v in wl.query[layer].items()}

    def rows():
        x, d = kind.rows(meta, f)
        return kind.flat_rows(meta, x), kind.flat_rows(meta, d)
    t_rows, _ = best_of(rows)
    t_avg, _ = best_of(lambda: kind.average_of(meta, f))
    return {"iterate": t_rows, "batch_average": t_avg, "reconstruct": t_avg}


def precompute(wl, unit, n_pre: int, repeat: int) -> tuple[float, int]:
    """Pre-compute: full gradients of the first n_pre training samples held in memory (built from the
    factors beforehand, not timed), scored by one matrix-vector product against the point query's
    full gradient (ops.full_dot). (seconds per training sample, n_pre)."""
    gs, qs = [], []
    for layer in wl.units[unit]:
        meta, kind, _ = wl.meta(layer)
        parts, got = [], 0
        for _, tensors in wl.parts(layer):
            for s in range(0, next(iter(tensors.values())).shape[0], 16):
                if got >= n_pre:
                    break
                chunk = {k: v[s:s + min(16, n_pre - got)] for k, v in tensors.items()}
                parts.append(kind.full(meta, chunk))
                got += parts[-1].shape[0]
        gs.append(torch.cat(parts))
        qs.append(wl.query_side(layer, 1)["gbar_flat"])
    g = torch.cat(gs, dim=1).contiguous() if len(gs) > 1 else gs[0].contiguous()
    q = {"gbar_flat": torch.cat(qs)}
    del gs, parts
    t, _ = best_of(lambda: ops.full_dot(g, q), repeat, min_seconds=1.0)
    return t / g.shape[0], g.shape[0]


def recompute(wl, unit, n_re: int) -> float:
    """Re-compute: replay the first n_re training samples' forward/backward at query time (batched,
    down to the unit's layers), then the factored inner product with the point query. Seconds per
    training sample."""
    model = wl.model()
    ids = wl.train_ids[:n_re]
    inputs = wl.store.inputs(ids)
    labels = torch.as_tensor(wl.store.sample_columns(ids, ["label"])["label"].astype(np.int64))
    t0 = clock()
    f = replay_factors(model, watched_modules(model, wl.units[unit]), inputs, labels)
    for layer in wl.units[unit]:
        meta, kind, _ = wl.meta(layer)
        ops.iterate(kind, meta, f[layer], wl.query_side(layer, 1))
    return (clock() - t0) / n_re


# ---- the optimizer's view ---------------------------------------------------------------------------------

def optimizer_picks(wl, unit, n, b) -> dict[str, str]:
    """What the engine's optimizer (choose_strategies, this store's cost constants) picks per layer
    for n training samples and a query of b samples."""
    scan_ = InfluenceScan(train=Side("batch", np.arange(n), "train"), query=Side("batch", np.arange(b), "q"),
                          layers=wl.units[unit], checkpoints=["c0"])
    return {s.layer: s.chosen for s in choose_strategies(scan_, wl.store)}


def estimated(wl, unit, n, b) -> dict[str, float]:
    """The cost model's estimate (seconds, this store's constants) per strategy, summed over the
    unit's layers, for n training samples and a query of b samples."""
    scan_ = InfluenceScan(train=Side("batch", np.arange(n), "train"), query=Side("batch", np.arange(b), "q"),
                          layers=wl.units[unit], checkpoints=["c0"])
    out: dict[str, float] = {}
    for s in choose_strategies(scan_, wl.store):
        for name, e in s.estimates.items():
            out[name] = out.get(name, 0.0) + e["seconds"]
    return out


RATIOS: list[float] = []     # every measured/estimate of the run (the cost model's target)


def ratio_text(measured: dict[str, float], estimate: dict[str, float], names) -> str:
    """measured/estimate per strategy, 'a / b / c' in the order of `names`."""
    ratios = [measured[k] / estimate[k] if estimate.get(k) else None for k in names]
    RATIOS.extend(r for r in ratios if r is not None)
    return " / ".join("-" if r is None else f"{r:.2g}" for r in ratios)


EXPLAIN_LINE = re.compile(r"^\s*([^/\s]+)/(\S+)(?: \([^)]*\))?: (\w+)\s+\[(.*)\]")   # (kind) optional


def explain_picks(con, layers, query) -> tuple[list[str], dict[str, str]]:
    lines = [r[0] for r in con.execute(f"EXPLAIN SELECT * FROM INFLUENCE(layers=[{', '.join(layers)}], "
                                       f"query={query})").fetchall()]
    picks = {m.group(2): m.group(3) for m in map(EXPLAIN_LINE.match, lines) if m}
    return lines, picks


# ---- the tables -----------------------------------------------------------------------------------------

def mark(seconds, extrapolated, scale=1e3):
    v = seconds * scale
    return ("≈" if extrapolated else "") + (f"{v:.3g}" if v < 1000 else f"{v:,.0f}")


def p2p_table(wls, cfg, results) -> None:
    """Fig. 24: per training sample, MetaQL's factored P2P (the strategy EXPLAIN picks for a point
    query) vs pre-compute vs re-compute."""
    rows, keep = [], {}
    for wl in wls:
        for unit, layers in wl.units.items():
            n = len(wl.train_ids)
            log(f"P2P {wl.name} {unit}")
            params = sum(wl.meta(l)[0].params for l in layers)
            stored = "/".join(sorted({wl.meta(l)[2] for l in layers}))
            fb = sum(wl.bytes_per_sample(l) for l in layers)
            _, picks = explain_picks(wl.con, layers, f"point({wl.test_ids[0]})")
            pick = "/".join(sorted(set(picks.values())))
            strategy = pick if pick in OPS else "iterate"
            fac, fac_x = unit_scan(wl, unit, strategy, 1, n, cfg["cap_s"], cfg["repeat"], min_seconds=1.0)
            n_pre = min(cfg["big_pre_n"] if params > 1e7 else cfg["pre_n"], n,
                        max(1, int(cfg["pre_bytes"] // (params * 4))))
            pre, n_pre = precompute(wl, unit, n_pre, cfg["repeat"])
            n_re = min(cfg["re_n"], n)
            re_ = recompute(wl, unit, n_re)
            fac_us = 1e6 * fac / n
            est = estimated(wl, unit, n, 1)
            keep[(wl.name, unit)] = {"fac": fac_us, "pre": 1e6 * pre, "re": 1e6 * re_, "strategy": strategy}
            rows.append([wl.name, unit, params, stored, fb, pick, ("≈" if fac_x else "") + f"{fac_us:.3g}", n,
                         1e6 * pre, n_pre, 1e6 * re_, n_re, 1e6 * pre / fac_us, 1e6 * re_ / fac_us,
                         ratio_text({strategy: fac}, est, [strategy])])
    results["p2p"] = keep
    results["p2p_rows"] = rows


P2P_HEAD = ["model", "layer", "params", "stored", "factored B/sample", "EXPLAIN pick (point query)",
            "MetaQL factored us/sample", "N", "pre-compute us/sample", "N pre", "re-compute us/sample", "N re",
            "pre / factored", "re / factored", "measured / estimate (pick)"]


def p2p_vs_n_table(wls, cfg, results, units) -> list[list]:
    """Fig. 26: one point query's time as the number of training samples grows."""
    rows = []
    for wl in wls:
        for unit in units.get(wl.name, []):
            per = results["p2p"][(wl.name, unit)]
            for n in cfg[f"{wl.key}_grid"]:
                fac, ex = unit_scan(wl, unit, per["strategy"], 1, n, cfg["cap_s"], cfg["repeat"])
                pre_ms, re_ms = per["pre"] * n / 1e3, per["re"] * n / 1e3
                rows.append([wl.name, unit, n, mark(fac, ex), f"≈{pre_ms:.3g}", f"≈{re_ms:,.0f}",
                             pre_ms / (1e3 * fac), re_ms / (1e3 * fac)])
    return rows


def p2b_rows(wl, unit, n, b, cfg) -> list:
    """One query of B samples over N training samples. Baselines as the paper defines them (§19.2):
    Iterate = the optimized P2P operator called once per query sample, then averaged (B calls, each
    a scan); Reconstruction = each training gradient rebuilt and dotted with Gbar. P2B = the engine:
    per layer the strategy its optimizer picks, among batch_average (Lemma 7) and iterate batched
    over all B query samples in one scan (one Gram product per chunk)."""
    log(f"P2B {wl.name} {unit} N={n} B={b}")
    layers = wl.units[unit]
    t = {strat: {} for strat in STRATEGIES}
    ex = {strat: False for strat in STRATEGIES}
    for layer in layers:
        prep = query_prep(wl, layer, b)
        for strat in STRATEGIES:
            sec, e = unit_scan(wl, unit, strat, b, n, cfg["cap_s"], cfg["repeat"], layers=[layer])
            t[strat][layer], ex[strat] = sec + prep[strat], ex[strat] or e
    one, _ = unit_scan(wl, unit, "iterate", 1, n, cfg["cap_s"], cfg["repeat"])
    paper_iterate = b * (one + sum(query_prep(wl, layer, 1)["iterate"] for layer in layers))
    total = {strat: sum(t[strat].values()) for strat in STRATEGIES}
    picks = optimizer_picks(wl, unit, n, b)
    engine = sum(t[picks[layer]][layer] for layer in layers)
    engine_ex = any(ex[picks[layer]] for layer in layers)
    base = min(paper_iterate, total["reconstruct"])
    return [wl.name, unit, n, b, mark(paper_iterate, True), mark(total["reconstruct"], ex["reconstruct"]),
            mark(total["iterate"], ex["iterate"]), mark(total["batch_average"], ex["batch_average"]),
            "/".join(sorted(set(picks.values()))), mark(engine, engine_ex), base / engine, base / engine >= 2,
            base / total["batch_average"], min(total, key=total.get),
            ratio_text(total, estimated(wl, unit, n, b), ("iterate", "reconstruct", "batch_average"))]


P2B_HEAD = ["model", "layer", "N train", "B query", "Iterate (paper: B P2P calls) ms", "Reconstruction ms",
            "iterate batched ms", "batch_average (Lemma 7) ms", "optimizer pick", "MetaQL P2B (pick) ms",
            "best paper baseline / P2B", ">= 2x", "best paper baseline / Lemma 7", "measured fastest",
            "measured / estimate (iterate / reconstruct / batch_average)"]
P2B_RATIO, LEMMA7_RATIO = P2B_HEAD.index("best paper baseline / P2B"), P2B_HEAD.index("best paper baseline / Lemma 7")


def e2e_table(wl, cfg, layers) -> tuple[list[list], list[str]]:
    """The whole query path, per forced strategy and the optimizer's own pick."""
    path = wl.path
    model = wl.con.store.live_model   # a fresh connection does not trust the store's factory (__main__:...)
    wl.con.close()
    rows, explain = [], []
    with metaql.connect(path) as con:
        for b in cfg["e2e_b"]:
            con.execute(f"CREATE OR REPLACE SET q{b} AS SELECT sample_id FROM samples "
                        f"WHERE split = 'test' AND sample_id < {TEST0 + b}")
    for b in cfg["e2e_b"]:
        sql = f"SELECT * FROM INFLUENCE(layers=[{', '.join(layers)}], query=batch(q{b}))"
        times, scores = {}, {}
        for strat in (*STRATEGIES, "auto"):
            log(f"end-to-end B={b} {strat}")
            config = {} if strat == "auto" else {"force_strategy": strat}
            with metaql.connect(path, config=config) as con:
                con.attach_model(model)
                if strat == "auto":
                    lines, picks = explain_picks(con, layers, f"batch(q{b})")
                    explain += [f"-- B = {b}: EXPLAIN {sql}"] + lines
                t0 = clock()
                res = con.execute(sql).fetchnumpy()
                times[strat] = clock() - t0
                scores[strat] = res["score"][np.argsort(res["sample_id"])]
        ref = scores["batch_average"]
        agree = max(float(np.abs(s - ref).max() / np.abs(ref).max()) for s in scores.values())
        fastest = min(STRATEGIES, key=times.get)
        rows.append([wl.name, ", ".join(layers), len(wl.train_ids), b, *(times[s] for s in STRATEGIES),
                     times["auto"], ", ".join(f"{k}: {v}" for k, v in picks.items()), fastest, agree])
    return rows, explain


E2E_HEAD = ["model", "layers", "N train", "B query", "iterate s", "reconstruct s", "batch_average s",
            "auto s", "EXPLAIN pick", "fastest forced", "max rel. score diff"]


def bandwidth_table(wl, cfg) -> tuple[list[list], dict]:
    """Warm P2P scan over the big layer's stored factors vs this machine's memory bandwidth."""
    layer = wl.units["big"][0]
    n = len(wl.train_ids)
    log("bandwidth")
    nbytes = sum(t.numel() * t.element_size() for _, ts in wl.parts(layer) for t in ts.values())
    q = wl.query_side(layer, 1)
    bw = memory_bandwidth(cfg["bw_mib"], repeat=cfg["repeat"] + 2)
    t_eng, _ = best_of(lambda: scan(wl, layer, "iterate", q, n, 1e9), cfg["repeat"] + 2, min_seconds=1.0)
    bw2 = memory_bandwidth(cfg["bw_mib"], repeat=cfg["repeat"] + 2)
    read = max(bw["read"], bw2["read"])
    mib = cfg["bw_mib"]
    rows = [[f"memory: sum over a {mib} MiB tensor (read)", mib * 2 ** 20, None, read, 1.0],
            [f"memory: copy {mib} MiB (read + write)", 2 * mib * 2 ** 20, None, max(bw["copy"], bw2["copy"]),
             max(bw["copy"], bw2["copy"]) / read],
            [f"engine: warm P2P scan (iterate) over {layer}, {n} samples", nbytes, t_eng * 1e3,
             nbytes / t_eng / 1e9, nbytes / t_eng / 1e9 / read]]
    return rows, {"scan": nbytes / t_eng / 1e9, "read": read}


# ---- main ---------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run, about a minute")
    ap.add_argument("--no-minilm", action="store_true", help="skip the MiniLM workload")
    ap.add_argument("--models", default="vgg,minilm,mlp", help="comma list of the stores: vgg, minilm, mlp")
    ap.add_argument("--tables", default=",".join(TABLES), help=f"comma list of the tables: {', '.join(TABLES)}")
    ap.add_argument("--out", default=None, help="results file name (default engine, engine_quick with --quick)")
    add_threads_option(ap)
    add_clock_option(ap)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    set_clock(args.clock)
    models = set(args.models.split(",")) - ({"minilm"} if args.no_minilm else set())
    tables = set(args.tables.split(","))
    cfg = dict(QUICK if args.quick else FULL)
    report = Report(args.out or ("engine_quick" if args.quick else "engine"),
                    "MetaStore query strategies (Figures 24-27, §17-18)",
                    sys.argv if argv is None else ["benchmarks/bench_engine.py", *argv])
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory(prefix="bench-engine-")
    wls, build_s = [], {}

    vgg = mlp = None
    if "vgg" in models:
        t0 = clock()
        x, y = cifar_like(cfg["vgg_n"] + cfg["vgg_test"])
        vgg = build("VGG16", f"{tmp.name}/vgg.mq", VGG16(), x, y, cfg["vgg_n"], cfg["vgg_batch"],
                    {u: [u] for u in ("conv1", "conv7", "conv13", "fc1", "fc3")}, cfg["vgg_bp"],
                    storage={"conv1": "factored"})
        vgg.key = "vgg"
        wls.append(vgg)
        build_s["VGG16"] = clock() - t0

    if "minilm" in models and minilm_available():
        t0 = clock()
        ids, y = token_sequences(cfg["minilm_n"] + cfg["minilm_test"], cfg["minilm_len"])
        units = {f"SAL{b}": sal_layers(b) for b in MINILM_BLOCKS}
        units["head"] = ["head"]
        mini = build("MiniLM", f"{tmp.name}/minilm.mq", load_minilm(), ids, y, cfg["minilm_n"],
                     cfg["minilm_batch"], units, cfg["minilm_bp"])
        mini.key = "minilm"
        wls.append(mini)
        build_s["MiniLM"] = clock() - t0

    if "mlp" in models:
        t0 = clock()
        g = torch.Generator().manual_seed(1)
        xm = torch.randn(cfg["mlp_n"] + cfg["mlp_test"], 256, generator=g)
        ym = torch.randint(0, 10, (len(xm),), generator=g)
        mlp = build("MLP-4096", f"{tmp.name}/mlp.mq", WideMLP(), xm, ym, cfg["mlp_n"], cfg["mlp_batch"],
                    {"big": ["big"]}, cfg["mlp_bp"])
        mlp.key = "mlp"
        wls.append(mlp)
        build_s["MLP-4096"] = clock() - t0

    results: dict = {}
    setup = [[wl.name, len(wl.train_ids), len(wl.test_ids), build_s[wl.name], wl.calibrate_seconds,
              wl.query_seconds, 1e3 * wl.query_seconds / len(wl.test_ids)] for wl in wls]
    report.add("Set-up: stores captured in this run",
               table(["model", "N train captured", "test samples", "capture s (with calibrate)",
                      "PRAGMA metaql_calibrate s", "query replay s (all test)", "replay ms/query sample"], setup),
               "Training-like loop (SGD, lr 0.01) with capture at checkpoint c0; test samples registered with "
               "their inputs and replayed at the checkpoint once, as an INFLUENCE query does. VGG16: random "
               "CIFAR-shaped images, conv1 stored factored on purpose (storage override) so its factored "
               "strategies can be timed (the space formula keeps it full). MiniLM: random token sequences "
               f"of length {cfg['minilm_len']}. MLP-4096: Linear(256,4096) -> Linear(4096,4096) 'big' -> "
               "Linear(4096,10) on random 256-d inputs.")

    results.update(p2p={}, p2p_rows=[])
    if "p2p" in tables:
        p2p_table(wls, cfg, results)
        report.add("Figure 24: P2P time per training sample (one test sample as the query)",
                   table(P2P_HEAD, results["p2p_rows"]),
                   "MetaQL factored: the strategy EXPLAIN picks for a point query (iterate, the paper's P2P, "
                   "except on conv1 where batch_average is cheaper) run with the engine's operators over the "
                   "stored factors of N training samples; each operator builds what it needs from the stored "
                   "factors inside the timing (for a convolution, iterate correlates the stored input with the "
                   "query's patches; batch_average and reconstruct build im2col rows). Best of up to 30 warm "
                   "runs (at least 1 s of runs); ≈ = stopped after a time cap and extrapolated linearly. "
                   "pre-compute: full gradients of 'N pre' training samples held in memory (built beforehand, "
                   "untimed), one matrix-vector product (ops.full_dot), best of at least 1 s of runs. "
                   "re-compute: replay of 'N re' training samples (forward + backward down to the layer, "
                   "batched) then the factored inner product. A unit of several layers (SALk = Q, K, V, output "
                   "projection) sums them. The query side (replay of the test sample) is common to all and not "
                   "included.")

    vs_n_units = {"VGG16": ["conv13", "fc3"], "MiniLM": ["SAL5"], "MLP-4096": ["big"]}
    if "vsn" in tables and "p2p" in tables:
        report.add("Figure 26: P2P time per query while varying the number of training samples",
                   table(["model", "layer", "N train", "factored ms", "pre-compute ms", "re-compute ms",
                          "pre/factored", "re/factored"], p2p_vs_n_table(wls, cfg, results, vs_n_units)),
                   "factored measured at each N (≈ = time cap, extrapolated); pre-compute and re-compute are "
                   "N x their per-sample times measured in the Figure 24 table (both are linear scans: the full "
                   "gradients of the larger N do not fit this machine's memory for conv13 / big).")

    p2b_units = {"VGG16": ["conv7", "conv13", "fc1"], "MiniLM": ["SAL5"], "MLP-4096": ["big"]}
    rows_n, rows_b = [], []
    for wl in (wls if "p2b" in tables else []):
        for unit in p2b_units.get(wl.name, []):
            if wl.name != "MLP-4096":
                for n in cfg[f"{wl.key}_grid"]:
                    rows_n.append(p2b_rows(wl, unit, n, wl.bp, cfg))
            for b in cfg[f"{wl.key}_b"]:
                if b != wl.bp or wl.name == "MLP-4096":
                    rows_b.append(p2b_rows(wl, unit, len(wl.train_ids), b, cfg))
    results["p2b_n"], results["p2b_b"] = rows_n, rows_b
    report.add("Figure 27: P2B while varying the number of training samples (fixed query batch)",
               table(P2B_HEAD, rows_n),
               f"Query batch B = {cfg['vgg_bp']} (VGG16) / {cfg['minilm_bp']} (MiniLM). Times per query: the "
               "scan over N training samples plus the query-side work the strategy needs once (rows of the "
               "query samples for iterate; their average gradient Gbar for batch_average and reconstruct); "
               "the replay of the B query samples is common to all and excluded. Baselines as the paper "
               "defines them (§19.2): Iterate calls the optimized P2P operator once per query sample (B "
               "scans; ≈: B x one call measured at this N, the calls being alike), Reconstruction rebuilds each "
               "training gradient from its factors and dots it with Gbar. MetaQL P2B: per layer the strategy "
               "metaql.engine.optimizer.choose_strategies picks for this N and B, among Lemma 7 "
               "(batch_average) and iterate batched over all B query samples in one scan (a Gram product "
               "per chunk; not in the paper). 'best paper baseline / Lemma 7' shows Lemma 7 alone. "
               "≈ elsewhere = time cap, extrapolated.")
    report.add("Figure 27 (continued): P2B while varying the query batch size (all N training samples)",
               table(P2B_HEAD, rows_b),
               "Same measurement. Per the cost formulas, batched iterate costs B*S*Sq*(Din+Dout) per training "
               "sample and batch_average S*Din*Dout: batched iterate wins below B = Din*Dout / (Sq*(Din+Dout)), "
               "which is where the optimizer picks it.")

    if "e2e" in tables and vgg is not None:
        e2e_rows, explain = e2e_table(vgg, cfg, ["conv13", "fc1"])
        report.add("End-to-end query path (VGG16, conv13 + fc1)",
                   table(E2E_HEAD, e2e_rows) + "\n\n```text\n" + "\n".join(explain) + "\n```",
                   "Wall time of con.execute(\"SELECT * FROM INFLUENCE(layers=[conv13, fc1], query=batch(qB))\")."
                   "fetchnumpy() on a fresh metaql.connect(store, config={'force_strategy': ...}) per strategy "
                   "(auto: no forcing, the optimizer's pick per layer), sets made by CREATE SET qB AS SELECT "
                   "sample_id FROM samples WHERE split = 'test' AND sample_id < ...; includes the replay of the "
                   "B query samples and rebuilding the model from the store. Scores of all strategies agree "
                   "(last column: max |score - score_batch_average| / max |score_batch_average|).")

    bw = None
    if "bw" in tables and mlp is not None:
        bw_rows, bw = bandwidth_table(mlp, cfg)
        report.add("Warm P2P scan vs memory bandwidth (MLP-4096, layer big)",
                   table(["what", "bytes", "ms", "GB/s", "fraction of read bandwidth"], bw_rows),
                   "Bytes of the scan: the stored factors (X and D, float32) of every training sample; the scan "
                   "is the engine's iterate operator on the memory-mapped shards, warm (best of a few runs). "
                   f"Read bandwidth: a sum over a {cfg['bw_mib']} MiB tensor, measured before and after the scan (best).")

    # targets
    p2p = results["p2p"]
    c13, big = p2p.get(("VGG16", "conv13")), p2p.get(("MLP-4096", "big"))
    r13 = c13["pre"] / c13["fac"] if c13 else float("nan")
    rbig = big["pre"] / big["fac"] if big else float("nan")
    p2b_ratios = [r[P2B_RATIO] for r in rows_n]
    lemma7 = [r[LEMMA7_RATIO] for r in rows_n]
    by_b = [r[P2B_RATIO] for r in rows_b]
    targets = [
        ["factored P2P >= 100x faster than pre-compute on conv13", f"{r13:.1f}x", r13 >= 100],
        ["factored P2P >= 100x faster than pre-compute on the 4096x4096 linear layer", f"{rbig:.0f}x",
         rbig >= 100],
        ["P2B (the optimizer's pick) >= 2x faster than the better of the paper's Iterate and Reconstruction "
         "at every size of Fig. 27 (varying N, fixed B)", f"min {min(p2b_ratios):.2f}x" if p2b_ratios else "-",
         bool(p2b_ratios) and min(p2b_ratios) >= 2],
        ["(reference, not a target) Lemma 7 alone, same rows", f"min {min(lemma7):.2f}x" if lemma7 else "-",
         bool(lemma7) and min(lemma7) >= 2],
        ["(reference, not a target: beyond the paper's figure) P2B while varying B",
         f"min {min(by_b):.2f}x" if by_b else "-", bool(by_b) and min(by_b) >= 2],
        ["warm P2P scan >= half of the memory (read) bandwidth",
         f"{bw['scan']:.2f} of {bw['read']:.2f} GB/s ({bw['scan'] / bw['read']:.2f})" if bw else "-",
         bool(bw) and bw["scan"] >= 0.5 * bw["read"]],
        ["cost model: every strategy's estimate within 2x of its measured time (Fig. 24 picks, Fig. 27 "
         "iterate / reconstruct / batch_average)", f"measured/estimate {min(RATIOS):.2g} .. {max(RATIOS):.2g}"
         if RATIOS else "-", bool(RATIOS) and 0.5 <= min(RATIOS) and max(RATIOS) <= 2],
        ["(the same) rows whose measured/estimate is within [0.5, 2]",
         f"{sum(0.5 <= r <= 2 for r in RATIOS)} of {len(RATIOS)}", bool(RATIOS) and all(0.5 <= r <= 2 for r in RATIOS)],
    ]
    report.add("Targets", table(["target", "measured", "met"], targets))
    tmp.cleanup()
    report.write()


if __name__ == "__main__":
    main()
