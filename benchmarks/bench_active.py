"""Gradient-norm active learning and active label cleaning (papers/002) on scikit-learn's digits.

Active learning (Wang et al., AAAI 2022, Algorithm 1): every method starts from the same random
labeled set of each seed, trains the same MLP on its labeled pool each cycle, and adds K samples
per cycle. Methods: expected-gradnorm with expectation=loss (the norm of the gradient of
sum_c p_c CE(c); for classification this IS entropy-gradnorm, Eq. 7, so one row stands for both),
expected-gradnorm with expectation=norm (sum_c p_c ||grad CE(c)||), both through MetaQL's
ACTIVE_LEARNING_CANDIDATES (GRADNORM from replayed factors) with the oracle column; random,
least-confidence, entropy sampling, core-set (k-center greedy on the penultimate features) and
BADGE (k-means++ on last-layer gradient embeddings). Reported: test accuracy per cycle, its mean
over cycles (the curve's area), the train-test gap after the last cycle (the paper's Table 3), and
the paper's Table 1 count at this scale: the fraction of each cycle's picks that are among the K
unlabeled samples of highest gradient norm of the loss on their true label (from replayed factors).

Label cleaning (Bernhardt et al., Nat. Commun. 2022, Algorithm 1): a fraction of the pool's labels
is corrupted; a simulated annotator pool answers correctly with a per-sample probability (drawn
once per sample, uniform in [0.55, 0.95]) and otherwise a random other class. With a budget of
annotations and the selector retrained every b annotations (MetaQL's LabelCleaningSession; Phi
from LABEL_CLEANING_SCORE over the catalog's annotations), we track the correctly labeled samples
against annotations spent for Phi, CE only (noisiness), BALD-like (an ensemble of 3 MLPs: the
mutual information), random, and the oracle bound (mislabeled samples first); the area is the
mean fraction correctly labeled over the budget. Then an MLP retrained on each cleaned set is
tested.

    python benchmarks/bench_active.py            # 4 seeds, ~5 min on 2 cores (writes results/active.md)
    python benchmarks/bench_active.py --quick    # a smoke run, 2 seeds, fewer cycles (writes nothing)
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import metaql
from metaql.active.gradnorm import squared_norms
from metaql.active.sessions import LabelCleaningSession
from metaql.storage.catalog_snapshot import CatalogSnapshot
from metaql.storage.tasks import Classification

RESULTS = Path(__file__).parent / "results" / "active.md"
CLASSES = 10


class MLP(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.metaql_config = {"width": width}
        self.fc1, self.fc2 = nn.Linear(64, width), nn.Linear(width, CLASSES)

    def features(self, x):
        return torch.relu(self.fc1(x))

    def forward(self, x):
        return self.fc2(self.features(x))


def digits(seed: int, test_size: float = 0.3):
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    return train_test_split(x, d.target.astype(np.int64), test_size=test_size, random_state=seed,
                            stratify=d.target)


def train(x, y, seed: int, steps: int, weight_decay: float = 1e-4) -> MLP:
    torch.manual_seed(seed)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(torch.as_tensor(x)).argmax(1).numpy() == y).mean())


def probs(model, x) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(torch.as_tensor(x)), 1).double().numpy()


# -- active learning --------------------------------------------------------------------------------
def least_confidence(model, x, labeled, k, rng):
    return _top(1 - probs(model, x).max(1), labeled, k)


def entropy(model, x, labeled, k, rng):
    p = probs(model, x)
    return _top(-(p * np.log(np.clip(p, 1e-12, 1))).sum(1), labeled, k)


def random_pick(model, x, labeled, k, rng):
    return rng.choice(np.nonzero(~labeled)[0], k, replace=False)


def coreset(model, x, labeled, k, rng):
    """k-center greedy on the penultimate features (Sener & Savarese)."""
    with torch.no_grad():
        f = model.features(torch.as_tensor(x)).numpy()
    d = np.min(((f[:, None] - f[labeled][None]) ** 2).sum(-1), axis=1)
    out = []
    for _ in range(k):
        j = int(np.argmax(np.where(labeled, -1, d)))
        out.append(j)
        labeled = labeled.copy()
        labeled[j] = True
        d = np.minimum(d, ((f - f[j]) ** 2).sum(1))
    return np.asarray(out)


def badge(model, x, labeled, k, rng):
    """k-means++ seeding on the last layer's gradient embedding (p - onehot(argmax)) x [h, 1]."""
    with torch.no_grad():
        h = model.features(torch.as_tensor(x)).numpy()
    p = probs(model, x)
    g = p - np.eye(CLASSES)[p.argmax(1)]
    emb = (g[:, :, None] * np.concatenate([h, np.ones((len(h), 1))], 1)[:, None, :]).reshape(len(x), -1)
    cand = np.nonzero(~labeled)[0]
    first = cand[np.argmax((emb[cand] ** 2).sum(1))]
    chosen, d = [first], ((emb[cand] - emb[first]) ** 2).sum(1)
    for _ in range(k - 1):
        w = d / d.sum() if d.sum() > 0 else None
        j = int(rng.choice(len(cand), p=w))
        chosen.append(cand[j])
        d = np.minimum(d, ((emb[cand] - emb[cand[j]]) ** 2).sum(1))
    return np.asarray(chosen)


