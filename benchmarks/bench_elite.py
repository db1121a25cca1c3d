"""ELITE against Deep SAD, Deep SVDD and IsolationForest on polluted training data (papers/000, Sec. 5.2).

The paper's protocol on scikit-learn's ``load_digits`` (1797 8x8 images; nothing to download): one
class is normal, the other nine are anomalies. Per (normal class, seed): 30% of every class is held
out as the test split; 10 normal and 10 anomalous samples form the labeled set; the rest of the
normal class plus enough anomalies to reach the pollution ratio form the unlabeled training set.
ROC-AUC on the test split, mean and std over all ten normal classes and the seeds. All deep
methods share the network, pretraining, optimizer (Adam), batch size and epochs; each runs at
its best learning rate from {1e-4, 3e-4, 1e-3} (ELITE 1e-3, the baselines 1e-4: see the notes in
results/elite.md).

The paper draws 5,000 training samples per experiment, so its 20 labels are 0.4% of the unlabeled
set; digits leave about 115 unlabeled normal images per class, so the same 20 labels are 9-16% of
it (130-230 images), a regime that favours Deep SAD, which trains on them. ``--train-size 5000`` restores the paper's
ratio: the unlabeled set is grown to that size by random affine copies (rotation up to 15 degrees,
scale 0.9-1.1, shift up to one pixel) of its own images, normal and anomalous in the pollution
ratio; the labeled set and the test split stay the original images. Results of that mode go to
results/elite_train5000.md (results/elite_train<N>.md in general).

A second table times the two meta-gradient forms on one ELITE training step.

ELITE here trains ``--epochs`` (100) like the baselines, not ``EliteDetector``'s default of 35
epochs at lr 1e-3 (chosen in bench_elite_schedule.py, results/elite_schedule.md); pass
``--epochs 35`` to run ELITE at the default (the baselines then train 35 epochs too).

    python benchmarks/bench_elite.py                      # the full table (10 classes x 3 seeds x 3 ratios)
    python benchmarks/bench_elite.py --train-size 5000    # the same at the paper's 20-of-5,000 label ratio
    python benchmarks/bench_elite.py --quick              # a smoke run, under a minute
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score

from metaql.cleaning.baselines import DeepSAD, DeepSVDD
from metaql.cleaning.elite import EliteDetector
from metaql.cleaning.metagrad import METHODS
from metaql.cleaning.pseudo_labels import validation_loss

RESULTS_DIR = Path(__file__).parent / "results"
N_LABELED = 10          # per class: 10 normal + 10 anomalous (the paper's 20 labels)
TEST_FRACTION = 0.3
# the ELITE columns a run may ask for: the detector's arguments beyond the shared settings
ELITE_VARIANTS = {"ELITE": {"score": "svdd"}, "ELITE-linear": {"score": "svdd", "anomaly_loss": "linear"},
                  "ELITE-AE": {"score": "ae"}}


def digits() -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, 8, 8) scaled to [0, 1], and their digit classes."""
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), y


def polluted_split(y: np.ndarray, normal: int, ratio: float, seed: int) -> dict[str, np.ndarray]:
    """Index arrays of the unlabeled training set, the labeled set and the test split."""
    rng = np.random.default_rng(seed)
    normals = rng.permutation(np.nonzero(y == normal)[0])
    anomalies = rng.permutation(np.nonzero(y != normal)[0])
    n_test, a_test = int(TEST_FRACTION * len(normals)), int(TEST_FRACTION * len(anomalies))
    train_normals = normals[n_test + N_LABELED:]
    n_polluting = int(round(ratio / (1 - ratio) * len(train_normals)))
    pool = anomalies[a_test + N_LABELED:]
    return {"unlabeled": np.concatenate([train_normals, pool[:n_polluting]]), "normals": train_normals,
            "anomaly_pool": pool,
            "labeled": np.concatenate([normals[n_test:n_test + N_LABELED], anomalies[a_test:a_test + N_LABELED]]),
            "test": np.concatenate([normals[:n_test], anomalies[:a_test]])}


