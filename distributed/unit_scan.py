"""On a Ray worker: the total scores of a task's units over every pass, and its k best.

Every sample is scored with the local engine's own chunk functions in the same chunks (one shard's
requested rows, cut by chunk_rows), and its total is summed in the local engine's order
(engine/executor.influence: per checkpoint the layers in plan order into `part`, cosine
normalisation, then `total += lr * part`, then the reduce=sum factor). Each of these is an
elementwise float64 operation, so a sample's total is bit-for-bit the local engine's, whichever
other samples share its task.

Non-finite scores are counted, not raised: the driver adds the counts of every task and raises the
local engine's error for the first check that fails (the same check, the same count).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class Pass:
    """One (checkpoint, layer) of the scan as a worker needs it."""
    ckpt: int            # index into Scan.ckpts
    layer: str
    kind: object
    meta: object
    stored: str
    strategy: str


@dataclass
class Scan:
    """What every task of a query shares (put in Ray's object store once)."""
    train: np.ndarray           # sorted training ids
    passes: list[Pass]
    queries: list               # per pass: its query side on the CPU, or None (self-influence)
    ckpts: list[str]            # the checkpoints' names, in the scan's order
    lrs: list[float]            # per checkpoint
    qnorms: list[float | None]  # per checkpoint: the query side's squared norm (cosine), else None
    similarity: str
    scale: int | None           # reduce=sum over a batch query: its size, else None
    k: int | None               # the best k by score, or None: every sample
    ascending: bool = True


def scan_units(location: str, units: list[list[list[dict]]], scan: Scan, check: bool,
               fault: str | None = None) -> dict:
    """The task's result: positions in scan.train and totals of its k best samples (all when
    scan.k is None), 'all' (every position, when `check`), non-finite counts per check, seconds
    per pass; or {'unaligned': True} when a flush-aligned unit's passes hold different ids."""
    from metaql.distributed.ray_engine import inject
    inject(fault)
    seconds = np.zeros(len(scan.passes))
    pos_parts, total_parts, bad = [], [], np.zeros(len(scan.passes) + len(scan.lrs), np.int64)
    for unit in units:
        parts = unit_parts(location, unit, scan, check, seconds)
        if parts is None:
            return {"unaligned": True}
        pos, total = unit_totals(parts, scan, bad)
        pos_parts.append(pos)
        total_parts.append(total)
    pos = np.concatenate(pos_parts) if pos_parts else np.zeros(0, np.int64)
    total = np.concatenate(total_parts) if total_parts else np.zeros(0)
    out = {"bad": bad, "seconds": seconds, "all": pos if check else None}
    if scan.k is not None:
        pos, total = best_k(pos, total, scan.k, scan.ascending)
    out.update(pos=pos, score=total)
    return out


def unit_parts(location: str, unit: list[list[dict]], scan: Scan, check: bool, seconds: np.ndarray):
    """Per pass, its chunks' (positions, scores, squared norms); None when `check` finds a pass
    whose shards hold other ids than the first pass's (checked before anything is scored)."""
    from metaql.distributed.shards import shard_tensors
    opened = [[shard_tensors(location, spec) for spec in shards] for shards in unit]
    if check and not same_ids([[ids for ids, _ in shards] for shards in opened]):
        return None
    parts = []
    for j, (p, shards) in enumerate(zip(scan.passes, opened)):
        t0 = time.perf_counter()
        parts.append([c for ids, tensors in shards for c in shard_chunks(ids, tensors, p, scan.queries[j], scan)])
        seconds[j] += time.perf_counter() - t0
    return parts


def same_ids(per_pass: list[list[np.ndarray]]) -> bool:
    held = [np.sort(np.concatenate(ids)) if ids else np.zeros(0, np.int64) for ids in per_pass]
    return all(np.array_equal(h, held[0]) for h in held[1:])


def shard_chunks(ids: np.ndarray, tensors: dict, p: Pass, q, scan: Scan) -> list[tuple]:
    """(positions, scores, squared norms) per chunk of one shard's requested rows: the chunks
    executor.layer_pass cuts (train_chunks) scored by its chunk_scores."""
    from metaql.engine.executor import chunk_rows, chunk_scores, rows_of
    keep = np.isin(ids, scan.train)
    if not keep.any():
        return []
    rows = np.nonzero(keep)[0]
    pos = np.searchsorted(scan.train, ids[rows])
    step = chunk_rows(tensors, q, p.strategy, p.meta)
    out = []
    for start in range(0, len(rows), step):
        chunk = {n: rows_of(t, rows[start:start + step]) for n, t in tensors.items()}
        s, nrm = chunk_scores(p.kind, p.meta, p.stored, p.strategy, chunk, q, scan.similarity)
        out.append((pos[start:start + step], s, nrm))
    return out


def unit_totals(parts: list[list[tuple]], scan: Scan, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions, totals) of the unit's samples, summed as engine/executor.influence sums them;
    adds the unit's non-finite counts into `bad` (per pass, then per checkpoint's total)."""
    pos = np.unique(np.concatenate([c[0] for chunks in parts for c in chunks] or [np.zeros(0, np.int64)]))
    n, npass = len(pos), len(scan.passes)
    total = np.zeros(n)
    for c, lr in enumerate(scan.lrs):
        part, norms = np.zeros(n), np.zeros(n)
        for j, p in enumerate(scan.passes):
            if p.ckpt != c:
                continue
            layer, layer_norms = np.zeros(n), np.zeros(n)
            for where, s, nrm in parts[j]:
                idx = np.searchsorted(pos, where)
                layer[idx] += s
                layer_norms[idx] += nrm
            bad[j] += int((~np.isfinite(layer)).sum())
            part += layer
            norms += layer_norms
        if scan.similarity == "cosine":
            qnorm = scan.qnorms[c]
            part = part / np.maximum(np.sqrt(norms) * (np.sqrt(qnorm) if qnorm is not None else 1.0), 1e-30)
        total += lr * part
        bad[npass + c] += int((~np.isfinite(total)).sum())
    if scan.scale is not None:
        total = total * scan.scale
    return pos, total


def best_k(pos: np.ndarray, score: np.ndarray, k: int, ascending: bool) -> tuple[np.ndarray, np.ndarray]:
    """The k first by score (descending unless `ascending`), ties by position: the order of
    executor.top_k's stable sort over rows in sample-id order."""
    order = np.lexsort((pos, score if ascending else -score))[:k]
    return pos[order], score[order]


