"""The cost model against measurement, one line per (model, layer, strategy, N, B): measured seconds,
the estimate (this store's constants after PRAGMA metaql_calibrate) and measured / estimate.

A fast loop for issue #23 (every estimate within 2x): the stores are captured smaller than in
bench_engine.py and the scans are timed the same way (bench_engine.unit_scan and query_prep: the
engine's chunking and operators on the memory-mapped shards, plus the query side each strategy
builds once). Calibration and measurement run in the same process, so the machine's load mostly
cancels out of the ratio.

    python benchmarks/cost_ratios.py                      # VGG16 + MLP-4096, small stores
    python benchmarks/cost_ratios.py --models vgg --vgg-n 300
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

import bench_engine as be
from metastore_common import VGG16, WideMLP, cifar_like, log, set_clock, set_threads

STRATS = ("iterate", "batch_average", "reconstruct")


def ratios(wl, unit, grid, cap_s) -> list[tuple]:
    """(unit, strategy, N, B, measured s, estimate s, ratio) over the (N, B) grid."""
    out = []
    from metaql.engine import cost
    fits = wl.store.cost_constants(cost.measure_constants).get("layers", {})
    for layer in wl.units[unit]:
        for name, f in fits.get(layer, {}).items():
            print(f"  fit {layer} {name}: " + ", ".join(f"{k}={v:.3g}" if not isinstance(v, list) else f"{k}={v}" for k, v in f.items()))
    for n, b in grid:
        est = be.estimated(wl, unit, n, b)
        for strat in STRATS:
            # as bench_engine times it: the real chunks, extrapolated after the time cap
            m = sum(be.unit_scan(wl, unit, strat, b, n, cap_s, 2, layers=[l])[0]
                    + be.query_prep(wl, l, b)[strat] for l in wl.units[unit])
            out.append((unit, strat, n, b, m, est[strat], m / est[strat]))
            print(f"{wl.name:9s} {unit:7s} {strat:14s} N={out[-1][2]:5d} B={b:4d} measured {m:9.4g} s  "
                  f"estimate {out[-1][5]:9.4g} s  ratio {out[-1][6]:6.2f}", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vgg,mlp", help="comma list of vgg, mlp, minilm")
    ap.add_argument("--vgg-n", type=int, default=300)
    ap.add_argument("--mlp-n", type=int, default=1024)
    ap.add_argument("--units", default="", help="comma list of units (default: all of the model)")
    ap.add_argument("--b", default="1,16,64", help="query batch sizes")
    ap.add_argument("--cap", type=float, default=1.0, help="time cap per scan (s), then extrapolate")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                    help="measure the process's CPU time (default; calibration's clock at one thread) or wall time")
    args = ap.parse_args(argv)
    set_threads(1)
    set_clock(args.clock)
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory(prefix="cost-ratios-")
    bs = [int(v) for v in args.b.split(",")]
    models = args.models.split(",")
    wanted = set(args.units.split(",")) - {""}
    rows = []
    print(f"load {os.getloadavg()[0]:.1f}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"clock {args.clock}")
    if "vgg" in models:
        x, y = cifar_like(args.vgg_n + max(bs))
        wl = be.build("VGG16", f"{tmp.name}/vgg.mq", VGG16(), x, y, args.vgg_n, 100,
                      {u: [u] for u in ("conv1", "conv7", "conv13", "fc1", "fc3")}, 64, storage={"conv1": "factored"})
        for unit in wl.units:
            if not wanted or unit in wanted:
                rows += ratios(wl, unit, [(args.vgg_n, b) for b in bs], args.cap)
    if "minilm" in models:
        from metastore_common import MINILM_BLOCKS, load_minilm, sal_layers, token_sequences
        n = 128
        ids, y = token_sequences(n + max(bs), 32)
        units = {f"SAL{b}": sal_layers(b) for b in MINILM_BLOCKS}
        units["head"] = ["head"]
        wl = be.build("MiniLM", f"{tmp.name}/minilm.mq", load_minilm(), ids, y, n, 32, units, 16)
        for unit in wl.units:
            if not wanted or unit in wanted:
                rows += ratios(wl, unit, [(n, b) for b in bs], args.cap)
    if "mlp" in models:
        g = torch.Generator().manual_seed(1)
        xm = torch.randn(args.mlp_n + max(bs), 256, generator=g)
        ym = torch.randint(0, 10, (len(xm),), generator=g)
        wl = be.build("MLP-4096", f"{tmp.name}/mlp.mq", WideMLP(), xm, ym, args.mlp_n, 256, {"big": ["big"]}, 64)
        rows += ratios(wl, "big", [(args.mlp_n, b) for b in bs], args.cap)
    r = np.array([row[6] for row in rows])
    inside = int(((r >= 0.5) & (r <= 2)).sum())
    print(f"within 2x: {inside} of {len(r)}; ratio min {r.min():.2f} max {r.max():.2f}; "
          f"load {os.getloadavg()[0]:.1f}")
    log("done")
    tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
