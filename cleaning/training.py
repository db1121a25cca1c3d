"""Training helpers shared by ELITE and the Deep SVDD / Deep SAD baselines.

Same mini-batching, optimizer and autoencoder pretraining for every method, so a comparison
measures the objectives and nothing else.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from metaql.cleaning import networks
from metaql.cleaning.scores import SvddScore

Progress = Callable[..., Iterable]


def no_progress(iterable: Iterable, total: int | None = None, desc: str = "") -> Iterable:
    return iterable


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A random split of range(n) into batches of at most ``batch_size`` (one epoch)."""
    return list(torch.randperm(n, generator=generator).split(batch_size))


def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam (Deep SVDD's and Deep SAD's optimizer) or plain SGD (the form of Eq. 14 and Theorem 1)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def pretrain_svdd(score: SvddScore, x: torch.Tensor, epochs: int, lr: float, batch_size: int,
                  generator: torch.Generator) -> list[float]:
    """Deep SVDD's initialisation: train an autoencoder whose encoder is ``score.net``.

    Ruff et al. pretrain this way so the embedding starts informative; the decoder is bias-free
    like the encoder and is dropped afterwards. Returns the mean reconstruction loss per epoch.
    """
    if epochs <= 0:
        return []
    shape = tuple(x.shape[1:])
    dec = networks.decoder(shape, networks.representation_dim(shape), bias=False)
    ae = nn.Sequential(score.net, dec)
    opt = torch.optim.Adam(ae.parameters(), lr=lr, weight_decay=1e-6)
    z_all = score.standardize(x)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for idx in minibatches(len(x), batch_size, generator):
            z = z_all[idx]
            loss = (ae(z) - z).pow(2).flatten(1).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(x))
    return losses
