"""The catalog's human labels (table `labels`), read and added without ever silently overwriting one.

`read_labels` returns a pool's labels; `add_labels` writes new ones all or nothing and refuses to
replace a different earlier label unless told to (then it warns): a human label is never
silently overwritten. `Connection.label(ids, labels, by=...)` and LANCET write through here.
"""
from __future__ import annotations

import datetime as dt
import warnings
from typing import Any, Iterable

import numpy as np

from metaql.engine.errors import IOException, InvalidInputException, Warning as MetaQLWarning


def read_labels(store: Any, ids: np.ndarray) -> dict[str, np.ndarray]:
    """sample_id, label, labeled_by, labeled_at of the labeled samples among `ids`, by id."""
    rows = store.sql(
        "SELECT sample_id, label, labeled_by, labeled_at FROM labels "
        "WHERE sample_id IN (SELECT unnest(?)) ORDER BY sample_id",
        [np.asarray(ids, dtype=np.int64).tolist()]).fetchall()
    return {"sample_id": np.asarray([r[0] for r in rows], dtype=np.int64),
            "label": np.asarray([r[1] for r in rows], dtype=np.int64),
            "labeled_by": np.asarray([r[2] or "" for r in rows], dtype=object),
            "labeled_at": np.asarray([r[3] for r in rows], dtype=object)}


def add_labels(store: Any, ids: Iterable[int], labels: Iterable[int], by: str = "human",
               at: dt.datetime | None = None, overwrite: bool = False) -> int:
    """Inserts labels; returns how many samples were newly labeled.

    A sample already labeled with the same label is left as it was (author and time kept); one
    labeled differently raises InvalidInputException unless overwrite=True.
    """
    if getattr(store, "read_only", False):
        raise IOException("the store is open read-only; reopen it without read_only to add labels")
    ids_a = np.asarray(list(ids), dtype=np.int64)
    labels_a = np.asarray(list(labels), dtype=np.int64)
    if ids_a.shape != labels_a.shape:
        raise InvalidInputException(f"{ids_a.size} id(s) but {labels_a.size} label(s)")
    if np.unique(ids_a).size != ids_a.size:
        raise InvalidInputException("the same sample id is labeled twice in one call")
    old = read_labels(store, ids_a)
    known = dict(zip(old["sample_id"].tolist(), old["label"].tolist()))
    changed = [(i, known[i], y) for i, y in zip(ids_a.tolist(), labels_a.tolist())
               if i in known and known[i] != y]
    if changed and not overwrite:
        shown = ", ".join(f"{i}: {a} -> {b}" for i, a, b in changed[:5])
        raise InvalidInputException(f"{len(changed)} label(s) contradict earlier human labels "
                                    f"({shown}); pass overwrite=True to replace them")
    if changed:
        warnings.warn(f"replacing {len(changed)} earlier human label(s)", MetaQLWarning, stacklevel=2)
    keep = np.asarray([i not in known or known[i] != y
                       for i, y in zip(ids_a.tolist(), labels_a.tolist())], dtype=bool)
    if not keep.any():
        return 0
    when = (at or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc).replace(tzinfo=None)
    _replace_rows(store, ids_a[keep].tolist(), labels_a[keep].tolist(), by, when)
    return int(sum(1 for i in ids_a[keep].tolist() if i not in known))


def _replace_rows(store: Any, ids: list[int], labels: list[int], by: str, when: dt.datetime) -> None:
    """Deletes then inserts the rows of `ids` in one transaction: all or nothing."""
    store.sql("BEGIN TRANSACTION")
    try:
        store.sql("DELETE FROM labels WHERE sample_id IN (SELECT unnest(?))", [ids])
        # TIMESTAMP holds naive UTC; parallel unnests zip the two lists row by row
        store.sql("INSERT INTO labels (sample_id, label, labeled_by, labeled_at) "
                  "SELECT unnest(?::BIGINT[]), unnest(?::INTEGER[]), ?, ?::TIMESTAMP",
                  [ids, labels, by, when])
        store.sql("COMMIT")
    except BaseException:
        store.sql("ROLLBACK")
        raise
