"""The distribution matching network (DMN) and online weight approximation (OWA), papers/000 §10.

The DMN phi(z) tells labeled (y_d = 1) from unlabeled (y_d = 0) embeddings. OWA (Algorithm 2,
Eq. 43-46) alternates one DMN step on a balanced mini-batch (n labeled, n unlabeled; the
unlabeled losses weighted by w_i) with a weight update: w_i becomes the gradient of the
unlabeled batch loss (1/n) sum_j w_j l_j with respect to w_i, i.e. l_i / n, clipped at 0 and
normalised. A sample the DMN easily calls "unlabeled" (small loss) has no labeled neighbour, a
small weight w ~ p_l/p_u, and is a candidate for a human label.

Normalisation. Eq. 46 normalises a batch's weights to sum 1; we report them scaled by the batch
size, i.e. with mean 1. This is the same ranking, keeps Eq. 43's labeled and unlabeled halves on
one scale, and makes w an estimate of the density ratio p_l(z)/p_u(z) (whose mean under p_u is 1),
so the stop threshold alpha_t = 0.1 reads as "beta = p_u/p_l below 10" exactly as §10.4 puts it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

MAX_LOSS = math.log(4.0)   # E_l[loss] + E_u[w loss] when the DMN cannot tell the sides apart (§10.2)


@dataclass
class OWAConfig:
    """DMN shape and the OWA schedule (T iterations of Algorithm 2 on batches of 2n)."""

    hidden: int = 64
    iterations: int = 400        # T
    batch_size: int = 64         # n per side
    lr: float = 1e-3
    weight_decay: float = 1e-3
    input_noise: float = 0.5     # Gaussian noise on the (standardised) embedding while training:
                                 # a smoothed density ratio, not a memorised list of labeled points
    passes: int = 20             # OWA passes the b candidates are picked in (select_candidates)
    refine_iterations: int = 100 # DMN steps per further pass, warm from the previous one
    seed: int = 0


@dataclass
class OWAResult:
    """Weights of the unlabeled samples (mean 1) and the DMN losses behind them."""

    weights: Tensor          # N_u, >= 0, mean 1
    unlabeled_loss: Tensor   # N_u, the DMN's cross-entropy of "unlabeled" per sample
    labeled_loss: Tensor     # N_l, the DMN's cross-entropy of "labeled" per sample
    dmn_loss: float          # Eq. 40 as E_l[l] + E_u[w l]; MAX_LOSS when the sides match
    dmn: nn.Module | None = field(default=None, repr=False)   # the trained DMN (not persisted)

    @property
    def max_loss(self) -> float:
        return MAX_LOSS


def distribution_matching_network(dim: int, hidden: int) -> nn.Sequential:
    """phi(z, theta_d): a small MLP with two outputs (unlabeled, labeled)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 2))


def online_weight_approximation(z_l: Tensor, z_u: Tensor, config: OWAConfig | None = None,
                                dmn: nn.Module | None = None, iterations: int | None = None,
                                progress: Callable[[Iterable[int]], Iterable[int]] | None = None
                                ) -> OWAResult:
    """Algorithm 2: trains a DMN on labeled z_l vs unlabeled z_u and returns the OWA weights.

    `dmn` continues a DMN trained before (for `iterations` steps instead of config.iterations).
    `progress` wraps the iterations (a table function's wrapper also checks for Ctrl-C there).
    """
    config = config or OWAConfig()
    if z_l.shape[0] == 0 or z_u.shape[0] == 0:
        raise ValueError("OWA needs at least one labeled and one unlabeled sample")
    gen = torch.Generator().manual_seed(config.seed)
    z_l, z_u = _standardize(z_l.detach().float(), z_u.detach().float())
    if dmn is None:
        with torch.random.fork_rng(devices=[]):   # seeded weights, the caller's RNG untouched
            torch.manual_seed(config.seed)
            dmn = distribution_matching_network(z_l.shape[1], config.hidden)
    opt = torch.optim.Adam(dmn.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                           fused=True)
    weights = torch.ones(z_u.shape[0])
    n = config.batch_size
    steps = range(config.iterations if iterations is None else iterations)
    for _ in (progress(steps) if progress is not None else steps):
        li = torch.randint(z_l.shape[0], (n,), generator=gen)   # with replacement: N_l may be < n
        ui = torch.randperm(z_u.shape[0], generator=gen)[:n]
        noisy_l = z_l[li] + config.input_noise * torch.randn(n, z_l.shape[1], generator=gen)
        noisy_u = z_u[ui] + config.input_noise * torch.randn(ui.numel(), z_u.shape[1], generator=gen)
        loss_l, loss_u = _side_losses(dmn, noisy_l, noisy_u)
        loss = (loss_l.sum() + (weights[ui] * loss_u).sum()) / (loss_l.numel() + loss_u.numel())
        opt.zero_grad()
        loss.backward()                                          # Eq. 43
        opt.step()
        with torch.no_grad():
            weights[ui] = _normalized(_side_losses(dmn, z_l[:0], z_u[ui])[1])   # Eq. 45-46
    with torch.no_grad():
        loss_l, loss_u = _side_losses(dmn, z_l, z_u)
    # the final weights use the final DMN for every sample, not a mix of iterations
    final = _normalized(loss_u)
    dmn_loss = float(loss_l.mean() + (final * loss_u).mean())
    return OWAResult(final, loss_u, loss_l, dmn_loss, dmn)


