"""One LANCET round (papers/000 Fig. 9): embed with CFM, propagate, weigh, decide whether to stop.

Pure tensors in, tensors out: no store, no session. `run_lancet` trains (or continues training)
the embedding model on the pool's inputs and the human labels, propagates labels by its linear
head, runs OWA on the embedding and applies the stop rule; `LancetResult.candidates` then picks
the b unlabeled samples with the smallest weights, or, in a round where the stop rule holds, by
default the b least confident propagated labels.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from metaql.errors import InvalidInputException, Warning as MetaQLWarning
from metaql.labeling.augment import labeled_augmentation
from metaql.labeling.dmn import OWAConfig, OWAResult, online_weight_approximation, select_candidates
from metaql.labeling.embedding import EmbeddingModel, TrainConfig, train_embedding
from metaql.labeling.propagation import Propagated, embed, propagate
from metaql.labeling.semigan import SemiGAN, SemiGANConfig
from metaql.labeling.termination import StopDecision, stop_decision

ModelFactory = Callable[[int, int, int], nn.Module]   # (in_dim, num_classes, seed) -> model
AFTER_STOP = ("confidence", "dmn")   # candidate rules in a round where the stop rule holds


@dataclass
class LancetConfig:
    """Every knob of a LANCET round; the defaults are the paper's where it gives one (alpha_t),
    else what worked on digits (benchmarks/bench_lancet.py)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    owa: OWAConfig = field(default_factory=OWAConfig)
    semigan: dict[str, Any] = field(default_factory=dict)   # SemiGANConfig overrides
    warm_steps: int = 800         # steps when continuing from the previous round's model
    # A round continues the previous round's model only while the new labels are a small part of
    # the labeled set: from `retrain_growth` times the labels the previous model saw, it trains
    # afresh (config.train.steps). A model warm-started from 2 labels per class stays near its
    # first solution: on 4 development splits, going from 20 to 40 labels, 800 more steps gave
    # 0.919 propagated accuracy, 3000 more 0.927, a fresh model 0.944
    retrain_growth: float = 1.5
    # Steps of such a fresh round after the first (None: config.train.steps, as before). Opt-in:
    # fewer steps trade accuracy for time; a fresh round on 40 random digits labels with 2000
    # steps was 2.7x faster and 0.039 less accurate than with 6000 (mean of 3 seeds, 0.883 vs
    # 0.922; benchmarks/results/method_speed.md)
    retrain_steps: int | None = None
    alpha_t: float = 0.1          # §10.4
    loss_tolerance: float = 0.05  # how near log 4 the DMN loss must be to call the sides matched
    # Candidates in a round where the stop rule holds, for users who label past it: 'dmn' keeps
    # the paper's smallest weights, 'confidence' asks for the least confident propagated labels.
    # Each round decides afresh: when a later round's rule says continue, the DMN picks again.
    # Past the stop point the DMN can no longer tell the labeled embeddings from the weighted
    # unlabeled ones, so its weights rank little but noise, while the remaining propagation
    # errors sit among the least confident labels (on 4 development splits, from 100 labels on,
    # their confidences were on average in the lowest 2-10% of the propagated labels'). On the
    # benchmark's 8 seeds 'confidence' raised a downstream SVM's test accuracy at 100 labels from
    # 0.973 to 0.984 (benchmarks/results/lancet.md)
    after_stop: str = "confidence"

    def __post_init__(self) -> None:
        check_after_stop(self.after_stop)


@dataclass
class LancetResult:
    """The outcome of one round over a pool of N rows (positions, not sample ids)."""

    model: nn.Module
    propagated: Propagated
    unlabeled: Tensor              # rows without a human label, in the order of owa.weights
    owa: OWAResult | None          # None when every row is labeled
    decision: StopDecision
    log: list[dict[str, float]] = field(default_factory=list)
    features: Tensor | None = None  # N x d embedding (kept in memory only, rebuilt from x)
    owa_config: OWAConfig = field(default_factory=OWAConfig)

    def candidates(self, budget: int, x: Tensor | None = None,
                   after_stop: str = LancetConfig.after_stop) -> tuple[Tensor, Tensor]:
        """(rows, OWA weights) of the `budget` unlabeled rows to label next: the smallest OWA
        weights (see `select_candidates`), or with after_stop='confidence' and this round's stop
        rule holding, the least confident propagated labels. `x`, the pool's inputs, is needed
        when the embedding is not in memory (a round loaded from disk)."""
        check_budget(budget, self.unlabeled.numel())
        check_after_stop(after_stop)
        if self.owa is None:
            return self.unlabeled[:0], torch.zeros(0)
        if after_stop == "confidence" and self.decision.should_stop:
            return self.least_confident(budget)
        z = self.features
        if z is None:
            if x is None:
                raise InvalidInputException("this round was loaded from disk: pass the pool's inputs")
            z = embed(self.model, prepare_inputs(x))[0]
        labeled = self.propagated.human.nonzero().squeeze(1)
        pick, weights = select_candidates(z[labeled], z[self.unlabeled], budget, self.owa_config,
                                          first=self.owa if self.owa.dmn is not None else None)
        return self.unlabeled[pick], weights

    def least_confident(self, budget: int) -> tuple[Tensor, Tensor]:
        """(rows, OWA weights) of the `budget` unlabeled rows whose propagated labels have the
        lowest confidence, least confident first."""
        assert self.owa is not None
        order = torch.sort(self.propagated.confidence[self.unlabeled], stable=True).indices
        pick = order[:budget]
        return self.unlabeled[pick], self.owa.weights[pick]


