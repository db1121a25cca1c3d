"""Logical and physical plan nodes: plain classes, printed by EXPLAIN."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Side:
    """One side of an influence query: a single sample (point) or a set of samples (batch)."""
    mode: str                    # "point" | "batch"
    ids: Any                     # np.ndarray of sample ids
    label: str                   # what the user wrote: point(4711), batch(test_wrong)
    inputs: Any = None           # a query given as tensors (con.influence), not registered samples
    targets: Any = None


@dataclass
class Strategy:
    """The optimizer's pick for one (checkpoint, layer), with every candidate's estimate."""
    checkpoint: str
    layer: str
    chosen: str
    estimates: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {flops, bytes, seconds}
    measured_seconds: float | None = None       # by the clock the estimates predict (cost.work_clock)
    measured_wall_seconds: float | None = None
    kind: str = ""          # the layer's kind (storage/layers), shown by EXPLAIN
    fitted: bool = True     # estimated by the layer's own fit (PRAGMA metaql_calibrate), not base constants alone

    @contextmanager
    def timing(self):
        """Adds the block's time to what EXPLAIN ANALYZE prints: measured_seconds by the clock the
        estimates are calibrated with (the process's CPU time at one torch thread, so a loaded
        machine's time slices do not read as a wrong estimate), and the wall time beside it."""
        from metaql.engine.cost import work_clock
        work, wall = work_clock(), time.perf_counter()
        try:
            with user_work():
                yield
        finally:
            self.measured_seconds = (self.measured_seconds or 0.0) + work_clock() - work
            self.measured_wall_seconds = (self.measured_wall_seconds or 0.0) + time.perf_counter() - wall


# The user's work running now in this process (statements, replays, layer passes): a background
# calibration waits while any does (engine/autocalibrate.py), so it neither slows a query nor times
# beside one. Whole statements, not only their layer passes: a MiniLM TOPK under error= spends most
# of its time outside them (query replay, the index scan, rescoring), and the calibration's thread
# took 1.9-3.9 of the 6.2-12.4 s of CPU such a statement cost its process.
_RUNNING = [0]
_LOCK = threading.Lock()


def _running(step: int) -> None:
    with _LOCK:
        _RUNNING[0] += step


@contextmanager
def user_work():
    """Marks the block as the user's work: a background calibration pauses until it ends."""
    _running(+1)
    try:
        yield
    finally:
        _running(-1)


def scans_running() -> int:
    return _RUNNING[0]


@dataclass
class InfluenceScan:
    """Scores of training samples against a query side, summed over layers and checkpoints."""
    train: Side
    query: Side | None           # None for self-influence
    layers: list[str]
    checkpoints: list[str]
    similarity: str = "dot"      # "dot" | "cosine"
    loss: str = "label"          # query-side loss target
    total: bool = False          # one row: the training side's summed influence (B2P, B2B)
    reduce: str = "mean"         # a batch query's gradient: its samples' mean, or their sum
    strategies: list[Strategy] = field(default_factory=list)
    error: float | None = None   # INFLUENCE(..., error=e): approximation allowed (metaql.approx)


@dataclass
class TopK:
    child: Any
    k: int
    ascending: bool


@dataclass
class FunctionScan:
    """A registered table function that is not planned further (ELITE, LANCET, user functions)."""
    name: str
    arguments: dict[str, Any]
