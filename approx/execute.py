"""Approximate execution under error=, and the two-phase top-k with its certificate.

Phase 1 scans every training sample as the exact executor does (engine/executor.py: the same
query sides and layer passes), reading projected layers' factors where they are stored so; per
sample it also keeps sigma_i, the bound on its score's standard deviation:
    sigma_i = sum_c lr_c sqrt(sum_l v_l ||g~_il||^2 ||q~_l||^2)     (metaql.approx.projection)
(projected squared norms are unbiased estimates of the exact ones; checkpoints share a layer's
projection, so their errors may correlate and their deviations are added, not their variances).

Layers stored exactly may be scored by the low-rank query sketch (metaql.approx.lowrank) with
the tolerance the projected layers leave (error= minus their largest bound): each score then moves
by at most slack_i = sum_c lr_c sum_l ||X_il|| ||D_il|| ||R_l||, deterministically.

Phase 2 (TOPK): with L_i = s_i - c sigma_i - slack_i and U_i = s_i + c sigma_i + slack_i (c = SIGMAS), tau is the k-th
largest L_i and the candidates are the samples with U_i >= tau: a sample left out is below the
k-th exact score unless its own or another's interval failed. The candidates' projected layers are
rescored exactly (their factors replayed now at each checkpoint, as the re-compute baseline does;
the exact layers' scores are exact already), and the answer is the top k of the candidates. The
certificate bounds what was missed: with t the answer's k-th exact score, a left-out sample is
truly above t with probability at most sigma_i^2 / (sigma_i^2 + (t - s_i - slack_i)^2) (Cantelli), so
    expected_missed <= sum over left-out i of that,   expected recall >= 1 - expected_missed / k.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json

import numpy as np
import pyarrow as pa
import torch

from metaql.approx.kind import base_meta, is_projected
from metaql.approx.projection import spec_variance
from metaql.engine.plan import InfluenceScan, TopK
from metaql.errors import Error
from metaql.storage.catalog_snapshot import catalog_of
from metaql.storage.layers import kind_named

SIGMAS = 3.0            # the candidates' interval half-width, in standard deviations
# the low-rank sketch is tried on a layer whose truncation's estimate is under TRUNCATION_PAYS of
# the exact strategy's, and used where its scan's estimate is then under SKETCH_PAYS of it (a
# clear win only: measured / estimate 0.76-1.88 in benchmarks/sketch_estimate.py's runs)
TRUNCATION_PAYS = 0.5
SKETCH_PAYS = 0.5
METADATA_KEY = b"metaql.approx"


def execute_approximate(plan, ctx) -> pa.Table:
    """An influence scan under error= (or a TOPK over one): the scores, and in the table's schema
    metadata (METADATA_KEY, JSON) the bound and, for a TOPK, the certificate."""
    from metaql.engine import executor
    scan = plan.child if isinstance(plan, TopK) else plan
    catalog = catalog_of(ctx)
    projected = {layer: catalog.layer_meta(layer)[0] for layer in scan.layers}
    projected = {layer: meta for layer, meta in projected.items() if is_projected(meta)}
    bound = max((m.extra["projection"]["error"] for m in projected.values()), default=0.0)
    info = {"error": scan.error, "projected_layers": {l: m.extra["projection"] for l, m in projected.items()},
            "bound": bound, "statement": "relative error of each score (a fraction of ||g_train|| ||g_query||): "
            "random part's standard deviation <= bound (projected layers), deterministic part <= sketch_tolerance "
            "(low-rank query sketch of exact layers); their sum <= error"}
    if scan.query is None or scan.similarity != "dot" or scan.total:
        # cosine, totals, self-influence: projected layers' estimates as the executor scores them
        table = executor.influence(scan, ctx)
        if isinstance(plan, TopK):
            table = executor.top_k(table, plan.k, plan.ascending)
        return with_metadata(table, info, scan)
    route = getattr(plan, "route", None)        # the optimizer's pick over a projected index (approx/route.py)
    if route is not None:
        info["route"] = dataclasses.asdict(route)
        if route.chosen == "exact":
            return with_metadata(exact_topk(plan, ctx, info), info, scan)
    if isinstance(plan, TopK) and not projected:
        from metaql.approx.indexed import indexed_topk
        table = indexed_topk(plan, scan, ctx, info)       # None: no usable projected index
        if table is not None:
            return with_metadata(table, info, scan)
    tolerance = max(0.0, float(scan.error) - bound)
    with measured() as phase1:
        one = phase_one(scan, ctx, projected, tolerance, keep_query=isinstance(plan, TopK))
    info.update(sketch_tolerance=tolerance, sketched_layers=one.sketched, sketch_costs=one.sketch_costs,
                seconds={"phase one": phase1})
    if not isinstance(plan, TopK):
        return with_metadata(pa.table({"sample_id": pa.array(one.ids), "score": pa.array(one.scores)}), info, scan)
    sign = 1.0 if not plan.ascending else -1.0
    cand = candidates(sign * one.scores, SIGMAS * one.sigma + one.slack, plan.k)
    with measured() as phase2:
        if projected:
            phase2["replay_estimate_s"] = rescoring_replay_seconds(scan, ctx, len(cand))
        exact, rescored, why = rescore(scan, ctx, projected, one, cand)
    info["seconds"]["rescoring"] = phase2
    final = one.scores[cand] - one.approx_part[cand] + exact if rescored else one.scores[cand]
    order = np.argsort(-sign * final, kind="stable")[:plan.k]
    info["certificate"] = certificate(sign * one.scores, one.sigma, one.slack, cand, sign * final[order], plan.k,
                                      rescored, why)
    table = pa.table({"sample_id": pa.array(one.ids[cand][order]), "score": pa.array(final[order])})
    return with_metadata(table, info, scan)


@contextlib.contextmanager
def measured():
    """{"seconds", "replayed_samples", "replay_seconds"} of the block, filled in as it ends: its time
    by the cost model's clock and the model replays inside it (storage/replay.py)."""
    from metaql.engine.cost import work_clock
    from metaql.storage.replay import replay_tally
    out: dict = {}
    began = work_clock()
    with replay_tally() as replays:
        try:
            yield out
        finally:
            out.update(seconds=work_clock() - began, replayed_samples=replays.samples,
                       replay_seconds=replays.seconds)


