"""The train x query matrix: INFLUENCE(..., query=each(set)) scores every training sample against
every query sample apart, `query_id, sample_id, score`, from one scan over the training side.

The scan goes block by block over the (sorted) training samples: for a block of M samples, every
checkpoint and layer adds its (M, B) scores, computed per chunk of stored factors against all B
query samples at once (engine/operators.py: pairwise_*), into one float64 block. A block is final
once all layers and checkpoints have added to it (scores are sums over both), so with `topk` it is
merged into a running top-k per query sample and dropped: the whole N x B matrix is never held.
Each factor row is read once (shards are memory-mapped; a block reads only its rows of each).

Top-k is deterministic: the k highest scores per query sample (proponents: the training samples
that lower its loss), or the k lowest (opponents), ties to the smaller sample id.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from metaql.engine import cost
from metaql.engine import operators as ops
from metaql.engine.plan import InfluenceScan
from metaql.engine.strategies import STRATEGIES, strategy_named
from metaql.storage.catalog_snapshot import catalog_of
from metaql.storage.hooks import watched_modules
from metaql.storage.layers import kind_named
from metaql.storage.replay import replay_factors, stored_replay_factors
from metaql.storage.tasks import task_at

DIRECTIONS = ("proponents", "opponents", "both")
MATRIX_COLUMNS = [("query_id", "BIGINT"), ("sample_id", "BIGINT"), ("score", "DOUBLE")]
TOPK_COLUMNS = MATRIX_COLUMNS + [("rank", "BIGINT"), ("role", "VARCHAR")]


@dataclass
class InfluenceMatrix(InfluenceScan):
    """Scores of training samples against each query sample apart (query=each(set))."""
    topk: int | None = None          # per query sample only the k strongest, never the whole matrix
    direction: str = "proponents"    # proponents (highest) | opponents (lowest) | both

    pairwise = True                  # not a field: tells the optimizer to cost the matrix strategies

    @property
    def directions(self) -> list[str]:
        return ["proponents", "opponents"] if self.direction == "both" else [self.direction]

    @property
    def columns(self) -> list[tuple[str, str]]:
        return TOPK_COLUMNS if self.topk else MATRIX_COLUMNS


def execute_matrix(scan: InfluenceMatrix, ctx) -> pa.Table:
    from metaql.engine.executor import check_finite, device_of
    catalog, device = catalog_of(ctx), device_of(ctx)
    train, qids = np.sort(scan.train.ids), np.asarray(scan.query.ids, dtype=np.int64)
    by_ckpt: dict[str, list] = {}
    for s in scan.strategies:
        by_ckpt.setdefault(s.checkpoint, []).append(s)
    queries = {ckpt: matrix_query_sides(scan, ctx.store, ckpt, strategies, device, catalog)
               for ckpt, strategies in by_ckpt.items()}
    sources = {(s.checkpoint, s.layer): layer_source(catalog, s.checkpoint, s.layer, train) for s in scan.strategies}
    keepers = [TopK(len(qids), scan.topk, d == "proponents") for d in scan.directions] if scan.topk else []
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    step = cost.block_rows(len(qids))
    for lo in ctx.progress(range(0, len(train), step), desc="blocks"):
        hi = min(lo + step, len(train))
        total, seen = block_scores(scan, ctx, by_ckpt, queries, sources, lo, hi, device)
        check_finite(total, ", ".join(scan.layers), ", ".join(by_ckpt))
        ids, scores = train[lo:hi][seen], total[seen]
        for keeper in keepers:
            keeper.merge(ids, scores)
        if not keepers:
            parts.append((ids, scores))
    return topk_table(qids, keepers, scan.directions) if keepers else matrix_table(qids, parts)


def block_scores(scan, ctx, by_ckpt, queries, sources, lo: int, hi: int, device: str):
    """((M, B) scores of training samples lo..hi-1 summed over layers and lr-weighted checkpoints,
    which of them any layer stores)."""
    catalog = catalog_of(ctx)
    m, b = hi - lo, len(scan.query.ids)
    total, seen = np.zeros((m, b)), np.zeros(m, dtype=bool)
    cosine = scan.similarity == "cosine"
    for ckpt, strategies in by_ckpt.items():
        part, norms, qnorms = np.zeros((m, b)), np.zeros(m), np.zeros(b)
        for strat in strategies:
            q = queries[ckpt][strat.layer]
            with strat.timing():      # EXPLAIN ANALYZE
                for pos, chunk_scores, chunk_norms in layer_block(catalog, strat, sources[(ckpt, strat.layer)], q,
                                                                  lo, hi, cosine, device, ctx):
                    at = rows_at(pos)
                    part[at] += chunk_scores
                    norms[at] += chunk_norms
                    seen[at] = True
            if cosine:
                qnorms += q["norms"].cpu().numpy()
        if cosine:
            part /= np.maximum(np.sqrt(norms)[:, None] * np.sqrt(qnorms)[None, :], 1e-30)
        part *= catalog.checkpoint(ckpt)["lr"]       # in place: no third (M, B) array
        total += part
    return total, seen


def rows_at(pos: np.ndarray):
    """A slice where the positions are consecutive (the usual case: a shard's rows in id order), so
    that adding a chunk's (n, B) scores is one pass instead of a gather and a scatter."""
    if len(pos) and pos[-1] - pos[0] + 1 == len(pos) and (len(pos) < 3 or (np.diff(pos) == 1).all()):
        return slice(int(pos[0]), int(pos[-1]) + 1)
    return pos


def layer_block(catalog, strat, source, q, lo: int, hi: int, cosine: bool, device: str, ctx):
    """(positions in the block, (n, B) scores, (n,) squared norms) per chunk of one layer's
    training samples lo..hi-1, every query sample at once (or a group of them at a time, where
    all at once would pass the bound on one chunk's intermediates)."""
    from metaql.engine.executor import CHUNK_NUMBERS, rows_of
    meta, stored = catalog.layer_meta(strat.layer)
    kind, chosen = kind_named(meta.kind), strategy_named(strat.chosen)
    for rows, pos, tensors in source:
        inside = (pos >= lo) & (pos < hi)
        if not inside.any():
            continue
        rows, pos = rows[inside], pos[inside] - lo
        per_sample = sum(int(np.prod(t.shape[1:])) for t in tensors.values())
        group = query_group_size(chosen, meta, tensors, q, per_sample)
        # made once: the chunks share each group's tensors (and what conv.py builds from them)
        groups = [ops.query_group(q, g, min(g + group, q["count"])) for g in range(0, q["count"], group)]
        step = max(1, CHUNK_NUMBERS // max(chosen.extra_numbers(meta, tensors, groups[0], per_sample), 1))
        for start in range(0, len(rows), step):
            ctx.check_interrupt()
            chunk = {n: rows_of(t, rows[start:start + step]).to(device) for n, t in tensors.items()}
            scores = torch.cat([chosen.scores(kind, meta, chunk, part) for part in groups], dim=1)
            norms = training_norms(kind, meta, stored, chunk) if cosine else None
            yield (pos[start:start + step], scores.double().cpu().numpy(),
                   0.0 if norms is None else norms.double().cpu().numpy())


def query_group_size(strategy, meta, tensors: dict, q: dict, per_sample: int) -> int:
    """Query samples scored together: all of them unless one training sample's intermediates
    against all would pass CHUNK_NUMBERS."""
    from metaql.engine.executor import CHUNK_NUMBERS
    b = q["count"]
    need = strategy.extra_numbers(meta, tensors, q, per_sample)
    return b if need <= CHUNK_NUMBERS else max(1, b * CHUNK_NUMBERS // need)


def training_norms(kind, meta, stored: str, chunk) -> torch.Tensor:
    if stored == "full":
        g = chunk["G"].float()
        return (g * g).sum(1)
    return ops.squared_norm(kind, meta, chunk)


def layer_source(catalog, ckpt: str, layer: str, train: np.ndarray) -> list:
    """Per factor shard of (checkpoint, layer): (its rows that are training samples, their
    positions among the sorted training ids, its memory-mapped tensors)."""
    out = []
    for row in catalog.factor_shards(ckpt, layer):
        ids, tensors = catalog.shard_tensors(row)
        pos = np.searchsorted(train, ids)
        inside = pos < len(train)
        inside[inside] = train[pos[inside]] == ids[inside]
        rows = np.nonzero(inside)[0]
        out.append((rows, pos[rows], tensors))
    return out


def matrix_query_sides(scan, store, ckpt: str, strategies, device: str, catalog) -> dict[str, dict]:
    """Replays the query samples at the checkpoint; per layer what its matrix strategy needs, each
    query sample kept apart, in the order of scan.query.ids."""
    model, task = store.model_at(ckpt), task_at(store, ckpt)
    modules = watched_modules(model, scan.layers)
    if scan.query.inputs is not None:   # tensors the caller passed (con.influence), not registered
        factors = replay_factors(model, modules, scan.query.inputs, scan.query.targets, scan.loss, task=task)
    else:
        ids = scan.query.ids
        factors = stored_replay_factors(store, model, modules, ids, task.stored_targets(store, ids, scan.loss),
                                        scan.loss, task=task, shard_rows=catalog.input_shards)
    out = {}
    for strat in strategies:
        meta, _ = catalog.layer_meta(strat.layer)
        side = ops.pairwise_query_side(kind_named(meta.kind), meta, factors[strat.layer],
                                       set(STRATEGIES[strat.chosen].needs), scan.similarity == "cosine")
        out[strat.layer] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in side.items()}
    return out


class TopK:
    """Each query sample's k best scores so far (highest when `largest`, else lowest), ties to the
    smaller sample id; blocks are merged in as they come."""

    def __init__(self, b: int, k: int, largest: bool):
        self.k, self.sign = k, 1.0 if largest else -1.0
        self.keys = np.zeros((b, 0))                # sign * score: larger is better
        self.ids = np.zeros((b, 0), dtype=np.int64)

    def merge(self, ids: np.ndarray, scores: np.ndarray) -> None:
        """Keeps the best k of the kept ones and a block's (M,) ids with their (M, B) scores."""
        b, old = self.keys.shape
        keys = np.concatenate([self.keys, self.sign * scores.T], axis=1)
        c = keys.shape[1]
        kept = min(self.k, c)
        if kept == 0:
            return
        # only the candidates at or above each row's k-th best take part in the (row, -key, id) sort
        kth = np.partition(keys, c - kept, axis=1)[:, c - kept] if c > kept else np.full(b, -np.inf)
        row, col = np.nonzero(keys >= kth[:, None])
        # ids of those candidates only (not a (B, k + M) array of them): kept ones, then the block's
        cand = np.where(col < old, self.ids[row, np.minimum(col, old - 1)] if old else 0,
                        ids[np.maximum(col - old, 0)] if len(ids) else 0)
        order = np.lexsort((cand, -keys[row, col], row))
        row, col, cand = row[order], col[order], cand[order]
        starts = np.searchsorted(row, np.arange(b))
        take = (starts[:, None] + np.arange(kept)).reshape(-1)
        self.keys = keys[row[take], col[take]].reshape(b, kept)
        self.ids = cand[take].reshape(b, kept).astype(np.int64)

    def scores(self) -> np.ndarray:
        return self.sign * self.keys


def topk_table(qids: np.ndarray, keepers: list[TopK], directions: list[str]) -> pa.Table:
    """Rows by query sample, then proponents before opponents, then rank (1 = strongest)."""
    cols: dict[str, list] = {"query_id": [], "sample_id": [], "score": [], "rank": [], "role": [], "at": []}
    b = len(qids)
    for keeper, direction in zip(keepers, directions):
        kept = keeper.ids.shape[1]
        cols["query_id"].append(np.repeat(qids, kept))
        cols["sample_id"].append(keeper.ids.reshape(-1))
        cols["score"].append(keeper.scores().reshape(-1))
        cols["rank"].append(np.tile(np.arange(1, kept + 1), b))
        cols["role"].append(np.full(b * kept, direction[:-1]))    # proponent | opponent
        cols["at"].append(np.repeat(np.arange(b), kept))
    order = np.lexsort((np.concatenate(cols["rank"]), np.concatenate(cols["role"]) != "proponent",
                        np.concatenate(cols["at"])))
    return pa.table({"query_id": pa.array(np.concatenate(cols["query_id"])[order], pa.int64()),
                     "sample_id": pa.array(np.concatenate(cols["sample_id"])[order], pa.int64()),
                     "score": pa.array(np.concatenate(cols["score"])[order], pa.float64()),
                     "rank": pa.array(np.concatenate(cols["rank"])[order], pa.int64()),
                     "role": pa.array(np.concatenate(cols["role"])[order], pa.string())})


def matrix_table(qids: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray]]) -> pa.Table:
    """The whole matrix, by query sample then training sample id."""
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    scores = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, len(qids)))
    return pa.table({"query_id": pa.array(np.repeat(qids, len(ids)), pa.int64()),
                     "sample_id": pa.array(np.tile(ids, len(qids)), pa.int64()),
                     "score": pa.array(scores.T.reshape(-1), pa.float64())})


def explain_lines(scan: InfluenceMatrix, indent: str) -> list[str]:
    """EXPLAIN's line for what the matrix returns and holds (engine.cost.matrix_space)."""
    n, b = len(scan.train.ids), len(scan.query.ids)
    space = cost.matrix_space(n, b, scan.topk, len(scan.directions))
    what = f"top-{scan.topk} {scan.direction} per query sample" if scan.topk else "the whole matrix"
    return [f"{indent}  MATRIX {n} train x {b} query samples, {what}: {space['rows']} rows, "
            f"{space['held'] * 8 / 2 ** 20:.3g} MiB of scores held"]
