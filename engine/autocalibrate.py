"""Per-layer cost fits for a store nobody calibrated, measured in a background thread.

PRAGMA metaql_calibrate times every strategy on each layer's stored factors (seconds per layer), too
long to put inside a user's query, and a user who never heard of it got estimates from two base
constants alone (up to 100x low for large intermediates). So after a query whose layers have no
fit, the optimizer starts one background thread per store that times them as the PRAGMA does
(engine/calibrate.py) while the user goes on:

- it waits whenever the user's work runs in this process: a statement (engine/executor.execute),
  a replay, a layer pass (engine/plan.user_work, scans_running); it then runs
  at a lower scheduling priority where the OS allows, and times by the thread's own CPU time
  (engine/cost.work_clock), so query and calibration neither slow each other nor count each
  other's work; it stops when the store closes or the process exits;
- it never touches the catalog: it reads memory-mapped views of shards the foreground opened, and
  hands its fits back; the next statement that plans a scan on the store (in the caller's thread,
  the only one that uses the catalog connection) merges them into the cost constants and, on a
  writable store, keeps them in the meta table in one statement (its own transaction); a
  read-only store, or a second process reading the store, uses them for this process only;
- a fit the catalog already holds (PRAGMA metaql_calibrate, or another process) wins.

Off with connect(config={"auto_calibrate": False}) or the environment variable
METAQL_AUTO_CALIBRATE=0; not started for a query the base constants price under MIN_SECONDS
(a fit would cost more than such queries could ever save).
"""
from __future__ import annotations

import atexit
import os
import threading
import weakref

CONFIG_KEY = "auto_calibrate"
ENV_KEY = "METAQL_AUTO_CALIBRATE"
MIN_SECONDS = 0.05      # a query estimated below this starts no calibration
POLL_SECONDS = 0.02     # how often a paused calibration looks whether the scans are done
NICE = 10               # the calibration thread's scheduling priority (Linux: per thread)

_JOBS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()     # store -> Job
_LOCK = threading.Lock()


class Cancelled(Exception):
    """Raised inside the calibration thread to stop it (store closed, process exiting)."""


class Job:
    """One background calibration of a store's unfitted layers."""

    def __init__(self, store, todo: dict, base: dict, tried: set = frozenset(), carried: dict | None = None):
        self.todo, self.base = todo, dict(base)      # {layer: calibrate.layer_inputs(...)}
        self.tried = set(tried) | set(todo)          # layers this or an earlier job of the store took up
        self.fits: dict[str, dict] = dict(carried or {})     # an earlier job's, not yet kept
        self.error: BaseException | None = None
        self.kept = False
        self.done = threading.Event()
        self.cancel = threading.Event()
        self._store = weakref.ref(store)
        self.thread = threading.Thread(target=self._run, name="metaql-calibrate", daemon=True)

    def _run(self) -> None:
        from metaql.engine import calibrate
        _lower_priority()
        calibrate.BACKGROUND.hook = self._wait_for_quiet
        try:
            for layer, inputs in self.todo.items():
                fits = {name: calibrate.fit_layer(name, inputs, self.base)
                        for name in calibrate.fitted_strategies(inputs[0], inputs[2])}
                self.fits[layer] = fits        # a layer appears only with all its strategies
        except Cancelled:
            pass
        except Exception as e:       # a failed calibration leaves the base constants, as before
            self.error = e
        finally:
            calibrate.BACKGROUND.hook = None
            self.done.set()

    def _wait_for_quiet(self) -> None:
        from metaql.engine.plan import scans_running
        while True:
            store = self._store()
            if self.cancel.is_set() or store is None or store.closed:
                raise Cancelled()
            del store
            if not scans_running():
                return
            self.cancel.wait(POLL_SECONDS)


def enabled(config: dict) -> bool:
    if config.get(CONFIG_KEY, True) is False:
        return False
    return os.environ.get(ENV_KEY, "1").strip().lower() not in ("0", "false", "off", "no")


def job_of(store) -> Job | None:
    with _LOCK:
        return _JOBS.get(store)


def with_fits(store, consts: dict) -> dict:
    """`consts` with the finished background fits of `store` added (the catalog's own win); kept in
    the catalog's meta table the first time, when the store is writable."""
    job = job_of(store)
    if job is None or not job.done.is_set() or not job.fits:
        return consts
    layers = {**job.fits, **consts.get("layers", {})}
    merged = {**consts, "layers": layers}
    if not job.kept and not store.read_only and not store.closed:
        try:
            store.keep_cost_constants(merged)
            job.kept = True
        except Exception:      # e.g. the user's open transaction failed: keep them for this process
            pass
    return merged


def maybe_start(store, scan, strategies, consts: dict, config: dict) -> Job | None:
    """Starts a background calibration of the scan's layers that have no fit yet, when enabled and
    the query is worth it (its picks' estimates sum to MIN_SECONDS or more); None if none started."""
    if not enabled(config) or store.closed:
        return None
    if sum(s.estimates[s.chosen]["seconds"] for s in strategies) < MIN_SECONDS:
        return None
    job = job_of(store)
    if job is not None and not job.done.is_set():
        return None                     # one at a time; the next query starts the rest
    tried = job.tried if job is not None else set()
    fitted = consts.get("layers", {})
    layers = [l for l in dict.fromkeys(s.layer for s in strategies) if l not in fitted and l not in tried]
    todo = _inputs(store, scan, layers) if layers else {}
    if not todo:
        return None
    new = Job(store, todo, consts, tried | set(layers), None if job is None or job.kept else job.fits)
    with _LOCK:
        _JOBS[store] = new
    new.thread.start()
    return new


def _inputs(store, scan, layers: list[str]) -> dict:
    """{layer: calibrate.layer_inputs} read in the caller's thread (the catalog connection is not
    shared with the calibration thread): the first shard of the scan's first checkpoint."""
    from metaql.engine import calibrate
    ckpt = scan.checkpoints[0] if scan.checkpoints else None
    out = {}
    for layer in layers:
        try:
            found = calibrate.layer_inputs(store, layer, ckpt)
        except Exception:        # an unreadable shard: the query itself reports it
            continue
        if found is not None:
            out[layer] = found
    return out


def wait(store, timeout: float | None = None) -> bool:
    """Waits for the store's background calibration (tests, benchmarks); True when none runs."""
    job = job_of(store)
    return job is None or job.done.wait(timeout)


def _lower_priority() -> None:
    """Lowers this thread's scheduling priority (on Linux nice is per thread); no-op elsewhere."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    except (AttributeError, OSError):
        pass


@atexit.register
def _stop_all() -> None:
    with _LOCK:
        jobs = list(_JOBS.values())
    for job in jobs:
        job.cancel.set()
    for job in jobs:
        job.thread.join(timeout=2.0)
