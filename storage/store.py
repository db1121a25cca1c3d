"""A MetaQL store: a directory holding the DuckDB catalog, the Arrow shard files and the weights.

    STORE/catalog.duckdb                         the catalog (storage/catalog.py)
    STORE/tensors/<checkpoint>/<layer>/NNNNNN.arrow   per-sample factors, one file per shard
    STORE/inputs/NNNNNN.arrow                    registered sample inputs (for replay)
    STORE/weights/<checkpoint>.safetensors       model weights per checkpoint
    STORE/artifacts/<kind>/<name>/               state kept by table functions (ELITE, LANCET)
    STORE/writer.lock                            the single writer's flock and pid (storage/files.py)
    STORE/catalog.snapshot.duckdb                the last committed catalog, for readers (storage/snapshot.py)

What an open accepts, creates or refuses, and why no symlink is followed: storage/files.py. How a
reader queries beside a writer (Store.committed, Store.refresh, Store.cursor): storage/snapshot.py.

A shard's file is complete on disk (written, synced, renamed) before the catalog row that names it
commits, and the files of one flush are listed in `pending_files` before they are written, so a crash
leaves at worst listed files no row names, which the next writable open deletes (storage/durable.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from metaql.errors import (BinderException, CatalogException, InvalidInputException, IOException,
                                  ProgrammingError, user_stacklevel)
from metaql.storage import durable, files
from metaql.storage import inputs as structured_inputs
from metaql.storage.artifacts import artifact_problems
from metaql.storage import models as model_files
from metaql.storage.catalog import (CHECKPOINTS_BEFORE_SEEN, SHOWN, RoundTrips, counted, open_catalog, query_arrow,
                                    register, require_name, transaction, unregister)
from metaql.storage import norms, quantize
from metaql.storage.faults import fault_point
from metaql.storage.layers import LayerMeta, kind_named
from metaql.storage.snapshot import Publisher, ReaderCopy
from metaql.storage.sqlguard import SAMPLE_CORE, require_read_query
from metaql.storage.tensorfile import Shard, file_checksum, fsync_path, stage_shard, write_shard

# (table, column) of every catalog row that belongs to one checkpoint: DROP CHECKPOINT deletes them
CHECKPOINT_KEYED = (("sample_norms", "checkpoint"), ("sample_weights", "checkpoint"), ("shards", "checkpoint"),
                    ("checkpoints", "name"))
_SAFE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
SHARD_CACHE = 4096       # open shards kept per store: a mapping each, no file descriptor (tensorfile.Shard);
                         # at 16 a MiniLM store's statement (185-222 shards) reopened and faulted in every one
# what an error about a damaged shard file tells the user to do
SHARD_REMEDY = ("con.verify(repair=True) drops the damaged shards from the catalog, and a replay (con.replay) or "
                "the same capture run again stores their samples again; or remove the whole checkpoint "
                "(DROP CHECKPOINT name) and capture it again")
MAX_LR = 1e6     # a checkpoint's weight in every score: beyond this, sums of products overflow doubles


class Store:
    _confined = False       # confine_files() was called: DuckDB touches no file outside the store

    def __init__(self, path: str | Path = ":memory:", read_only: bool = False):
        self._tmpdir = None
        if str(path) == ":memory:":
            self._tmpdir = tempfile.mkdtemp(prefix="metaql-")
            path = self._tmpdir
        self.root = Path(path).resolve()
        self.read_only = read_only
        self._owner, self._children, self._closed = self, weakref.WeakSet(), False
        self._lock = self._reader = self._publisher = None
        self._live_model: nn.Module | None = None
        self._capture_copies = None     # what the last capture's copies left (storage/capture.py)
        self._copies_lock = threading.Lock()
        self._shards: OrderedDict[str, Shard] = OrderedDict()
        self._verified: set[str] = set()
        self._weights_ok: set[tuple] = set()
        self.trusted_factories: set[str] = set()   # model code this process said to run (model_at)
        self.created = False       # this connection made a new store (a mistyped path, often)
        try:
            self.created = files.check_store_dir(self.root, read_only)
            files.refuse_symlinks(self.root)
            if read_only:
                self._reader = ReaderCopy(self.root)
                self.db = self._reader.db
            else:
                self._lock = files.WriterLock(self.root)
                files.refuse_symlinks(self.root)   # again: the store may have changed before we held the lock
                self.db = open_catalog(self.root / files.CATALOG, False)
                self._remove_orphans()
                self._publisher = Publisher(self.root, self.db)
                self.committed()
                self._lock.mark_ready()
        except OSError as e:   # permissions, a full disk, a folder that vanished meanwhile
            self._release()
            raise IOException(f"cannot open the store {self.root}: {e}") from None
        except BaseException:
            self._release()
            raise

    # ---- lifecycle -------------------------------------------------------------------------
    def where(self) -> str:
        """Which store this is, for messages about what it lacks: a user who mistyped a path got a
        new empty store and an error that never said so."""
        if getattr(self._owner, "uri", None):
            from metaql.distributed.objectstore import public_uri
            return f"the store {public_uri(self._owner.uri)}"
        if self._owner._tmpdir is not None:
            return "the in-memory store (:memory:)"
        made = ", a new empty store this connection created (is the path right?)" if self._owner.created else ""
        return f"the store {self.root}{made}"

    @property
    def closed(self) -> bool:
        return self._closed or self._owner._closed

    @property
    def live_model(self) -> nn.Module | None:
        return self._owner._live_model

    @live_model.setter
    def live_model(self, model: nn.Module | None) -> None:
        self._owner._live_model = model

    def take_capture_copies(self):
        """The copies the last capture on this store left for the next one (once), or None."""
        owner = self._owner
        with owner._copies_lock:
            copies, owner._capture_copies = owner._capture_copies, None
        return copies

    def keep_capture_copies(self, copies) -> None:
        """Keeps a capture's copies for the next capture (none while the store is closed)."""
        owner = self._owner
        with owner._copies_lock:
            if copies is not None and not owner._closed:
                owner._capture_copies = copies

    def cursor(self) -> "Store":
        """Another handle on this store for another thread: its own DuckDB connection (a cursor on
        the writer's database, or a reader's own copy of the catalog) and its own shard cache.
        Closing it leaves this store open; closing this store closes it."""
        if self.closed:
            raise IOException("the store is closed")
        child = object.__new__(Store)
        child.__dict__.update(root=self.root, read_only=self.read_only, _tmpdir=None, _owner=self._owner,
                              _children=weakref.WeakSet(), _closed=False, _lock=None, _reader=None,
                              _publisher=self._publisher, _shards=OrderedDict(),
                              _verified=self._verified, _weights_ok=self._weights_ok,
                              trusted_factories=self.trusted_factories)
        if self.read_only:
            child._reader = ReaderCopy(self.root)
            child.db = child._reader.db
        else:
            child.db = self._owner.db.cursor()
        if self._confined:
            child.confine_files()
        self._owner._children.add(child)
        return child

    def committed(self, force: bool = True) -> None:
        """Publishes the catalog for readers (storage/snapshot.py) if anything was committed since
        the last time; costs two stat calls when nothing was. Writers call it after each commit;
        frequent ones (shard flushes, add_samples) with force=False: at most one snapshot a second
        (or per ten times the last copy's time, on a large catalog: Publisher.interval), the last one
        published by a timer, so readers lag those by about that long."""
        if self._publisher is not None and self._owner._tmpdir is None and not self.closed:
            self._publisher.publish(force)

    def hold_publishing(self) -> None:
        """Cancels a snapshot deferred by committed(force=False): the caller is about to publish
        with committed() (a capture's exit, whose flushes no longer publish: ShardWriter.flush)."""
        if self._publisher is not None:
            self._publisher.hold()

    def refresh(self) -> bool:
        """A reader's catalog catches up with the store's last commit (a no-op for a writer);
        True when it changed. Connection calls it before each statement."""
        if self._reader is None or self.closed:
            return False
        changed = self._reader.refresh()
        if changed:
            self.db = self._reader.db
            if self._confined:
                confine_files(self.db, self.root)
        return changed

    def confine_files(self) -> None:
        """From now on this handle's SQL reads and writes no file outside the store (DuckDB's
        read_*(), COPY, ATTACH): for SQL that comes from elsewhere, e.g. the web console. There is
        no way back, as DuckDB cannot re-enable external access on a running database."""
        self._confined = True
        confine_files(self.db, self.root)

    def close(self) -> None:
        if self._closed:
            return
        if self._owner is self:
            for child in list(self._children):
                child.close()
            try:
                self._keep_replay_times()
                self.committed()
            except Exception:  # a failed last write or publish must not keep the store (and its lock) open
                pass
        self._closed = True
        self._shards.clear()
        if self._owner is self:
            self._capture_copies = None     # a Capture the caller keeps must not hold them
        self._release()

    def _release(self) -> None:
        try:
            if self._publisher is not None and self._owner is self:
                self._publisher.close()
            if self._reader is not None:
                self._reader.close()
            elif getattr(self, "db", None) is not None:
                self.db.close()
        finally:
            if self._lock is not None:
                self._lock.release()
            if self._tmpdir:
                shutil.rmtree(self._tmpdir, ignore_errors=True)

    def _remove_orphans(self) -> None:
        """Deletes what a killed writer left: files `pending_files` lists that no shard row names,
        and the store's own temporaries; never another file, never through a symlink."""
        named = {r[0] for r in self.db.execute("SELECT file FROM shards UNION ALL "
                                               "SELECT weights_file FROM checkpoints").fetchall()}
        pending = [r[0] for r in self.db.execute("SELECT file FROM pending_files").fetchall()]
        unnamed = [f for f in pending if f not in named]
        durable.remove_own(self.root, unnamed + [f + ".tmp" for f in unnamed] + durable.temp_files(self.root))
        if pending:
            self.db.execute("DELETE FROM pending_files")

    def _writable(self) -> None:
        if self.read_only:
            raise IOException("the store is open read-only; reopen it without read_only to change it")

    # ---- plain SQL over the catalog ---------------------------------------------------------
    def sql(self, text: str, params: Any = None):
        return self.db.execute(text, params) if params is not None else self.db.execute(text)

    # ---- the catalog connection, counted ------------------------------------------------------
    @property
    def db(self):
        return self.__dict__.get("_db")

    @db.setter
    def db(self, con) -> None:
        # every statement sent to the catalog is counted (EXPLAIN ANALYZE: "catalog round trips")
        self.__dict__["_db"] = counted(con, self.round_trips)

    @property
    def round_trips(self) -> RoundTrips:
        return self.__dict__.setdefault("_round_trips", RoundTrips())

    # ---- typed reads for a statement's catalog snapshot (storage/catalog_snapshot.py) ------------
    def has_sample(self, sample_id: int) -> bool:
        return self.db.execute("SELECT count(*) FROM samples WHERE sample_id = ?", [int(sample_id)]).fetchone()[0] > 0

    def member_ids(self, name: str, split: bool = False) -> np.ndarray:
        """Sample ids of the named set (of the split `name` when `split`), sorted; the caller
        has checked the name (CatalogSnapshot.set_ids)."""
        q = "SELECT sample_id FROM samples WHERE split = ? ORDER BY sample_id" if split else \
            "SELECT sample_id FROM set_members WHERE set_name = ? ORDER BY sample_id"
        return self.db.execute(q, [name]).fetchnumpy()["sample_id"].astype(np.int64)

    def listing(self, what: str) -> pa.Table:
        """SHOW LAYERS / CHECKPOINTS / SETS as an Arrow table."""
        if what == "checkpoints" and not self._has_column("shards", "seen_from_batch"):
            return query_arrow(self.db, CHECKPOINTS_BEFORE_SEEN)
        return query_arrow(self.db, SHOWN[what])

    def _has_column(self, table: str, column: str) -> bool:
        return self.db.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = ? AND "
                               "column_name = ?", [table, column]).fetchone()[0] > 0

    def cost_constants(self, measure) -> dict[str, float]:
        """The cost model's constants from the catalog's meta table; on first use `measure()`d and
        kept there. A read-only store cannot keep them: they are measured once per process (every
        statement of a read-only shell paid the measurement before)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'cost_constants'").fetchone()
        if row:
            return json.loads(row[0])
        if measure not in _MEASURED:
            _MEASURED[measure] = measure()
        consts = dict(_MEASURED[measure])
        if not self.read_only:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('cost_constants', ?)", [json.dumps(consts)])
        return consts

    def keep_cost_constants(self, consts: dict) -> None:
        """Replaces the cost model's constants in the meta table (PRAGMA metaql_calibrate)."""
        self._writable()
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('cost_constants', ?)", [json.dumps(consts)])
        self.committed()

    # ---- samples ------------------------------------------------------------------------------
    def add_samples(self, ids, split: str, labels=None, inputs=None,
                    columns: dict[str, Iterable] | None = None, shard_size: int = 4096) -> int:
        """Registers samples (and their inputs, for replay); all or nothing. `inputs`: a tensor, a
        tuple or dict of them, or lists of per-sample variable-length tensors (storage/inputs.py)."""
        self._writable()
        if not isinstance(split, str) or not split.strip():
            raise InvalidInputException(f"split must be a name such as 'train' or 'test' (a non-empty string), not "
                                        f"{split!r}; a query names it as a set: batch(train)")
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
            inputs = structured_inputs.flatten(inputs, n)
            self._check_input_layout(inputs.spec)
        columns = {k: np.asarray(list(v) if not hasattr(v, "__len__") else v) for k, v in (columns or {}).items()}
        own = [k for k in columns if str(k).lower() in SAMPLE_CORE]
        if own:     # the row would take the column's values instead of split=/labels= (or fail on sample_id)
            raise InvalidInputException(f"columns= adds columns of your own; {own[0]!r} is MetaQL's: pass the split as "
                                        "split= and the labels as labels= (pred and loss come from "
                                        "con.update_predictions())")
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
                cols = ", ".join(quote_identifier(c) for c in arrow.column_names)
                self.db.execute(f"INSERT INTO samples ({cols}) SELECT {cols} FROM _new_samples")
                unregister(self.db, "_new_samples")
                if inputs is not None:
                    for start in range(0, n, shard_size):
                        sl = slice(start, start + shard_size)
                        written.append(self.root / self._write_shard_row(
                            "inputs", None, None, ids[sl], inputs.shard_tensors(sl), extra={"inputs": inputs.spec}))
        except BaseException:
            self._discard(written)
            raise
        self.committed(force=False)     # bulk loads call this often; readers lag by about a second
        return n

    def _ensure_column(self, name: str, values: np.ndarray) -> None:
        if not isinstance(name, str) or not _SAFE_NAME.match(name) or "." in name:
            raise InvalidInputException(f"column name {name!r} must be a plain identifier "
                                        "(letters, digits, _ and -, not starting with a digit)")
        # DuckDB matches column names without regard to case
        if name.lower() not in {c.lower() for c in self.sample_column_names()}:
            sqltype = pa.array(values).type
            duck = {"int64": "BIGINT", "double": "DOUBLE", "float": "DOUBLE", "bool": "BOOLEAN"}.get(
                str(sqltype), "VARCHAR")
            self.db.execute(f"ALTER TABLE samples ADD COLUMN {quote_identifier(name)} {duck}")

    def sample_column_names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT column_name FROM information_schema.columns WHERE "
                                              "table_schema = 'main' AND table_name = 'samples' "
                                              "ORDER BY ordinal_position").fetchall()]

    def sample_columns(self, ids, names: list[str]) -> dict[str, np.ndarray]:
        """Columns of `samples` for the given ids, in their order; every name is checked against the
        table's columns (a user's name never reaches the SQL text unchecked) and quoted."""
        ids = _as_ids(ids)
        names = list(dict.fromkeys(names))     # a name asked for twice is read once
        known = {c.lower(): c for c in self.sample_column_names()}
        for n in names:
            if not isinstance(n, str) or n.lower() not in known:
                try:
                    require_name("samples column", str(n), list(known.values()))
                except CatalogException as e:
                    raise BinderException(str(e)) from None
        cols = ", ".join(quote_identifier(known[n.lower()]) for n in names)
        register(self.db, "_ids", pa.table({"sample_id": ids, "_pos": np.arange(len(ids))}))
        try:
            t = query_arrow(self.db, f"SELECT {cols} FROM _ids JOIN samples USING (sample_id) ORDER BY _pos")
            t = t.rename_columns(list(names))
        except Exception as e:
            raise BinderException(f"cannot read samples columns {names}: {e}") from None
        finally:
            unregister(self.db, "_ids")
        if t.num_rows != len(ids):
            raise CatalogException(f"{len(ids) - t.num_rows} of the requested sample ids are not registered")
        return {n: t.column(n).to_numpy(zero_copy_only=False) for n in names}

    def registered_ids(self) -> np.ndarray:
        """Every registered sample id, sorted."""
        rows = self.db.execute("SELECT sample_id FROM samples ORDER BY sample_id").fetchnumpy()
        return rows["sample_id"].astype(np.int64)

    def splits(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT split FROM samples ORDER BY 1").fetchall()]

    def inputs(self, ids):
        """Registered inputs of the given samples, in the order given, in the structure they were
        registered in (a tensor, a tuple or a dict; storage/inputs.py). All at once: replay reads
        them batch by batch instead (input_batches)."""
        unique, inverse = np.unique(_as_ids(ids), return_inverse=True)
        if len(unique) == 0:
            raise BinderException("no samples given, so there are no inputs to read")
        [(pos, batch)] = list(self.input_batches(unique, len(unique)))
        return structured_inputs.take_rows(batch, torch.from_numpy(np.argsort(pos)[inverse]))

    def input_batches(self, ids, batch_size: int = 256, shard_rows: list[dict] | None = None
                      ) -> "structured_inputs.InputReader":
        """The registered inputs of the given (unique) ids, `batch_size` at a time, read shard by
        shard: yields (positions into ids, batch). Memory stays bounded by one batch however many
        ids there are. `shard_rows`: the inputs shards' catalog rows, when the caller has read them
        (a statement's catalog snapshot), else read here."""
        return structured_inputs.InputReader(self, ids, batch_size, shard_rows)

    def input_shard_rows(self) -> list[dict]:
        return self._shard_rows("inputs")

    def input_shard(self, row: dict) -> Shard:
        """An inputs shard, checksum-verified on first open and kept out of the shard cache: a replay
        streams through every inputs shard once, and cached mappings would stay resident."""
        path = self._inside(row["file"])
        if not path.exists():
            raise IOException(f"inputs shard file {path} is missing; register those samples' inputs in a new "
                              "store (con.verify() lists every damaged file)")
        if row["file"] not in self._verified:
            if file_checksum(path) != row["checksum"]:
                raise IOException(f"inputs shard file {path} is corrupt (checksum mismatch); register those "
                                  "samples' inputs in a new store (con.verify() lists every damaged file)")
            self._verified.add(row["file"])
        return Shard(path)

    def input_spec(self, row: dict, shard: Shard | None = None) -> dict:
        """The structure an inputs shard records (one tensor 'input' for stores that predate it)."""
        meta = (shard or self.input_shard(row)).meta
        return meta["inputs"] if "inputs" in meta else structured_inputs.legacy_spec(meta)

    def _check_input_layout(self, spec: dict) -> None:
        """Refuses inputs whose structure differs from the inputs already registered: a batch
        mixing both could not be handed to one model."""
        rows = self._shard_rows("inputs")
        if rows:
            have = self.input_spec(rows[0])
            if not structured_inputs.same_layout(have, spec):
                raise InvalidInputException(
                    f"these inputs are {structured_inputs.described(spec)} but the store's registered inputs are "
                    f"{structured_inputs.described(have)} (N samples, L positions, [ ] variable length); "
                    "register inputs of one structure per store")

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
        require_name("set", name, list(dict.fromkeys(self.set_names() + self.splits())))
        raise AssertionError  # pragma: no cover - require_name raised

    def has_predictions(self) -> bool:
        """Whether any sample has a prediction (con.update_predictions fills samples.pred and loss)."""
        return self.db.execute("SELECT count(pred) FROM samples").fetchone()[0] > 0

    def create_set(self, name: str, query: str, params: Any = None, replace: bool = False,
                   definition: str | None = None) -> int:
        """`definition`: the query as the user wrote it, when `query` is its rewritten form."""
        self._writable()
        if not _SAFE_NAME.match(name):
            raise BinderException(f"set name '{name}' must be an identifier")
        try:
            # pasted into SELECT * FROM (query) below: one read-only SELECT, nothing that could close it
            require_read_query(query, "a set's query")
            require_read_query(f"SELECT * FROM ({query}) AS _q", "a set's query")
        except ProgrammingError as e:
            raise BinderException(str(e)) from None
        if name in self.splits() and name not in self.set_names():
            raise CatalogException(f"'{name}' is a split of the samples table; a set of that name would hide the "
                                   f"split from every statement that names it (INFLUENCE's default training side "
                                   f"among them): choose another name")
        with transaction(self.db):
            if name in self.set_names():
                if not replace:
                    raise CatalogException(f"set '{name}' already exists; use CREATE OR REPLACE SET "
                                           f"or DROP SET {name}")
                self._drop_set_rows(name)
            try:
                t = query_arrow(self.db, f"SELECT * FROM ({query}) AS _q", params)
            except Exception as e:
                raise BinderException(f"the set's query failed: {str(e)}") from None   # with DuckDB's hint
            col = "sample_id" if "sample_id" in t.column_names else (t.column_names[0] if t.num_columns == 1 else None)
            if col is None:
                raise BinderException("a set's query must return a sample_id column (or one column of ids)")
            if col != "sample_id" and col.lower() in {c.lower() for c in self.sample_column_names()}:
                # SELECT label FROM samples ...: its values (classes 0-9) are registered ids too, so the
                # set would silently hold other samples
                raise BinderException(f"a set's query returned the samples column '{col}', not sample ids: select "
                                      f"sample_id (SELECT sample_id FROM samples WHERE ...)")
            ids = np.unique(_set_ids(t.column(col), col))
            register(self.db, "_members", pa.table({"sample_id": ids}))
            unknown = self.db.execute("SELECT count(*) FROM _members WHERE sample_id NOT IN "
                                      "(SELECT sample_id FROM samples)").fetchone()[0]
            if unknown:
                unregister(self.db, "_members")
                raise BinderException(f"{unknown} ids returned by the set's query are not registered samples")
            self.db.execute("INSERT INTO set_members SELECT ?, sample_id FROM _members", [name])
            unregister(self.db, "_members")
            self.db.execute("INSERT INTO sets (name, definition, size) VALUES (?, ?, ?)",
                            [name, definition or query, len(ids)])
        self.committed()
        return len(ids)

    def drop_set(self, name: str, if_exists: bool = False) -> None:
        self._writable()
        if name not in self.set_names():
            if if_exists:
                return
            if name in self.splits():       # listed among the sets everywhere else, so not 'unknown'
                raise CatalogException(f"'{name}' is a split (the samples' split column), not a set made by CREATE "
                                       "SET: DROP SET removes only those, and a split cannot be dropped")
            require_name("set", name, self.set_names())
        with transaction(self.db):
            self._drop_set_rows(name)
        self.committed()

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
                         kwargs: dict | None = None, task=None) -> dict:
        """Records a checkpoint and its weights; an existing one of that name is resumed. `task`
        (see metaql.storage.tasks) is recorded with the model: every replay uses its loss."""
        self._writable()
        if not is_checkpoint_name(name):
            raise BinderException(f"checkpoint name '{name}' must be an identifier (letters, digits, _ . -)")
        if not (isinstance(lr, (int, float)) and np.isfinite(lr) and abs(lr) <= MAX_LR):
            raise InvalidInputException(f"lr must be a finite number of magnitude at most {MAX_LR:g} (scores are "
                                        f"weighted by it and would overflow), got {lr!r}")
        self.live_model = model
        existing = {c["name"]: c for c in self.checkpoints()}
        from metaql.storage.tasks import task_spec
        spec, trusted_loss = task_spec(task)     # checked before anything is written
        if name in existing:
            self._check_resumed_task(existing[name], spec)
            self._check_resumed_model(existing[name], model)
            return existing[name]
        model_id = self._model_id(model, factory, kwargs, spec, trusted_loss)
        rel = f"weights/{name}.safetensors"
        model_files.save_weights(model, self._path_for_write(rel))
        fault_point("weights.written")
        # after the last one, not len(existing): a dropped checkpoint leaves a gap, and first/last go by ordinal
        ordinal = max((c["ordinal"] for c in existing.values()), default=-1) + 1
        fault_point("commit.checkpoint.before")
        self.db.execute("INSERT INTO checkpoints (name, ordinal, model_id, epoch, step, lr, weights_file, status,"
                        " weights_checksum) VALUES (?, ?, ?, ?, ?, ?, ?, 'capturing', ?)",
                        [name, ordinal, model_id, epoch, step, float(lr), rel, file_checksum(self.root / rel)])
        fault_point("commit.checkpoint.after")
        return self.checkpoint(name)

    def drop_checkpoint(self, name: str, if_exists: bool = False) -> None:
        """Removes checkpoint `name`: every catalog row keyed by it in one transaction, then its
        files. That transaction also lists the files in `pending_files`, so a crash before they are
        deleted leaves files no row names, which the next writable open deletes (_remove_orphans):
        no leftover is ever read as a live checkpoint's data."""
        self._writable()
        known = [c["name"] for c in self.checkpoints()]
        if name not in known:
            if if_exists:
                return
            require_name("checkpoint", name, known)
        if name in self.open_captures:
            raise InvalidInputException(f"checkpoint '{name}' is being captured in this connection; drop it after "
                                        "its `with con.capture(...)` block ends")
        # a distributed capture's part stores first (a crash after this leaves the checkpoint, to drop
        # again): a later capture of the name would otherwise resume the dropped run's ranks
        from metaql.distributed.ddp import parts_dir
        if is_checkpoint_name(name):      # never a path out of STORE.ranks, whatever a tampered catalog says
            shutil.rmtree(parts_dir(self.root, name), ignore_errors=True)
        with transaction(self.db):
            files = self._checkpoint_files(name)
            for table, column in CHECKPOINT_KEYED:
                self.db.execute(f"DELETE FROM {table} WHERE {column} = ?", [name])
            self.db.execute("DELETE FROM meta WHERE key = ?", [f"dropped/{name}"])     # repair_shards' record
            still = self._named_files()      # an activation row of another checkpoint may name a shard's file
            gone = [f for f in files if f not in still]
            if gone:
                self.db.execute("INSERT OR IGNORE INTO pending_files (file) SELECT unnest(?)", [gone])
        self._forget(name, gone)
        durable.remove_own(self.root, gone)
        durable.remove_empty_folders(self.root, _checkpoint_folders(gone))
        self._remove_artifacts_of(name)
        self.db.execute("DELETE FROM pending_files WHERE file IN (SELECT unnest(?))", [gone])
        self.committed()

    def _checkpoint_files(self, name: str) -> list[str]:
        """Every file the catalog names for checkpoint `name`: its shards' and its weights."""
        rows = self.db.execute("SELECT file FROM shards WHERE checkpoint = ? UNION SELECT weights_file FROM "
                               "checkpoints WHERE name = ?", [name, name]).fetchall()
        return sorted(r[0] for r in rows)

    def _named_files(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT file FROM shards UNION SELECT weights_file FROM checkpoints")
                .fetchall()}

    def _forget(self, name: str, files: list[str]) -> None:
        """Drops what this process cached of a removed checkpoint's files (open shards, verified
        checksums), so that a new checkpoint of the same name is read afresh."""
        for rel in files:
            self._shards.pop(rel, None)
            self._verified.discard(rel)
        self._weights_ok.difference_update({seen for seen in self._weights_ok if seen[0] == name})

    def _remove_artifacts_of(self, name: str) -> None:
        """The projected index built from the checkpoint's factors (approx/index.py): a stale one is
        never used (its manifest names the shards it was built from), so removing it is tidying."""
        slot = self.root / "artifacts" / "projected_index" / name
        if is_checkpoint_name(name) and slot.is_dir() and not slot.is_symlink():
            shutil.rmtree(slot, ignore_errors=True)

    @property
    def open_captures(self) -> set[str]:
        """Checkpoints a capture of this connection (or a cursor of it) is writing now."""
        return self._owner.__dict__.setdefault("_open_captures", set())

    def _check_resumed_task(self, c: dict, spec: dict) -> None:
        """A resumed capture must add factors of the loss its checkpoint was begun with."""
        from metaql.storage.tasks import LEGACY_CLASSIFICATION, spec_text
        row = self.db.execute("SELECT loss FROM models WHERE model_id = ?", [c["model_id"]]).fetchone()
        recorded = LEGACY_CLASSIFICATION if row is None or row[0] is None else row[0]
        recorded = spec_text({"task": "classification"}) if recorded == LEGACY_CLASSIFICATION else recorded
        if recorded != spec_text(spec):
            raise InvalidInputException(f"checkpoint '{c['name']}' was captured with the task {recorded}, not "
                                        f"{spec_text(spec)}: resume it with that task, or capture a new checkpoint")

    def _check_resumed_model(self, c: dict, model: nn.Module) -> None:
        """A resumed capture must add factors of the checkpoint's own architecture: another one would
        store layers the checkpoint's weights lack, without a word. (Its lr is the one recorded when
        it began, a weight of the whole checkpoint: a scheduler's later lr at the resume changes
        nothing stored.)"""
        saved = model_files.weight_shapes(self._inside(c["weights_file"]))
        given = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if given != saved:
            differ = sorted(set(given) ^ set(saved)) or sorted(k for k in given if given[k] != saved[k])
            raise InvalidInputException(
                f"checkpoint '{c['name']}' was captured with another architecture (its weights and this model differ at "
                f"{', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}): resume it with the same model, or "
                "capture a new checkpoint (another name)")

    def finish_checkpoint(self, name: str, status: str = "complete") -> None:
        # a capture that ends complete while samples a repair dropped are still missing (it did not
        # see them again) leaves the checkpoint partial: complete would hide the holes
        if status == "complete" and self._repair_pending(name) is not None:
            status = "partial"
        fault_point("commit.finish.before")
        self.db.execute("UPDATE checkpoints SET status = ? WHERE name = ?", [status, name])
        if status == "complete":        # a resumed capture stored what repair_shards dropped
            self.db.execute("DELETE FROM meta WHERE key = ?", [f"dropped/{name}"])
        fault_point("commit.finish.after")
        self.committed()

    def _model_id(self, model: nn.Module, factory: str | None, kwargs: dict | None,
                  task: dict | None = None, trusted_loss: set[str] = frozenset()) -> int:
        from metaql.storage.tasks import LEGACY_CLASSIFICATION, spec_text
        task = spec_text(task or {"task": "classification"})
        # a store written before tasks recorded classification as 'cross_entropy'
        same_task = [task, LEGACY_CLASSIFICATION] if task == spec_text({"task": "classification"}) else [task]
        self.trusted_factories |= set(trusted_loss)     # the loss code the user named, like a factory
        factory, kwargs = model_files.recipe(model, factory, kwargs)
        # the user typed this factory, or handed us a live instance of its class: trusted in this process
        self.trusted_factories.add(factory)
        row = self.db.execute("SELECT model_id FROM models WHERE factory = ? AND kwargs = ? AND loss IN "
                              "(SELECT unnest(?))", [factory, json.dumps(kwargs, sort_keys=True), same_task]).fetchone()
        if row:
            return row[0]
        if not model_files.factory_is_rebuildable(model, factory, kwargs):
            import warnings
            script = " (a class defined in the script, which another process cannot import: move it into a " \
                "module)" if factory.startswith("__main__:") or "<locals>" in factory else ""
            warnings.warn(f"MetaQL cannot rebuild this model from '{factory}' with {kwargs}{script}: queries "
                          "that replay samples will work only in this process, or after con.attach_model(model) "
                          "(to fix, pass factory='pkg.mod:fn' and kwargs= where the checkpoint is begun: "
                          "con.capture, con.checkpoint or the training integration)", stacklevel=user_stacklevel())
        model_id = self.db.execute("SELECT coalesce(max(model_id), 0) + 1 FROM models").fetchone()[0]
        self.db.execute("INSERT INTO models (model_id, factory, kwargs, loss) VALUES (?, ?, ?, ?)",
                        [model_id, factory, json.dumps(kwargs, sort_keys=True), task])
        return model_id

    def model_at(self, checkpoint: str) -> nn.Module:
        """The model with the checkpoint's weights (always from the file). Its architecture comes
        from the recorded factory only if this process trusts that exact string, else from the
        model the user attached or is capturing; a store alone never makes MetaQL run its code."""
        c = self.checkpoint(checkpoint)
        row = self.db.execute("SELECT factory, kwargs FROM models WHERE model_id = ?", [c["model_id"]]).fetchone()
        if row is None:
            raise IOException(f"checkpoint '{checkpoint}' names model {c['model_id']}, which the catalog's "
                              "models table lacks: the store was tampered with or damaged")
        weights = self._checked_weights(c)
        model = model_files.load_weights(self._architecture(*row, weights), weights)
        from metaql.storage.replay import REPLAY_KEY
        setattr(model, REPLAY_KEY, self.replay_key(c["model_id"]))     # its replays price the next ones
        return model

    def replay_key(self, model_id: int) -> tuple:
        """What storage/replay.py keys a model's replay times by: the store and the model's id."""
        return (str(self.root), int(model_id))

    def kept_replay_times(self, model_id: int) -> list:
        """The (samples, seconds) replays of the model at this process's torch thread count that
        earlier processes kept in the catalog (meta 'replay_times', read once per connection), so
        that a fresh process prices the query side before it has replayed anything itself."""
        if self._owner.__dict__.get("_replay_times") is None:
            self._owner._replay_times = self._stored_replay_times()
        return self._owner._replay_times.get(f"{int(model_id)}/{torch.get_num_threads()}", [])

    def _stored_replay_times(self) -> dict:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'replay_times'").fetchone()
        return json.loads(row[0]) if row else {}

    def _keep_replay_times(self) -> None:
        """Keeps this process's replay times of the store's models in the catalog (the latest
        MAX_SEEN per model and thread count, with those kept before): one statement, on close."""
        from metaql.storage.replay import MAX_SEEN, seen_for
        mine = seen_for(str(self.root))
        if self.read_only or not mine:
            return
        kept = self._stored_replay_times()     # read again: another process may have kept some since
        for key, seen in mine.items():
            merged = [tuple(o) for o in kept.get(key, [])]
            known = set(merged)
            merged += [o for o in seen if o not in known]
            kept[key] = [list(o) for o in merged[-MAX_SEEN:]]
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('replay_times', ?)", [json.dumps(kept)])

    def _architecture(self, factory: str | None, kwargs: str | None, weights: Path) -> nn.Module:
        import copy
        if factory in self.trusted_factories or factory in model_files.DEFAULT_TRUSTED:
            try:
                return model_files.build_model(factory, kwargs, weights)
            except BinderException:
                if self.live_model is None:
                    raise
        if self.live_model is None:
            raise model_files.untrusted(factory, kwargs)
        return copy.deepcopy(self.live_model)

    def _checked_weights(self, c: dict) -> Path:
        """The checkpoint's weights file, once its checksum matched the catalog's (re-checked when
        the file changes on disk): wrong weights would give silently wrong scores."""
        path = self._inside(c["weights_file"])
        problem = self._weights_problem(c, path)
        if problem:
            raise IOException(f"{problem}; remove the checkpoint (DROP CHECKPOINT {c['name']}) and capture it again "
                              "(con.verify() lists every damaged file)")
        return path

    def _weights_problem(self, c: dict, path: Path) -> str | None:
        if not path.exists():
            return f"weights file {path} of checkpoint '{c['name']}' is missing"
        expected = c.get("weights_checksum")
        if expected is None:        # a store written before weights had checksums
            return None
        st = path.stat()
        seen = (c["name"], st.st_ino, st.st_size, st.st_mtime_ns)
        if seen in self._weights_ok:
            return None
        if file_checksum(path) != expected:
            return f"weights of checkpoint '{c['name']}' do not match their checksum ({path} was changed or replaced)"
        self._weights_ok.add(seen)
        return None

    # ---- layers and shards -----------------------------------------------------------------------
    def layers(self) -> list[dict]:
        return _dicts(self.db.execute("SELECT * FROM layers ORDER BY name"))

    def layer_meta(self, name: str) -> tuple[LayerMeta, str]:
        row = self.db.execute("SELECT meta, storage FROM layers WHERE name = ?", [name]).fetchone()
        if row is None:
            require_name("layer", name, [l["name"] for l in self.layers()])
        meta = LayerMeta(**json.loads(row[0]))
        self._load_kind(meta)
        return meta, row[1]

    def layer_metas(self, names: list[str]) -> dict[str, tuple[LayerMeta, str]]:
        """{name: (meta, storage mode)} of the registered layers among `names`, in one round trip
        (a flush asks for every layer it writes); names not registered, or whose kind this process
        cannot load (layer_meta's CatalogException), are left out."""
        rows = self.db.execute("SELECT name, meta, storage FROM layers WHERE name IN (SELECT unnest(?))",
                               [list(names)]).fetchall()
        out = {}
        for name, meta, storage in rows:
            meta = LayerMeta(**json.loads(meta))
            try:
                self._load_kind(meta)
            except CatalogException:
                continue
            out[name] = (meta, storage)
        return out

    def _load_kind(self, meta: LayerMeta) -> None:
        """Registers the layer's kind if this process lacks it: its recorded module is imported only
        when trusted like a model factory (importing a module runs its code)."""
        from metaql.storage.layers import kind_registered
        if kind_registered(meta.kind):
            return
        path = meta.kind_class
        if not path:
            raise CatalogException(f"layer '{meta.name}' was captured with the layer kind '{meta.kind}', which "
                                   "this process has not registered: import the module that defines it first")
        if path not in self.trusted_factories:
            raise model_files.UntrustedFactoryError(
                f"layer '{meta.name}' was captured with the layer kind '{meta.kind}' defined by '{path}', code "
                "this process has not trusted; if you trust it: metaql.connect(path, config={'trusted_factories': "
                f"['{path}']}}), or in the shell `metaql STORE --model {path}`; or import its module before querying")
        model_files.import_kind(path)
        if not kind_registered(meta.kind):
            raise CatalogException(f"importing '{path}' did not register the layer kind '{meta.kind}' of "
                                   f"layer '{meta.name}'")

    def register_layer(self, meta: LayerMeta, positions: int, factored_numbers: int, can_factor: bool,
                       storage: str | None) -> str:
        """Records a layer on first capture; returns its storage mode ('factored' or 'full'):
        whichever stores fewer numbers per sample, unless `storage` overrides it."""
        row = self.db.execute("SELECT storage FROM layers WHERE name = ?", [meta.name]).fetchone()
        if row:
            return row[0]
        fac, full = factored_numbers, kind_named(meta.kind).full_numbers(meta)
        from metaql.storage.layers import kind_class_of
        meta.kind_class = meta.kind_class or kind_class_of(meta.kind)
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
        """Sample ids stored for (checkpoint, layer). A resumed capture asks this of every layer, so
        only the id columns are read (memory-mapped); checksums are checked where factors are read."""
        ids = [self._shard_ids(r["file"]) for r in self._shard_rows("factors", checkpoint, layer)]
        return np.concatenate(ids) if ids else np.zeros(0, np.int64)

    def _shard_ids(self, rel: str) -> np.ndarray:
        if rel in self._shards:
            return self._shards[rel].ids
        path = self._inside(rel)
        if not path.exists():
            raise IOException(f"shard file {path} is missing; {SHARD_REMEDY}")
        return Shard(path).ids.copy()

    def factor_shards(self, checkpoint: str | None, layer: str | None) -> list[dict]:
        """Factor shard rows of (checkpoint, layer); None leaves that side open (a statement's
        catalog snapshot reads every one in one round trip)."""
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
        return self.write_factor_shards(checkpoint, [dict(layer=layer, ids=ids, tensors=tensors, storage=storage,
                                                          suffix_file=suffix_file)])[layer]

    def write_factor_shards(self, checkpoint: str, entries: list[dict], metas: dict | None = None,
                            publish: Callable[[], bool] | None = None) -> dict[str, str]:
        """Writes one shard per entry (layer, ids, tensors, storage, and suffix_of: the entry's layer
        whose shard holds its input, or suffix_file) as one unit: every row commits or none does.
        `metas`: layer_metas of the entries' layers, when the caller holds them. `publish`, asked
        once the rows committed: False when the caller publishes the catalog for readers itself
        soon after (a capture that is finishing). Returns {layer: path relative to the store}."""
        self._writable()
        layers = [e["layer"] for e in entries]
        named = dict(zip(layers, self._new_shard_files("factors", checkpoint, layers)))
        rels = {layer: rel for layer, (_, rel) in named.items()}
        rows, written, staged = [], [], []
        metas = metas if metas is not None else self.layer_metas(layers)
        measured = list(entries)        # what the norms are taken from
        try:
            self._record_pending(list(rels.values()))
            for i, e in enumerate(entries):
                fault_point("flush.layer")
                seq, rel = named[e["layer"]]
                path = self._path_for_write(rel)
                written.append(path)
                stored = _stored_tensors(e, metas.get(e["layer"]), checkpoint)
                if stored is not e["tensors"]:      # in bits: the norms below are of the numbers read back
                    measured[i] = dict(e, tensors=quantize.decoded(stored))
                staged.append(stage_shard(path, e["ids"], stored))
                suffix = rels[e["suffix_of"]] if e.get("suffix_of") else e.get("suffix_file")
                rows.append(_shard_row(seq, rel, "factors", checkpoint, e["layer"], e["ids"], staged[-1].nbytes,
                                       staged[-1].checksum, e["storage"], suffix, e.get("seen")))
            # TOPK's bounds, computed while the disk writes the staged files
            norm_rows = norms.entry_rows(self, checkpoint, measured, rels, metas)
            for shard in staged:
                shard.publish()
            for folder in dict.fromkeys(shard.path.parent for shard in staged):
                fsync_path(folder)
            with transaction(self.db):
                self._insert_shard_rows(rows)
                norms.insert(self.db, norm_rows)
                self.db.execute("DELETE FROM pending_files WHERE file IN (SELECT unnest(?))", [list(rels.values())])
                fault_point("commit.shards.before")
            fault_point("commit.shards.after")
        except BaseException:
            self._discard(written)
            raise
        if publish is None or publish():
            self.committed(force=False)      # readers see flushes within about a second
        return rels

    def _path_for_write(self, rel: str) -> Path:
        """Where the store writes file `rel`: its folder created without following any symlink."""
        return self.folder_for_write(Path(rel).parent.as_posix()) / Path(rel).name

    def _new_shard_file(self, kind: str, checkpoint: str | None, layer: str | None) -> tuple[int, str]:
        """(shard id, path relative to the store) of a new shard."""
        return self._new_shard_files(kind, checkpoint, [layer])[0]

    def _new_shard_files(self, kind: str, checkpoint: str | None, layers: list) -> list[tuple[int, str]]:
        """(shard id, path relative to the store) of a new shard per layer, in ascending id order:
        the sequence values of a whole flush in one round trip (one per layer cost 1-5 ms each)."""
        seqs = sorted(r[0] for r in self.db.execute("SELECT nextval('shard_seq') FROM range(?)",
                                                    [len(layers)]).fetchall())
        return [(seq, _shard_rel(kind, checkpoint, layer, durable.shard_name(seq))) for seq, layer in zip(seqs, layers)]

    def _record_pending(self, files: list[str]) -> None:
        """Commits the names of files about to be written, on a connection of its own so that it
        commits even inside the caller's open transaction (add_samples)."""
        fault_point("commit.pending.before")
        cur = self.db.cursor()
        try:
            cur.execute("INSERT INTO pending_files (file) SELECT unnest(?)", [files])
        finally:
            cur.close()
        fault_point("commit.pending.after")

    def _insert_shard_rows(self, rows: list[list]) -> None:
        """One INSERT of every row (executemany made a round trip per row: 2-10 ms a flush)."""
        if not rows:
            return
        values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(rows))
        self.db.execute(
            "INSERT INTO shards (shard_id, kind, checkpoint, layer, file, rows, min_id, max_id, bytes,"
            f" checksum, storage, suffix_file, seen_from_batch, seen_to_batch) VALUES {values}",
            [v for row in rows for v in row])

    def _discard(self, written: list[Path]) -> None:
        """Best effort after a failed write; what is left is deleted on the next writable open (the
        files are listed in pending_files). A file whose row committed is kept: a Ctrl-C can land
        just after the COMMIT returned, and deleting then would lose a committed shard."""
        rels = [path.relative_to(self.root).as_posix() for path in written]
        try:
            cur = self.db.cursor()
            try:
                named = {r[0] for r in cur.execute("SELECT file FROM shards WHERE file IN (SELECT unnest(?))",
                                                   [rels]).fetchall()}
            finally:
                cur.close()
        except Exception:  # cannot tell what committed: leave it all to the next open's cleanup
            return
        for path, rel in zip(written, rels):
            if rel not in named:
                path.unlink(missing_ok=True)
                durable.remove_own(self.root, [rel + ".tmp"])

    def shard_tensors(self, row: dict, checksum_of=None) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        """A factor shard's ids and tensors, with a shared suffix fetched from its owner's shard
        (whose checksum `checksum_of(file)` gives when the caller holds the shard rows)."""
        shard = self.open_shard(row["file"], row["checksum"])
        tensors = quantize.decoded({n: shard.tensor(n) for n in shard.names()})
        if row.get("suffix_file"):
            known = checksum_of(row["suffix_file"]) if checksum_of is not None else None
            owner = (known,) if known is not None else \
                self.db.execute("SELECT checksum FROM shards WHERE file = ?", [row["suffix_file"]]).fetchone()
            if owner is None:
                raise IOException(f"shard {row['file']} shares its input with {row['suffix_file']}, "
                                  f"which the catalog does not list; {SHARD_REMEDY}")
            other = self.open_shard(row["suffix_file"], owner[0])
            tensors.update({n: other.tensor(n) for n in other.names() if n not in tensors
                            and n in ("X", "I")})
        return shard.ids, tensors

    def _write_shard_row(self, kind, checkpoint, layer, ids, tensors, storage=None, suffix_file=None,
                         extra=None) -> str:
        """Writes one shard and inserts its row in the caller's transaction; the file is listed in
        pending_files first, so a kill before that transaction commits leaves nothing behind."""
        self._writable()
        seq, rel = self._new_shard_file(kind, checkpoint, layer)
        path = self._path_for_write(rel)
        self._record_pending([rel])
        try:
            nbytes, checksum = write_shard(path, ids, tensors, extra)
            self._insert_shard_rows([_shard_row(seq, rel, kind, checkpoint, layer, ids, nbytes, checksum, storage,
                                                suffix_file)])
        except BaseException:
            self._discard([path])
            raise
        return rel

    # ---- activations (metaql.diagnosis): rows of kind 'activations' in `shards`, no new table ----------
    def activation_shards(self, checkpoint: str | None = None, layer: str | None = None) -> list[dict]:
        """Activation shard rows; `storage` holds the spatial reduction ('max', 'mean', or 'none'
        for a layer whose output has one value per unit), `bytes` 0 where the row names a factor
        shard whose stored layer input is this layer's output (reused, not written twice)."""
        return self._shard_rows("activations", checkpoint, layer)

    def write_activation_shard(self, checkpoint: str, layer: str, ids: np.ndarray, values: torch.Tensor,
                               reduce: str) -> str:
        """Writes one activation shard (tensor 'A', (rows, units)) and commits its row; crash-safe
        like every shard (listed in pending_files before the file is written)."""
        with transaction(self.db):
            rel = self._write_shard_row("activations", checkpoint, layer, ids, {"A": values}, reduce,
                                        extra={"reduce": reduce})
            self.db.execute("DELETE FROM pending_files WHERE file = ?", [rel])
        self.committed(force=False)
        return rel

    def reference_activation_shards(self, checkpoint: str, layer: str, rows: list[dict]) -> None:
        """Records factor shards (`rows`: their catalog rows) as holding `layer`'s activations at
        `checkpoint` (their tensor 'X'), writing no file: the bytes are already stored once."""
        self._writable()
        with transaction(self.db):
            seqs = [self.db.execute("SELECT nextval('shard_seq')").fetchone()[0] for _ in rows]
            self._insert_shard_rows([[seq, "activations", checkpoint, layer, r["file"], r["rows"], r["min_id"],
                                      r["max_id"], 0, r["checksum"], "none", None, None, None]
                                     for seq, r in zip(seqs, rows)])
        self.committed(force=False)

    def open_shard(self, rel: str, checksum: str) -> Shard:
        """A memory-mapped shard, checksum-verified on first open, kept in an LRU cache of SHARD_CACHE."""
        if rel in self._shards:
            self._shards.move_to_end(rel)
            return self._shards[rel]
        path = self._inside(rel)
        if not path.exists():
            raise IOException(f"shard file {path} is missing; {SHARD_REMEDY}")
        if rel not in self._verified:
            if file_checksum(path) != checksum:
                raise IOException(f"shard file {path} is corrupt (checksum mismatch); {SHARD_REMEDY}")
            self._verified.add(rel)
        shard = Shard(path)
        self._shards[rel] = shard
        if len(self._shards) > SHARD_CACHE:
            self._shards.popitem(last=False)
        return shard

    def verify(self, repair: bool = False) -> list[str]:
        """Problems, one human-readable line each; empty when all is well: shard files missing or
        corrupt, checkpoints whose capture did not finish, weights that fail their checksum, per
        (checkpoint, layer) sample ids stored twice or missing against the checkpoint's other layers,
        and torn or corrupt artifacts (ELITE detectors, LANCET sessions). `repair`: the rows of
        factor and activation shards whose file is missing or corrupt are dropped (repair_shards),
        so that a resumed capture or a replay stores those samples again."""
        problems, ids, checked, damaged = [], {}, set(), []
        # kind 'factors' first: an activation row may name a factor shard's file (stored once),
        # which is hashed and reported once
        for row in _dicts(self.db.execute("SELECT kind, checkpoint, layer, file, checksum FROM shards "
                                          "ORDER BY kind <> 'factors', shard_id")):
            if row["file"] in checked:
                continue
            checked.add(row["file"])
            try:
                path = self._inside(row["file"])
            except IOException as e:
                problems.append(str(e))
                continue
            if not path.exists():
                problems.append(f"missing: {row['file']}")
                damaged.append(row)
                continue
            try:
                intact = file_checksum(path) == row["checksum"]
            except IOException as e:   # not a regular file, unreadable
                problems.append(str(e))
                damaged.append(row)
                continue
            if not intact:
                problems.append(f"corrupt: {row['file']}")
                damaged.append(row)
            elif row["kind"] == "factors":
                ids.setdefault(row["checkpoint"], {}).setdefault(row["layer"], []).append(Shard(path).ids)
        damaged = [r for r in damaged if r["kind"] != "inputs"]     # registered inputs: no capture refills them
        if repair and damaged:
            return self._repaired(damaged) + self.verify()      # then what is left, e.g. checkpoints now partial
        for c in self.checkpoints():
            problems += self._checkpoint_problems(c, ids.get(c["name"], {}))
        return problems + artifact_problems(self.root)

    def _repaired(self, damaged: list[dict]) -> list[str]:
        """Repairs the damaged shards; one line each saying what was dropped."""
        dropped = self.repair_shards([r["file"] for r in damaged])
        return [f"repaired: {r['file']} (checkpoint '{r['checkpoint']}' layer '{r['layer']}'): "
                f"{dropped.get(r['file'], (0,))[0]} catalog row(s) dropped" for r in damaged]

    def repair_shards(self, files: list[str]) -> dict[str, tuple[int, list[str]]]:
        """Drops the catalog rows of damaged shard files (missing or corrupt): the rows naming them,
        the rows whose shared input lives in them, and those rows' per-sample norms, in one
        transaction that also marks their checkpoints partial and records, per checkpoint, the ids
        dropped per layer (meta 'dropped/<checkpoint>'), so that a replay that stores them all again
        makes it complete again (finish_repair). The files are then deleted like DROP CHECKPOINT's.
        Returns {file: (shard rows dropped, [checkpoints])}."""
        self._writable()
        out: dict[str, tuple[int, list[str]]] = {}
        with transaction(self.db):
            rows = _dicts(self.db.execute("SELECT shard_id, kind, checkpoint, layer, file, suffix_file, rows FROM "
                                          "shards WHERE file IN (SELECT unnest(?)) OR suffix_file IN (SELECT unnest(?))",
                                          [files, files]))
            busy = sorted({r["checkpoint"] for r in rows} & self.open_captures)
            if busy:
                raise InvalidInputException(f"checkpoint '{busy[0]}' is being captured in this connection; repair its "
                                            "shards after its `with con.capture(...)` block ends")
            lost: dict[str, dict[str, list[int]]] = {}
            unread: dict[str, dict[str, int]] = {}     # rows of shards whose ids nothing tells any more
            for r in rows:
                key = r["file"] if r["file"] in files else r["suffix_file"]
                n, ckpts = out.get(key, (0, []))
                out[key] = (n + 1, sorted(set(ckpts) | {r["checkpoint"]}))
                if r["kind"] == "factors":
                    ids = self._readable_ids(r["file"], r["shard_id"])
                    lost.setdefault(r["checkpoint"], {}).setdefault(r["layer"], []).extend(ids)
                    if not ids:
                        layers = unread.setdefault(r["checkpoint"], {})
                        layers[r["layer"]] = layers.get(r["layer"], 0) + r["rows"]
            shard_ids = [r["shard_id"] for r in rows]
            gone = sorted({r["file"] for r in rows})
            self.db.execute("DELETE FROM sample_norms WHERE file IN (SELECT unnest(?))", [gone])
            self.db.execute("DELETE FROM shards WHERE shard_id IN (SELECT unnest(?))", [shard_ids])
            gone = [f for f in gone if f not in self._named_files()]
            self.db.execute("INSERT OR IGNORE INTO pending_files (file) SELECT unnest(?)", [gone])
            for ckpt, layers in lost.items():
                self._record_dropped(ckpt, layers, unread.get(ckpt, {}))
        self._forget("", gone)
        durable.remove_own(self.root, gone)
        self.db.execute("DELETE FROM pending_files WHERE file IN (SELECT unnest(?))", [gone])
        self.committed()
        return out

    def _readable_ids(self, rel: str, shard_id: int) -> list[int]:
        """The ids a damaged shard held: from the norms written with it (one row per stored sample;
        the catalog is intact where the file is not), else from its file when its id column still
        reads; [] when neither is left."""
        rows = self.db.execute("SELECT DISTINCT sample_id FROM sample_norms WHERE file = ?", [rel]).fetchall()
        if rows:
            return sorted(r[0] for r in rows)
        try:
            return Shard(self._inside(rel)).ids.tolist()
        except Exception:   # noqa: BLE001 - missing or unreadable: nothing left to say which ids it held
            return []

    def _record_dropped(self, ckpt: str, layers: dict[str, list[int]], unread: dict[str, int]) -> None:
        """Marks `ckpt` partial and adds `layers` ({layer: ids}) to what it must store again; for a
        shard whose ids neither its norms nor its file tell (`unread`: {layer: its rows}), the layer
        must hold that many more samples than it holds after the repair."""
        key = f"dropped/{ckpt}"
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        status = self.db.execute("SELECT status FROM checkpoints WHERE name = ?", [ckpt]).fetchone()[0]
        record = json.loads(row[0]) if row else {"was": status, "ids": {}}
        record.setdefault("at_least", {})
        for layer, ids in layers.items():
            record["ids"][layer] = sorted(set(record["ids"].get(layer, [])) | set(ids))
        record.setdefault("unread", {})
        for layer, n in unread.items():    # what it held before this repair, or before an earlier one
            record["at_least"][layer] = max(record["at_least"].get(layer, 0), self._stored_rows(ckpt, layer) + n)
            record["unread"][layer] = record["unread"].get(layer, 0) + n
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, json.dumps(record)])
        self.db.execute("UPDATE checkpoints SET status = 'partial' WHERE name = ?", [ckpt])

    def _stored_rows(self, ckpt: str, layer: str) -> int:
        return self.db.execute("SELECT coalesce(sum(rows), 0) FROM shards WHERE kind = 'factors' AND checkpoint = ? "
                               "AND layer = ?", [ckpt, layer]).fetchone()[0]

    def _repair_pending(self, ckpt: str) -> dict | None:
        """The repair record of `ckpt` while some sample it dropped is not stored again; None once
        every one is (or there was no repair)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [f"dropped/{ckpt}"]).fetchone()
        if row is None:
            return None
        record = json.loads(row[0])
        for layer, ids in record["ids"].items():
            if not np.isin(np.asarray(ids, np.int64), self.stored_ids(ckpt, layer)).all():
                return record
        for layer, n in record.get("at_least", {}).items():
            if self._stored_rows(ckpt, layer) < n:
                return record
        return None

    def finish_repair(self, ckpt: str) -> bool:
        """After a replay into `ckpt`: once every id repair_shards dropped is stored again, the
        checkpoint is back to the status it had before the repair; True when it is."""
        key = f"dropped/{ckpt}"
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        if row is None or self._repair_pending(ckpt) is not None:
            return False
        record = json.loads(row[0])
        with transaction(self.db):
            self.db.execute("UPDATE checkpoints SET status = ? WHERE name = ?", [record["was"], ckpt])
            self.db.execute("DELETE FROM meta WHERE key = ?", [key])
        self.committed()
        return True

    def _checkpoint_problems(self, c: dict, layer_ids: dict[str, list[np.ndarray]]) -> list[str]:
        name, out = c["name"], []
        if c["status"] != "complete":
            out.append(self._unfinished_problem(c))
        try:
            problem = self._weights_problem(c, self._inside(c["weights_file"]))
        except IOException as e:
            problem = str(e)
        if problem:
            out.append(problem)
        per_layer = {layer: np.concatenate(parts) for layer, parts in sorted(layer_ids.items())}
        union = np.unique(np.concatenate(list(per_layer.values()))) if per_layer else np.zeros(0, np.int64)
        for layer, stored in per_layer.items():
            unique = np.unique(stored)
            if len(unique) != len(stored):
                out.append(f"checkpoint '{name}' layer '{layer}' stores {len(stored) - len(unique)} sample ids "
                           "twice; its scores count them twice: recapture it under a new checkpoint name")
            if len(unique) != len(union):
                out.append(f"checkpoint '{name}' layer '{layer}' lacks {len(union) - len(unique)} of the "
                           f"{len(union)} samples its other layers hold; run the same capture again to fill them in")
        unknown = self._unregistered(union)
        if unknown:
            out.append(f"checkpoint '{name}' stores {unknown} sample ids that are not registered samples")
        return out

    def _unfinished_problem(self, c: dict) -> str:
        name = c["name"]
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [f"dropped/{name}"]).fetchone()
        if row is not None:
            record = json.loads(row[0])
            lost, unread = record["ids"], record.get("unread", {})
            n = len(set().union(*lost.values())) if lost else 0
            held = f"{n} samples' factors" if not unread else \
                f"the factors of {sum(unread.values())} samples whose ids could not be read" + (f" and of {n} others" if n else "")
            return (f"checkpoint '{name}' is {c['status']}: con.verify(repair=True) dropped the damaged shards holding "
                    f"{held} of layer(s) {', '.join(sorted(set(lost) | set(unread)))}; store them again with con.replay('{name}', <set>) or by running "
                    f"the same capture again, or remove it (DROP CHECKPOINT {name})")
        return (f"checkpoint '{name}' is {c['status']}: its capture did not finish; run the same capture again to "
                f"resume it, or remove it (DROP CHECKPOINT {name})")

    def _unregistered(self, ids: np.ndarray) -> int:
        if len(ids) == 0:
            return 0
        register(self.db, "_stored_ids", pa.table({"sample_id": ids}))
        try:
            return self.db.execute("SELECT count(*) FROM _stored_ids WHERE sample_id NOT IN "
                                   "(SELECT sample_id FROM samples)").fetchone()[0]
        finally:
            unregister(self.db, "_stored_ids")

    def _inside(self, rel: str) -> Path:
        return files.inside(self.root, rel)

    def folder_for_write(self, rel: str) -> Path:
        """The folder `rel` inside the store, created without following any symlink: where every
        file the store writes goes (shards, weights, artifacts)."""
        return files.folder_for_write(self.root, rel)

    def artifact_dir(self, kind: str, name: str) -> Path:
        """The slot of a table function's artifact (storage/artifacts.py saves into it as one unit);
        created only on a writable store: a read-only one writes nothing."""
        for part in (kind, name):
            if not _SAFE_NAME.match(str(part)) or str(part) in (".", ".."):
                raise BinderException(f"'{part}' is not a safe artifact name")
        rel = f"artifacts/{kind}/{name}"
        # a read-only store only looks (symlinks refused all the same); a writer creates the slot
        return self._inside(rel) if self.read_only else self.folder_for_write(rel)


def quote_identifier(name: str) -> str:
    """A name as a DuckDB identifier: double-quoted, inner quotes doubled (never closes early)."""
    return '"' + str(name).replace('"', '""') + '"'


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


def _set_ids(column: pa.ChunkedArray, name: str) -> np.ndarray:
    """A set query's id column as int64: whole numbers without NULLs, else a BinderException."""
    if not pa.types.is_integer(column.type):
        raise BinderException(f"a set's query must return integer sample ids, but its column '{name}' is "
                              f"{column.type}; select sample_id (or cast the ids to BIGINT)")
    if column.null_count:
        raise BinderException(f"a set's query returned {column.null_count} NULL id(s) in '{name}'; "
                              "filter them out (WHERE sample_id IS NOT NULL)")
    return column.to_numpy().astype(np.int64)


