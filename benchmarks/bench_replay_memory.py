"""Peak memory of replay against the number of samples (issue #19: streaming replay).

    python benchmarks/bench_replay_memory.py [--sizes 1000 64000] [--threads 1]

For each size a store is filled with CIFAR-shaped inputs (3x32x32 float32, generated) in one
process, then `con.replay` of the whole split at a checkpoint of a small MLP runs in a fresh process
whose peak resident memory (ru_maxrss) is read when it ends. A third process reads the same inputs
all at once (Store.inputs, what replay did before it streamed) for comparison. Target: the replay
peak at the largest size within 2x of the smallest. Prints a table and writes
benchmarks/results/replay_memory.json (commit, library versions, threads, load).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHUNK = 4096          # samples generated and registered per add_samples call (one inputs shard)
LAYERS = ["fc2"]      # the replay's forward still runs the whole model on every input


class MLP(nn.Module):
    """3072 -> 64 -> 10 on CIFAR-shaped inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(3 * 32 * 32, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def fill(path: str, n: int) -> None:
    import numpy as np

    import bench_replay_memory
    import metaql
    with metaql.connect(path) as con:
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            g = torch.Generator().manual_seed(start)
            x = torch.randn(m, 3, 32, 32, generator=g)
            y = torch.randint(0, 10, (m,), generator=g)
            con.add_samples(np.arange(start, start + m), "train", y.numpy(), x)
        con.checkpoint(bench_replay_memory.MLP(), "c0", lr=1.0, factory="bench_replay_memory:MLP")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # KiB on Linux


def current_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def child(mode: str, path: str, threads: int) -> dict:
    import metaql
    torch.set_num_threads(threads)
    out = {}
    with metaql.connect(path, config={"trusted_factories": ["bench_replay_memory:MLP"]}) as con:
        ids = con.store.set_ids("train")
        out["before_mib"] = current_mib()
        t0 = time.perf_counter()
        if mode == "replay":
            out["rows"] = con.replay("c0", "train", layers=LAYERS, batch_size=256)
        else:
            out["rows"] = int(con.store.inputs(ids).shape[0])
        out["seconds"] = time.perf_counter() - t0
    out["peak_mib"] = peak_mib()
    return out


def run_child(mode: str, path: str, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, __file__, "--child", mode, path, "--threads", str(threads)],
                         capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{mode} child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def versions() -> dict:
    import duckdb
    import numpy
    import pyarrow
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "pyarrow": pyarrow.__version__, "duckdb": duckdb.__version__}


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 64000])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "STORE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.threads)))
        return
    sys.path.insert(0, str(HERE))
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="metaql-bench-") as tmp:
        for n in args.sizes:
            path = str(Path(tmp) / f"s{n}.mq")
            t0 = time.perf_counter()
            fill(path, n)
            fill_s = time.perf_counter() - t0
            rep = run_child("replay", path, args.threads)
            allin = run_child("all_at_once", path, args.threads)
            rows.append({"samples": n, "input_mib": n * 3 * 32 * 32 * 4 / 2 ** 20, "fill_seconds": fill_s,
                         "replay_peak_mib": rep["peak_mib"], "replay_before_mib": rep["before_mib"],
                         "replay_seconds": rep["seconds"], "replay_rows": rep["rows"],
                         "all_at_once_peak_mib": allin["peak_mib"], "all_at_once_seconds": allin["seconds"]})
            print(f"{n} samples done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    ratio = rows[-1]["replay_peak_mib"] / rows[0]["replay_peak_mib"]
    head = ["samples", "inputs MiB", "replay peak MiB", "replay s", "samples/s", "all-at-once peak MiB"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['samples']:,} | {r['input_mib']:.0f} | {r['replay_peak_mib']:.0f} | {r['replay_seconds']:.1f} | "
              f"{r['replay_rows'] / r['replay_seconds']:,.0f} | {r['all_at_once_peak_mib']:.0f} |")
    print(f"\nreplay peak at {rows[-1]['samples']:,} / at {rows[0]['samples']:,} samples: {ratio:.2f}x "
          f"(target <= 2x: {'met' if ratio <= 2 else 'NOT met'})")
    result = {"benchmark": "replay_memory", "command": "python " + " ".join([os.path.relpath(__file__, ROOT)]
                                                                           + sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M %Z"), "commit": commit(), "versions": versions(),
              "threads": args.threads, "nproc": os.cpu_count(), "load_1min_at_start": load,
              "model": "MLP 3072-64-10 on 3x32x32 float32 inputs, replaying layer fc2, batch 256",
              "rows": rows, "peak_ratio": ratio, "target_ratio": 2.0, "target_met": ratio <= 2}
    out = HERE / "results" / "replay_memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
