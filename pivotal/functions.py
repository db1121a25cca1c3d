"""PIVOTAL_SAMPLES and REWEIGHT: papers/003's meta-sample selection and meta re-weighting as table
functions (``SELECT * FROM PIVOTAL_SAMPLES(data=train, k=20, method='gbc')``)."""
from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import pyarrow as pa

from metaql.engine.functions import CheckpointList, ColumnName, LayerList, Range, SetName, table_function
from metaql.errors import InvalidInputException
from metaql.pivotal.kmeans import weighted_kmeans
from metaql.pivotal.sources import gradients
from metaql.storage.catalog_snapshot import catalog_of

PIVOTAL_COLUMNS = [("sample_id", "BIGINT"), ("cluster", "BIGINT"), ("weight", "DOUBLE")]


@table_function("PIVOTAL_SAMPLES", PIVOTAL_COLUMNS)
def pivotal_samples(ctx, data: SetName, k: Annotated[int, Range(1, 100_000)],
                    method: Literal["rbc", "gbc", "rbc_kmeans"] = "rbc",
                    checkpoints: CheckpointList = "all", layers: LayerList = ("*",), label_free: bool = True,
                    draws: Annotated[int, Range(1, 10_000)] = 5,
                    max_iter: Annotated[int, Range(1, 1_000)] = 30,
                    seed: Annotated[int, Range(0, 2 ** 32 - 1)] = 0) -> pa.Table:
    """The k samples of `data` worth cleaning by hand for meta re-weighting (Wu et al., AAAI 2023):
    weighted K-means (MCO, Eq. 10) on the samples' gradients, averaged over the cached checkpoints;
    one row per cluster: the sample closest to its centroid, the cluster's number and its size
    (weight). method: 'rbc' the output layer's gradient from forward passes (Eq. 11-12), 'gbc'
    `draws` layers importance-sampled with probability A(l)/A from the captured layers (Eq. 14),
    'rbc_kmeans' RBC with plain K-means (RBC-k). label_free: cluster the label-free part of the
    gradient (noisy labels; true) or the whole gradient (clean but imbalanced labels; false: GBC
    then reads the stored factors). layers: the output layer for RBC, the layers to sample for GBC."""
    catalog = catalog_of(ctx)
    ids = np.sort(np.asarray(catalog.set_ids(str(data)), dtype=np.int64))
    if len(ids) == 0:
        raise InvalidInputException(f"the sample set '{data}' is empty")
    if k > len(ids):
        raise InvalidInputException(f"k={k} exceeds the {len(ids)} samples of '{data}'; ask for at most {len(ids)}")
    ckpts = catalog.checkpoint_names(checkpoints)
    grads = gradients(ctx.store, catalog, ids, method, ckpts, layers, bool(label_free), draws, seed)
    ctx.check_interrupt()
    result = weighted_kmeans(grads, k, weighted=method != "rbc_kmeans", seed=seed, max_iter=max_iter)
    order = np.argsort(-result.sizes, kind="stable")
    return pa.table({"sample_id": pa.array(ids[result.centers[order]], pa.int64()),
                     "cluster": pa.array(order, pa.int64()),
                     "weight": pa.array(result.sizes[order].astype(np.float64))})
