"""Physical operators: the strategies, built from a layer kind's canonical-form primitives.

For samples i, j of one layer with rows (X, D): grad_i = D_i^T X_i, and
    <grad_i, grad_j> = sum((D_i D_j^T) * (X_i X_j^T))          (factored, no restore)
    <grad_i, Gbar>   = sum(D_i * (X_i Gbar^T))                  (Lemma 7, batch average)
Every function is batched over the training samples of one chunk of stored factors; q holds the
query side.
"""
from __future__ import annotations

import math

import torch

from metaql.storage.layers import conv


def iterate(kind, meta, chunk, q) -> torch.Tensor:
    """Mean over the query samples of <grad_n, grad_q>, from Gram products of rows only."""
    gx = kind.gram_x_factors(meta, chunk, q["x_rows"])
    gd = kind.gram_d(meta, kind.d_rows(meta, chunk), q["d_rows"])
    return gx.mul_(gd).sum(dim=(1, 2)) / q["count"]      # gx is always a fresh product


def batch_average(kind, meta, chunk, q) -> torch.Tensor:
    return kind.average_scores(meta, chunk, q["gbar"])


def reconstruct(kind, meta, chunk, q) -> torch.Tensor:
    """Builds each training gradient, then one inner product with Gbar (the paper's baseline)."""
    gbar = q["gbar"].reshape(-1)
    return torch.cat([gradients(kind, meta, part).flatten(1) @ gbar for part in gradient_blocks(meta, chunk)])


# Gradients built at once by the reconstruct strategies (4 MiB): a block is built and multiplied
# while in cache, and the allocator hands the same memory back for the next one, where one buffer
# for a whole chunk (37 MB on digits conv2) is fresh memory whose first-touch page faults cost as
# much as the weight-gradient kernel itself (profiled at load 9: 61 ms of copies against 52 ms)
GRADIENT_BLOCK_NUMBERS = 1 << 20


