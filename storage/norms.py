"""Per-sample squared gradient norms of every factor shard, kept in the catalog's `sample_norms`.

They are written with the shard's row (Store.write_factor_shards), in the same transaction, at the
cost of one factored self-product per sample (engine.operators.squared_norm, the operator
SELF_INFLUENCE uses). A TOPK over INFLUENCE bounds each training sample's score with them
(engine/pruning.py: |<g_i, G>| <= ||g_i|| ||G||) and skips the rows that cannot enter the top k.

Norms are computed as the scan computes scores (float32 operators); the pruning bounds carry a
margin far above their rounding. A store captured before this table existed has no
norms: a writable store computes them on first use (`backfill`), a read-only one is scanned in full.
"""
from __future__ import annotations

import numpy as np
import torch

TABLE = "sample_norms"
CHUNK_NUMBERS = 32 * 2 ** 20     # bound on one chunk's intermediates (numbers), as the executor's


EXACT_MODES = ("factored", "full")     # storage modes whose stored gradient is the exact one
NUCLEAR_KINDS = ("linear", "hf_conv1d")     # rows X, D dense and canonical: g = sum_s d_s x_s^T


def shard_norms(kind, meta, stored: str, tensors: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray | None]:
    """(||g_n||^2, a bound on the nuclear norm ||g_n||_* or None) of every sample of one shard,
    in float64, chunked so intermediates stay bounded."""
    sq = squared_norms(kind, meta, stored, tensors)
    if stored != "factored" or meta.kind not in NUCLEAR_KINDS:
        return sq, None
    return sq, nuclear_bounds(kind, meta, tensors)


def nuclear_bounds(kind, meta, tensors) -> np.ndarray:
    """sum_s ||d_s|| ||[x_s, 1]|| >= ||sum_s d_s [x_s, 1]^T||_* (the triangle inequality on rank-one
    terms); equal to the Frobenius norm when a sample has one row. With the spectral norm of the
    query's gradient it bounds a score more tightly than Cauchy-Schwarz (Hoelder's inequality)."""
    n = next(iter(tensors.values())).shape[0]
    out = np.zeros(n)
    step = max(1, CHUNK_NUMBERS // max(1, sum(int(np.prod(t.shape[1:])) for t in tensors.values())))
    for lo in range(0, n, step):
        x, d = kind.rows(meta, {k: v[lo:lo + step] for k, v in tensors.items()})
        # row norms in float32 (relative error ~1e-6 on rows of thousands, far inside the bounds'
        # 1e-3 margin), summed in float64: a float64 copy of the rows cost the writer thread 2x
        xs = torch.linalg.vector_norm(x.float(), dim=-1).double()
        if meta.bias:
            xs = (xs * xs + 1.0).sqrt()
        out[lo:lo + step] = (xs * torch.linalg.vector_norm(d.float(), dim=-1).double()).sum(-1).numpy()
    return out


def squared_norms(kind, meta, stored: str, tensors: dict[str, torch.Tensor]) -> np.ndarray:
    """||g_n||^2 of every sample of one shard (float64), chunked so intermediates stay bounded."""
    from metaql.engine import operators as ops
    n = next(iter(tensors.values())).shape[0]
    per_sample = max(1, sum(int(np.prod(t.shape[1:])) for t in tensors.values()))
    params = meta.params
    step = max(1, CHUNK_NUMBERS // max(per_sample, params if stored == "factored" else 1))
    out = np.zeros(n)
    for lo in range(0, n, step):
        chunk = {k: v[lo:lo + step] for k, v in tensors.items()}
        if stored == "full" or not kind.factored:
            g = kind.full(meta, chunk).double()
            out[lo:lo + step] = (g * g).sum(1).numpy()
        else:
            out[lo:lo + step] = _factored_norms(kind, meta, chunk, ops)
    return out


def _factored_norms(kind, meta, chunk, ops) -> np.ndarray:
    """The squared norms by the operator SELF_INFLUENCE uses (float32, the scan's precision: its
    relative error, about 1e-6, is far inside the bounds' 1e-3 margin, engine/pruning.py)."""
    return ops.squared_norm(kind, meta, chunk).double().cpu().numpy()


def entry_rows(store, checkpoint: str, entries: list[dict], rels: dict[str, str],
               metas: dict | None = None) -> list[tuple]:
    """(checkpoint, layer, file, sample ids, squared norms) of each shard a flush writes; a layer
    whose input another entry (or an existing shard) holds gets that input from there. A layer
    whose kind is not registered in this process gets no rows (its shards are scanned in full).
    `metas`: Store.layer_metas of the entries' layers, when the caller read them already."""
    from metaql.errors import CatalogException
    from metaql.storage.layers import kind_named
    by_layer = {e["layer"]: e for e in entries}
    metas = store.layer_metas([e["layer"] for e in entries]) if metas is None else metas
    rows: list[tuple] = []
    for e in entries:
        if e["layer"] not in metas:
            continue
        meta, stored = metas[e["layer"]]
        try:
            kind = kind_named(meta.kind)
        except CatalogException:
            continue
        if (e.get("storage") or stored) not in EXACT_MODES:
            continue
        tensors = dict(e["tensors"])
        if e.get("suffix_of") or e.get("suffix_file"):
            tensors.update(_suffix(store, kind, e, by_layer))
        sq, nuc = shard_norms(kind, meta, e.get("storage") or stored, tensors)
        rows.append((checkpoint, e["layer"], rels[e["layer"]], np.asarray(e["ids"], np.int64), sq, nuc))
    return rows


def _suffix(store, kind, entry: dict, by_layer: dict) -> dict[str, torch.Tensor]:
    name = kind.suffix_name()
    if entry.get("suffix_of"):
        return {name: by_layer[entry["suffix_of"]]["tensors"][name]}
    row = store.db.execute("SELECT checksum FROM shards WHERE file = ?", [entry["suffix_file"]]).fetchone()
    shard = store.open_shard(entry["suffix_file"], row[0])
    return {name: shard.tensor(name)}


def insert(db, rows: list[tuple]) -> None:
    """Every shard's rows in one statement, as an Arrow table that DuckDB scans without a copy
    (one statement per shard with the ids and norms as Python lists cost 6 ms of held GIL per
    2,700 samples, most of it turning the lists into DuckDB values)."""
    if not rows:
        return
    db.from_arrow(arrow_rows(rows)).insert_into(TABLE)


def arrow_rows(rows: list[tuple]):
    """The rows of `sample_norms` (its columns in order) of every shard in `rows`."""
    import pyarrow as pa
    counts = [len(ids) for _, _, _, ids, _, _ in rows]

    def repeated(values):   # one value per shard, as a dictionary column: no string per row
        return pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(len(rows), dtype=np.int32), counts)),
                                              pa.array(values, pa.string()))
    nuc = [np.full(len(ids), np.nan) if b is None else np.asarray(b, np.float64) for _, _, _, ids, _, b in rows]
    nuc_mask = np.concatenate([np.full(n, b is None) for n, (*_, b) in zip(counts, rows)])
    return pa.table({
        "checkpoint": repeated([r[0] for r in rows]), "layer": repeated([r[1] for r in rows]),
        "file": repeated([r[2] for r in rows]),
        "sample_id": pa.array(np.concatenate([np.asarray(r[3], np.int64) for r in rows])),
        "sq_norm": pa.array(np.concatenate([np.asarray(r[4], np.float64) for r in rows])),
        "nuc_bound": pa.array(np.concatenate(nuc), mask=nuc_mask)})


