"""INFLUENCE and SELF_INFLUENCE: the engine's built-in table functions.

Both build an `InfluenceScan` plan node (so EXPLAIN shows the optimizer's per-layer choice) and run
it. A negative score against a batch of query samples means the training sample pushes their loss
up: mislabeled and harmful samples sort first in ASC order.
"""
from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import pyarrow as pa

from metaql.errors import BinderException, CatalogException, InvalidInputException, Warning

from metaql.engine.functions import CheckpointList, LayerList, SampleRef, table_function
from metaql.engine.plan import InfluenceScan, Side
from metaql.storage.catalog import require_name
from metaql.storage.losses import LOSS_TARGETS

SIMILARITIES = ("dot", "cosine")
COLUMNS = [("sample_id", "BIGINT"), ("score", "DOUBLE")]
TOTAL_COLUMNS = [("train_samples", "BIGINT"), ("score", "DOUBLE")]     # INFLUENCE(..., total=true)


def influence_plan(ctx, layers=("*",), query=None, train="train", checkpoints="all",
                   similarity="dot", loss="label", total=False) -> InfluenceScan:
    if query is None:
        raise BinderException("INFLUENCE needs query=point(id) or query=batch(set)")
    if similarity not in SIMILARITIES:
        raise BinderException(f"similarity must be one of {', '.join(SIMILARITIES)}, not '{similarity}'")
    if loss not in LOSS_TARGETS:
        raise BinderException(f"loss must be one of {', '.join(LOSS_TARGETS)}, not '{loss}'")
    if total and similarity == "cosine":
        raise BinderException("total=true sums dot products; the cosine of a summed gradient is not a sum "
                              "of cosines: use similarity=dot")
    store = ctx.store
    return InfluenceScan(train=resolve_side(store, train, "train"), query=resolve_side(store, query, "query"),
                         layers=resolve_layers(store, layers), checkpoints=resolve_checkpoints(store, checkpoints),
                         similarity=similarity, loss=loss, total=bool(total))


def self_influence_plan(ctx, layers=("*",), train="train", checkpoints="all") -> InfluenceScan:
    store = ctx.store
    return InfluenceScan(train=resolve_side(store, train, "train"), query=None,
                         layers=resolve_layers(store, layers), checkpoints=resolve_checkpoints(store, checkpoints))


def _run(ctx, scan: InfluenceScan) -> pa.Table:
    from metaql.engine.executor import execute
    from metaql.engine.optimizer import optimize
    return execute(optimize(scan, ctx.store, ctx.config), ctx)


@table_function("INFLUENCE", COLUMNS, logical=influence_plan, alternatives=[TOTAL_COLUMNS])
def influence(ctx, *, query: SampleRef, layers: LayerList = ("*",), train: SampleRef = "train",
              checkpoints: CheckpointList = "all", similarity: Literal["dot", "cosine"] = "dot",
              loss: Literal["label", "pred", "expected"] = "label", total: bool = False) -> pa.Table:
    """Influence of each training sample on a query sample or batch: the inner product (dot) or
    cosine of their loss gradients, summed over the layers and over checkpoints weighted by each
    checkpoint's learning rate. Negative: the training sample raises the query's loss.
    total=true returns one row, the training side's summed influence (B2P/B2B)."""
    return _run(ctx, influence_plan(ctx, layers, query, train, checkpoints, similarity, loss, total))


@table_function("SELF_INFLUENCE", COLUMNS, logical=self_influence_plan)
def self_influence(ctx, layers: LayerList = ("*",), train: SampleRef = "train",
                   checkpoints: CheckpointList = "all") -> pa.Table:
    """Squared gradient norm of each training sample (summed over layers, lr-weighted over
    checkpoints), from the factors only. High: the sample is hard, rare or mislabeled."""
    return _run(ctx, self_influence_plan(ctx, layers, train, checkpoints))


def resolve_side(store, ref, role: str) -> Side:
    if not isinstance(ref, SampleRef):
        ref = SampleRef("batch", ref)
    if ref.mode == "point":
        try:
            sid = int(ref.value)
        except (TypeError, ValueError):
            raise BinderException(f"point() takes a sample id, not '{ref.value}'") from None
        if store.sql("SELECT count(*) FROM samples WHERE sample_id = ?", [sid]).fetchone()[0] == 0:
            raise CatalogException(f"sample {sid} is not registered")
        return Side("point", np.array([sid], dtype=np.int64), str(ref))
    if ref.mode != "batch":
        raise BinderException(f"the {role} side must be point(id) or batch(set), not {ref.mode}()")
    ids = store.set_ids(str(ref.value))
    if len(ids) == 0:
        raise InvalidInputException(f"set '{ref.value}' is empty: the {role} side has no samples")
    return Side("batch", ids, str(ref))


def resolve_layers(store, layers) -> list[str]:
    known = [l["name"] for l in store.layers()]
    if not known:
        raise CatalogException("the store has no captured layers yet; capture some with con.capture(...)")
    if layers in ("*", ("*",), ["*"]) or layers is None:
        return known
    names = [layers] if isinstance(layers, str) else list(layers)
    for n in names:
        require_name("layer", n, known)
    return names


def resolve_checkpoints(store, checkpoints) -> list[str]:
    """Checkpoint names for `all`, `last`, one name or a list. A checkpoint whose capture did not
    finish (killed, or still running in another process) holds factors for only some samples, so it
    is never scored: `all` and `last` leave it out with a warning, naming it is an error."""
    rows = store.checkpoints()
    known = [c["name"] for c in rows]
    if not known:
        raise CatalogException("the store has no checkpoints yet; capture one with con.capture(...)")
    unfinished = {c["name"]: c["status"] for c in rows if c["status"] != "complete"}
    if checkpoints in ("all", None, "last", "first"):
        complete = [n for n in known if n not in unfinished]
        if not complete:
            raise InvalidInputException(f"no checkpoint is complete ({_unfinished_text(unfinished)}); "
                                        "finish or resume the capture (run it again) before querying")
        picked = {"last": complete[-1:], "first": complete[:1]}.get(checkpoints, complete)
        if any(n in unfinished for n in known if checkpoints in ("all", None)
               or (checkpoints == "last" and n == known[-1]) or (checkpoints == "first" and n == known[0])):
            warnings.warn(f"left out {_unfinished_text(unfinished)}: scores use the complete checkpoints "
                          f"({', '.join(picked)}); run the same capture again to resume", Warning, stacklevel=2)
        # `first` with `last` compares the start and the end of training in one JOIN
        return picked
    names = [checkpoints] if isinstance(checkpoints, str) else [str(c) for c in checkpoints]
    for n in names:
        require_name("checkpoint", n, known)
        if n in unfinished:
            raise InvalidInputException(f"checkpoint '{n}' is {unfinished[n]}: its capture did not finish, so it "
                                        "holds factors for only some samples; resume it (run the same capture "
                                        "again) before querying it")
    return names


def _unfinished_text(unfinished: dict[str, str]) -> str:
    return ", ".join(f"checkpoint '{n}' ({status})" for n, status in unfinished.items())