def gradient_blocks(meta, chunk: dict):
    """The chunk cut into blocks of samples whose gradients hold GRADIENT_BLOCK_NUMBERS (one empty
    block for an empty chunk)."""
    n = next(iter(chunk.values())).shape[0]
    step = max(1, GRADIENT_BLOCK_NUMBERS // max(1, meta.params))
    for i in range(0, max(n, 1), step):
        yield {k: v[i:i + step] for k, v in chunk.items()}


def gradients(kind, meta, factors) -> torch.Tensor:
    """Each sample's gradient (N, dout, din [+1]): a convolution's by its weight-gradient kernel
    (storage.layers.conv.sample_gradients), any other kind's as the outer product of its rows."""
    if type(kind) is conv.Conv:         # exact type: a subclass may change the rows
        g = conv.sample_gradients(meta, factors)
        if g is not None:
            return g
    x, d = kind.rows(meta, factors)
    return kind.outer(meta, x, d)


def full_dot(g: torch.Tensor, q) -> torch.Tensor:
    """Stored full gradients (N, params) against the query side's flattened average gradient."""
    return g.float() @ q["gbar_flat"]


def squared_norm(kind, meta, chunk, form: str | None = None) -> torch.Tensor:
    """||grad_n||^2 of each sample of the chunk. form 'gram': sum((D_n D_n^T) * (X_n X_n^T)), cost
    S^2 (din + dout), no gradient built; 'full': each gradient D_n^T X_n built a few samples at a
    time (as `kind.full` builds it), cost S din dout; None: the cheaper for these shapes."""
    din = meta.din + int(bool(meta.bias))
    params = din * meta.dout
    if form is None:
        s = kind.positions(meta, chunk)
        form = "full" if s * params < s * s * (din + meta.dout) else "gram"
    if form == "full":
        norms = kind.full_squared_norms(meta, chunk)
        if norms is not None:
            return norms
    x, d = kind.rows(meta, chunk)
    if form == "gram":
        return (kind.self_gram_x(meta, x) * kind.self_gram_d(meta, d)).sum(dim=(1, 2))
    step = max(1, FULL_NORM_NUMBERS // max(1, params))
    return torch.cat([kind.outer(meta, x[i:i + step], d[i:i + step]).reshape(len(x[i:i + step]), -1)
                      .pow(2).sum(1) for i in range(0, len(x), step)])


# the gradients the 'full' form of squared_norm builds at once: 64 MiB of float32
FULL_NORM_NUMBERS = 1 << 24


FACTORED = {"iterate": iterate, "batch_average": batch_average, "reconstruct": reconstruct}


def query_side(kind, meta, factors: dict[str, torch.Tensor], needs=None, norm: bool = True) -> dict:
    """What the chosen strategies need of the query samples of one layer, computed once: `needs`
    holds "rows" (iterate) and/or "gbar" (the average gradient Gbar; also made for its norm,
    cosine), None everything (engine.strategies.needs_of turns strategy names into needs)."""
    count = next(iter(factors.values())).shape[0]
    if not kind.factored:
        g = kind.full(meta, factors)
        return {"count": count, "gbar_flat": g.mean(0)}
    side: dict = {"count": count}
    if needs is None or norm or "gbar" in needs:
        gbar = kind.average_of(meta, factors)
        side.update(gbar=gbar, gbar_flat=gbar.reshape(-1))
    if needs is None or "rows" in needs:
        x, d = kind.rows(meta, factors)
        side.update(x_rows=kind.flat_rows(meta, x), d_rows=kind.flat_rows(meta, d))
    return side


# ---- the train x query matrix: (N, B) scores, one column per query sample ------------------------
# Every function takes the query side of `pairwise_query_side`, possibly cut to a group of query
# samples (`query_group`), and scores one chunk of training samples against all of them at once.

def pairwise_iterate(kind, meta, chunk, q) -> torch.Tensor:
    """<grad_n, grad_j> for every query sample j: iterate's Gram products of rows, summed over each
    query sample's own rows instead of over all of them."""
    gx = kind.gram_x_factors(meta, chunk, q["x_rows"])                 # (N, S, B*Sq)
    gd = kind.gram_d(meta, kind.d_rows(meta, chunk), q["d_rows"])
    return gx.mul_(gd).sum(dim=1).reshape(gx.shape[0], q["count"], -1).sum(dim=2)


def pairwise_gradient(kind, meta, chunk, q) -> torch.Tensor:
    """Lemma 7 against each query sample's own gradient G_j, all at once: one product of the
    training rows with the B gradients side by side, <grad_n, G_j> = sum(D_n * (X_n G_j^T))."""
    special = _special_pairwise_gradient(kind)
    if special is not None:
        return special(kind, meta, chunk, q)
    x, d = kind.rows(meta, chunk)
    return _dense_pairwise_gradient(meta, x, d, q["grads"])


def _dense_pairwise_gradient(meta, x, d, grads) -> torch.Tensor:
    n, s = x.shape[:2]
    b, dout = grads.shape[:2]
    weight = grads[:, :, :meta.din].reshape(b * dout, meta.din).T            # (din, B*dout)
    rows = x.reshape(-1, meta.din)
    y = torch.addmm(grads[:, :, meta.din].reshape(-1), rows, weight) if meta.bias else rows @ weight
    return y.view(n, s, b, dout).mul_(d.unsqueeze(2)).sum(dim=(1, 3))


def _conv_pairwise_gradient(kind, meta, chunk, q) -> torch.Tensor:
    """One convolution of the stored input with all B query gradients as its filters (B*Cout
    output channels), then <D_n, .> per query: no patches unfolded on the training side."""
    inp, dout = chunk["I"].float(), chunk["DO"].float()
    if not conv._plain(meta, inp):
        x, d = kind.rows(meta, chunk)
        return _dense_pairwise_gradient(meta, x, d, q["grads"])
    grads = q["grads"]
    b, cout = grads.shape[:2]
    inp, padding = conv._conv_input(meta, inp)
    scores = conv.dense_scores(meta, inp, dout, grads, padding, grads)
    if scores is not None:
        return scores
    # contiguous once: the gradients sliced from their bias column would be copied by every block
    weight = grads[:, :, :meta.din].reshape(b * cout, inp.shape[1], *meta.extra["kernel"]).contiguous()
    bias = grads[:, :, meta.din].reshape(-1) if meta.bias else None
    return torch.cat([_conv_block_scores(meta, inp[i:j], dout[i:j], weight, bias, padding, b)
                      for i, j in conv.sample_blocks(inp.shape[0], b * math.prod(dout.shape[1:]))])


def _conv_block_scores(meta, inp, dout, weight, bias, padding, b: int) -> torch.Tensor:
    """(n, B) <D_n, conv(I_n, G_j)> of one block of samples (its output stays in cache)."""
    n, cout = inp.shape[0], dout.shape[1]
    y = conv._conv(meta, inp, weight, bias, padding)
    return y.reshape(n, b, cout, -1).mul_(dout.reshape(n, 1, cout, -1)).sum(dim=(2, 3))


def _embedding_pairwise_gradient(kind, meta, chunk, q) -> torch.Tensor:
    """The one-hot rows are row gathers: <grad_n, G_j> = sum_s <x_ns, G_j[id_ns]>."""
    x, ids = kind.rows(meta, chunk)
    n, s, dim = x.shape
    picked = q["grads"][:, ids.reshape(-1)]                                  # (B, N*S, dim)
    return torch.einsum("bmd,md->bm", picked, x.reshape(-1, dim)).reshape(-1, n, s).sum(2).T


def _special_pairwise_gradient(kind):
    """The kind's own form of pairwise_gradient (exact type: a subclass may change the rows)."""
    from metaql.storage.layers.embedding import Embedding
    return {conv.Conv: _conv_pairwise_gradient, Embedding: _embedding_pairwise_gradient}.get(type(kind))


def has_pairwise_gradient(kind) -> bool:
    """True when `pairwise_gradient` is exact for the kind: MetaQL's conv and embedding kinds, or a
    kind whose rows are dense (it keeps LayerKind's Lemma 7 and outer product)."""
    from metaql.storage.layers.base import LayerKind
    if _special_pairwise_gradient(kind) is not None:
        return True
    return kind.factored and all(getattr(type(kind), m) is getattr(LayerKind, m)
                                 for m in ("apply_average", "average_scores", "outer", "average_of"))


def pairwise_reconstruct(kind, meta, chunk, q) -> torch.Tensor:
    """Builds each training gradient, then one product with every query gradient (the fallback for
    a kind without a factored pairwise product)."""
    return torch.cat([gradients(kind, meta, part).flatten(1) @ q["flat"] for part in gradient_blocks(meta, chunk)])


def pairwise_full(g: torch.Tensor, q) -> torch.Tensor:
    """Stored full gradients (N, params) against every query sample's gradient (params, B)."""
    return g.float() @ q["flat"]


def pairwise_query_side(kind, meta, factors: dict[str, torch.Tensor], needs: set, norms: bool) -> dict:
    """What the matrix strategies in `needs` take of the B query samples of one layer, each sample
    kept apart: "rows" (their X and D rows, sample by sample), "grads" (each one's gradient,
    (B, dout, din [+1])), "flat" (the gradients as columns, (params, B)); with `norms`, each
    sample's squared gradient norm (cosine)."""
    count = next(iter(factors.values())).shape[0]
    side: dict = {"count": count}
    if not kind.factored:
        g = kind.full(meta, factors)
        side["flat"] = g.T.contiguous()
        if norms:
            side["norms"] = (g.double() ** 2).sum(1)
        return side
    if "rows" in needs:
        x, d = kind.rows(meta, factors)
        side.update(x_rows=kind.flat_rows(meta, x), d_rows=kind.flat_rows(meta, d), sq=x.shape[1])
    if "grads" in needs or "flat" in needs:
        grads = gradients(kind, meta, factors)
        if "grads" in needs:
            side["grads"] = grads
        if "flat" in needs:
            side["flat"] = grads.reshape(count, -1).T.contiguous()
    if norms:
        side["norms"] = squared_norm(kind, meta, factors).double()
    return side


def query_group(q: dict, lo: int, hi: int) -> dict:
    """The query side of samples lo..hi-1 only (so one chunk's intermediates stay bounded); all of
    them: q itself, whose tensors are the keys of the matrices storage/layers/conv.py makes of the
    query rows once per scan (a fresh slice each chunk rebuilt conv13's dense tap matrix every
    time: 0.7 of a 1 ms warm each_iterate scan of one training sample)."""
    if lo == 0 and hi == q["count"]:
        return q
    out = {"count": hi - lo}
    if "x_rows" in q:
        sq = q["sq"]
        out.update(x_rows=q["x_rows"][lo * sq:hi * sq], d_rows=q["d_rows"][lo * sq:hi * sq], sq=sq)
    if "grads" in q:
        out["grads"] = q["grads"][lo:hi]
    if "flat" in q:
        out["flat"] = q["flat"][:, lo:hi]
    return out
