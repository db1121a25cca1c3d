"""INFLUENCE and SELF_INFLUENCE: the engine's built-in table functions.

Both build an `InfluenceScan` plan node (so EXPLAIN shows the optimizer's per-layer choice) and run
it. A negative score against a batch of query samples means the training sample pushes their loss
up: mislabeled and harmful samples sort first in ASC order.
"""
from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import pyarrow as pa

from metaql.errors import BinderException, InvalidInputException
from metaql.engine.functions import CheckpointList, LayerList, Range, SampleRef, table_function
from metaql.engine.matrix import DIRECTIONS, MATRIX_COLUMNS, TOPK_COLUMNS, InfluenceMatrix
from metaql.engine.plan import InfluenceScan, Side
from metaql.storage.catalog_snapshot import catalog_of
from metaql.storage.losses import LOSS_TARGETS

SIMILARITIES = ("dot", "cosine")
REDUCTIONS = ("mean", "sum")
COLUMNS = [("sample_id", "BIGINT"), ("score", "DOUBLE")]
TOTAL_COLUMNS = [("train_samples", "BIGINT"), ("score", "DOUBLE")]     # INFLUENCE(..., total=true)


# k as torch.topk takes it: an int32, so at most 2**31 - 1 (shown [1, 2_147_483_647])
TOPK_RANGE = Range(1, 2 ** 31 - 1)
ERROR_RANGE = Range(0, 1, open_low=True)      # the relative error's RMS an approximation may reach


def check_error(catalog, layers, error) -> None:
    from metaql.approx.bound import check_error as check
    check(catalog, layers, error)


def influence_plan(ctx, layers=("*",), query=None, train="train", checkpoints="all",
                   similarity="dot", loss="label", total=False, reduce="mean", topk=None,
                   direction="proponents", error=None) -> InfluenceScan:
    if query is None:
        raise BinderException("INFLUENCE needs query=point(id), query=batch(set) or query=each(set)")
    each = getattr(query, "mode", None) == "each"
    check_matrix_arguments(each, total, topk, direction)
    if similarity not in SIMILARITIES:
        raise BinderException(f"similarity must be one of {', '.join(SIMILARITIES)}, not '{similarity}'")
    if loss not in LOSS_TARGETS:
        raise BinderException(f"loss must be one of {', '.join(LOSS_TARGETS)}, not '{loss}'")
    if reduce not in REDUCTIONS:
        raise BinderException(f"reduce must be one of {', '.join(REDUCTIONS)}, not '{reduce}'")
    if total and similarity == "cosine":
        raise BinderException("total=true sums dot products; the cosine of a summed gradient is not a sum "
                              "of cosines: use similarity=dot")
    catalog = catalog_of(ctx)
    query = query if isinstance(query, Side) else resolve_side(catalog, query, "query")
    layers = resolve_layers(catalog, layers)
    check_error(catalog, layers, error)
    train, checkpoints = resolve_side(catalog, train, "train"), resolve_checkpoints(catalog, checkpoints)
    require_stored_factors(catalog, train, layers, checkpoints)
    if each:
        return InfluenceMatrix(train=train, query=query, layers=layers, checkpoints=checkpoints,
                               similarity=similarity, loss=loss, reduce=reduce, topk=topk, direction=direction)
    return InfluenceScan(train=train, query=query, layers=layers, checkpoints=checkpoints,
                         similarity=similarity, loss=loss, total=bool(total), reduce=reduce, error=error)


def require_stored_factors(catalog, train: Side, layers: list[str], checkpoints: list[str]) -> None:
    """Scores come from the training side's stored factors, and a sample without them has no row:
    a side none of whose samples was captured (a test set, a split never trained on) would answer
    with no rows and no word why. A shard's id range that holds none of the side's ids rules it out;
    an unknown range does not."""
    ids = np.sort(np.asarray(train.ids))
    for ckpt in checkpoints:
        for layer in layers:
            for row in catalog.factor_shards(ckpt, layer):
                lo, hi = row.get("min_id"), row.get("max_id")
                if lo is None or hi is None or np.searchsorted(ids, lo) < np.searchsorted(ids, hi, side="right"):
                    return
    name = train.label[len("batch("):-1] if train.label.startswith("batch(") else None
    where = f"samples='{name}'" if name else "samples=<a set holding them>"
    raise InvalidInputException(
        f"no factors are stored for the training side {train.label} ({len(ids)} samples) at checkpoint(s) "
        f"{', '.join(checkpoints)} for layer(s) {', '.join(layers)}: scores are computed from the factors "
        f"captured in training, so rank the set that was captured, or store these samples' factors first "
        f"with con.replay('<checkpoint>', {where})")


