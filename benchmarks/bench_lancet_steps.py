"""How many SemiGAN steps a LANCET round needs (issue #19): early stopping, larger batches, warm starts.

A round that trains from scratch is ~93% SemiGAN steps (benchmarks/results/method_speed.md), so a
3x faster round needs about a third of the steps, or cheaper ones. This measures, on the digits
pool of benchmarks/bench_lancet.py (random labels, one torch thread), what the propagated labels'
accuracy on the rows no human labeled does when the steps are cut:

- `curve`: a fresh model trained with the default schedule (6000 steps of 128 unlabeled rows,
  lr 2e-3 decaying linearly over the second half), its averaged (EMA) weights evaluated every
  250 steps without disturbing the run (the evaluation draws no random numbers). From the
  checkpoints: the accuracy had the run stopped there, and label-free stop rules (the share of
  unlabeled rows whose propagated label is unchanged since 250 or 1000 steps before, at least
  tau) with the step they stop at. With `--steps/--batch/--lr` the same for another schedule
  (larger batches and fewer steps).
- `warm`: 40 random labels, then 20 more: the 40-label model trained further on the 60 labels
  for 800 / 2400 steps (a warm start, as LancetConfig.warm_steps does) against a fresh 60-label
  model (what retrain_growth=1.5 does at 60 labels).

20 labels: numpy seed `seed`; 40: seed 100 + seed; the 20 more of `warm`: seed 200 + seed.

    python benchmarks/bench_lancet_steps.py curve --labels 20,40 --seeds 0,1,2
    python benchmarks/bench_lancet_steps.py curve --labels 40 --seeds 0,1,2 --steps 2000 --batch 384
    python benchmarks/bench_lancet_steps.py warm --seeds 0,1,2
    python benchmarks/bench_lancet_steps.py stepcost --compile   # ms per step by batch, torch.compile
    python benchmarks/bench_lancet_steps.py report      # benchmarks/results/lancet_steps.md from the raw runs

Raw runs go to benchmarks/results/lancet_steps/ (one JSON per run, per-checkpoint agreements
instead of the labels themselves).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from metastore_common import notes

HERE = Path(__file__).resolve().parent
RAW = HERE / "results" / "lancet_steps"
REPORT = HERE / "results" / "lancet_steps.md"
EVERY = 250
RULES = [(tau, gap) for tau in (0.98, 0.99, 0.995) for gap in (250, 1000)]


# -- workers ---------------------------------------------------------------------------------------
def setup(seed: int):
    import torch
    sys.path.insert(0, str(HERE))
    import bench_lancet as bl
    from metaql.labeling.lancet import prepare_inputs
    torch.set_num_threads(1)
    pool = bl.digits_pool(seed)
    return pool, prepare_inputs(torch.from_numpy(pool.x).reshape(-1, 8, 8))


def draw(pool, n: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed if n == 20 else 100 + seed).choice(pool.y.size, n, replace=False))


def train(model, x, pool, labeled: np.ndarray, seed: int, steps: int, batch: int = 128,
          progress=None) -> float:
    """CPU seconds of training `model` as run_lancet does (augmentation included)."""
    import torch
    from metaql.labeling.augment import labeled_augmentation
    from metaql.labeling.embedding import TrainConfig, train_embedding
    cfg = TrainConfig(seed=seed, steps=steps, batch_size=batch)
    aug = labeled_augmentation(cfg.augment, (8, 8), labeled.size / 10)
    c0 = time.process_time()
    train_embedding(model, x, torch.from_numpy(labeled), torch.from_numpy(pool.y[labeled]), cfg,
                    progress, aug)
    return time.process_time() - c0


def checkpoints(model, x, pool, labeled: np.ndarray, out: list):
    """A progress wrapper that records the averaged weights' propagated labels every EVERY steps."""
    import torch
    from metaql.labeling.propagation import propagate
    rest = np.setdiff1d(np.arange(pool.y.size), labeled)

    def wrap(steps):
        for s in steps:
            if s % EVERY == 0 and s > 0:
                av = model.average
                av.eval()      # eval mode on the average only: the run's own state is untouched
                with torch.no_grad():
                    logits = av["head"](av["body"](x))[:, :model.num_classes]
                av.train()
                lab = propagate(logits, torch.from_numpy(labeled),
                                torch.from_numpy(pool.y[labeled])).labels.numpy()[rest]
                out.append({"step": s, "acc": float((lab == pool.y[rest]).mean()), "labels": lab})
            yield s
    return wrap


