"""Pivotal meta samples (papers/003, Tables 1 and 3 at this machine's scale): which 20 samples to
clean by hand so that meta re-weighting repairs a model trained on noisy labels.

Digits (sklearn, 8x8), 2/3 train / 1/3 test, labels corrupted either adversarially (a fraction of
every class relabelled as the next class, y -> y+1 mod 10: a systematic flip the warm-up model
learns) or uniformly (a random other class). A LeNet-style CNN is warmed up on the noisy labels
with MetaQL capturing 3 epochs spread evenly over the run, the last included (the cached
checkpoints: the paper samples its time steps uniformly from the training history; --cached-from
end captures the last 3 epochs instead). Then for each selection method, 20
meta samples get their clean labels (con.label, an oracle), REWEIGHT re-weights from the warm-up
model, and we report the test accuracy of the re-weighted model, the AUC between the learned
weights and label cleanness, and the selection time of RBC and GBC.

    python benchmarks/bench_pivotal.py            # adversarial 60% (10 seeds), uniform 40% and 60% (3 seeds each)
    python benchmarks/bench_pivotal.py --quick    # 1 seed, adversarial 60%, shorter training; writes nothing
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import metaql  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "pivotal.md"
METHODS = ["random", "uncertain", "certain", "finetune", "rbc_kmeans", "rbc", "gbc"]
# diagnostics (--methods), not the paper's baselines: random samples 2 per class of the noisy labels
# (fair: no clean label used) or of the true labels (an oracle: how much of the clustering's gain
# over random is covering every class)
DIAGNOSTICS = ["balanced_noisy", "balanced"]
# GBC's variance reductions (--methods): more layer draws, and no sampling at all (every layer at
# scale 1, the exact sum the draws estimate: if it trails RBC too, the gap is not sampling noise)
VARIANTS = {"gbc_d50": ("gbc", "draws=50"), "gbc_all": ("gbc", "draws=0"),
            # Eq. 10 read literally: |cos|-clustering, blind to the gradient's sign (pivotal/mco.py)
            "rbc_cos": ("rbc", "metric=cosine"), "gbc_cos": ("gbc", "metric=cosine"),
            "rbc_kmeans_cos": ("rbc_kmeans", "metric=cosine"), "gbc_all_cos": ("gbc", "draws=0, metric=cosine")}
BUDGET = 20
WARM_EPOCHS = {True: 10, False: 15}         # by --quick
REWEIGHT_EPOCHS = {True: 5, False: 10}
WIDE = [False]          # --wide: the warm-up model is LeNet(wide=True)


class LeNet(nn.Module):
    """LeNet-style CNN for 1x8x8 digits: two conv+pool stages, two linear layers; wide=True: 4x
    the channels and hidden units (16/32 channels, 128 hidden: hidden layers of real width)."""

    def __init__(self, classes: int = 10, wide: bool = False):
        super().__init__()
        self.metaql_config = {"classes": classes, "wide": wide}
        c1, c2, h = (16, 32, 128) if wide else (6, 16, 32)
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 2 * 2, h)
        self.fc2 = nn.Linear(h, classes)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        h = F.max_pool2d(torch.relu(self.conv2(h)), 2)
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


def digits(seed: int, noise: str, rate: float):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    ntr = 2 * len(y) // 3
    tr, te = order[:ntr], order[ntr:]
    if noise == "imbalance":
        return _imbalanced(x[tr], y[tr], rate, rng) + (x[te], y[te])
    clean = y[tr].clone()
    flip = torch.from_numpy(rng.random(ntr) < rate)
    noisy = clean.clone()
    if noise == "adversarial":
        noisy[flip] = (clean[flip] + 1) % 10
    else:
        noisy[flip] = (clean[flip] + torch.from_numpy(rng.integers(1, 10, ntr))[flip]) % 10
    return x[tr], clean, noisy, x[te], y[te]


def _imbalanced(x, y, factor: float, rng):
    """Class c keeps n_max * factor^(-c/9) of its training samples (clean labels): the largest
    class is `factor` times the smallest, as in the paper's long-tailed sets."""
    n_max = int(torch.bincount(y).min())
    keep = []
    for c in range(10):
        idx = np.nonzero((y == c).numpy())[0]
        keep += rng.choice(idx, max(1, int(round(n_max * factor ** (-c / 9)))), replace=False).tolist()
    keep = np.sort(np.asarray(keep))
    return x[keep], y[keep].clone(), y[keep].clone()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def cached_epochs(epochs: int, cached: int, spread: bool) -> set[int]:
    """The epochs captured (the checkpoints PIVOTAL_SAMPLES averages): `cached` of them spread evenly
    over the run and ending with the last (the paper's uniform sample of the history), or the last ones."""
    if not spread:
        return set(range(epochs - cached, epochs))
    return {int(round(e)) for e in np.linspace(epochs / cached - 1, epochs - 1, cached)}


