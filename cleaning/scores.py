"""Anomaly scores Omega(x) that ELITE (and the Deep SVDD / Deep SAD baselines) plug into Eq. 4.

A score is an ``nn.Module`` whose forward maps a batch to one non-negative number per sample,
higher meaning more anomalous. Inputs are standardised inside the module (the statistics are
buffers), so a saved score needs nothing else to rescore new data.
"""
from __future__ import annotations

import torch
from torch import nn

from metaql.cleaning import networks

TINY = 1e-12  # keeps sqrt differentiable at 0


class Standardize(nn.Module):
    """x -> (x - mean) / std with statistics fixed from the unlabeled data at fit time."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        stat_shape = shape if len(shape) == 1 else (1,) * len(shape)  # per feature / one scalar for images
        self.register_buffer("mean", torch.zeros(stat_shape))
        self.register_buffer("std", torch.ones(stat_shape))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        dims = 0 if x.dim() == 2 else tuple(range(x.dim()))
        mean = x.mean(dim=dims)
        std = x.std(dim=dims) if x.shape[0] > 1 else torch.ones_like(mean)
        self.mean.copy_(mean.reshape(self.mean.shape))
        # constant features would divide by zero; leave them unscaled
        self.std.copy_(torch.where(std > 1e-8, std, torch.ones_like(std)).reshape(self.std.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SvddScore(nn.Module):
    """Omega(x) = ||phi(x) - o||: distance of the embedding to a center o (Algorithm 1's Omega).

    ``squared=True`` gives ||phi(x) - o||^2, the form of Deep SVDD's and Deep SAD's papers.
    """

    kind = "svdd"

    def __init__(self, shape: tuple[int, ...], squared: bool = False) -> None:
        super().__init__()
        self.squared = squared
        self.standardize = Standardize(shape)
        self.net = networks.encoder(shape, networks.representation_dim(shape), bias=False)
        self.register_buffer("center", torch.zeros(networks.representation_dim(shape)))

    @torch.no_grad()
    def init_center(self, x: torch.Tensor, eps: float = 0.1) -> None:
        """The center is the mean embedding of an initial forward pass (Ruff et al. 2018).

        Coordinates near zero are pushed to +-eps: a bias-free network reaches a zero coordinate
        trivially with zero weights, which would collapse the hypersphere.
        """
        c = self.net(self.standardize(x)).mean(dim=0)
        c = torch.where((c.abs() < eps) & (c < 0), torch.full_like(c, -eps), c)
        c = torch.where((c.abs() < eps) & (c >= 0), torch.full_like(c, eps), c)
        self.center.copy_(c)

    def prepare(self, x: torch.Tensor) -> None:
        """Fixes what the score needs from the unlabeled data before training: the center."""
        self.init_center(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sq = (self.net(self.standardize(x)) - self.center).pow(2).sum(dim=1)
        return sq if self.squared else torch.sqrt(sq + TINY)


class AutoencoderScore(nn.Module):
    """Omega(x) = ||psi(x) - x||: the reconstruction error of an autoencoder (in standardised units)."""

    kind = "ae"

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.standardize = Standardize(shape)
        self.net = networks.autoencoder(shape, networks.bottleneck_dim(shape), bias=True)

    def prepare(self, x: torch.Tensor) -> None:
        """Nothing to fix: the reconstruction error needs no center."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.standardize(x)
        return torch.sqrt((self.net(z) - z).flatten(1).pow(2).sum(dim=1) + TINY)


SCORES = {"svdd": SvddScore, "ae": AutoencoderScore}


def make_score(kind: str, shape: tuple[int, ...]) -> nn.Module:
    """A fresh score module of the given kind ('svdd' or 'ae') for samples of ``shape``."""
    return SCORES[kind](tuple(shape))