def accuracy(model, x, pool, labeled: np.ndarray) -> float:
    import torch
    from metaql.labeling.propagation import embed, propagate
    _, logits = embed(model, x)
    lab = propagate(logits, torch.from_numpy(labeled), torch.from_numpy(pool.y[labeled])).labels.numpy()
    rest = np.setdiff1d(np.arange(pool.y.size), labeled)
    return float((lab[rest] == pool.y[rest]).mean())


def fresh_model(seed: int, lr: float = 2e-3):
    from metaql.labeling.embedding import TrainConfig
    from metaql.labeling.lancet import LancetConfig, default_model
    return default_model(LancetConfig(train=TrainConfig(seed=seed), semigan={"lr": lr}))(64, 10, seed)


def agreements(points: list) -> list:
    """Per checkpoint: the share of labels equal to those 250 and 1000 steps before."""
    out = []
    for i, p in enumerate(points):
        row = {"step": p["step"], "acc": p["acc"]}
        for gap in (250, 1000):
            j = i - gap // EVERY
            if j >= 0:
                row[f"agree{gap}"] = float((p["labels"] == points[j]["labels"]).mean())
        out.append(row)
    return out


def curve_worker(n: int, seed: int, steps: int, batch: int, lr: float) -> dict:
    pool, x = setup(seed)
    labeled = draw(pool, n, seed)
    model, points = fresh_model(seed, lr), []
    cpu = train(model, x, pool, labeled, seed, steps, batch, checkpoints(model, x, pool, labeled, points))
    return {"study": "curve", "labels": n, "seed": seed, "steps": steps, "batch": batch, "lr": lr,
            "cpu": cpu, "final_acc": accuracy(model, x, pool, labeled), "curve": agreements(points)}


def warm_worker(seed: int) -> dict:
    pool, x = setup(seed)
    l40 = draw(pool, 40, seed)
    more = np.random.default_rng(200 + seed).choice(np.setdiff1d(np.arange(pool.y.size), l40), 20,
                                                    replace=False)
    l60 = np.sort(np.concatenate([l40, more]))
    m40, points = fresh_model(seed), []
    out = {"study": "warm", "seed": seed}
    out["fresh40_cpu"] = train(m40, x, pool, l40, seed, 6000, progress=checkpoints(m40, x, pool, l40, points))
    out["fresh40"], out["curve40"] = accuracy(m40, x, pool, l40), agreements(points)
    for steps in (800, 2400):
        m = copy.deepcopy(m40)      # the previous round's model, its optimisers' state included
        out[f"warm{steps}_cpu"] = train(m, x, pool, l60, seed, steps)
        out[f"warm{steps}"] = accuracy(m, x, pool, l60)
    m60 = fresh_model(seed)
    out["fresh60_cpu"] = train(m60, x, pool, l60, seed, 6000)
    out["fresh60"] = accuracy(m60, x, pool, l60)
    return out


