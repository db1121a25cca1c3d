"""The floor of capture by Python hooks on the digits MLP (issue #19's capture target), against
MetaQL's capture of the same steps: how much of a captured step any hook-based capture pays, and how
much is MetaQL's own bookkeeping.

    python benchmarks/capture_floor.py [--reps 7]

One torch thread, batches of 64, 5,391 digits (three copies of load_digits) per block; the rows,
alternated block by block, each the median over the repetitions of the training thread's CPU per
step and of the wall time per step:

- plain: forward, backward, SGD step;
- floor: the same with a forward hook on each of the two linear layers keeping its input and a
  tensor hook keeping its output gradient, and after the backward one copy of each factor (the
  gradient multiplied by the batch size, as capture scales a mean loss back) appended to a list;
- floor + finite: the floor with the finiteness test capture makes of every factor (a sum each);
- MetaQL, no flush: con.capture(layers='*') with shards larger than the block (the writer thread
  idle until the capture exits, outside the clock);
- MetaQL, flushes not written: the same with the writer thread's write of each flush left out
  (a diagnostic: the flushes' cost to the training thread without the writer's work beside it);
- MetaQL: con.capture(layers='*') with two flushes per block, as bench_capture.py runs it.

--keep-factors prints instead the training thread's CPU per step inside Capture._keep_factors;
--packed-vs-full the same on packed steps (ShardWriter._packed) against full-path steps, alternated;
--contention the plain step beside a second thread of writer-like work.
"""
import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_capture import digits                      # noqa: E402
from bench_limits import provenance                     # noqa: E402
from metastore_common import Report, table              # noqa: E402

import metaql                                           # noqa: E402
import metaql.storage.capture as capture_module         # noqa: E402
from metaql.demo import DigitsMLP                       # noqa: E402

BATCH = 64


