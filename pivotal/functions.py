"""PIVOTAL_SAMPLES and REWEIGHT: papers/003's meta-sample selection and meta re-weighting as table
functions (``SELECT * FROM PIVOTAL_SAMPLES(data=train, k=20, method='gbc')``)."""
from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import pyarrow as pa

from metaql.engine.functions import CheckpointList, ColumnName, LayerList, Range, SetName, table_function
from metaql.errors import InvalidInputException
from metaql.pivotal.kmeans import weighted_kmeans
from metaql.pivotal.mco import cosine_kmeans
from metaql.pivotal.sources import gradients
from metaql.storage.catalog_snapshot import catalog_of

PIVOTAL_COLUMNS = [("sample_id", "BIGINT"), ("cluster", "BIGINT"), ("weight", "DOUBLE")]


@table_function("PIVOTAL_SAMPLES", PIVOTAL_COLUMNS)
def pivotal_samples(ctx, data: SetName, k: Annotated[int, Range(1, 100_000)],
                    method: Literal["rbc", "gbc", "rbc_kmeans"] = "rbc",
                    checkpoints: CheckpointList = "all", layers: LayerList = ("*",), label_free: bool = True,
                    draws: Annotated[int, Range(0, 10_000)] = 5,
                    max_iter: Annotated[int, Range(1, 1_000)] = 30,
                    seed: Annotated[int, Range(0, 2 ** 32 - 1)] = 0,
                    metric: Literal["euclidean", "cosine"] = "euclidean") -> pa.Table:
    """The k samples of `data` worth cleaning by hand for meta re-weighting (Wu et al., AAAI 2023):
    weighted K-means (MCO, Eq. 10) on the samples' gradients, averaged over the cached checkpoints;
    one row per cluster: the sample closest to its centroid, the cluster's number and its size
    (weight). method: 'rbc' the output layer's gradient from forward passes (Eq. 11-12), 'gbc'
    `draws` layers importance-sampled with probability A(l)/A from the captured layers (Eq. 14;
    draws=0: every layer, unsampled),
    'rbc_kmeans' RBC with plain K-means (RBC-k). label_free: cluster the label-free part of the
    gradient (noisy labels; true) or the whole gradient (clean but imbalanced labels; false: GBC
    then reads the stored factors). layers: the output layer for RBC, the layers to sample for GBC.
    metric: 'euclidean' (K-means on ||G_j - C||^2, samples weighted by ||G_j||) or 'cosine' (Eq. 10
    read literally: clusters by |<G_j, C_i>|, blind to the gradient's sign; pivotal/mco.py)."""
    catalog = catalog_of(ctx)
    ids = np.sort(np.asarray(catalog.set_ids(str(data)), dtype=np.int64))
    if len(ids) == 0:
        raise InvalidInputException(f"the sample set '{data}' is empty")
    if k > len(ids):
        raise InvalidInputException(f"k={k} exceeds the {len(ids)} samples of '{data}'; ask for at most {len(ids)}")
    ckpts = catalog.checkpoint_names(checkpoints)
    grads = gradients(ctx.store, catalog, ids, method, ckpts, layers, bool(label_free), draws, seed)
    ctx.check_interrupt()
    cluster = cosine_kmeans if metric == "cosine" else weighted_kmeans
    result = cluster(grads, k, weighted=method != "rbc_kmeans", seed=seed, max_iter=max_iter,
                     check=ctx.check_interrupt)
    order = np.argsort(-result.sizes, kind="stable")
    return pa.table({"sample_id": pa.array(ids[result.centers[order]], pa.int64()),
                     "cluster": pa.array(order, pa.int64()),
                     "weight": pa.array(result.sizes[order].astype(np.float64))})


REWEIGHT_COLUMNS = [("sample_id", "BIGINT"), ("weight", "DOUBLE")]


