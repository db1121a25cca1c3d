"""A MetaQL store: a directory holding the DuckDB catalog, the Arrow shard files and the weights.

    STORE/catalog.duckdb                         the catalog (storage/catalog.py)
    STORE/tensors/<checkpoint>/<layer>/NNNNNN.arrow   per-sample factors, one file per shard
    STORE/inputs/NNNNNN.arrow                    registered sample inputs (for replay)
    STORE/weights/<checkpoint>.safetensors       model weights per checkpoint
    STORE/artifacts/<kind>/<name>/               state kept by table functions (ELITE, LANCET)

A shard's file is complete on disk (written, synced, renamed) before the catalog row that names it
commits, so a crash leaves at worst an unnamed file, which the next writable open deletes.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from metaql.engine.errors import BinderException, CatalogException, IOException, InvalidInputException
from metaql.storage import models as model_files
from metaql.storage.catalog import open_catalog, query_arrow, register, require_name, transaction, unregister
from metaql.storage.layers import LayerMeta, kind_named
from metaql.storage.tensorfile import Shard, file_checksum, write_shard

_SAFE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
SHARD_CACHE = 16
MAX_LR = 1e6     # a checkpoint's weight in every score: beyond this, sums of products overflow doubles


class Store:
    def __init__(self, path: str | Path = ":memory:", read_only: bool = False):
        self._tmpdir = None
        if str(path) == ":memory:":
            self._tmpdir = tempfile.mkdtemp(prefix="metaql-")
            path = self._tmpdir
        self.root = Path(path).resolve()
        self.read_only = read_only
        if read_only and not (self.root / "catalog.duckdb").exists():
            raise IOException(f"no MetaQL store at {self.root} (no catalog.duckdb); "
                              "open it without read_only to create one")
        if (self.root.exists() and not self.root.is_dir()):
            raise IOException(f"{self.root} is a file; a store is a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = open_catalog(self.root / "catalog.duckdb", read_only)
        self._shards: OrderedDict[str, Shard] = OrderedDict()
        self._verified: set[str] = set()
        self.live_model: nn.Module | None = None
        if not read_only:
            self._remove_orphans()

    # ---- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self._shards.clear()
        try:
            self.db.close()
        finally:
            if self._tmpdir:
                shutil.rmtree(self._tmpdir, ignore_errors=True)

    def _remove_orphans(self) -> None:
        """Deletes files a crashed writer left behind: temporaries and shards no row names."""
        known = {r[0] for r in self.db.execute("SELECT file FROM shards").fetchall()}
        for sub in ("tensors", "inputs"):
            for f in (self.root / sub).rglob("*") if (self.root / sub).exists() else []:
                rel = f.relative_to(self.root).as_posix()
                if f.is_file() and (f.suffix == ".tmp" or rel not in known):
                    f.unlink()

    def _writable(self) -> None:
        if self.read_only:
            raise IOException("the store is open read-only; reopen it without read_only to change it")

    # ---- plain SQL over the catalog ---------------------------------------------------------
    def sql(self, text: str, params: Any = None):
        return self.db.execute(text, params) if params is not None else self.db.execute(text)

    # ---- samples ------------------------------------------------------------------------------
    def add_samples(self, ids, split: str, labels=None, inputs: torch.Tensor | np.ndarray | None = None,
                    columns: dict[str, Iterable] | None = None, shard_size: int = 4096) -> int:
        """Registers samples (and their inputs, for replay); all or nothing."""
        self._writable()
        ids = _as_ids(ids)
        if len(ids) == 0:
            raise InvalidInputException("add_samples got no sample ids")
        if len(np.unique(ids)) != len(ids):
            raise InvalidInputException("add_samples got duplicate sample ids")
        n = len(ids)
        labels_arr = None if labels is None else _class_labels(labels)
        if labels_arr is not None and len(labels_arr) != n:
            raise InvalidInputException(f"{n} ids but {len(labels_arr)} labels")
        if inputs is not None:
            inputs = torch.as_tensor(inputs)
            if inputs.shape[0] != n:
                raise InvalidInputException(f"{n} ids but {inputs.shape[0]} inputs")
            if inputs.is_floating_point() and not torch.isfinite(inputs).all():
                raise InvalidInputException("inputs contain NaN or infinite values; clean them first")
        columns = {k: np.asarray(list(v) if not hasattr(v, "__len__") else v) for k, v in (columns or {}).items()}
        for k, v in columns.items():
            if len(v) != n:
                raise InvalidInputException(f"column '{k}' has {len(v)} values for {n} ids")
        clash = self.db.execute("SELECT count(*) FROM samples WHERE sample_id IN (SELECT unnest(?))",
                                [ids.tolist()]).fetchone()[0]
        if clash:
            raise InvalidInputException(f"{clash} of these sample ids are already registered")
        table = {"sample_id": ids, "split": np.full(n, split, dtype=object),
                 "label": labels_arr.astype(np.int64) if labels_arr is not None else np.full(n, None)}
        written: list[Path] = []
        try:
            with transaction(self.db):
                for k, v in columns.items():
                    self._ensure_column(k, v)
                arrow = pa.table({**table, **columns})
                register(self.db, "_new_samples", arrow)
                cols = ", ".join(arrow.column_names)
                self.db.execute(f"INSERT INTO samples ({cols}) SELECT {cols} FROM _new_samples")
                unregister(self.db, "_new_samples")
                if inputs is not None:
                    for start in range(0, n, shard_size):
                        sl = slice(start, start + shard_size)
                        written.append(self.root / self._write_shard_row("inputs", None, None, ids[sl],
                                                                         {"input": inputs[sl]}))
        except BaseException:
            for f in written:
                f.unlink(missing_ok=True)
            raise
        return n

    def _ensure_column(self, name: str, values: np.ndarray) -> None:
        if not _SAFE_NAME.match(name) or "." in name:
            raise InvalidInputException(f"column name '{name}' must be a plain identifier")
        existing = {r[0] for r in self.db.execute("SELECT column_name FROM information_schema.columns "
                                                  "WHERE table_name = 'samples'").fetchall()}
        if name not in existing:
            sqltype = pa.array(values).type
            duck = {"int64": "BIGINT", "double": "DOUBLE", "float": "DOUBLE", "bool": "BOOLEAN"}.get(
                str(sqltype), "VARCHAR")
            self.db.execute(f'ALTER TABLE samples ADD COLUMN "{name}" {duck}')

    def sample_columns(self, ids, names: list[str]) -> dict[str, np.ndarray]:
        ids = _as_ids(ids)
        cols = ", ".join(f'"{n}"' for n in names)
        register(self.db, "_ids", pa.table({"sample_id": ids, "_pos": np.arange(len(ids))}))
        try:
            t = query_arrow(self.db, f"SELECT {cols} FROM _ids JOIN samples USING (sample_id) ORDER BY _pos")
        except Exception as e:
            raise BinderException(f"cannot read samples columns {names}: {e}") from None
        finally:
            unregister(self.db, "_ids")
        if t.num_rows != len(ids):
            raise CatalogException(f"{len(ids) - t.num_rows} of the requested sample ids are not registered")
        return {n: t.column(n).to_numpy(zero_copy_only=False) for n in names}

    def splits(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT split FROM samples ORDER BY 1").fetchall()]

    def inputs(self, ids) -> torch.Tensor:
        """Registered inputs of the given samples, in the order given."""
        ids = _as_ids(ids)
        parts, where = [], []
        for row in self._shard_rows("inputs"):
            shard = self.open_shard(row["file"], row["checksum"])
            mask = np.isin(shard.ids, ids)
            if mask.any():
                idx = np.nonzero(mask)[0]
                parts.append(shard.tensor("input")[torch.from_numpy(idx)])
                where.append(shard.ids[idx])
        if not parts:
            raise BinderException("none of these samples has registered inputs; "
                                  "pass inputs= to con.add_samples so they can be replayed")
        got, stacked = np.concatenate(where), torch.cat(parts)
        order = np.argsort(got, kind="stable")
        pos = np.minimum(np.searchsorted(got[order], ids), len(got) - 1)
        missing = ids[got[order][pos] != ids]
        if len(missing):
            raise BinderException(f"{len(missing)} samples have no registered inputs "
                                  f"(e.g. {missing[:5].tolist()}); they cannot be replayed")
        return stacked[torch.from_numpy(order[pos])]

    # ---- sets ---------------------------------------------------------------------------------
    def set_names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM sets ORDER BY name").fetchall()]

    def set_ids(self, name: str) -> np.ndarray:
        """Sample ids of a named set, else of a split; raises with the known names otherwise."""
        name = str(name)
        if name in self.set_names():
            rows = self.db.execute("SELECT sample_id FROM set_members WHERE set_name = ? ORDER BY sample_id",
                                   [name]).fetchnumpy()
            return rows["sample_id"].astype(np.int64)
        if name in self.splits():
            rows = self.db.execute("SELECT sample_id FROM samples WHERE split = ? ORDER BY sample_id",
                                   [name]).fetchnumpy()
            return rows["sample_id"].astype(np.int64)
        require_name("set", name, self.set_names() + self.splits())
        raise AssertionError  # pragma: no cover - require_name raised

    def create_set(self, name: str, query: str, params: Any = None, replace: bool = False) -> int:
        self._writable()
        if not _SAFE_NAME.match(name):
            raise BinderException(f"set name '{name}' must be an identifier")
        with transaction(self.db):
            if name in self.set_names():
                if not replace:
                    raise CatalogException(f"set '{name}' already exists; use CREATE OR REPLACE SET "
                                           f"or DROP SET {name}")
                self._drop_set_rows(name)
            try:
                t = query_arrow(self.db, f"SELECT * FROM ({query}) AS _q", params)
            except Exception as e:
                raise BinderException(f"the set's query failed: {str(e).splitlines()[0]}") from None
            col = "sample_id" if "sample_id" in t.column_names else (t.column_names[0] if t.num_columns == 1 else None)
            if col is None:
                raise BinderException("a set's query must return a sample_id column (or one column of ids)")
            ids = np.unique(np.asarray(t.column(col).to_numpy(zero_copy_only=False), dtype=np.int64))
            register(self.db, "_members", pa.table({"sample_id": ids}))
            unknown = self.db.execute("SELECT count(*) FROM _members WHERE sample_id NOT IN "
                                      "(SELECT sample_id FROM samples)").fetchone()[0]
            if unknown:
                unregister(self.db, "_members")
                raise BinderException(f"{unknown} ids returned by the set's query are not registered samples")
            self.db.execute("INSERT INTO set_members SELECT ?, sample_id FROM _members", [name])
            unregister(self.db, "_members")
            self.db.execute("INSERT INTO sets (name, definition, size) VALUES (?, ?, ?)", [name, query, len(ids)])
        return len(ids)

    def drop_set(self, name: str, if_exists: bool = False) -> None:
        self._writable()
        if name not in self.set_names():
            if if_exists:
                return
            require_name("set", name, self.set_names())
        with transaction(self.db):
            self._drop_set_rows(name)

    def _drop_set_rows(self, name: str) -> None:
        self.db.execute("DELETE FROM set_members WHERE set_name = ?", [name])
        self.db.execute("DELETE FROM sets WHERE name = ?", [name])

    # ---- models and checkpoints ----------------------------------------------------------------
    def checkpoints(self) -> list[dict]:
        return _dicts(self.db.execute("SELECT * FROM checkpoints ORDER BY ordinal"))

    def checkpoint(self, name: str) -> dict:
        for c in self.checkpoints():
            if c["name"] == name:
                return c
        require_name("checkpoint", name, [c["name"] for c in self.checkpoints()])
        raise AssertionError  # pragma: no cover

    def begin_checkpoint(self, name: str, model: nn.Module, lr: float, epoch: int | None = None,
                         step: int | None = None, factory: str | None = None,
                         kwargs: dict | None = None) -> dict:
        """Records a checkpoint and its weights; an existing one of that name is resumed."""
        self._writable()
        if not _SAFE_NAME.match(name):
            raise BinderException(f"checkpoint name '{name}' must be an identifier (letters, digits, _ . -)")
        if not (isinstance(lr, (int, float)) and np.isfinite(lr) and abs(lr) <= MAX_LR):
            raise InvalidInputException(f"lr must be a finite number of magnitude at most {MAX_LR:g} (scores are "
                                        f"weighted by it and would overflow), got {lr!r}")
        self.live_model = model
        existing = {c["name"]: c for c in self.checkpoints()}
        if name in existing:
            return existing[name]
        model_id = self._model_id(model, factory, kwargs)
        rel = f"weights/{name}.safetensors"
        model_files.save_weights(model, self.root / rel)
        ordinal = len(existing)
        self.db.execute("INSERT INTO checkpoints (name, ordinal, model_id, epoch, step, lr, weights_file, status)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, 'capturing')",
                        [name, ordinal, model_id, epoch, step, float(lr), rel])
        return self.checkpoint(name)

    def finish_checkpoint(self, name: str, status: str = "complete") -> None:
        self.db.execute("UPDATE checkpoints SET status = ? WHERE name = ?", [status, name])

    def _model_id(self, model: nn.Module, factory: str | None, kwargs: dict | None) -> int:
        factory = factory or model_files.factory_of(model)
        kwargs = kwargs if kwargs is not None else model_files.init_kwargs(model)
        row = self.db.execute("SELECT model_id FROM models WHERE factory = ? AND kwargs = ?",
                              [factory, json.dumps(kwargs, sort_keys=True)]).fetchone()
        if row:
            return row[0]
        if not model_files.factory_is_rebuildable(model, factory, kwargs):
            import warnings
            warnings.warn(f"MetaQL cannot rebuild this model from '{factory}' with {kwargs}: queries "
                          "that replay samples will work only in this process (pass factory='pkg.mod:fn' "
                          "and kwargs= to con.capture to fix)", stacklevel=4)
        model_id = self.db.execute("SELECT coalesce(max(model_id), 0) + 1 FROM models").fetchone()[0]
        self.db.execute("INSERT INTO models (model_id, factory, kwargs, loss) VALUES (?, ?, ?, 'cross_entropy')",
                        [model_id, factory, json.dumps(kwargs, sort_keys=True)])
        return model_id

    def model_at(self, checkpoint: str) -> nn.Module:
        """The model with the checkpoint's weights: rebuilt from its factory, or the live model's
        architecture when this process captured it (the weights always come from the file)."""
        c = self.checkpoint(checkpoint)
        factory, kwargs = self.db.execute("SELECT factory, kwargs FROM models WHERE model_id = ?",
                                          [c["model_id"]]).fetchone()
        try:
            model = model_files.build_model(factory, kwargs)
        except BinderException:
            if self.live_model is None:
                raise
            import copy
            model = copy.deepcopy(self.live_model)
        return model_files.load_weights(model, self._inside(c["weights_file"]))

    # ---- layers and shards -----------------------------------------------------------------------
    def layers(self) -> list[dict]:
        return _dicts(self.db.execute("SELECT * FROM layers ORDER BY name"))

    def layer_meta(self, name: str) -> tuple[LayerMeta, str]:
        row = self.db.execute("SELECT meta, storage FROM layers WHERE name = ?", [name]).fetchone()
        if row is None:
            require_name("layer", name, [l["name"] for l in self.layers()])
        return LayerMeta(**json.loads(row[0])), row[1]

    def register_layer(self, meta: LayerMeta, positions: int, factored_numbers: int, can_factor: bool,
                       storage: str | None) -> str:
        """Records a layer on first capture; returns its storage mode ('factored' or 'full'):
        whichever stores fewer numbers per sample, unless `storage` overrides it."""
        row = self.db.execute("SELECT storage FROM layers WHERE name = ?", [meta.name]).fetchone()
        if row:
            return row[0]
        fac, full = factored_numbers, kind_named(meta.kind).full_numbers(meta)
        mode = storage or ("factored" if can_factor and fac <= full else "full")
        if mode not in ("factored", "full") or (mode == "factored" and not can_factor):
            raise InvalidInputException(f"storage mode for layer '{meta.name}' must be "
                                        f"{'factored or full' if can_factor else 'full'}, not {mode!r}")
        self.db.execute("INSERT INTO layers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [meta.name, meta.kind, meta.din, meta.dout, meta.bias, positions, mode, fac, full,
                         json.dumps(meta.to_dict())])
        return mode

    def check_storage_override(self, storage: dict[str, str]) -> None:
        """A layer keeps the storage mode of its first capture (every checkpoint is scored alike);
        an override that contradicts it is refused up front, not ignored."""
        for layer, mode in storage.items():
            row = self.db.execute("SELECT storage FROM layers WHERE name = ?", [layer]).fetchone()
            if row and row[0] != mode:
                raise InvalidInputException(
                    f"layer '{layer}' is stored {row[0]} in this store (set at its first capture), so "
                    f"storage={{'{layer}': '{mode}'}} cannot apply; drop the override, or capture into a new store")

    def stored_ids(self, checkpoint: str, layer: str) -> np.ndarray:
        ids = [self.open_shard(r["file"], r["checksum"]).ids for r in self._shard_rows("factors", checkpoint, layer)]
        return np.concatenate(ids) if ids else np.zeros(0, np.int64)

    def factor_shards(self, checkpoint: str, layer: str) -> list[dict]:
        return self._shard_rows("factors", checkpoint, layer)

    def _shard_rows(self, kind: str, checkpoint: str | None = None, layer: str | None = None) -> list[dict]:
        q = "SELECT * FROM shards WHERE kind = ?"
        args: list = [kind]
        if checkpoint is not None:
            q += " AND checkpoint = ?"
            args.append(checkpoint)
        if layer is not None:
            q += " AND layer = ?"
            args.append(layer)
        return _dicts(self.db.execute(q + " ORDER BY shard_id", args))

    def write_factor_shard(self, checkpoint: str, layer: str, ids: np.ndarray, tensors: dict[str, torch.Tensor],
                           storage: str, suffix_file: str | None = None) -> str:
        """Writes one shard; returns its path relative to the store. `suffix_file` names the shard
        (same ids, same order) that holds this layer's input, when another layer stored it."""
        return self._write_shard_row("factors", checkpoint, layer, ids, tensors, storage, suffix_file)

    def shard_tensors(self, row: dict) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        """A factor shard's ids and tensors, with a shared suffix fetched from its owner's shard."""
        shard = self.open_shard(row["file"], row["checksum"])
        tensors = {n: shard.tensor(n) for n in shard.names()}
        if row.get("suffix_file"):
            owner = self.db.execute("SELECT checksum FROM shards WHERE file = ?", [row["suffix_file"]]).fetchone()
            if owner is None:
                raise IOException(f"shard {row['file']} shares its input with {row['suffix_file']}, "
                                  "which the catalog does not list; recapture the checkpoint")
            other = self.open_shard(row["suffix_file"], owner[0])
            tensors.update({n: other.tensor(n) for n in other.names() if n not in tensors
                            and n in ("X", "I")})
        return shard.ids, tensors

    def _write_shard_row(self, kind, checkpoint, layer, ids, tensors, storage=None, suffix_file=None) -> str:
        self._writable()
        seq = self.db.execute("SELECT nextval('shard_seq')").fetchone()[0]
        rel = (f"tensors/{checkpoint}/{layer}/{seq:06d}.arrow" if kind == "factors"
               else f"inputs/{seq:06d}.arrow")
        path = self.root / rel
        nbytes, checksum = write_shard(path, ids, tensors)
        try:
            self.db.execute(
                "INSERT INTO shards (shard_id, kind, checkpoint, layer, file, rows, min_id, max_id, bytes,"
                " checksum, storage, suffix_file) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [seq, kind, checkpoint, layer, rel, len(ids), int(ids.min()), int(ids.max()), nbytes,
                 checksum, storage, suffix_file])
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return rel

    def open_shard(self, rel: str, checksum: str) -> Shard:
        """A memory-mapped shard, checksum-verified on first open, kept in a small LRU cache."""
        if rel in self._shards:
            self._shards.move_to_end(rel)
            return self._shards[rel]
        path = self._inside(rel)
        if not path.exists():
            raise IOException(f"shard file {path} is missing; recapture its checkpoint/layer "
                              "(con.verify() lists every damaged file)")
        if rel not in self._verified:
            if file_checksum(path) != checksum:
                raise IOException(f"shard file {path} is corrupt (checksum mismatch); recapture it "
                                  "(con.verify() lists every damaged file)")
            self._verified.add(rel)
        shard = Shard(path)
        self._shards[rel] = shard
        if len(self._shards) > SHARD_CACHE:
            self._shards.popitem(last=False)
        return shard

    def verify(self) -> list[str]:
        """Problems with shard files (missing, corrupt), one line each; empty when all is well."""
        problems = []
        for row in _dicts(self.db.execute("SELECT file, checksum FROM shards ORDER BY shard_id")):
            try:
                path = self._inside(row["file"])
            except IOException as e:
                problems.append(str(e))
                continue
            if not path.exists():
                problems.append(f"missing: {row['file']}")
            elif file_checksum(path) != row["checksum"]:
                problems.append(f"corrupt: {row['file']}")
        return problems

    def _inside(self, rel: str) -> Path:
        path = (self.root / rel).resolve()
        if self.root not in path.parents:
            raise IOException(f"catalog path '{rel}' points outside the store; the catalog was tampered with")
        return path

    def artifact_dir(self, kind: str, name: str) -> Path:
        for part in (kind, name):
            if not _SAFE_NAME.match(str(part)):
                raise BinderException(f"'{part}' is not a safe artifact name")
        path = self.root / "artifacts" / kind / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def _class_labels(labels) -> np.ndarray:
    """Labels as int64 class indices; floats only when whole (1.0), never truncated (0.9 -> 0)."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels).reshape(-1)
    if arr.dtype.kind in "iu":
        if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise InvalidInputException("labels must be class indices that fit in int64")
        return arr.astype(np.int64)
    if arr.dtype.kind == "b":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr)) | (np.abs(arr) >= 2.0 ** 63)
        if bad.any():
            raise InvalidInputException(f"labels must be whole class indices; {int(bad.sum())} are not "
                                        f"(e.g. {arr[bad][:3].tolist()}); pass integers, or round them yourself")
        return arr.astype(np.int64)
    raise InvalidInputException(f"labels must be whole class indices, got values of type {arr.dtype}")


def _as_ids(ids) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.dtype.kind not in "iu":
        raise InvalidInputException(f"sample ids must be integers, got {arr.dtype}")
    return arr.astype(np.int64).reshape(-1)


def _dicts(rel) -> list[dict]:
    cols = [d[0] for d in rel.description]
    return [dict(zip(cols, r)) for r in rel.fetchall()]
