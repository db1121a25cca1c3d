"""Warm conv13 scans at B = 1 by their fastest repetitions (issue #19, session 8): on a shared
2-core machine at load 8-12 the medians of bench_limits.py measure the other jobs; the minimum of
many repetitions of the scan and of the limits is what the code reaches when it runs. Prints one
line per (strategy, N): the minimum scan time, the minimum time of a one-sample scan (the fixed
cost), and the scan's flops and bytes (bench_limits.scan_work) as fractions of the best torch.mm
rate of a 512 or 1024 square and the best read rate of a 128 MiB sum. Run it under the code to
compare (PYTHONPATH naming another tree).

    python benchmarks/limits_fixed_costs.py [--reps 60] [--n 400,4000] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_limits as bl                        # noqa: E402
from metastore_common import memory_bandwidth   # noqa: E402


def fastest(run, reps: int) -> float:
    run()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_rate(size: int, reps: int) -> float:
    """The best flop/s of torch.mm on size squares: a 512 square (3 ms) fits in a time slice as
    the scans do, where a 1024 one (22 ms) rarely does at load 8; the higher of the two is the limit."""
    a, c = torch.randn(size, size), torch.randn(size, size)
    return 2 * size ** 3 / fastest(lambda: torch.mm(a, c), reps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--n", default="400,4000")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2: all cores of this machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ns = [int(v) for v in args.n.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="limits-fixed-")
    con = bl.build(f"{tmp.name}/c.mq", bl.Conv13(), (512, 2, 2), max(ns), 1, ["conv13"])
    w = bl.layer_work(con, "conv13")
    gemm = max(gemm_rate(size, args.reps) for size in (512, 1024))
    read = memory_bandwidth(128, repeat=args.reps // 4)["read"] * 1e9     # bench_limits' 128 MiB sum
    print(f"threads {args.threads}, load {os.getloadavg()[0]:.1f}; best GEMM {gemm / 1e9:.1f} GFLOP/s, best read {read / 1e9:.1f} GB/s")
    for strategy in ("iterate", "each_iterate"):
        fixed = fastest(bl.timed_scan(con, "conv13", strategy, 1, 1), args.reps)
        for n in ns:
            t = fastest(bl.timed_scan(con, "conv13", strategy, 1, n), args.reps)
            flops, nbytes = bl.scan_work(w, strategy, n, 1)
            print(f"{strategy} N={n}: {t * 1e3:.3f} ms (fixed {fixed * 1e3:.3f} ms), of GEMM rate "
                  f"{flops / t / gemm:.3f}, of read bandwidth {nbytes / t / read:.3f}, roofline "
                  f"{max(flops / gemm, nbytes / read) / t:.3f}")
    con.close()


if __name__ == "__main__":
    main()
