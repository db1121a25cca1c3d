"""Where a MiniLM TOPK's CPU time goes, full / always pruned / 'auto' (engine/pruning.py), with EXPLAIN ANALYZE.

The store of bench_pruning.py --store minilm (300 training samples, 37 linear layers, TOPK(30) for 8
query samples), captured once at PATH and calibrated by PRAGMA metaql_calibrate (`--calibrate`);
then each mode runs twice, interleaved, as EXPLAIN ANALYZE (the first round is the process's cold
one). Per statement: its CPU time, the phases' CPU time (query sides, the bounds, the passes, the
scan finished in full), the layers' measured and estimated seconds, and the pruning lines.

    python benchmarks/pruning_phases.py --path /tmp/minilm.mq --calibrate
    python benchmarks/pruning_phases.py --path /tmp/minilm.mq --order ASC
"""
from __future__ import annotations

import argparse
import os
import re
import time

import torch

import bench_pruning as bp

import metaql
from metaql.engine import executor, pruning

SPENT: dict[str, float] = {}


def timed(owner, name: str) -> None:
    fn = getattr(owner, name)

    def wrapper(*a, **k):
        t0 = time.process_time()
        try:
            return fn(*a, **k)
        finally:
            SPENT[name] = SPENT.get(name, 0.0) + time.process_time() - t0
    setattr(owner, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", required=True)
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--order", default="ASC")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not os.path.exists(args.path):
        bp.minilm_store(args.path)
    for name in ("unit_norms", "_pass_seconds", "_score", "_full"):
        timed(pruning.PrunedScan, name)
    timed(pruning, "unit_bound")
    timed(executor, "query_sides")
    config = {"trusted_factories": ["tests.minilm:MiniLMClassifier"], "auto_calibrate": False}
    print(f"load {os.getloadavg()[0]:.1f}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    with metaql.connect(args.path, config=config) as con:
        if args.calibrate:
            t0 = time.process_time()
            con.execute("PRAGMA metaql_calibrate").fetchall()
            print(f"PRAGMA metaql_calibrate {time.process_time() - t0:.0f} s CPU")
            return
        sql = bp.MINILM_QUERY.format(k=30, order=args.order)
        for mode in (False, True, "auto") * 2:
            con.config["topk_pruning"] = mode
            SPENT.clear()
            t0 = time.process_time()
            lines = con.execute("EXPLAIN ANALYZE " + sql).arrow().column("plan").to_pylist()
            took = time.process_time() - t0
            found = [re.search(r"measured=([\d.e-]+)s \(estimate ([\d.e-]+)s", s) for s in lines]
            meas = sum(float(m.group(1)) for m in found if m)
            est = sum(float(m.group(2)) for m in found if m)
            print(f"topk_pruning={mode}: statement {took:.2f} s CPU; layers measured {meas:.2f} s, estimated "
                  f"{est:.2f} s; phases (CPU s) " + ", ".join(f"{k} {v:.3f}" for k, v in SPENT.items()))
            for s in lines:
                if "pruning:" in s:
                    print("   ", s.strip())
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
