"""Fills the catalog's pred and loss columns from the model at a checkpoint."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from metaql.errors import BinderException
from metaql.storage.catalog import register, transaction, unregister
from metaql.storage.inputs import call_model
from metaql.storage.tasks import task_at


def update_predictions(store, checkpoint: str | None = None, batch_size: int = 1024) -> int:
    store._writable()       # before a pass over every sample, not at the UPDATE after it
    names = [c["name"] for c in store.checkpoints()]
    if not names:
        from metaql.errors import CatalogException
        raise CatalogException("no checkpoint to predict with; capture one first")
    checkpoint = checkpoint or names[-1]
    model, task = store.model_at(checkpoint).eval(), task_at(store, checkpoint)
    ids = store.sql("SELECT sample_id FROM samples ORDER BY sample_id").fetchnumpy()["sample_id"].astype(np.int64)
    preds, losses, order = [], [], []
    with torch.no_grad():
        # inputs streamed from the store a batch at a time, in the shards' order
        for pos, inputs in store.input_batches(ids, batch_size):
            rows = ids[pos]
            out = call_model(model, inputs)
            pred = task.predictions(out)
            preds.append(np.full(len(rows), None) if pred is None else pred.cpu().numpy().astype(np.int32))
            losses.append(_losses(store, task, out, inputs, rows))
            order.append(rows)
    # a task without classes (regression, causal_lm, custom) leaves pred NULL and fills loss only
    pred = np.concatenate(preds)
    table = pa.table({"sample_id": np.concatenate(order),
                      "pred": pa.array(pred.tolist() if pred.dtype == object else pred, pa.int32()),
                      "loss": np.concatenate(losses)})
    with transaction(store.db):
        register(store.db, "_preds", table)
        store.db.execute("UPDATE samples SET pred = p.pred, loss = p.loss FROM _preds p "
                         "WHERE samples.sample_id = p.sample_id")
        unregister(store.db, "_preds")
    return len(ids)


def _losses(store, task, output, inputs, ids) -> np.ndarray:
    """Each sample's loss under the task on its stored targets; NaN for samples that lack them."""
    try:
        targets = task.stored_targets(store, ids)
    except BinderException:
        return np.full(len(ids), np.nan)
    return task.losses(output, inputs, targets).double().cpu().numpy()
