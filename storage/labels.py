"""The catalog's human labels (table `labels`), read and added without ever silently overwriting one.

`read_labels` returns a pool's labels; `add_labels` writes new ones all or nothing and refuses to
replace a different earlier label unless told to (then it warns): a human label is never
silently overwritten. `Connection.label(ids, labels, by=...)` and LANCET write through here.
"""
from __future__ import annotations

import datetime as dt
import warnings
from typing import Any, Iterable, Sequence

import duckdb
import numpy as np

from metaql.errors import IOException, InvalidInputException, Warning as MetaQLWarning
from metaql.storage.catalog import query_arrow


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


def add_labels(store: Any, ids: Iterable[int], labels: Iterable[int], by: str | Sequence[str] = "human",
               at: dt.datetime | Sequence[dt.datetime | None] | None = None, overwrite: bool = False) -> int:
    """Inserts labels; returns how many samples were newly labeled.

    A sample already labeled with the same label is left as it was (author and time kept); one
    labeled differently raises InvalidInputException unless overwrite=True. `by` and `at` are one
    value for every label or one per label (None: now).
    """
    _require_writable(store)
    ids_a, labels_a = whole_numbers(ids, "sample id"), whole_numbers(labels, "label")
    if ids_a.shape != labels_a.shape:
        raise InvalidInputException(f"{ids_a.size} id(s) but {labels_a.size} label(s)")
    by_a, at_a = _per_label(by, ids_a.size, "by"), _per_label(at, ids_a.size, "at")
    if np.unique(ids_a).size != ids_a.size:
        raise InvalidInputException("the same sample id is labeled twice in one call")
    _require_registered(store, ids_a)
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
    now = dt.datetime.now(dt.timezone.utc)
    when = [_naive_utc(a or now) for a in at_a[keep].tolist()]
    _replace_rows(store, ids_a[keep].tolist(), labels_a[keep].tolist(), by_a[keep].tolist(), when)
    return int(sum(1 for i in ids_a[keep].tolist() if i not in known))


# MetaQL's scratch table for the rows of a user's INSERT INTO labels (sqlguard reserves the prefix)
SCRATCH_TABLE = "_metaql_label_rows"


def whole_numbers(values: Iterable, what: str) -> np.ndarray:
    """int64 values, refusing fractions and NaN instead of truncating them (0.9 is not label 0)."""
    arr = np.asarray(list(values))
    if arr.dtype.kind in "iu" or arr.size == 0:
        return arr.astype(np.int64).reshape(-1)
    try:
        as_float = arr.astype(np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InvalidInputException(f"each {what} must be a whole number, got {arr.dtype} values") from None
    if not np.all(np.isfinite(as_float) & (as_float == np.round(as_float))):
        raise InvalidInputException(f"each {what} must be a whole number; got e.g. "
                                    f"{as_float[~(np.isfinite(as_float) & (as_float == np.round(as_float)))][:3].tolist()}")
    return as_float.astype(np.int64)


def _require_registered(store: Any, ids: np.ndarray) -> None:
    unknown = store.sql("SELECT count(*), min(i) FROM (SELECT unnest(?) AS i) WHERE i NOT IN "
                        "(SELECT sample_id FROM samples)", [ids.tolist()]).fetchone()
    if unknown[0]:
        raise InvalidInputException(f"{unknown[0]} of these sample ids are not registered samples "
                                    f"(e.g. {unknown[1]}); register them with con.add_samples first")


def add_labels_from_sql(store: Any, insert_sql: str, params: Any = None) -> int:
    """Runs `insert_sql`, a user's INSERT INTO labels retargeted at SCRATCH_TABLE, then adds the
    rows it produced with add_labels: a contradicting label is refused, never written."""
    _require_writable(store)
    store.sql(f"CREATE OR REPLACE TEMP TABLE {SCRATCH_TABLE} (sample_id BIGINT, label DOUBLE, "
              "labeled_by VARCHAR DEFAULT current_user, labeled_at TIMESTAMP)")
    try:
        try:
            query_arrow(store.db, insert_sql, params)
        except duckdb.Error as e:   # said of the user's table, never of the scratch one
            raise type(e)(str(e).replace(SCRATCH_TABLE, "labels")) from None
        rows = store.sql(f"SELECT sample_id, label, labeled_by, labeled_at FROM {SCRATCH_TABLE}").fetchall()
    finally:
        store.sql(f"DROP TABLE IF EXISTS {SCRATCH_TABLE}")
    if any(r[0] is None or r[1] is None for r in rows):
        raise InvalidInputException("INSERT INTO labels needs a sample_id and a label on every row")
    # labeled_at as written is naive UTC, the labels table's convention
    at = [None if r[3] is None else r[3].replace(tzinfo=dt.timezone.utc) for r in rows]
    return add_labels(store, [r[0] for r in rows], [r[1] for r in rows], by=[r[2] for r in rows], at=at)


def _require_writable(store: Any) -> None:
    if getattr(store, "read_only", False):
        raise IOException("the store is open read-only; reopen it without read_only to add labels")


def _per_label(value: Any, n: int, name: str) -> np.ndarray:
    if value is None or isinstance(value, (str, dt.datetime)):
        return np.asarray([value] * n, dtype=object)
    out = np.asarray(list(value), dtype=object)
    if out.shape != (n,):
        raise InvalidInputException(f"{name}= has {out.size} value(s) for {n} label(s)")
    return out


def _naive_utc(at: dt.datetime) -> dt.datetime:
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.timezone.utc)
    return at.astimezone(dt.timezone.utc).replace(tzinfo=None)


