"""Crash campaign: many SIGKILLs of a capture at random fault points and random moments, each
followed by reopen, verify, resume and a comparison of SELF_INFLUENCE and INFLUENCE scores with an
uninterrupted capture (the machinery of tests/crash_worker.py, which CI runs once per point).

Half the kills hit a random fault point at a random hit (storage/faults.py), half land at a random
moment of the capture. A trial passes when, after the kill, verify() reports at most the
unfinished checkpoint and no file is left that the catalog does not name, and after resuming,
verify() is clean and every score equals the uninterrupted capture's exactly.

    python benchmarks/crash_campaign.py --kills 200     # results/crash_campaign.md
    python benchmarks/crash_campaign.py --quick         # 12 kills, results/crash_campaign_quick.md
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

from metastore_common import RESULTS, Report, table

from tests import crash_worker

UNFINISHED = "its capture did not finish"


def plans(kills: int) -> list[str]:
    return ["?" if i % 2 == 0 else "t=?" for i in range(kills)]


def outcome(trial: dict, reference: dict) -> dict[str, bool]:
    return {
        "killed": trial["killed"],
        "clean after kill": all(UNFINISHED in p for p in trial["verify_killed"]) and not trial["leftovers"],
        "verify clean after resume": trial["verify"] == [] and not trial["leftovers_resumed"],
        "identical scores": trial["scores"] == reference["scores"],
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="12 kills")
    args = ap.parse_args(argv[1:])
    kills = 12 if args.quick else args.kills
    name = "crash_campaign_quick" if args.quick else "crash_campaign"
    report = Report(name, "Crash campaign: SIGKILL a capture, reopen, verify, resume, compare", argv)
    with tempfile.TemporaryDirectory(prefix="metaql-crash-") as tmp:
        out = Path(tmp)
        crash_worker.main(out, args.jobs, plans(kills))
        reference = json.loads((out / "reference.json").read_text())
        trials = [json.loads(p.read_text()) for p in sorted(out.glob("trial*.json"))]
    by_point: dict[str, list[dict]] = collections.defaultdict(list)
    for t in trials:
        point = "random moment" if t["spec"].startswith("t=") else t["spec"].split(":")[0]
        by_point[point].append(outcome(t, reference))
    columns = ["killed", "clean after kill", "verify clean after resume", "identical scores"]
    rows = [[point, len(results)] + [sum(r[c] for r in results) for c in columns]
            for point, results in sorted(by_point.items())]
    every = [r for results in by_point.values() for r in results]
    rows.append(["all", len(every)] + [sum(r[c] for r in every) for c in columns])
    report.add(f"{kills} kills ({len(trials)} trials finished)",
               table(["where", "kills"] + columns, rows),
               note=(f"Uninterrupted capture: {crash_worker.TRAIN} training samples, batches of "
                     f"{crash_worker.BATCH}, shard_size {crash_worker.SHARD}, {crash_worker.EPOCHS} checkpoints, "
                     f"{reference['seconds']:.2f} s; fault point hits per run: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(reference["hits"].items()))
                     + ". 'killed' counts trials where SIGKILL landed before the capture ended."))
    report.write(RESULTS / f"{name}.md")
    failed = sum(1 for r in every if not all(r[c] for c in columns[1:]))
    if failed or len(trials) < kills:
        print(f"FAILED: {failed} of {len(trials)} trials failed a check ({kills} planned)", file=sys.stderr)
    return int(bool(failed or len(trials) < kills))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
