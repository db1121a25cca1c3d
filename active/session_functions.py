"""The sessions from SQL: what to label next and where a session stands.

    SELECT * FROM ACTIVE_LEARNING_CANDIDATES(pool=train_pool, k=20);     -- GRADNORM's top 20 unlabeled
    INSERT INTO labels VALUES (17, 3, 'ana', now());                       -- or con.label(...)
    SELECT * FROM ACTIVE_LEARNING_STATUS(pool=train_pool);
    SELECT * FROM LABEL_CLEANING_CANDIDATES(data=train, budget=300, update_every=50);
    INSERT INTO annotations VALUES (17, 3, 'ana', now());                  -- or con.annotate(...)
    SELECT * FROM LABEL_CLEANING_STATUS(data=train);

The catalog holds the labels (`labels`) and annotations (`annotations`), so every count is read
from it and nothing is counted twice after a restart; a session's own state (cycles and their
proposals; the cleaning budget and update frequency) is saved under the store's artifacts
(kinds 'active_learning' and 'label_cleaning', named after the set). Training the model is the
user's: train on the labeled pool, then con.checkpoint(...) (or capture) before the next cycle;
the scores use the last checkpoint (or the one named).
"""
from __future__ import annotations

import warnings
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa

from metaql.active.cleaning import initial_labels, phi
from metaql.active.gradnorm import EXPECTATIONS, LOSSES, layer_spec, pool_norms
from metaql.active.predict import log_probabilities
from metaql.active.sessions import ActiveLearningSession, LabelCleaningSession, majority
from metaql.engine.functions import ColumnName, LayerList, Range, SetName, table_function
from metaql.errors import BinderException, IOException, InvalidInputException, Warning as MetaQLWarning
from metaql.storage.artifacts import is_saved, warn_not_saved
from metaql.storage.catalog_snapshot import catalog_of
from metaql.storage.labels import add_annotations, add_labels, read_annotations, read_labels, whole_numbers

Count = Annotated[int, Range(1, 1_000_000)]
Budget = Annotated[int, Range(0, 100_000_000)]        # 0: the saved one (or none, active learning)
Frequency = Annotated[int, Range(0, 100_000_000)]

AL_COLUMNS = [("sample_id", "BIGINT"), ("score", "DOUBLE"), ("cycle", "BIGINT")]
AL_STATUS = [("cycles", "BIGINT"), ("n_labeled", "BIGINT"), ("n_unlabeled", "BIGINT"), ("pending", "BIGINT"),
             ("budget_left", "BIGINT"), ("last_checkpoint", "VARCHAR"), ("model_updated", "BOOLEAN")]
LC_COLUMNS = [("sample_id", "BIGINT"), ("score", "DOUBLE"), ("annotations", "BIGINT"), ("in_progress", "BOOLEAN")]
LC_STATUS = [("spent", "BIGINT"), ("budget", "BIGINT"), ("budget_left", "BIGINT"), ("cleaned", "BIGINT"),
             ("in_progress", "BIGINT"), ("available", "BIGINT"), ("since_update", "BIGINT"),
             ("update_every", "BIGINT"), ("update_due", "BOOLEAN")]


