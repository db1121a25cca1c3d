"""Checks diag_sketch_split.py's peer-in-distribution draw (Gram matrix) against real dense Gaussian
projections, on two layers of the MiniLM T=32 workload (head + layer 5's query), k = 100."""
import sys, tempfile, numpy as np, torch
sys.path.insert(0, __import__("os").path.dirname(__file__))
from metastore_common import set_threads
from bench_approx import build, spearman
from bench_approx_peers import layer_gradients, query_gradient, workload_spec
set_threads(1)
spec = workload_spec("minilm32"); n, x, y = spec["n"], spec["x"], spec["y"]
pick = ["head", "bert.encoder.layer.5.attention.self.query"]
with tempfile.TemporaryDirectory() as tmp:
    torch.manual_seed(0); model = spec["make"](); model.eval()
    exact, _ = build(f"{tmp}/exact.mq", model, x, y, n, pick, spec["batch"])
    gq = query_gradient(model, x[n:], y[n:], pick)
    G = torch.cat([layer_gradients(exact.store, l, np.arange(n)) for l in pick], 1).double()
    q = torch.cat([gq[l] for l in pick]).double()
ex = (G @ q).numpy()
k, draws = 100, 300
A = torch.cat([G, q[None]], 0)
gram = A @ A.T
ev, vec = torch.linalg.eigh(gram); L = vec * ev.clamp(min=0).sqrt()
gen = torch.Generator().manual_seed(7)
real, sim = [], []
for _ in range(draws):
    R = torch.randn(G.shape[1], k, generator=gen, dtype=torch.float64)
    z = A @ R
    real.append(spearman((z[:n] @ z[n] / k).numpy(), ex))
    z = L @ torch.randn(n + 1, k, generator=gen, dtype=torch.float64)
    sim.append(spearman((z[:n] @ z[n] / k).numpy(), ex))
for nm, v in (("real dense Gaussian", real), ("Gram draw", sim)):
    print(f"{nm}: {draws} draws, mean {np.mean(v):.4f} sd {np.std(v, ddof=1):.4f} se {np.std(v, ddof=1)/np.sqrt(draws):.4f} "
          f"quantiles 5/50/95% {np.quantile(v, [0.05, 0.5, 0.95]).round(4).tolist()}", flush=True)
from scipy.stats import ks_2samp
print("two-sample KS p-value", ks_2samp(real, sim).pvalue)
