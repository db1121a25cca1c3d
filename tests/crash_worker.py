"""Crash trials: a deterministic two-checkpoint capture killed (SIGKILL) at a fault point or at a
random moment, then reopened, verified, resumed and scored.

    python -m tests.crash_worker OUT JOBS SPEC...     results: OUT/reference.json, OUT/trial<i>.json

A SPEC is a fault point (killed at its middle hit in an uninterrupted run), 'point:N' (its N-th
hit), 'point:?' (a random hit), '?' (a random hit of a random point), 't=SECONDS' (killed that
long after the store is open) or 't=?' (at a random moment of the uninterrupted capture's duration). The process imports torch and
MetaQL once and forks a runner per trial (JOBS at a time), which forks the capture it kills, so a
trial costs no interpreter start. Training and data are seeded: a killed and resumed store must
score exactly like the uninterrupted capture (reference.json).
"""
from __future__ import annotations

import collections
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import metaql
from metaql.storage import faults
from tests.models import MLP

TRAIN, TEST, BATCH, SHARD, EPOCHS = 300, 16, 32, 64, 2
QUERIES = {
    "self": "SELECT sample_id, score FROM SELF_INFLUENCE() ORDER BY sample_id",
    "influence": "SELECT sample_id, score FROM INFLUENCE(query=batch(test)) ORDER BY sample_id",
}


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(TRAIN + TEST, 6, generator=g), torch.randint(0, 3, (TRAIN + TEST,), generator=g)


def run_capture(store_dir: str, ready=None) -> None:
    """Registers the samples (unless done) and captures both checkpoints (resuming what is stored)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # the same arithmetic in every process
    try:
        torch.manual_seed(0)
        x, y = data()
        model = MLP(din=6, hidden=8, classes=3)
        with metaql.connect(store_dir) as con:
            if ready:
                ready()
            splits = con.store.splits()
            if "train" not in splits:
                con.add_samples(np.arange(TRAIN), "train", y[:TRAIN].numpy(), x[:TRAIN])
            if "test" not in splits:
                con.add_samples(np.arange(TRAIN, TRAIN + TEST), "test", y[TRAIN:].numpy(), x[TRAIN:])
            for epoch in range(EPOCHS):
                order = torch.randperm(TRAIN, generator=torch.Generator().manual_seed(epoch)).numpy()
                with con.capture(model, checkpoint=f"e{epoch}", lr=0.1, shard_size=SHARD) as cap:
                    for start in range(0, TRAIN, BATCH):
                        part = order[start:start + BATCH]
                        cap.backward(F.cross_entropy(model(x[part]), y[part]), part)
                        _sgd_step(model, lr=0.1)
    finally:
        torch.set_num_threads(threads)


def _sgd_step(model: torch.nn.Module, lr: float) -> None:
    """Plain SGD by hand: torch.optim imports torch._dynamo, seconds per subprocess."""
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
            p.grad = None


def checked(store_dir: str, read_only: bool = False, scored: bool = False) -> dict:
    """The store's verify() lines and leftover files (and its scores)."""
    with metaql.connect(store_dir, read_only=read_only) as con:
        out = {"verify": con.verify(), "leftovers": leftovers(con, store_dir)}
        if scored:
            out["scores"] = scores(con)
    return out


def scores(con) -> dict[str, list]:
    # fixed cost constants: every store picks the same strategies (and skips timing the machine)
    con.store.db.execute("INSERT OR REPLACE INTO meta VALUES ('cost_constants', ?)",
                         [json.dumps({"sec_per_flop": 1e-10, "sec_per_byte": 1e-9})])
    con.attach_model(MLP(din=6, hidden=8, classes=3))
    return {name: con.execute(q).fetchall() for name, q in QUERIES.items()}


def leftovers(con, store_dir: str) -> list[str]:
    """Files under tensors/ and inputs/ that no shard row names, and temporaries anywhere."""
    named = {r[0] for r in con.execute("SELECT file FROM shards").fetchall()}
    root = Path(store_dir)
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return [f for f in files if f.endswith(".tmp") or (f.split("/")[0] in ("tensors", "inputs") and f not in named)]