class FloorHooks:
    """The least a hook-based capture does per step: keep each layer's input and output gradient."""

    def __init__(self, modules, finite: bool):
        self.kept, self.finite, self.store = {}, finite, []
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, inputs, output):
            pair = self.kept[name] = [inputs[0].detach(), None]

            def keep(grad):
                pair[1] = grad
            output.register_hook(keep)
        return hook

    def after_backward(self, scale: float) -> None:
        step = []
        for x, d in self.kept.values():
            if self.finite and not all(np.isfinite(t.sum().item()) for t in (x, d)):
                raise ValueError("not finite")
            step.append((x.clone(), d * scale))
        self.store.append(step)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def block(model, opt, x, y, after=None, cap=None) -> tuple[float, float]:
    """(training-thread CPU seconds, wall seconds) per step of one block."""
    ids = np.arange(len(x))
    c, t = time.thread_time(), time.perf_counter()
    for s in range(0, len(x), BATCH):
        loss = F.cross_entropy(model(x[s:s + BATCH]), y[s:s + BATCH])
        if cap is not None:
            cap.backward(loss, ids[s:s + BATCH])
        else:
            loss.backward()
            if after is not None:
                after(float(min(BATCH, len(x) - s)))
        opt.step()
        opt.zero_grad()
    steps = -(-len(x) // BATCH)
    return (time.thread_time() - c) / steps, (time.perf_counter() - t) / steps


def subject():
    """(x, y, the MLP, its SGD optimizer): 5,391 digits, one torch thread, seeded."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = digits()
    model = DigitsMLP()
    return x.repeat(3, 1), y.repeat(3), model, torch.optim.SGD(model.parameters(), lr=0.01)


def unwritten(self, store, batches, seen) -> dict:
    """ShardWriter._write that writes nothing (the flushes' copies go back for reuse as after a
    write): what the training thread pays for flushes without the writer thread's work beside it."""
    self.give_back(batches)
    return {}


def measure(reps: int, workdir: str) -> dict[str, list[tuple[float, float]]]:
    x, y, model, opt = subject()
    con = metaql.connect(str(Path(workdir) / "floor.mq"))
    con.add_samples(np.arange(len(x)), "train", y.numpy(), x)
    out: dict[str, list] = {}
    modules = {"fc1": model.fc1, "fc2": model.fc2}

    def floor(finite: bool):
        hooks = FloorHooks(modules, finite)
        try:
            return block(model, opt, x, y, after=hooks.after_backward)
        finally:
            hooks.remove()

    def metaql_capture(label: str, shard_size: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with con.capture(model, layers="*", checkpoint=label, lr=0.01, shard_size=shard_size) as cap:
                return block(model, opt, x, y, cap=cap)

    def writer_idle(r):
        write = capture_module.ShardWriter._write
        capture_module.ShardWriter._write = unwritten
        try:
            return metaql_capture(f"i{r}", -(-len(x) // 2))
        finally:
            capture_module.ShardWriter._write = write

    runs = {"plain": lambda r: block(model, opt, x, y),
            "floor": lambda r: floor(False),
            "floor + finite": lambda r: floor(True),
            "MetaQL, no flush": lambda r: metaql_capture(f"n{r}", 1 << 20),
            "MetaQL, flushes not written": writer_idle,
            "MetaQL": lambda r: metaql_capture(f"f{r}", -(-len(x) // 2))}
    for name, run in runs.items():          # warm-up: first calls, first capture's catalog work
        run(-1)
    for r in range(reps):
        for name, run in runs.items():
            out.setdefault(name, []).append(run(r))
    con.close()
    return out


def timed_captures(captures: int, shard_size: int | None, timed, summary) -> list:
    """Runs `captures` captures of one block each (shard_size None: two flushes in it),
    Capture._keep_factors replaced by
    timed(original) meanwhile (and ShardWriter._packed restored after, which `timed` may switch),
    and returns summary() after each capture."""
    x, y, model, opt = subject()
    keep, packed = capture_module.Capture._keep_factors, capture_module.ShardWriter._packed
    capture_module.Capture._keep_factors = timed(keep)
    workdir = tempfile.mkdtemp(prefix="capture-floor-")
    out = []
    try:
        con = metaql.connect(str(Path(workdir) / "timed.mq"))
        con.add_samples(np.arange(len(x)), "train", y.numpy(), x)
        for r in range(captures):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with con.capture(model, layers="*", checkpoint=f"t{r}", lr=0.01,
                                 shard_size=shard_size or -(-len(x) // 2)) as cap:
                    block(model, opt, x, y, cap=cap)
            out.append(summary())
        con.close()
    finally:
        capture_module.Capture._keep_factors, capture_module.ShardWriter._packed = keep, packed
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def keep_factors_cpu(captures: int = 8) -> list[float]:
    """Per capture (no flush within it), the median over its steps of the training thread's CPU
    seconds inside Capture._keep_factors: MetaQL's bookkeeping after the backward, timed directly
    rather than as the difference of two noisy step times."""
    per: list[int] = []

    def timed(original):
        def keep_factors(self, *args, **kwargs):
            began = time.thread_time_ns()
            try:
                return original(self, *args, **kwargs)
            finally:
                per.append(time.thread_time_ns() - began)
        return keep_factors

    def summary():
        out = statistics.median(per[5:]) / 1e9      # the first steps register the layers
        per.clear()
        return out
    return timed_captures(captures, 1 << 20, timed, summary)


def packed_vs_full(captures: int = 6) -> list[tuple[float, float]]:
    """Per capture (flushes of 2,696 samples), the medians of the training thread's CPU seconds
    inside Capture._keep_factors over its packed steps and over its full-path steps, the two
    alternated step by step (ShardWriter._packed turned off on every other step), so that both
    see the same moments of a noisy machine."""
    per: dict[bool, list[int]] = {True: [], False: []}
    packed, steps = capture_module.ShardWriter._packed, [0]

    def timed(original):
        def keep_factors(self, *args, **kwargs):
            steps[0] += 1
            on = steps[0] % 2 == 0
            capture_module.ShardWriter._packed = packed if on else (lambda *a, **k: {})
            began = time.thread_time_ns()
            try:
                return original(self, *args, **kwargs)
            finally:
                per[on].append(time.thread_time_ns() - began)
        return keep_factors

    def summary():
        out = (statistics.median(per[True][3:]) / 1e9, statistics.median(per[False][3:]) / 1e9)
        per[True].clear()
        per[False].clear()
        return out
    return timed_captures(captures, None, timed, summary)


def contention(reps: int = 5) -> dict[str, tuple[float, float]]:
    """{beside what: (CPU, wall) seconds per plain step, medians}: the plain MLP block alone and
    with a second thread of the work a writer thread does: small torch operations (each lets go of
    the GIL and takes it back), DuckDB inserts, copies of large tensors."""
    import threading

    import duckdb
    x, y, model, opt = subject()
    stop = threading.Event()

    def small_ops():
        a = torch.ones(2000)
        while not stop.is_set():
            a.mul_(1.0)

    def inserts():
        con = duckdb.connect()
        con.execute("CREATE TABLE t (i INTEGER)")
        while not stop.is_set():
            con.execute("INSERT INTO t VALUES (1)")

    def large_copies():
        a = torch.ones(1 << 22)
        while not stop.is_set():
            a.clone()

    work = {"nothing": None, "small torch ops": small_ops, "DuckDB inserts": inserts, "large copies": large_copies}
    block(model, opt, x, y)
    out: dict[str, list] = {}
    for _ in range(reps):
        for name, fn in work.items():
            thread = None
            if fn is not None:
                stop.clear()
                thread = threading.Thread(target=fn, daemon=True)
                thread.start()
                time.sleep(0.05)
            out.setdefault(name, []).append(block(model, opt, x, y))
            if thread is not None:
                stop.set()
                thread.join()
    return {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in out.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7, help="alternated repetitions of every row (default 7)")
    ap.add_argument("--keep-factors", action="store_true",
                    help="only print the CPU per step inside Capture._keep_factors (8 captures; run it from two "
                         "checkouts alternately to compare them)")
    ap.add_argument("--packed-vs-full", action="store_true",
                    help="only print Capture._keep_factors' CPU per step on packed steps against full-path steps, "
                         "alternated within each of 6 captures")
    ap.add_argument("--contention", action="store_true",
                    help="only print the plain step's CPU and wall time beside a second thread of writer-like work")
    args = ap.parse_args(argv)
    if args.contention:
        res = contention()
        alone = res["nothing"][0]
        for name, (cpu, wall) in res.items():
            print(f"plain step beside {name}: CPU {cpu * 1e6:.0f} us ({cpu / alone:.2f}x), wall {wall * 1e6:.0f} us")
        return
    if args.packed_vs_full:
        pairs = packed_vs_full()
        print("Capture._keep_factors, training-thread CPU per step, packed / full path, median per capture (us): "
              + " ".join(f"{a * 1e6:.0f}/{b * 1e6:.0f}" for a, b in pairs)
              + f"; ratios {' '.join(f'{a / b:.2f}' for a, b in pairs)}")
        return
    if args.keep_factors:
        meds = keep_factors_cpu()
        print(f"Capture._keep_factors, training-thread CPU per step, median per capture (us): "
              f"{' '.join(f'{m * 1e6:.0f}' for m in meds)}; median {statistics.median(meds) * 1e6:.0f}, "
              f"min {min(meds) * 1e6:.0f}")
        return
    report = Report("capture_floor", "The floor of capture by Python hooks (digits MLP)",
                    sys.argv if argv is None else ["benchmarks/capture_floor.py", *argv])
    workdir = tempfile.mkdtemp(prefix="capture-floor-")
    try:
        res = measure(args.reps, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    plain_cpu = statistics.median(c for c, _ in res["plain"])
    plain_wall = statistics.median(w for _, w in res["plain"])
    rows = []
    for name, v in res.items():
        cpu, wall = statistics.median(c for c, _ in v), statistics.median(w for _, w in v)
        rows.append([name, cpu * 1e6, cpu / plain_cpu, wall * 1e6, wall / plain_wall,
                     f"{min(c for c, _ in v) / plain_cpu:.2f}-{max(c for c, _ in v) / plain_cpu:.2f}"])
    report.add("Per step", table(["run", "CPU us/step", "CPU ratio", "wall us/step", "wall ratio",
                                  "CPU ratio range (each block / median plain)"], rows),
               provenance() + f"; {args.reps} alternated repetitions, medians.")
    report.write()


if __name__ == "__main__":
    main()