def check_matrix_arguments(each: bool, total, topk, direction) -> None:
    """What only the train x query matrix (query=each(set)) takes, and what it refuses."""
    if not each:
        if topk is not None:
            raise BinderException("topk= keeps the k strongest training samples per query sample: use it with "
                                  "query=each(set); for one ranking write SELECT TOPK(n) train FROM INFLUENCE(...)")
        if direction != "proponents":       # the default; anything else would be ignored without a word
            raise BinderException(f"direction={direction!s:.40} chooses which k per query sample topk= keeps, with "
                                  "query=each(set); for one ranking order the scores: SELECT TOPK(n) train FROM "
                                  "INFLUENCE(...) ORDER BY ASC (opponents) or DESC (proponents)")
        return
    if total:
        raise BinderException("total=true sums over the training side, one row; with query=each(set) write "
                              "SELECT query_id, sum(score) FROM INFLUENCE(..., query=each(set)) GROUP BY query_id")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk not in TOPK_RANGE):
        raise BinderException(f"topk= should be positive: a whole number in {TOPK_RANGE}, not {topk!r:.40}")
    if direction not in DIRECTIONS:
        raise BinderException(f"direction= should be one of {', '.join(DIRECTIONS)}, not {direction!r:.40}")


def self_influence_plan(ctx, layers=("*",), train="train", checkpoints="all", error=None) -> InfluenceScan:
    catalog = catalog_of(ctx)
    layers = resolve_layers(catalog, layers)
    check_error(catalog, layers, error)
    train, checkpoints = resolve_side(catalog, train, "train"), resolve_checkpoints(catalog, checkpoints)
    require_stored_factors(catalog, train, layers, checkpoints)
    return InfluenceScan(train=train, query=None, layers=layers, checkpoints=checkpoints, error=error)


def _run(ctx, scan: InfluenceScan) -> pa.Table:
    from metaql.engine.executor import execute
    from metaql.engine.optimizer import optimize
    return execute(optimize(scan, catalog_of(ctx), ctx.config), ctx)


@table_function("INFLUENCE", COLUMNS, logical=influence_plan,
                alternatives=[TOTAL_COLUMNS, MATRIX_COLUMNS, TOPK_COLUMNS])
def influence(ctx, *, query: SampleRef, layers: LayerList = ("*",), train: SampleRef = "train",
              checkpoints: CheckpointList = "all", similarity: Literal["dot", "cosine"] = "dot",
              loss: Literal["label", "pred", "expected"] = "label", total: bool = False,
              reduce: Literal["mean", "sum"] = "mean", topk: Annotated[int, TOPK_RANGE] = None,
              direction: Literal["proponents", "opponents", "both"] = "proponents",
              error: Annotated[float, ERROR_RANGE] = None) -> pa.Table:
    """Influence of each training sample on a query sample or batch: the inner product (dot) or
    cosine of their loss gradients, summed over the layers and over checkpoints weighted by each
    checkpoint's learning rate. Negative: the training sample raises the query's loss.
    A batch's gradient is its samples' mean (reduce=mean) or sum (reduce=sum: the sum of the
    per-query scores, captum's and TRAK's convention; cosine is the same either way).
    total=true returns one row, the training side's summed influence (B2P/B2B).
    query=each(set): the train x query matrix (query_id, sample_id, score), every query sample
    scored apart in one scan; with topk=k only each query sample's k proponents (highest scores),
    opponents (lowest) or both (direction=), ranked (rank, role), without the whole matrix.
    error=e allows approximation (layers stored projected, a low-rank sketch of the query side)
    whose relative error's root mean square stays within e (README "Approximation"); without it
    every score is exact and a layer stored projected is refused."""
    return _run(ctx, influence_plan(ctx, layers, query, train, checkpoints, similarity, loss, total, reduce,
                                    topk, direction, error))


@table_function("SELF_INFLUENCE", COLUMNS, logical=self_influence_plan)
def self_influence(ctx, layers: LayerList = ("*",), train: SampleRef = "train",
                   checkpoints: CheckpointList = "all", error: Annotated[float, ERROR_RANGE] = None) -> pa.Table:
    """Squared gradient norm of each training sample (summed over layers, lr-weighted over
    checkpoints), from the factors only. High: the sample is hard, rare or mislabeled. error=e
    admits layers stored projected (their squared norms are unbiased estimates), as INFLUENCE."""
    return _run(ctx, self_influence_plan(ctx, layers, train, checkpoints, error))


def resolve_side(catalog, ref, role: str) -> Side:
    """The sample ids of point(id) or batch(set), from the statement's catalog snapshot."""
    if not isinstance(ref, SampleRef):
        ref = SampleRef("batch", ref)
    if ref.mode == "point":
        try:
            sid = int(ref.value)
        except (TypeError, ValueError):
            raise BinderException(f"point() takes a sample id, not '{ref.value}'") from None
        catalog.require_sample(sid)
        return Side("point", np.array([sid], dtype=np.int64), str(ref))
    if ref.mode == "each" and role != "query":
        raise BinderException(f"each(set) scores every query sample apart; the {role} side is a set: "
                              f"write {role}=batch({ref.value}) or {role}={ref.value}")
    if ref.mode not in ("batch", "each"):
        raise BinderException(f"the {role} side must be point(id), batch(set) or each(set), not {ref.mode}()")
    ids = catalog.set_ids(str(ref.value))
    if len(ids) == 0:
        raise InvalidInputException(f"set '{ref.value}' is empty: the {role} side has no samples")
    return Side(ref.mode, ids, str(ref))


def resolve_layers(catalog, layers) -> list[str]:
    return catalog.layer_names(layers)


def resolve_checkpoints(catalog, checkpoints) -> list[str]:
    """Checkpoint names for `all`, `last`, `first`, one name or a list (CatalogSnapshot.checkpoint_names)."""
    return catalog.checkpoint_names(checkpoints)
