"""Table functions of model diagnosis: ACTIVATIONS, CAPTURE_ACTIVATIONS and DIAGNOSIS_SAMPLE.

    SELECT * FROM ACTIVATIONS(layer=conv2, samples=test_wrong, checkpoint=ep3, reduce='max')
    SELECT * FROM CAPTURE_ACTIVATIONS(layers=[conv2, fc2], samples=test, reduce='max')
    CREATE SET diag AS SELECT sample_id FROM DIAGNOSIS_SAMPLE(data=test, fraction=0.05, layer=fc2)
"""
from __future__ import annotations

import re
import warnings
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa

from metaql.diagnosis.activations import capture_activations, read_activations, resolve_checkpoint
from metaql.diagnosis.sampling import diagnosis_sample
from metaql.engine.functions import Range, SetName, table_function
from metaql.errors import InvalidInputException, IOException, Warning as MetaQLWarning
from metaql.storage.catalog_snapshot import catalog_of

ACT_COLUMNS = [("sample_id", "BIGINT"), ("neuron", "INTEGER"), ("value", "DOUBLE")]
CAPTURE_COLUMNS = [("layer", "VARCHAR"), ("checkpoint", "VARCHAR"), ("reduce", "VARCHAR"),
                   ("rows_written", "BIGINT"), ("rows_held", "BIGINT")]
SAMPLE_COLUMNS = [("sample_id", "BIGINT"), ("method", "VARCHAR"), ("fraction", "DOUBLE"), ("j", "DOUBLE"),
                  ("stratum", "BIGINT"), ("role", "VARCHAR"), ("score", "DOUBLE")]
Method = Literal["maxmargin", "gmm_full", "gmm_spherical", "stratified_cm", "latent_grid", "random"]
# a set drawn by DIAGNOSIS_SAMPLE is exactly `SELECT sample_id FROM DIAGNOSIS_SAMPLE(...)`: a set
# that filters, complements or joins the draw (NOT IN, WHERE role = ...) is not the sample as drawn,
# and the method's measured error does not describe it
_DRAWN = re.compile(r"^\s*SELECT\s+(?:\w+\.)?sample_id\s+FROM\s+DIAGNOSIS_SAMPLE\s*\([^()]*\)"
                    r"(?:\s+(?:AS\s+)?\w+)?\s*;?\s*$", re.I)


def explain_activations(ctx, layer: str, samples, checkpoint: str = "last", reduce: str = "max",
                        using_sample=SetName("")) -> list[str]:
    """EXPLAIN's account of an ACTIVATIONS call: exact, or an estimate from a diagnosis sample with
    the error bench_diagnosis measured for its method and fraction."""
    ids = _ids(ctx, samples)
    if using_sample:
        definition = sample_definition(ctx.store, str(using_sample))
        if definition is None:
            return [f"using_sample='{using_sample}' is not a set drawn by DIAGNOSIS_SAMPLE (the call will fail)"]
        kept = int(np.isin(ids, _ids(ctx, using_sample)).sum())
        method, fraction = drawn_with(definition)
        return [f"ESTIMATE from diagnosis sample '{using_sample}': {kept} of the {len(ids)} samples of "
                f"'{samples}' (method {method}, fraction {fraction:g})", measured_error(method, fraction)]
    definition = sample_definition(ctx.store, str(samples))
    if definition is not None:
        method, fraction = drawn_with(definition)
        return [f"ESTIMATE: '{samples}' is a diagnosis sample (method {method}, fraction {fraction:g}) of the "
                "data it was drawn from", measured_error(method, fraction)]
    return [f"EXACT: every one of the {len(ids)} samples of '{samples}'"]


@table_function(name="ACTIVATIONS", columns=ACT_COLUMNS, explain=explain_activations)
def activations(ctx, layer: str, samples: SetName, checkpoint: str = "last",
                reduce: Literal["max", "mean"] = "max", using_sample: SetName = SetName("")) -> pa.Table:
    """Stored activations of one layer for a set's samples, long form: one row per (sample, neuron).

    layer: a module name of the model (quote names with dots: layer='features.0'). checkpoint: a
    checkpoint name or 'last'. reduce: the spatial reduction a convolution's channels were stored
    with ('max' or 'mean'; ignored for a layer with one value per unit). Nothing is computed here:
    capture first (con.capture_activations or CAPTURE_ACTIVATIONS). Over a set drawn by
    DIAGNOSIS_SAMPLE, aggregates are estimates: a warning says so, and how the set was drawn.
    using_sample: a set drawn by DIAGNOSIS_SAMPLE; the rows are those of its members within
    `samples`, so an aggregate over `samples` is answered approximately from the sample's stored
    activations alone; a warning gives the error bench_diagnosis measured for its method and
    fraction.
    """
    store = ctx.store
    checkpoint = resolve_checkpoint(store, checkpoint)
    ids = _ids(ctx, samples)
    if using_sample:
        ids = _answered_from(ctx, store, str(samples), ids, str(using_sample))
    else:
        _warn_if_sample(store, str(samples))
    got, values = read_activations(store, checkpoint, layer, ids, reduce)
    n, units = values.shape
    return pa.table({"sample_id": pa.array(np.repeat(got, units), pa.int64()),
                     "neuron": pa.array(np.tile(np.arange(units, dtype=np.int32), n), pa.int32()),
                     "value": pa.array(values.reshape(-1).astype(np.float64), pa.float64())})