def select_candidates(z_l: Tensor, z_u: Tensor, budget: int, config: OWAConfig | None = None,
                      first: OWAResult | None = None) -> tuple[Tensor, Tensor]:
    """(positions in z_u, weights) of `budget` candidates: the smallest OWA weights, picked in
    `config.passes` chunks (one at a time for budget <= passes). After each chunk the picked
    samples join the DMN's labeled side (it needs no labels, only which samples are labeled)
    and OWA continues from the same DMN for a few steps.

    Taking all b at once (passes=1, the paper's literal rule) picks b near-duplicates from the
    one region that lacks labels most (on digits: 19 of 20 from one class); re-weighing after
    each chunk spreads them over every such region, as labeling them one by one would, and
    costs `refine_iterations` DMN steps per pass. `first` is an OWA result already computed
    for (z_l, z_u). A weight is the sample's weight in the pass that picked it.
    """
    config = config or OWAConfig()
    chunk = max(1, -(-budget // max(1, config.passes)))
    owa = first or online_weight_approximation(z_l, z_u, config)
    taken = torch.zeros(z_u.shape[0], dtype=torch.bool)
    picked, picked_w = [], []
    while sum(p.numel() for p in picked) < budget:
        left = (~taken).nonzero().squeeze(1)
        k = min(chunk, budget - sum(p.numel() for p in picked))
        best = smallest_weights(owa.weights, k)
        picked.append(left[best])
        picked_w.append(owa.weights[best])
        taken[left[best]] = True
        if sum(p.numel() for p in picked) < budget:
            owa = online_weight_approximation(torch.cat([z_l, z_u[taken]]), z_u[~taken], config,
                                              dmn=owa.dmn, iterations=config.refine_iterations)
    return torch.cat(picked), torch.cat(picked_w)


def smallest_weights(weights: Tensor, budget: int) -> Tensor:
    """Positions of the `budget` smallest weights, smallest first (ties by position)."""
    order = torch.sort(weights, stable=True).indices
    return order[:budget]


def _side_losses(dmn: nn.Module, z_l: Tensor, z_u: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample cross-entropy of the DMN: labeled against y_d = 1, unlabeled against y_d = 0."""
    logp = torch.log_softmax(dmn(torch.cat([z_l, z_u])), dim=1)
    return -logp[: z_l.shape[0], 1], -logp[z_l.shape[0]:, 0]


def _normalized(loss_u: Tensor) -> Tensor:
    """Eq. 45-46: w = max(0, d/dw of the mean weighted loss), scaled to mean 1 (see module doc)."""
    w = loss_u.clamp_min(0.0) + 0.0   # + 0.0 turns -0.0 into 0.0
    total = w.sum()
    if total <= 0:
        return torch.ones_like(w)
    return w * (w.numel() / total)


def _standardize(z_l: Tensor, z_u: Tensor) -> tuple[Tensor, Tensor]:
    """Scales the embedding by the pool's statistics so one DMN learning rate fits any model."""
    both = torch.cat([z_l, z_u])
    mean, std = both.mean(0), both.std(0).clamp_min(1e-6)
    return (z_l - mean) / std, (z_u - mean) / std