def stepcost_worker(compiled: bool) -> dict:
    """ms per SemiGAN step at 128 / 256 / 384 unlabeled rows (interleaved, median of 3 x 100
    steps); with `compiled`, also the step with its two losses under torch.compile (and the
    compile's time)."""
    import torch
    from torch import nn
    from metaql.labeling.embedding import TrainConfig, cfm_regularizer
    from metaql.labeling.semigan import SemiGAN, SemiGANConfig, _frozen
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(1257, 64, generator=g), torch.randint(10, (20,), generator=g)
    reg = cfm_regularizer(10, TrainConfig())
    steps: dict = {}
    for b in (128, 256, 384):
        m = SemiGAN(SemiGANConfig(in_dim=64, num_classes=10)).train()
        steps[f"eager, batch {b}"] = (b, m, m.train_step)
    out: dict = {"study": "stepcost"}
    if compiled:
        m = SemiGAN(SemiGANConfig(in_dim=64, num_classes=10)).train()

        def d_loss(x_l, y_l, x_u, fake):   # SemiGAN.train_step's D loss, written out
            n_l, n_u, k = x_l.shape[0], x_u.shape[0], m.num_classes
            z = m.body(torch.cat([x_l, x_u, fake]))
            out_ = m.head(z)
            out_l, out_u, out_f = out_[:n_l], out_[n_l:n_l + n_u], out_[n_l + n_u:]
            loss_u = -((torch.logsumexp(out_u[:, :k], 1) - torch.logsumexp(out_u, 1)).mean()
                       + (out_f[:, k] - torch.logsumexp(out_f, 1)).mean())
            return (nn.functional.cross_entropy(out_l[:, :k], y_l) + loss_u
                    + reg(z[:n_l], y_l, z[n_l:n_l + n_u], out_u[:, :k])), z[n_l:n_l + n_u].detach()

        def g_loss(noise, z_u):
            return (z_u.mean(0) - m.body(m.generator(noise)).mean(0)).square().sum()

        d_c, g_c = torch.compile(d_loss, dynamic=False), torch.compile(g_loss, dynamic=False)
        opt_d, opt_g = m._optimizers()

        def step(x_l, y_l, x_u, _reg):
            with torch.no_grad():
                fake = m.generator(torch.randn(x_u.shape[0], 32))
            loss, z_u = d_c(x_l, y_l, x_u, fake)
            opt_d.zero_grad()
            loss.backward()
            opt_d.step()
            m._update_average()
            with _frozen(m.body):
                lg = g_c(torch.randn(x_u.shape[0], 32), z_u)
                opt_g.zero_grad()
                lg.backward()
            opt_g.step()
        c0, w0 = time.process_time(), time.perf_counter()
        step(x[:20], y, x[20:148], reg)
        out["compile_cpu_s"], out["compile_wall_s"] = time.process_time() - c0, time.perf_counter() - w0
        steps["torch.compile, batch 128"] = (128, m, step)
    times: dict = {k: [] for k in steps}
    for _ in range(3):
        for key, (b, m, fn) in steps.items():
            c0 = time.process_time()
            for _ in range(100):
                fn(x[:20], y, x[torch.randperm(1237, generator=g)[:b] + 20], reg)
            times[key].append((time.process_time() - c0) * 10)
    out["ms_per_step"] = {k: float(np.median(v)) for k, v in times.items()}
    return out


# -- the report ------------------------------------------------------------------------------------
def stop_at(curve: list, tau: float, gap: int) -> dict | None:
    return next((p for p in curve if p.get(f"agree{gap}", 0.0) >= tau), None)


def mean_sd(v: list) -> str:
    return f"{np.mean(v):.3f} +- {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}"


