"""Fuzzes the language with N statements (default 100,000; --quick 2,000) against a small real
store and prints the outcome table: results, each metaql error class, exceptions outside
metaql.Error, statements cancelled after --cancel-after seconds (the user asked for long work)
and statements that did not stop within --grace seconds of that cancel. The store must verify
afterwards, also reopened. Writes benchmarks/results/fuzz.md (fuzz_quick.md with --quick).

    python benchmarks/fuzz_statements.py [-n 100000] [--seed 0] [--cancel-after 30]

The generator is tests/fuzzing.py, the one tests/test_fuzz.py runs in CI.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import metaql  # noqa: E402
from tests.fuzzing import Generator, Watchdog, run_one, small_store  # noqa: E402


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=100_000, help="statements to run")
    ap.add_argument("--quick", action="store_true", help="2,000 statements, results/fuzz_quick.md")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cancel-after", type=float, default=30.0, help="seconds before a statement is cancelled")
    ap.add_argument("--grace", type=float, default=5.0, help="seconds a cancelled statement may take to stop")
    args = ap.parse_args(argv)
    n = 2_000 if args.quick else args.n
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="metaql-fuzz-") as tmp:
        path = str(Path(tmp) / "store.mq")
        con = small_store(path)
        generator, r = Generator(con), random.Random(args.seed)
        watchdog = Watchdog(con, args.cancel_after)
        counts, seconds, examples, slowest = Counter(), [], {}, []
        for i in range(n):
            statement, params = generator.statement(r), generator.parameters(r)
            outcome, s = run_one(con, statement, params, watchdog)
            counts[outcome] += 1
            seconds.append(s)
            if s > args.cancel_after + args.grace:
                counts["not stopped within grace"] += 1
            examples.setdefault(outcome, (statement, params))
            slowest = sorted(slowest + [(s, outcome, statement)], reverse=True)[:5]
            if (i + 1) % 10_000 == 0:
                print(f"{i + 1:,} statements, {time.perf_counter() - t_start:.0f} s: {dict(counts)}", flush=True)
        watchdog.close()
        problems = con.verify()
        con.close()
        with metaql.connect(path) as again:
            reopened = again.verify()
    wall = time.perf_counter() - t_start
    report = render(args, n, counts, seconds, examples, slowest, problems, reopened, wall)
    print(report)
    out = ROOT / "benchmarks" / "results" / ("fuzz_quick.md" if args.quick else "fuzz.md")
    out.write_text(report)
    print(f"wrote {out.relative_to(ROOT)}")
    others = sum(v for k, v in counts.items() if k.startswith("OTHER"))
    return int(bool(others or counts["not stopped within grace"] or problems or reopened))


def render(args, n, counts, seconds, examples, slowest, problems, reopened, wall) -> str:
    metaql_errors = sorted(k for k in counts if k not in ("ok", "cancelled", "not stopped within grace")
                           and not k.startswith("OTHER"))
    rows = [("ok (a result)", counts["ok"])] + [(f"metaql.{k}", counts[k]) for k in metaql_errors]
    rows += [(f"cancelled at {args.cancel_after:g} s (InterruptException; long work asked for)", counts["cancelled"])]
    rows += [(k.replace("OTHER:", "other exception: "), v) for k, v in sorted(counts.items()) if k.startswith("OTHER")]
    if not any(k.startswith("OTHER") for k in counts):
        rows.append(("other exceptions (outside metaql.Error)", 0))
    over = sum(1 for s in seconds if s > args.cancel_after)
    rows.append((f"statements over {args.cancel_after:g} s (stopped by the cancel)", over))
    rows.append((f"statements not stopped within {args.grace:g} s of the cancel", counts["not stopped within grace"]))
    ordered = sorted(seconds)
    pct = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    lines = [
        "# Fuzzed statements (issue #16)", "",
        f"- command: `python benchmarks/fuzz_statements.py{' --quick' if args.quick else f' -n {n}'} "
        f"--seed {args.seed} --cancel-after {args.cancel_after:g}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- commit: {_commit()}",
        f"- machine: nproc {os.cpu_count()}, torch {torch.__version__} (1 thread), 1-min load average at start "
        f"{os.getloadavg()[0]:.1f}",
        f"- store: tests/fuzzing.py small_store (48 samples, an MLP captured at 2 checkpoints); total wall time "
        f"{wall:.0f} s", "",
        "| outcome | statements |", "|---|---|",
        *[f"| {k} | {v:,} |" for k, v in rows],
        f"| **total** | **{n:,}** |", "",
        f"Per statement: median {pct(0.5) * 1e3:.1f} ms, p99 {pct(0.99) * 1e3:.1f} ms, max {ordered[-1]:.2f} s.",
        f"`verify()` after the run: {problems or 'no problem'}; after reopening: {reopened or 'no problem'}.", "",
        "Slowest statements:", "",
        *[f"- {s:.2f} s, {o}: `{_clip(st)}`" for s, o, st in slowest], "",
        "One example per outcome:", "",
        *[f"- {k}: `{_clip(st)}`" + (f" with parameters `{_clip(repr(p))}`" if p is not None else "")
          for k, (st, p) in sorted(examples.items())],
    ]
    return "\n".join(lines) + "\n"


def _clip(s: str, n: int = 160) -> str:
    s = s.replace("\n", " ").replace("`", "'")
    return s if len(s) <= n else s[:n] + "..."


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
