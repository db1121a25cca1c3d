"""Approximate execution under error=, and the two-phase top-k with its certificate.

Phase 1 scans every training sample as the exact executor does (engine/executor.py: the same
query sides and layer passes), reading projected layers' factors where they are stored so; per
sample it also keeps sigma_i, the bound on its score's standard deviation:
    sigma_i = sum_c lr_c sqrt(sum_l v_l ||g~_il||^2 ||q~_l||^2)     (metaql.approx.projection)
(projected squared norms are unbiased estimates of the exact ones; checkpoints share a layer's
projection, so their errors may correlate and their deviations are added, not their variances).

Phase 2 (TOPK): with L_i = s_i - c sigma_i and U_i = s_i + c sigma_i (c = SIGMAS), tau is the k-th
largest L_i and the candidates are the samples with U_i >= tau: a sample left out is below the
k-th exact score unless its own or another's interval failed. The candidates' projected layers are
rescored exactly (their factors replayed now at each checkpoint, as the re-compute baseline does;
the exact layers' scores are exact already), and the answer is the top k of the candidates. The
certificate bounds what was missed: with t the answer's k-th exact score, a left-out sample is
truly above t with probability at most sigma_i^2 / (sigma_i^2 + (t - s_i)^2) (Cantelli), so
    expected_missed <= sum over left-out i of that,   expected recall >= 1 - expected_missed / k.
"""
from __future__ import annotations

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
METADATA_KEY = b"metaql.approx"


def execute_approximate(plan, ctx) -> pa.Table:
    """An influence scan under error= (or a TOPK over one): the scores, and in the table's schema
    metadata (METADATA_KEY, JSON) the bound and, for a TOPK, the certificate."""
    from metaql.engine import executor
    scan = plan.child if isinstance(plan, TopK) else plan
    catalog = catalog_of(ctx)
    projected = {layer: catalog.layer_meta(layer)[0] for layer in scan.layers}
    projected = {layer: meta for layer, meta in projected.items() if is_projected(meta)}
    info = {"error": scan.error, "projected_layers": {l: m.extra["projection"] for l, m in projected.items()},
            "bound": max((m.extra["projection"]["error"] for m in projected.values()), default=0.0),
            "statement": "relative error of each score: root mean square <= bound, "
                         "as a fraction of ||g_train|| ||g_query||"}
    two_phase = isinstance(plan, TopK) and scan.query is not None and scan.similarity == "dot" \
        and not scan.total and projected
    if not two_phase:     # cosine, totals, self-influence, no projected layer: scores as the executor gives them
        table = executor.influence(scan, ctx)
        if isinstance(plan, TopK):
            table = executor.top_k(table, plan.k, plan.ascending)
        return with_metadata(table, info)
    ids, scores, sigma, proj_part = phase_one(scan, ctx, projected)
    sign = 1.0 if not plan.ascending else -1.0
    cand = candidates(sign * scores, sigma, plan.k)
    exact, rescored, why = rescore(scan, ctx, projected, ids[cand])
    final = scores[cand] - proj_part[cand] + exact if rescored else scores[cand]
    order = np.argsort(-sign * final, kind="stable")[:plan.k]
    info["certificate"] = certificate(sign * scores, sigma, cand, sign * final[order], plan.k, rescored, why)
    table = pa.table({"sample_id": pa.array(ids[cand][order]), "score": pa.array(final[order])})
    return with_metadata(table, info)


def with_metadata(table: pa.Table, info: dict) -> pa.Table:
    return table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: json.dumps(info)})