class BestK:
    """The driver's merge of the tasks' k best. Once k rows are held, a task's rows that do not
    come before the k-th held row in the order (score, then position) are dropped on arrival: they
    cannot enter the answer, since only rows before them can replace the held ones. The others
    are buffered and cut back to k when more than MERGE_ROWS wait."""
    MERGE_ROWS = 1 << 15

    def __init__(self, k: int, ascending: bool):
        self.k, self.ascending = k, ascending
        self.pos: list[np.ndarray] = []
        self.score: list[np.ndarray] = []
        self.rows = 0
        self.kth: tuple[float, int] | None = None      # (key, position) of the k-th held row

    def add(self, pos: np.ndarray, score: np.ndarray) -> None:
        """A task's rows, as best_k returns them (its best first)."""
        if self.kth is not None and len(pos):
            first = float(score[0]) if self.ascending else -float(score[0])
            if first > self.kth[0] or first == self.kth[0] and pos[0] > self.kth[1]:
                return          # the task's best comes after the k-th held row: so do all its rows
            key = score if self.ascending else -score
            before = (key < self.kth[0]) | ((key == self.kth[0]) & (pos < self.kth[1]))
            if not before.any():
                return
            pos, score = pos[before], score[before]
        self.pos.append(pos)
        self.score.append(score)
        self.rows += len(pos)
        if self.rows > self.MERGE_ROWS:
            self._cut()

    def _cut(self) -> None:
        pos, score = best_k(np.concatenate(self.pos or [np.zeros(0, np.int64)]),
                            np.concatenate(self.score or [np.zeros(0)]), self.k, self.ascending)
        self.pos, self.score, self.rows = [pos], [score], len(pos)
        if len(pos) == self.k and self.k > 0:
            self.kth = (score[-1] if self.ascending else -score[-1], pos[-1])

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self._cut()
        return self.pos[0], self.score[0]