def _replace_rows(store: Any, ids: list[int], labels: list[int], by: list, when: list[dt.datetime]) -> None:
    """Deletes then inserts the rows of `ids` in one transaction: all or nothing."""
    store.sql("BEGIN TRANSACTION")
    try:
        store.sql("DELETE FROM labels WHERE sample_id IN (SELECT unnest(?))", [ids])
        # TIMESTAMP holds naive UTC; parallel unnests zip the lists row by row
        store.sql("INSERT INTO labels (sample_id, label, labeled_by, labeled_at) "
                  "SELECT unnest(?::BIGINT[]), unnest(?::INTEGER[]), unnest(?::VARCHAR[]), "
                  "unnest(?::TIMESTAMP[])", [ids, labels, by, when])
        store.sql("COMMIT")
    except BaseException:
        store.sql("ROLLBACK")
        raise


# ---- annotations: several labels per sample, appended, never replaced ---------------------------

def add_annotations(store: Any, ids: Iterable[int], labels: Iterable[int], by: str | Sequence[str] = "human",
                    at: dt.datetime | Sequence[dt.datetime | None] | None = None) -> int:
    """Appends one annotation per (id, label) to the catalog table `annotations`, all or nothing;
    returns how many were added. An id may repeat (two annotators at once); nothing is replaced."""
    _require_writable(store)
    ids_a, labels_a = whole_numbers(ids, "sample id"), whole_numbers(labels, "label")
    if ids_a.shape != labels_a.shape:
        raise InvalidInputException(f"{ids_a.size} id(s) but {labels_a.size} label(s)")
    if ids_a.size == 0:
        return 0
    if (labels_a < 0).any():
        raise InvalidInputException(f"a label is a class index (0 or more), got {int(labels_a.min())}")
    by_a, at_a = _per_label(by, ids_a.size, "by"), _per_label(at, ids_a.size, "at")
    _require_registered(store, np.unique(ids_a))
    now = dt.datetime.now(dt.timezone.utc)
    when = [_naive_utc(a or now) for a in at_a.tolist()]
    who = [b if b is not None else "human" for b in by_a.tolist()]
    store.sql("INSERT INTO annotations (sample_id, label, annotated_by, annotated_at) "
              "SELECT unnest(?::BIGINT[]), unnest(?::INTEGER[]), unnest(?::VARCHAR[]), unnest(?::TIMESTAMP[])",
              [ids_a.tolist(), labels_a.tolist(), who, when])
    return int(ids_a.size)


