"""MCO clustering (papers/003 Eq. 9-10) with the absolute cosine, on gradients that are never built.

Eq. 9 maximises sum_j sum_i |<G_j, C_i>| and Eq. 10 writes each term as
||G_j|| * ||C_i|| * |cos(G_j, C_i)|: a similarity that ignores the sign of G_j (a sample whose
gradient is opposite to a meta sample's moves its weight as much as one aligned with it). The
Euclidean reading (kmeans.py) puts G and -G far apart; this one does not. Our reading, as a
K-means (Lloyd) loop, each sample counted against its own cluster's centroid:

    assignment   a(j) = argmax_i |<G_j, C_i>|        (weighted: Eq. 10's ||C_i|| |cos| per sample)
                 a(j) = argmax_i |cos(G_j, C_i)|     (unweighted, RBC-k: plain spherical K-means)
    centroid     C_i = sum_{j in i} u_j s_j G_j/||G_j|| / sum_{j in i} u_j,   s_j = sign <G_j, C_i>

with u_j = ||G_j|| (Eq. 10's sample weight) or 1: the centroid is the u-weighted mean of its
members' unit gradients turned to one side, so its norm (at most 1) is how coherent the cluster
is, and its direction maximises the cluster's sum_j u_j |cos(G_j, C_i)|. The meta sample of a
cluster is the member of largest |cos| to its centroid (the sample closest to it). The objective
reported is sum_j u_j ||C_a(j)|| |cos(G_j, C_a(j))| (weighted: sum_j |<G_j, C_a(j)>|, MCO).
The authors' released code assigns by the same |<G_j, C_i>| / ||G_j|| (its cosine distance with
weight_by_norm); the appendix's Algorithm 3 is not in our copy of the paper.

Works on the same objects as kmeans.py: `sq_norms()`, `centroids(U, normalize=False)` and `scores(C)`.
"""
from __future__ import annotations

import numpy as np
import torch

from metaql.pivotal.kmeans import Clustering, picks


def cosine_kmeans(grads, k: int, weighted: bool = True, seed: int = 0, max_iter: int = 30,
                  check=lambda: None) -> Clustering:
    """Lloyd's iterations on |cos| from a k-means++ start (1 - |cos| as the squared distance)
    until neither the assignment nor a sample's side of its centroid changes; `check` runs
    between iterations."""
    n = grads.n
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of samples ({n})")
    norm = grads.sq_norms().clamp_min(0).sqrt()
    u = norm.clone() if weighted else (norm > 0).double()
    if float(u.sum()) <= 0:        # every gradient is zero: nothing has a direction; count samples
        u = torch.ones(n, dtype=torch.float64)
    centroids = _plus_plus(grads, norm, u, k, np.random.default_rng(seed))
    state, it = None, 0
    for it in range(1, max_iter + 1):
        check()
        dots, cnorm = grads.scores(centroids)
        assignment = _score(dots, cnorm, norm, weighted).argmax(1).numpy()
        # a sample's side of its centroid is part of the partition: stop when neither moves
        new = np.where(_own(dots, assignment).numpy() < 0, -1 - assignment, assignment)
        if state is not None and np.array_equal(new, state):
            break
        state = new
        centroids = _update(grads, assignment, dots, cnorm, norm, u, k, weighted)
    dots, cnorm = grads.scores(centroids)
    assignment = _score(dots, cnorm, norm, weighted).argmax(1).numpy()
    return _result(assignment, dots, cnorm, norm, u, k, it)


