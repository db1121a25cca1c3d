"""Sampling for model diagnosis (papers/004, Fig. 4-7) at this machine's scale, through MetaQL.

A LeNet-style CNN with batch normalisation after every layer is trained on scikit-learn's digits
(8x8); the diagnosis data set is the held-out digits grown with random affine copies (rotation up to
15 degrees, scale 0.9-1.1, shift up to 1 px, as bench_elite.py grows its sets). Its activations at
four layers (the ReLU outputs of conv1, conv2, fc1, fc2; conv channels reduced by their spatial max)
are captured into a MetaQL store with con.capture_activations, and samples are drawn with
DIAGNOSIS_SAMPLE over the latent space of fc2 (84 units, the last hidden layer).

For every method, fraction (5/10/20/40/80%) and draw (seed), the query sets are answered on the
sample and compared with the full data's answers for every (layer, class, correct/incorrect)
combination the full data holds: S1 precision of the top-k neurons by maximal activation, S2 cosine
distance of the mean activations, S3 Jensen-Shannon distance of the histograms of maximally
activated neurons. A combination the sample holds no sample of scores the worst value (precision
0, distance 1): the query has no answer on that sample. Also: S1 precision against k at 5% (Fig.
5), the effect of j at 5% (Fig. 6), the time to create a 5% sample by CREATE SET ... FROM
DIAGNOSIS_SAMPLE (Fig. 7), and the bytes a sample's activations take against all activations.

The query answers are computed with numpy on the activation matrices read from the store once
(tests/test_activations.py checks that the SQL query sets over ACTIVATIONS equal these); the
ordering of a latent method depends only on (method, seed), so it is computed once per draw and
cut at every fraction and j (DIAGNOSIS_SAMPLE does the same computation per call).

    python benchmarks/bench_diagnosis.py            # full run (about 5-8 minutes on 2 cores)
    python benchmarks/bench_diagnosis.py --quick    # smoke run, under a minute
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import metaql
from metaql.diagnosis import querysets as qs
from metaql.diagnosis.activations import read_activations
from metaql.diagnosis.sampling import METHODS, _ends, diagnosis_sample, ratio_order, sample_size

sys.path.insert(0, str(Path(__file__).parent))
from bench_elite import affine_copies, digits  # noqa: E402
from metastore_common import RESULTS, Report, table  # noqa: E402

LAYERS = ["act1", "act2", "act3", "act4"]       # ReLU outputs of conv1, conv2, fc1, fc2
LATENT = "act4"
FRACTIONS = [0.05, 0.1, 0.2, 0.4, 0.8]
LATENT_METHODS = ("maxmargin", "gmm_full", "gmm_spherical")


class LeNetBN(nn.Module):
    """LeNet-5 shaped for 8x8 digits, batch normalisation after every hidden layer (papers/004 Fig. 2)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(6, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.fc1, self.bn3, self.act3 = nn.Linear(16 * 2 * 2, 120), nn.BatchNorm1d(120), nn.ReLU()
        self.fc2, self.bn4, self.act4 = nn.Linear(120, 84), nn.BatchNorm1d(84), nn.ReLU()
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        h = F.max_pool2d(self.act1(self.bn1(self.conv1(x))), 2)
        h = F.max_pool2d(self.act2(self.bn2(self.conv2(h))), 2)
        h = self.act3(self.bn3(self.fc1(h.flatten(1))))
        return self.fc3(self.act4(self.bn4(self.fc2(h))))


def trained_model(x: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = LeNetBN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def build(args, root: Path):
    """The store: the diagnosis set registered, the model checkpointed, predictions and activations stored."""
    x, y = digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, held = order[:1000], order[1000:]
    # the training digits plus affine copies of them, so the model is good on the affine-grown set
    # (as the paper's models are on theirs) and its errors are few, near its boundaries
    xt, yt = grown(x[train], y[train], len(train) + args.train_copies, np.random.default_rng(7))
    model = trained_model(xt, yt, args.epochs)
    xd, yd = grown(x[held], y[held], args.size, rng)
    con = metaql.connect(str(root / "diag.mq"))
    con.add_samples(np.arange(len(yd)), "test", yd, torch.from_numpy(xd))
    con.checkpoint(model, "final", lr=1.0)
    con.update_predictions("final")
    t0 = time.perf_counter()
    con.capture_activations([LATENT], samples="test", checkpoint="final")
    t_latent = time.perf_counter() - t0
    t0 = time.perf_counter()
    con.capture_activations([l for l in LAYERS if l != LATENT], samples="test", checkpoint="final")
    t_rest = time.perf_counter() - t0
    return con, {"latent_s": t_latent, "rest_s": t_rest}


def grown(x: np.ndarray, y: np.ndarray, size: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """The held-out digits plus affine copies of them, class by class, up to `size` samples."""
    if size <= len(y):
        return x[:size], y[:size]
    extra = size - len(y)
    per = np.bincount(y[rng.integers(0, len(y), extra)], minlength=10)     # classes in the held-out proportions
    xs = [x] + [affine_copies(x[y == c], int(per[c]), rng) for c in range(10) if per[c]]
    ys = [y] + [np.full(int(per[c]), c) for c in range(10) if per[c]]
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64)


def combinations(labels: np.ndarray, correct: np.ndarray) -> list[tuple[int, bool, np.ndarray]]:
    return [(c, ok, np.flatnonzero((labels == c) & (correct == ok)))
            for c in np.unique(labels) for ok in (True, False) if ((labels == c) & (correct == ok)).any()]


class Truth:
    """The full data's answers per (layer, class, correctness)."""

    def __init__(self, acts: dict[str, np.ndarray], labels, correct, k_of):
        self.acts, self.k_of = acts, k_of
        self.combos = combinations(labels, correct)
        self.member = {i: np.zeros(len(labels), bool) for i in range(len(self.combos))}
        for i, (_, _, rows) in enumerate(self.combos):
            self.member[i][rows] = True
        self.full = {(l, i): (qs.s2_mean(a[rows]), qs.s3_histogram(a[rows]))
                     for l, a in acts.items() for i, (_, _, rows) in enumerate(self.combos)}

    def scores(self, chosen: np.ndarray, k_override: int | None = None, layers=None) -> tuple[float, float, float]:
        mask = np.zeros(len(next(iter(self.member.values()))), bool)
        mask[chosen] = True
        s1, s2, s3 = [], [], []
        for l in layers or self.acts:
            a = self.acts[l]
            k = k_override or self.k_of[l]
            for i, (_, _, rows) in enumerate(self.combos):
                got = np.flatnonzero(mask & self.member[i])
                full_top = qs.s1_topk(a[rows], k)
                if len(got) == 0:
                    s1.append(0.0), s2.append(1.0), s3.append(1.0)
                    continue
                mean, hist = self.full[(l, i)]
                s1.append(qs.precision(qs.s1_topk(a[got], k), full_top))
                s2.append(qs.cosine_distance(qs.s2_mean(a[got]), mean))
                s3.append(qs.js_distance(qs.s3_histogram(a[got]), hist))
        return float(np.mean(s1)), float(np.mean(s2)), float(np.mean(s3))


def draw(method: str, latent, labels, preds, fraction: float, j: float, seed: int, orders: dict) -> np.ndarray:
    if method in LATENT_METHODS:
        key = (method, seed)
        if key not in orders:
            orders[key] = ratio_order(latent, labels, method, seed)
        group, score = orders[key]
        return _ends(group, score, sample_size(len(latent), fraction), j).positions
    return diagnosis_sample(latent, labels, preds, fraction, method, j, seed).positions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 800 samples, 2 draws, few epochs")
    ap.add_argument("--size", type=int, default=4000, help="diagnosis set size (held-out digits + affine copies)")
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--train-copies", type=int, default=4000,
                    help="affine copies of the training digits added to them (0: the 1,000 digits alone, a weaker model)")
    ap.add_argument("--name", default="", help="results/diagnosis<NAME>.md")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.size, args.draws, args.epochs, args.train_copies = 800, 2, 3, 500
    torch.set_num_threads(1)
    # one BLAS thread too: on a shared 2-core machine a threaded GaussianMixture fit ran 12x slower
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)
    name = "diagnosis_quick" if args.quick else f"diagnosis{args.name}"
    report = Report(name, "Sampling for model diagnosis (papers/004) on digits", sys.argv)
    with tempfile.TemporaryDirectory() as tmp:
        con, times = build(args, Path(tmp))
        run(con, args, report, times)
        con.close()
    if not args.no_write:
        report.write(RESULTS / f"{name}.md")


