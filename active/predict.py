"""The model's predictive distribution over a set of registered samples (the catalog keeps only
the argmax and the loss, samples.pred / samples.loss, so the distribution is recomputed)."""
from __future__ import annotations

import numpy as np
import torch

from metaql.storage.inputs import call_model
from metaql.storage.tasks import model_output

BATCH = 256


def log_probabilities(store, model, ids: np.ndarray, shard_rows=None, progress=None) -> np.ndarray:
    """log_softmax of the model's outputs for `ids`, (N, C) float64, in the order of ids, in eval mode.
    progress: the statement's progress wrapper, given the batches (a cancel stops between them)."""
    parts = []
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            batches = store.input_batches(ids, BATCH, shard_rows)
            if progress is not None:
                batches = progress(batches, total=-(-len(ids) // BATCH), desc="predictions")
            for pos, x in batches:
                logits = model_output(call_model(model, x))
                parts.append((pos, torch.log_softmax(logits.reshape(logits.shape[0], -1).double(), 1).numpy()))
    finally:
        model.train(was)
    out = np.zeros((len(ids), parts[0][1].shape[1]))
    for pos, logp in parts:
        out[pos] = logp
    return out


def probabilities(store, model, ids: np.ndarray, shard_rows=None, progress=None) -> np.ndarray:
    return np.exp(log_probabilities(store, model, ids, shard_rows, progress))