@table_function(name="CAPTURE_ACTIVATIONS", columns=CAPTURE_COLUMNS)
def capture(ctx, layers: list, samples: SetName, checkpoint: str = "last",
            reduce: Literal["max", "mean"] = "max", batch_size: Annotated[int, Range(1, 65_536)] = 256,
            reuse: bool = True) -> pa.Table:
    """Captures (by replay at the checkpoint, eval mode, forward hooks only) and stores the
    activations of `layers` for a set's samples; samples already stored are skipped, and a layer
    output that is a stored factor's input X (replayed at that checkpoint) is referenced, not
    written twice (reuse=false writes it anyway). Returns per layer the rows written and held."""
    store = ctx.store
    if getattr(store, "read_only", False):
        raise IOException("the store is open read-only; CAPTURE_ACTIVATIONS writes shards: reopen it writable")
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names or not all(isinstance(n, str) for n in names):
        raise InvalidInputException("layers= should name modules, e.g. layers=[conv2, fc2]")
    return capture_table(store, names, _ids(ctx, samples), checkpoint, reduce, batch_size, reuse,
                         getattr(ctx, "progress", None))


def capture_table(store, layers, ids, checkpoint, reduce, batch_size, reuse, progress=None) -> pa.Table:
    checkpoint = resolve_checkpoint(store, checkpoint)
    try:
        written = capture_activations(store, layers, ids, checkpoint, reduce, batch_size, reuse, progress=progress)
    finally:
        store.committed()
    from metaql.diagnosis.activations import stored_activation_ids
    held = {n: int(np.isin(ids, stored_activation_ids(store, checkpoint, n, reduce)).sum()) for n in layers}
    return pa.table({"layer": pa.array(list(layers), pa.string()),
                     "checkpoint": pa.array([checkpoint] * len(layers), pa.string()),
                     "reduce": pa.array([reduce] * len(layers), pa.string()),
                     "rows_written": pa.array([written[n] for n in layers], pa.int64()),
                     "rows_held": pa.array([held[n] for n in layers], pa.int64())})


@table_function(name="DIAGNOSIS_SAMPLE", columns=SAMPLE_COLUMNS)
def diagnosis_sample_fn(ctx, data: SetName, fraction: Annotated[float, Range(0, 1, open_low=True)] = 0.05,
                        method: Method = "maxmargin", layer: str = "", checkpoint: str = "last",
                        j: Annotated[float, Range(0, 1)] = 0.7, seed: Annotated[int, Range(0, 2 ** 32 - 1)] = 0,
                        reduce: Literal["max", "mean"] = "max") -> pa.Table:
    """A sample of `data` for model-diagnosis queries (papers/004, Algorithm 1): round(fraction * N)
    samples chosen in the latent space of `layer` (the last hidden layer, its activations stored
    for every sample of data) by a max-margin classifier or a Gaussian mixture (full or spherical
    covariance), per class or cluster j of them from the boundary (outlier) end of the likelihood
    ratio order and 1 - j from the exemplar end; or the baselines 'stratified_cm' (confusion-matrix
    cells, needs samples.pred), 'latent_grid' and 'random'. Returns sample_id with how each was
    drawn (stratum: class, cluster, cell or bin; role; score: the ratio or margin). Queries over a
    set made from it are estimates of the full data's answers."""
    store = ctx.store
    ids = _ids(ctx, data)
    cols = store.sample_columns(ids, ["label", "pred"])
    labels, preds = _ints(cols["label"]), _ints(cols["pred"])
    latent = None
    if method in ("maxmargin", "gmm_full", "gmm_spherical", "latent_grid"):
        if not layer:
            raise InvalidInputException(f"method='{method}' draws in a latent space: name its layer, "
                                        "e.g. layer=fc2 (the last hidden layer)")
        _, latent = read_activations(store, resolve_checkpoint(store, checkpoint), layer, ids, reduce)
    if method == "maxmargin" and labels is None:
        raise InvalidInputException("maxmargin fits on the samples' labels, and some samples of "
                                    f"'{data}' have none; use method='gmm_full' (unsupervised)")
    if method in ("gmm_full", "gmm_spherical") and labels is None:
        labels = preds
    if method in ("gmm_full", "gmm_spherical") and labels is None:
        raise InvalidInputException("a GMM sample takes one component per class: label the samples or "
                                    "run con.update_predictions(checkpoint)")
    if latent is None:
        latent = np.zeros((len(ids), 1))
    s = diagnosis_sample(latent, labels if labels is not None else np.zeros(len(ids), np.int64), preds,
                         fraction, method, j, seed)
    m = len(s.positions)
    return pa.table({"sample_id": pa.array(ids[s.positions], pa.int64()),
                     "method": pa.array([method] * m, pa.string()),
                     "fraction": pa.array([fraction] * m, pa.float64()),
                     "j": pa.array([j if method in ("maxmargin", "gmm_full", "gmm_spherical") else None] * m,
                                   pa.float64()),
                     "stratum": pa.array(np.asarray(s.group, np.int64), pa.int64()),
                     "role": pa.array(list(s.role), pa.string()),
                     "score": pa.array(np.asarray(s.score, np.float64), pa.float64(), from_pandas=True)})