def run(con, args, report: Report, times: dict) -> None:
    store = con.store
    meta = con.execute("SELECT sample_id, label, pred FROM samples ORDER BY sample_id").fetchnumpy()
    ids, labels, preds = meta["sample_id"], meta["label"].astype(np.int64), meta["pred"].astype(np.int64)
    acts = {l: read_activations(store, "final", l, ids)[1] for l in LAYERS}
    correct = labels == preds
    k_of = {l: max(1, min(10, a.shape[1] // 3)) for l, a in acts.items()}
    truth = Truth(acts, labels, correct, k_of)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    wrong = int((~correct).sum())
    report.add("Set-up", f"commit {commit}; {len(ids)} samples ({wrong} misclassified, accuracy "
               f"{correct.mean():.3f}); layers {', '.join(f'{l} ({a.shape[1]} neurons, k={k_of[l]})' for l, a in acts.items())}; "
               f"latent layer {LATENT}; {len(truth.combos)} (class, correctness) combinations x {len(LAYERS)} layers; "
               f"{args.draws} draws per cell; j=0.7 unless varied; model trained {args.epochs} epochs on 1,000 digits "
               f"+ {args.train_copies} affine copies of them.")
    latent = acts[LATENT]
    orders: dict = {}
    results = {}
    for method in METHODS:
        for f in FRACTIONS:
            results[(method, f)] = np.array([truth.scores(draw(method, latent, labels, preds, f, 0.7, s, orders))
                                             for s in range(args.draws)])
    for q, (title, better) in enumerate([("S1 precision (higher is better)", "max"),
                                         ("S2 cosine distance (lower is better)", "min"),
                                         ("S3 Jensen-Shannon distance (lower is better)", "min")]):
        rows = [[m] + [f"{results[(m, f)][:, q].mean():.3f} ± {results[(m, f)][:, q].std():.3f}" for f in FRACTIONS]
                for m in METHODS]
        report.add(f"Fig. 4: {title}, mean ± std over draws", table(["method"] + [f"{int(f * 100)}%" for f in FRACTIONS], rows))
    report.add("At 5%: do the latent-space samples beat random and stratified?", verdict(results))
    if not args.quick and not args.no_write:
        write_measured_errors(results, args)
    rows = []
    for m in METHODS:
        picks = [draw(m, latent, labels, preds, 0.05, 0.7, s, orders) for s in range(args.draws)]
        covered = [np.mean([np.isin(rows_, p).any() for _, ok, rows_ in truth.combos if not ok]) for p in picks]
        rows.append([m, f"{np.mean([len(p) for p in picks]):.0f}", f"{np.mean([(~correct[p]).sum() for p in picks]):.1f}",
                     f"{np.mean(covered):.2f}"])
    report.add("Table IV: what a 5% sample holds (mean over draws)",
               table(["method", "samples", "misclassified", "share of (class, incorrect) combinations present"], rows))
    ks = [1, 3, 5, 10, 20, 40]
    rows = [[m] + [f"{np.mean([truth.scores(draw(m, latent, labels, preds, 0.05, 0.7, s, orders), k, ['act3', 'act4'])[0] for s in range(min(args.draws, 3))]):.3f}"
                   for k in ks] for m in METHODS]
    report.add("Fig. 5: S1 precision against k at 5% (layers act3, act4; mean over up to 3 draws)",
               table(["method"] + [f"k={k}" for k in ks], rows))
    js = [0.0, 0.3, 0.5, 0.7, 1.0]
    rows = []
    for m in LATENT_METHODS:
        per = [np.mean([truth.scores(draw(m, latent, labels, preds, 0.05, j, s, orders)) for s in range(min(args.draws, 3))],
                       axis=0) for j in js]
        rows.append([m] + [f"{p[0]:.3f} / {p[1]:.3f} / {p[2]:.3f}" for p in per])
    report.add("Fig. 6: effect of j at 5% (S1 precision / S2 cosine / S3 JS; mean over up to 3 draws)",
               table(["method"] + [f"j={j}" for j in js], rows))
    report.add("Fig. 7: time to create a 5% sample", timing(con, args), note=(
        f"Capturing the latent layer's activations for all {len(ids)} samples took {times['latent_s']:.2f} s; "
        f"the other three layers {times['rest_s']:.2f} s (replay, eval mode, one torch thread)."))
    report.add("Storage: a sample's activations against all activations", storage(con, ids))


def write_measured_errors(results, args) -> None:
    """The mean errors per method and fraction, which ACTIVATIONS(..., using_sample=) quotes."""
    import json
    rows = [{"method": m, "fraction": f, "s1_precision": float(results[(m, f)][:, 0].mean()),
             "s2_cosine": float(results[(m, f)][:, 1].mean()), "s3_js": float(results[(m, f)][:, 2].mean())}
            for m in METHODS for f in FRACTIONS]
    path = Path(__file__).resolve().parents[1] / "diagnosis" / "measured_errors.json"
    path.write_text(json.dumps({"benchmark": f"bench_diagnosis.py (digits LeNet-BN, {args.size} samples, "
                                f"{args.draws} draws)", "rows": rows}, indent=1) + "\n")


def verdict(results) -> str:
    lines = []
    for q, name, sign in ((0, "S1 precision", 1), (1, "S2 cosine distance", -1), (2, "S3 JS distance", -1)):
        base = {b: results[(b, 0.05)][:, q].mean() for b in ("random", "stratified_cm")}
        for m in ("maxmargin", "gmm_full"):
            v = results[(m, 0.05)][:, q].mean()
            beats = [b for b, x in base.items() if sign * (v - x) > 0]
            loses = [b for b in base if b not in beats]
            lines.append(f"- {m} {name} {v:.3f} (random {base['random']:.3f}, stratified_cm {base['stratified_cm']:.3f}): "
                         + (f"beats {', '.join(beats)}" if beats else "beats neither")
                         + (f"; does NOT beat {', '.join(loses)}" if loses else ""))
    return "\n".join(lines)


def timing(con, args) -> str:
    rows = []
    for m in METHODS:
        ts = []
        for s in range(3 if not args.quick else 1):
            t0 = time.perf_counter()
            con.execute(f"CREATE OR REPLACE SET s5 AS SELECT sample_id FROM DIAGNOSIS_SAMPLE(data=test, fraction=0.05, "
                        f"method='{m}', layer={LATENT}, checkpoint=final, seed={s})")
            ts.append(time.perf_counter() - t0)
        rows.append([m, f"{np.median(ts):.3f}"])
    return table(["method", "seconds (median of draws; CREATE SET through SQL, latent read from the store)"], rows)


def storage(con, ids) -> str:
    per = {l: b / r for l, b, r in con.execute(
        "SELECT layer, sum(bytes), sum(rows) FROM shards WHERE kind = 'activations' GROUP BY layer").fetchall()}
    full = sum(per.values()) * len(ids)
    rows = [["all activations, every sample", f"{full / 2 ** 20:.2f}", "1.000"]]
    for f in FRACTIONS:
        need = per[LATENT] * len(ids) + sum(v for l, v in per.items() if l != LATENT) * round(f * len(ids))
        rows.append([f"{int(f * 100)}% sample (+ the latent layer for every sample)", f"{need / 2 ** 20:.2f}",
                     f"{need / full:.3f}"])
    return table(["what is stored", "MiB", "of all"], rows) + (
        "\n\nBytes per row measured from the store's activation shards (Arrow files, float32); a sample needs the "
        "latent layer of every sample to be drawn, and the other layers for its own samples only.")


if __name__ == "__main__":
    main()
