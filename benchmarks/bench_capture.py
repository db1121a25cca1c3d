"""Capture overhead in the training loop (issues #17, #19): a plain training step against the same
step with `cap.backward`, on the digits CNN, a VGG-shaped CNN, the digits MLP, MiniLM and a small
GPT-2 (causal-LM loss), each with the layers the space formula stores factored and with
layers='*'. Target: <= 1.3x a plain step. Each row also gives the bytes stored per sample and the
warm seconds of SELF_INFLUENCE and of INFLUENCE against 32 samples over the stored checkpoint.

    python benchmarks/bench_capture.py            # ~3-5 minutes on 2 cores; --quick: a smoke run
    python benchmarks/bench_capture.py --threads 1 --models digits_cnn,mlp

One repetition is one epoch-sized block of plain steps, then the same steps on the same batches
inside one `con.capture`. "capture ms/step" is the captured loop, the shard writes it hands to the
background writer included (the shard size is half the block, so a block flushes twice while it
trains: the digits models at about the capture's default of 2,048 samples);
"fixed ms per capture" is entering (the checkpoint's weights file) and exiting (the last flush
drained, the checkpoint marked complete and published), which a capture pays once however long it
runs; the epoch ratio counts both. Blocks alternate and each time is the median over repetitions:
the machine is shared, and the ratio of medians measured side by side is what this reports; beside it,
the ratio of the training thread's own CPU time (time.thread_time), which other jobs on the cores and the
writer thread's turns disturb far less than the wall time (it leaves out waits for the GIL). Writes
benchmarks/results/capture_overhead.json with the commit, library versions, thread counts and
load averages.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import metaql  # noqa: E402
from metastore_common import load_minilm, minilm_available, token_sequences  # noqa: E402

LR = 0.05
TARGET = 1.3
# layers='*' less bert.embeddings.position_embeddings: BERT looks its positions up once for the whole
# batch (a batch of 1 broadcast over the samples), which capture refuses as a batch-size mismatch
MINILM_ALL = ["bert.embeddings.word_embeddings", "bert.embeddings.token_type_embeddings",
              "bert.embeddings.LayerNorm", "bert.encoder.*", "bert.pooler.*", "head"]


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions on 8x8 digits (1->16->32 channels) and a linear classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x.reshape(-1, 1, 8, 8)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class VGGShaped(nn.Module):
    """A VGG-shaped CNN for 3x32x32 inputs: two 3x3 convolutions per block, 32-64-128 channels."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.plan, cin, k = [], 3, 0
        for v in [32, 32, "M", 64, 64, "M", 128, 128, "M"]:
            if v == "M":
                self.plan.append("M")
                continue
            k += 1
            setattr(self, f"conv{k}", nn.Conv2d(cin, v, 3, padding=1))
            self.plan.append(f"conv{k}")
            cin = v
        self.fc1, self.fc2 = nn.Linear(128 * 4 * 4, 256), nn.Linear(256, classes)

    def forward(self, x):
        for step in self.plan:
            x = F.max_pool2d(x, 2) if step == "M" else F.relu(getattr(self, step)(x))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def digits(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
        x, y = load_digits(return_X_y=True)
        x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    except ImportError:                 # same shapes, generated
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(1797, 64, generator=g), torch.randint(0, 10, (1797,), generator=g)
    return (x[:n], y[:n]) if n else (x, y)


def subjects(quick: bool) -> dict:
    """{name: (model factory, x, y, batch size, what layers='*' means)}; an epoch-sized block of each."""
    torch.manual_seed(0)
    dx, dy = digits()
    copies = 1 if quick else 3                   # 5,391 digits: two flushes of 2,696 samples per block
    dx, dy = dx.repeat(copies, 1), dy.repeat(copies)
    if quick:
        dx, dy = dx[:512], dy[:512]
    g = torch.Generator().manual_seed(0)
    n_vgg = 64 if quick else 256
    cx, cy = torch.randn(n_vgg, 3, 32, 32, generator=g), torch.randint(0, 10, (n_vgg,), generator=g)
    out = {"digits_cnn": (DigitsCNN, dx, dy, 64, "*"),
           "vgg_shaped": (VGGShaped, cx, cy, 32, "*"),
           "mlp": (lambda: metaql_demo().DigitsMLP(), dx, dy, 64, "*")}
    if minilm_available():
        tx, ty = token_sequences(16 if quick else 48, 16)
        out["minilm"] = (load_minilm, tx, ty, 8, MINILM_ALL)
    try:
        import transformers  # noqa: F401
        gx = torch.randint(0, 1000, (32 if quick else 128, 32), generator=g)
        out["gpt2"] = (tiny_gpt2, gx, None, 16, "*")
    except ImportError:
        pass
    return out


def tiny_gpt2():
    """A GPT-2 from a transformers config (2 blocks, width 128, 1,000 tokens; nothing downloaded),
    trained on next-token prediction; untied head (tied weights are scored per use, see README)."""
    import transformers
    cfg = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_positions=32, resid_pdrop=0,
                                  embd_pdrop=0, attn_pdrop=0, tie_word_embeddings=False, bos_token_id=1,
                                  eos_token_id=1)
    return transformers.GPT2LMHeadModel(cfg)