def stored_norms(store, checkpoints: list[str], layers: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """{shard file: {"ids", "sq"}} of every factor shard of the given checkpoints and layers that
    has norms (one round trip); a shard missing here has none."""
    import duckdb
    try:
        rel = store.db.execute(
            f"SELECT n.file, n.sample_id, n.sq_norm, n.nuc_bound FROM {TABLE} n JOIN shards s ON s.file = n.file "
            "WHERE s.kind = 'factors' AND s.checkpoint IN (SELECT unnest(?)) AND s.layer IN (SELECT unnest(?)) "
            "ORDER BY n.file, n.sample_id", [list(checkpoints), list(layers)])
    except duckdb.CatalogException:      # a store written before the table, opened read-only
        return {}
    cols = rel.fetchnumpy()
    files, ids, sq = cols["file"], cols["sample_id"], cols["sq_norm"]
    nuc = np.ma.filled(np.ma.asarray(cols["nuc_bound"], dtype=np.float64), np.nan)   # NULL: no nuclear bound
    out: dict[str, dict[str, np.ndarray]] = {}
    if len(files) == 0:
        return out
    files = np.asarray(files, dtype=object)
    edges = np.flatnonzero(files[1:] != files[:-1]) + 1
    for lo, hi in zip(np.r_[0, edges], np.r_[edges, len(files)]):
        out[str(files[lo])] = {"ids": np.asarray(ids[lo:hi], np.int64), "sq": np.asarray(sq[lo:hi], np.float64),
                               "nuc": nuc[lo:hi]}
    return out


def backfill(store, shard_rows: list[dict], checksum_of=None) -> int:
    """Computes and keeps the norms of the given factor shards (a store captured before norms were
    kept); returns the rows written. Each shard's rows commit together."""
    from metaql.storage.catalog import transaction
    from metaql.storage.layers import kind_named
    written = 0
    for row in shard_rows:
        meta, stored = store.layer_meta(row["layer"])
        ids, tensors = store.shard_tensors(row, checksum_of=checksum_of)
        sq, nuc = shard_norms(kind_named(meta.kind), meta, row.get("storage") or stored, tensors)
        with transaction(store.db):
            store.db.execute(f"DELETE FROM {TABLE} WHERE file = ?", [row["file"]])
            insert(store.db, [(row["checkpoint"], row["layer"], row["file"], np.asarray(ids, np.int64), sq, nuc)])
        written += len(ids)
    if written:
        store.committed(force=False)
    return written
