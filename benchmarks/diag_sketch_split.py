"""Diagnosis of sketch_budget's split among layers (issue #23, MiniLM T=32 at c2500).

The workload of bench_approx_peers.py (the same model, data, exact store, query batch and layers).
Per layer l: E||g_l||^2 (over the first capture batch, which the capture's allocation uses, and
over every training sample), ||Gq_l||^2 (the query batch's mean gradient, torch autograd), the
first batch's mean gradient ||mean_i g_il||^2, and the count sketch's expected score variance.

Then, for several splits of the same M numbers per sample, MetaQL's count-sketched scores are
computed exactly as a captured store would give them, without capturing: a layer's sketched score
<S g_i, S Gq> = g_i . (S^T S Gq), with S from metaql.approx.projection.count_sketch at the
layer's seed (layer_seed(seed, layer)), so seed s here equals proj_seed=s of a capture with the
same per-layer m (checked: the energy split reproduces the bench's 0.967 / 0.907 at seeds 0 / 1).
Spearman against the exact scores, per seed.

`--bits 8` (or 4): each sample's sketch rounded as such a store rounds it (storage/quantize.py: its
codes and its scale; one generator for every sample of a layer instead of one per shard: the same
distribution).

    python benchmarks/diag_sketch_split.py [--workload minilm32] [--budget 2500] [--seeds 0-19] [--bits 8]
"""
from __future__ import annotations

import argparse
import math
import tempfile

import numpy as np
import torch

from metastore_common import set_threads
from bench_approx import build, layer_names, scores_of, spearman
from bench_approx_peers import layer_gradients, query_gradient, workload_spec
from metaql.approx.projection import count_sketch, layer_seed
from metaql.storage.quantize import decoded, encoded


