"""Fault injection: named points in the store's write path where a test can kill the process.

    METAQL_FAULT=shard.rename.before      SIGKILL at the first hit of that point
    METAQL_FAULT=flush.layer:3            ... at its 3rd hit
    METAQL_FAULT=*:17                     ... at the 17th hit of any point
    METAQL_FAULT_LOG=/path/hits.txt       append each hit's name to a file (to plan kills)

Crash tests (tests/test_crash.py, benchmarks/crash_campaign.py) kill a capture at each point and
check that the store reopens consistent and that resuming gives the uninterrupted run's scores.
Unset, a point costs one global lookup and a comparison.
"""
from __future__ import annotations

import os
import signal

# Every point the store passes through, in the order one flush meets them.
POINTS = (
    "weights.written",            # a checkpoint's weights file is complete, its row not yet committed
    "commit.checkpoint.before", "commit.checkpoint.after",
    "commit.pending.before", "commit.pending.after",    # the files a flush is about to write
    "flush.layer",                                      # before each layer's shard of a flush
    "shard.rename.before", "shard.rename.after",        # a shard's temporary file renamed into place
    "commit.shards.before", "commit.shards.after",      # all layers' rows of one flush
    "commit.finish.before", "commit.finish.after",      # a checkpoint marked complete or partial
)

_target: tuple[str, int] | None = None
_log: str | None = None
_hits: dict[str, int] = {}


def arm(spec: str | None, log: str | None = None) -> None:
    """Sets the point to kill at ('name', 'name:N', '*:N'), or None to disarm."""
    global _target, _log
    _hits.clear()
    _log = log
    if not spec:
        _target = None
        return
    name, _, nth = spec.partition(":")
    if name != "*" and name not in POINTS:
        raise ValueError(f"unknown fault point '{name}'; known: {', '.join(POINTS)}")
    _target = (name, int(nth or 1))


def fault_point(name: str) -> None:
    if _target is None and _log is None:
        return
    _hit(name)


def _hit(name: str) -> None:
    _hits[name] = _hits.get(name, 0) + 1
    _hits["*"] = _hits.get("*", 0) + 1
    if _log is not None:
        with open(_log, "a") as f:
            f.write(name + "\n")
    if _target is not None and _hits.get(_target[0], 0) == _target[1] and _target[0] in (name, "*"):
        os.kill(os.getpid(), signal.SIGKILL)


arm(os.environ.get("METAQL_FAULT"), os.environ.get("METAQL_FAULT_LOG"))
