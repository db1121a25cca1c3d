"""LANCET rounds run from the web page, kept in the store's catalog (table `lancet_rounds`), so a
restarted server shows the session's last round and its accuracy-vs-labels curve, and
`metaql.plot.lancet_curve(con, pool)` draws the curve in a notebook.

One row per round, appended in one transaction after the round's statements finished (a
cancelled or failed round writes nothing): the set, the round's number, the human labels it had,
its settings, the propagated labels' accuracy against a column (NULL without one) and their mean
confidence (NULL for a random start), its candidates and the stop rule's row (JSON), who ran it
and when. The table is plain SQL: `SELECT * FROM lancet_rounds WHERE set_name = 'pool'`. LANCET's
table functions run from SQL do not write it: a round counts here when the page ran it.
"""
from __future__ import annotations

import json
from typing import Any

TABLE = "lancet_rounds"
SCHEMA = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    set_name VARCHAR NOT NULL, round INTEGER NOT NULL, n_labeled BIGINT NOT NULL, budget INTEGER,
    steps INTEGER, num_classes INTEGER, truth_column VARCHAR, accuracy DOUBLE, confidence DOUBLE,
    candidates VARCHAR, status VARCHAR, run_by VARCHAR, run_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (set_name, round))"""
COLUMNS = ("set_name", "round", "n_labeled", "budget", "steps", "num_classes", "truth_column", "accuracy",
           "confidence", "candidates", "status", "run_by")


def record_round(store: Any, pool: str, round_: dict, settings: dict, who: str) -> int:
    """Appends one round of `pool` (numbered after the last recorded one) in one transaction;
    returns its number."""
    from metaql.storage.catalog import transaction
    db = store.db
    with transaction(db):
        db.execute(SCHEMA)
        number = db.execute(f"SELECT coalesce(max(round), 0) + 1 FROM {TABLE} WHERE set_name = ?",
                            [pool]).fetchone()[0]
        values = [pool, number, round_["n_labeled"], settings.get("budget"), settings.get("steps"),
                  settings.get("num_classes"), round_.get("truth") or None, round_["accuracy"], round_["confidence"],
                  json.dumps(round_["candidates"]), None if round_["status"] is None else json.dumps(round_["status"]),
                  who]
        db.execute(f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", values)
    store.committed()
    return int(number)


def recorded_rounds(con: Any, pool: str) -> list[dict]:
    """The rounds of `pool` recorded in the store, oldest first ([] when none, or when the store
    predates the table); candidates and status decoded."""
    exists = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'main' AND "
                         "table_name = ?", [TABLE]).fetchone()[0]
    if not exists:
        return []
    rows = con.execute(f"SELECT {', '.join(COLUMNS)}, run_at::VARCHAR AS run_at FROM {TABLE} WHERE set_name = ? "
                       "ORDER BY round", [pool]).arrow().to_pylist()
    for r in rows:
        r["candidates"] = json.loads(r["candidates"]) if r["candidates"] else []
        r["status"] = json.loads(r["status"]) if r["status"] else None
    return rows


def curve_points(rounds: list[dict]) -> tuple[list[int], list[float], str]:
    """(human labels, quality, what the quality is) of the rounds that had labels: the propagated
    labels' accuracy when every such round measured it, else their mean confidence."""
    points = [r for r in rounds if r["n_labeled"]]
    use_accuracy = all(r["accuracy"] is not None for r in points)
    values = [r["accuracy"] if use_accuracy else r["confidence"] for r in points]
    return ([r["n_labeled"] for r in points], values,
            "accuracy of propagated labels" if use_accuracy else "mean confidence")