def rescoring_replay_seconds(scan: InfluenceScan, ctx, candidates: int) -> float | None:
    """The rescoring's replays of the candidates at every checkpoint, priced by the line fitted to
    this process's replays of each checkpoint's model (storage/replay.py); None before it has one."""
    from metaql.engine.optimizer import replay_estimate
    catalog = catalog_of(ctx)
    each = [replay_estimate(catalog, ckpt, candidates) for ckpt in scan.checkpoints]
    return None if None in each else sum(each)


def exact_topk(plan: TopK, ctx, info: dict) -> pa.Table:
    """The exact TOPK (pruned where that pays, engine/pruning.py) run where the optimizer found it
    cheaper than the index route; its certificate is that of an exact answer."""
    from metaql.engine import executor
    exact = dataclasses.replace(plan, child=dataclasses.replace(plan.child, error=None))
    table = executor.execute(exact, ctx)
    if hasattr(exact, "pruning"):
        plan.pruning = exact.pruning          # for EXPLAIN ANALYZE
    n = len(plan.child.train.ids)
    info["certificate"] = {"k": int(min(plan.k, n)), "candidates": n, "scanned": n, "sigmas": None, "rescored": True,
                           "expected_missed": 0.0, "recall_bound": 1.0, "exact": True}
    info["statement"] = ("exact TOPK, the optimizer's pick under error= (cheaper than the projected index's two "
                         "phases by their estimates): every score exact and the exact top k")
    return table


