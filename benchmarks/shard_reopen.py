"""Process CPU of a full exact scan and of an index TOPK on a captured store, three statements each
after a first (which checks the files' checksums), with the minor page faults each takes: the
measurement behind storage/store.py's SHARD_CACHE (README, "Exact or the index").

    PYTHONPATH=. python benchmarks/shard_reopen.py STORE

STORE: a store of bench_approx.py's --index workload (--store PATH), with its projected index.
"""
import resource
import sys
import time

import torch

import metaql
from metaql.approx.indexed import Clock


def main(path: str) -> None:
    torch.set_num_threads(1)
    Clock.timer = time.process_time
    con = metaql.connect(path, config={"progress": False, "trusted_factories": ["tests.minilm:MiniLMClassifier"],
                                       "approx_route": "index", "topk_pruning": False})
    stmt = "SELECT TOPK(100) train FROM INFLUENCE(layers=*, query=batch(test){}) ORDER BY DESC"
    con.execute(stmt.format("")).fetchall()
    for rep in range(3):
        r0, p0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
        con.execute(stmt.format("")).fetchall()
        r1, p1 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
        con.execute(stmt.format(", error=0.05")).fetchall()
        r2, p2 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
        rescoring = con.approximation["index"]["seconds"]["rescoring"]
        print(f"statement {rep + 1}: exact scan {p1 - p0:.2f} s (minor faults {r1.ru_minflt - r0.ru_minflt}), "
              f"index TOPK {p2 - p1:.2f} s (rescoring {rescoring:.2f} s, minor faults {r2.ru_minflt - r1.ru_minflt})")


if __name__ == "__main__":
    main(sys.argv[1])