def check_after_stop(rule: str) -> None:
    """Raises unless `rule` names a candidate rule for rounds where the stop rule holds."""
    if rule not in AFTER_STOP:
        raise InvalidInputException(
            f"after_stop must be one of {', '.join(AFTER_STOP)}; got '{rule}'")


def warm_start(previous: LancetResult | None, n_labeled: int,
               config: LancetConfig) -> nn.Module | None:
    """The previous round's model to continue training, or None when the next round should
    train a fresh one (no previous round, or the labeled set grew by `retrain_growth` or more)."""
    if previous is None:
        return None
    before = int(previous.propagated.human.sum())
    return previous.model if n_labeled < config.retrain_growth * before else None


def check_budget(budget: int, n_unlabeled: int) -> None:
    """Raises unless 0 < budget <= the number of unlabeled samples left."""
    if budget <= 0:
        raise InvalidInputException(f"budget must be a positive number of samples, got {budget}")
    if budget > n_unlabeled:
        raise InvalidInputException(
            f"budget {budget} is larger than the {n_unlabeled} unlabeled sample(s) left in the "
            f"pool; ask for at most {n_unlabeled}")


def prepare_inputs(x: Tensor) -> Tensor:
    """Flat float32 rows scaled to [0, 1] by the pool's global range (SemiGAN's G ends in a sigmoid).

    One global range, not one per feature, so rarely-used features are not blown up.
    """
    x = x.reshape(x.shape[0], -1).float()
    if not torch.isfinite(x).all():
        raise InvalidInputException("the pool's inputs contain NaN or infinite values")
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def default_model(config: LancetConfig) -> ModelFactory:
    """The factory of the paper's model: a SemiGAN with the config's overrides."""
    def make(in_dim: int, num_classes: int, seed: int) -> nn.Module:
        return SemiGAN(SemiGANConfig(in_dim=in_dim, num_classes=num_classes, seed=seed,
                                     **config.semigan))
    return make


def check_labels(labels: Tensor, num_classes: int) -> None:
    """Raises on labels outside [0, num_classes) or fewer than two labeled classes; warns on
    classes with no labeled sample (nothing can be propagated to them)."""
    if labels.numel() == 0:
        raise InvalidInputException(
            "the pool has no human label yet; label a few samples (LANCET_CANDIDATES suggests "
            "random ones to start)")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise InvalidInputException(
            f"labels must lie in [0, {num_classes}); got {sorted(set(bad.tolist()))[:10]}")
    seen = torch.bincount(labels.long(), minlength=num_classes)
    if int((seen > 0).sum()) < 2:
        raise InvalidInputException(
            f"LANCET needs human labels of at least two classes; all {labels.numel()} label(s) "
            f"are class {int(labels[0])}")
    missing = (seen == 0).nonzero().squeeze(1).tolist()
    if missing:
        warnings.warn(f"class(es) {missing} have no labeled sample; no sample will be propagated "
                      f"to them until one is labeled", MetaQLWarning, stacklevel=3)


def run_lancet(x: Tensor, labeled: Tensor, labels: Tensor, num_classes: int,
               config: LancetConfig | None = None, model: nn.Module | None = None,
               make_model: ModelFactory | None = None,
               progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
               retrain: bool = False) -> LancetResult:
    """One LANCET round over pool inputs x (N x ...) with human labels `labels` at rows `labeled`.

    A `model` passed in is trained further for `config.warm_steps` (the cached state of the
    previous round); otherwise `make_model` (default: SemiGAN) builds a fresh one, trained for
    `config.retrain_steps` when `retrain` (a fresh model after an earlier round) and that is set.
    """
    config = config or LancetConfig()
    labeled, labels = labeled.long(), labels.long()
    check_labels(labels, num_classes)
    augment = labeled_augmentation(config.train.augment, tuple(x.shape[1:]),
                                   labels.numel() / num_classes)
    x = prepare_inputs(x)
    train = config.train
    if model is None:
        model = (make_model or default_model(config))(x.shape[1], num_classes, train.seed)
        if retrain and config.retrain_steps is not None:
            train = TrainConfig(**{**train.__dict__, "steps": config.retrain_steps})
    else:
        train = TrainConfig(**{**train.__dict__, "steps": config.warm_steps})
    if not isinstance(model, EmbeddingModel):
        raise InvalidInputException(
            f"{type(model).__name__} is no LANCET model: it needs num_classes, features(x) "
            f"and logits(x) (see metaql.labeling.embedding)")
    log = train_embedding(model, x, labeled, labels, train, progress, augment)
    z, logits = embed(model, x)
    propagated = propagate(logits, labeled, labels)
    unlabeled = (~propagated.human).nonzero().squeeze(1)
    owa = (online_weight_approximation(z[labeled], z[unlabeled], config.owa, progress=progress)
           if unlabeled.numel() else None)
    decision = stop_decision(owa, labeled.numel(), unlabeled.numel(), config.alpha_t,
                             config.loss_tolerance)
    return LancetResult(model, propagated, unlabeled, owa, decision, log, z, config.owa)
