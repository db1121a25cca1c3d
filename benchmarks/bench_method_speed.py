"""LANCET rounds and ELITE fits before and after issue #19's speed work, timed in one run.

"before" is the main checkout's code: each of its measurements runs under `--before-python`
(default /work/main/.venv/bin/python, whose metaql is the editable install of /work/main; the
report records that tree's commit and whether labeling/ or cleaning/ differ from it). "after"
is this tree. Every measurement is a subprocess of this script (`--worker`) at one torch thread,
so both sides run the same harness; the two sides of one seed run side by side (`--jobs 2`), so
the load of this shared machine falls on both alike. Times are process CPU seconds (less
disturbed by other work on the machine than wall time; wall time is recorded beside them).

LANCET: the session of benchmarks/bench_lancet.py (digits, 20 random oracle labels, 20 per
round) for the rounds of `--budgets` (default 20, 40, 60 labels). A round is what a user waits
for: the fit for the current labels (training, propagation, OWA) plus the 20 candidates of the
next round. Arms: before and after at the defaults; with `--fast` also after with
`LancetConfig(retrain_steps=2000)` (fresh rounds after the first train 2000 steps instead of
6000). Accuracy: the propagated labels' accuracy on the pool rows no human labeled.
Components: CPU time of 300 SemiGAN steps, of OWA (400 iterations) and of the 20 candidates on
fixed inputs, before and after alternating (`--repeats`).

ELITE: `EliteDetector` at bench_elite.py's settings (100 epochs, batches of 128, lr 1e-3) on
polluted digits, normal classes 0-9 x pollution 0.1 / 0.3 / 0.5, seed 0; the fit's CPU time and
the test ROC-AUC; Deep SAD (lr 1e-4) timed on the same tasks by the after side.

The reported runs (benchmarks/results/method_speed*.md; 1,092 s and 1,380 s of wall time on 2
cores at load 8-14):

    python benchmarks/bench_method_speed.py --parts lancet --budgets 20 --out benchmarks/results/method_speed_lancet.md
    python benchmarks/bench_method_speed.py --parts components,elite --out benchmarks/results/method_speed_elite.md
    python benchmarks/bench_method_speed.py --parts components,elite --out benchmarks/results/method_speed_he_elite.md
    python benchmarks/bench_method_speed.py --quick         # a smoke run (writes nothing)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from metastore_common import notes

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "method_speed.md"
FAST_RETRAIN_STEPS = 2000


# -- workers (run under either side's python) ------------------------------------------------------
def lancet_worker(seed: int, variant: str, quick: bool, budgets: list[int]) -> dict:
    import torch
    sys.path.insert(0, str(HERE))
    import bench_lancet as bl
    from metaql.labeling.session import LabelingSession

    torch.set_num_threads(1)
    pool = bl.digits_pool(seed)
    cfg = bl.lancet_config(quick, seed)
    if variant == "fast":
        cfg.retrain_steps = 50 if quick else FAST_RETRAIN_STEPS
    ids = np.arange(pool.y.size, dtype=np.int64)
    session = LabelingSession(ids, num_classes=10, oracle=pool.y, config=cfg)
    session.ask_oracle(np.random.default_rng(seed).choice(pool.y.size, budgets[0], replace=False))
    x = torch.from_numpy(pool.x).reshape(-1, 8, 8)
    rounds = []
    for budget in budgets:
        c0, w0 = time.process_time(), time.perf_counter()
        out = session.propagated(x)                    # the fit: training, propagation, OWA
        c1 = time.process_time()
        chosen, _ = session.candidates(x, 20)          # the next round's candidates
        c2, w2 = time.process_time(), time.perf_counter()
        rest = np.setdiff1d(np.arange(pool.y.size), session.rows(session.labeled_ids))
        acc = float((out["label"][rest] == pool.y[rest]).mean())
        rounds.append({"budget": budget, "fit_cpu": c1 - c0, "candidates_cpu": c2 - c1,
                       "cpu": c2 - c0, "wall": w2 - w0, "acc": acc})
        if budget != budgets[-1]:
            session.ask_oracle(chosen)
    return {"rounds": rounds}


def elite_worker(tasks: list[tuple[float, int, int]], quick: bool, with_sad: bool) -> dict:
    import torch
    sys.path.insert(0, str(HERE))
    import bench_elite as be
    from sklearn.metrics import roc_auc_score
    from metaql.cleaning.baselines import DeepSAD
    from metaql.cleaning.elite import EliteDetector

    torch.set_num_threads(1)
    x, y = be.digits()
    epochs = 10 if quick else 100
    out = []
    for ratio, normal, seed in tasks:
        split = be.polluted_split(y, normal, ratio, seed)
        xu, xl = x[split["unlabeled"]], x[split["labeled"]]
        yl, yt = (y[split["labeled"]] != normal).astype(int), (y[split["test"]] != normal).astype(int)
        row = {"ratio": ratio, "normal": normal, "seed": seed}
        c0 = time.process_time()
        det = EliteDetector(epochs=epochs, batch_size=128, lr=1e-3, seed=seed).fit(xu, xl, yl)
        row["cpu"] = time.process_time() - c0
        row["auc"] = float(roc_auc_score(yt, det.decision_function(x[split["test"]])))
        if with_sad:
            c0 = time.process_time()
            DeepSAD(epochs=epochs, batch_size=128, lr=1e-4, seed=seed).fit(xu, xl, yl)
            row["sad_cpu"] = time.process_time() - c0
        out.append(row)
    return {"fits": out}


def component_worker(quick: bool) -> dict:
    """CPU seconds of the pieces a round is made of, on fixed inputs: SemiGAN training steps
    and OWA (400 iterations, then the 20 candidates of select_candidates)."""
    import torch
    from metaql.labeling.dmn import OWAConfig, online_weight_approximation, select_candidates
    from metaql.labeling.embedding import TrainConfig, cfm_regularizer
    from metaql.labeling.semigan import SemiGAN, SemiGANConfig

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(1257, 64, generator=g), torch.randint(10, (20,), generator=g)
    model, reg = SemiGAN(SemiGANConfig(in_dim=64, num_classes=10)), cfm_regularizer(10, TrainConfig())
    model.train()
    steps = 20 if quick else 300
    torch.manual_seed(0)
    for _ in range(5):
        model.train_step(x[:20], y, x[20:148], reg)
    c0 = time.process_time()
    for i in range(steps):
        rows = torch.randperm(1237, generator=g)[:128] + 20
        model.train_step(x[:20], y, x[rows], reg)
    step_ms = (time.process_time() - c0) / steps * 1e3
    z_l, z_u = torch.randn(40, 128, generator=g), torch.randn(1217, 128, generator=g) + 0.3
    owa_cfg = OWAConfig(iterations=50 if quick else 400, refine_iterations=10 if quick else 100)
    c0 = time.process_time()
    first = online_weight_approximation(z_l, z_u, owa_cfg)
    c1 = time.process_time()
    select_candidates(z_l, z_u, 20, owa_cfg, first=first)
    c2 = time.process_time()
    return {"semigan_step_ms": step_ms, "owa_s": c1 - c0, "candidates_s": c2 - c1}


# -- the orchestration ---------------------------------------------------------------------------
def run_worker(python: str, job: dict) -> dict:
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(f"worker {job} failed:\n{proc.stderr[-3000:]}")
    print(f"done {job['kind']} {job.get('arm')} {job.get('seed', '')}", file=sys.stderr, flush=True)
    return {**job, **json.loads(proc.stdout.strip().splitlines()[-1])}


def git(args: list[str], cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True).stdout.strip()


def lancet_table(results: list[dict], arms: list[str], budgets: list[int]) -> str:
    lines = ["| labels | " + " | ".join(f"{a}: CPU s (fit + candidates)" for a in arms)
             + " | " + " | ".join(f"{a}: accuracy" for a in arms) + " | speed-up |",
             "|---:|" + "---:|" * (2 * len(arms) + 1)]
    for i, b in enumerate(budgets):
        cpu = {a: [r["rounds"][i]["cpu"] for r in results if r["arm"] == a] for a in arms}
        acc = {a: [r["rounds"][i]["acc"] for r in results if r["arm"] == a] for a in arms}
        cells = [f"{np.mean(cpu[a]):.1f} ({len(cpu[a])} seeds)" for a in arms]
        cells += [f"{np.mean(acc[a]):.3f} ({' / '.join(f'{v:.3f}' for v in acc[a])})" for a in arms]
        ups = [f"{a} {np.mean(cpu[arms[0]]) / np.mean(cpu[a]):.2f}x" for a in arms[1:] if cpu[a]]
        lines.append(f"| {b} | " + " | ".join(cells) + " | " + ", ".join(ups) + " |")
    return "\n".join(lines)


def paired_lancet(results: list[dict], base: str, arm: str) -> str:
    """Per seed and round: base CPU / arm CPU, on the seeds both ran."""
    rows: list[str] = []
    if not any(r["arm"] == arm for r in results):
        return ""
    for seed in sorted({r["seed"] for r in results if r["arm"] == arm}):
        a = next((r for r in results if r["arm"] == base and r["seed"] == seed), None)
        b = next(r for r in results if r["arm"] == arm and r["seed"] == seed)
        if a is None:
            continue
        ratios = [f"{ra['cpu'] / rb['cpu']:.2f}x" for ra, rb in zip(a["rounds"], b["rounds"])]
        session = sum(r["cpu"] for r in a["rounds"]) / sum(r["cpu"] for r in b["rounds"])
        rows.append(f"- seed {seed}, {arm} against {base}: per round {' / '.join(ratios)}; "
                    f"the rounds together {session:.2f}x")
    return "\n".join(rows)


def component_table(results: list[dict]) -> str:
    lines = ["| piece | before | after | speed-up |", "|---|---:|---:|---:|"]
    for key, name in (("semigan_step_ms", "SemiGAN training step (ms)"),
                      ("owa_s", "OWA, 400 iterations (s)"),
                      ("candidates_s", "20 candidates, 19 more OWA passes of 100 iterations (s)")):
        b = np.median([r[key] for r in results if r["arm"] == "before"])
        a = np.median([r[key] for r in results if r["arm"] == "after"])
        lines.append(f"| {name} | {b:.3g} | {a:.3g} | {b / a:.2f}x |")
    return "\n".join(lines)


def elite_table(results: list[dict]) -> str:
    by_arm = {r["arm"]: r["fits"] for r in results}
    before, after = by_arm["before"], by_arm["after"]
    lines = ["| pollution | before: CPU s per fit | after: CPU s per fit | speed-up | before: ROC-AUC | "
             "after: ROC-AUC | Deep SAD: CPU s per fit | after / Deep SAD |", "|---|" + "---:|" * 7]
    for ratio in sorted({f["ratio"] for f in before}):
        b = [f for f in before if f["ratio"] == ratio]
        a = [f for f in after if f["ratio"] == ratio]
        bc, ac = np.mean([f["cpu"] for f in b]), np.mean([f["cpu"] for f in a])
        sad = np.mean([f["sad_cpu"] for f in a])
        lines.append(f"| {ratio} | {bc:.2f} | {ac:.2f} | {bc / ac:.2f}x | "
                     f"{np.mean([f['auc'] for f in b]):.3f} | {np.mean([f['auc'] for f in a]):.3f} | "
                     f"{sad:.2f} | {ac / sad:.2f}x |")
    diff = max(abs(x["auc"] - y["auc"]) for x, y in zip(before, after))
    return "\n".join(lines) + f"\n\nLargest per-task ROC-AUC difference, after - before: {diff:.2e}."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--before-python", default="/work/main/.venv/bin/python")
    ap.add_argument("--seeds", type=int, default=1, help="LANCET seeds for before and after-fast")
    ap.add_argument("--default-seeds", type=int, default=1, help="LANCET seeds of the after-defaults arm")
    ap.add_argument("--budgets", default="20,40,60", help="LANCET's rounds (labels)")
    ap.add_argument("--fast", action="store_true", help="also the after arm with retrain_steps=2000")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--parts", default="lancet,components,elite")
    ap.add_argument("--repeats", type=int, default=3, help="repetitions of the component timings")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--out", default=str(RESULTS), help="the report (and its .json of raw results)")
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        out = (lancet_worker(job["seed"], job["variant"], job["quick"], job["budgets"]) if job["kind"] == "lancet"
               else component_worker(job["quick"]) if job["kind"] == "components"
               else elite_worker([tuple(t) for t in job["tasks"]], job["quick"], job["with_sad"]))
        print(json.dumps(out))
        return
    after_python, parts = sys.executable, args.parts.split(",")
    budgets = [int(b) for b in args.budgets.split(",")]
    before_tree = Path(args.before_python).absolute().parents[2]
    jobs: list[tuple[str, dict]] = []
    if "lancet" in parts:
        for seed in range(1 if args.quick else args.seeds):
            jobs.append((args.before_python, {"kind": "lancet", "arm": "before", "seed": seed,
                                              "variant": "default", "quick": args.quick, "budgets": budgets}))
            if args.fast:
                jobs.append((after_python, {"kind": "lancet", "arm": "after, retrain_steps=2000",
                                            "seed": seed, "variant": "fast", "quick": args.quick,
                                            "budgets": budgets}))
        for seed in range(1 if args.quick else args.default_seeds):
            jobs.append((after_python, {"kind": "lancet", "arm": "after", "seed": seed,
                                        "variant": "default", "quick": args.quick, "budgets": budgets}))
    if "components" in parts:
        for rep in range(args.repeats):
            for arm, python in (("before", args.before_python), ("after", after_python)):
                jobs.append((python, {"kind": "components", "arm": arm, "rep": rep, "quick": args.quick}))
    if "elite" in parts:
        tasks = [(r, c, 0) for r in (0.1, 0.3, 0.5) for c in ((0, 1) if args.quick else range(10))]
        jobs.append((args.before_python, {"kind": "elite", "arm": "before", "tasks": tasks,
                                          "quick": args.quick, "with_sad": False}))
        jobs.append((after_python, {"kind": "elite", "arm": "after", "tasks": tasks,
                                    "quick": args.quick, "with_sad": True}))
    load_before, t0 = os.getloadavg(), time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as ex:
        results = list(ex.map(lambda j: run_worker(*j), jobs))
    wall, load_after = time.perf_counter() - t0, os.getloadavg()
    import torch
    import sklearn
    parts_md = [
        "# LANCET and ELITE speed, before and after issue #19",
        f"Command: `python benchmarks/bench_method_speed.py {' '.join(sys.argv[1:])}`. Wall time "
        f"{wall:.0f} s, {args.jobs} worker processes x 1 torch thread on {os.cpu_count()} cores "
        f"shared with other work: load average {load_before[0]:.1f} at the start, "
        f"{load_after[0]:.1f} at the end. Times are process CPU seconds.",
        f"After: this tree, commit {git(['rev-parse', '--short', 'HEAD'], HERE)} "
        f"(uncommitted changes: {'yes' if git(['status', '--porcelain', '--', 'labeling', 'cleaning'], HERE.parent) else 'none'} "
        f"in labeling/ and cleaning/). Before: {before_tree} at commit "
        f"{git(['rev-parse', '--short', 'HEAD'], before_tree)} (its labeling/ and cleaning/ "
        f"{'differ from that commit' if git(['status', '--porcelain', '--', 'labeling', 'cleaning'], before_tree) else 'as committed'}). "
        f"torch {torch.__version__}, scikit-learn {sklearn.__version__}, Python {platform.python_version()}.",
    ]
    comps = [r for r in results if r["kind"] == "components"]
    if comps:
        parts_md += ["## The pieces of a round (CPU time, median of the repetitions; before and after "
                     "alternate)", component_table(comps)]
    lancet = [r for r in results if r["kind"] == "lancet"]
    if lancet:
        arms = [a for a in ("before", "after", "after, retrain_steps=2000") if any(r["arm"] == a for r in lancet)]
        parts_md += ["## LANCET: CPU seconds per round and propagated-label accuracy (mean, then per seed)",
                     lancet_table(lancet, arms, budgets),
                     "Paired by seed (CPU before / CPU after; the same split and start):",
                     paired_lancet(lancet, "before", "after") + "\n" +
                     paired_lancet(lancet, "before", "after, retrain_steps=2000")]
    elite = [r for r in results if r["kind"] == "elite"]
    if elite:
        parts_md += ["## ELITE: CPU seconds per fit and test ROC-AUC (normal classes 0-9, seed 0)",
                     elite_table(elite)]
    report = "\n\n".join(parts_md) + "\n"
    print(report)
    out = Path(args.out)
    raw = out.with_suffix(".json")
    if not args.quick and not args.no_write:
        out.write_text(report + notes(out))
        raw.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