def reference(out: Path) -> dict:
    """An uninterrupted capture, counting the hits of every fault point."""
    log = out / "hits.txt"
    faults.arm(None, log=str(log))
    started = []
    run_capture(str(out / "reference"), ready=lambda: started.append(time.monotonic()))
    seconds = time.monotonic() - started[0]
    faults.arm(None)
    hits = collections.Counter(log.read_text().split() if log.exists() else [])
    return {"hits": hits, "seconds": seconds, **checked(str(out / "reference"), scored=True)}


def trial(store_dir: str, fault: str | None = None, kill_after: float | None = None) -> dict:
    """Kills a capture into `store_dir` at `fault` or `kill_after` seconds after its store opened,
    then reopens (deleting what the kill left), verifies, resumes and scores."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        _child(lambda: (faults.arm(fault), run_capture(store_dir, ready=lambda: os.write(ready_w, b"r"))))
    os.close(ready_w)
    os.read(ready_r, 1)
    os.close(ready_r)
    status = _wait(pid, kill_after)
    result = {"killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
              "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}
    result["unnamed_after_kill"] = checked(store_dir, read_only=True)["leftovers"]
    after_kill = checked(store_dir)            # the writable open that cleans up after the kill
    result.update(verify_killed=after_kill["verify"], leftovers=after_kill["leftovers"])
    run_capture(store_dir)
    final = checked(store_dir, scored=True)
    return {**result, "verify": final["verify"], "scores": final["scores"], "leftovers_resumed": final["leftovers"]}


def _wait(pid: int, kill_after: float | None) -> int:
    """The child's exit status, once it ended or was killed `kill_after` seconds from now."""
    if kill_after is not None:
        deadline = time.monotonic() + kill_after
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def _child(body) -> None:
    """Runs `body` in a forked process and leaves with its outcome (never returns)."""
    code = 0
    try:
        body()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def resolve(spec: str, reference: dict) -> dict:
    """A trial's plan; 't=?' is a random moment of the uninterrupted capture's duration."""
    if spec.startswith("t="):
        t = random.uniform(0, reference["seconds"]) if spec == "t=?" else float(spec[2:])
        return {"spec": f"t={t:.3f}", "kill_after": t}
    hits = reference["hits"]
    point, _, nth = (random.choice(sorted(hits)) + ":?" if spec == "?" else spec).partition(":")
    n = random.randint(1, hits[point]) if nth == "?" else int(nth) if nth else (hits.get(point, 0) + 1) // 2
    return {"spec": f"{point}:{n}", "fault": f"{point}:{n}"}


def main(out: Path, jobs: int, specs: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _import_lazy_modules()
    _run_forked([lambda: _dump(out / "reference.json", reference(out))], 1)
    plans = [resolve(s, json.loads((out / "reference.json").read_text())) for s in specs]
    _run_forked([lambda i=i, p=p: _dump(out / f"trial{i}.json", {**p, **trial(
        str(out / f"store{i}"), p.get("fault"), p.get("kill_after"))}) for i, p in enumerate(plans)], jobs)


def _import_lazy_modules() -> None:
    """What a capture and a query import on first use, imported once before the forks."""
    import pandas  # noqa: F401  (DuckDB's fetches)
    import metaql.engine.optimizer  # noqa: F401
    import metaql.storage.capture  # noqa: F401


def _run_forked(bodies, jobs: int) -> None:
    """Runs each body in a forked process, `jobs` at a time (forked from a process that has not
    computed anything yet: torch's and DuckDB's threads start in the children)."""
    running = set()
    for body in bodies:
        if len(running) >= jobs:
            running.discard(os.wait()[0])
        pid = os.fork()
        if pid == 0:
            _child(body)
        running.add(pid)
    while running:
        running.discard(os.wait()[0])


def _dump(path: Path, result: dict) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
