"""Deep SVDD (Ruff et al. 2018) and Deep SAD (Ruff et al. 2020), on ELITE's networks.

The baselines ELITE is measured against. Both use the bias-free encoder of
``metaql.cleaning.networks``, the same autoencoder pretraining, optimizer and mini-batching as
ELITE, and Omega(x) = ||phi(x) - c||^2 as in their papers. Defaults follow Ruff et al.: Adam,
lr 1e-4, weight decay 0.5e-6, 150 epochs, batches of 128, eta = 1.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from metaql.cleaning import checks
from metaql.cleaning.detector import ScoreDetector
from metaql.cleaning.scores import SvddScore
from metaql.cleaning.thresholds import balanced_threshold
from metaql.cleaning.training import Progress, make_optimizer, minibatches, no_progress, pretrain_svdd

SAD_EPS = 1e-6   # Deep SAD's guard against dividing by a zero distance


class _SvddFamily(ScoreDetector):
    score_kind = "svdd"
    squared_score = True

    def _initial_score(self, x: torch.Tensor, generator: torch.Generator) -> SvddScore:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            score = SvddScore(tuple(x.shape[1:]), squared=True)
        score.standardize.fit(x)
        pretrain_svdd(score, x, self.pretrain_epochs, self.lr, self.batch_size, generator)
        score.prepare(x)
        return score.train()

    def _train(self, score: SvddScore, x: torch.Tensor, semi: torch.Tensor, generator: torch.Generator,
               progress: Progress) -> list[float]:
        """Deep SAD's objective over (x, semi-label) with semi 0 = unlabeled, +1 normal, -1 anomaly.

        With no labeled sample this is Deep SVDD's one-class objective. Returns the loss per epoch.
        """
        opt = make_optimizer(score.parameters(), self.optimizer, self.lr, self.weight_decay)
        eta = getattr(self, "eta", 1.0)
        losses = []
        for _ in progress(range(self.epochs), total=self.epochs, desc=type(self).__name__):
            total = 0.0
            for idx in minibatches(len(x), self.batch_size, generator):
                d2, s = score(x[idx]), semi[idx]
                labeled = eta * (d2 + SAD_EPS) ** s   # d^2 for labeled normals, 1/d^2 for anomalies
                loss = torch.where(s == 0, d2, labeled).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            losses.append(total / len(x))
        return losses


class DeepSVDD(_SvddFamily):
    """One-class Deep SVDD: minimise the mean squared distance of the embeddings to the center.

    Unsupervised: ``fit(X)`` only. ``predict`` calls the top ``nu`` fraction of the training
    scores anomalous (the training set's assumed contamination).
    """

    def __init__(self, epochs: int = 150, batch_size: int = 128, lr: float = 1e-4, optimizer: str = "adam",
                 weight_decay: float = 5e-7, pretrain_epochs: int = 0, nu: float = 0.1, seed: int = 0) -> None:
        self.epochs, self.batch_size, self.lr, self.optimizer = epochs, batch_size, lr, optimizer
        self.weight_decay, self.pretrain_epochs, self.nu, self.seed = weight_decay, pretrain_epochs, nu, seed

    def fit(self, X: Any, y: Any = None, progress: Progress | None = None) -> "DeepSVDD":
        x = checks.as_features(X, "X")
        generator = torch.Generator().manual_seed(self.seed)
        score = self._initial_score(x, generator)
        self.history_ = self._train(score, x, torch.zeros(len(x)), generator, progress or no_progress)
        self.score_, self.shape_ = score.eval(), tuple(x.shape[1:])
        self.threshold_ = float(np.quantile(self.decision_function(x), 1 - self.nu))
        return self


class DeepSAD(_SvddFamily):
    """Deep SAD: Deep SVDD on the unlabeled data plus eta-weighted labeled terms.

    Labeled normals add eta * ||phi(x) - c||^2, labeled anomalies eta / ||phi(x) - c||^2 (Ruff et al.
    2020, Eq. 5); the labeled samples join the unlabeled ones in the mini-batches. ``predict`` uses
    the balanced-accuracy cut on the labeled samples, like ELITE.
    """

    def __init__(self, eta: float = 1.0, epochs: int = 150, batch_size: int = 128, lr: float = 1e-4,
                 optimizer: str = "adam", weight_decay: float = 5e-7, pretrain_epochs: int = 0,
                 seed: int = 0) -> None:
        self.eta, self.epochs, self.batch_size, self.lr, self.optimizer = eta, epochs, batch_size, lr, optimizer
        self.weight_decay, self.pretrain_epochs, self.seed = weight_decay, pretrain_epochs, seed

    def fit(self, X_unlabeled: Any, X_labeled: Any, y_labeled: Any, progress: Progress | None = None) -> "DeepSAD":
        xu, xl, yl = checks.fit_inputs(X_unlabeled, X_labeled, y_labeled)
        x, semi = torch.cat([xu, xl]), torch.cat([torch.zeros(len(xu)), yl])
        generator = torch.Generator().manual_seed(self.seed)
        # pretraining and the center use all training data, labeled included, as Deep SAD does
        score = self._initial_score(x, generator)
        self.history_ = self._train(score, x, semi, generator, progress or no_progress)
        self.score_, self.shape_ = score.eval(), tuple(x.shape[1:])
        self.threshold_ = balanced_threshold(torch.from_numpy(self.decision_function(xl)), yl < 0)
        return self