def causal_lm_loss(model, xb, yb):
    """Mean next-token cross-entropy over the batch (equal lengths: the mean of each sample's own)."""
    logits = model(xb).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xb[:, 1:].reshape(-1))


def classification_loss(model, xb, yb):
    return F.cross_entropy(model(xb), yb)


# {model: (its training loss, the task capture records for every replay)}
LOSSES = {"gpt2": (causal_lm_loss, {"task": "causal_lm"})}


def metaql_demo():
    import metaql.demo
    return metaql.demo


def plain_block(model, opt, x, y, batch, loss_fn=classification_loss) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the training thread) of an epoch-sized block of plain steps."""
    t0, c0 = time.perf_counter(), time.thread_time()
    for s in range(0, len(x), batch):
        loss = loss_fn(model, x[s:s + batch], None if y is None else y[s:s + batch])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return time.perf_counter() - t0, time.thread_time() - c0


def capture_block(con, model, opt, x, y, batch, layers, checkpoint, shard_size, loss_fn=classification_loss,
                  task=None) -> tuple[float, float, float]:
    """(seconds of the captured steps, seconds of the capture's fixed costs: entering, which writes
    the weights, and exiting, which writes the last flush and marks the checkpoint complete, CPU
    seconds of the training thread in the captured steps: on a shared machine the wall time counts
    every other job's turns on the cores, the thread's own CPU time much less so)."""
    ids = np.arange(len(x))
    t0 = time.perf_counter()
    cap = con.capture(model, layers=layers, checkpoint=checkpoint, lr=LR, shard_size=shard_size, task=task)
    cap.__enter__()
    t1, c1 = time.perf_counter(), time.thread_time()
    try:
        for s in range(0, len(x), batch):
            loss = loss_fn(model, x[s:s + batch], None if y is None else y[s:s + batch])
            cap.backward(loss, ids[s:s + batch])
            opt.step()
            opt.zero_grad()
    except BaseException as e:
        cap.__exit__(type(e), e, None)
        raise
    t2, c2 = time.perf_counter(), time.thread_time()
    cap.__exit__(None, None, None)
    return t2 - t1, (t1 - t0) + (time.perf_counter() - t2), c2 - c1


def query_seconds(con, model) -> tuple[float, float]:
    """Warm seconds of SELF_INFLUENCE and of INFLUENCE against 32 of the samples (their gradients
    replayed at the checkpoint), over the first captured checkpoint's every layer: the cost of a
    question once the factors are stored."""
    con.attach_model(model)
    con.execute("CREATE SET q AS SELECT sample_id FROM samples ORDER BY sample_id LIMIT 32")
    out = []
    for sql in ("SELECT count(*) FROM SELF_INFLUENCE(checkpoints=[r0])",
                "SELECT count(*) FROM INFLUENCE(query=batch(q), checkpoints=[r0])"):
        con.execute(sql).fetchall()
        t0 = time.perf_counter()
        con.execute(sql).fetchall()
        out.append(time.perf_counter() - t0)
    con.execute("DROP SET q")
    return out[0], out[1]


def factored_layers(con) -> list[str]:
    return [r["name"] for r in con.store.layers() if r["storage"] == "factored"]


def stored_bytes(con, checkpoint: str) -> int:
    return int(con.store.sql("SELECT coalesce(sum(bytes), 0) FROM shards WHERE kind = 'factors' AND checkpoint = ?",
                             [checkpoint]).fetchone()[0])


def measure(name, factory, x, y, batch, all_layers, reps, threads, workdir, shard_size) -> list[dict]:
    """Rows for layers='*' and for the factored layers of the same model."""
    torch.set_num_threads(threads)
    loss_fn, task = LOSSES.get(name, (classification_loss, None))
    model = factory()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    steps = -(-len(x) // batch)
    rows, layer_sets = [], [("*", all_layers)]
    ys = (lambda part: None if y is None else y[part])
    plain_block(model, opt, x[:batch], ys(slice(batch)), batch, loss_fn)           # warm-up
    for label, layers in layer_sets:
        path = Path(workdir) / f"{name}-{threads}-{label.replace('*', 'all')}"
        shutil.rmtree(path, ignore_errors=True)
        con = metaql.connect(str(path))
        con.add_samples(np.arange(len(x)), "train", None if y is None else y.numpy(), x)   # for the query columns
        try:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")        # skipped-layer notices of layers='*'
                capture_block(con, model, opt, x[:batch], ys(slice(batch)), batch, layers, "warmup", shard_size,
                              loss_fn, task)
            plain, captured, enter, plain_cpu, captured_cpu = [], [], [], [], []
            for r in range(reps):
                p, pc = plain_block(model, opt, x, y, batch, loss_fn)
                plain.append(p / steps)
                plain_cpu.append(pc / steps)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    c, e, cc = capture_block(con, model, opt, x, y, batch, layers, f"r{r}", shard_size, loss_fn, task)
                captured.append(c / steps)
                captured_cpu.append(cc / steps)
                enter.append(e)
            watched = [r["name"] for r in con.store.layers()]
            self_s, inf_s = query_seconds(con, model)
            p, c, e = statistics.median(plain), statistics.median(captured), statistics.median(enter)
            rows.append(dict(model=name, layers=label, n_layers=len(watched), threads=threads, batch=batch,
                             steps=steps, shard_size=shard_size, plain_ms=1e3 * p, capture_ms=1e3 * c, ratio=c / p,
                             fixed_ms=1e3 * e, epoch_ratio=(c * steps + e) / (p * steps),
                             plain_cpu_ms=1e3 * statistics.median(plain_cpu),
                             capture_cpu_ms=1e3 * statistics.median(captured_cpu),
                             cpu_ratio=statistics.median(captured_cpu) / statistics.median(plain_cpu),
                             bytes_per_sample=stored_bytes(con, "r0") / len(x),
                             self_influence_s=self_s, influence_s=inf_s,
                             plain_all_ms=[1e3 * v for v in plain], capture_all_ms=[1e3 * v for v in captured],
                             fixed_all_ms=[1e3 * v for v in enter]))
            if label == "*":
                fac = factored_layers(con)
                if fac and len(fac) < len(watched):
                    layer_sets.append(("factored", fac))
        finally:
            con.close()
    return rows


def flush_cpu(name, factory, x, y, batch, all_layers, reps, workdir, shard_size) -> dict:
    """CPU seconds (time.thread_time) per flush of Store.write_factor_shards, the writer thread's
    work, measured inline (background=False, so the flush runs in this thread): the cost a flush
    adds to the machine, which other jobs disturb far less than wall times. The first capture warms
    up and is left out."""
    from metaql.storage.store import Store
    torch.set_num_threads(1)
    loss_fn, task = LOSSES.get(name, (classification_loss, None))
    model = factory()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    spent, original = [], Store.write_factor_shards

    def timed(self, checkpoint, entries, *rest):
        c0 = time.thread_time()
        try:
            return original(self, checkpoint, entries, *rest)
        finally:
            spent.append(time.thread_time() - c0)
    path = Path(workdir) / f"{name}-flush"
    con = metaql.connect(str(path))
    con.add_samples(np.arange(len(x)), "train", None if y is None else y.numpy(), x)
    ids = np.arange(len(x))
    Store.write_factor_shards = timed
    try:
        import warnings
        for r in range(reps + 1):
            if r == 1:
                spent.clear()
            with warnings.catch_warnings(), con.capture(model, layers=all_layers, checkpoint=f"f{r}", lr=LR,
                                                        shard_size=shard_size, task=task, background=False) as cap:
                warnings.simplefilter("ignore")
                for s in range(0, len(x), batch):
                    loss = loss_fn(model, x[s:s + batch], None if y is None else y[s:s + batch])
                    cap.backward(loss, ids[s:s + batch])
                    opt.step()
                    opt.zero_grad()
    finally:
        Store.write_factor_shards = original
        con.close()
    return dict(model=name, flushes=len(spent), flush_cpu_ms=1e3 * statistics.median(spent),
                flush_cpu_all_ms=[1e3 * v for v in spent])


def environment(threads: list[int]) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "storage", "metaql", "engine"],
                                    cwd=ROOT, capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "unknown", None
    import duckdb
    import pyarrow
    return dict(commit=commit, uncommitted_changes=dirty, date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                python=platform.python_version(), torch=torch.__version__, duckdb=duckdb.__version__,
                pyarrow=pyarrow.__version__, cpus=os.cpu_count(), threads=threads,
                torch_default_threads=torch.get_num_threads())


def table(rows: list[dict]) -> str:
    head = ("| model | layers | threads | batch | plain ms/step | capture ms/step | ratio | <= 1.3x "
            "| training-thread CPU ratio | fixed ms per capture | epoch ratio | bytes/sample | SELF_INFLUENCE s "
            "| INFLUENCE (32 queries) s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layers']} ({r['n_layers']}) | {r['threads']} | {r['batch']} | "
                     f"{r['plain_ms']:.2f} | {r['capture_ms']:.2f} | {r['ratio']:.2f}x | "
                     f"{'yes' if r['ratio'] <= TARGET else 'no'} | {r['cpu_ratio']:.2f}x | {r['fixed_ms']:.0f} | "
                     f"{r['epoch_ratio']:.2f}x | "
                     f"{r['bytes_per_sample']:,.0f} | {r.get('self_influence_s', float('nan')):.3f} | "
                     f"{r.get('influence_s', float('nan')):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small blocks, one repetition (a smoke run)")
    ap.add_argument("--reps", type=int, default=None, help="alternated repetitions (default 3; --quick 1)")
    ap.add_argument("--threads", default="1,0", help="comma-separated torch thread counts; 0 = all cores")
    ap.add_argument("--models", default=None, help="comma-separated subset of digits_cnn,vgg_shaped,mlp,minilm,gpt2")
    ap.add_argument("--shard-size", type=int, default=None,
                    help="samples per shard (default: half a block, so that each block flushes twice while it trains)")
    ap.add_argument("--flush-cpu", action="store_true",
                    help="only the CPU ms per flush of the shard writes (inline, one thread; see flush_cpu)")
    ap.add_argument("--out", default=str(HERE / "results" / "capture_overhead.json"))
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    default_threads = torch.get_num_threads()
    threads = [int(t) or default_threads for t in args.threads.split(",")]
    subs = subjects(args.quick)
    if args.models:
        subs = {k: v for k, v in subs.items() if k in args.models.split(",")}
    load_before = os.getloadavg()
    rows, t0 = [], time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="metaql-bench-capture-")
    if args.flush_cpu:
        try:
            for name, (factory, x, y, batch, all_layers) in subs.items():
                r = flush_cpu(name, factory, x, y, batch, all_layers, reps, workdir, args.shard_size or -(-len(x) // 2))
                print(f"{name}: {r['flushes']} flushes, median {r['flush_cpu_ms']:.1f} ms CPU per flush "
                      f"({', '.join(f'{v:.0f}' for v in r['flush_cpu_all_ms'])}); load {os.getloadavg()[0]:.2f}")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0
    try:
        for n in threads:
            for name, (factory, x, y, batch, all_layers) in subs.items():
                print(f"[{time.perf_counter() - t0:5.0f} s] {name}, {n} thread(s)", file=sys.stderr, flush=True)
                rows += measure(name, factory, x, y, batch, all_layers, reps, n, workdir,
                                args.shard_size or -(-len(x) // 2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    env = environment(threads)
    env.update(load_avg_start=load_before, load_avg_end=os.getloadavg(), reps=reps, quick=args.quick,
               seconds=time.perf_counter() - t0, command="python benchmarks/bench_capture.py " + " ".join(argv or sys.argv[1:]))
    print(table(rows))
    print(f"\nload average {load_before[0]:.2f} at start, {env['load_avg_end'][0]:.2f} at end; "
          f"{env['seconds']:.0f} s; commit {env['commit'][:10]}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(environment=env, target=TARGET, rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