def split(weights: dict[str, float], budget: int, floor: int = 2) -> dict[str, int]:
    """approx/capture.py's allocate rounding: floor each, the rest in proportion, largest remainders."""
    total = sum(weights.values())
    share = {l: (budget - floor * len(weights)) * (w / total) for l, w in weights.items()}
    dims = {l: floor + int(v) for l, v in share.items()}
    for l in sorted(share, key=lambda l: int(share[l]) - share[l])[:budget - sum(dims.values())]:
        dims[l] += 1
    return dims


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="minilm32")
    ap.add_argument("--budget", type=int, default=2500)
    ap.add_argument("--seeds", default="0-19")
    ap.add_argument("--first-batch", type=int, default=None, help="samples of the allocation's batch (spec batch)")
    ap.add_argument("--splits", default="all", help="comma-separated split names' first words, or 'all'")
    ap.add_argument("--trak-seeds", type=int, default=0, help="draws of the peer in distribution (Gram matrix)")
    ap.add_argument("--trak-dims", default="", help="comma-separated proj_dims of the simulated peer")
    ap.add_argument("--bits", type=int, default=None, help="sketches rounded to this many bits (8), as stored")
    args = ap.parse_args(argv)
    set_threads(1)
    a, b = (int(v) for v in args.seeds.split("-"))
    seeds = list(range(a, b + 1))
    spec = workload_spec(args.workload)
    n, x, y = spec["n"], spec["x"], spec["y"]
    fb = args.first_batch or spec["batch"]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = spec["make"]()
        model.eval()
        exact, _ = build(f"{tmp}/exact.mq", model, x, y, n, spec["layers"], spec["batch"])
        ex, _ = scores_of(exact, None)
        layers = layer_names(exact)
        gq = query_gradient(model, x[n:], y[n:], layers)
        rows = np.arange(n)
        stats = {}
        plain = np.zeros(n)
        gram = torch.zeros(n + 1, n + 1, dtype=torch.float64)    # [g_1 .. g_n, Gq] over every layer
        for l in layers:
            G = layer_gradients(exact.store, l, rows).double()
            q = gq[l].double()
            sq = G.pow(2).sum(1)                       # ||g_il||^2
            dots = G @ q
            plain += dots.numpy()
            qq = float(q @ q)
            gq_all = torch.cat([G, q[None]], 0)
            gram += gq_all @ gq_all.T
            del gq_all
            c = (G.pow(2) @ q.pow(2))                  # sum_j g_ij^2 q_j^2
            mean_fb = G[:fb].mean(0)
            mean_all = G.mean(0)
            # U-statistic estimate of ||mu||^2 from the first batch: mean over i != j of <g_i, g_j>
            u_fb = float((fb * fb * mean_fb.pow(2).sum() - sq[:fb].sum()) / (fb * (fb - 1)))
            stats[l] = dict(width=G.shape[1], e_fb=float(sq[:fb].mean()), e_all=float(sq.mean()), qq=qq,
                            mean_fb=float(mean_fb.pow(2).sum()), mean_all=float(mean_all.pow(2).sum()), u_fb=u_fb,
                            A=float((sq * qq).mean()), B=float(dots.pow(2).mean()), C=float(c.mean()))
            del G
        check = float(np.max(np.abs(plain - ex)) / np.max(np.abs(ex)))
        print(f"brute-force check (sum_l <g_l, Gq_l> vs MetaQL exact): {check:.1e}", flush=True)
        M = args.budget
        splits = {
            "energy (today: E_fb||g||^2)": {l: s["e_fb"] for l, s in stats.items()},
            "oracle sqrt(E_all||g||^2)||Gq||": {l: math.sqrt(s["e_all"] * s["qq"]) for l, s in stats.items()},
            "oracle-fb sqrt(E_fb||g||^2)||Gq||": {l: math.sqrt(s["e_fb"] * s["qq"]) for l, s in stats.items()},
            "mean sqrt(E_fb||g||^2)||mean_fb g||": {l: math.sqrt(s["e_fb"] * s["mean_fb"]) for l, s in stats.items()},
            "uniform": {l: 1.0 for l in stats},
        }
        dims = {name: split(w, M) for name, w in splits.items()}
        # the split of commit 1a39753 (bench run of approx_peers_count_minilm32.md): at least one number each
        dims["energy, floor 1 (commit 1a39753)"] = split(splits["energy (today: E_fb||g||^2)"], M, floor=1)
        if args.splits != "all":
            keep = args.splits.split(",")
            dims = {nm: d for nm, d in dims.items() if nm.split()[0].rstrip(",") in keep}
        for name, d in dims.items():
            var = sum((stats[l]["A"] + stats[l]["B"] - 2 * stats[l]["C"]) / d[l] for l in stats)
            print(f"split {name}: expected mean score variance {var:.4e}", flush=True)
        e_tot = sum(s["e_all"] for s in stats.values())
        q_tot = sum(s["qq"] for s in stats.values())
        b_tot = float(np.mean(plain ** 2))
        k_trak = int(args.trak_dims.split(",")[0]) if args.trak_dims else int(M * 4 * 1.052 // 4)
        print(f"TRAK (dense Gaussian, k~{k_trak}) expected mean variance {(e_tot * q_tot + b_tot) / k_trak:.4e}; "
              f"score spread (var of exact scores) {np.var(ex):.4e}", flush=True)
        print("\n| layer | width | E_fb ||g||^2 | E_all ||g||^2 | ||Gq||^2 | ||mean_fb g||^2 | U ||mu||^2 | "
              + " | ".join(f"m {name.split()[0]}" for name in dims) + " |")
        print("|---" * (7 + len(dims)) + "|")
        for l, s in stats.items():
            short = l.replace("bert.encoder.layer.", "L").replace("attention.", "att.")
            print(f"| {short} | {s['width']} | {s['e_fb']:.3e} | {s['e_all']:.3e} | {s['qq']:.3e} | "
                  f"{s['mean_fb']:.3e} | {s['u_fb']:.3e} | " + " | ".join(str(dims[nm][l]) for nm in dims) + " |")
        # second pass: sketched scores for every split and seed, one layer's gradients at a time
        est = {(nm, s): np.zeros(n) for nm in dims for s in seeds}
        for l in layers:
            G = layer_gradients(exact.store, l, rows)
            q = gq[l]
            for nm, d in dims.items():
                m = d[l]
                for s in seeds:
                    if m >= G.shape[1]:
                        est[(nm, s)] += (G @ q).double().numpy()
                        continue
                    buckets, signs = count_sketch(layer_seed(s, l), m, G.shape[1])
                    sqk = torch.zeros(m).index_add_(0, buckets, q * signs)
                    if args.bits:
                        sk = torch.zeros(n, m).index_add_(1, buckets, G * signs)
                        sk = decoded(encoded({"G": sk}, args.bits, layer_seed(s, l), [0]))["G"]
                        est[(nm, s)] += (sk @ sqk).double().numpy()
                        continue
                    w = signs * sqk[buckets]
                    est[(nm, s)] += (G @ w).double().numpy()
            del G
        exact.close()
    trak = {}
    if args.trak_seeds:
        # TRAK's scores <R g_i, R Gq> / k with R dense Gaussian (k x P; per-layer blocks summed are the
        # same in distribution): each row r of R gives (r.g_1, .., r.g_n, r.Gq) ~ N(0, gram), so a draw
        # is L eps with gram = L L^T (eigen factor, the rank-deficient part clipped at 0)
        ev, vec = torch.linalg.eigh(gram)
        L = vec * ev.clamp(min=0).sqrt()
        gen = torch.Generator().manual_seed(12345)
        for k in [int(v) for v in args.trak_dims.split(",") if v]:
            sp = []
            for _ in range(args.trak_seeds):
                z = L @ torch.randn(n + 1, k, generator=gen, dtype=torch.float64)
                sp.append(spearman((z[:n] @ z[n] / k).numpy(), ex))
            trak[k] = sp
            print(f"simulated peer k={k}: {args.trak_seeds} draws, Spearman mean {np.mean(sp):.4f} sd "
                  f"{np.std(sp, ddof=1):.4f} (se {np.std(sp, ddof=1) / math.sqrt(len(sp)):.4f}), "
                  f"quantiles 5/50/95% {np.quantile(sp, [0.05, 0.5, 0.95]).round(3).tolist()}", flush=True)
    cols = ["spread"] if len(seeds) > 24 else [f"seed {s}" for s in seeds]
    print("\n| split | " + " | ".join(cols) + " | mean | sd | mean seeds 0-1 |")
    print("|---" * (len(cols) + 4) + "|")
    for nm in dims:
        sp = [spearman(est[(nm, s)], ex) for s in seeds]
        head = [v for s, v in zip(seeds, sp) if s in (0, 1)]
        if len(seeds) > 24:
            print(f"| {nm} | {len(seeds)} seeds, quantiles 5/50/95% {np.quantile(sp, [0.05, 0.5, 0.95]).round(3).tolist()}"
                  f" | {np.mean(sp):.4f} | {np.std(sp, ddof=1):.4f} (se {np.std(sp, ddof=1) / math.sqrt(len(sp)):.4f}) | "
                  + (f"{np.mean(head):.3f}" if head else "-") + " |", flush=True)
            continue
        print(f"| {nm} | " + " | ".join(f"{v:.3f}" for v in sp) + f" | {np.mean(sp):.3f} | {np.std(sp, ddof=1):.3f} | "
              + (f"{np.mean(head):.3f}" if head else "-") + " |", flush=True)


if __name__ == "__main__":
    main()
