"""One statement's view of the catalog: what it reads of sets, layers, checkpoints, sample columns
and shards, each read at most once, on first use.

The binder resolves every name argument of every table function against it (so EXPLAIN refuses an
unknown set exactly as running the function would), and the optimizer and executor read layer
rows, checkpoint rows and shard lists from it instead of asking DuckDB again per layer. A statement
that changes the catalog (CREATE SET, a capture) makes a new one for the next statement; within a
statement the view is consistent.

    snap = CatalogSnapshot(store)
    snap.set_ids("test")                 # a named set, else a split; did-you-mean otherwise
    snap.layer_names(["enc.*", "head"])  # glob patterns over the stored layers
    snap.checkpoint_names("all")         # complete checkpoints (unfinished ones warned about)
"""
from __future__ import annotations

import fnmatch
import json
import warnings
from functools import cached_property
from typing import Callable

import numpy as np

from metaql.errors import BinderException, CatalogException, InvalidInputException, Warning, user_stacklevel
from metaql.storage.catalog import require_name
from metaql.storage.layers import LayerMeta

_GLOB = set("*?[")
EVERY_LAYER = ("*",)


class CatalogSnapshot:
    def __init__(self, store) -> None:
        self.store = store
        self._set_ids: dict[str, np.ndarray] = {}
        self._samples: set[int] = set()

    # ---- sets -----------------------------------------------------------------------------------
    @cached_property
    def set_names(self) -> list[str]:
        return self.store.set_names()

    @cached_property
    def splits(self) -> list[str]:
        return self.store.splits()

    def require_set(self, name: str) -> str:
        """`name` if it is a named set or a split; a CatalogException with did-you-mean otherwise."""
        name = str(name)
        if name not in self.set_names and name not in self.splits:
            # a set may share a split's name (stores made before CREATE SET refused it): list it once
            require_name("set", name, list(dict.fromkeys(self.set_names + self.splits)))
        return name

    def set_ids(self, name: str) -> np.ndarray:
        name = self.require_set(name)
        if name not in self._set_ids:   # a named set before a split of the same name, as Store.set_ids
            self._set_ids[name] = self.store.member_ids(name, split=name not in self.set_names)
        return self._set_ids[name]

    def require_sample(self, sample_id: int) -> int:
        if sample_id not in self._samples:
            if not self.store.has_sample(sample_id):
                raise CatalogException(f"sample {sample_id} is not registered")
            self._samples.add(sample_id)
        return sample_id

    # ---- sample columns -------------------------------------------------------------------------
    @cached_property
    def sample_columns(self) -> list[str]:
        return self.store.sample_column_names()

    def require_column(self, name: str) -> str:
        """`name` if `samples` has that column (case-blind, as DuckDB); a BinderException (DuckDB's
        class for an unknown column) with did-you-mean otherwise, as Store.sample_columns says it."""
        if str(name).lower() not in {c.lower() for c in self.sample_columns}:
            try:
                require_name("samples column", str(name), self.sample_columns)
            except CatalogException as e:
                raise BinderException(str(e)) from None
        return str(name)

    # ---- layers ---------------------------------------------------------------------------------
    @cached_property
    def layers(self) -> dict[str, dict]:
        """name -> the layer's catalog row, with its parsed LayerMeta under 'layer_meta'."""
        rows = {}
        for row in self.store.layers():
            rows[row["name"]] = dict(row, layer_meta=LayerMeta(**json.loads(row["meta"])))
        return rows

    def layer(self, name: str) -> dict:
        """The layer's row, its kind registered first (a user's kind is imported only if trusted,
        as Store.layer_meta does: a layer is never scored by a kind this process lacks)."""
        if name not in self.layers:
            require_name("layer", name, list(self.layers))
        row = self.layers[name]
        self.store._load_kind(row["layer_meta"])
        return row

    def layer_meta(self, name: str) -> tuple[LayerMeta, str]:
        """What Store.layer_meta returns, from this snapshot."""
        row = self.layer(name)
        return row["layer_meta"], row["storage"]

    def layer_names(self, spec) -> list[str]:
        """Stored layer names for `*` (or None), names and glob patterns ('enc.*'), in the order given
        (a pattern's matches sorted); an unknown name or a pattern matching nothing is refused."""
        known = list(self.layers)
        if not known:
            raise CatalogException(f"{self.store.where()} has no captured layers yet; capture some with "
                                   "con.capture(...)")
        if spec is None or (isinstance(spec, str) and spec == "*") or (
                isinstance(spec, (list, tuple)) and list(spec) == list(EVERY_LAYER)):
            return known
        names = [spec] if isinstance(spec, str) else [str(n) for n in spec]
        out: list[str] = []
        for n in names:
            if _GLOB & set(n):
                matched = [k for k in known if fnmatch.fnmatchcase(k, n)]
                if not matched:
                    raise CatalogException(f"layer pattern '{n}' matches no stored layer. "
                                           f"Known layers: {', '.join(known)}")
            else:
                require_name("layer", n, known)
                matched = [n]
            out += [m for m in matched if m not in out]
        return out

    # ---- checkpoints ----------------------------------------------------------------------------
    @cached_property
    def checkpoints(self) -> list[dict]:
        return self.store.checkpoints()

    def checkpoint(self, name: str) -> dict:
        for c in self.checkpoints:
            if c["name"] == name:
                return c
        require_name("checkpoint", name, [c["name"] for c in self.checkpoints])
        raise AssertionError  # pragma: no cover - require_name raised

    def checkpoint_names(self, spec) -> list[str]:
        """Checkpoint names for `all`, `last`, `first`, one name or a list. A checkpoint whose capture
        did not finish (killed, or still running in another process) holds factors for only some
        samples, so it is never scored: `all`, `first` and `last` leave it out with a warning,
        naming it is an error."""
        known = [c["name"] for c in self.checkpoints]
        if not known:
            raise CatalogException("the store has no checkpoints yet; capture one with con.capture(...)")
        unfinished = {c["name"]: c["status"] for c in self.checkpoints if c["status"] != "complete"}
        if spec in ("all", None, "last", "first"):
            # a derived checkpoint (REWEIGHT's model) is not on the training run: named, never implied
            derived = {c["name"] for c in self.checkpoints if c.get("derived_from")}
            complete = [n for n in known if n not in unfinished and n not in derived]
            if not complete:
                raise InvalidInputException(f"no checkpoint is complete ({_unfinished_text(unfinished)}); "
                                            "finish or resume the capture (run it again) before querying")
            picked = {"last": complete[-1:], "first": complete[:1]}.get(spec, complete)
            if any(n in unfinished for n in known if spec in ("all", None)
                   or (spec == "last" and n == known[-1]) or (spec == "first" and n == known[0])):
                warnings.warn(f"left out {_unfinished_text(unfinished)}: scores use the complete checkpoints "
                              f"({', '.join(picked)}); run the same capture again to resume it, or remove it "
                              f"(DROP CHECKPOINT {next(iter(unfinished))}) to silence this", Warning,
                              stacklevel=user_stacklevel())
            # `first` with `last` compares the start and the end of training in one JOIN
            return picked
        names = [spec] if isinstance(spec, str) else [str(c) for c in spec]
        for n in names:
            require_name("checkpoint", n, known, CHECKPOINT_WORDS)
            if n in unfinished:
                raise InvalidInputException(f"checkpoint '{n}' is {unfinished[n]}: its capture did not finish, so "
                                            "it holds factors for only some samples; resume it (run the same "
                                            f"capture again) before querying it, or remove it (DROP CHECKPOINT {n})")
        return list(dict.fromkeys(names))     # a name given twice is one checkpoint, as a layer is

    # ---- shards ---------------------------------------------------------------------------------
    @cached_property
    def input_shards(self) -> list[dict]:
        """The inputs shards' rows: every checkpoint's query-side replay streams from these."""
        return self.store.input_shard_rows()

    @cached_property
    def _factor_shards(self) -> dict[tuple[str, str], list[dict]]:
        """Every factor shard row, read in one round trip, by (checkpoint, layer) in shard order."""
        out: dict[tuple[str, str], list[dict]] = {}
        for row in self.store.factor_shards(None, None):     # None, None: every checkpoint and layer
            out.setdefault((row["checkpoint"], row["layer"]), []).append(row)
        return out

    def factor_shards(self, checkpoint: str, layer: str) -> list[dict]:
        return self._factor_shards.get((checkpoint, layer), [])

    def shard_checksum(self, file: str) -> str | None:
        """The checksum the catalog records for a factor shard's file (a shared input's owner)."""
        for rows in self._factor_shards.values():
            for row in rows:
                if row["file"] == file:
                    return row["checksum"]
        return None

    def shard_tensors(self, row: dict):
        return self.store.shard_tensors(row, checksum_of=self.shard_checksum)

    # ---- the cost model's constants -------------------------------------------------------------
    def cost_constants(self, measure: Callable[[], dict]) -> dict[str, float]:
        """The cost model's constants: kept in the catalog, measured (and kept, unless read-only)
        on first use; read once per statement."""
        if "_cost" not in self.__dict__:
            self.__dict__["_cost"] = self.store.cost_constants(measure)
        return self.__dict__["_cost"]


def catalog_of(ctx) -> CatalogSnapshot:
    """The statement's snapshot of a table function's context; a fresh one for a context made
    without it (a function called from Python)."""
    snap = getattr(ctx, "catalog", None)
    if snap is None:
        snap = CatalogSnapshot(ctx.store)
        try:
            ctx.catalog = snap
        except AttributeError:   # a read-only stand-in context
            pass
    return snap


# what checkpoints= takes besides a name: a typo of one is hinted at (checkpoints=lasst)
CHECKPOINT_WORDS = ("all", "first", "last")


def _unfinished_text(unfinished: dict[str, str]) -> str:
    return ", ".join(f"checkpoint '{n}' ({status})" for n, status in unfinished.items())