def explain_lines(scan: InfluenceScan, analyze: bool, indent: str) -> list[str]:
    """EXPLAIN's lines of an approximate scan: what error= admits; after ANALYZE, what the run
    sketched and the two-phase certificate."""
    lines = [f"{indent}  approximate: error={scan.error:g} (relative error, a fraction of ||g_train|| ||g_query||); "
             "projected layers' bound and a low-rank query sketch of exact layers within it"]
    info = getattr(scan, "approximation", None)
    if analyze and info is not None:
        if info.get("sketched_layers"):
            costs = info.get("sketch_costs", {})
            ranks = ", ".join(f"{k} rank {r}" + (f" (estimate {costs[k]['estimate_s']:.3g}s, measured "
                                                  f"{costs[k]['measured_s']:.3g}s)" if k in costs else "")
                              for k, r in info["sketched_layers"].items())
            lines.append(f"{indent}  sketched (tolerance {info['sketch_tolerance']:.3g}; the exact strategy's "
                         f"measured time is its rescoring of the candidates): {ranks}")
        index = info.get("index")
        if index:
            lines.append(f"{indent}  projected index (k={', '.join(map(str, index['proj_dim']))}): phase 1 scanned {index['indexed']} "
                         f"checkpoint-layers from it, the rest exactly; rescored in {index['rounds']} round(s) "
                         f"until the recall bound reached {index['target_recall']:.3g}")
        cert = info.get("certificate")
        if cert is not None and cert.get("exact"):
            lines.append(f"{indent}  exact TOPK: {cert['scanned']} samples scored exactly, recall 1")
        elif cert is not None:
            lines.append(f"{indent}  two-phase TOPK: {cert['candidates']} candidates of {cert['scanned']} "
                         f"(+-{cert['sigmas']:g} sigma), rescored exactly: {cert['rescored']}, expected missed "
                         f"{_fmt(cert['expected_missed'])}, recall bound {_fmt(cert['recall_bound'])}")
        if info.get("seconds"):
            lines.append(f"{indent}  measured: " + "; ".join(
                f"{step} {s['seconds']:.3g} s (replays: {s['replayed_samples']} samples, {s['replay_seconds']:.3g} s"
                + (_replay_estimate(s) if "replay_estimate_s" in s else "") + ")"
                for step, s in info["seconds"].items()))
    return lines


def _replay_estimate(step: dict) -> str:
    est = step["replay_estimate_s"]
    if est is None:
        return "; no estimate yet"
    return f", estimate {est:.3g} s, measured/estimate {step['replay_seconds'] / est:.3g}" if est > 0 else ""


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def with_metadata(table: pa.Table, info: dict, scan: InfluenceScan | None = None) -> pa.Table:
    if scan is not None:
        scan.approximation = info          # for EXPLAIN ANALYZE, which runs this very plan
    return table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: json.dumps(info)})


@dataclasses.dataclass
class PhaseOne:
    ids: np.ndarray            # the training samples scored
    scores: np.ndarray         # approximate scores
    sigma: np.ndarray          # bound on each score's standard deviation (projected layers)
    slack: np.ndarray          # bound on each score's deterministic error (low-rank query sketch)
    approx_part: np.ndarray    # the approximate layers' part of the scores (rescoring replaces it)
    positions: np.ndarray      # where ids sit in the sorted training side
    queries: dict              # per checkpoint: the query sides (reused by the rescoring)
    sketched: dict             # {checkpoint/layer: rank kept}
    sketch_costs: dict = dataclasses.field(default_factory=dict)   # {ckpt/layer: estimate_s, measured_s, truncation_s}
    replayed: dict = dataclasses.field(default_factory=dict)   # per checkpoint: the query's factors of projected layers