def warm_up(con, x, noisy, seed: int, epochs: int, captured: set[int], lr: float = 0.1) -> tuple[nn.Module, list[str]]:
    """Trains on the noisy labels, capturing the epochs in `captured` (from their start)."""
    torch.manual_seed(seed)
    model = LeNet(wide=WIDE[0])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    ids = np.arange(len(noisy))
    names = []
    for e in range(epochs):
        perm = torch.randperm(len(noisy))
        capture = e in captured
        if capture:
            names.append(f"warm{e}")
            ctx = con.capture(model, checkpoint=names[-1], lr=lr, factory="__main__:LeNet", kwargs=model.metaql_config)
        with (ctx if capture else _Null()) as cap:
            for rows in perm.split(64):
                opt.zero_grad()
                loss = F.cross_entropy(model(x[rows]), noisy[rows])
                if capture:
                    cap.backward(loss, ids[rows.numpy()])
                else:
                    loss.backward()
                opt.step()
    return model, names


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def entropy(model, x) -> np.ndarray:
    with torch.no_grad():
        p = torch.softmax(model.eval()(x), 1)
    return (-(p * p.clamp_min(1e-12).log()).sum(1)).numpy()


def balanced(labels: torch.Tensor, rng) -> np.ndarray:
    """BUDGET random samples spread evenly over the classes of `labels` (2 per class of 10)."""
    classes = np.unique(labels.numpy())
    per = np.full(len(classes), BUDGET // len(classes))
    per[:BUDGET % len(classes)] += 1
    return np.concatenate([rng.choice(np.nonzero(labels.numpy() == c)[0], n, replace=False) for c, n in zip(classes, per)])


def select(con, method: str, model, x, seed: int, label_free: bool = True, pick_seed: int | None = None,
           labels: torch.Tensor | None = None) -> tuple[np.ndarray, float]:
    """(meta sample ids, seconds) for a selection method; pick_seed: PIVOTAL_SAMPLES's seed (K-means
    seeding, GBC's draws), by default the run's."""
    rng = np.random.default_rng(seed + 1)
    t0 = time.perf_counter()
    if method in ("random", "finetune"):
        ids = rng.choice(len(x), BUDGET, replace=False)
    elif method in ("balanced", "balanced_noisy"):
        ids = balanced(labels, rng)
    elif method in ("uncertain", "certain"):
        h = entropy(model, x)
        ids = np.argsort(-h if method == "uncertain" else h, kind="stable")[:BUDGET]
    else:
        base, extra = VARIANTS.get(method, (method, ""))
        rows = con.execute(f"SELECT sample_id FROM PIVOTAL_SAMPLES(data=train, k={BUDGET}, method={base}, "
                           f"label_free={str(label_free).lower()}, seed={seed if pick_seed is None else pick_seed}{', ' + extra if extra else ''})").fetchnumpy()
        ids = np.unique(rows["sample_id"])
    return np.asarray(ids, dtype=np.int64), time.perf_counter() - t0


def finetune(model, x, y, steps: int = 40, lr: float = 0.05) -> nn.Module:
    """The paper's 'fine-tuning on random' baseline: the warm-up model trained on the clean meta samples."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def run(seed: int, noise: str, rate: float, quick: bool, spread: bool = True, methods=METHODS) -> dict:
    from sklearn.metrics import roc_auc_score
    xtr, clean, noisy, xte, yte = digits(seed, noise, rate)
    out = {"noise": noise, "rate": rate, "seed": seed, "acc": {}, "auc": {}, "time": {}, "wide": WIDE[0]}
    t0 = time.perf_counter()
    with warnings.catch_warnings(), metaql.connect(":memory:") as con:
        warnings.simplefilter("ignore")
        con.add_samples(np.arange(len(noisy)), "train", noisy.numpy(), xtr)
        model, ckpts = warm_up(con, xtr, noisy, seed, WARM_EPOCHS[quick], cached_epochs(WARM_EPOCHS[quick], 3, spread))
        out["acc"]["warm-up"] = accuracy(model, xte, yte)
        for method in methods:
            ids, secs = select(con, method, model, xtr, seed, label_free=noise != "imbalance",
                               labels=clean if method == "balanced" else noisy)
            out["time"][method] = secs
            # what the pick covers: the true classes among the meta samples, and how many had a wrong label
            out.setdefault("classes", {})[method] = int(len(np.unique(clean[ids].numpy())))
            out.setdefault("flipped", {})[method] = int((clean[ids] != noisy[ids]).sum())
            if method == "finetune":
                out["acc"][method] = accuracy(finetune(model, xtr[ids], clean[ids]), xte, yte)
                continue
            con.execute(f"CREATE SET meta_{method} AS SELECT sample_id FROM samples WHERE sample_id IN "
                        f"({', '.join(map(str, ids))})")
            con.label(ids.tolist(), clean[ids].tolist(), overwrite=True)
            w = con.execute(f"SELECT sample_id, weight FROM REWEIGHT(data=train, meta=meta_{method}, "
                            f"checkpoint={ckpts[-1]}, save_as=rw_{method}, epochs={REWEIGHT_EPOCHS[quick]}, "
                            f"batch_size=100, lr=0.1, weight_lr=1.0, seed={seed}) ORDER BY sample_id").fetchnumpy()
            out["acc"][method] = accuracy(con.store.model_at(f"rw_{method}"), xte, yte)
            if bool((clean != noisy).any()):      # every label is clean under class imbalance: no AUC
                out["auc"][method] = float(roc_auc_score((clean == noisy).numpy(), w["weight"]))
    out["wall"], out["load"] = time.perf_counter() - t0, os.getloadavg()[0]
    return out


def reweighted_accuracy(con, ids, clean, xte, yte, ckpt: str, name: str, seed: int, quick: bool) -> float:
    con.execute(f"CREATE SET meta_{name} AS SELECT sample_id FROM samples WHERE sample_id IN ({', '.join(map(str, ids))})")
    con.label(ids.tolist(), clean[ids].tolist(), overwrite=True)
    con.execute(f"SELECT count(*) FROM REWEIGHT(data=train, meta=meta_{name}, checkpoint={ckpt}, save_as=rw_{name}, "
                f"epochs={REWEIGHT_EPOCHS[quick]}, batch_size=100, lr=0.1, weight_lr=1.0, seed={seed})").fetchall()
    return accuracy(con.store.model_at(f"rw_{name}"), xte, yte)


def selection_spread(seeds: int, picks: int, methods: list[str], quick: bool) -> str:
    """The accuracy's spread over selections of one method on one warm-up model: each selection
    repeated with `picks` PIVOTAL_SAMPLES seeds (K-means seeding and GBC's draws; the first is the
    main run's), the re-weighting itself unchanged. Adversarial 60%."""
    acc = {m: np.zeros((seeds, picks)) for m in methods}
    for seed in range(seeds):
        xtr, clean, noisy, xte, yte = digits(seed, "adversarial", 0.6)
        with warnings.catch_warnings(), metaql.connect(":memory:") as con:
            warnings.simplefilter("ignore")
            con.add_samples(np.arange(len(noisy)), "train", noisy.numpy(), xtr)
            model, ckpts = warm_up(con, xtr, noisy, seed, WARM_EPOCHS[quick], cached_epochs(WARM_EPOCHS[quick], 3, True))
            for m in methods:
                for r in range(picks):
                    ids, _ = select(con, m, model, xtr, seed, pick_seed=seed + 1000 * r)
                    acc[m][seed, r] = 100 * reweighted_accuracy(con, ids, clean, xte, yte, ckpts[-1], f"{m}_{r}", seed, quick)
        print(f"seed {seed}: " + "; ".join(f"{m} {np.round(acc[m][seed], 1).tolist()}" for m in methods), flush=True)
    lines = ["| method | mean over seeds and picks | within-model SD over picks (mean over seeds) | seed-mean SE |",
             "|---|---|---|---|"]
    for m in methods:
        a = acc[m]
        lines.append(f"| {m} | {a.mean():.1f} | {a.std(1, ddof=1).mean():.1f} | {a.mean(1).std() / np.sqrt(seeds):.1f} |")
    for a, b in [(a, b) for a, b in PAIRS if a in methods and b in methods]:
        d = (acc[a] - acc[b]).mean(1)
        lines.append(f"\n{a} - {b}, paired per seed on the mean over picks: {d.mean():+.1f} ± {d.std() / np.sqrt(seeds):.1f} "
                     f"({int((d > 0).sum())}/{seeds}); on the first pick only: "
                     f"{(acc[a][:, 0] - acc[b][:, 0]).mean():+.1f}")
    return "\n".join(lines)


def coverage(runs: list[dict]) -> str:
    """Per method the mean number of true classes among the meta samples (of 10) and of meta
    samples whose noisy label was wrong (runs that recorded them)."""
    runs = [r for r in runs if "classes" in r]
    if not runs:
        return ""
    lines = [f"## What the picks cover ({len(runs)} seeds): true classes among the {BUDGET} meta samples "
             "(mean, min) and picks whose noisy label was wrong (mean)\n",
             "| method | classes | min | wrong labels |", "|---|---|---|---|"]
    for m in runs[0]["classes"]:
        c = [r["classes"][m] for r in runs]
        lines.append(f"| {m} | {np.mean(c):.1f} | {min(c)} | {np.mean([r['flipped'][m] for r in runs]):.1f} |")
    return "\n".join(lines)


def _rate(noise: str, rate: float) -> str:
    return f"factor {rate:g}" if noise == "imbalance" else f"{int(100 * rate)}%"


def table(runs: list[dict]) -> str:
    configs = sorted({(r["noise"], r["rate"]) for r in runs}, key=lambda c: (c[0] != "adversarial", c[1]))
    head = "| method | " + " | ".join(f"{n} {_rate(n, r)}: acc | AUC" for n, r in configs) + " |"
    lines = [head, "|---|" + "---|---|" * len(configs)]
    for m in ["warm-up"] + [m for m in METHODS + list(VARIANTS) + DIAGNOSTICS if m in runs[0]["acc"]]:
        cells = []
        for c in configs:
            rs = [r for r in runs if (r["noise"], r["rate"]) == c]
            acc = [r["acc"][m] for r in rs]
            auc = [r["auc"][m] for r in rs if m in r["auc"]]
            cells.append(f"{100 * np.mean(acc):.1f} ± {100 * np.std(acc) / np.sqrt(len(acc)):.1f}")
            cells.append(f"{np.mean(auc):.3f}" if auc else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAIRS = [("rbc", "rbc_kmeans"), ("gbc", "rbc_kmeans"), ("rbc", "random"), ("gbc", "random"), ("gbc", "rbc"),
         ("gbc_d50", "rbc"), ("gbc_all", "rbc"), ("gbc_all", "gbc"), ("gbc_all", "random"),
         ("rbc_cos", "rbc_kmeans"), ("gbc_cos", "rbc_kmeans"), ("rbc_cos", "rbc_kmeans_cos"), ("gbc_cos", "rbc_kmeans_cos"),
         ("rbc_cos", "rbc"), ("gbc_cos", "gbc"), ("gbc_cos", "rbc_cos"), ("rbc_kmeans_cos", "rbc_kmeans"),
         ("gbc_all_cos", "rbc_cos"), ("rbc_cos", "random"), ("gbc_cos", "random"),
         ("rbc", "balanced_noisy"), ("gbc", "balanced_noisy"), ("rbc", "balanced"), ("gbc", "balanced"),
         ("rbc_cos", "balanced"), ("gbc_cos", "balanced"), ("balanced_noisy", "random"), ("balanced", "random")]


def paired(runs: list[dict]) -> str:
    """Per configuration, method a minus method b over the seeds (the seeds' spread is mostly the
    warm-up model's, which both share), and how many seeds a is ahead."""
    configs = sorted({(r["noise"], r["rate"]) for r in runs}, key=lambda c: (c[0] != "adversarial", c[1]))
    lines = ["| a - b | " + " | ".join(f"{n} {_rate(n, r)}" for n, r in configs) + " |", "|---|" + "---|" * len(configs)]
    for a, b in [(a, b) for a, b in PAIRS if a in runs[0]["acc"] and b in runs[0]["acc"]]:
        cells = []
        for c in configs:
            d = np.array([100 * (r["acc"][a] - r["acc"][b]) for r in runs if (r["noise"], r["rate"]) == c])
            se = d.std() / np.sqrt(len(d)) if len(d) > 1 else 0.0
            cells.append(f"{d.mean():+.1f} ± {se:.1f} ({int((d > 0).sum())}/{len(d)})")
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, adversarial 60%%, short training; writes nothing")
    ap.add_argument("--seeds", type=int, default=10, help="seeds under adversarial noise (and with --imbalance)")
    ap.add_argument("--uniform-seeds", type=int, default=3, help="seeds at each uniform noise rate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated selection methods; also " + ", ".join(VARIANTS) + " (GBC with 50 draws / no sampling)")
    ap.add_argument("--noise", choices=["all", "adversarial"], default="all", help="adversarial: only the adversarial 60%% runs")
    ap.add_argument("--cached-from", choices=["history", "end"], default="history",
                    help="capture 3 warm-up epochs spread over the run (history) or the last 3 (end)")
    ap.add_argument("--imbalance", type=float, default=0,
                    help="only the class-imbalanced variant with this imbalance factor (clean labels, label_free=false); "
                         "writes results/pivotal_imbalance.md")
    ap.add_argument("--picks", type=int, default=0,
                    help="instead: each of --methods' selections repeated with this many PIVOTAL_SAMPLES seeds on "
                         "--seeds adversarial warm-up models (the spread over selections); writes results/pivotal_spread.md")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--runs", default="", help="append each seed's results to this JSON-lines file; without --run, "
                    "report the runs the file holds instead of running (seed ranges run apart, reported together)")
    ap.add_argument("--run", action="store_true", help="with --runs: run the seeds (and append them)")
    ap.add_argument("--wide", action="store_true", help="warm up LeNet(wide=True): 16/32 channels, 128 hidden units")
    ap.add_argument("--out", default="", help="results file name under benchmarks/results (default by the run's kind)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    WIDE[0] = args.wide
    if args.picks:
        t0 = time.perf_counter()
        body = selection_spread(args.seeds, args.picks, args.methods.split(","), args.quick)
        command = "python benchmarks/bench_pivotal.py " + " ".join(argv if argv is not None else sys.argv[1:])
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        report = (f"# Pivotal samples: accuracy spread over selections (adversarial 60%)\n\nCommand: `{command.strip()}`  \n"
                  f"Commit {commit}, {datetime.date.today()}, torch {torch.__version__}, {args.threads} torch thread(s), "
                  f"wall time {time.perf_counter() - t0:.0f} s\n\n" + body)
        print(report)
        if not args.quick:
            RESULTS.with_name("pivotal_spread.md").write_text(report + "\n")
        return
    configs = [("imbalance", args.imbalance, 1 if args.quick else args.seeds)] if args.imbalance else \
        [("adversarial", 0.6, 1)] if args.quick else \
        [("adversarial", 0.6, args.seeds), ("uniform", 0.4, args.uniform_seeds), ("uniform", 0.6, args.uniform_seeds)]
    t0 = time.perf_counter()
    runs = []
    configs = [c for c in configs if c[2] > 0 and (args.noise == "all" or c[0] == args.noise)]
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS) - set(VARIANTS)
    unknown -= set(DIAGNOSTICS)
    if unknown or not {"rbc", "gbc", "rbc_kmeans"} <= set(methods):
        ap.error(f"unknown methods {sorted(unknown)}, or one of rbc, gbc, rbc_kmeans left out (the times need them)")
    spread = args.cached_from == "history"
    for noise, rate, seeds in configs:
        for seed in range(args.first_seed, args.first_seed + seeds):
            if args.runs and not args.run:
                break
            runs.append(run(seed, noise, rate, args.quick, spread, methods))
            print(f"{noise} {rate} seed {seed}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in runs[-1]["acc"].items()),
                  flush=True)
            if args.runs:       # kept run by run, so seed ranges run apart can be reported together
                with open(args.runs, "a") as f:
                    f.write(json.dumps(runs[-1]) + "\n")
    if args.runs and not args.run:
        runs = [r for r in map(json.loads, Path(args.runs).read_text().splitlines())
                if (r["noise"], r["rate"]) in {(n, rt) for n, rt, _ in configs}]
        configs = [(n, rt, sum((r["noise"], r["rate"]) == (n, rt) for r in runs)) for n, rt, _ in configs]
    wall = time.perf_counter() - t0 if args.run or not args.runs else sum(r.get("wall", 0) for r in runs)
    rbc = [r["time"]["rbc"] for r in runs]
    gbc = [r["time"]["gbc"] for r in runs]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    command = "python benchmarks/bench_pivotal.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = "\n\n".join([
        "# Pivotal meta samples and meta re-weighting on digits (papers/003 Tables 1, 3)",
        f"Command: `{command.strip()}`  \nCommit {commit}, {datetime.date.today()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {args.threads} torch thread(s) on a 2-core machine shared with other work; "
        f"wall time {wall:.0f} s; seeds: " + ", ".join(f"{n} {_rate(n, r)}: {k}" for n, r, k in configs) + "."
        + (f" 1-min load average at the end of each seed: {min(r['load'] for r in runs if 'load' in r):.1f}-"
           f"{max(r['load'] for r in runs if 'load' in r):.1f}." if any('load' in r for r in runs) else ""),
        f"Digits 8x8, {len(digits(0, *configs[0][:2])[1])} train / {len(digits(0, 'uniform', 0)[4])} test; {'wide (16/32 channels, 128 hidden) ' if args.wide else ''}LeNet-style "
        f"CNN warmed up on the noisy labels (SGD, momentum 0.9, lr 0.1, {WARM_EPOCHS[args.quick]} epochs; epochs "
        f"{sorted(cached_epochs(WARM_EPOCHS[args.quick], 3, spread))} (from 0, at their start) captured as the cached checkpoints); budget {BUDGET} meta samples, cleaned by an oracle (con.label); REWEIGHT (Eq. 2-4) from the "
        f"warm-up model, {REWEIGHT_EPOCHS[args.quick]} epochs, batch 100, lr 0.1, weight_lr 1.0, weights starting at 1. Adversarial noise: y -> y+1 mod 10 for the given "
        "fraction of each class; uniform: a random other class. Class imbalance (--imbalance F): class c keeps n_max F^(-c/9) of its "
        "training samples, labels clean, PIVOTAL_SAMPLES with label_free=false (GBC reads the stored factors). "
        "'finetune' trains the warm-up model on the 20 "
        "clean random samples instead of re-weighting (no weights, no AUC).",
        "## Test accuracy (%, mean ± standard error over seeds) and AUC of the learned weights against label cleanness",
        table(runs),
        "## Paired differences (same seed, same warm-up model): test accuracy points, mean ± standard error, wins\n\n"
        + paired(runs),
        f"## Selection time (s, mean over all runs): RBC {np.mean(rbc):.2f}, GBC {np.mean(gbc):.2f} "
        f"(GBC/RBC = {np.mean(gbc) / max(np.mean(rbc), 1e-9):.1f}x), RBC-k {np.mean([r['time']['rbc_kmeans'] for r in runs]):.2f}"
        + "".join(f", {m} {np.mean([r['time'][m] for r in runs]):.2f}" for m in VARIANTS if m in runs[0]["time"]),
    ] + ([coverage(runs)] if coverage(runs) else []))
    print(report)
    if not args.quick and not (args.runs and args.run):     # a seed range's report waits for the others
        # a run of other methods or noise (the GBC study) does not overwrite the main table
        out = RESULTS.with_name(args.out) if args.out else RESULTS.with_name("pivotal_imbalance.md") if args.imbalance else \
            RESULTS if (methods == METHODS and args.noise == "all") else RESULTS.with_name("pivotal_gbc.md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report + "\n")


if __name__ == "__main__":
    main()
