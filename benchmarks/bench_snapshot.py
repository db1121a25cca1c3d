"""What readers beside a writer cost: the writer's snapshot publish per commit, the no-change check,
and a reader's copy-and-open, on the demo's store and on a catalog of 100k samples.

    python benchmarks/bench_snapshot.py                 # builds the demo store (about a minute), then 100k
    python benchmarks/bench_snapshot.py --demo STORE    # an existing demo store instead of building one
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import metaql


def _publish_ms(con, repeats: int) -> list[float]:
    pub = con.store._publisher
    out = []
    for _ in range(repeats):
        pub._published = None          # as if a commit had just happened
        t0 = time.perf_counter()
        assert pub.publish()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _check_us(con, repeats: int = 1000) -> float:
    t0 = time.perf_counter()
    for _ in range(repeats):
        con.store.committed()          # nothing committed: only the fingerprint check
    return (time.perf_counter() - t0) / repeats * 1e6


def _reader_ms(path: str, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with metaql.connect(path, read_only=True) as r:
            r.execute("SELECT count(*) FROM samples").fetchone()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def measure(name: str, path: str, repeats: int) -> None:
    with metaql.connect(path, config={"progress": False}) as con:
        n = con.execute("SELECT count(*) FROM samples").fetchone()[0]
        shards = con.execute("SELECT count(*) FROM shards").fetchone()[0]
        pub = _publish_ms(con, repeats)
        check = _check_us(con)
        size = (Path(path) / "catalog.snapshot.duckdb").stat().st_size
        reader = _reader_ms(path, repeats)   # beside the open writer: copies the snapshot
    print(f"| {name} | {n:,} | {shards:,} | {size / 2**20:.1f} | {statistics.median(pub):.1f} | "
          f"{check:.1f} | {statistics.median(reader):.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", help="an existing demo store (default: build one in a temp folder)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        demo = args.demo
        if demo is None:
            from metaql.demo import run
            demo = str(Path(tmp) / "demo.mq")
            run(demo)
        big = str(Path(tmp) / "big.mq")
        with metaql.connect(big) as con:
            ids = np.arange(100_000)
            con.add_samples(ids, "train", labels=ids % 10, columns={"weight": np.linspace(0, 1, len(ids))})
        print("| catalog | samples | shards | snapshot MiB | publish ms (median) | no-change check us | "
              "reader open ms |\n|---|---|---|---|---|---|---|")
        measure("demo", demo, args.repeats)
        measure("100k samples", big, args.repeats)


if __name__ == "__main__":
    main()