def _ints(values: np.ndarray) -> np.ndarray | None:
    """A samples column as int64, None when any sample lacks a value."""
    arr = np.asarray(values)
    if arr.dtype == object:
        if any(v is None for v in arr):
            return None
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        if np.isnan(arr).any():
            return None
        return arr.astype(np.int64)
    return arr.astype(np.int64)


def _ids(ctx, name) -> np.ndarray:
    ids = np.asarray(catalog_of(ctx).set_ids(str(name)), dtype=np.int64)
    if len(ids) == 0:
        raise InvalidInputException(f"the sample set '{name}' is empty")
    return ids


def sample_definition(store, name: str) -> str | None:
    """The defining query of set `name` when it was drawn by DIAGNOSIS_SAMPLE, else None."""
    row = store.db.execute("SELECT definition FROM sets WHERE name = ?", [name]).fetchone()
    return row[0] if row and row[0] and _DRAWN.match(row[0]) else None


def _warn_if_sample(store, name: str) -> None:
    definition = sample_definition(store, name)
    if definition is not None:
        warnings.warn(f"set '{name}' is a diagnosis sample ({' '.join(definition.split())[:200]}): aggregates "
                      "over it estimate those of the data it was drawn from", MetaQLWarning, stacklevel=3)


def _answered_from(ctx, store, name: str, ids: np.ndarray, sample: str) -> np.ndarray:
    """The members of diagnosis sample `sample` within set `name`, with the estimate's warning."""
    definition = sample_definition(store, sample)
    if definition is None:
        raise InvalidInputException(f"using_sample='{sample}' is not a set drawn by DIAGNOSIS_SAMPLE; create one: "
                                    f"CREATE SET {sample} AS SELECT sample_id FROM DIAGNOSIS_SAMPLE(data={name}, ...)")
    members = _ids(ctx, sample)
    kept = ids[np.isin(ids, members)]
    if len(kept) == 0:
        raise InvalidInputException(f"no sample of diagnosis sample '{sample}' is in '{name}'; draw it from '{name}'")
    method, fraction = drawn_with(definition)
    warnings.warn(f"ACTIVATIONS over '{name}' answered from diagnosis sample '{sample}' ({len(kept)} of its "
                  f"{len(ids)} samples; method {method}, fraction {fraction:g}): aggregates are estimates. "
                  f"{measured_error(method, fraction)}", MetaQLWarning, stacklevel=3)
    return kept


_ARG = r"\b{}\s*=\s*'?([A-Za-z_0-9.]+)'?"


def drawn_with(definition: str) -> tuple[str, float]:
    """(method, fraction) of a DIAGNOSIS_SAMPLE call's text, with the function's defaults."""
    method = re.search(_ARG.format("method"), definition)
    fraction = re.search(_ARG.format("fraction"), definition)
    try:
        frac = float(fraction.group(1)) if fraction else 0.05
    except ValueError:
        frac = float("nan")
    return (method.group(1) if method else "maxmargin"), frac


def measured_error(method: str, fraction: float) -> str:
    """The error bench_diagnosis measured for the method at the nearest fraction (its full run
    writes diagnosis/measured_errors.json), or a sentence saying none was measured."""
    import json
    from pathlib import Path
    path = Path(__file__).with_name("measured_errors.json")
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return "No error was measured for it (run benchmarks/bench_diagnosis.py)."
    rows = [r for r in table.get("rows", []) if r.get("method") == method]
    if not rows or not np.isfinite(fraction):
        return f"No error was measured for method {method}."
    r = min(rows, key=lambda r: abs(r["fraction"] - fraction))
    return (f"Measured by {table.get('benchmark', 'bench_diagnosis')} at fraction {r['fraction']:g} (mean over "
            f"(layer, class, correctness)): S1 precision {r['s1_precision']:.3f}, S2 cosine distance "
            f"{r['s2_cosine']:.4f}, S3 Jensen-Shannon distance {r['s3_js']:.3f}.")