def _top(score, labeled, k):
    score = np.where(labeled, -np.inf, score)
    return np.argsort(-score, kind="stable")[:k]


BASELINES = {"random": random_pick, "least-confidence": least_confidence, "entropy sampling": entropy,
             "core-set (k-center)": coreset, "BADGE": badge}
GRADNORM = {"expected/entropy-gradnorm (expectation=loss)": "loss",
            "expected-gradnorm (expectation=norm)": "norm"}


def active_run(method: str, seed: int, cycles: int, k: int, init: int, steps: int) -> dict:
    x, x_test, y, y_test = digits(seed)
    rng = np.random.default_rng(seed)
    labeled = np.zeros(len(x), bool)
    labeled[rng.choice(len(x), init, replace=False)] = True
    accs, hits, t0 = [], [], time.perf_counter()
    con = metaql.connect(":memory:")
    con.add_samples(np.arange(len(x)), "train", None, torch.as_tensor(x), columns={"truth": y})
    con.label(np.nonzero(labeled)[0], y[labeled], by="initial")
    for cycle in range(cycles + 1):
        model = train(x[labeled], y[labeled], seed, steps)
        accs.append(accuracy(model, x_test, y_test))
        if cycle == cycles:
            break
        con.attach_model(model)
        con.checkpoint(model, f"c{cycle}", lr=1.0)
        before = labeled.copy()
        if method in GRADNORM:
            got = con.execute(f"SELECT sample_id FROM ACTIVE_LEARNING_CANDIDATES(pool=train, k={k}, "
                              f"expectation={GRADNORM[method]}, oracle=truth)").fetchnumpy()["sample_id"]
        else:
            got = BASELINES[method](model, x, labeled, k, rng)
            con.label(got, y[got], by="oracle")
        labeled[got] = True
        assert labeled.sum() == con.execute("SELECT count(*) FROM labels").fetchone()[0]
        hits.append(top_norm_hits(con, f"c{cycle}", np.nonzero(~before)[0], y, got))
    gap = accuracy(model, x[labeled], y[labeled]) - accs[-1]
    con.close()
    return {"acc": accs, "gap": gap, "hits": hits, "seconds": time.perf_counter() - t0}


def top_norm_hits(con, ckpt: str, unlabeled: np.ndarray, y: np.ndarray, chosen: np.ndarray) -> float:
    """The paper's Table 1 count: the fraction of a cycle's picks among the K unlabeled samples of
    highest gradient norm of the loss on their TRUE label (unknown to every method), from factors."""
    store = con.store
    sq = squared_norms(store, store.model_at(ckpt), Classification(), unlabeled,
                       torch.as_tensor(y[unlabeled]), "label", ["*"], CatalogSnapshot(store))
    top = unlabeled[np.argsort(-sq, kind="stable")[:len(chosen)]]
    return float(np.isin(chosen, top).mean())