# -- active learning ------------------------------------------------------------------------------
@table_function("ACTIVE_LEARNING_CANDIDATES", AL_COLUMNS)
def active_learning_candidates(ctx, pool: SetName, k: Count = 10, loss: Literal["expected", "entropy"] = "expected",
                               expectation: Literal["loss", "norm"] = "loss", layers: LayerList = ("*",),
                               checkpoint: str = "last", budget: Budget = 0, oracle: ColumnName = "") -> pa.Table:
    """The next cycle's k unlabeled samples of `pool` of highest GRADNORM (loss, expectation,
    layers as there) at the checkpoint. Until every proposed sample is labeled the same proposal is
    returned (score NULL) and no cycle is counted; label them (con.label / INSERT INTO labels),
    retrain, checkpoint, then ask again. budget: a cap on labeled samples (0: none). oracle: a
    samples column of true labels (experiments): the proposals are labeled from it at once."""
    if loss not in LOSSES or expectation not in EXPECTATIONS:
        raise BinderException(f"loss must be one of {LOSSES} and expectation one of {EXPECTATIONS}")
    if oracle and getattr(ctx.store, "read_only", False):
        raise IOException("ACTIVE_LEARNING_CANDIDATES(oracle=...) adds labels to the store, which is open "
                          "read-only; reopen it without read_only, or leave out oracle=")
    catalog = catalog_of(ctx)
    session, slot = _al_session(ctx, pool, k, budget)
    scores = None
    chosen = session.pending
    if chosen.size == 0:
        ckpt = catalog.checkpoint_names(checkpoint)[-1]
        unlabeled = session.unlabeled_ids
        if unlabeled.size == 0:
            raise InvalidInputException(f"every sample of '{pool}' is labeled: there is nothing to propose")
        norms = pool_norms(ctx.store, ckpt, unlabeled, layer_spec(catalog, layers), expectation, catalog,
                           ctx.progress)
        chosen = session.propose(unlabeled, norms, ckpt)
        scores = norms[np.searchsorted(unlabeled, chosen)]
    if oracle:
        truth = _oracle_labels(ctx, chosen, oracle)
        add_labels(ctx.store, chosen, truth, by=f"oracle:{oracle}")
        session.num_classes = max(session.num_classes, int(truth.max()) + 1)   # classes not labeled before
        session.label(chosen, truth, by=f"oracle:{oracle}")
    _save(ctx, session, slot, "the active-learning session")
    return pa.table({"sample_id": pa.array(chosen, pa.int64()),
                     "score": pa.array(scores if scores is not None else [None] * len(chosen), pa.float64()),
                     "cycle": pa.array([session.rounds] * len(chosen), pa.int64())})


@table_function("ACTIVE_LEARNING_STATUS", AL_STATUS)
def active_learning_status(ctx, pool: SetName) -> pa.Table:
    """One row: cycles run, labeled and unlabeled samples of `pool`, proposals still unlabeled,
    the budget left (NULL: none), the checkpoint of the last cycle and whether a newer one exists
    (model_updated: retrained since, so the next cycle scores with the new model)."""
    session, _ = _al_session(ctx, pool, None, 0)
    catalog = catalog_of(ctx)
    last = session.checkpoints[-1] if session.checkpoints else None
    complete = [c["name"] for c in catalog.checkpoints if c["status"] == "complete"]
    row = {"cycles": session.rounds, "n_labeled": session.n_labeled,
           "n_unlabeled": int(session.unlabeled_ids.size), "pending": int(session.pending.size),
           "budget_left": session.budget_left, "last_checkpoint": last,
           "model_updated": bool(complete) and (last is None or complete[-1] != last)}
    return pa.table({name: [row[name]] for name, _ in AL_STATUS})


def _al_session(ctx, pool: str, k: int | None, budget: int) -> tuple[ActiveLearningSession, object]:
    """The pool's saved session (a new one when none is saved or the pool changed), its labels
    taken from the catalog's labels table."""
    ids = np.sort(catalog_of(ctx).set_ids(str(pool)))
    if ids.size == 0:
        raise InvalidInputException(f"the sample set '{pool}' is empty")
    slot = ctx.store.artifact_dir("active_learning", str(pool))
    session = None
    if is_saved(slot):
        session = ActiveLearningSession.load(slot)
        if not np.array_equal(session.pool_ids, ids):
            warnings.warn(f"the set '{pool}' changed since its active-learning session began: starting a new "
                          "session (cycles count from 0)", MetaQLWarning, stacklevel=3)
            session = None
    if session is None:
        session = ActiveLearningSession(ids, 2, k or 1, None)
    if k is not None:
        session.per_cycle = min(int(k), ids.size)
    if budget:
        session.budget = int(budget)
        session._check_budget()
    known = read_labels(ctx.store, ids)
    session.num_classes = max(2, int(known["label"].max(initial=-1)) + 1)
    session.labels = {int(i): (int(y), str(by), at) for i, y, by, at in
                      zip(known["sample_id"], known["label"], known["labeled_by"], known["labeled_at"])}
    return session, slot


