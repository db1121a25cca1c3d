"""A projected index: a random projection of each exact layer's per-sample gradients, kept beside
the exact factors so that a TOPK under error= scans the small projection first (phase 1) and
rescores only its candidates from the exact factors (phase 2, no replay).

Built from the stored exact factors (`build_index`), one artifact per checkpoint
(`artifacts/projected_index/<checkpoint>`, storage/artifacts.py: written as one unit, checked
against its manifest on first load). Per indexed layer it holds, for every stored sample, the
gradient G_i (dout x din', din' = din + bias) projected on ONE side, the wider one:
    G_i P (P: din' x k)   or   P^T G_i (P: dout x k),   P with N(0, 1/k) entries, the layer's seed,
flattened, and ||G_i||_F^2 (exact). One side, not LoGra's two: at equal size the one-sided
estimate has the smaller variance (2/k against 2/k_in + 2/k_out + ...), and its error is a
Gaussian quadratic form, whose tails are exponential (metaql.approx.indexed), not only Chebyshev's.
k is the projected side's width over MIN_GAIN (the index row is at least MIN_GAIN times smaller
than the gradient) or `proj_dim`; a layer whose wider side is under MIN_GAIN * k is not indexed
and is scored exactly in phase 1. The index records the factor shards it was built from: a layer
whose shards changed since (a resumed capture) is scored exactly until the index is built again.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from metaql.approx.kind import is_projected, projectable
from metaql.approx.projection import layer_seed, matrices, project_rows
from metaql.errors import InvalidInputException
from metaql.storage.layers import kind_named

SLOT_KIND = "projected_index"
MIN_GAIN = 4               # index a layer only where its index row is at least this many times smaller
DEFAULT_DIM = 64           # k per projected side
PARTS = ("ids", "g", "sq", "sqin")
INDEXED_KINDS = ("linear",)   # canonical rows X, D with G = D^T [X | 1], as the query's average gradient is laid out


def build_index(con, proj_dim: int | None = None, layers=None, checkpoints=None, seed: int = 0) -> dict:
    """Builds (or rebuilds) the projected index of the given layers (default: every linear layer
    stored as factors whose index row is at least MIN_GAIN times smaller than its gradient) at the
    given checkpoints (default: all); proj_dim fixes k (default: the wider side / MIN_GAIN);
    returns {checkpoint: [indexed layers]}."""
    store = con.store if hasattr(con, "store") else con
    if proj_dim is not None and (isinstance(proj_dim, bool) or not isinstance(proj_dim, int) or proj_dim < 2):
        raise InvalidInputException(f"proj_dim must be a whole number of at least 2, not {proj_dim!r:.40}")
    if store.read_only:
        raise InvalidInputException("the projected index is written into the store: open it writable "
                                    "(without read_only) to build it")
    names = [r[0] for r in store.db.execute("SELECT name FROM layers ORDER BY name").fetchall()]
    chosen = names if layers is None else list(layers)
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise InvalidInputException(f"no captured layer named {unknown[0]!r:.60}; the store has "
                                    f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
    ckpts = [c["name"] for c in store.checkpoints()] if checkpoints is None else list(checkpoints)
    from metaql.storage.artifacts import save_unit
    out = {}
    for ckpt in ckpts:
        entries = {}
        for layer in chosen:
            spec = layer_spec(store, layer, proj_dim, seed, explicit=layers is not None)
            if spec is not None:
                entries[layer] = (spec, _project_layer(store, ckpt, layer, spec))
        save_unit(store.artifact_dir(SLOT_KIND, ckpt), functools.partial(_write, entries))
        out[ckpt] = sorted(entries)
    _cache.clear()
    return out


def layer_spec(store, layer: str, k: int | None, seed: int, explicit: bool) -> dict | None:
    """The layer's projection, or None where it is not indexed (explicitly named layers that cannot
    be are refused with the reason)."""
    meta, stored = store.layer_meta(layer)
    kind = kind_named(meta.kind)
    why = ""
    if is_projected(meta):
        why = "it is stored projected already"
    elif meta.kind not in INDEXED_KINDS:
        why = f"its kind '{meta.kind}' is not one the index projects ({', '.join(INDEXED_KINDS)})"
    elif stored != "factored" or not kind.factored:
        why = f"it is stored {stored}, not as factors"
    numbers = 0
    if not why:
        shards = store.factor_shards(None, layer)
        if shards:
            _, tensors = store.shard_tensors(shards[0])
            why = projectable(kind, meta, tensors)
            numbers = sum(int(np.prod(t.shape[1:])) for t in tensors.values())    # stored per sample
    din, dout = meta.din + int(meta.bias), meta.dout
    k = DEFAULT_DIM if k is None else k
    k_in, k_out = (k if din > k else None), (k if dout > k else None)
    row = (k_in or din) * (k_out or dout)
    if not why and row * MIN_GAIN > min(numbers, din * dout):
        why = (f"its index row ({row} numbers at k={k}) is not {MIN_GAIN}x smaller than what a sample stores "
               f"({min(numbers, din * dout)} numbers)")
    if why:
        if explicit:
            raise InvalidInputException(f"layer '{layer}' cannot be indexed: {why}; leave it out of layers=")
        return None
    return {"seed": layer_seed(seed, layer), "k_in": k_in, "k_out": k_out, "din": din, "dout": dout,
            "bias": bool(meta.bias)}


def _project_layer(store, ckpt: str, layer: str, spec: dict):
    """(ids, G~ rows (n, k_out k_in) float32, {"sq": exact ||G||^2, "sqin": ||G P_in||^2} (n,) float64,
    shard files) of one layer."""
    from metaql.storage.norms import squared_norms
    meta, stored = store.layer_meta(layer)
    kind = kind_named(meta.kind)
    ids, rows, sq, sqin, files = [], [], [], [], []
    half = dict(spec, k_out=None)          # P_in only: ||G P_in||_F bounds the P_out stage's error
    for row in store.factor_shards(ckpt, layer):
        sid, tensors = store.shard_tensors(row)
        x, d = kind.rows(meta, tensors)
        with torch.no_grad():
            px, pd = project_rows(x, d, meta.bias, spec)
            g = torch.einsum("nso,nsi->noi", pd, px).reshape(len(sid), -1)
            hx, hd = project_rows(x, d, meta.bias, half)
            gin = torch.einsum("nso,nsi->noi", hd.double(), hx.double())
        ids.append(np.asarray(sid, np.int64))
        rows.append(g.float().numpy())
        sq.append(squared_norms(kind, meta, stored, tensors))
        sqin.append((gin ** 2).sum((1, 2)).numpy())
        files.append(row["file"])
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32), {"sq": np.zeros(0), "sqin": np.zeros(0)}, files
    return np.concatenate(ids), np.concatenate(rows), {"sq": np.concatenate(sq), "sqin": np.concatenate(sqin)}, files


def _write(entries: dict, directory: Path) -> None:
    manifest = {}
    for i, (layer, (spec, (ids, g, norms, files))) in enumerate(sorted(entries.items())):
        order = np.argsort(ids, kind="stable")
        np.save(directory / f"{i}.ids.npy", ids[order])
        np.save(directory / f"{i}.g.npy", np.ascontiguousarray(g[order]))
        for part in PARTS[2:]:
            np.save(directory / f"{i}.{part}.npy", norms[part][order])
        manifest[layer] = {"file": str(i), "spec": spec, "shards": sorted(files)}
    (directory / "index.json").write_text(json.dumps(manifest))


_cache: dict[str, dict] = {}      # version directory -> loaded index (checked against its manifest once)


def load_index(store, ckpt: str) -> dict:
    """{layer: {"spec", "shards", "ids", "g", "sq"}} of the checkpoint's index ({} when none), the
    arrays memory-mapped."""
    from metaql.storage.artifacts import current_version, is_saved, load_unit
    try:
        slot = store.artifact_dir(SLOT_KIND, ckpt)
    except Exception:      # noqa: BLE001 - a checkpoint name that is not a safe artifact name has no index
        return {}
    if not is_saved(slot):
        return {}
    key = str(current_version(slot))
    if key not in _cache:
        _cache[key] = load_unit(slot, _read)
    return _cache[key]


def _read(directory: Path) -> dict:
    manifest = json.loads((directory / "index.json").read_text())
    return {layer: {**e, **{part: np.load(directory / f"{e['file']}.{part}.npy", mmap_mode="r")
                            for part in PARTS}} for layer, e in manifest.items()}


def usable(index: dict, store, ckpt: str, layer: str) -> dict | None:
    """The layer's index entry when it covers exactly the layer's current factor shards, else None."""
    entry = index.get(layer)
    if entry is None:
        return None
    current = sorted(r["file"] for r in store.factor_shards(ckpt, layer))
    return entry if current == entry["shards"] else None


def projected_query(entry: dict, gbar_flat: torch.Tensor) -> np.ndarray:
    """P_out^T Gq P_in of the query's average gradient (dout x din'), flattened as the index rows."""
    spec = entry["spec"]
    gq = gbar_flat.detach().float().cpu().reshape(spec["dout"], spec["din"])
    p_in, p_out = matrices(spec["seed"], spec["din"], spec["k_in"], spec["dout"], spec["k_out"])
    if p_in is not None:
        gq = gq @ p_in
    if p_out is not None:
        gq = p_out.T @ gq
    return gq.reshape(-1).double().numpy()


def indexed_scores(entry: dict, train: np.ndarray, gq: np.ndarray):
    """(estimated scores, {"sq", "sqin"} per sample, found) of the sorted training ids from the index."""
    ids = entry["ids"]
    pos = np.minimum(np.searchsorted(ids, train), max(len(ids) - 1, 0))
    found = (ids[pos] == train) if len(ids) else np.zeros(len(train), bool)
    scores = np.zeros(len(train))
    norms = {part: np.zeros(len(train)) for part in PARTS[2:]}
    rows = pos[found]
    if len(rows):
        g = entry["g"] if len(rows) == len(ids) else entry["g"][rows]      # all of it: no gathered copy
        scores[found] = np.asarray(g, np.float32) @ gq.astype(np.float32)
        for part in norms:
            norms[part][found] = entry[part][rows]
    return scores, norms, found


def query_norms(spec: dict, gbar_flat: torch.Tensor) -> dict:
    """The query gradient's norms the error bounds use: ||Gq||_2, ||Gq||_F, ||Gq P_in||_2."""
    gq = gbar_flat.detach().double().cpu().reshape(spec["dout"], spec["din"])
    p_in, _ = matrices(spec["seed"], spec["din"], spec["k_in"], spec["dout"], spec["k_out"])
    gin = gq @ p_in.double() if p_in is not None else gq
    return {"spec": spectral_norm(gq), "fro": float(gq.norm()), "spec_in": spectral_norm(gin)}


def spectral_norm(m: torch.Tensor) -> float:
    """||m||_2 from the largest eigenvalue of the smaller Gram matrix (float64): several times
    cheaper than an SVD of the whole 1536 x 385 query gradient."""
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    return float(torch.linalg.eigvalsh(gram)[-1].clamp(min=0).sqrt())
