"""The shared core of a selection session: the pool, human labels with who and when, a budget,
oracle mode, and persistence as JSON plus safetensors (never pickle) written as one unit
(storage/artifacts.py: a crash mid-save leaves the previous save current).

A rule is a subclass: LANCET (labeling/session.py) adds its trained rounds, active learning and
label cleaning (active/sessions.py) their cycles and annotation counts. A subclass persists its
own state by extending `_state()` (tensors, JSON fields) and `_restore(meta, tensors, directory)`.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from metaql.errors import IOException, InvalidInputException, Warning as MetaQLWarning
from metaql.storage.artifacts import load_unit, save_unit

FORMAT = 1


class SelectionSession:
    """Human labels over a pool of sample ids, within an optional budget of labeled samples."""

    kind = "selection"      # recorded in session.json: a save is loaded only by its own kind

    def __init__(self, pool_ids: Sequence[int] | np.ndarray, num_classes: int,
                 budget: int | None = None, oracle: Sequence[int] | np.ndarray | None = None) -> None:
        self.pool_ids = np.asarray(pool_ids, dtype=np.int64)
        if np.unique(self.pool_ids).size != self.pool_ids.size:
            raise InvalidInputException("the pool lists some sample id more than once")
        if num_classes < 2:
            raise InvalidInputException(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes, self.budget = int(num_classes), budget
        self._check_budget()
        self.oracle = None if oracle is None else np.asarray(oracle, dtype=np.int64)
        if self.oracle is not None and self.oracle.shape != self.pool_ids.shape:
            raise InvalidInputException("the oracle needs one label per pool sample")
        self._row = {int(i): r for r, i in enumerate(self.pool_ids)}
        self.labels: dict[int, tuple[int, str, dt.datetime]] = {}   # id -> (label, by, at)
        self.rounds = 0     # completed rounds (cycles, selector updates) of the rule

    def _check_budget(self) -> None:
        if self.budget is not None and not 0 < self.budget <= self.pool_ids.size:
            raise InvalidInputException(
                f"budget {self.budget} must be positive and at most the pool's size "
                f"({self.pool_ids.size} samples)")

    # -- labels -----------------------------------------------------------------------------------
    def label(self, ids: Iterable[int], labels: Iterable[int], by: str = "human",
              at: dt.datetime | None = None, overwrite: bool = False) -> int:
        """Records labels; returns how many are new. Never silently replaces a human label:
        a different label for a labeled id raises unless overwrite=True (then it warns)."""
        ids_a = np.asarray(list(ids), dtype=np.int64)
        labels_a = np.asarray(list(labels), dtype=np.int64)
        self.check_labels(ids_a, labels_a)
        changed = [(int(i), self.labels[int(i)][0], int(y)) for i, y in zip(ids_a, labels_a)
                   if int(i) in self.labels and self.labels[int(i)][0] != int(y)]
        if changed and not overwrite:
            shown = ", ".join(f"{i}: {old} -> {new}" for i, old, new in changed[:5])
            raise InvalidInputException(
                f"{len(changed)} label(s) contradict earlier human labels ({shown}); pass "
                f"overwrite=True to replace them")
        if changed:
            warnings.warn(f"replacing {len(changed)} earlier human label(s)", MetaQLWarning,
                          stacklevel=2)
        fresh = [int(i) for i in ids_a if int(i) not in self.labels]
        if self.budget is not None and len(self.labels) + len(fresh) > self.budget:
            raise InvalidInputException(
                f"{len(fresh)} new label(s) exceed the budget of {self.budget} "
                f"({self.budget - len(self.labels)} left)")
        when = at or dt.datetime.now(dt.timezone.utc)
        for i, y in zip(ids_a, labels_a):
            i, y = int(i), int(y)
            if i in self.labels and self.labels[i][0] == y:
                continue   # the same label again keeps its first author and time
            self.labels[i] = (y, by, when)
        return len(fresh)

    def ask_oracle(self, ids: Iterable[int], by: str = "oracle") -> np.ndarray:
        """Oracle mode: labels `ids` with their true labels and returns them."""
        truth = self.oracle_labels(ids)
        self.label(np.asarray(list(ids), dtype=np.int64), truth, by=by)
        return truth

    def oracle_labels(self, ids: Iterable[int]) -> np.ndarray:
        if self.oracle is None:
            raise InvalidInputException("this session has no oracle; pass oracle=... to create one")
        return self.oracle[self.rows(ids)]

    def check_labels(self, ids: np.ndarray, labels: np.ndarray, one_per_id: bool = True) -> None:
        """Raises unless ids are pool samples and labels classes (one label per id in a call)."""
        if ids.shape != labels.shape:
            raise InvalidInputException(f"{ids.size} id(s) but {labels.size} label(s)")
        self.rows(ids)   # raises on ids outside the pool
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.size:
            raise InvalidInputException(
                f"labels must lie in [0, {self.num_classes}); got {sorted(set(bad.tolist()))[:10]}")
        if not one_per_id:
            return
        order = np.argsort(ids, kind="stable")
        dup = (ids[order][1:] == ids[order][:-1]) & (labels[order][1:] != labels[order][:-1])
        if dup.any():
            raise InvalidInputException(
                f"sample {int(ids[order][1:][dup][0])} is given two different labels in one call")

    def rows(self, ids: Iterable[int]) -> np.ndarray:
        """Pool rows of sample ids; raises naming ids that are not in the pool."""
        ids_l = [int(i) for i in ids]
        missing = [i for i in ids_l if i not in self._row]
        if missing:
            raise InvalidInputException(
                f"{len(missing)} sample id(s) are not in the pool: {missing[:10]}")
        return np.asarray([self._row[i] for i in ids_l], dtype=np.int64)

    @property
    def labeled_ids(self) -> np.ndarray:
        return np.asarray(sorted(self.labels), dtype=np.int64)

    @property
    def unlabeled_ids(self) -> np.ndarray:
        return self.pool_ids[~np.isin(self.pool_ids, self.labeled_ids)]

    def labels_of(self, ids: Iterable[int]) -> np.ndarray:
        return np.asarray([self.labels[int(i)][0] for i in ids], dtype=np.int64)

    @property
    def n_labeled(self) -> int:
        return len(self.labels)

    @property
    def budget_left(self) -> int | None:
        return None if self.budget is None else self.budget - len(self.labels)

    def key(self) -> str:
        """Content hash of the labeled set (ids and labels): the cache key of trained state."""
        ids = self.labeled_ids
        h = hashlib.sha256()
        h.update(np.int64(self.num_classes).tobytes())
        h.update(ids.tobytes())
        h.update(self.labels_of(ids).tobytes())
        return h.hexdigest()[:16]

    # -- persistence ------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Writes session.json and session.safetensors (and a subclass's files) under
        `directory` as one unit; returns `directory`."""
        save_unit(directory, self._write_files)
        return Path(directory)

    def _write_files(self, d: Path) -> None:
        tensors, meta = self._state(d)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "session.safetensors"))
        (d / "session.json").write_text(json.dumps(meta, indent=1, default=str))

    def _state(self, d: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON fields) of the shared state; a subclass adds its own to both."""
        ids = self.labeled_ids
        tensors = {
            "pool_ids": torch.from_numpy(self.pool_ids),
            "labeled_ids": torch.from_numpy(ids),
            "labeled_labels": torch.from_numpy(self.labels_of(ids)),
            "labeled_at_us": torch.as_tensor([micros(self.labels[int(i)][2]) for i in ids], dtype=torch.long),
        }
        if self.oracle is not None:
            tensors["oracle"] = torch.from_numpy(self.oracle)
        meta = {"format": FORMAT, "num_classes": self.num_classes, "budget": self.budget,
                "labeled_by": [self.labels[int(i)][1] for i in ids], "rounds": self.rounds, "kind": self.kind}
        return tensors, meta

    @classmethod
    def load(cls, directory: str | Path, **kwargs: Any) -> "SelectionSession":
        """Reads a saved session (checked against its manifest); keyword arguments go to the
        subclass's `_restore`."""
        return load_unit(directory, lambda d: cls._read_files(d, **kwargs))

    @classmethod
    def _read_files(cls, d: Path, **kwargs: Any) -> "SelectionSession":
        try:
            meta = json.loads((d / "session.json").read_text())
            t = load_file(str(d / "session.safetensors"))
        except (OSError, ValueError) as e:
            raise IOException(f"cannot read a {cls.kind} session from {d}: {e}") from e
        if meta.get("format") != FORMAT:
            raise IOException(f"{d} holds session format {meta.get('format')}, expected {FORMAT}")
        saved = meta.get("kind", "labeling")       # LANCET sessions saved before the core have no kind
        if saved != cls.kind:
            raise IOException(f"{d} holds a {saved} session, not a {cls.kind} one")
        session = cls._restore(meta, t, d, **kwargs)
        ats = [dt.datetime.fromtimestamp(us / 1e6, dt.timezone.utc) for us in t["labeled_at_us"].tolist()]
        for i, y, by, at in zip(t["labeled_ids"].tolist(), t["labeled_labels"].tolist(), meta["labeled_by"], ats):
            session.labels[int(i)] = (int(y), by, at)
        session.rounds = int(meta.get("rounds", 0))
        return session

    @classmethod
    def _restore(cls, meta: dict[str, Any], t: dict[str, torch.Tensor], d: Path, **kwargs: Any):
        """A session of this class from the saved fields (labels are added after)."""
        return cls(t["pool_ids"].numpy(), meta["num_classes"], meta["budget"],
                   t["oracle"].numpy() if "oracle" in t else None)


def micros(at: dt.datetime) -> int:
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.timezone.utc)
    return int(round(at.timestamp() * 1e6))