def curve_section(runs: list) -> list[str]:
    md = []
    for key in sorted({(r["labels"], r["steps"], r["batch"], r["lr"]) for r in runs}):
        group = sorted((r for r in runs if (r["labels"], r["steps"], r["batch"], r["lr"]) == key),
                       key=lambda r: r["seed"])
        n, steps, batch, lr = key
        seeds = [r["seed"] for r in group]
        md.append(f"### {n} labels, {steps} steps of {batch} unlabeled rows, lr {lr:g} (seeds {seeds})\n")
        cpu = " / ".join(f"{r['cpu']:.0f}" for r in group)
        final = " / ".join(f"{r['final_acc']:.3f}" for r in group)
        md.append(f"CPU s of the training: {cpu}; final accuracy {final} "
                  f"(mean {np.mean([r['final_acc'] for r in group]):.3f})\n")
        marks = [s for s in (500, 1000, 1500, 2000, 2500, 3000, 4000, 5000) if s < steps]
        md.append("| stopped at step | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | mean - final |")
        md.append("|---:|" + "---:|" * (len(seeds) + 2))
        for s in marks:
            accs = [next((p["acc"] for p in r["curve"] if p["step"] == s), np.nan) for r in group]
            final = np.mean([r["final_acc"] for r in group])
            md.append(f"| {s} | " + " | ".join(f"{a:.3f}" for a in accs)
                      + f" | {np.mean(accs):.3f} | {np.mean(accs) - final:+.3f} |")
        md.append("")
        md.append("Label-free stop rules (stop when at least tau of the unlabeled rows keep the label "
                  "they had `gap` steps before): the step each seed stops at, and its accuracy there "
                  "minus the full run's.\n")
        md.append("| tau | gap | " + " | ".join(f"seed {s}" for s in seeds) + " | mean steps | mean accuracy change |")
        md.append("|---:|---:|" + "---:|" * (len(seeds) + 2))
        for tau, gap in RULES:
            cells, used, change = [], [], []
            for r in group:
                p = stop_at(r["curve"], tau, gap)
                s = p["step"] if p else r["steps"]
                a = p["acc"] if p else r["final_acc"]
                cells.append(f"{s} ({a - r['final_acc']:+.3f})" if p else "never")
                used.append(s)
                change.append(a - r["final_acc"])
            md.append(f"| {tau} | {gap} | " + " | ".join(cells)
                      + f" | {np.mean(used):.0f} | {np.mean(change):+.3f} |")
        md.append("")
    return md


def schedule_section(runs: list) -> list[str]:
    """Other schedules against the default one (6000 x 128, lr 2e-3) on the same labels and seeds."""
    default = {(r["labels"], r["seed"]): r for r in runs if (r["steps"], r["batch"], r["lr"]) == (6000, 128, 2e-3)}
    md = ["| labels | schedule | seeds | accuracy, per seed | default's, per seed | paired difference | "
          "CPU s (default / this) | speed-up |", "|---:|---|---|---|---|---:|---:|---:|"]
    for key in sorted({(r["labels"], r["steps"], r["batch"], r["lr"]) for r in runs}):
        if key[1:] == (6000, 128, 2e-3):
            continue
        pairs = [(r, default[(r["labels"], r["seed"])]) for r in runs
                 if (r["labels"], r["steps"], r["batch"], r["lr"]) == key and (r["labels"], r["seed"]) in default]
        if not pairs:
            continue
        pairs.sort(key=lambda p: p[0]["seed"])
        cpu_a, cpu_b = np.mean([b["cpu"] for _, b in pairs]), np.mean([a["cpu"] for a, _ in pairs])
        this = " / ".join(f"{a['final_acc']:.3f}" for a, _ in pairs)
        base = " / ".join(f"{b['final_acc']:.3f}" for _, b in pairs)
        diff = mean_sd([a["final_acc"] - b["final_acc"] for a, b in pairs])
        md.append(f"| {key[0]} | {key[1]} steps x {key[2]}, lr {key[3]:g} | {[a['seed'] for a, _ in pairs]} | "
                  f"{this} | {base} | {diff} | {cpu_a:.0f} / {cpu_b:.0f} | {cpu_a / cpu_b:.2f}x |")
    return md


def warm_section(runs: list) -> list[str]:
    runs = sorted(runs, key=lambda r: r["seed"])
    md = ["| seed | fresh 40 | 60: fresh (6000 steps) | 60: warm 800 | 60: warm 2400 | CPU s fresh / warm 800 / warm 2400 |",
          "|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        md.append(f"| {r['seed']} | {r['fresh40']:.3f} | {r['fresh60']:.3f} | {r['warm800']:.3f} | "
                  f"{r['warm2400']:.3f} | {r['fresh60_cpu']:.0f} / {r['warm800_cpu']:.0f} / {r['warm2400_cpu']:.0f} |")
    md.append(f"| mean | {np.mean([r['fresh40'] for r in runs]):.3f} | {mean_sd([r['fresh60'] for r in runs])} | "
              f"{mean_sd([r['warm800'] for r in runs])} | {mean_sd([r['warm2400'] for r in runs])} | |")
    d8 = [r["warm800"] - r["fresh60"] for r in runs]
    d24 = [r["warm2400"] - r["fresh60"] for r in runs]
    md.append(f"\nPaired, warm - fresh at 60 labels: 800 steps {mean_sd(d8)}, 2400 steps {mean_sd(d24)}.")
    return md


