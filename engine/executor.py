"""Runs a physical plan over the store's shards and returns an Arrow table.

Influence scores stream shard by shard (memory-mapped), chunked so intermediates stay bounded;
scores accumulate in one float64 vector over the training side, summed over layers and over
checkpoints weighted by each checkpoint's learning rate (TracIn).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import duckdb
import numpy as np
import pyarrow as pa
import torch

from metaql.engine import operators as ops
from metaql.engine.functions import FunctionRegistry
from metaql.engine.plan import FunctionScan, InfluenceScan, Strategy, TopK
from metaql.engine.strategies import needs_of, strategy_named
from metaql.errors import Error, InternalException, InterruptException, InvalidInputException
from metaql.storage.catalog_snapshot import catalog_of
from metaql.storage.hooks import LayerHooks, watched_modules
from metaql.storage.layers import kind_named
from metaql.storage.replay import replay_batches, replay_factors, stored_batches, stored_replay_factors
from metaql.storage.tasks import task_at

CHUNK_NUMBERS = 32 * 2 ** 20      # bound on the largest intermediate of one chunk (numbers)


@dataclass
class Context:
    """What a table function gets as its first argument."""
    store: Any
    registry: FunctionRegistry
    config: dict = field(default_factory=dict)
    progress: Callable = lambda it, total=None, desc="": it
    interrupted: Callable[[], bool] = lambda: False
    catalog: Any = None          # the statement's CatalogSnapshot (storage/catalog_snapshot.py)

    def check_interrupt(self) -> None:
        if self.interrupted():
            raise InterruptException("query cancelled; nothing was changed")


def execute(plan, ctx: Context) -> pa.Table:
    from metaql.engine.plan import user_work
    with user_work():         # a background calibration waits for the whole statement
        return _execute(plan, ctx)


def _execute(plan, ctx: Context) -> pa.Table:
    if getattr(plan, "error", None) is not None or getattr(getattr(plan, "child", None), "error", None) is not None:
        from metaql.approx.execute import execute_approximate      # INFLUENCE(..., error=e): metaql.approx
        return execute_approximate(plan, ctx)
    if getattr(plan, "pairwise", False):     # the train x query matrix, query=each(set)
        from metaql.engine.matrix import execute_matrix
        return execute_matrix(plan, ctx)
    if isinstance(plan, TopK):
        if ctx.config.get("engine") == "ray":     # each Ray task ranks its own k (distributed/ray_units.py)
            from metaql.distributed.ray_units import top_k_by_units
            ranked = top_k_by_units(plan, ctx)     # None: the shards do not line up; run it as below
            if ranked is not None:
                return ranked
        from metaql.engine.pruning import pruned_top_k
        pruned = pruned_top_k(plan, ctx)     # None: not prunable here (engine/pruning.py says why)
        if pruned is not None:
            return pruned
        table = _execute(plan.child, ctx)
        return top_k(table, plan.k, plan.ascending)
    if isinstance(plan, InfluenceScan):
        return influence(plan, ctx)
    if isinstance(plan, FunctionScan):
        fn = ctx.registry.get(plan.name)
        if not _is_users(fn.fn):
            result = fn.fn(ctx, **plan.arguments)
            return result if isinstance(result, pa.Table) else pa.table(result)
        try:
            result = fn.fn(ctx, **plan.arguments)
            return result if isinstance(result, pa.Table) else pa.table(result)
        except (Error, duckdb.Error, KeyboardInterrupt):
            raise
        except Exception as e:      # the user's own code: not a MetaQL bug to report, but theirs to see
            where = f"{getattr(fn.fn, '__module__', '?')}.{getattr(fn.fn, '__qualname__', fn.name)}"
            text = str(e) if len(str(e)) <= 500 else str(e)[:500] + "..."
            raise InternalException(f"{type(e).__module__}.{type(e).__qualname__}: {text} (raised by table function "
                                    f"{fn.name}, {where}, registered with register_function: see its traceback, "
                                    "chained to this error)") from e
    raise TypeError(f"cannot execute {type(plan).__name__}")


def _is_users(fn: Callable) -> bool:
    """Whether a table function is the user's (con.register_function), not one of MetaQL's."""
    module = getattr(fn, "__module__", None) or ""
    return not (module == "metaql" or module.startswith("metaql."))


def top_k(table: pa.Table, k: int, ascending: bool) -> pa.Table:
    """The k best rows by score; equal scores keep the table's row order (an influence scan's rows
    are in sample_id order), so a pruned scan that keeps every row that can tie gives the same rows
    (torch.topk's order among ties depends on the input's length)."""
    scores = table.column("score").to_numpy()
    order = np.argsort(scores if ascending else -scores, kind="stable")
    return table.take(pa.array(order[:min(k, len(scores))]))


def influence(scan: InfluenceScan, ctx: Context) -> pa.Table:
    if ctx.config.get("engine") == "ray":     # tasks over all passes of a group of samples at once
        from metaql.distributed.ray_units import influence_by_units
        table = influence_by_units(scan, ctx)     # None: the shards do not line up; pass by pass below
        if table is not None:
            return table
    store, catalog = ctx.store, catalog_of(ctx)
    train = np.sort(scan.train.ids)
    total = np.zeros(len(train))
    seen = np.zeros(len(train), dtype=bool)
    by_ckpt: dict[str, list[Strategy]] = {}
    for s in scan.strategies:
        by_ckpt.setdefault(s.checkpoint, []).append(s)
    for ckpt, strategies in ctx.progress(list(by_ckpt.items()), desc="checkpoints"):
        lr = catalog.checkpoint(ckpt)["lr"]
        query = None if scan.query is None else query_sides(scan, store, ckpt, strategies, device_of(ctx),
                                                            catalog)
        part, norms, qnorm = np.zeros(len(train)), np.zeros(len(train)), 0.0
        for strat in strategies:
            q = None if query is None else query[strat.layer]
            with strat.timing():
                layer_scores, layer_norms, layer_seen = layer_pass(store, ckpt, strat, train, q, scan, ctx)
            check_finite(layer_scores, strat.layer, ckpt)
            part += layer_scores
            norms += layer_norms
            seen |= layer_seen
            if q is not None and scan.similarity == "cosine":
                qnorm += float((q["gbar_flat"].double() ** 2).sum())
        if scan.similarity == "cosine":
            part = part / np.maximum(np.sqrt(norms) * (np.sqrt(qnorm) if query is not None else 1.0), 1e-30)
        total += lr * part
        check_finite(total, ", ".join(s.layer for s in strategies), ckpt, lr)
    if scan.reduce == "sum" and scan.similarity == "dot" and scan.query is not None:
        total = total * len(scan.query.ids)     # <g, sum_q g_q> = B <g, mean_q g_q>
    if scan.total:
        # sum_i <g_i, G_q> = <sum_i g_i, G_q>: the per-sample pass costs what summing first would
        return pa.table({"train_samples": pa.array([int(seen.sum())], pa.int64()),
                         "score": pa.array([float(total[seen].sum())])})
    return pa.table({"sample_id": pa.array(train[seen]), "score": pa.array(total[seen])})


def check_finite(scores: np.ndarray, layer: str, ckpt: str, lr: float | None = None) -> None:
    """Refuses to return inf or NaN scores: a sum that overflowed says nothing about a sample."""
    if np.isfinite(scores).all():
        return
    n = int((~np.isfinite(scores)).sum())
    where = f"layer {layer} at checkpoint {ckpt}" + ("" if lr is None else f" (weighted by its lr={lr:g})")
    raise InvalidInputException(
        f"{n} scores of {where} are not finite (inf or NaN): the factors or weights overflow a double; "
        "check the model's weights and inputs for huge values, or leave this layer/checkpoint out")


def query_sides(scan: InfluenceScan, store, ckpt: str, strategies: list[Strategy],
                device: str = "cpu", catalog=None, with_gbar: bool = False, keep=()) -> dict[str, dict]:
    """Replays the query samples at the checkpoint; per layer what its chosen strategy needs (and
    the average gradient when `with_gbar`: pruning bounds scores by its norm; the replayed factors
    themselves, under "replayed", for the layers in `keep`: a two-phase TOPK rescores with them)."""
    catalog = catalog if catalog is not None else catalog_of(Context(store, FunctionRegistry()))
    model, task = store.model_at(ckpt), task_at(store, ckpt)
    modules = watched_modules(model, scan.layers)
    ids = scan.query.ids
    if scan.query.inputs is not None:   # tensors the caller passed (con.influence), not registered
        factors = replay_factors(model, modules, scan.query.inputs, scan.query.targets, scan.loss, task=task)
    else:
        # the query side's loss is the checkpoint's task's, read as scan.loss says
        targets = task.stored_targets(store, ids, scan.loss)
        factors = stored_replay_factors(store, model, modules, ids, targets, scan.loss, task=task,
                                        shard_rows=catalog.input_shards)
    out = {}
    for layer in scan.layers:
        meta, _ = catalog.layer_meta(layer)
        needs = needs_of({s.chosen for s in strategies if s.layer == layer})
        side = ops.query_side(kind_named(meta.kind), meta, factors[layer], needs, norm=scan.similarity == "cosine" or with_gbar)
        out[layer] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in side.items()}
        if layer in keep:
            out[layer]["replayed"] = factors[layer]
    return out


def device_of(ctx: Context) -> str:
    """The `device` config, else CUDA when present; results are the same either way."""
    return ctx.config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")


def layer_pass(store, ckpt: str, strat: Strategy, train: np.ndarray, q, scan: InfluenceScan, ctx: Context):
    if ctx.config.get("engine") == "ray":     # the same pass as Ray tasks over the shards (optional extra)
        from metaql.distributed import ray_engine
        if ray_engine.uses_ray(ctx, strat.chosen):
            return ray_engine.layer_pass_ray(store, ckpt, strat, train, q, scan, ctx)
    catalog = catalog_of(ctx)
    meta, stored = catalog.layer_meta(strat.layer)
    kind = kind_named(meta.kind)
    scores, norms, seen = np.zeros(len(train)), np.zeros(len(train)), np.zeros(len(train), bool)
    batches = recomputed_batches(store, ckpt, strat.layer, train) if strategy_named(strat.chosen).replays \
        else (catalog.shard_tensors(row) for row in catalog.factor_shards(ckpt, strat.layer)
              if overlaps(row, train))
    for p, chunk in train_chunks(batches, train, q, strat.chosen, meta, ctx):
        s, nrm = chunk_scores(kind, meta, stored, strat.chosen, chunk, q, scan.similarity)
        scores[p] += s
        norms[p] += nrm
        seen[p] = True
    return scores, norms, seen


def train_chunks(batches, train: np.ndarray, q, strategy: str, meta, ctx: Context):
    """(positions in `train`, tensors on the device) of the requested samples in `batches` of
    (ids, tensors), cut so that one chunk's intermediates stay under CHUNK_NUMBERS."""
    device = device_of(ctx)
    for ids, tensors in batches:
        ctx.check_interrupt()
        # train is sorted: one binary search per shard id finds it and its position (np.isin sorted
        # both sides again on every scan: 0.4 ms of a 0.2 ms scan of digits conv1)
        pos = np.searchsorted(train, ids)
        keep = pos < len(train)
        keep[keep] = train[pos[keep]] == ids[keep]
        if not keep.any():
            continue
        rows = np.nonzero(keep)[0]
        pos = pos[rows]
        step = chunk_rows(tensors, q, strategy, meta)
        for start in range(0, len(rows), step):
            yield pos[start:start + step], {n: rows_of(t, rows[start:start + step]).to(device)
                                            for n, t in tensors.items()}


