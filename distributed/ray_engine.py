"""The Ray query engine, pass by pass: one layer's scan at one checkpoint runs as Ray tasks over
its shards. A query whose shards line up by samples runs by units instead, each task over every
pass of its samples (distributed/ray_units.py); this path is the fallback, and the place of the
engine's shared pieces (connecting, task sizes, collecting results, faults).

The driver replays the query side once (executor.query_sides, unchanged), puts it and the training
ids in Ray's object store once per layer pass, and submits one task per group of shards (groups
sized by the catalog's shard bytes). A task scores its shards with the local engine's own chunk
functions and returns per-sample partial scores and norms with their positions; the driver adds
them into the same vectors the local engine fills. Every training sample is scored once per layer
with the same float operations in the same chunks, so answers are identical to the local engine's.

Failures never leave a partial answer: a task whose worker dies is retried by Ray (MAX_RETRIES);
when the retries are spent, or any task raises, the other tasks are cancelled and the query fails
with a metaql.Error. con.interrupt() / Ctrl-C cancels every task of the pass.

Replaying strategies (the re-compute baseline) and the train x query matrix run on the driver.
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np

from metaql.errors import InterruptException, InvalidInputException, OperationalError

TASK_BYTES = 64 * 2 ** 20     # shard bytes per task: big enough to amortise a task's ~ms overhead
MAX_RETRIES = 2               # re-runs of a task whose worker died, before the query fails
TASK_CPUS = 1                 # Ray CPUs a task holds (the benchmark raises it to run fewer at once)
POLL_SECONDS = 0.1            # how often the driver checks for an interrupt while tasks run
ENGINES = ("local", "ray")

_remote = None


def check_engine_config(config: dict) -> None:
    """Refuses an engine MetaQL does not have, and the Ray engine without Ray installed."""
    engine = config.get("engine", "local")
    if engine not in ENGINES:
        raise InvalidInputException(f"config['engine'] must be one of {', '.join(ENGINES)}, got {engine!r}")
    address = config.get("address")
    if address is not None and not isinstance(address, str):
        raise InvalidInputException(f"config['address'] must be a Ray address string such as 'auto' or "
                                    f"'ray://head:10001', got {address!r}")
    if address is not None and engine != "ray":
        raise InvalidInputException("config['address'] is the Ray cluster's address: give it with "
                                    "config={'engine': 'ray', 'address': ...}")
    if engine == "ray":
        import importlib.util
        if importlib.util.find_spec("ray") is None:
            raise InvalidInputException("config['engine']='ray' needs Ray: pip install 'metaql[ray]'")


def uses_ray(ctx, strategy: str) -> bool:
    from metaql.engine.strategies import strategy_named
    return ctx.config.get("engine") == "ray" and not strategy_named(strategy).replays


def ensure_ray(address: str | None):
    """Ray, connected: to `address` when given, else to a running cluster the process already
    joined (ray.init), else a local one started now."""
    import ray
    if ray.is_initialized() and address not in (None, "auto") and not _same_cluster(ray, address):
        raise OperationalError(f"this process is already connected to another Ray cluster than {address!r}; "
                               "one process joins one cluster: open this store from another process, "
                               "or leave config['address'] out to use the joined one")
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except Exception as e:      # Ray raises ConnectionError, ValueError, RuntimeError, its own errors
            raise OperationalError(f"cannot connect to the Ray cluster at {address!r}: {e}; start it "
                                   "(ray start --head) or fix config['address']") from None
    return ray


def _same_cluster(ray, address: str) -> bool:
    """Whether `address` (host:port of a GCS, optionally ray://) names the cluster this process joined."""
    joined = ray.get_runtime_context().gcs_address or ""
    given = address.split("://", 1)[-1]
    return given == joined or given.split(":")[0] in ("127.0.0.1", "localhost") and \
        given.split(":")[-1] == joined.split(":")[-1]


def scan_remote(ray):
    global _remote
    if _remote is None:
        _remote = ray.remote(scan_shards)
    return _remote


def store_location(store) -> str:
    """Where workers read the store's files: its object-storage URI, else its directory."""
    return getattr(store, "uri", None) or str(store.root)


def shard_specs(catalog, ckpt: str, layer: str) -> list[dict]:
    """The layer's shards as workers need them, the shared-input owner's checksum resolved here."""
    specs = []
    for row in catalog.factor_shards(ckpt, layer):
        spec = {k: row.get(k) for k in ("file", "checksum", "suffix_file", "bytes", "rows")}
        if row.get("suffix_file"):
            spec["suffix_checksum"] = catalog.shard_checksum(row["suffix_file"])
        specs.append(spec)
    return specs


def task_groups(specs: list[dict], target: int | None = None) -> list[list[dict]]:
    """Consecutive shards grouped into tasks of about `target` bytes (a shard is never split)."""
    target = TASK_BYTES if target is None else target
    groups, size = [], 0
    for spec in specs:
        if not groups or size + int(spec.get("bytes") or 0) > target:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += int(spec.get("bytes") or 0)
    return groups


def layer_pass_ray(store, ckpt: str, strat, train: np.ndarray, q, scan, ctx):
    """executor.layer_pass's (scores, norms, seen) for one layer, computed by Ray tasks."""
    from metaql.storage.catalog_snapshot import catalog_of
    from metaql.storage.layers import kind_named
    catalog = catalog_of(ctx)
    meta, stored = catalog.layer_meta(strat.layer)
    scores, norms, seen = np.zeros(len(train)), np.zeros(len(train)), np.zeros(len(train), bool)
    groups = task_groups(shard_specs(catalog, ckpt, strat.layer))
    if not groups:
        return scores, norms, seen
    ray = ensure_ray(ctx.config.get("address"))
    q_cpu = None if q is None else {k: v.cpu() if hasattr(v, "cpu") else v for k, v in q.items()}
    train_ref, q_ref = ray.put(train), ray.put(q_cpu)     # once per pass, read by every task
    fault = os.environ.get("METAQL_RAY_FAULT")
    task = scan_remote(ray).options(max_retries=MAX_RETRIES, retry_exceptions=False, num_cpus=TASK_CPUS)
    refs = [task.remote(store_location(store), g, train_ref, q_ref, kind_named(meta.kind), meta, stored,
                        strat.chosen, scan.similarity, fault) for g in groups]
    for parts in collect(ray, refs, ctx, f"{ckpt} {strat.layer}"):
        for pos, s, nrm in parts:
            scores[pos] += s
            norms[pos] += nrm
            seen[pos] = True
    return scores, norms, seen


def collect(ray, refs: list, ctx, where: str):
    """Each task's result as it finishes; on an interrupt, a failure, or the caller closing the
    generator, every task still running is cancelled and nothing more is returned."""
    pending, ready = list(refs), []
    try:
        for _ in ctx.progress(range(len(refs)), total=len(refs), desc=f"ray tasks {where}"):
            while not ready:
                ctx.check_interrupt()
                ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_SECONDS)
                if ready and pending:
                    # every task already finished in one wait: a wait costs time in the tasks
                    # pending, so one per task would cost the driver quadratic time in the tasks
                    more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
                    ready += more
            yield ray.get(ready.pop())
    except BaseException as e:
        for ref in pending:
            ray.cancel(ref, force=False)
        if isinstance(e, ray.exceptions.RayError):
            raise task_error(ray, e, where) from None
        raise


