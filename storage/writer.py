"""A capture's shard writes on a thread of their own, so the training step never waits on I/O.

The training thread hands over whole flushes (tensors it copied, or the kind computed for the batch:
nothing else references them);
the writer thread turns them into shards: concatenation, full gradients of layers stored full,
Arrow serialization, fsyncs and the catalog commits of Store.write_factor_shards, unchanged, so a
kill mid-flush leaves exactly what it leaves inline (storage/durable.py). Catalog writes go through
the writer's own cursor: a DuckDB connection must not be used by two threads at once, and the
training thread keeps using the store's own.

At most `max_pending` flushes wait behind the one being written (none by default): a training
loop that outruns the disk blocks at the hand-over, so a capture holds at most (2 + max_pending)
shards' worth of factors, the one it fills and the one being written (inline it held one), plus up
to 4 MiB of full-stored layers' factors not yet handed over (capture.FULL_HANDOVER_BYTES). The first error stops the writer (what is queued behind it is not written) and is
raised in the training thread at the next cap.backward and on exit; the checkpoint is then left
partial and a rerun of the same capture fills in what is missing.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

from metaql.errors import Error, IOException

MAX_PENDING = 0


class BackgroundWriter:
    def __init__(self, store, checkpoint: str, max_pending: int = MAX_PENDING):
        self.checkpoint = checkpoint
        self._store = store.cursor()
        self._jobs: queue.Queue = queue.Queue()
        self._slots = threading.BoundedSemaphore(1 + max_pending)    # flushes handed over, not yet written
        self._error: BaseException | None = None
        self.waited = 0.0       # seconds the training thread blocked handing flushes over
        self.busy = 0.0         # seconds the writer thread spent writing
        self._thread = threading.Thread(target=self._run, name=f"metaql-writer-{checkpoint}", daemon=True)
        self._thread.start()

    @property
    def failed(self) -> bool:
        return self._error is not None

    def submit(self, job: Callable, bounded: bool = True) -> None:
        """Queues `job(store)`. A flush (bounded) blocks while 1 + max_pending flushes are unwritten,
        which bounds a capture's memory; a job that shrinks a buffered batch does not wait."""
        self.check()
        if not self._thread.is_alive():
            raise IOException("the capture's shard writer is closed; start a new capture")
        if bounded and not self._slots.acquire(blocking=False):
            began = time.perf_counter()
            self._slots.acquire()
            self.waited += time.perf_counter() - began
        self._jobs.put((job, bounded))

    def check(self) -> None:
        """Raises the writer's first error, if any, in the calling (training) thread."""
        if self._error is None:
            return
        e = self._error
        if isinstance(e, Error) or not isinstance(e, Exception):   # metaql errors, KeyboardInterrupt
            raise e
        raise IOException(f"writing checkpoint '{self.checkpoint}''s factors failed in the capture's writer "
                          f"thread ({type(e).__name__}: {e}); those factors were not stored and the checkpoint "
                          "is left partial: fix the cause and run the same capture again to fill them in (or remove the "
                          f"checkpoint: DROP CHECKPOINT {self.checkpoint})") from e

    def close(self, raise_error: bool = True) -> None:
        """Waits until every queued flush is written (or the writer failed), then closes its
        cursor; raises the writer's error unless told not to."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._store.close()
        if raise_error:
            self.check()

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, bounded = item
            began = time.perf_counter()
            try:
                if self._error is None:    # a failed writer drains the queue so that no submit blocks forever
                    job(self._store)
            except BaseException as e:   # noqa: B036 - re-raised in the training thread
                self._error = e
            finally:
                self.busy += time.perf_counter() - began
                if bounded:
                    self._slots.release()