def _as_ids(ids) -> np.ndarray:
    """`ids` as a new flat int64 array (a copy: the caller may reuse its own)."""
    if type(ids) is np.ndarray and ids.dtype == np.int64 and ids.ndim == 1:
        return ids.copy()       # the usual batch of ids, checked once per training step
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.dtype.kind not in "iu":
        raise InvalidInputException(f"sample ids must be integers, got {arr.dtype}")
    if arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:    # astype would wrap it negative
        raise InvalidInputException(f"sample ids are 64-bit signed integers (BIGINT); {int(arr.max())} is too large")
    return arr.astype(np.int64).reshape(-1)


def is_checkpoint_name(name: str) -> bool:
    """Whether `name` can name a checkpoint (it names its weights file and shard folder too)."""
    return bool(_SAFE_NAME.match(name))


# cost constants measured in this process, by measuring function: this machine's, whatever the store
_MEASURED: dict = {}


def _stored_tensors(entry: dict, layer_meta, checkpoint: str) -> dict:
    """The tensors a flush's entry is written as: a sketched layer stored in 8 or 4 bits gets its codes
    and scales (storage/quantize.py), any other its own."""
    meta = layer_meta[0] if layer_meta else None
    spec = meta.extra.get("projection", {}) if meta is not None else {}
    if not spec.get("bits") or "G" not in entry["tensors"]:
        return entry["tensors"]
    return quantize.encoded(entry["tensors"], spec["bits"], spec["seed"], np.asarray(entry["ids"]), checkpoint)


