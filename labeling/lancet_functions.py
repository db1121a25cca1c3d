"""The LANCET table functions: what to label next, every sample's label, and whether to stop.

    SELECT * FROM LANCET_CANDIDATES(pool=unlabeled, budget=20);
    INSERT INTO labels VALUES (17, 3, 'ana', now());          -- or con.label([17], [3], by='ana')
    SELECT * FROM LANCET(pool=unlabeled);
    SELECT * FROM LANCET_STATUS(pool=unlabeled);

Human labels come from the catalog table `labels`; the pool's inputs from the store. A round
(training, propagation, OWA) runs when the pool's labeled set has changed and is cached under
the store's artifacts (kind 'lancet', named after the pool), keyed by the labeled set's content
and the round's configuration, so repeated calls and a reopened store reuse it; a new labeled set
continues training the most recent cached model of the same configuration.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import torch

from metaql.errors import InvalidInputException, IOException, Warning as MetaQLWarning
from metaql.engine.functions import ColumnName, Range, SetName, table_function
from metaql.storage.labels import add_labels, read_labels, whole_numbers
from metaql.labeling.augment import check_mode
from metaql.labeling.dmn import OWAConfig
from metaql.labeling.embedding import TrainConfig
from metaql.labeling.lancet import LancetConfig, check_budget
from metaql.labeling.session import LabelingSession, config_to_json
from metaql.storage.artifacts import is_saved, saved_at, warn_not_saved
from metaql.storage.catalog_snapshot import catalog_of

# The arguments' bounds, checked at bind time: far above real use, low enough that no statement
# asks for days of training.
Budget = Annotated[int, Range(1, 1_000_000)]
Classes = Annotated[int, Range(0, 100_000)]
Steps = Annotated[int, Range(1, 1_000_000)]
AlphaT = Annotated[float, Range(0, 1, open_low=True, open_high=True)]
Seed = Annotated[int, Range(0, 2 ** 32 - 1)]

CACHE_KEEP = 3   # cached rounds kept per pool: the current one and a little history

CANDIDATE_COLUMNS = [("sample_id", "BIGINT"), ("weight", "DOUBLE"), ("confidence", "DOUBLE")]
LABEL_COLUMNS = [("sample_id", "BIGINT"), ("label", "INTEGER"), ("confidence", "DOUBLE"),
                 ("source", "VARCHAR")]
STATUS_COLUMNS = [("should_stop", "BOOLEAN"), ("reason", "VARCHAR"), ("dmn_loss", "DOUBLE"),
                  ("max_loss", "DOUBLE"), ("loss_ratio", "DOUBLE"), ("min_weight", "DOUBLE"),
                  ("alpha_t", "DOUBLE"), ("n_below_alpha", "BIGINT"), ("n_labeled", "BIGINT"),
                  ("n_unlabeled", "BIGINT")]


@table_function(name="LANCET_CANDIDATES", columns=CANDIDATE_COLUMNS)
def lancet_candidates(ctx: Any, pool: SetName, budget: Budget = 20, num_classes: Classes = 0,
                      oracle: ColumnName = "", steps: Steps = TrainConfig.steps, cfm: bool = True,
                      alpha_t: AlphaT = 0.1, seed: Seed = 0,
                      augment: str = TrainConfig.augment,
                      after_stop: str = LancetConfig.after_stop) -> pa.Table:
    """The `budget` unlabeled samples of `pool` to label next, with each one's OWA weight and
    the confidence of its propagated label.

    In a round where the stop rule does not hold (LANCET_STATUS), these are the smallest OWA
    weights, smallest first: a small weight (~ p_labeled / p_unlabeled of the sample's
    embedding) means no labeled neighbour. In a round where it holds, the DMN's weights no
    longer rank much, and the default after_stop='confidence' asks for the least confident
    propagated labels, least confident first; after_stop='dmn' keeps the smallest weights. With
    no label yet, a random start is suggested (weight 1, confidence NULL). oracle: a column of
    `samples` holding true labels (experiments): the candidates are labeled from it at once,
    labeled_by 'oracle:<column>'. num_classes 0 infers it from the labels. steps, cfm, seed:
    the embedding's training; augment: one-pixel shifts of the labeled batch of an image-shaped
    pool, 'cold' (below 3 labels per class) or 'shift' (every round), 'none', or 'auto' (the
    default: 'cold' on images, 'none' on flat features); alpha_t: the stop threshold (see
    LANCET_STATUS).
    """
    if oracle and getattr(ctx.store, "read_only", False):
        raise IOException("LANCET_CANDIDATES(oracle=...) adds the candidates' labels to the store, which "
                          "is open read-only; reopen it without read_only, or leave out oracle=")
    session, x = _session(ctx, pool, num_classes, oracle, steps, cfm, alpha_t, seed, augment,
                          after_stop)
    if session.n_labeled == 0:
        ids, weights = _random_start(session, budget, seed)
        confidence = pa.nulls(len(ids), pa.float64())
    else:
        ids, weights = _cached_round(ctx, session, pool,
                                     lambda: session.candidates(x, budget, progress=_bar(ctx, steps)))
        labels = session.propagated(x)                  # the same cached round: no training
        confidence = pa.array(labels["confidence"][session.rows(ids)], pa.float64())
    if oracle:
        truth = ctx.store.sample_columns(ids, [oracle])[oracle]
        add_labels(ctx.store, ids, _as_labels(truth, oracle), by=f"oracle:{oracle}")
    return pa.table({"sample_id": pa.array(ids, pa.int64()),
                     "weight": pa.array(np.asarray(weights, dtype=np.float64), pa.float64()),
                     "confidence": confidence})


@table_function(name="LANCET", columns=LABEL_COLUMNS)
def lancet(ctx: Any, pool: SetName, num_classes: Classes = 0, steps: Steps = TrainConfig.steps,
           cfm: bool = True, alpha_t: AlphaT = 0.1, seed: Seed = 0,
           augment: str = TrainConfig.augment) -> pa.Table:
    """Every sample of `pool` with a label: its human label (source 'human', confidence 1) or
    the one LANCET propagates by the linear head on its CFM embedding (source 'propagated',
    confidence = the head's softmax probability)."""
    session, x = _session(ctx, pool, num_classes, "", steps, cfm, alpha_t, seed, augment)
    out = _cached_round(ctx, session, pool,
                        lambda: session.propagated(x, progress=_bar(ctx, steps)))
    return pa.table({"sample_id": pa.array(out["sample_id"], pa.int64()),
                     "label": pa.array(out["label"], pa.int32()),
                     "confidence": pa.array(out["confidence"], pa.float64()),
                     "source": pa.array(out["source"].tolist(), pa.string())})


@table_function(name="LANCET_STATUS", columns=STATUS_COLUMNS)
def lancet_status(ctx: Any, pool: SetName, num_classes: Classes = 0, steps: Steps = TrainConfig.steps,
                  cfm: bool = True, alpha_t: AlphaT = 0.1, seed: Seed = 0,
                  augment: str = TrainConfig.augment) -> pa.Table:
    """One row: should_stop and the reason (§10.4: the DMN's loss within 5% of its maximum
    log 4 and every unlabeled weight above alpha_t), with the diagnostics behind it."""
    session, x = _session(ctx, pool, num_classes, "", steps, cfm, alpha_t, seed, augment)
    decision = _cached_round(ctx, session, pool,
                             lambda: session.status(x, progress=_bar(ctx, steps)))
    row = decision.as_row()
    return pa.table({name: [row[name]] for name, _ in STATUS_COLUMNS})


# -- building a session from the store ------------------------------------------------------------
def _session(ctx: Any, pool: str, num_classes: int, oracle: str, steps: int, cfm: bool,
             alpha_t: float, seed: int, augment: str,
             after_stop: str = LancetConfig.after_stop) -> tuple[LabelingSession, torch.Tensor]:
    ids = np.asarray(catalog_of(ctx).set_ids(str(pool)), dtype=np.int64)
    if ids.size == 0:
        raise InvalidInputException(f"the sample set '{pool}' is empty")
    if steps <= 0:
        raise InvalidInputException(f"steps must be positive, got {steps}")
    if not 0 < alpha_t < 1:
        raise InvalidInputException(f"alpha_t must lie in (0, 1), got {alpha_t}")
    known = read_labels(ctx.store, ids)
    k = num_classes or _infer_classes(ctx, ids, known["label"], oracle)
    session = LabelingSession(ids, k, config=lancet_config(steps, cfm, alpha_t, seed, augment,
                                                           after_stop))
    for i, y, by, at in zip(known["sample_id"], known["label"], known["labeled_by"],
                            known["labeled_at"]):
        session.labels[int(i)] = (int(y), str(by), at)
    bad = known["label"][(known["label"] < 0) | (known["label"] >= k)]
    if bad.size:
        raise InvalidInputException(
            f"the labels table holds label(s) {sorted(set(bad.tolist()))[:10]} for pool "
            f"'{pool}', outside [0, {k}); fix them or pass num_classes")
    from metaql.storage.inputs import single_tensor
    return session, single_tensor(ctx.store.inputs(ids), "LANCET", "it trains an image embedding on them: "
                                  "register the pool's inputs as one tensor in a store of their own")


def lancet_config(steps: int, cfm: bool, alpha_t: float, seed: int,
                  augment: str = TrainConfig.augment,
                  after_stop: str = LancetConfig.after_stop) -> LancetConfig:
    """The round's configuration from the functions' arguments (the rest: library defaults)."""
    check_mode(augment)   # before any training, so a typo fails fast
    return LancetConfig(train=TrainConfig(steps=steps, cfm=cfm, seed=seed, augment=augment),
                        owa=OWAConfig(seed=seed), alpha_t=alpha_t, after_stop=after_stop)


def _infer_classes(ctx: Any, ids: np.ndarray, labels: np.ndarray, oracle: str) -> int:
    seen = labels.tolist()
    if oracle:
        seen += _as_labels(ctx.store.sample_columns(ids, [oracle])[oracle], oracle).tolist()
    k = max(seen, default=-1) + 1
    if k < 2:
        raise InvalidInputException(
            "cannot tell the number of classes from fewer than two labeled classes; pass "
            "num_classes=K")
    return k


def _as_labels(values: np.ndarray, column: str) -> np.ndarray:
    if values.dtype.kind == "f" and np.isnan(values).any():
        raise InvalidInputException(f"the oracle column '{column}' has missing values")
    if values.dtype.kind not in "iuf":
        raise InvalidInputException(f"the oracle column '{column}' must hold integer labels")
    return whole_numbers(values, f"label of the oracle column '{column}'")   # 0.9 is not label 0


def _random_start(session: LabelingSession, budget: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    check_budget(budget, session.pool_ids.size)
    warnings.warn("no human label in the pool yet: suggesting random samples to start",
                  MetaQLWarning, stacklevel=3)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(session.pool_ids, budget, replace=False)), np.ones(budget)


def _bar(ctx: Any, steps: int):
    progress = getattr(ctx, "progress", None)
    if progress is None:
        return None
    return lambda it: progress(it, total=steps, desc="LANCET training")


# -- the cache of trained rounds ------------------------------------------------------------------
def _cached_round(ctx: Any, session: LabelingSession, pool: str, compute):
    """Runs `compute` with the session's trained state restored from the store's cache (or the
    newest cached model of the same configuration as a warm start), then caches the new state.

    Entries are keyed by the whole round configuration, not just the functions' arguments, so a
    changed library default never reuses a model trained under the old one. The candidate rule
    (after_stop) is left out: it picks from a trained round without changing it."""
    root = ctx.store.artifact_dir("lancet", str(pool))
    knobs = {k: v for k, v in config_to_json(session.config).items() if k != "after_stop"}
    config = json.dumps(knobs, sort_keys=True)
    family = _digest([session.pool_ids.tobytes(), config.encode(),
                      str(session.num_classes).encode()])
    here = root / f"{family}-{session.key()}"
    source = here if is_saved(here) else _newest(root, family)
    if source is not None:
        try:
            cached = LabelingSession.load(source)
            session.result, session.result_key = cached.result, cached.result_key
        except IOException:
            source = None   # a broken cache entry is only a cache miss; the save below replaces it
    out = compute()
    if getattr(ctx.store, "read_only", False):
        if source != here:
            warn_not_saved(ctx.store, "LANCET's trained round")
    elif source != here:
        session.save(here)          # one unit: a crash leaves the old entry or the new one
        _prune(root)
    return out


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:12]


def _newest(root: Path, family: str) -> Path | None:
    found = [d for d in root.glob(f"{family}-*") if is_saved(d)] if root.is_dir() else []
    return max(found, key=saved_at, default=None)


def _prune(root: Path) -> None:
    entries = sorted((d for d in root.iterdir() if d.is_dir() and not d.is_symlink() and is_saved(d)),
                     key=saved_at, reverse=True)
    for stale in entries[CACHE_KEEP:]:
        shutil.rmtree(stale, ignore_errors=True)
    # entries of older MetaQL versions (flat, or unfinished '.tmp' saves) are never read again
    for old in root.iterdir():
        if old.is_dir() and not old.is_symlink() and not is_saved(old) and \
                (old.name.endswith(".tmp") or (old / "session.json").exists()):
            shutil.rmtree(old, ignore_errors=True)