def overlaps(row: dict, train: np.ndarray) -> bool:
    """False when no id of `train` (sorted) lies in the shard's id range: the shard is not opened."""
    if row.get("min_id") is None or row.get("max_id") is None:
        return True
    lo = np.searchsorted(train, row["min_id"])
    return lo < len(train) and train[lo] <= row["max_id"]


def rows_of(t: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """The given rows of a shard tensor: a view of the mapped file when they are contiguous
    (the usual case: the whole training split), a gathered copy otherwise."""
    if rows[-1] - rows[0] + 1 == len(rows):
        return t[int(rows[0]):int(rows[-1]) + 1]
    return t[torch.from_numpy(rows)]


def recomputed_batches(store, ckpt: str, layer: str, train: np.ndarray, batch: int = 256):
    """The re-compute baseline: factors of the training samples replayed now, not read."""
    model, task = store.model_at(ckpt), task_at(store, ckpt)
    modules = watched_modules(model, [layer])
    # inputs streamed from the store a batch at a time, in the shards' order (callers place rows by id)
    batches = stored_batches(store, train, task.stored_targets(store, train), batch)
    for pos, factors in replay_batches(model, LayerHooks(modules), batches, task=task):
        yield train[pos], factors[layer]


def chunk_rows(tensors: dict, q, strategy: str, meta) -> int:
    """Training samples per chunk so that the largest intermediate stays under CHUNK_NUMBERS."""
    per_sample = sum(int(np.prod(t.shape[1:])) for t in tensors.values())
    per_sample = strategy_named(strategy).extra_numbers(meta, tensors, q, per_sample)
    return max(1, CHUNK_NUMBERS // max(per_sample, 1))


def chunk_scores(kind, meta, stored: str, strategy: str, chunk, q, similarity: str):
    """(scores, squared norms) of one chunk of training samples for one layer."""
    strat = strategy_named(strategy)
    if strat.replays:
        stored, strat = strat.delegate(kind)
        if stored == "full":
            chunk = {"G": kind.full(meta, chunk)}
    if stored == "full":
        g = chunk["G"].float()
        # the squared norms only where asked (cosine, self-influence): a second pass over the
        # gradients, more than the dot product itself costs
        norm = (g * g).sum(1) if (similarity == "cosine" or q is None) else None
        score = norm if q is None else strat.scores(kind, meta, {"G": g}, q)
        return score.double().cpu().numpy(), 0.0 if norm is None else norm.double().cpu().numpy()
    first = next(iter(chunk.values()))
    form = strat.form if strat.self_influence else None
    norm = ops.squared_norm(kind, meta, chunk, form) if (similarity == "cosine" or q is None) \
        else torch.zeros(first.shape[0], device=first.device)
    score = norm if q is None else strat.scores(kind, meta, chunk, q)
    return score.double().cpu().numpy(), norm.double().cpu().numpy()
