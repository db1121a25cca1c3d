"""A projected index: a random projection of each exact layer's per-sample gradients, kept beside
the exact factors so that a TOPK under error= scans the small projection first (phase 1) and
rescores only its candidates from the exact factors (phase 2, no replay).

Built from the stored exact factors (`build_index`), one artifact per checkpoint
(`artifacts/projected_index/<checkpoint>`, storage/artifacts.py: written as one unit, checked
against its manifest on first load). Per indexed layer it holds, for every stored sample, the
gradient G_i (dout x din', din' = din + bias) projected on each side wider than k:
    P_out^T G_i P_in   (P_in: din' x k, P_out: dout x k, N(0, 1/k) entries from the layer's seed;
a side not wider than k is kept), flattened, with ||G_i||_F^2 and ||G_i P_in||_F^2 (exact). Its
error is a Gaussian quadratic form in each stage, whose tails are exponential
(metaql.approx.indexed), not only Chebyshev's. k is `proj_dim` (default DEFAULT_DIM); a layer
whose index row is not MIN_GAIN times smaller than what a sample stores is not indexed and is
scored exactly in phase 1. The index records the factor shards it was built from: a layer
whose shards changed since (a resumed capture) is scored exactly until the index is built again.

Beside the projection, each indexed layer keeps an exact subspace part (metaql.approx.subspace):
orthonormal bases U (dout x r), V (din' x r) of the training gradients' top-r singular subspaces
and every sample's c_i = [U^T G_i, G_i V]; the projected rows and the norms are those of the
residual G_i^res = (I - U U^T) G_i (I - V V^T), so only the query's residual R is estimated.
r is `rank` or less: the largest whose row (k_in k_out + r (din' + dout)) keeps MIN_GAIN.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from metaql.approx.kind import is_projected, projectable
from metaql.approx.projection import layer_seed, matrices
from metaql.approx.spectral import spectral_bound
from metaql.approx.subspace import BASIS_SAMPLES, bases, exact_coordinates, query_split, residual_rows, \
    residual_squared_norms, with_bias
from metaql.errors import InvalidInputException
from metaql.storage.layers import kind_named

SLOT_KIND = "projected_index"
MIN_GAIN = 4               # index a layer only where its index row is at least this many times smaller
DEFAULT_DIM = 64           # k per projected side
DEFAULT_RANK = 2           # r of the exact subspace part (at most; MiniLM attention layers fit r = 2 at k = 64)
PARTS = ("ids", "g", "sq", "sqin", "c")
BASES = ("u", "v")
CHUNK = 128                # samples projected at once
INDEXED_KINDS = ("linear",)   # canonical rows X, D with G = D^T [X | 1], as the query's average gradient is laid out


def build_index(con, proj_dim: int | None = None, layers=None, checkpoints=None, seed: int = 0,
                rank: int = DEFAULT_RANK) -> dict:
    """Builds (or rebuilds) the projected index of the given layers (default: every linear layer
    stored as factors whose index row is at least MIN_GAIN times smaller than its gradient) at the
    given checkpoints (default: all); proj_dim fixes k (default: the wider side / MIN_GAIN); rank
    bounds r of the exact subspace part (0: projection alone); returns {checkpoint: [indexed layers]}."""
    store = con.store if hasattr(con, "store") else con
    if proj_dim is not None and (isinstance(proj_dim, bool) or not isinstance(proj_dim, int) or proj_dim < 2):
        raise InvalidInputException(f"proj_dim must be a whole number of at least 2, not {proj_dim!r:.40}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise InvalidInputException(f"rank must be a whole number of at least 0, not {rank!r:.40}")
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
            spec = layer_spec(store, layer, proj_dim, seed, explicit=layers is not None, rank=rank)
            if spec is not None:
                data = _project_layer(store, ckpt, layer, spec)
                entries[layer] = (spec, data, timed_costs(store, ckpt, layer, spec, data))
        save_unit(store.artifact_dir(SLOT_KIND, ckpt), functools.partial(_write, entries))
        out[ckpt] = sorted(entries)
    _cache.clear()
    return out


def layer_spec(store, layer: str, k: int | None, seed: int, explicit: bool, rank: int = 0) -> dict | None:
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
    budget = min(numbers, din * dout) // MIN_GAIN - row       # numbers left for the exact part
    r = max(0, min(rank, budget // (din + dout), din, dout))
    return {"seed": layer_seed(seed, layer), "k_in": k_in, "k_out": k_out, "din": din, "dout": dout,
            "bias": bool(meta.bias), "rank": int(r)}


def _project_layer(store, ckpt: str, layer: str, spec: dict):
    """(ids, residual rows (n, k_out k_in) float32, {"sq": ||G^res||^2, "sqin": ||G^res P_in||^2}
    (n,) float64 and "c" (n, r (din' + dout)) float32, shard files, {"u", "v"} bases) of one layer."""
    meta, _ = store.layer_meta(layer)
    kind = kind_named(meta.kind)
    shards = [(row["file"], *store.shard_tensors(row)) for row in store.factor_shards(ckpt, layer)]
    u, v = layer_bases(kind, meta, spec, shards)
    p_in, p_out = (None if p is None else p.double() for p in
                   matrices(spec["seed"], spec["din"], spec["k_in"], spec["dout"], spec["k_out"]))
    ids, out, files = [], {part: [] for part in PARTS[1:]}, []
    for file, sid, tensors in shards:
        for lo in range(0, len(sid), CHUNK):
            x, d = kind.rows(meta, {n: t[lo:lo + CHUNK] for n, t in tensors.items()})
            x = with_bias(x, meta.bias)
            with torch.no_grad():
                for part, value in chunk_parts(x, d, u, v, p_in, p_out).items():
                    out[part].append(value)
        ids.append(np.asarray(sid, np.int64))
        files.append(file)
    if not ids:
        empty = {"g": np.zeros((0, 0), np.float32), "sq": np.zeros(0), "sqin": np.zeros(0),
                 "c": np.zeros((0, 0), np.float32)}
        return np.zeros(0, np.int64), empty, files, {"u": u.numpy(), "v": v.numpy()}
    return np.concatenate(ids), {part: np.concatenate(vals) for part, vals in out.items()}, files, \
        {"u": u.numpy(), "v": v.numpy()}


def layer_bases(kind, meta, spec: dict, shards: list) -> tuple[torch.Tensor, torch.Tensor]:
    """U, V of the layer's first BASIS_SAMPLES samples (zero columns at rank 0)."""
    r = spec.get("rank", 0)
    if r == 0 or not shards:
        return torch.zeros(spec["dout"], 0, dtype=torch.float64), torch.zeros(spec["din"], 0, dtype=torch.float64)
    xs, ds, n = [], [], 0
    for _, sid, tensors in shards:
        x, d = kind.rows(meta, {name: t[:BASIS_SAMPLES - n] for name, t in tensors.items()})
        xs.append(with_bias(x, meta.bias))
        ds.append(d)
        n += len(x)
        if n >= BASIS_SAMPLES:
            break
    return bases(torch.cat(xs), torch.cat(ds), r, spec["seed"])


def chunk_parts(x, d, u, v, p_in, p_out) -> dict:
    """One chunk's index parts: exact coordinates, projected residual rows and residual norms."""
    xr, dr = residual_rows(x, d, u, v)
    px = xr @ p_in if p_in is not None else xr
    pd = dr @ p_out if p_out is not None else dr
    return {"g": torch.einsum("nso,nsi->noi", pd, px).reshape(len(x), -1).float().numpy(),
            "sq": residual_squared_norms(xr, dr).numpy(),
            "sqin": residual_squared_norms(px, dr).numpy(),
            "c": exact_coordinates(x, d, u, v).float().numpy()}


COST_QUERY = 8             # samples averaged into the query gradient timed_costs splits
COST_ROWS = 128            # random samples timed_costs gathers


def timed_costs(store, ckpt: str, layer: str, spec: dict, data) -> dict:
    """What the optimizer's estimate of the index route (approx/route.py) needs of this layer, timed
    by the cost model's clock (engine/cost.work_clock), the mean of two runs (the first as a query's
    first in a process, drawing the projection; the second warm): `split` (seconds of query_parts
    on the average gradient of its first COST_QUERY samples, a query's shape: nearly rank one),
    `scan_row` (seconds per sample of the phase-1 scan of the whole layer), `gather` (seconds of
    gathering one sample's rows from the shards, opening them, as the rescoring does), `gather_byte`
    (seconds per further byte, from COST_ROWS random samples) and `sample_bytes` (what a sample
    stores of the layer)."""
    from metaql.approx.indexed import gathered_rows
    from metaql.engine.cost import work_clock
    ids, parts, _, basis = data
    if len(ids) == 0:
        return {"split": 0.0, "scan_row": 0.0, "gather": 0.0, "gather_byte": 0.0, "sample_bytes": 0}
    order = np.argsort(ids, kind="stable")
    entry = {"spec": spec, "u": basis["u"], "v": basis["v"], "ids": ids[order],
             **{part: parts[part][order] for part in PARTS[1:]}}
    meta, _ = store.layer_meta(layer)
    kind = kind_named(meta.kind)
    first = store.factor_shards(ckpt, layer)[0]
    _, tensors = store.shard_tensors(first)
    x, d = kind.rows(meta, {name: t[:COST_QUERY] for name, t in tensors.items()})
    gq = torch.einsum("nso,nsi->oi", d.double(), with_bias(x, meta.bias).double()) / len(x)
    sample_bytes = sum(int(np.prod(t.shape[1:])) * t.element_size() for t in tensors.values())
    rows = np.sort(np.random.default_rng(0).choice(entry["ids"], min(COST_ROWS, len(ids)), replace=False))

    def timed(fn) -> float:
        times = []
        for _ in range(2):
            t0 = work_clock()
            fn()
            times.append(work_clock() - t0)
        return sum(times) / len(times)
    split = timed(lambda: query_parts(entry, gq.reshape(-1)))
    q = query_parts(entry, gq.reshape(-1))
    scan = timed(lambda: indexed_scores(entry, entry["ids"], q))
    one = timed(lambda: gathered_rows(store, ckpt, layer, rows[:1]))
    more = max(timed(lambda: gathered_rows(store, ckpt, layer, rows)) - one, 0.0) / max(len(rows) - 1, 1)
    return {"split": split, "scan_row": scan / len(ids), "gather": one, "gather_byte": more / max(sample_bytes, 1),
            "sample_bytes": sample_bytes}


def _write(entries: dict, directory: Path) -> None:
    manifest = {}
    for i, (layer, (spec, (ids, parts, files, basis), costs)) in enumerate(sorted(entries.items())):
        order = np.argsort(ids, kind="stable")
        np.save(directory / f"{i}.ids.npy", ids[order])
        for part in PARTS[1:]:
            np.save(directory / f"{i}.{part}.npy", np.ascontiguousarray(parts[part][order]))
        for part in BASES:
            np.save(directory / f"{i}.{part}.npy", basis[part])
        manifest[layer] = {"file": str(i), "spec": spec, "shards": sorted(files), "costs": costs}
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
    return {layer: _entry(directory, e) for layer, e in manifest.items()}


def _entry(directory: Path, e: dict) -> dict:
    """One layer's manifest entry with its arrays; an index built before the subspace part (no
    "c", "u", "v" files) reads as rank 0."""
    out = dict(e)
    for part in PARTS + BASES:
        path = directory / f"{e['file']}.{part}.npy"
        out[part] = np.load(path, mmap_mode="r") if path.exists() else None
    n, spec = len(out["ids"]), e["spec"]
    if out["c"] is None:
        out["c"] = np.zeros((n, 0), np.float32)
        out["u"], out["v"] = np.zeros((spec["dout"], 0)), np.zeros((spec["din"], 0))
    return out


def usable(index: dict, catalog, ckpt: str, layer: str) -> dict | None:
    """The layer's index entry when it covers exactly the layer's current factor shards (`catalog`:
    the store or a statement's snapshot of it), else None."""
    entry = index.get(layer)
    if entry is None:
        return None
    current = sorted(r["file"] for r in catalog.factor_shards(ckpt, layer))
    return entry if current == entry["shards"] else None


def query_parts(entry: dict, gbar_flat: torch.Tensor) -> dict:
    """The query's average gradient Gq (dout x din') as the index scores it: {"c": its exact
    coordinates [U^T Gq, (I - U U^T) Gq V], "g": P_out^T R P_in flattened as the index rows,
    "norms": R's norms the error bounds use (query_norms)} (metaql.approx.subspace)."""
    spec = entry["spec"]
    gq = gbar_flat.detach().double().cpu().reshape(spec["dout"], spec["din"])
    cq, res = query_split(gq, torch.from_numpy(np.asarray(entry["u"], np.float64)),
                          torch.from_numpy(np.asarray(entry["v"], np.float64)))
    p_in, p_out = matrices(spec["seed"], spec["din"], spec["k_in"], spec["dout"], spec["k_out"])
    gin = res @ p_in.double() if p_in is not None else res
    proj = p_out.double().T @ gin if p_out is not None else gin
    return {"c": cq.numpy(), "g": proj.reshape(-1).numpy(), "norms": query_norms(spec, res, gin)}


def indexed_scores(entry: dict, train: np.ndarray, query: dict):
    """(estimated scores, {"sq", "sqin"} per sample, found) of the sorted training ids from the
    index: the exact subspace part plus the projected residual's."""
    ids = entry["ids"]
    pos = np.minimum(np.searchsorted(ids, train), max(len(ids) - 1, 0))
    found = (ids[pos] == train) if len(ids) else np.zeros(len(train), bool)
    scores = np.zeros(len(train))
    norms = {part: np.zeros(len(train)) for part in ("sq", "sqin")}
    rows = pos[found]
    if len(rows):
        every = len(rows) == len(ids)          # all of it: no gathered copy
        g, c = (entry[p] if every else entry[p][rows] for p in ("g", "c"))
        scores[found] = _product(g, query["g"], np.float32)
        if c.shape[1]:
            scores[found] += _product(c, query["c"], np.float64)
        for part in norms:
            norms[part][found] = entry[part][rows]
    return scores, norms, found


def _product(rows: np.ndarray, vector: np.ndarray, dtype) -> np.ndarray:
    """rows @ vector by torch, which keeps to torch's thread count: numpy's BLAS runs its own
    threads, which then spin after each product (at one torch thread, the index TOPK's split and
    scan took 2x their thread's CPU time in process CPU, and the spinning held the second core)."""
    import warnings
    with warnings.catch_warnings():        # a read-only memory map: torch only reads it
        warnings.simplefilter("ignore", UserWarning)
        m = torch.from_numpy(np.asarray(rows, dtype))
    return torch.mv(m, torch.from_numpy(np.ascontiguousarray(vector, dtype))).numpy()


def query_norms(spec: dict, gq: torch.Tensor, gin: torch.Tensor | None = None) -> dict:
    """The norms of the estimated query part (R, or the whole Gq at rank 0) that the error bounds
    use: ||R||_2, ||R||_F, ||R P_in||_2 (gin: R P_in when already computed)."""
    gq = gq.detach().double().cpu().reshape(spec["dout"], spec["din"])
    if gin is None:
        p_in, _ = matrices(spec["seed"], spec["din"], spec["k_in"], spec["dout"], spec["k_out"])
        gin = gq @ p_in.double() if p_in is not None else gq
    return {"spec": spectral_norm(gq), "fro": float(gq.norm()), "spec_in": spectral_norm(gin)}


def spectral_norm(m: torch.Tensor) -> float:
    """An upper bound on ||m||_2 with its rounding margins, at most 0.5% above it: the cheapest of
    a Ritz value from power steps with a bound from tr(A), tr(A^4) or tr(A^8), or the float32
    eigensolve of the smaller Gram matrix A (metaql.approx.spectral)."""
    return spectral_bound(m)[0]