def report(header: str) -> str:
    runs = [json.loads(p.read_text()) for p in sorted(RAW.glob("*.json"))]
    curves = [r for r in runs if r["study"] == "curve"]
    warm = [r for r in runs if r["study"] == "warm"]
    # the warm study's fresh 40-label runs are curves of the default schedule too
    curves += [{"labels": 40, "seed": r["seed"], "steps": 6000, "batch": 128, "lr": 2e-3,
                "cpu": r["fresh40_cpu"], "final_acc": r["fresh40"], "curve": r["curve40"]}
               for r in warm if not any(c["labels"] == 40 and c["seed"] == r["seed"] and c["steps"] == 6000
                                        and c["batch"] == 128 for c in curves)]
    for r in (r for r in runs if r["study"] == "stepcost"):
        base = r["ms_per_step"]["eager, batch 128"]
        rows = "\n".join(f"| {k} | {v:.1f} | {v / base:.2f}x |" for k, v in r["ms_per_step"].items())
        extra = (f" Compiling took {r['compile_wall_s']:.0f} s of wall time ({r['compile_cpu_s']:.0f} CPU s "
                 f"in this process; the compiler's workers are other processes)." if "compile_wall_s" in r else "")
        header += ("\n\n## CPU ms per SemiGAN step (median of 3 x 100 steps, interleaved)\n\n"
                   f"| step | ms | relative |\n|---|---:|---:|\n{rows}\n\nLoad average at the end "
                   f"{r['load']:.1f}.{extra}")
    md = [header, "", "## Accuracy had the run stopped early, and label-free stop rules", "",
          *curve_section(curves)]
    md += ["## Larger batches, fewer steps: against the default schedule (training CPU seconds)", "",
           *schedule_section(curves), ""]
    if warm:
        md += ["## Warm start against a fresh model at 60 labels (40 random, then 20 more)", "",
               *warm_section(warm)]
    return "\n".join(md) + "\n"


# -- orchestration ---------------------------------------------------------------------------------
def run_job(job: dict) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"worker {job} failed:\n{proc.stderr[-3000:]}")
    print(f"done {job}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", nargs="?", choices=["curve", "warm", "stepcost", "report"])
    ap.add_argument("--compile", action="store_true", help="stepcost: also the torch.compile'd step")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--labels", default="20,40")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        out = (curve_worker(job["labels"], job["seed"], job["steps"], job["batch"], job["lr"])
               if job["study"] == "curve" else warm_worker(job["seed"]) if job["study"] == "warm"
               else {**stepcost_worker(job["compile"]), "load": os.getloadavg()[0]})
        RAW.mkdir(parents=True, exist_ok=True)
        name = "_".join(str(job[k]) for k in sorted(job))
        (RAW / f"{name}.json").write_text(json.dumps(out) + "\n")
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.study == "curve":
        jobs = [{"study": "curve", "labels": int(n), "seed": s, "steps": args.steps, "batch": args.batch,
                 "lr": args.lr} for n in args.labels.split(",") for s in seeds]
    elif args.study == "warm":
        jobs = [{"study": "warm", "seed": s} for s in seeds]
    elif args.study == "stepcost":
        jobs = [{"study": "stepcost", "compile": args.compile}]
    else:
        jobs = []
    with ThreadPoolExecutor(max_workers=args.jobs) as ex:
        list(ex.map(run_job, jobs))
    import torch
    header = ("# LANCET: how many SemiGAN steps a round needs (issue #19)\n\n"
              f"Generated by `python benchmarks/bench_lancet_steps.py report` from the raw runs in "
              f"results/lancet_steps/ (torch {torch.__version__}, one torch thread per run, "
              f"{os.cpu_count()} cores shared with other work; CPU seconds of the process). "
              "Accuracy: the propagated labels on the pool rows no human labeled.")
    REPORT.write_text(report(header) + notes(REPORT))
    print(REPORT.read_text())


if __name__ == "__main__":
    main()