# -- label cleaning ---------------------------------------------------------------------------------
def corrupt(y, rate, rng):
    noisy = y.copy()
    flip = rng.choice(len(y), int(rate * len(y)), replace=False)
    noisy[flip] = (y[flip] + rng.integers(1, CLASSES, len(flip))) % CLASSES
    return noisy


def cleaning_run(method: str, seed: int, rate: float, budget: int, every: int, steps: int) -> dict:
    x, x_test, y, y_test = digits(seed)
    rng = np.random.default_rng(1000 + seed)
    noisy = corrupt(y, rate, rng)
    skill = rng.uniform(0.55, 0.95, len(y))        # each sample's chance of a correct annotation
    answers = np.random.default_rng(2000 + seed)   # the annotators' draws: the same stream per method

    def annotator(i: int) -> int:
        if answers.random() < skill[i]:
            return int(y[i])
        return int((y[i] + answers.integers(1, CLASSES)) % CLASSES)

    ids = np.arange(len(x))
    session = LabelCleaningSession(ids, CLASSES, noisy, budget, every, oracle=y)
    con = metaql.connect(":memory:")
    con.add_samples(ids, "train", noisy, torch.as_tensor(x))
    written = [0]
    pick = np.random.default_rng(3000 + seed)

    def refresh(s: LabelCleaningSession) -> np.ndarray:
        current = s.current_labels()
        if method == "random":
            return pick.random(len(ids))
        if method == "oracle":
            return (current != y).astype(float) + 1e-3 * pick.random(len(ids))
        model = train(x, current, seed + s.rounds, steps, weight_decay=1e-3)
        if method == "BALD-like":
            p = np.stack([probs(train(x, current, 100 * seed + s.rounds + m, steps, 1e-3), x) for m in range(3)])
            mean = p.mean(0)
            ent = lambda q: -(q * np.log(np.clip(q, 1e-12, 1))).sum(-1)   # noqa: E731
            return ent(mean) - ent(p).mean(0)
        # Phi through MetaQL: the annotations so far in the catalog, the selector as a checkpoint
        new = s.annotations[written[0]:]
        if new:
            con.annotate([a[0] for a in new], [a[1] for a in new], by="annotator")
            written[0] = len(s.annotations)
        con.attach_model(model)
        con.checkpoint(model, f"sel{s.rounds}", lr=1.0)
        rows = con.execute("SELECT sample_id, noisiness, score FROM LABEL_CLEANING_SCORE(data=train, "
                           "human_labels=false)").fetchnumpy()
        out = np.full(len(ids), -np.inf)
        out[rows["sample_id"]] = rows["score"] if method == "Phi" else rows["noisiness"]
        return out

    curve = [int((session.current_labels() == y).sum())]
    t0 = time.perf_counter()

    def record(s):
        while len(curve) <= s.spent:
            curve.append(int((s.current_labels() == y).sum()))
    session.run(annotator, refresh, on_annotation=record)
    record(session)
    curve = curve[:budget + 1] + [curve[-1]] * (budget + 1 - len(curve))
    final = train(x, session.current_labels(), seed, steps, weight_decay=1e-3)
    con.close()
    return {"curve": np.asarray(curve) / len(y), "auc": float(np.mean(curve) / len(y)),
            "test": accuracy(final, x_test, y_test), "seconds": time.perf_counter() - t0}


CLEANING = ["Phi", "CE only", "BALD-like", "random", "oracle"]


# -- report -----------------------------------------------------------------------------------------
def mse(values) -> str:
    v = np.asarray(values, dtype=float)
    se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return f"{100 * v.mean():.1f} ± {100 * se:.1f}"


def al_table(runs: dict, cycles: int, k: int, init: int) -> str:
    head = "| method | " + " | ".join(f"{init + c * k}" for c in range(cycles + 1)) + \
        " | mean (area) | train-test gap | picks among top-K true-label gradnorm |"
    lines = [head, "|" + "---|" * (cycles + 5)]
    for m, rs in runs.items():
        acc = np.asarray([r["acc"] for r in rs])
        cells = [mse(acc[:, c]) for c in range(cycles + 1)]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {mse(acc.mean(1))} | {mse([r['gap'] for r in rs])} | "
                     f"{mse([np.mean(r['hits']) for r in rs])} |")
    return "\n".join(lines)