# -- label cleaning -------------------------------------------------------------------------------
@table_function("LABEL_CLEANING_CANDIDATES", LC_COLUMNS)
def label_cleaning_candidates(ctx, data: SetName, label_column: ColumnName = "label", budget: Budget = 0,
                              update_every: Frequency = 0, k: Count = 1, checkpoint: str = "last",
                              oracle: ColumnName = "") -> pa.Table:
    """The k samples of `data` to annotate next (active label cleaning): those relabeled without
    a majority yet first, then the highest Phi (LABEL_CLEANING_SCORE) among those not cleaned.
    budget: annotations in all; update_every: retrain the selector (then checkpoint it) every so
    many annotations (LABEL_CLEANING_STATUS says when); both needed by the first call and saved
    with the session (a later call's budget= or update_every= replaces the saved one). Annotate
    with con.annotate / INSERT INTO annotations. oracle: a samples column of true labels
    (experiments): each candidate is annotated from it until a majority forms."""
    if oracle and getattr(ctx.store, "read_only", False):
        raise IOException("LABEL_CLEANING_CANDIDATES(oracle=...) adds annotations to the store, which is open "
                          "read-only; reopen it without read_only, or leave out oracle=")
    catalog = catalog_of(ctx)
    ckpt = catalog.checkpoint_names(checkpoint)[-1]
    logp = log_probabilities(ctx.store, ctx.store.model_at(ckpt), np.sort(catalog.set_ids(str(data))),
                             catalog.input_shards, ctx.progress)
    session, slot = _lc_session(ctx, data, label_column, budget, update_every, logp.shape[1])
    counts = session.counts()
    scores = np.full(session.pool_ids.size, -np.inf)
    has = counts.sum(1) > 0
    noisiness, ambiguity = phi(counts[has], logp[has])
    scores[has] = noisiness - ambiguity
    if session.selector != ckpt:        # a retrained selector: the count toward the next update restarts
        session.update_selector(scores, ckpt)
    session.scores = scores             # Phi also moves with the label counts of the scored samples
    chosen = session.candidates(k)
    rows = session.rows(chosen)
    shown = {"annotations": session.annotated()[rows], "in_progress": session.in_progress()[rows]}  # when chosen
    if oracle and chosen.size:
        truth = _oracle_labels(ctx, chosen, oracle)
        for j, y in zip(chosen.tolist(), truth.tolist()):
            row = session.rows([j])[0]
            while session.budget_left > 0 and not (session.annotated()[row] and majority(session.counts()[row])[0]):
                add_annotations(ctx.store, [j], [y], by=f"oracle:{oracle}")
                session.annotate([j], [y], by=f"oracle:{oracle}")
    _save(ctx, session, slot, "the label-cleaning session")
    return pa.table({"sample_id": pa.array(chosen, pa.int64()), "score": pa.array(scores[rows]),
                     "annotations": pa.array(shown["annotations"], pa.int64()),
                     "in_progress": pa.array(shown["in_progress"])})