def affine_copies(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random affine copies of images drawn from x: rotation <= 15 deg, scale 0.9-1.1, shift <= 1 px."""
    src = torch.from_numpy(x[rng.integers(0, len(x), n)])
    angle = torch.from_numpy(rng.uniform(-np.pi / 12, np.pi / 12, n)).float()
    scale = torch.from_numpy(rng.uniform(0.9, 1.1, n)).float()
    shift = torch.from_numpy(rng.uniform(-1.0, 1.0, (n, 2)) * 2 / x.shape[-1]).float()  # grid units: 2 per image
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(src.shape), align_corners=False)
    return F.grid_sample(src, grid, align_corners=False).numpy()


def unlabeled_images(x: np.ndarray, split: dict[str, np.ndarray], ratio: float, size: int,
                     seed: int) -> np.ndarray:
    """The unlabeled training images; with ``size``, that many affine copies in the pollution ratio.

    The copies come from every training normal and every training anomaly (not only the few
    anomalies of the small split), as the paper's 5,000 draws do.
    """
    if not size:
        return x[split["unlabeled"]]
    rng = np.random.default_rng(10_000 + seed)
    n_anom = int(round(ratio * size))
    return np.concatenate([affine_copies(x[split["normals"]], size - n_anom, rng),
                           affine_copies(x[split["anomaly_pool"]], n_anom, rng)])


def run_methods(x: np.ndarray, is_anom: np.ndarray, split: dict[str, np.ndarray], xu: np.ndarray, seed: int,
                cfg: dict, methods: list[str]) -> dict[str, float]:
    """ROC-AUC on the test split of each method, trained on unlabeled images xu and this split's labels."""
    xl, yl = x[split["labeled"]], is_anom[split["labeled"]]
    xt, yt = x[split["test"]], is_anom[split["test"]]
    shared = {k: cfg[k] for k in ("epochs", "batch_size", "pretrain_epochs")}
    elite = dict(shared, lr=cfg["lr"], eta_m=cfg["eta_m"], seed=seed)
    base = dict(shared, lr=cfg["baseline_lr"], seed=seed)
    out = {}
    for m in methods:
        if m in ELITE_VARIANTS:
            scores = EliteDetector(**ELITE_VARIANTS[m], **elite).fit(xu, xl, yl).decision_function(xt)
        elif m == "Deep SAD":
            scores = DeepSAD(**base).fit(xu, xl, yl).decision_function(xt)
        elif m == "Deep SVDD":
            scores = DeepSVDD(**base).fit(xu).decision_function(xt)
        elif m == "IsolationForest":
            forest = IsolationForest(random_state=seed).fit(xu.reshape(len(xu), -1))
            scores = -forest.score_samples(xt.reshape(len(xt), -1))
        else:
            raise ValueError(f"unknown method {m!r}")
        out[m] = roc_auc_score(yt, scores)
    return out


def one_run(task: tuple[float, int, int, dict, list[str]]) -> tuple[float, dict[str, float]]:
    """AUCs of every method for one (pollution ratio, normal class, seed)."""
    ratio, normal, seed, cfg, methods = task
    torch.set_num_threads(1)
    x, y = digits()
    split = polluted_split(y, normal, ratio, seed)
    xu = unlabeled_images(x, split, ratio, cfg["train_size"], seed)
    return ratio, run_methods(x, (y != normal).astype(int), split, xu, seed, cfg, methods)


def accuracy_table(cfg: dict, methods: list[str], ratios: list[float], classes: list[int],
                   seeds: list[int], jobs: int) -> str:
    """The markdown table of test ROC-AUC (mean ± std over classes and seeds) per pollution ratio."""
    tasks = [(r, c, s, cfg, methods) for r in ratios for c in classes for s in seeds]
    auc: dict[tuple[float, str], list[float]] = {}
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for done, (ratio, res) in enumerate(pool.map(one_run, tasks), 1):
            for m, v in res.items():
                auc.setdefault((ratio, m), []).append(v)
            if done % len(classes) == 0:
                print(f"{done}/{len(tasks)} runs", file=sys.stderr, flush=True)
    variants = [m for m in methods if m.startswith("ELITE")] if "Deep SAD" in methods else []
    head = ("| pollution | " + " | ".join(methods) + "".join(f" | {v} - Deep SAD" for v in variants)
            + " |\n|---|" + "---|" * (len(methods) + len(variants)) + "\n")
    rows = []
    for ratio in ratios:
        cells = [f"{np.mean(auc[(ratio, m)]):.3f} ± {np.std(auc[(ratio, m)]):.3f}" for m in methods]
        cells += [f"{np.mean(auc[(ratio, v)]) - np.mean(auc[(ratio, 'Deep SAD')]):+.3f}" for v in variants]
        rows.append(f"| {ratio} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def timing_table(cfg: dict, repeats: int) -> str:
    """Seconds per meta-gradient computation of one mini-batch, for both forms."""
    x, y = digits()
    split = polluted_split(y, 0, 0.3, 0)
    rows = []
    for kind in ("svdd", "ae"):
        det = EliteDetector(score=kind, epochs=0, batch_size=cfg["batch_size"])
        det.fit(x[split["unlabeled"]], x[split["labeled"]], (y[split["labeled"]] != 0).astype(int))
        score = det.score_.train()
        xb = torch.from_numpy(x[split["unlabeled"]][: cfg["batch_size"]])
        xv = torch.from_numpy(x[split["labeled"]])
        yv = torch.where(torch.from_numpy(y[split["labeled"]] != 0), -1.0, 1.0)
        times = {}
        for name, fn in METHODS.items():
            def one_step():
                ms = fn(score, xb, xv, lambda o: validation_loss(o, yv, det.margin_), cfg["lr"])
                ms.backward(torch.ones(len(xb)))   # the training step's backward reuses the forward
            one_step()
            t0 = time.perf_counter()
            for _ in range(repeats):
                one_step()
            times[name] = (time.perf_counter() - t0) / repeats
        rows.append(f"| {kind} | {len(xb)} | {times['factored'] * 1e3:.2f} | {times['virtual'] * 1e3:.2f} | "
                    f"{times['virtual'] / times['factored']:.2f}x |")
    return ("| score | batch | factored (ms) | virtual (ms) | virtual / factored |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def results_path(train_size: int) -> Path:
    """results/elite.md for the plain split, results/elite_train<N>.md for a grown one."""
    return RESULTS_DIR / ("elite.md" if not train_size else f"elite_train{train_size}.md")


def hand_written_notes(path: Path) -> str:
    """The '## Notes' section of the current results file, kept across regenerations."""
    text = path.read_text() if path.exists() else ""
    at = text.find("\n## Notes")
    return "" if at < 0 else text[at:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 classes, 1 seed, few epochs")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3, help="ELITE's learning rate")
    ap.add_argument("--baseline-lr", type=float, default=1e-4, help="Deep SVDD's and Deep SAD's learning rate")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    ap.add_argument("--eta-m", type=float, default=1.0)
    ap.add_argument("--pretrain-epochs", type=int, default=0)
    ap.add_argument("--train-size", type=int, default=0,
                    help="grow the unlabeled set to this many affine copies (the paper: 5000; 0: the plain split)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--classes", type=str, default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--methods", type=str, default="ELITE,ELITE-linear,Deep SAD,Deep SVDD,IsolationForest")
    ap.add_argument("--ratios", type=str, default="0.1,0.3,0.5")
    ap.add_argument("--no-write", action="store_true", help="print only; leave the results file alone")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny nets: one process per core beats threads inside one
    cfg = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "baseline_lr": args.baseline_lr,
           "eta_m": args.eta_m, "pretrain_epochs": args.pretrain_epochs, "train_size": args.train_size}
    classes, seeds = [int(c) for c in args.classes.split(",")], list(range(args.seeds))
    if args.quick:
        cfg["epochs"], classes, seeds = 10, [0, 1], [0]
    t0 = time.perf_counter()
    table = accuracy_table(cfg, args.methods.split(","), [float(r) for r in args.ratios.split(",")],
                           classes, seeds, args.jobs)
    timing = timing_table(cfg, repeats=5 if args.quick else 50)
    wall = time.perf_counter() - t0
    command = "python benchmarks/bench_elite.py " + " ".join(sys.argv[1:])
    title = "ELITE on polluted digits" + (f", unlabeled set grown to {args.train_size} affine copies"
                                          if args.train_size else "")
    report = (f"# {title}\n\n`{command.strip()}` — wall time {wall:.0f} s "
              f"({args.jobs} worker processes x 1 torch thread, {os.cpu_count()} cores)\n\n"
              f"Test ROC-AUC, mean ± std over normal classes {classes} x seeds {seeds}; "
              f"settings {cfg}.\n\n{table}\nMeta-gradient of one mini-batch (plus the training step's "
              f"backward), mean of repeated runs:\n\n{timing}")
    print(report)
    if not args.no_write and not args.quick:
        path = results_path(args.train_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report + hand_written_notes(path))


if __name__ == "__main__":
    main()
