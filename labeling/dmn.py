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
    net = FlatDMN(dmn)
    opt = FlatAdam(net.flat, config.lr, config.weight_decay)
    weights = torch.ones(z_u.shape[0])
    n = config.batch_size
    steps = range(config.iterations if iterations is None else iterations)
    for _ in (progress(steps) if progress is not None else steps):
        li = torch.randint(z_l.shape[0], (n,), generator=gen)   # with replacement: N_l may be < n
        ui = torch.randperm(z_u.shape[0], generator=gen)[:n]
        noisy_l = z_l[li] + config.input_noise * torch.randn(n, z_l.shape[1], generator=gen)
        batch_u = z_u[ui]
        noisy_u = batch_u + config.input_noise * torch.randn(ui.numel(), z_u.shape[1], generator=gen)
        opt.step(net.gradient(torch.cat([noisy_l, noisy_u]), n, weights[ui]))         # Eq. 43
        weights[ui] = _normalized(net.unlabeled_loss(batch_u))                         # Eq. 45-46
    net.write_back()
    with torch.no_grad():
        loss_l, loss_u = _side_losses(dmn, z_l, z_u)
    # the final weights use the final DMN for every sample, not a mix of iterations
    final = _normalized(loss_u)
    dmn_loss = float(loss_l.mean() + (final * loss_u).mean())
    return OWAResult(final, loss_u, loss_l, dmn_loss, dmn)


class FlatDMN:
    """The DMN's parameters in one flat tensor, with its forward and its batch-loss gradient
    written out by hand.

    An OWA iteration is tiny (a 128 x 128 batch through a 64-64-2 MLP): module calls, the
    autograd graph and one Adam kernel per tensor cost several times its arithmetic. Here one
    iteration is ~15 tensor operations and one fused Adam kernel; the gradient equals autograd's
    to float rounding (tests/test_lancet_speed.py). `write_back` copies the trained values into
    the module, which stays the DMN of record (continued by `select_candidates`).
    """

    def __init__(self, dmn: nn.Module) -> None:
        linears = [m for m in dmn.modules() if isinstance(m, nn.Linear)]
        acts = [m for m in dmn.modules() if not isinstance(m, (nn.Linear, nn.Sequential))]
        if len(linears) != 3 or any(not isinstance(a, nn.ReLU) for a in acts) or \
                linears[-1].out_features != 2:
            raise ValueError("OWA trains the DMN of distribution_matching_network "
                             "(Linear-ReLU-Linear-ReLU-Linear to 2 outputs)")
        self.module_params = [p for m in linears for p in (m.weight, m.bias)]
        self.flat = torch.cat([p.detach().reshape(-1) for p in self.module_params])
        self.views, at = [], 0
        for p in self.module_params:
            self.views.append(self.flat[at:at + p.numel()].view_as(p))
            at += p.numel()

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(h1, h2, s): the hidden activations and s = logit(labeled) - logit(unlabeled)."""
        w1, b1, w2, b2, w3, b3 = self.views
        h1 = torch.addmm(b1, x, w1.T).relu_()
        h2 = torch.addmm(b2, h1, w2.T).relu_()
        return h1, h2, torch.addmm(b3, h2, w3.T).diff(dim=1).squeeze(1)

    def unlabeled_loss(self, z_u: Tensor) -> Tensor:
        """Per-sample cross-entropy of "unlabeled" (-log softmax(out)[0] = softplus(s))."""
        return nn.functional.softplus(self._forward(z_u)[2])

    def gradient(self, x: Tensor, n_l: int, w_u: Tensor) -> Tensor:
        """The flat gradient of (sum of labeled losses + sum of w_u * unlabeled losses) / rows,
        for rows x = [n_l labeled; unlabeled] (Eq. 43's batch loss)."""
        _, _, w2, _, w3, _ = self.views
        h1, h2, s = self._forward(x)
        # d loss / d s: labeled rows -sigmoid(-s), unlabeled rows w sigmoid(s), over the rows
        ds = torch.sigmoid(s)
        ds[:n_l] -= 1.0
        ds[n_l:] *= w_u
        ds /= x.shape[0]
        g3 = ds @ h2                                   # d/dw3 is [-g3; g3]
        da2 = torch.ops.aten.threshold_backward(torch.outer(ds, w3[1] - w3[0]), h2, 0)   # ReLU'
        da1 = torch.ops.aten.threshold_backward(da2 @ w2, h1, 0)
        total = ds.sum()
        return torch.cat([(da1.T @ x).reshape(-1), da1.sum(0), (da2.T @ h1).reshape(-1),
                          da2.sum(0), torch.stack([-g3, g3]).reshape(-1), torch.stack([-total, total])])

    @torch.no_grad()
    def write_back(self) -> None:
        for p, v in zip(self.module_params, self.views):
            p.copy_(v)


class FlatAdam:
    """torch.optim.Adam (L2 weight decay added to the gradient, as Adam's weight_decay) on one
    flat tensor, in six in-place operations: the optimizer's per-call bookkeeping costs more
    than this update at the DMN's size."""

    def __init__(self, param: Tensor, lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.param, self.lr, self.weight_decay, self.betas, self.eps = param, lr, weight_decay, betas, eps
        self.m, self.v, self.t = torch.zeros_like(param), torch.zeros_like(param), 0

    def step(self, grad: Tensor) -> None:
        b1, b2 = self.betas
        self.t += 1
        grad = grad.add_(self.param, alpha=self.weight_decay)
        self.m.lerp_(grad, 1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v.sqrt() / math.sqrt(1 - b2 ** self.t)).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-self.lr / (1 - b1 ** self.t))


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
