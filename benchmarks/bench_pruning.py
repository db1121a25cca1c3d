"""Exact TOPK pruning (engine/pruning.py) on the digits mislabel store of `metaql demo`.

For k = 1% of the training set (and k = 1, 10%), ASC and DESC, the query of the README
(INFLUENCE on the misclassified test samples, layers fc1 and fc2, three checkpoints) runs pruned and
as a full scan (config topk_pruning=false): the fraction of sample-layer scores the pruned scan
skipped (EXPLAIN ANALYZE), both wall times (best of a few runs, same process, so the ratio is what
to read on a shared machine), and whether the answers agree.

    python benchmarks/bench_pruning.py            # the demo's 30 epochs (about a minute)
    python benchmarks/bench_pruning.py --quick    # 10 epochs; writes pruning_quick.md
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile

import numpy as np

from metastore_common import Report, add_threads_option, best_of, log, set_threads, table

import metaql
from metaql.demo import run as demo_run

QUERY = "SELECT TOPK({k}) train FROM INFLUENCE(layers=[fc1, fc2], query=batch(test_wrong)) ORDER BY {order}"


def skipped(con, sql: str) -> tuple[float, str]:
    con.config["topk_pruning"] = True
    lines = con.execute("EXPLAIN ANALYZE " + sql).arrow().column("plan").to_pylist()
    line = next(s.strip() for s in lines if "pruning:" in s)
    return float(line.split("pruning: ")[1].split("%")[0]) / 100, line


def timed(con, sql: str, prune: bool, repeat: int):
    con.config["topk_pruning"] = prune
    return best_of(lambda: con.execute(sql).arrow(), repeat, min_seconds=0.5)


def agree(a, b) -> str:
    ids_a, ids_b = a.column("sample_id").to_pylist(), b.column("sample_id").to_pylist()
    sa, sb = a.column("score").to_numpy(), b.column("score").to_numpy()
    diff = float(np.abs(sa - sb).max() / max(np.abs(sb).max(), 1e-30))
    return ("same ids, same order" if ids_a == ids_b else "ids differ") + f"; max rel. score diff {diff:.1e}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 epochs, one run each")
    add_threads_option(ap)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    report = Report("pruning_quick" if args.quick else "pruning", "Exact TOPK pruning on the digits mislabel query",
                    sys.argv if argv is None else ["benchmarks/bench_pruning.py", *argv])
    tmp = tempfile.TemporaryDirectory(prefix="bench-pruning-")
    epochs, ckpts = (10, (4, 7, 10)) if args.quick else (30, (10, 20, 30))
    log("demo store")
    demo_run(f"{tmp.name}/demo.mq", epochs=epochs, checkpoints=ckpts, out=io.StringIO(), progress=False)
    repeat = 1 if args.quick else 3
    rows, target = [], None
    with metaql.connect(f"{tmp.name}/demo.mq") as con:
        n = con.execute("SELECT count(*) FROM samples WHERE split = 'train'").fetchone()[0]
        for k in (1, max(1, round(0.01 * n)), round(0.1 * n)):
            for order in ("ASC", "DESC"):
                sql = QUERY.format(k=k, order=order)
                log(sql)
                frac, _ = skipped(con, sql)
                t_pruned, a = timed(con, sql, True, repeat)
                t_full, b = timed(con, sql, False, repeat)
                rows.append([k, order, f"{frac:.1%}", t_pruned, t_full, t_full / t_pruned, agree(a, b)])
                if k == max(1, round(0.01 * n)) and order == "ASC":
                    target = frac
    report.add("Pruned vs full scan", table(["k", "order", "scan skipped", "pruned s", "full s", "full / pruned",
                                             "answers"], rows),
               f"Store: `metaql demo` ({n} training samples, 10% labels flipped, checkpoints after epochs "
               f"{', '.join(map(str, ckpts))}, layers fc1 and fc2); query `{QUERY}`. scan skipped: the share of "
               "(training sample, checkpoint, layer) scores the pruned scan did not compute (EXPLAIN ANALYZE). "
               "Times: best of a few runs of con.execute(...).arrow() in one process (the query side's replay "
               "included in both).")
    report.add("Target", table(["target", "measured", "met"], [
        ["exact top-k pruning skips at least half of the scan on the digits mislabel query (k = 1%, ASC)",
         f"{target:.1%}", target >= 0.5]]))
    tmp.cleanup()
    report.write()


if __name__ == "__main__":
    main()
