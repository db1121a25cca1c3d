"""Weighted K-means on gradients that are never built (MCO, Eq. 9-10 of papers/003).

Works on any object with `sq_norms()`, `centroids(U)` (the k averages of the gradients weighted
by the columns of U (N, k)) and `scores(C)` (((N, k) <G_j, C_c>, (k,) ||C_c||^2)):
FactoredGradients computes them from stored factors, each a single pass whatever k is; the tests
pass explicitly built gradient matrices through the same algorithm.

Distances are ||G_j - C_i||^2 = ||G_j||^2 - 2<G_j, C_i> + ||C_i||^2. The weighted objective is
    sum_j u_j ||G_j - C_a(j)||^2,   u_j = ||G_j||   (C_i the u-weighted mean of its members),
the sample weights of Eq. 10: a sample counts by its gradient's norm, so samples whose weights
meta re-weighting would move most pull the centroids. method='rbc_kmeans' (RBC-k, the paper's
ablation) sets u_j = 1. The appendix's Algorithm 3 is not in our copy of the paper: this is our
reading of Eq. 10 (recorded in the README).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Clustering:
    assignment: np.ndarray      # (N,) cluster of each sample
    centers: np.ndarray         # (k,) the sample closest to each centroid (position into the samples)
    sizes: np.ndarray           # (k,) members per cluster
    objective: float            # sum_j u_j ||G_j - C_a(j)||^2
    iterations: int
    sides: np.ndarray | None = None     # (N,) +-1: the side of its centroid a sample counts on (cosine only)


def sample_weights(grads, weighted: bool, sq: torch.Tensor | None = None) -> torch.Tensor:
    sq = grads.sq_norms() if sq is None else sq
    return sq.clamp_min(0).sqrt() if weighted else torch.ones_like(sq)


def distances(grads, sq: torch.Tensor, centroids: list) -> torch.Tensor:
    """(N, k) squared distances of every sample to k centroids made by `grads.centroids`: one
    scan for all k. Rounding can take a near-zero one below zero (a sample that is its cluster's
    centroid), and a squared distance is never negative."""
    dots, norms = grads.scores(centroids)
    return (sq.unsqueeze(1) - 2 * dots + norms.unsqueeze(0)).clamp_min(0)


def memberships(assignment: np.ndarray, u: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) U_jc = u_j if sample j is in cluster c, else 0: the weights of the k centroids."""
    a = torch.from_numpy(np.asarray(assignment)).long()
    return torch.zeros(len(u), k, dtype=torch.float64).index_put_((torch.arange(len(u)), a), u.double())


def objective(grads, assignment: np.ndarray, u: torch.Tensor, k: int, sq: torch.Tensor | None = None) -> float:
    """sum_j u_j ||G_j - C_a(j)||^2 for a fixed assignment, C_i the u-weighted mean of cluster i."""
    sq = grads.sq_norms() if sq is None else sq
    m = memberships(assignment, u, k)
    live = torch.nonzero(m.sum(0) > 0).flatten()
    if len(live) == 0:
        return 0.0
    m = m[:, live]
    dist = distances(grads, sq, grads.centroids(m))
    return float((m * dist).sum())


def weighted_kmeans(grads, k: int, weighted: bool = True, seed: int = 0, max_iter: int = 30,
                    check=lambda: None) -> Clustering:
    """Lloyd's iterations from a k-means++ start until the assignment stops changing; `check` runs
    between iterations (a query's Ctrl-C). `grads` has sq_norms(), centroids(U) and scores(C)."""
    n = grads.n
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of samples ({n})")
    sq = grads.sq_norms()
    u = sample_weights(grads, weighted, sq)
    if float(u.sum()) <= 0:       # every gradient is zero: nothing pulls; fall back to counting
        u = torch.ones_like(u)
    gen = np.random.default_rng(seed)
    centroids = _plus_plus(grads, sq, u, k, gen)
    assignment, it = None, 0
    for it in range(1, max_iter + 1):
        check()
        dist = distances(grads, sq, centroids)
        new = dist.argmin(1).numpy()
        if assignment is not None and np.array_equal(new, assignment):
            break
        assignment = new
        centroids = _update(grads, assignment, u, k, dist)
    dist = distances(grads, sq, centroids)
    assignment = dist.argmin(1).numpy()
    return _result(grads, assignment, dist, u, k, sq, it)


def _plus_plus(grads, sq, u, k, gen) -> list:
    """k-means++ seeding, sampling in proportion to u_j * D_j^2; a centroid of one sample is the
    batch average of a batch of one (built from that sample's rows only)."""
    first = int(gen.choice(len(u), p=(u / u.sum()).numpy()))
    chosen = [first]
    best = distances(grads, sq, grads.centroids(_columns(len(u), [first])))[:, 0]
    while len(chosen) < k:
        p = (u * best).numpy()
        p[chosen] = 0
        nxt = int(gen.choice(len(u), p=p / p.sum())) if p.sum() > 0 else \
            int(gen.choice(np.setdiff1d(np.arange(len(u)), chosen)))
        chosen.append(nxt)
        best = torch.minimum(best, distances(grads, sq, grads.centroids(_columns(len(u), [nxt])))[:, 0])
    return grads.centroids(_columns(len(u), chosen))


def _update(grads, assignment, u, k, dist) -> list:
    """Each centroid the u-weighted mean of its members; an empty cluster takes the sample that
    adds the most to the objective (so k clusters stay k)."""
    a = torch.from_numpy(assignment)
    cost = u * dist.gather(1, a.unsqueeze(1))[:, 0]
    m = memberships(assignment, u, k)
    for i in range(k):
        if m[:, i].sum() <= 0:
            far = int(cost.argmax())
            cost[far] = -1
            m[far, i] = 1.0
    return grads.centroids(m)


def _result(grads, assignment, dist, u, k, sq, iterations) -> Clustering:
    def nearest(pool, i):
        # distances equal up to rounding (the two members of a plain K-means pair) go to the first
        # sample, so the pick does not depend on float32 against float64 arithmetic; the rounding
        # is relative to the norms that cancel in ||G||^2 - 2<G, C> + ||C||^2, not to the distance
        d = dist[pool, i]
        slack = 1e-5 * (float(d.min()) + float(sq[pool].max())) + 1e-9
        return int(np.nonzero((d <= d.min() + slack).numpy())[0][0])
    centers, sizes = picks(assignment, k, nearest)
    return Clustering(assignment, centers, sizes, objective(grads, assignment, u, k, sq), iterations)


def picks(assignment: np.ndarray, k: int, best) -> tuple[np.ndarray, np.ndarray]:
    """(each cluster's meta sample, each cluster's size): best(pool, i) is the position in pool of
    cluster i's pick among its members; an empty cluster (only when k exceeds the distinct
    gradients) picks among all samples."""
    centers, sizes = np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64)
    for i in range(k):
        members = np.nonzero(assignment == i)[0]
        sizes[i] = len(members)
        pool = members if len(members) else np.arange(len(assignment))
        centers[i] = pool[best(pool, i)]
    return centers, sizes


def _columns(n: int, chosen: list[int]) -> torch.Tensor:
    """(n, k): column c the weights of the centroid that is sample chosen[c] alone."""
    m = torch.zeros(n, len(chosen), dtype=torch.float64)
    m[torch.tensor(chosen), torch.arange(len(chosen))] = 1.0
    return m

