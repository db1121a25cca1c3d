"""MetaQL's projected storage against TRAK's CPU projector at equal stored bytes (issue #23).

One workload per run (`--workload digits|vgg|minilm32|minilm128`, the models, data and layers of
bench_approx.py; model weights drawn after torch.manual_seed(0)). Per run: the exact store and its
INFLUENCE scores (one checkpoint, lr = 1, the mean gradient of a batch of test samples as the
query); then for each projected configuration and each seed s (`--seeds S`, s = 0..S-1) a
projected store captured with proj_seed=s, its scores, bytes per sample (the factor shard files),
Spearman and top-k overlap against the exact scores; and the peer at the same bytes.

The peer, TRAK's CPU projector (`traker`'s BasicProjector, normal entries, proj_dim = MetaQL's
bytes per sample // 4, so the peer never stores more), applied per layer. A dense Gaussian
projection R^T g of the concatenated gradient g = [g_1, ..., g_L] equals in distribution
sum_l R_l^T g_l with independent Gaussian R_l (R's rows split by layer: R^T g = sum_l R_l^T g_l
exactly, and R's blocks are independent), so each layer gets its own BasicProjector (grad_dim =
that layer's parameters, seed = s * 10^9 + l * 10^6, so every block of every layer draws its own
stream; the same proj_dim) and the projections are summed; scores are <R^T g_i, R^T gbar> / proj_dim,
TracIn with TRAK's projector (not TRAK's kernel). This bounds memory by one layer's gradients and
one block (block_size 100, or fewer columns where grad_dim x 100 floats would pass 1 GiB) instead
of the N x P matrix and a P x 100 block over all parameters (4 GiB on the MiniLM). The per-sample
gradients g_i are the exact store's (kind.full of its factors, one layer at a time); the query's
mean gradient gbar comes from torch autograd on the same model (independently of MetaQL), and
the unprojected sum_l <g_i,l, gbar_l> is checked against MetaQL's exact scores (`brute-force
check`: the largest relative difference, must be < 1e-3).

Cost guard: a peer run costs about sum_l P_l x proj_dim normal draws (1.05e8/s measured at one
thread on this machine) and 2 (N + 1) P proj_dim flops (65 GFLOP/s); a run estimated above
`--budget` CPU seconds (default 900) is not run and the row says so. `--subset M` scores a fixed
random subset of M training samples (numpy seed 0) for both MetaQL and the peer: Spearman and
top-k over the subset, against the exact scores of the same subset (a MetaQL score of a sample
does not depend on the others, so its rows are the full run's, restricted).

Digits `--budget-rule`: at the bytes B of the sketched store (k=256, sketch m=64, seed 0), MetaQL
may use its best projected configuration for that budget. The rule, fixed before any score is
seen: plain projected storage with the largest proj_dim whose bytes per sample do not exceed B
(found by capturing k = 2, 3, ... until the bytes pass B; bytes do not depend on the seed). That
configuration is added to the run; every k tried is reported with its bytes. A level is `met`
when MetaQL's mean Spearman over the seeds is at least the peer's mean at the same bytes.

Digits `--dattri`: dattri's projected TracIn (TracInAttributor with its CPU projector, normal
entries, the same proj_dim and seed index, every parameter, per-sample gradients by torch.func)
beside TRAK; its unprojected scores are checked against MetaQL's exact ones like TRAK's.
`--configs` picks configurations: a proj_dim, 's' (k=256 + sketch m=64) or 'u<m>' (a sketch of m
numbers of each layer's unprojected gradient: a dense Gaussian projection per layer).

`--half`: both sides store half precision, as TRAK does by default (`TRAKer(use_half_precision=True)`
keeps its projected features in float16): MetaQL captures with dtype='float16' and the peer gets
proj_dim = bytes // 2, its training samples' projected features rounded to float16 before scoring
(the query's kept in float32, and the projection itself in float32: a little kinder to the peer than
TRAK's own float16 pipeline). Without it both are float32 (TRAK's use_half_precision=False).

    python benchmarks/bench_approx_peers.py --workload W [--seeds S] [--subset M] [--budget SECS]
                                             [--budget-rule] [--dattri] [--configs C,...] [--half] [--out NAME]
                                             [--threads 1] [--clock cpu]

Results: benchmarks/results/approx_peers_<workload>.md (the summary is approx_peers.md).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from metastore_common import Report, add_clock_option, add_threads_option, clock, load_minilm, log, set_clock, \
    set_threads, table, token_sequences
from bench_approx import SKETCHED, DigitsCNN, VGGShaped, build, commit, digits, json_meta, label, layer_names, \
    minilm_layers, overlap, scores_of, spearman, stored_bytes

UNPROJECTED = 10 ** 9       # a proj_dim above every layer's width: no side projected (a sketch of the full gradient)
NORMALS_PER_S = 1.05e8       # torch normal_ at one thread on this machine (measured 2026-12-03)
FLOPS_PER_S = 65e9           # float32 matmul, one thread, (160 x 1e6) @ (1e6 x 100)
BLOCK_FLOATS = 2 ** 28       # a projector block (grad_dim x block_size float32) stays under 1 GiB


def config_named(text: str) -> dict:
    """--configs entries: 's' the sketched store (k=256, m=64), 'u<m>' a sketch of m numbers of each
    layer's unprojected gradient, 'c<M>' a count sketch of the unprojected gradients with M numbers
    per sample split among the layers by energy (sketch_budget), 'c<M>b8' or 'c<M>b4' the same stored
    in 8 or 4 bits (sketch_bits), '<k>' plain projected storage with k per side."""
    if text == "s":
        return SKETCHED
    if text.startswith("c"):
        budget, _, bits = text[1:].partition("b")
        return {"sketch_budget": int(budget), "sketch_dist": "count", **({"sketch_bits": int(bits)} if bits else {})}
    if text.startswith("u"):
        return {"proj_dim": UNPROJECTED, "sketch_dim": int(text[1:])}
    return {"proj_dim": int(text)}


def config_label(config: dict) -> str:
    if "sketch_budget" in config:
        bits = f", {config['sketch_bits']}-bit" if config.get("sketch_bits") else ""
        return f"count sketch of the unprojected gradients, {config['sketch_budget']} numbers split by energy{bits}"
    if config["proj_dim"] == UNPROJECTED:
        return f"sketch m={config['sketch_dim']} of the unprojected gradient"
    return label(config)


def workload_spec(name: str) -> dict:
    """Data, model, layers and projected configurations of a workload (as bench_approx's FULL)."""
    if name == "digits":
        n, nq = 1000, 16
        x, y = digits(n, nq)
        return dict(title="digits CNN", make=DigitsCNN, x=x, y=y, n=n, batch=100, layers=["conv1", "conv2", "fc"],
                    configs=[{"proj_dim": 16}, {"proj_dim": 64}, SKETCHED])
    if name == "vgg":
        n, nq = 400, 8
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(n + nq, 3, 32, 32, generator=g), torch.randint(0, 10, (n + nq,), generator=g)
        return dict(title="VGG-shaped CNN", make=VGGShaped, x=x, y=y, n=n, batch=50,
                    layers=["conv1", "conv2", "conv3", "conv4", "fc1", "fc2"],
                    configs=[{"proj_dim": 16}, {"proj_dim": 64}, SKETCHED])
    length, n, nq = {"minilm32": (32, 160, 8), "minilm128": (128, 48, 4)}[name]
    x, y = token_sequences(n + nq, length)
    return dict(title=f"MiniLM T={length}", make=load_minilm, x=x, y=y, n=n, batch=16, layers=minilm_layers(),
                configs=[{"proj_dim": 16}, SKETCHED])


def query_gradient(model, x, y, layers) -> dict[str, torch.Tensor]:
    """The test batch's mean gradient per layer from torch autograd, flattened as kind.full flattens
    a sample's (weight as dout x rest, the bias as a last column, row-major)."""
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    mods = dict(model.named_modules())
    out = {}
    for l in layers:
        m = mods[l]
        w = m.weight.grad.reshape(m.weight.shape[0], -1)
        if m.bias is not None:
            w = torch.cat([w, m.bias.grad.reshape(-1, 1)], dim=1)
        out[l] = w.reshape(-1).detach().clone()
    model.zero_grad()
    return out


def layer_gradients(store, layer: str, rows: np.ndarray) -> torch.Tensor:
    """Per-sample gradients (len(rows), params) of one layer from the exact store's factors."""
    from metaql.storage.layers import kind_named
    meta, _ = store.layer_meta(layer)
    kind = kind_named(meta.kind)
    want = {int(i): j for j, i in enumerate(rows)}
    out = None
    for row in store.factor_shards("c0", layer):
        ids, tensors = store.shard_tensors(row)
        pick = [k for k, i in enumerate(ids) if int(i) in want]
        if not pick:
            continue
        g = kind.full(meta, {n: t[pick] for n, t in tensors.items()}).float()
        if out is None:
            out = torch.zeros(len(rows), g.shape[1])
        out[[want[int(ids[k])] for k in pick]] = g
    return out


def layer_params(store, layers) -> dict[str, int]:
    return {l: int(store.layer_meta(l)[0].params) for l in layers}


def peer_estimate(params: dict[str, int], proj_dim: int, rows: int) -> float:
    """Estimated CPU seconds of a peer run: normal draws plus the projection's flops."""
    total = sum(params.values())
    return total * proj_dim / NORMALS_PER_S + 2 * (rows + 1) * total * proj_dim / FLOPS_PER_S


def trak_scores(store, layers, rows: np.ndarray, gq: dict[str, torch.Tensor], proj_dim: int, seed: int,
                half: bool = False):
    """(scores of `rows`, unprojected scores, seconds building gradients, seconds projecting): TRAK's
    BasicProjector per layer, summed (see the module docstring); `half`: the training samples'
    features stored as float16 (TRAK's default) before scoring."""
    from trak.projectors import BasicProjector, ProjectionType
    sketch = torch.zeros(len(rows) + 1, proj_dim)
    plain = torch.zeros(len(rows), dtype=torch.float64)
    t_grad = t_proj = 0.0
    for li, l in enumerate(layers):
        t0 = clock()
        g = layer_gradients(store, l, rows)
        g = torch.cat([g, gq[l].reshape(1, -1)])          # the query projected in the same call, same matrix
        plain += (g[:-1].double() @ g[-1].double())
        t1 = clock()
        block = max(1, min(100, proj_dim, BLOCK_FLOATS // g.shape[1]))
        blocks = math.ceil(proj_dim / block)
        assert blocks * 1000 < 10 ** 6, "layer seeds would share block streams"
        projector = BasicProjector(g.shape[1], proj_dim, seed=seed * 10 ** 9 + li * 10 ** 6,
                                   proj_type=ProjectionType.normal, device="cpu", block_size=block)
        sketch += projector.project(g, model_id=0)
        del projector, g
        t2 = clock()
        t_grad, t_proj = t_grad + t1 - t0, t_proj + t2 - t1
    sketch /= proj_dim ** 0.5
    if half:
        sketch[:-1] = sketch[:-1].half().float()
    sc = (sketch[:-1].double() @ sketch[-1].double()).numpy()
    return sc, plain.numpy(), t_grad, t_proj


def dattri_scores(model, x, y, n: int, proj_dim: int | None, seed: int):
    """(scores, seconds): dattri's TracInAttributor (its CPU projector when proj_dim is given; None:
    unprojected) on every parameter of `model`, the mean over the test samples of its (N, nq) output
    (linear in the test gradient, so the score against the test batch's mean gradient)."""
    from torch.utils.data import DataLoader, TensorDataset
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    def loss(params, data):
        xi, yi = data
        return F.cross_entropy(torch.func.functional_call(model, params, xi.unsqueeze(0)), yi.unsqueeze(0))
    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    kwargs = None if proj_dim is None else {"proj_dim": proj_dim, "proj_max_batch_size": 32, "proj_seed": seed,
                                            "device": "cpu"}
    t0 = clock()
    attr = TracInAttributor(task, weight_list=torch.ones(1), normalized_grad=False, projector_kwargs=kwargs)
    attr.projector_kwargs = None if kwargs is None else dict(attr.projector_kwargs)   # its default dict is shared
    out = attr.attribute(DataLoader(TensorDataset(x[:n], y[:n]), batch_size=100),
                         DataLoader(TensorDataset(x[n:], y[n:]), batch_size=len(x) - n))
    return out.double().mean(1).numpy(), clock() - t0


def largest_k_within(spec, model, tmp, budget_bytes: float) -> tuple[int | None, list[list]]:
    """The largest plain proj_dim whose store's bytes per sample do not exceed budget_bytes, and
    every k tried with its bytes (k = 2, 3, ... until the bytes pass the budget)."""
    tried, best = [], None
    for k in range(2, 4097):
        con, _ = build(f"{tmp}/rule-k{k}.mq", model, spec["x"], spec["y"], spec["n"], spec["layers"],
                       spec["batch"], storage="projected", proj_dim=k)
        b = stored_bytes(con) / spec["n"]
        con.close()
        _remove(f"{tmp}/rule-k{k}.mq")
        tried.append([k, b, "yes" if b <= budget_bytes else "no"])
        if b > budget_bytes:
            break
        best = k
    return best, tried


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", required=True, choices=("digits", "vgg", "minilm32", "minilm128"))
    ap.add_argument("--seeds", type=int, default=1, help="projection seeds per configuration (MetaQL and peer)")
    ap.add_argument("--first-seed", type=int, default=0, help="the first seed (seeds first-seed .. first-seed+S-1)")
    ap.add_argument("--subset", type=int, help="score a fixed random subset of this many training samples")
    ap.add_argument("--budget", type=float, default=900.0, help="largest estimated CPU seconds of one peer run")
    ap.add_argument("--budget-rule", action="store_true", help="digits: add the plain projected configuration "
                    "the rule picks at the sketched store's bytes")
    ap.add_argument("--dattri", action="store_true", help="also dattri's projected TracIn at the same proj_dim "
                    "and seed (a workload whose captured layers hold every parameter: digits)")
    ap.add_argument("--configs", help="comma-separated configurations to run (default: the workload's): a proj_dim, "
                    "'s' (k=256, sketch m=64), 'u<m>' (a sketch of m numbers of the unprojected gradient), "
                    "'c<M>' (a count sketch of the unprojected gradients, M numbers split by energy; 'c<M>b8' stored "
                    "in 8 bits, 'c<M>b4' in 4)")
    ap.add_argument("--half", action="store_true", help="both sides store float16 (TRAK's default "
                    "use_half_precision=True): MetaQL dtype='float16', the peer proj_dim = bytes // 2")
    ap.add_argument("--out", help="the results file's name under benchmarks/results (no .md)")
    add_threads_option(ap)
    add_clock_option(ap)
    args = ap.parse_args(argv)
    if args.half and args.dattri:
        ap.error("--half compares float16 storage; dattri's projected TracIn keeps float32 (run it without --half)")
    set_threads(args.threads)
    set_clock(args.clock)
    import importlib.metadata as md
    spec = workload_spec(args.workload)
    report = Report(args.out or f"approx_peers_{args.workload}", f"Equal-bytes peers: {spec['title']}", sys.argv)
    versions = {p: md.version(p) for p in ("torch", "traker", "numpy") + (("dattri",) if args.dattri else ())}
    report.add("Setup", f"commit {commit()}; versions {versions}; {torch.get_num_threads()} torch thread(s); "
               f"1-min load average at start {os.getloadavg()[0]:.1f}; seeds {args.first_seed}.."
               f"{args.first_seed + args.seeds - 1}; "
               f"subset {args.subset or 'none (all training samples)'}; peer budget {args.budget:.0f} CPU s; "
               f"stored precision {'float16 (both)' if args.half else 'float32 (both)'}")
    width = 2 if args.half else 4            # bytes per stored number, both sides
    configs = spec["configs"]
    if args.configs:
        configs = [config_named(c) for c in args.configs.split(",")]
    n, x, y = spec["n"], spec["x"], spec["y"]
    rows = np.arange(n) if not args.subset else np.sort(np.random.default_rng(0).choice(n, args.subset, False))
    k = min(100, len(rows) // 4)
    runs, summary, rule_note, dattri_rows = [], [], "", []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = spec["make"]()
        model.eval()
        log(f"{args.workload}: exact store")
        exact, cap_s = build(f"{tmp}/exact.mq", model, x, y, n, spec["layers"], spec["batch"])
        ex_all, ex_q = scores_of(exact, None)
        ex = ex_all[rows]
        layers = layer_names(exact)
        params = layer_params(exact.store, layers)
        gq = query_gradient(model, x[n:], y[n:], layers)
        if args.dattri:
            assert sum(params.values()) == sum(p.numel() for p in model.parameters()), "dattri scores every parameter"
            plain, secs = dattri_scores(model, x, y, n, None, 0)
            check = float(np.max(np.abs(plain[rows] - ex)) / np.max(np.abs(ex)))
            assert check < 1e-3, f"dattri's unprojected scores differ from MetaQL's exact ones: {check:.2e}"
            dattri_rows.append([spec["title"], "unprojected", "-", "-", "-", spearman(plain[rows], ex), "-", secs,
                                f"{check:.1e}"])
        runs.append([spec["title"], "exact", "-", stored_bytes(exact) / n / 1024, 1.0, 1.0, cap_s, ex_q,
                     "-", "-", "-", "-", "-", "-", "-"])
        if args.budget_rule:
            con, _ = build(f"{tmp}/budget.mq", model, x, y, n, spec["layers"], spec["batch"], storage="projected",
                           **SKETCHED)
            budget_bytes = stored_bytes(con) / n
            con.close()
            chosen, tried = largest_k_within(spec, model, tmp, budget_bytes)
            report.add("The budget rule (plain projected storage, largest proj_dim within the sketched store's bytes)",
                       table(["proj_dim", "bytes/sample", "within"], tried),
                       f"budget B = {budget_bytes:.1f} bytes per sample (k=256, sketch m=64); chosen proj_dim={chosen}")
            if chosen is not None and {"proj_dim": chosen} not in configs:
                configs = configs + [{"proj_dim": chosen}]
            rule_note = f"rule-chosen proj_dim={chosen} at B = {budget_bytes:.1f} bytes"
        for config in configs:
            ours, theirs, dat = [], [], []
            for s in range(args.first_seed, args.first_seed + args.seeds):
                log(f"{args.workload}: {config_label(config)} seed {s}")
                path = f"{tmp}/p{len(summary)}-{s}.mq"
                con, cap_s = build(path, model, x, y, n, spec["layers"], spec["batch"], storage="projected",
                                   proj_seed=s, **config, **({"dtype": "float16"} if args.half else {}))
                bound = max(m["error"] for m in [json_meta(con, l) for l in layer_names(con)] if m)
                sc, q_s = scores_of(con, float(f"{min(1.0, bound + 5e-4):.3f}"))
                nbytes = stored_bytes(con) / n
                con.close()
                _remove(path)
                sp, ov = spearman(sc[rows], ex), overlap(sc[rows], ex, k)
                ours.append(sp)
                proj_dim = int(nbytes // width)
                est = peer_estimate(params, proj_dim, len(rows))
                row = [spec["title"], config_label(config), s, nbytes / 1024, sp, ov, cap_s, q_s, proj_dim,
                       proj_dim * width / 1024]
                if est > args.budget:
                    runs.append(row + ["-", "-", f"not run: estimated {est:.0f} CPU s > {args.budget:.0f} "
                                       f"({sum(params.values()) * proj_dim / 1e9:.0f} G normal draws)", "-", "-"])
                    continue
                log(f"{args.workload}: TRAK proj_dim={proj_dim} seed {s} (estimated {est:.0f} CPU s)")
                psc, plain, t_grad, t_proj = trak_scores(exact.store, layers, rows, gq, proj_dim, s, args.half)
                check = float(np.max(np.abs(plain - ex)) / np.max(np.abs(ex)))
                assert check < 1e-3, f"unprojected peer scores differ from MetaQL's exact ones: {check:.2e}"
                tsp = spearman(psc, ex)
                theirs.append(tsp)
                runs.append(row + [tsp, overlap(psc, ex, k), t_grad, t_proj, f"{check:.1e}"])
                if args.dattri:
                    dsc, secs = dattri_scores(model, x, y, n, proj_dim, s)
                    dat.append(spearman(dsc[rows], ex))
                    dattri_rows.append([spec["title"], config_label(config), s, proj_dim, proj_dim * width / 1024, dat[-1],
                                        overlap(dsc[rows], ex, k), secs, "-"])
            best = max([np.mean(v) for v in (theirs, dat) if v], default=None)
            summary.append([spec["title"], config_label(config), f"{runs[-1][3]:.3f}", len(ours), _mean_sd(ours),
                            len(theirs), _mean_sd(theirs) if theirs else "-"] + ([_mean_sd(dat)] if args.dattri else [])
                           + [("met" if np.mean(ours) >= best else "NOT met") if best is not None else "peer not run"])
        exact.close()
    report.add("Every run", table(
        ["workload", "MetaQL store", "seed", "KiB/sample", "MetaQL Spearman", "top-k overlap", "capture s",
         "query s", "TRAK proj_dim", "TRAK KiB/sample", "TRAK Spearman", "TRAK top-k overlap", "TRAK gradients s",
         "TRAK projection s", "brute-force check"], runs),
        f"Spearman and top-k overlap (k = {k}) over {len(rows)} training samples against MetaQL's exact scores. "
        "TRAK gradients s: building the per-sample gradients from the exact store's factors; projection s: "
        "BasicProjector (its normal draws and matmuls). brute-force check: max |unprojected peer score - MetaQL "
        "exact| / max |exact|. Times: " + ("process CPU" if args.clock == "cpu" else "wall") + " seconds.")
    if args.dattri:
        report.add("dattri TracInAttributor (projected TracIn, its CPU projector, every parameter)", table(
            ["workload", "at MetaQL store", "seed", "proj_dim", "KiB/sample", "Spearman", "top-k overlap", "seconds",
             "brute-force check"], dattri_rows),
            "The same proj_dim and seed index as the TRAK row; seconds include its per-sample gradients (torch.func).")
    report.add("Summary (mean +- sd over seeds)", table(
        ["workload", "MetaQL store", "KiB/sample", "seeds", "MetaQL Spearman", "peer seeds", "TRAK Spearman"]
        + (["dattri Spearman"] if args.dattri else []) + ["target (MetaQL mean >= best peer mean)"], summary),
        (rule_note + "; " if rule_note else "") +
        f"1-min load average at the end {os.getloadavg()[0]:.1f}.")
    report.write()


def _mean_sd(v) -> str:
    return f"{np.mean(v):.3f} +- {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def _remove(path: str) -> None:
    """Removes a closed store's files (the catalog file, its shards: whatever starts with its path)."""
    import shutil
    folder, base = os.path.split(path)
    for p in os.listdir(folder):
        if p.startswith(base):
            full = os.path.join(folder, p)
            shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)


if __name__ == "__main__":
    main()
