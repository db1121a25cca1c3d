"""Meta re-weighting (papers/003 Eq. 2-4, after Shu et al. 2019 and Ren et al. 2018) with the
weights' meta-gradient from the engine's batch-average operator on captured factors.

Per step, on a batch B of training samples with weights w_B:
    (2) look-ahead   T^ = T - a/|B| sum_j w_j grad f_j(T)
    (3) weights      w_j <- clip(w_j - eta dL_m(T^)/dw_j, 0, 1),
                     dL_m(T^)/dw_j = -a/|B| <grad f_j(T), grad L_m(T^)>
    (4) model        T <- T - a/|B| sum_j w_j grad f_j(T)      (with the new weights)
where L_m is the (cluster-size weighted) mean loss of the meta samples. The inner products in (3)
are never formed from gradients: grad f_j(T) is held as each watched layer's factors (X_j, D_j)
from one backward pass, grad L_m(T^) as a batch average of the meta samples' factors at T^, and
<grad f_j, G_m> = sum(D_j * (X_j G_m^T)) per layer (Lemma 7). Exact when the watched layers hold
every parameter and the model has no dropout or batch statistics (factors are taken in eval mode).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metaql.errors import InvalidInputException
from metaql.pivotal.gradients import Block, FactoredGradients
from metaql.storage.hooks import LayerHooks, select_layers
from metaql.storage.replay import replay_batches


@dataclass
class Reweighted:
    weights: np.ndarray                     # (N,) each training sample's weight after the last epoch
    history: list = field(default_factory=list)     # per epoch: the weights after it


class WeightGradient:
    """dL_m(T^)/dw_j for the samples of one batch, from factors (the engine's P2B operator)."""

    def __init__(self, model: nn.Module, layers="*"):
        self.selection = select_layers(model, layers)
        self.names = list(self.selection.modules)
        covered = {id(p) for m in self.selection.modules.values() for p in m.parameters()}
        self.uncovered = [n for n, p in model.named_parameters() if id(p) not in covered and p.requires_grad]
        self.lookahead = copy.deepcopy(model)

    def factors(self, model: nn.Module, x, y) -> FactoredGradients:
        """Each sample's loss gradient at the model's weights, as factors of the watched layers."""
        mods = {n: dict(model.named_modules())[n] for n in self.names}
        hooks = LayerHooks(mods)
        _, fs = next(replay_batches(model, hooks, [(0, x, y)]))
        return FactoredGradients([Block(n, hooks.kinds[n], hooks.kinds[n].meta(n, mods[n]), fs[n]) for n in self.names])

    def __call__(self, model, x, y, w, meta_x, meta_y, meta_c, lr: float) -> torch.Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        loss = (w * F.cross_entropy(model(x), y, reduction="none")).sum() / len(y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        ahead = [p for p in self.lookahead.parameters() if p.requires_grad]
        with torch.no_grad():
            for a, p, g in zip(ahead, params, grads):
                a.copy_(p if g is None else p - lr * g)          # Eq. 2
        meta = self.factors(self.lookahead, meta_x, meta_y).centroid(meta_c)   # grad L_m(T^) per layer
        dots, _ = self.factors(model, x, y).dots(meta)
        return -lr / len(y) * dots


def meta_reweight(model: nn.Module, x, y, meta_x, meta_y, meta_weights=None, *, epochs: int = 5,
                  batch_size: int = 100, lr: float = 0.1, weight_lr: float = 1.0, init_weight: float = 1.0,
                  layers="*", seed: int = 0, progress=None) -> Reweighted:
    """Trains `model` in place by Eq. 2-4 and returns the learned per-sample weights. weight_lr is
    eta in units of the first step's mean |dL_m/dw|, so its scale does not depend on the model."""
    if len(meta_y) == 0:
        raise InvalidInputException("meta re-weighting needs at least one meta sample")
    y, meta_y = torch.as_tensor(y).long(), torch.as_tensor(meta_y).long()
    c = torch.ones(len(meta_y), dtype=torch.float64) if meta_weights is None else \
        torch.as_tensor(meta_weights, dtype=torch.float64)
    wg = WeightGradient(model, layers)
    w = torch.full((len(y),), float(init_weight), dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    scale, history = None, []
    for _ in (progress(range(epochs), total=epochs, desc="reweight") if progress else range(epochs)):
        for rows in torch.randperm(len(y), generator=gen).split(batch_size):
            xb, yb = x[rows], y[rows]
            g = wg(model, xb, yb, w[rows].float(), meta_x, meta_y, c, lr)
            if scale is None:
                scale = float(g.abs().mean()) or 1.0
            w[rows] = (w[rows] - weight_lr / scale * g).clamp(0.0, 1.0)           # Eq. 3
            model.train()
            opt.zero_grad()
            loss = (w[rows].float() * F.cross_entropy(model(xb), yb, reduction="none")).sum() / len(rows)
            loss.backward()
            opt.step()                                                              # Eq. 4
        history.append(w.numpy().copy())
    return Reweighted(w.numpy().copy(), history)