def cl_table(runs: dict, budget: int) -> str:
    marks = [0, budget // 4, budget // 2, 3 * budget // 4, budget]
    lines = ["| selection | " + " | ".join(f"{b} ann." for b in marks) + " | area | retrained test acc |",
             "|" + "---|" * (len(marks) + 3)]
    for m, rs in runs.items():
        c = np.asarray([r["curve"] for r in rs])
        lines.append(f"| {m} | " + " | ".join(mse(c[:, b]) for b in marks)
                     + f" | {mse([r['auc'] for r in rs])} | {mse([r['test'] for r in rs])} |")
    return "\n".join(lines)


def verdicts(al: dict, cl: dict) -> list[str]:
    out = []
    area = {m: np.mean([np.mean(r["acc"]) for r in rs]) for m, rs in al.items()}
    for m in GRADNORM:
        beaten = [b for b in BASELINES if area[b] >= area[m]]
        out.append(f"- {m}: area {100 * area[m]:.1f}; " + (
            "beats every baseline on the mean over seeds." if not beaten else
            f"does NOT beat {', '.join(beaten)} on the mean over seeds."))
    best = max(GRADNORM, key=area.get)
    out.append(f"- Of the two readings of the expectation, {best} selects better here "
               f"({100 * area[best]:.1f} vs {100 * min(area[m] for m in GRADNORM):.1f}).")
    auc = {m: np.mean([r["auc"] for r in rs]) for m, rs in cl.items()}
    for m in ("Phi", "CE only"):
        beaten = [b for b in ("BALD-like", "random") + (("CE only",) if m == "Phi" else ()) if auc[b] >= auc[m]]
        out.append(f"- label cleaning, {m}: area {100 * auc[m]:.1f} (oracle {100 * auc['oracle']:.1f}); " + (
            "beats " + ", ".join(b for b in ("BALD-like", "random", "CE only") if b != m) + " on the mean."
            if not beaten else f"does NOT beat {', '.join(beaten)} on the mean."))
    return out


def environment(argv) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "?"
    return (f"Command: `python benchmarks/bench_active.py {' '.join(argv)}`  \ncommit {commit}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, metaql {metaql.__version__ if hasattr(metaql, '__version__') else ''}"
            f", torch threads {torch.get_num_threads()}, on a 2-core machine shared with other work.")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 seeds, 3 cycles, a small budget; writes nothing")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    seeds = 2 if args.quick else args.seeds
    cycles, k, init, steps = (3, 20, 20, 150) if args.quick else (6, 20, 20, 200)
    rate, budget, every = (0.2, 150, 50) if args.quick else (0.2, 400, 50)
    t0 = time.perf_counter()
    al = {m: [active_run(m, s, cycles, k, init, steps) for s in range(seeds)] for m in [*GRADNORM, *BASELINES]}
    t_al = time.perf_counter() - t0
    cl = {m: [cleaning_run(m, s, rate, budget, every, steps) for s in range(seeds)] for m in CLEANING}
    t_cl = time.perf_counter() - t0 - t_al
    x, x_test, _, _ = digits(0)
    report = "\n\n".join([
        "# Active learning by gradient norm and active label cleaning on digits (papers/002)",
        environment(argv) + f"  \nWall time: active learning {t_al:.0f} s, label cleaning {t_cl:.0f} s; "
        f"{seeds} seeds (split, initial labels, noise); pool {len(x)}, test {len(x_test)}; an MLP 64-64-10, "
        f"Adam lr 1e-2, {steps} full-batch steps from the same init each cycle. Numbers: mean ± standard "
        "error over seeds, in %.",
        f"## Active learning: test accuracy by number of labels ({init} random, then {k} per cycle)",
        al_table(al, cycles, k, init),
        f"## Label cleaning: correctly labeled fraction of the pool by annotations spent ({int(rate * 100)}% "
        f"of labels corrupted, budget {budget}, selector retrained every {every})",
        cl_table(cl, budget),
        "## Verdicts", "\n".join(verdicts(al, cl)),
    ])
    print(report)
    if not args.quick and not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(report + "\n")


if __name__ == "__main__":
    main()
