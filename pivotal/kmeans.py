"""Weighted K-means on gradients that are never built (MCO, Eq. 9-10 of papers/003).

Works on any object with `sq_norms()`, `centroid(u)` (the u-weighted average of the gradients)
and `dots(centroid)` ((<G_j, C>, ||C||^2)): FactoredGradients computes them from stored factors;
the tests pass explicitly built gradient matrices through the same algorithm.

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


def sample_weights(grads, weighted: bool) -> torch.Tensor:
    sq = grads.sq_norms()
    return sq.clamp_min(0).sqrt() if weighted else torch.ones_like(sq)


def distances(grads, sq: torch.Tensor, centroids: list) -> torch.Tensor:
    """(N, k) squared distances of every sample to every centroid: one Lemma-7 scan per centroid."""
    cols = []
    for c in centroids:
        dot, cc = grads.dots(c)
        cols.append(_squared_distance(sq, dot, cc))
    return torch.stack(cols, dim=1)


def _squared_distance(sq: torch.Tensor, dot: torch.Tensor, cc: float) -> torch.Tensor:
    """||G_j - C||^2 from its three products; rounding can take a near-zero one below zero (a
    sample that is its cluster's centroid), and a squared distance is never negative."""
    return (sq - 2 * dot + cc).clamp_min(0)


def objective(grads, assignment: np.ndarray, u: torch.Tensor, k: int, sq: torch.Tensor | None = None) -> float:
    """sum_j u_j ||G_j - C_a(j)||^2 for a fixed assignment, C_i the u-weighted mean of cluster i."""
    sq = grads.sq_norms() if sq is None else sq
    a = torch.from_numpy(np.asarray(assignment))
    total = 0.0
    for i in range(k):
        members = (a == i).double() * u
        if members.sum() <= 0:
            continue
        dot, cc = grads.dots(grads.centroid(members))
        total += float((members * _squared_distance(sq, dot, cc)).sum())
    return total


def weighted_kmeans(grads, k: int, weighted: bool = True, seed: int = 0, max_iter: int = 30,
                    check=lambda: None) -> Clustering:
    """Lloyd's iterations from a k-means++ start until the assignment stops changing; `check` runs
    between iterations (a query's Ctrl-C)."""
    n = grads.n
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of samples ({n})")
    sq = grads.sq_norms()
    u = sample_weights(grads, weighted)
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
    batch average of a batch of one."""
    first = int(gen.choice(len(u), p=(u / u.sum()).numpy()))
    chosen = [first]
    centroids = [grads.centroid(_onehot(len(u), first))]
    best = distances(grads, sq, centroids)[:, 0]
    while len(chosen) < k:
        p = (u * best).numpy()
        p[chosen] = 0
        nxt = int(gen.choice(len(u), p=p / p.sum())) if p.sum() > 0 else \
            int(gen.choice(np.setdiff1d(np.arange(len(u)), chosen)))
        chosen.append(nxt)
        centroids.append(grads.centroid(_onehot(len(u), nxt)))
        best = torch.minimum(best, distances(grads, sq, centroids[-1:])[:, 0])
    return centroids


def _update(grads, assignment, u, k, dist) -> list:
    """Each centroid the u-weighted mean of its members; an empty cluster takes the sample that
    adds the most to the objective (so k clusters stay k)."""
    a = torch.from_numpy(assignment)
    cost = u * dist.gather(1, a.unsqueeze(1))[:, 0]
    cols = []
    for i in range(k):
        members = (a == i).double() * u
        if members.sum() <= 0:
            far = int(cost.argmax())
            cost[far] = -1
            members = _onehot(len(u), far)
        cols.append(members)
    return [grads.centroid(c) for c in cols]


def _result(grads, assignment, dist, u, k, sq, iterations) -> Clustering:
    centers, sizes = np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64)
    for i in range(k):
        members = np.nonzero(assignment == i)[0]
        sizes[i] = len(members)
        # an empty cluster (only when k exceeds the distinct gradients) keeps its nearest sample
        pool = members if len(members) else np.arange(len(assignment))
        # distances equal up to rounding (the two members of a plain K-means pair) go to the first
        # sample, so the pick does not depend on float32 against float64 arithmetic; the rounding
        # is relative to the norms that cancel in ||G||^2 - 2<G, C> + ||C||^2, not to the distance
        d = dist[pool, i]
        slack = 1e-5 * (float(d.min()) + float(sq[pool].max())) + 1e-9
        centers[i] = pool[int(np.nonzero((d <= d.min() + slack).numpy())[0][0])]
    return Clustering(assignment, centers, sizes, objective(grads, assignment, u, k, sq), iterations)


def _onehot(n: int, i: int) -> torch.Tensor:
    v = torch.zeros(n, dtype=torch.float64)
    v[i] = 1.0
    return v
