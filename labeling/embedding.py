"""The feature-embedding protocol LANCET trains, and the loop that trains it with the CFM loss.

LANCET (papers/000 §8) adds the CFM loss to the loss of *any* semi-supervised model. A model plugs
in by being an `nn.Module` with:

    num_classes: int
    features(x) -> Tensor (N x d)        the semantic embedding M(x)
    logits(x)   -> Tensor (N x K)        class logits of a linear head on features(x) (§9)

and optionally

    train_step(x_l, y_l, x_u, regularizer) -> dict[str, float]

which takes one optimisation step of the model's own semi-supervised loss plus
`regularizer(z_l, y_l, z_u, logits_u)` (the CFM term; z_* are features() of the batches, logits_u
the class logits of the unlabeled batch), and returns the losses it logged, and optionally

    set_lr_scale(scale: float) -> None

which scales its optimisers' learning rates (the trainer decays them). `SemiGAN` is the
default model. A model without `train_step` is trained here with cross-entropy on the labeled
batch plus the regularizer, by Adam over its parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from metaql.labeling.augment import Augment
from metaql.labeling.cfm import cfm_loss

Regularizer = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@runtime_checkable
class EmbeddingModel(Protocol):
    """What LANCET needs from a semi-supervised model (see the module docstring)."""

    num_classes: int

    def features(self, x: Tensor) -> Tensor: ...

    def logits(self, x: Tensor) -> Tensor: ...


@dataclass
class TrainConfig:
    """How long and on what batches the embedding trains; the CFM knobs of Eq. 27/35."""

    # First-round steps: SemiGAN is trained "the typical" way (papers/000 line 833), i.e. until its
    # losses level off. On digits (~1,250 pool samples, 128 unlabeled per step, 20 labels) the
    # labeled, unlabeled and CFM losses were all still falling at 3000 steps; 6000 raised the
    # 20-label round's accuracy on 5 splits from 0.718 to 0.748, while 9000 added < 0.005 on the
    # 2 splits checked (not worth 50% more time)
    steps: int = 6000
    batch_size: int = 128        # unlabeled samples per step
    labeled_batch: int = 256     # the whole labeled set per step when it is at most this big
    lr_decay: bool = True        # linear decay to 0 over the second half (Salimans et al.)
    cfm: bool = True             # False gives the paper's "no CFM" ablation (plain SemiGAN)
    # Eq. 35 adds the CFM loss with weight 1, but the embedding's scale is arbitrary (weight-normed
    # ReLU features), so weight and lambda are knobs: on digits, weight 1 with lambda 10 cost 4-5
    # points of propagated accuracy; 0.1 with lambda 1 was the best of the few settings tried
    cfm_weight: float = 0.1
    margin: float = 1.0          # lambda of Eq. 27
    # one-pixel shifts of the labeled batch of image-shaped pools: 'auto' ('cold' on images, else
    # 'none'), 'none', 'cold' (below 3 labels per class), 'shift' (every round); see
    # metaql.labeling.augment
    augment: str = "auto"
    seed: int = 0


def cfm_regularizer(num_classes: int, config: TrainConfig) -> Regularizer:
    """Returns the regularizer passed to `train_step`: the weighted Eq. 27, or zero without CFM."""
    def regularize(z_l: Tensor, y_l: Tensor, z_u: Tensor, logits_u: Tensor) -> Tensor:
        if not config.cfm:
            return z_l.new_zeros(())
        pred_u = logits_u.detach().argmax(1)
        return config.cfm_weight * cfm_loss(z_l, y_l, z_u, pred_u, num_classes, config.margin)
    return regularize


def train_embedding(model: nn.Module, x: Tensor, labeled: Tensor, labels: Tensor,
                    config: TrainConfig,
                    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
                    augment: Augment | None = None) -> list[dict[str, float]]:
    """Trains `model` in place on inputs x (N x d), labeled rows `labeled` with `labels`.

    Unlabeled batches are drawn from the rows not in `labeled` (all rows when every row is
    labeled); `augment`, if given, transforms every labeled batch. Returns the per-step loss
    log, sampled every 50 steps.
    """
    gen = torch.Generator().manual_seed(config.seed)
    unlabeled = _complement(labeled, x.shape[0])
    regularize = cfm_regularizer(model.num_classes, config)
    step_fn = getattr(model, "train_step", None) or _supervised_step(model)
    steps: Iterable[int] = range(config.steps)
    if progress is not None:
        steps = progress(steps)
    log: list[dict[str, float]] = []
    set_lr_scale = getattr(model, "set_lr_scale", None) if config.lr_decay else None
    with torch.random.fork_rng(devices=[]):
        # the model's noise and generator draw from the global RNG: seed it for repeatable
        # rounds, and give the caller's RNG back untouched
        torch.manual_seed(config.seed)
        model.train()
        for step in steps:
            if set_lr_scale is not None:
                set_lr_scale(min(1.0, 2.0 * (1.0 - step / config.steps)))
            li = _batch(labeled, config.labeled_batch, gen)
            ui = _batch(unlabeled, config.batch_size, gen)
            x_l = x[li] if augment is None else augment(x[li], gen)
            losses = step_fn(x_l, labels[_positions(labeled, li)], x[ui], regularize)
            if step % 50 == 0:
                log.append({"step": float(step), **losses})
        model.eval()
    return log


def _complement(rows: Tensor, n: int) -> Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[rows] = False
    rest = mask.nonzero().squeeze(1)
    return rest if rest.numel() else torch.arange(n)


def _batch(rows: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """All rows when they fit in a batch, else a random batch of them (without replacement)."""
    if rows.numel() <= size:
        return rows
    return rows[torch.randperm(rows.numel(), generator=gen)[:size]]


def _positions(rows: Tensor, chosen: Tensor) -> Tensor:
    """Positions of `chosen` inside `rows` (both unique row ids), to pick their labels."""
    order = torch.argsort(rows)
    return order[torch.searchsorted(rows[order], chosen)]


def _supervised_step(model: nn.Module) -> Callable[..., dict[str, Any]]:
    """A train_step for models that bring none: cross-entropy on labels plus the regularizer."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(x_l: Tensor, y_l: Tensor, x_u: Tensor, regularize: Regularizer) -> dict[str, float]:
        z_l, z_u = model.features(x_l), model.features(x_u)
        loss_l = nn.functional.cross_entropy(model.logits(x_l), y_l)
        reg = regularize(z_l, y_l, z_u, model.logits(x_u))
        opt.zero_grad()
        (loss_l + reg).backward()
        opt.step()
        return {"loss_l": loss_l.item(), "loss_cfm": float(reg.detach())}
    return step
