"""A sketch of the query side on exact factors: the query's average gradient truncated to its
leading singular directions, with a deterministic bound.

For a layer stored exactly, Gbar (dout x din') = U S V^T; keeping the r leading terms,
    <g_i, Gbar> = <g_i, Gbar_r> + <g_i, R>,   |<g_i, R>| <= ||g_i||_F ||R||_F <= ||X_i||_F ||D_i||_F ||R||_F
(||D^T X||_F <= ||D||_F ||X||_F; the bias column counts in X), and r is the smallest with
||R||_F <= tol ||Gbar||_F. A training sample then costs S r (din + dout) instead of S din dout
(batch_average). Summed over layers, sum_l ||g_il|| ||R_l|| <= tol ||g_i|| ||Gbar||: the relative
error is at most tol, deterministically. Used only under error=, by approximate execution
(approx/execute.py: sketch_pays weighs its estimate, `estimate` and `truncation_estimate` below,
against the exact strategy's); the optimizer never picks it: it is registered without a storage
mode, so EXPLAIN lists no estimate of it before the run, EXPLAIN ANALYZE its estimate and time."""
from __future__ import annotations

import torch

from metaql.engine.strategies import ScanStrategy, register

DENSE_KINDS = ("linear", "hf_conv1d")     # rows that are the layer's own tensors (no unfolding)


class LowRankQuery(ScanStrategy):
    name, stored, baseline, needs = "lowrank_query", (), True, frozenset({"gbar"})
    approximate = True

    def applies_to(self, kind) -> bool:
        return kind.kind in DENSE_KINDS

    def extra_numbers(self, meta, tensors, q, per_sample):
        return per_sample * 2

    def scores(self, kind, meta, chunk, q):
        return self.scores_and_norms(kind, meta, chunk, q)[0]

    def scores_and_norms(self, kind, meta, chunk, q) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, ||X_i||_F ||D_i||_F: a bound on each ||g_i||_F, the bias column counted in X)."""
        left, right = truncated(q, meta)
        x, d = kind.rows(meta, chunk)
        xr = x @ right[:meta.din]
        if meta.bias:
            xr += right[meta.din]
        xs = x.pow(2).sum(dim=(1, 2)) + (x.shape[1] if meta.bias else 0)
        return (d @ left).mul_(xr).sum(dim=(1, 2)), (xs * d.pow(2).sum(dim=(1, 2))).sqrt()


# the truncation's float64 eigenproblem with its vectors, per m^3, in the cost model's flops (its
# constants time a float32 matrix product): LAPACK's syevd at m = 385 and 769 took 87 and 49 of
# them on the 2-core development machine (tridiagonal reduction, vectors, float64)
EIGH_FLOPS_PER_M3 = 60


def estimate(sh, rank: int) -> dict[str, float]:
    """{flops, bytes} of scoring N training samples (engine.cost.Shapes) by the sketch of `rank`
    (the truncation apart: truncation_estimate): per row X right (din r), D left (dout r), their
    products summed (r) and the two squared norms (din + dout); the rows read, their squares
    written and read back, the (S, r) products written and read back."""
    from metaql.engine.strategies import BYTES_PER_NUMBER
    rows = sh.n * sh.s
    return {"flops": rows * (rank + 1) * (sh.din + sh.dout + 1),
            "bytes": rows * (3 * (sh.din + sh.dout) + 3 * 2 * rank) * BYTES_PER_NUMBER}


def truncation_estimate(sh) -> dict[str, float]:
    """{flops, bytes} of the truncation, once per query side: Gbar's smaller Gram matrix in float64
    (din dout m, m = min(din, dout), counted twice) and its eigenproblem."""
    m = min(sh.din, sh.dout)
    return {"flops": 2 * sh.din * sh.dout * m + EIGH_FLOPS_PER_M3 * m ** 3, "bytes": 8 * (sh.din * sh.dout + m * m)}


def truncated(q: dict, meta) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with Gbar_r = left right^T at the query side's tolerance, computed once per
    query side, by the eigenvectors of the smaller Gram matrix of Gbar (a symmetric eigenproblem
    of min(din, dout)^2, far cheaper than the SVD of Gbar)."""
    if "lowrank" not in q:
        gbar = q["gbar"].double()
        tall = gbar.shape[0] >= gbar.shape[1]                    # dout >= din': V from Gbar^T Gbar
        evals, vecs = torch.linalg.eigh(gbar.T @ gbar if tall else gbar @ gbar.T)
        evals, vecs = evals.flip(0).clamp_min(0), vecs.flip(1)   # descending: s_l^2 and their vectors
        tail = torch.cumsum(evals.flip(0), 0).flip(0)            # tail[j] = sum_{l >= j} s_l^2
        allowed = (q["tolerance"] ** 2) * float(evals.sum())
        r = max(int((tail > allowed).sum()), 1)                  # the residual of rank r is tail[r]
        v = vecs[:, :r]
        left, right = (gbar @ v, v) if tall else (v, gbar.T @ v)
        q["lowrank"] = (left.float().contiguous(), right.float().contiguous())
        q["residual"] = float(tail[r].sqrt()) if r < len(evals) else 0.0
        q["rank"] = r
    return q["lowrank"]


STRATEGY = register(LowRankQuery())
