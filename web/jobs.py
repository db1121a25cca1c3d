"""Long work off the request: a session's statements (LANCET's round, active learning's or label
cleaning's next candidates) run in a background thread on a cursor of their own, so the page
polls their progress and can cancel them.

Progress: the cursor's progress wrapper, which the table functions give their loops (training
steps, replay batches), counts the items of the current loop. Cancel: the cursor's interrupt,
which the statement sees at its next item and stops with InterruptException, before it saved
anything. One job runs at a time: they share the store's writer.
"""
from __future__ import annotations

import itertools
import threading
import warnings
from typing import Any, Callable

from metaql.errors import InterruptException

PUBLIC = ("id", "kind", "pool", "state", "done", "total", "desc", "error", "warnings", "result")


class Busy(Exception):
    """Another job is running."""


class Jobs:
    def __init__(self, con: Any):
        self.con = con
        self.lock = threading.Lock()
        self.jobs: dict[int, dict] = {}
        self._ids = itertools.count(1)

    def start(self, kind: str, pool: str, work: Callable[[Any], Any]) -> dict:
        """Runs work(cursor) in a thread; its return value becomes the job's result. Raises Busy
        while another job runs."""
        with self.lock:
            if self.running():
                raise Busy()
            job = {"id": next(self._ids), "kind": kind, "pool": pool, "state": "running", "done": 0, "total": None,
                   "desc": "starting", "error": None, "warnings": [], "result": None, "cursor": self.con.cursor()}
            self.jobs[job["id"]] = job
        job["thread"] = threading.Thread(target=self._run, args=(job, work), daemon=True)
        job["thread"].start()
        return job

    def running(self, pool: str | None = None, kind: str | None = None) -> list[dict]:
        return [j for j in self.jobs.values() if j["state"] == "running"
                and (pool is None or j["pool"] == pool) and (kind is None or j["kind"] == kind)]

    def cancel(self, job: dict) -> None:
        if job["state"] == "running":
            # the flag outlives the statement: the cursor's own interrupt is cleared when the job's
            # next statement starts
            job["cancel"] = True
            job["cursor"].interrupt()

    def close(self) -> None:
        for job in self.running():
            self.cancel(job)
            job["thread"].join(timeout=30)

    @staticmethod
    def _run(job: dict, work: Callable[[Any], Any]) -> None:
        cur = job["cursor"]

        def progress(it, total=None, desc=""):
            job["total"], job["desc"], job["done"] = total, desc, 0
            for item in it:
                if job.get("cancel"):
                    raise InterruptException("the job was cancelled from the page")
                job["done"] += 1
                yield item
        cur.progress = progress
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = work(cur)
            job["warnings"] = [str(w.message) for w in caught]
            job["result"], job["state"] = result, "done"
        except InterruptException:
            job["state"] = "cancelled"
        except Exception as e:       # shown on the page; the server keeps running
            job["state"], job["error"] = "failed", f"{type(e).__name__}: {e}"
        finally:
            cur.close()


def public(job: dict) -> dict:
    return {k: job[k] for k in PUBLIC}