def task_error(ray, e, where: str) -> Exception:
    """The metaql.Error a failed task stands for: the task's own metaql.Error as raised, a dead
    worker as an OperationalError that says the query returned nothing."""
    from metaql.errors import Error
    cause = getattr(e, "cause", None)
    if isinstance(cause, Error):
        return cause
    if isinstance(e, ray.exceptions.TaskCancelledError):
        return InterruptException("query cancelled; nothing was changed")
    if isinstance(e, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                      ray.exceptions.ObjectLostError, ray.exceptions.OutOfMemoryError)):
        return OperationalError(f"a Ray worker died while scanning {where} and {MAX_RETRIES} retries failed "
                                f"({type(e).__name__}); the query returned nothing. Check the workers' memory "
                                "and logs (ray status), then run it again")
    return OperationalError(f"a Ray task scanning {where} failed: {str(e).strip().splitlines()[-1][:300]}; "
                            "the query returned nothing")


def scan_shards(location: str, specs: list[dict], train: np.ndarray, q, kind, meta, stored: str,
                strategy: str, similarity: str, fault: str | None = None) -> list[tuple]:
    """On a worker: (positions in `train`, scores, squared norms) per chunk of the given shards,
    computed exactly as executor.layer_pass computes them."""
    from metaql.distributed.shards import shard_tensors
    from metaql.engine.executor import chunk_rows, chunk_scores, rows_of
    inject(fault)
    out = []
    for spec in specs:
        ids, tensors = shard_tensors(location, spec)
        keep = np.isin(ids, train)
        if not keep.any():
            continue
        rows = np.nonzero(keep)[0]
        pos = np.searchsorted(train, ids[rows])
        step = chunk_rows(tensors, q, strategy, meta)
        for start in range(0, len(rows), step):
            chunk = {n: rows_of(t, rows[start:start + step]) for n, t in tensors.items()}
            s, nrm = chunk_scores(kind, meta, stored, strategy, chunk, q, similarity)
            out.append((pos[start:start + step], s, nrm))
    return out


def inject(fault: str | None) -> None:
    """Test faults (METAQL_RAY_FAULT on the driver): 'kill-once:PATH' SIGKILLs the first worker
    that claims the file PATH; 'kill' SIGKILLs every attempt; 'sleep:S:DIR' sleeps S seconds,
    then leaves a file in DIR (a cancelled task leaves none)."""
    if not fault:
        return
    what, _, arg = fault.partition(":")
    if what == "kill-once":
        try:
            os.unlink(arg)       # one worker wins the claim
        except FileNotFoundError:
            return
        os.kill(os.getpid(), signal.SIGKILL)
    elif what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif what == "sleep":
        seconds, _, folder = arg.partition(":")
        deadline = time.monotonic() + float(seconds)
        while time.monotonic() < deadline:
            time.sleep(0.05)
        open(os.path.join(folder, f"done-{os.getpid()}-{time.monotonic_ns()}"), "w").close()