@table_function("REWEIGHT", REWEIGHT_COLUMNS)
def reweight(ctx, data: SetName, meta: SetName, checkpoint: str = "last", save_as: str = "reweighted",
             meta_label_column: ColumnName = "",
             epochs: Annotated[int, Range(1, 10_000)] = 5,
             batch_size: Annotated[int, Range(1, 2 ** 20)] = 100,
             lr: Annotated[float, Range(0, 10, open_low=True)] = 0.1,
             weight_lr: Annotated[float, Range(0, 1e6, open_low=True)] = 1.0,
             init_weight: Annotated[float, Range(0, 1)] = 1.0,
             layers: LayerList = ("*",),
             seed: Annotated[int, Range(0, 2 ** 32 - 1)] = 0) -> pa.Table:
    """Meta re-weighting (papers/003 Eq. 2-4): trains the model of `checkpoint` on the samples of
    `data` (their `label`), weighting each sample by how its gradient aligns with the meta set's
    gradient at the look-ahead weights (the engine's batch-average operator on captured factors).
    The meta samples' labels come from the `labels` table (con.label; the clean labels) or, with
    meta_label_column, from that column of `samples`. Saves the trained model as checkpoint
    `save_as` (with the factors of `data` replayed, so INFLUENCE can query it) and the weights in
    `sample_weights(sample_id, checkpoint, weight)`; returns sample_id, weight. weight_lr: eta of
    Eq. 3 in units of the first step's mean |dL_meta/dw|; init_weight: every weight's start."""
    from metaql.pivotal.reweight import meta_reweight
    from metaql.storage.inputs import single_tensor
    catalog, store = catalog_of(ctx), ctx.store
    read_only = getattr(store, "read_only", False)
    if not read_only and save_as in {c["name"] for c in catalog.checkpoints}:
        from metaql.errors import CatalogException
        raise CatalogException(f"checkpoint '{save_as}' already exists; name the re-weighted model with a new save_as=")
    from metaql.storage.store import is_checkpoint_name
    if not is_checkpoint_name(save_as):     # checked before the epochs, not after them
        raise InvalidInputException(f"save_as='{save_as}' must be an identifier (letters, digits, _ . -)")
    ckpt = catalog.checkpoint_names(checkpoint)
    if len(ckpt) != 1:
        raise InvalidInputException("checkpoint= names the one checkpoint whose model is re-weighted (default last)")
    ids = np.sort(np.asarray(catalog.set_ids(str(data)), dtype=np.int64))
    meta_ids = np.sort(np.asarray(catalog.set_ids(str(meta)), dtype=np.int64))
    if len(ids) == 0 or len(meta_ids) == 0:
        raise InvalidInputException(f"the set '{data if len(ids) == 0 else meta}' is empty")
    meta_y = _meta_labels(store, meta_ids, meta_label_column)
    from metaql.pivotal.sources import labels_of
    y = labels_of(store, ckpt[0], ids)
    model = store.model_at(ckpt[0])
    x = single_tensor(store.inputs(ids), "REWEIGHT", "re-weight in Python with metaql.pivotal.reweight.meta_reweight")
    mx = single_tensor(store.inputs(meta_ids), "REWEIGHT", "")
    out = meta_reweight(model, x, y, mx, meta_y, epochs=epochs, batch_size=batch_size, lr=lr, weight_lr=weight_lr,
                        init_weight=init_weight, layers=_layers(layers), seed=seed,
                        progress=_checked_progress(ctx))
    if read_only:
        from metaql.storage.artifacts import warn_not_saved
        warn_not_saved(store, "REWEIGHT's model and weights")
    else:
        _save(store, ckpt[0], save_as, model, lr, ids, out.weights)
    return pa.table({"sample_id": pa.array(ids, pa.int64()), "weight": pa.array(out.weights, pa.float64())})


def _layers(layers):
    return "*" if list(layers) == ["*"] else list(layers)


def _checked_progress(ctx):
    progress = getattr(ctx, "progress", None) or (lambda it, total=None, desc="": it)

    def wrap(iterable, total=None, desc=""):
        for item in progress(iterable, total=total, desc=desc):
            ctx.check_interrupt()
            yield item
    return wrap


def _meta_labels(store, ids: np.ndarray, column: str):
    """The meta samples' clean labels: human labels (con.label), or an oracle column of samples."""
    import torch
    if column:
        values = store.sample_columns(ids, [column])[column]
        bad = [int(i) for i, v in zip(ids, values) if v is None or (isinstance(v, float) and np.isnan(v))]
    else:
        rows = dict(store.sql("SELECT sample_id, label FROM labels WHERE sample_id IN (SELECT unnest(?))",
                              [ids.tolist()]).fetchall())
        values = [rows.get(int(i)) for i in ids]
        bad = [int(i) for i, v in zip(ids, values) if v is None]
    if bad:
        where = f"column '{column}'" if column else "the labels table"
        raise InvalidInputException(f"{len(bad)} meta samples (e.g. {bad[:3]}) have no label in {where}: label them "
                                    "(con.label(ids, labels)) or name a column holding their clean labels "
                                    "(meta_label_column=...)")
    return torch.as_tensor(np.asarray(values, dtype=np.int64))


def _save(store, source: str, name: str, model, lr: float, ids: np.ndarray, weights: np.ndarray) -> None:
    """The re-weighted model as a checkpoint (factors of `ids` replayed into it) and its weights.
    The checkpoint stays 'capturing' (never scored) until its factors are in; then its weights and
    its completion commit as one transaction, so an interruption leaves nothing half-saved that a
    query would use. It is marked derived from `source`: `all` and `last` leave it out."""
    import json

    from metaql.storage.capture import replay_into_store
    from metaql.storage.catalog import transaction
    from metaql.storage.tasks import task_at
    c = store.checkpoint(source)
    factory, kwargs = store.db.execute("SELECT factory, kwargs FROM models WHERE model_id = ?",
                                       [c["model_id"]]).fetchone()
    store.begin_checkpoint(name, model, lr, factory=factory, kwargs=json.loads(kwargs) if kwargs else None,
                           task=task_at(store, source))
    store.committed()
    if store.layers():
        replay_into_store(store, name, ids)
    with transaction(store.db):
        store.db.execute("DELETE FROM sample_weights WHERE checkpoint = ?", [name])
        store.db.executemany("INSERT INTO sample_weights VALUES (?, ?, ?)",
                             [[int(i), name, float(w)] for i, w in zip(ids, weights)])
        store.db.execute("UPDATE checkpoints SET status = 'complete', derived_from = ? WHERE name = ?", [source, name])
    store.committed()