def _shard_row(seq, rel, kind, checkpoint, layer, ids, nbytes, checksum, storage, suffix_file,
               seen: tuple[int, int] | None = None) -> list:
    """A `shards` row; `seen`: the first and last training batch whose weights computed its factors
    (None: the checkpoint's own weights)."""
    return [seq, kind, checkpoint, layer, rel, len(ids), int(ids.min()), int(ids.max()), nbytes, checksum,
            storage, suffix_file, *(seen or (None, None))]


def _checkpoint_folders(files: list[str]) -> list[str]:
    """The folders holding a dropped checkpoint's shard files and their parents (tensors/<checkpoint>),
    deepest first: emptied, they are removed."""
    folders = set()
    for rel in files:
        parts = rel.split("/")
        if parts[0] in ("tensors", "activations") and len(parts) == 4:
            folders.update(["/".join(parts[:3]), "/".join(parts[:2])])
    return sorted(folders, key=lambda f: -f.count("/"))


def _shard_rel(kind: str, checkpoint: str | None, layer: str | None, name: str) -> str:
    """A new shard's path relative to the store."""
    if kind == "activations":
        return f"activations/{checkpoint}/{layer}/{name}"
    return f"tensors/{checkpoint}/{layer}/{name}" if kind == "factors" else f"inputs/{name}"


def _dicts(rel) -> list[dict]:
    cols = [d[0] for d in rel.description]
    return [dict(zip(cols, r)) for r in rel.fetchall()]


def confine_files(db, root: Path) -> None:
    """DuckDB on `db` may touch files only under `root` (the store's own snapshot goes there)."""
    if not db.execute("SELECT current_setting('enable_external_access')").fetchone()[0]:
        return      # a cursor on a database already confined (the setting is the database's)
    allowed = str(Path(root).resolve()).replace("'", "''") + os.sep
    db.execute(f"SET allowed_directories = ['{allowed}']")
    db.execute("SET enable_external_access = false")
