"""Fills the catalog's pred and loss columns from the model at a checkpoint."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from metaql.storage.catalog import register, transaction, unregister


def update_predictions(store, checkpoint: str | None = None, batch_size: int = 1024) -> int:
    names = [c["name"] for c in store.checkpoints()]
    if not names:
        from metaql.engine.errors import CatalogException
        raise CatalogException("no checkpoint to predict with; capture one first")
    model = store.model_at(checkpoint or names[-1]).eval()
    ids = store.sql("SELECT sample_id FROM samples ORDER BY sample_id").fetchnumpy()["sample_id"].astype(np.int64)
    labels = store.sample_columns(ids, ["label"])["label"]
    inputs = store.inputs(ids)
    preds, losses = [], []
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            logits = model(inputs[start:start + batch_size]).reshape(min(batch_size, len(ids) - start), -1)
            preds.append(logits.argmax(1))
            y = labels[start:start + batch_size]
            if all(v is not None for v in y):
                losses.append(F.cross_entropy(logits, torch.as_tensor(y.astype(np.int64)), reduction="none"))
            else:
                losses.append(torch.full((len(y),), float("nan")))
    table = pa.table({"sample_id": ids, "pred": torch.cat(preds).numpy().astype(np.int32),
                      "loss": torch.cat(losses).double().numpy()})
    with transaction(store.db):
        register(store.db, "_preds", table)
        store.db.execute("UPDATE samples SET pred = p.pred, loss = p.loss FROM _preds p "
                         "WHERE samples.sample_id = p.sample_id")
        unregister(store.db, "_preds")
    return len(ids)