@table_function("LABEL_CLEANING_STATUS", LC_STATUS)
def label_cleaning_status(ctx, data: SetName, label_column: ColumnName = "label") -> pa.Table:
    """One row: annotations spent of the budget, samples cleaned (a majority formed), in progress
    and still available, annotations since the newest checkpoint was made, and update_due when
    they reach update_every: retrain the selector on the labels so far and checkpoint it."""
    catalog = catalog_of(ctx)
    session, _ = _lc_session(ctx, data, label_column, 0, 0, None)
    complete = [c["name"] for c in catalog.checkpoints if c["status"] == "complete"]
    # a checkpoint newer than the one the candidates last scored with is a retrained selector
    since = 0 if complete and complete[-1] != session.selector else session.spent - session.spent_at_update
    cleaned, busy = session.cleaned(), session.in_progress()
    row = {"spent": session.spent, "budget": session.budget, "budget_left": session.budget_left,
           "cleaned": int(cleaned.sum()), "in_progress": int(busy.sum()), "available": int((~cleaned & ~busy).sum()),
           "since_update": since, "update_every": session.update_every,
           "update_due": since >= session.update_every}
    return pa.table({name: [row[name]] for name, _ in LC_STATUS})


def _lc_session(ctx, data: str, label_column: str, budget: int, update_every: int,
                classes: int | None) -> tuple[LabelCleaningSession, object]:
    """The set's cleaning session: budget and update frequency as saved (or given), annotations
    and labels read from the catalog (each human label or annotation of a sample is one)."""
    catalog = catalog_of(ctx)
    ids = np.sort(catalog.set_ids(str(data)))
    if ids.size == 0:
        raise InvalidInputException(f"the sample set '{data}' is empty")
    slot = ctx.store.artifact_dir("label_cleaning", str(data))
    saved = LabelCleaningSession.load(slot) if is_saved(slot) else None
    budget = budget or (saved.budget if saved is not None else 0)
    update_every = update_every or (saved.update_every if saved is not None else 0)
    if not budget or not update_every:
        lacking = " and ".join(n for n, v in (("budget=", budget), ("update_every=", update_every)) if not v)
        raise BinderException(f"no label-cleaning session for '{data}' yet, and {lacking} not given: start one with "
                              f"LABEL_CLEANING_CANDIDATES(data={data}, budget=..., update_every=...) (budget: annotations "
                              "in all; update_every: retrain the selector every so many annotations, e.g. 10)")
    initial = initial_labels(ctx.store, catalog, ids, label_column)
    initial = np.full(ids.size, -1) if initial is None else initial
    ann, lab = read_annotations(ctx.store, ids), read_labels(ctx.store, ids)
    found = [(int(i), int(y), str(b), a) for i, y, b, a in
             zip(lab["sample_id"], lab["label"], lab["labeled_by"], lab["labeled_at"])]
    found += [(int(i), int(y), str(b), a) for i, y, b, a in
              zip(ann["sample_id"], ann["label"], ann["annotated_by"], ann["annotated_at"])]
    top = max([int(initial.max(initial=-1))] + [y for _, y, _, _ in found]) + 1
    classes = classes or max(2, top)
    if top > classes:
        raise InvalidInputException(f"label {top - 1} is not a class of this {classes}-class model; fix that "
                                    "sample's label or annotation")
    session = LabelCleaningSession(ids, classes, initial, budget, update_every)
    session.annotations = found
    if saved is not None and np.array_equal(saved.pool_ids, ids):
        session.rounds, session.spent_at_update, session.selector = saved.rounds, saved.spent_at_update, saved.selector
        session.spent_before = min(saved.spent_before, len(found))
    else:       # a new session: what was annotated before it is evidence, not spending
        session.spent_before = len(found)
    return session, slot


# -- shared ---------------------------------------------------------------------------------------
def _oracle_labels(ctx, ids: np.ndarray, column: str) -> np.ndarray:
    values = ctx.store.sample_columns(ids, [column])[column]
    if any(v is None for v in values) or (values.dtype.kind == "f" and np.isnan(values).any()):
        raise InvalidInputException(f"the oracle column '{column}' has missing values")
    return whole_numbers(values, f"label of the oracle column '{column}'")


def _save(ctx, session, slot, what: str) -> None:
    if getattr(ctx.store, "read_only", False):
        warn_not_saved(ctx.store, what)
    else:
        session.save(slot)