def phase_one(scan: InfluenceScan, ctx, projected: dict):
    """(training ids, approximate scores, sigma, the projected layers' part of the scores)."""
    from metaql.engine.executor import check_finite, device_of, layer_pass, query_sides
    store, catalog = ctx.store, catalog_of(ctx)
    train = np.sort(scan.train.ids)
    # similarity=cosine in the passes only makes them return each sample's squared norm too
    normed = dataclasses.replace(scan, similarity="cosine")
    total, sigma, proj = np.zeros(len(train)), np.zeros(len(train)), np.zeros(len(train))
    seen = np.zeros(len(train), bool)
    for ckpt in scan.checkpoints:
        strategies = [s for s in scan.strategies if s.checkpoint == ckpt]
        lr = catalog.checkpoint(ckpt)["lr"]
        query = query_sides(normed, store, ckpt, strategies, device_of(ctx), catalog)
        part, var, ppart = np.zeros(len(train)), np.zeros(len(train)), np.zeros(len(train))
        for strat in strategies:
            q = query[strat.layer]
            s, n2, layer_seen = layer_pass(store, ckpt, strat, train, q, scan, ctx) if strat.layer not in projected \
                else layer_pass(store, ckpt, strat, train, q, normed, ctx)
            check_finite(s, strat.layer, ckpt)
            part += s
            seen |= layer_seen
            if strat.layer in projected:
                spec = projected[strat.layer].extra["projection"]
                qn2 = float((q["gbar_flat"].double() ** 2).sum())
                var += spec_variance(spec) * n2 * qn2
                ppart += s
        total += lr * part
        sigma += abs(lr) * np.sqrt(var)
        proj += lr * ppart
    scale = len(scan.query.ids) if scan.reduce == "sum" else 1.0      # <g, sum_q g_q> = B <g, mean_q g_q>
    return train[seen], total[seen] * scale, sigma[seen] * scale, proj[seen] * scale


def candidates(scores: np.ndarray, sigma: np.ndarray, k: int) -> np.ndarray:
    """Indices whose interval reaches the k-th largest lower end (at least k of them)."""
    k = min(k, len(scores))
    lower, upper = scores - SIGMAS * sigma, scores + SIGMAS * sigma
    tau = np.partition(lower, len(lower) - k)[len(lower) - k]
    return np.nonzero(upper >= tau)[0]


def rescore(scan: InfluenceScan, ctx, projected: dict, ids: np.ndarray):
    """(exact scores of the projected layers for `ids`, True, '') from factors replayed at each
    checkpoint; (None, False, why) when the store cannot replay them (no inputs, no model)."""
    from metaql.storage.hooks import watched_modules
    from metaql.storage.replay import replay_factors, stored_replay_factors
    from metaql.storage.tasks import task_at
    store, catalog = ctx.store, catalog_of(ctx)
    out = np.zeros(len(ids))
    try:
        for ckpt in scan.checkpoints:
            model, task = store.model_at(ckpt), task_at(store, ckpt)
            modules = watched_modules(model, list(projected))
            train = stored_replay_factors(store, model, modules, ids, task.stored_targets(store, ids), task=task)
            if scan.query.inputs is not None:
                query = replay_factors(model, modules, scan.query.inputs, scan.query.targets, scan.loss, task=task)
            else:
                qids = scan.query.ids
                query = stored_replay_factors(store, model, modules, qids, task.stored_targets(store, qids, scan.loss),
                                              scan.loss, task=task)
            part = np.zeros(len(ids))
            for layer, meta in projected.items():
                base = base_meta(meta)
                kind = kind_named(base.kind)
                with torch.no_grad():
                    gbar = kind.average_of(base, query[layer])
                    part += kind.average_scores(base, train[layer], gbar).double().numpy()
            out += catalog.checkpoint(ckpt)["lr"] * part
    except Error as e:
        return None, False, f"{type(e).__name__}: {e}"
    scale = len(scan.query.ids) if scan.reduce == "sum" else 1.0
    return out * scale, True, ""


def certificate(scores, sigma, cand, top: np.ndarray, k: int, rescored: bool, why: str) -> dict:
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
    gap, s2 = t - scores[out], sigma[out] ** 2
    p = np.where(gap > 0, s2 / np.maximum(s2 + gap ** 2, 1e-300), 1.0)
    missed = float(p.sum())
    cert.update(expected_missed=missed, recall_bound=max(0.0, 1.0 - missed / max(cert["k"], 1)))
    return cert