def phase_one(scan: InfluenceScan, ctx, projected: dict, tolerance: float, keep_query: bool = False) -> PhaseOne:
    """Every training sample's approximate score with its error bounds; exact layers whose query
    side truncates to a rank cheaper than their exact strategy are scored by the sketch.
    `keep_query`: the query's replayed factors of the projected layers are kept for the rescoring."""
    from metaql.engine.cost import work_clock
    from metaql.engine.executor import check_finite, device_of, layer_pass, query_sides
    store, catalog = ctx.store, catalog_of(ctx)
    train = np.sort(scan.train.ids)
    # similarity=cosine in the passes only makes them return each sample's squared norm too
    normed = dataclasses.replace(scan, similarity="cosine")
    total, sigma, slack, approx = (np.zeros(len(train)) for _ in range(4))
    seen = np.zeros(len(train), bool)
    queries, replayed, sketched, costs = {}, {}, {}, {}
    for ckpt in scan.checkpoints:
        strategies = [s for s in scan.strategies if s.checkpoint == ckpt]
        lr = catalog.checkpoint(ckpt)["lr"]
        query = queries[ckpt] = query_sides(normed, store, ckpt, strategies, device_of(ctx), catalog,
                                            keep=set(projected) if keep_query else ())
        # out of the query sides: a layer pass (and Ray's tasks) gets only what its strategy reads
        replayed[ckpt] = {layer: query[layer].pop("replayed") for layer in projected if "replayed" in query[layer]}
        part, var, apart, bias = (np.zeros(len(train)) for _ in range(4))
        for strat in strategies:
            q = query[strat.layer]
            if strat.layer in projected:
                s, n2, layer_seen = layer_pass(store, ckpt, strat, train, q, normed, ctx)
                spec = projected[strat.layer].extra["projection"]
                var += spec_variance(spec) * n2 * float((q["gbar_flat"].double() ** 2).sum())
                apart += s
            elif sketch_pays(scan, catalog, strat, q, tolerance):
                began = work_clock()
                s, norms, layer_seen = lowrank_pass(store, catalog, ckpt, strat.layer, train, q, ctx)
                bias += norms * q["residual"]
                apart += s
                sketched[f"{ckpt}/{strat.layer}"] = q["rank"]
                costs[f"{ckpt}/{strat.layer}"] = {"estimate_s": sum(q["sketch_estimate"]),
                                                  "measured_s": q["truncation_s"] + work_clock() - began,
                                                  "truncation_s": q["truncation_s"]}
            else:
                s, _, layer_seen = layer_pass(store, ckpt, strat, train, q, scan, ctx)
            check_finite(s, strat.layer, ckpt)
            part += s
            seen |= layer_seen
        total += lr * part
        sigma += abs(lr) * np.sqrt(var)
        slack += abs(lr) * bias
        approx += lr * apart
    scale = len(scan.query.ids) if scan.reduce == "sum" else 1.0      # <g, sum_q g_q> = B <g, mean_q g_q>
    return PhaseOne(train[seen], total[seen] * scale, sigma[seen] * scale, slack[seen] * scale,
                    approx[seen] * scale, np.nonzero(seen)[0], queries, sketched, costs, replayed)


def sketch_seconds(scan: InfluenceScan, catalog, strat, rank: int | None) -> tuple[float, float]:
    """(the sketch's scan at `rank`, 0 without one; its truncation) estimated for the layer. The
    sketch is never timed by calibration, but it reads the rows as batch_average does: its scan is
    batch_average's estimate of the layer (the layer's own fit where calibrated) scaled by the ratio
    of the two formulas' scans at the machine's constants (approx.lowrank.estimate); the truncation
    is priced at those constants."""
    from metaql.approx.lowrank import estimate, truncation_estimate
    from metaql.engine import cost
    from metaql.engine.optimizer import layer_shapes
    from metaql.engine.strategies import STRATEGIES
    consts = catalog.cost_constants(cost.measure_constants)
    sh = layer_shapes(scan, catalog, strat.checkpoint, strat.layer)
    truncation = cost.plain_seconds(truncation_estimate(sh), consts)
    if rank is None:
        return 0.0, truncation
    plain_average, _ = cost.split(STRATEGIES["batch_average"].estimate, sh, consts)
    average = strat.estimates.get("batch_average", {}).get("seconds")
    if average is None or plain_average <= 0:
        average = plain_average = 1.0         # no batch_average for the layer: the sketch's own pricing
    return average * cost.plain_seconds(estimate(sh, rank), consts) / plain_average, truncation


