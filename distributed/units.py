"""Which factor shards a Ray task scans together so that it can finish its samples' scores.

A sample's score is a sum over every (checkpoint, layer) pass of the scan, so a task may rank its
samples (return only its k best) only when it holds every shard, of every pass, that stores any
of them. A *unit* is such a group: per pass, the shards of one group of samples. Two layouts give
units, read from the catalog alone:

- flush-aligned: every pass has the same number of shards and the i-th shards of all passes have
  the same (rows, min_id, max_id), as a capture writes them (one shard per layer per flush, every
  checkpoint captured in the same order). When the units' id ranges are disjoint, no sample can
  be in two units. When they overlap (a shuffled capture), the ranges prove nothing: the task
  checks that each pass's shard holds the same ids, and returns its ids so that the driver checks
  that no sample is in two units (a sample captured twice in one checkpoint);
- range components: shards whose [min_id, max_id] ranges overlap, over all passes, are one unit.
  Every shard that stores a sample contains its id in its range, so a sample's shards all fall in
  one component: exact without any check, whatever the flush sizes of each checkpoint.

Neither applies (None, and the scan runs pass by pass): shards without id ranges, or ranges that
overlap into one component while the passes have several shards (one task would scan it all).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Units:
    """Per unit, per pass (the scan's pass order), the unit's shard rows in shard_id order."""
    shards: list[list[list[dict]]]
    check: bool          # the tasks check ids line up, the driver that units do not share samples
    layout: str          # 'flush-aligned' | 'range components' (EXPLAIN and the benchmark say it)


def plan_units(rows: list[list[dict]], train: np.ndarray) -> Units | None:
    """The units of the passes whose shard rows are `rows` (per pass, ordered by shard_id),
    restricted to shards that may hold a sample of `train` (sorted), or None."""
    if not rows or any(r.get("min_id") is None or r.get("max_id") is None for rs in rows for r in rs):
        return None
    aligned = flush_aligned(rows)
    if aligned is not None:
        units = [u for u in aligned if overlaps(u[0][0], train)]      # aligned: the same range in every pass
        return Units(units, check=not disjoint([u[0][0] for u in units]), layout="flush-aligned")
    components = range_components(rows)
    if len(components) == 1 and max(len(rs) for rs in rows) > 1:
        return None
    units = [[[r for r in shards if overlaps(r, train)] for shards in u] for u in components]
    return Units([u for u in units if any(u)], check=False, layout="range components")


def flush_aligned(rows: list[list[dict]]) -> list[list[list[dict]]] | None:
    """One unit per flush when the i-th shards of every pass cover the same rows and id range."""
    if len({len(rs) for rs in rows}) != 1:
        return None
    units = []
    for shards in zip(*rows):
        if len({key(r) for r in shards}) != 1:
            return None
        units.append([[r] for r in shards])
    return units


def key(row: dict) -> tuple:
    return int(row["rows"]), int(row["min_id"]), int(row["max_id"])


def disjoint(shards: list[dict]) -> bool:
    """Whether no two shards' id ranges overlap."""
    spans = sorted((int(r["min_id"]), int(r["max_id"])) for r in shards)
    return all(b[0] > a[1] for a, b in zip(spans, spans[1:]))


def range_components(rows: list[list[dict]]) -> list[list[list[dict]]]:
    """Connected components of overlapping id ranges over every pass's shards, in id order; per
    component, per pass, its shards in shard_id order."""
    spans = sorted((int(r["min_id"]), int(r["max_id"]), p, i) for p, rs in enumerate(rows) for i, r in enumerate(rs))
    groups: list[list[tuple]] = []
    end = None
    for lo, hi, p, i in spans:
        if end is None or lo > end:
            groups.append([])
            end = hi
        groups[-1].append((p, i))
        end = max(end, hi)
    out = []
    for members in groups:
        per_pass: list[list[int]] = [[] for _ in rows]
        for p, i in members:
            per_pass[p].append(i)
        out.append([[rows[p][i] for i in sorted(idx)] for p, idx in enumerate(per_pass)])
    return out


def overlaps(row: dict, train: np.ndarray) -> bool:
    """Whether some id of `train` (sorted) lies in the shard's id range (the local engine opens
    only such shards: engine/executor.overlaps)."""
    lo = np.searchsorted(train, row["min_id"])
    return bool(lo < len(train) and train[lo] <= row["max_id"])
