"""Checks diag_sketch_split.py's count-sketch scores against real captures (MiniLM T=32, c2500, proj_seed 0 and 1):
the allocation read from the layer meta, the scores (largest relative difference), both Spearmans."""
import sys, tempfile, numpy as np, torch
sys.path.insert(0, __import__("os").path.dirname(__file__))
from metastore_common import set_threads
from bench_approx import build, layer_names, scores_of, spearman, json_meta
from bench_approx_peers import layer_gradients, query_gradient, workload_spec
from metaql.approx.projection import count_sketch
set_threads(1)
spec = workload_spec("minilm32"); n, x, y = spec["n"], spec["x"], spec["y"]
with tempfile.TemporaryDirectory() as tmp:
    torch.manual_seed(0); model = spec["make"](); model.eval()
    exact, _ = build(f"{tmp}/exact.mq", model, x, y, n, spec["layers"], spec["batch"])
    ex, _ = scores_of(exact, None)
    layers = layer_names(exact)
    gq = query_gradient(model, x[n:], y[n:], layers)
    for s in (0, 1):
        con, _ = build(f"{tmp}/p{s}.mq", model, x, y, n, spec["layers"], spec["batch"], storage="projected", proj_seed=s, sketch_budget=2500, sketch_dist="count")
        metas = {l: json_meta(con, l) for l in layer_names(con)}
        bound = max(m["error"] for m in metas.values() if m)
        sc, _ = scores_of(con, float(f"{min(1.0, bound + 5e-4):.3f}"))
        print("seed", s, "real spearman", spearman(sc, ex), "bound", bound, flush=True)
        print({l.replace("bert.encoder.layer.", "L"): (m or {}).get("sketch") for l, m in metas.items()}, flush=True)
        print("example meta", list(metas.items())[0], flush=True)
        est = np.zeros(n)
        for l in layers:
            G = layer_gradients(exact.store, l, np.arange(n)); q = gq[l]
            m = metas[l]["sketch"]
            b, sg = count_sketch(metas[l]["seed"], m, G.shape[1])
            w = sg * torch.zeros(m).index_add_(0, b, q * sg)[b]
            est += (G @ w).double().numpy()
        print("seed", s, "sim spearman", spearman(est, ex), "max rel diff sim-real", float(np.max(np.abs(est - sc)) / np.max(np.abs(sc))), flush=True)
        con.close()