def has_annotations_table(store: Any) -> bool:
    """False for a store written before annotations existed and opened read-only (no table yet)."""
    return bool(store.sql("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'main' "
                          "AND table_name = 'annotations'").fetchone()[0])


def read_annotations(store: Any, ids: np.ndarray) -> dict[str, np.ndarray]:
    """sample_id, label, annotated_by, annotated_at of every annotation of `ids`, oldest first."""
    if not has_annotations_table(store):
        rows = []
    else:
        rows = store.sql("SELECT sample_id, label, annotated_by, annotated_at FROM annotations "
                         "WHERE sample_id IN (SELECT unnest(?)) ORDER BY annotated_at, sample_id",
                         [np.asarray(ids, dtype=np.int64).tolist()]).fetchall()
    return {"sample_id": np.asarray([r[0] for r in rows], dtype=np.int64),
            "label": np.asarray([r[1] for r in rows], dtype=np.int64),
            "annotated_by": np.asarray([r[2] or "" for r in rows], dtype=object),
            "annotated_at": np.asarray([r[3] for r in rows], dtype=object)}


def label_counts(store: Any, ids: np.ndarray, classes: int, initial: np.ndarray | None = None,
                 human_labels: bool = True) -> np.ndarray:
    """(N, classes) counts of each sample's labels so far: its `initial` label (the dataset's noisy
    one, -1 for none), its human label in `labels` (when human_labels) and every annotation.
    A label outside [0, classes) is refused: the model cannot score it."""
    ids = np.asarray(ids, dtype=np.int64)
    counts = np.zeros((len(ids), classes), dtype=np.int64)
    pos = {int(i): k for k, i in enumerate(ids.tolist())}
    found = [] if initial is None else [(k, int(y)) for k, y in enumerate(initial) if y >= 0]
    if human_labels:
        lab = read_labels(store, ids)
        found += [(pos[int(i)], int(y)) for i, y in zip(lab["sample_id"], lab["label"])]
    ann = read_annotations(store, ids)
    found += [(pos[int(i)], int(y)) for i, y in zip(ann["sample_id"], ann["label"])]
    bad = [y for _, y in found if not 0 <= y < classes]
    if bad:
        raise InvalidInputException(f"label {bad[0]} is not a class of this {classes}-class model; fix that "
                                    "sample's label or annotation")
    for k, y in found:
        counts[k, y] += 1
    return counts


def withdraw_label(store: Any, sample_id: int, by: str) -> bool:
    """An explicit undo of one person's decision: deletes `by`'s label of `sample_id` and the newest
    annotation `by` gave it with that label, in one transaction; returns whether there was one.
    A label written by someone else is refused, never removed (the web page's undo key)."""
    _require_writable(store)
    row = store.sql("SELECT label, labeled_by FROM labels WHERE sample_id = ?", [int(sample_id)]).fetchone()
    if row is None:
        return False
    if row[1] != by:
        raise InvalidInputException(f"sample {sample_id} was labeled by {row[1]}, not {by}: only one's own "
                                    "label is withdrawn")
    store.sql("BEGIN TRANSACTION")
    try:
        if has_annotations_table(store):
            store.sql("DELETE FROM annotations WHERE rowid = (SELECT rowid FROM annotations WHERE sample_id = ? "
                      "AND label = ? AND annotated_by = ? ORDER BY annotated_at DESC LIMIT 1)",
                      [int(sample_id), row[0], by])
        store.sql("DELETE FROM labels WHERE sample_id = ? AND labeled_by = ?", [int(sample_id), by])
        store.sql("COMMIT")
    except BaseException:
        store.sql("ROLLBACK")
        raise
    return True
