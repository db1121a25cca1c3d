"""MetaQL against the exact peers on the same model, data and checkpoints (issue #19).

Peers: captum's TracInCP (per-sample gradients by its hooks, `sample_wise_grads_per_batch=True`),
torch.func (vmap of grad) + a matrix product, and Opacus' GradSampleModule + a matrix product.
Model: an MLP on CIFAR-shaped inputs (3072 -> 512 -> 256 -> 10, 1.7M parameters), three
checkpoints of SGD training, every layer, each sample's own cross-entropy, TracIn's lr weighting.
Quantities: self-influence of every training sample; influence of every training sample against a
test batch (its mean gradient); the train x test matrix; each test sample's top-10 proponents.

Times: "end to end" starts from the checkpoints' weights: MetaQL registers them and replays the
training samples (its factors), then queries; the peers compute their per-sample gradients and
products. "query" is MetaQL's warm query on the stored factors, the cost a user pays for each
further question (the peers have no stored form: each question is end to end for them). Every
answer is checked against torch.func's before it is timed.

    python benchmarks/bench_peers.py             # 2,000 training samples, 100 test (some minutes)
    python benchmarks/bench_peers.py --quick     # 300 and 20
    pip install captum opacus                    # the peers (absent ones are skipped)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import metaql  # noqa: E402
from metastore_common import add_threads_option, cifar_like, set_threads, table  # noqa: E402

LR = 0.01
TOPK = 10
TEST0 = 1_000_000


class PeerMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3072, 512), nn.Linear(512, 256), nn.Linear(256, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


def checkpoints(x, y, n_ckpt: int) -> list[dict]:
    """The weights after each of n_ckpt short SGD epochs (a fixed seed)."""
    torch.manual_seed(0)
    model = PeerMLP()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = []
    for _ in range(n_ckpt):
        for s in range(0, len(y), 128):
            opt.zero_grad()
            F.cross_entropy(model(x[s:s + 128]), y[s:s + 128]).backward()
            opt.step()
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ---- torch.func: the reference ------------------------------------------------------------------------

def func_grads(model, params, x, y, chunk=64) -> torch.Tensor:
    def loss_one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))
    g = vmap(grad(loss_one), in_dims=(None, 0, 0))
    rows = []
    for s in range(0, len(y), chunk):
        gs = g(params, x[s:s + chunk], y[s:s + chunk])
        rows.append(torch.cat([v.reshape(v.shape[0], -1) for v in gs.values()], 1))
    return torch.cat(rows)


def per_checkpoint_products(grads_of, ckpts, x, y, xt, yt, chunk=256) -> dict[str, torch.Tensor]:
    """Self-influence and the train x test matrix, summed over checkpoints with lr, from per-sample
    gradients computed chunk by chunk (the whole train gradient matrix would not fit)."""
    n = len(y)
    self_inf, mat = torch.zeros(n, dtype=torch.float64), torch.zeros(n, len(yt), dtype=torch.float64)
    for w in ckpts:
        gt = grads_of(w, xt, yt)
        for s in range(0, n, chunk):
            g = grads_of(w, x[s:s + chunk], y[s:s + chunk])
            self_inf[s:s + chunk] += LR * (g * g).sum(1).double()
            mat[s:s + chunk] += LR * (g @ gt.T).double()
    return {"self": self_inf, "matrix": mat}


def torch_func_all(ckpts, x, y, xt, yt):
    model = PeerMLP()

    def grads_of(w, xs, ys):
        return func_grads(model, {k: v for k, v in w.items()}, xs, ys)
    return per_checkpoint_products(grads_of, ckpts, x, y, xt, yt)


# ---- Opacus --------------------------------------------------------------------------------------------

def opacus_all(ckpts, x, y, xt, yt):
    from opacus import GradSampleModule
    model = GradSampleModule(PeerMLP(), loss_reduction="sum")    # its default "mean" rescales by the batch

    def grads_of(w, xs, ys):
        model._module.load_state_dict(w)
        for p in model.parameters():       # grad_sample accumulates over backward passes otherwise
            p.grad, p.grad_sample = None, None
        F.cross_entropy(model(xs), ys, reduction="sum").backward()
        return torch.cat([p.grad_sample.reshape(len(ys), -1) for p in model.parameters()], 1)
    return per_checkpoint_products(grads_of, ckpts, x, y, xt, yt)


# ---- captum TracInCP ----------------------------------------------------------------------------------

def captum_tracin(ckpts, x, y, workdir):
    from captum.influence import TracInCP
    paths = []
    for i, w in enumerate(ckpts):
        paths.append(str(Path(workdir) / f"ckpt{i}.pt"))
        torch.save(w, paths[-1])

    def load(model, path):
        model.load_state_dict(torch.load(path))
        return LR
    return TracInCP(PeerMLP(), torch.utils.data.TensorDataset(x, y), checkpoints=paths,
                    checkpoints_load_func=load, loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=256,
                    sample_wise_grads_per_batch=True)


def captum_all(ckpts, x, y, xt, yt, workdir):
    times, out = {}, {}
    times["self"], out["self"] = timed(lambda: captum_tracin(ckpts, x, y, workdir).self_influence(show_progress=False))
    times["matrix"], m = timed(lambda: captum_tracin(ckpts, x, y, workdir).influence((xt, yt), show_progress=False))
    out["matrix"] = m.T.double()
    times["topk"], out["topk"] = timed(lambda: captum_tracin(ckpts, x, y, workdir).influence(
        (xt, yt), k=TOPK, proponents=True, show_progress=False))
    return times, out


# ---- MetaQL --------------------------------------------------------------------------------------------

def metaql_store(ckpts, x, y, xt, yt, path):
    con = metaql.connect(path, config={"progress": False})
    con.add_samples(np.arange(len(y)), "train", y.numpy(), x)
    con.add_samples(TEST0 + np.arange(len(yt)), "test", yt.numpy(), xt)
    model = PeerMLP()
    for i, w in enumerate(ckpts):
        model.load_state_dict(w)
        con.checkpoint(model, f"c{i}", lr=LR)
        con.replay(f"c{i}", "train")
    return con


QUERIES = {
    "self": "SELECT sample_id, score FROM SELF_INFLUENCE() ORDER BY sample_id",
    "batch": "SELECT sample_id, score FROM INFLUENCE(query=batch(test)) ORDER BY sample_id",
    "matrix": "SELECT query_id, sample_id, score FROM INFLUENCE(query=each(test))",
    "topk": f"SELECT query_id, sample_id, rank FROM INFLUENCE(query=each(test), topk={TOPK}) ORDER BY query_id, rank",
}


def metaql_answer(con, what):
    rows = con.execute(QUERIES[what]).fetchnumpy()
    if what == "matrix":
        nt = int(rows["query_id"].max() - TEST0 + 1)
        m = torch.zeros(int(rows["sample_id"].max()) + 1, nt, dtype=torch.float64)
        m[torch.from_numpy(rows["sample_id"]), torch.from_numpy(rows["query_id"] - TEST0)] = torch.from_numpy(rows["score"])
        return m
    if what == "topk":
        return torch.from_numpy(rows["sample_id"]).reshape(-1, TOPK)
    return torch.from_numpy(rows["score"])


def rel(a, b) -> float:
    """Relative error; for top-k id lists, the fraction of ids that differ."""
    if not a.is_floating_point():
        return float(sum(len(set(r.tolist()) ^ set(q.tolist())) for r, q in zip(a, b)) / (2 * b.numel()))
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# ---- the run -------------------------------------------------------------------------------------------

def environment(threads: int) -> dict:
    def version(mod):
        try:
            return __import__(mod).__version__
        except ImportError:
            return None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    return {"commit": commit, "python": platform.python_version(), "torch": torch.__version__,
            "captum": version("captum"), "opacus": version("opacus"), "threads": threads,
            "load_average": os.getloadavg()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--checkpoints", type=int, default=3)
    add_threads_option(ap)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    n, nt = (300, 20) if args.quick else (args.train, args.test)
    x, y = cifar_like(n, seed=0)
    xt, yt = cifar_like(nt, seed=1)
    ckpts = checkpoints(x, y, args.checkpoints)
    params = sum(v.numel() for v in ckpts[0].values())
    print(f"{params:,} parameters, {n} training and {nt} test samples, {len(ckpts)} checkpoints, "
          f"{torch.get_num_threads()} thread(s)", file=sys.stderr)

    t_ref, ref = timed(lambda: torch_func_all(ckpts, x, y, xt, yt))
    ref["batch"] = ref["matrix"].mean(1)
    ref["topk"] = ref["matrix"].topk(TOPK, dim=0).indices.T          # (test, k) proponents
    rows, errors = [], {}
    times = {"torch.func + matmul": {q: t_ref for q in ("self", "batch", "matrix", "topk")}}

    with tempfile.TemporaryDirectory() as work:
        t_store, con = timed(lambda: metaql_store(ckpts, x, y, xt, yt, str(Path(work) / "s.mq")))
        mq_e2e, mq_query = {}, {}
        for what in QUERIES:
            t_first, got = timed(lambda: metaql_answer(con, what))
            errors[("MetaQL", what)] = rel(got, ref[what])
            mq_query[what] = min(timed(lambda: metaql_answer(con, what))[0] for _ in range(3))
            mq_e2e[what] = t_store + t_first
        con.close()
        times["MetaQL (end to end)"], times["MetaQL (query)"] = mq_e2e, mq_query

        try:
            t_op, op = timed(lambda: opacus_all(ckpts, x, y, xt, yt))
            for what in ("self", "matrix"):
                errors[("Opacus", what)] = rel(op[what], ref[what])
            times["Opacus + matmul"] = {q: t_op for q in ("self", "batch", "matrix", "topk")}
        except ImportError:
            print("opacus not installed: skipped", file=sys.stderr)
        try:
            t_cap, cap = captum_all(ckpts, x, y, xt, yt, work)
            errors[("captum TracInCP", "self")] = rel(cap["self"], ref["self"])
            errors[("captum TracInCP", "matrix")] = rel(cap["matrix"], ref["matrix"])
            errors[("captum TracInCP", "topk")] = rel(cap["topk"][0], ref["topk"])
            t_cap["batch"] = t_cap["matrix"]
            times["captum TracInCP"] = t_cap
        except ImportError:
            print("captum not installed: skipped", file=sys.stderr)

    quantities = [("self", "self-influence"), ("batch", "influence vs test batch"), ("matrix", "train x test matrix"),
                  ("topk", f"top-{TOPK} per test sample")]
    for who, t in times.items():
        rows.append([who] + [t.get(q) for q, _ in quantities])
    peers = [w for w in times if not w.startswith("MetaQL")]
    speed = []
    for label in ("MetaQL (end to end)", "MetaQL (query)"):
        speed.append([f"{label}: fastest peer / MetaQL"] + [
            (min(times[p][q] for p in peers) / times[label][q]) if q in times[label] else None for q, _ in quantities])
    out = [f"# MetaQL against exact peers\n",
           f"`python benchmarks/bench_peers.py{' --quick' if args.quick else ''}`: {params:,}-parameter MLP, "
           f"{n} training and {nt} test samples, {len(ckpts)} checkpoints, {torch.get_num_threads()} thread(s).\n",
           "Seconds (a peer computes all its quantities in one pass over the gradients where it can, and that "
           "pass's time is shown for each):\n",
           table(["method"] + [name for _, name in quantities], rows), "",
           table(["speed-up"] + [name for _, name in quantities], speed), "",
           "Relative error against torch.func: " + ", ".join(f"{w} {q} {e:.1e}" for (w, q), e in errors.items()),
           "", "```json", json.dumps(environment(torch.get_num_threads())), "```"]
    text = "\n".join(out) + "\n"
    print(text)
    name = "peers_quick.md" if args.quick else "peers.md"
    (HERE / "results" / name).write_text(text)
    bad = {k: v for k, v in errors.items() if v > 1e-4}
    if bad:
        print(f"answers differ from torch.func: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
