"""The ELITE table function: ``SELECT * FROM ELITE(data=train, labeled=val_labeled, score='svdd')``.

Reads the samples of ``data`` (unlabeled, polluted) and ``labeled`` from the store, trains an
``EliteDetector`` on them, saves it under the store's artifacts (kind 'elite', named after the data
set) so it can score new samples later, and returns one row per sample of ``data``. On a read-only
store it saves nothing (and warns once).
"""
from __future__ import annotations

from typing import Annotated

import numpy as np
import pyarrow as pa
import torch

from metaql.cleaning.elite import EliteDetector
from metaql.errors import InvalidInputException
from metaql.engine.functions import ColumnName, Range, SetName, table_function
from metaql.storage.artifacts import warn_not_saved
from metaql.storage.catalog_snapshot import catalog_of

COLUMNS = [("sample_id", "BIGINT"), ("anomaly_score", "DOUBLE"), ("is_anomaly", "BOOLEAN")]


@table_function(name="ELITE", columns=COLUMNS)
def elite(ctx, data: SetName, labeled: SetName, score: str = "svdd", label_column: ColumnName = "label",
          anomaly_label: int = 1, normal_label: int = 0, features: str = "",
          epochs: Annotated[int, Range(1, 10_000)] = 35,
          batch_size: Annotated[int, Range(1, 2 ** 20)] = 128,
          lr: Annotated[float, Range(0, 10, open_low=True)] = 1e-3,
          eta_m: Annotated[float, Range(0, 1e6, open_low=True)] = 1.0,
          margin: Annotated[float, Range(0, 1e6)] = 0.0,
          meta_gradient: str = "factored", anomaly_loss: str = "hinge",
          seed: Annotated[int, Range(0, 2 ** 32 - 1)] = 0) -> pa.Table:
    """Robust anomaly detection with meta-gradients (ELITE, KDD 2021) on a polluted sample set.

    data: the unlabeled samples to clean (labeled samples found in it are used as labeled only,
    but still scored). labeled: samples whose ``label_column`` holds ``anomaly_label`` or
    ``normal_label`` (or the strings 'anomaly' / 'normal'). features: comma-separated columns of
    ``samples`` to use as tabular input; empty means the registered inputs. margin: C of the hinge
    loss, 0 for automatic. anomaly_loss: 'hinge' (Eq. 4's max(C - Omega, 0)) or 'linear'
    (C - Omega, the form of the paper's derivation) for pseudo-anomalies. Returns sample_id,
    anomaly_score (higher = more anomalous) and is_anomaly (score above the threshold chosen on
    the labeled samples). epochs and lr default to EliteDetector's schedule (35 epochs at 1e-3, see
    its docstring; with anomaly_loss='linear' pass epochs=100).
    """
    data_ids = _ids(ctx, data)
    labeled_ids = _ids(ctx, labeled)
    labels = _labels(ctx, labeled_ids, label_column, anomaly_label, normal_label)
    train_ids = data_ids[~np.isin(data_ids, labeled_ids)]
    if len(train_ids) == 0:
        raise InvalidInputException(f"every sample of '{data}' is in '{labeled}'; ELITE needs unlabeled samples")
    x_train, x_labeled = _inputs(ctx, train_ids, features), _inputs(ctx, labeled_ids, features)
    det = EliteDetector(score=score, epochs=epochs, batch_size=batch_size, lr=lr, eta_m=eta_m,
                        margin=margin if margin > 0 else None, meta_gradient=meta_gradient,
                        anomaly_loss=anomaly_loss, seed=seed)
    det.fit(x_train, x_labeled, labels, progress=_epochs_progress(ctx))
    if getattr(ctx.store, "read_only", False):
        warn_not_saved(ctx.store, "ELITE's detector")
    else:
        det.save(ctx.store.artifact_dir("elite", str(data)))
    x_data = x_train if len(train_ids) == len(data_ids) else _inputs(ctx, data_ids, features)
    scores = det.decision_function(x_data)
    return pa.table({"sample_id": pa.array(data_ids, pa.int64()),
                     "anomaly_score": pa.array(scores, pa.float64()),
                     "is_anomaly": pa.array(scores > det.threshold_, pa.bool_())})


def _epochs_progress(ctx):
    """Wraps the training epochs in the context's progress bar, checking for Ctrl-C between epochs."""
    progress = getattr(ctx, "progress", None) or (lambda it, total=None, desc="": it)
    check = getattr(ctx, "check_interrupt", lambda: None)

    def wrap(iterable, total=None, desc=""):
        for item in progress(iterable, total=total, desc=desc):
            check()
            yield item
    return wrap


def _ids(ctx, name: str) -> np.ndarray:
    ids = np.asarray(catalog_of(ctx).set_ids(str(name)), dtype=np.int64)
    if len(ids) == 0:
        raise InvalidInputException(f"the sample set '{name}' is empty")
    return ids


def _labels(ctx, ids: np.ndarray, column: str, anomaly_label: int, normal_label: int) -> np.ndarray:
    """The labeled samples' labels as 0 normal / 1 anomaly; anything else is an error."""
    values = ctx.store.sample_columns(ids, [column])[column]
    if values.dtype.kind in "USO" and not all(isinstance(v, (int, np.integer)) for v in values):
        return values.astype(str)   # 'normal' / 'anomaly', checked by the detector
    if values.dtype.kind == "f" and np.isnan(values).any():
        raise InvalidInputException(f"{int(np.isnan(values).sum())} labeled samples have no '{column}'")
    anomaly, normal = values == anomaly_label, values == normal_label
    if not (anomaly | normal).all():
        bad = sorted({str(v) for v in values[~(anomaly | normal)]})[:5]
        raise InvalidInputException(f"column '{column}' of the labeled samples holds {bad}, which are neither "
                                    f"anomaly_label={anomaly_label} nor normal_label={normal_label}")
    return anomaly.astype(np.int64)


def _inputs(ctx, ids: np.ndarray, features: str) -> torch.Tensor:
    """Registered inputs, or the named ``samples`` columns stacked as (N, F) float32 features."""
    names = [f.strip() for f in features.split(",") if f.strip()]
    if not names:
        from metaql.storage.inputs import single_tensor
        return single_tensor(ctx.store.inputs(ids), "ELITE", "name numeric samples columns as its features "
                             "instead (features='col1,col2')")
    cols = ctx.store.sample_columns(ids, names)
    try:
        return torch.from_numpy(np.stack([np.asarray(cols[n], dtype=np.float32) for n in names], axis=1))
    except (TypeError, ValueError) as e:
        raise InvalidInputException(f"feature columns {names} must be numeric: {e}") from None