def cosines(dots: torch.Tensor, cnorm: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """(N, k) |cos(G_j, C_i)|, 0 where either side is zero."""
    den = norm.unsqueeze(1) * cnorm.clamp_min(0).sqrt().unsqueeze(0)
    return torch.where(den > 0, dots.abs() / den.clamp_min(1e-300), torch.zeros_like(dots)).clamp(max=1.0)


def _score(dots, cnorm, norm, weighted: bool) -> torch.Tensor:
    """What a sample's cluster maximises: |<G_j, C_i>| (Eq. 10 up to the sample's own ||G_j||) or |cos|."""
    return dots.abs() if weighted else cosines(dots, cnorm, norm)


def _own(dots, assignment) -> torch.Tensor:
    """<G_j, C_a(j)> for every sample."""
    return dots.gather(1, torch.from_numpy(np.asarray(assignment)).long().unsqueeze(1))[:, 0]


def _weights(assignment, sign, norm, u, k) -> torch.Tensor:
    """(N, k) U with column i = u_j s_j / (||G_j|| sum_{j in i} u_j) on cluster i's members: the
    centroid sum_j U_ji G_j is the u-weighted mean of the turned unit gradients."""
    a = torch.from_numpy(np.asarray(assignment)).long()
    total = torch.zeros(k, dtype=torch.float64).index_add_(0, a, u)
    w = torch.where(norm > 0, u * sign / norm.clamp_min(1e-300), torch.zeros_like(u)) / total[a].clamp_min(1e-300)
    return torch.zeros(len(u), k, dtype=torch.float64).index_put_((torch.arange(len(u)), a), w)


def _update(grads, assignment, dots, cnorm, norm, u, k, weighted) -> list:
    """Each centroid from its members, turned to the side of the old centroid; an empty cluster (or
    one of zero gradients) takes the sample that fits its own cluster worst."""
    a = torch.from_numpy(assignment)
    sign = torch.where(_own(dots, assignment) < 0, -1.0, 1.0).double()
    fit = cosines(dots, cnorm, norm).gather(1, a.unsqueeze(1))[:, 0].clone()
    fit[norm <= 0] = 2.0                              # never moved: it has no direction to offer
    m = _weights(assignment, sign, norm, u, k)
    for i in range(k):
        if not bool((m[:, i] != 0).any()):
            worst = int(fit.argmin())
            fit[worst] = 2.0
            m[:, i] = 0.0
            m[worst, i] = 1.0 / float(norm[worst]) if norm[worst] > 0 else 1.0
    return grads.centroids(m, normalize=False)


def _plus_plus(grads, norm, u, k, gen) -> list:
    """k-means++ seeding with 1 - |cos| as the squared distance (for unit vectors it is half the
    squared distance to the nearer of +G and -G), sampling in proportion to u_j (1 - |cos|)."""
    n = len(u)
    first = int(gen.choice(n, p=(u / u.sum()).numpy()))
    chosen = [first]
    best = _one_minus_cos(grads, norm, first)
    while len(chosen) < k:
        p = (u * best).clamp_min(0).numpy()
        p[chosen] = 0
        nxt = int(gen.choice(n, p=p / p.sum())) if p.sum() > 0 else \
            int(gen.choice(np.setdiff1d(np.arange(n), chosen)))
        chosen.append(nxt)
        best = torch.minimum(best, _one_minus_cos(grads, norm, nxt))
    return grads.centroids(_unit_columns(norm, chosen), normalize=False)


def _one_minus_cos(grads, norm, j: int) -> torch.Tensor:
    dots, cnorm = grads.scores(grads.centroids(_unit_columns(norm, [j]), normalize=False))
    return 1.0 - cosines(dots, cnorm, norm)[:, 0]


def _unit_columns(norm, chosen: list[int]) -> torch.Tensor:
    """(N, k): column c the weights of sample chosen[c]'s unit gradient (its gradient if zero)."""
    m = torch.zeros(len(norm), len(chosen), dtype=torch.float64)
    idx = torch.tensor(chosen)
    m[idx, torch.arange(len(chosen))] = torch.where(norm[idx] > 0, 1.0 / norm[idx].clamp_min(1e-300), 1.0)
    return m


def _result(assignment, dots, cnorm, norm, u, k, iterations) -> Clustering:
    cos = cosines(dots, cnorm, norm)

    def closest(pool, i):
        c = cos[pool, i]
        # cosines equal up to float32 rounding go to the first sample (as kmeans.py's distances)
        return int(np.nonzero((c >= c.max() - 1e-6).numpy())[0][0])
    centers, sizes = picks(assignment, k, closest)
    a = torch.from_numpy(assignment).long().unsqueeze(1)
    objective = float((u * cnorm.clamp_min(0).sqrt()[a[:, 0]] * cos.gather(1, a)[:, 0]).sum())
    sides = np.where(_own(dots, assignment).numpy() < 0, -1, 1)
    return Clustering(assignment, centers, sizes, objective, iterations, sides)