def sketch_pays(scan: InfluenceScan, catalog, strat, q, tolerance: float) -> bool:
    """Whether the layer is scored by the low-rank query sketch: stored factored, of a dense kind,
    a tolerance left by the projected layers, a truncation cheap beside the exact strategy, and a
    kept rank whose scan is well under the exact strategy's, by their estimates (sketch_seconds;
    kept in q for the result's metadata)."""
    from metaql.approx.lowrank import STRATEGY, truncated
    from metaql.engine.cost import work_clock
    meta, stored = catalog.layer_meta(strat.layer)
    if tolerance <= 0 or stored != "factored" or not STRATEGY.applies_to(kind_named(meta.kind)) or "gbar" not in q:
        return False
    exact = strat.estimates.get(strat.chosen, {}).get("seconds", 0.0)
    if sketch_seconds(scan, catalog, strat, None)[1] >= TRUNCATION_PAYS * exact:
        return False      # the truncation's eigenproblem would cost more than the sketch could save
    q["tolerance"] = tolerance
    began = work_clock()
    truncated(q, meta)
    q["truncation_s"] = work_clock() - began
    q["sketch_estimate"] = sketch_seconds(scan, catalog, strat, q["rank"])
    return q["sketch_estimate"][0] < SKETCH_PAYS * exact


def lowrank_pass(store, catalog, ckpt: str, layer: str, train: np.ndarray, q, ctx):
    """(scores, bounds on ||g_i||, seen) of the training side by the low-rank query sketch."""
    from metaql.approx.lowrank import STRATEGY
    from metaql.engine.executor import overlaps, train_chunks
    meta, _ = catalog.layer_meta(layer)
    kind = kind_named(meta.kind)
    scores, norms, seen = np.zeros(len(train)), np.zeros(len(train)), np.zeros(len(train), bool)
    batches = (catalog.shard_tensors(row) for row in catalog.factor_shards(ckpt, layer) if overlaps(row, train))
    for p, chunk in train_chunks(batches, train, q, STRATEGY.name, meta, ctx):
        with torch.no_grad():
            s, nrm = STRATEGY.scores_and_norms(kind, meta, chunk, q)
        scores[p] += s.double().cpu().numpy()
        norms[p] += nrm.double().cpu().numpy()
        seen[p] = True
    return scores, norms, seen


def candidates(scores: np.ndarray, half: np.ndarray, k: int) -> np.ndarray:
    """Indices whose interval (scores +- half) reaches the k-th largest lower end (at least k of them)."""
    k = min(k, len(scores))
    lower, upper = scores - half, scores + half
    tau = np.partition(lower, len(lower) - k)[len(lower) - k]
    return np.nonzero(upper >= tau)[0]


def rescore(scan: InfluenceScan, ctx, projected: dict, one: PhaseOne, cand: np.ndarray):
    """(exact scores of the approximate layers' part for the candidates, True, ''): projected
    layers from factors replayed now at each checkpoint, sketched layers from their stored exact
    factors against the full query side; (None, False, why) when the store cannot replay them."""
    out = np.zeros(len(cand))
    ids = one.ids[cand]
    if projected:
        try:
            out += replayed_scores(scan, ctx, projected, ids, one.replayed)
        except Error as e:
            return None, False, f"{type(e).__name__}: {e}"
    out += sketched_exact(scan, ctx, one, ids)
    return out, True, ""


