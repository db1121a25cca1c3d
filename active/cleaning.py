"""LABEL_CLEANING_SCORE: active label cleaning's ranking Phi (Bernhardt et al., Nat. Commun. 2022).

    Phi(x, l) = CE(l / |l|, p) - H(p)       noisiness minus ambiguity

l is the sample's label counts so far: its dataset label (`label_column`, the noisy one), its human
label in `labels` and every row of `annotations`; p the model's predictive distribution at the
checkpoint. High Phi: the model confidently disagrees with the labels (likely noise, cheap to fix)
and first to relabel; low: ambiguous samples. Samples without any label are left out.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from metaql.active.predict import log_probabilities
from metaql.engine.functions import ColumnName, SetName, table_function
from metaql.errors import BinderException, InvalidInputException
from metaql.storage.catalog_snapshot import catalog_of
from metaql.storage.labels import label_counts
from metaql.storage.tasks import task_at

COLUMNS = [("sample_id", "BIGINT"), ("noisiness", "DOUBLE"), ("ambiguity", "DOUBLE"), ("score", "DOUBLE")]


def phi(counts: np.ndarray, logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(noisiness CE(l/|l|, p), ambiguity H(p)) per row; rows of `counts` must not be all zero."""
    q = counts / counts.sum(1, keepdims=True)
    # 0 * log 0 = 0 on both sides: a class nobody chose, or one the model gives no mass
    noisiness = -np.where(q > 0, q * logp, 0.0).sum(1)
    p = np.exp(logp)
    ambiguity = -np.where(p > 0, p * logp, 0.0).sum(1)
    return noisiness, ambiguity


@table_function("LABEL_CLEANING_SCORE", COLUMNS)
def label_cleaning_score(ctx, data: SetName, label_column: ColumnName = "label", checkpoint: str = "last",
                         human_labels: bool = True) -> pa.Table:
    """Active label cleaning's ranking of each labeled sample of `data`: noisiness = CE(label
    distribution, p), ambiguity = H(p), score = Phi = noisiness - ambiguity (relabel highest first).
    The distribution counts the samples column `label_column` ('' for none), the human label in
    `labels` (human_labels=true) and every annotation in `annotations`."""
    catalog = catalog_of(ctx)
    ids = np.sort(catalog.set_ids(str(data)))
    if len(ids) == 0:
        raise InvalidInputException(f"set '{data}' is empty: there is nothing to score")
    ckpt = catalog.checkpoint_names(checkpoint)[-1]
    if task_at(ctx.store, ckpt).name not in ("classification", "sequence_classification"):
        raise BinderException("LABEL_CLEANING_SCORE needs a classification model (a distribution over classes)")
    logp = log_probabilities(ctx.store, ctx.store.model_at(ckpt), ids, catalog.input_shards)
    counts = label_counts(ctx.store, ids, logp.shape[1], initial_labels(ctx.store, catalog, ids, label_column),
                          bool(human_labels))
    keep = counts.sum(1) > 0
    noisiness, ambiguity = phi(counts[keep], logp[keep])
    return pa.table({"sample_id": pa.array(ids[keep], pa.int64()), "noisiness": pa.array(noisiness),
                     "ambiguity": pa.array(ambiguity), "score": pa.array(noisiness - ambiguity)})


def initial_labels(store, catalog, ids: np.ndarray, column: str) -> np.ndarray | None:
    """The samples column of dataset labels as int64, -1 where NULL; None for column ''."""
    if not column:
        return None
    catalog.require_column(str(column))
    col = store.sample_columns(ids, [str(column)])[str(column)]
    try:
        values = np.asarray([np.nan if v is None else v for v in col], dtype=np.float64)
    except (TypeError, ValueError):      # text, dates, lists: no class index in them
        example = next(v for v in col if v is not None)
        raise InvalidInputException(f"samples.{column} does not hold numbers (e.g. {example!r}); label_column names "
                                    "a column of class indices") from None
    whole = np.isnan(values) | (values == np.round(values))
    if not whole.all():
        raise InvalidInputException(f"samples.{column} holds non-integer values; label_column names a column of "
                                    "class indices")
    return np.where(np.isnan(values), -1, values).astype(np.int64)