def sketched_exact(scan: InfluenceScan, ctx, one: PhaseOne, ids: np.ndarray) -> np.ndarray:
    """The exact scores of the sketched layers for `ids` (their chosen exact strategy, same query side)."""
    from metaql.engine.executor import layer_pass
    catalog = catalog_of(ctx)
    order = np.argsort(ids)
    train = ids[order]
    out = np.zeros(len(ids))
    for strat in scan.strategies:
        if f"{strat.checkpoint}/{strat.layer}" in one.sketched:
            s, _, _ = layer_pass(ctx.store, strat.checkpoint, strat, train, one.queries[strat.checkpoint][strat.layer],
                                 scan, ctx)
            out[order] += catalog.checkpoint(strat.checkpoint)["lr"] * s
    return out * (len(scan.query.ids) if scan.reduce == "sum" else 1.0)


def replayed_scores(scan: InfluenceScan, ctx, projected: dict, ids: np.ndarray, kept: dict | None = None
                    ) -> np.ndarray:
    """Exact scores of the projected layers for `ids`, from factors replayed at each checkpoint;
    the query side's factors from phase one's replay where `kept` (PhaseOne.replayed) holds them."""
    from metaql.storage.hooks import watched_modules
    from metaql.storage.replay import stored_replay_factors
    from metaql.storage.tasks import task_at
    store, catalog = ctx.store, catalog_of(ctx)
    out = np.zeros(len(ids))
    for ckpt in scan.checkpoints:
        model, task = store.model_at(ckpt), task_at(store, ckpt)
        modules = watched_modules(model, list(projected))
        train = stored_replay_factors(store, model, modules, ids, task.stored_targets(store, ids), task=task)
        query = (kept or {}).get(ckpt, {})
        if not all(layer in query for layer in projected):
            query = _query_replayed(scan, store, model, modules, task)
        part = np.zeros(len(ids))
        for layer, meta in projected.items():
            base = base_meta(meta)
            kind = kind_named(base.kind)
            with torch.no_grad():
                gbar = kind.average_of(base, query[layer])
                part += kind.average_scores(base, train[layer], gbar).double().numpy()
        out += catalog.checkpoint(ckpt)["lr"] * part
    return out * (len(scan.query.ids) if scan.reduce == "sum" else 1.0)


def _query_replayed(scan: InfluenceScan, store, model, modules, task) -> dict:
    """The query samples' factors at the model's weights, replayed now."""
    from metaql.storage.replay import replay_factors, stored_replay_factors
    if scan.query.inputs is not None:
        return replay_factors(model, modules, scan.query.inputs, scan.query.targets, scan.loss, task=task)
    qids = scan.query.ids
    return stored_replay_factors(store, model, modules, qids, task.stored_targets(store, qids, scan.loss),
                                 scan.loss, task=task)


def certificate(scores, sigma, slack, cand, top: np.ndarray, k: int, rescored: bool, why: str) -> dict:
    """What the two phases guarantee (module docstring); scores and top are signed so that larger
    is better."""
    cert = {"k": int(min(k, len(scores))), "candidates": int(len(cand)), "scanned": int(len(scores)),
            "sigmas": SIGMAS, "rescored": rescored}
    if not rescored:
        cert.update(expected_missed=None, recall_bound=None,
                    note=f"candidates not rescored exactly ({why}); scores and ranking are estimates")
        return cert
    out = np.ones(len(scores), bool)
    out[cand] = False
    t = float(top[-1]) if len(top) else float("inf")
    gap, s2 = t - scores[out] - slack[out], sigma[out] ** 2     # the deterministic error moves the score at most slack
    p = np.where(gap > 0, s2 / np.maximum(s2 + gap ** 2, 1e-300), 1.0)
    missed = float(p.sum())
    cert.update(expected_missed=missed, recall_bound=max(0.0, 1.0 - missed / max(cert["k"], 1)))
    return cert
