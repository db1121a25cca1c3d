"""Augmentation of the labeled batch: random one-pixel shifts of image-shaped inputs.

With 2 labels per class, SemiGAN's discriminator and its linear head fit the exact pixels of the
few labeled images; a labeled image shifted by a pixel is still the same class, so shifting the
labeled batch at every step spreads each label's evidence to the labeled image's neighbourhood
(the Continuity condition of papers/000 §7 asks for labeled points near the unlabeled ones).
Only the labeled batch is shifted: shifting the unlabeled batch too makes the feature-matching
generator chase the shifted distribution instead of the pool's (worse on digits).

The default, 'auto', shifts only at a cold start (below 3 labels per class) and only on
image-shaped pools (measurements in benchmarks/results/lancet.md, Notes). On digits it lifts
the 20-label round on 6 of 7 splits (mean +0.020). It used to cost the next round 0.009, since
that round continued the shifted model; now that a round whose labeled set has grown 1.5 times
trains afresh (LancetConfig.retrain_growth), the 40-label round gains too (development splits
10-13: 0.946 against 0.940 without shifts). 'shift' (every round) costs 0.01-0.03 at 100-200
labels: on 8 x 8 images a one-pixel shift drops an eighth of the digit. On larger images, where
a pixel is a smaller part of the object, it is the customary augmentation.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from metaql.errors import InvalidInputException

Augment = Callable[[Tensor, torch.Generator], Tensor]   # (flat rows, generator) -> flat rows

MODES = ("auto", "none", "cold", "shift")
SCARCE = 3.0   # labels per class below which 'cold' shifts


def labeled_augmentation(mode: str, input_shape: tuple[int, ...],
                         labels_per_class: float = 0.0) -> Augment | None:
    """The augmentation a round applies to labeled batches, or None.

    'none' leaves the batch alone; 'cold' shifts while the round has fewer than SCARCE labels
    per class; 'shift' shifts in every round. Both need image-shaped inputs (per sample H x W or
    C x H x W, both sides at least 4 pixels). 'auto' (the default) is 'cold' on image-shaped
    inputs and 'none' on flat features.
    """
    check_mode(mode)
    image = _is_image(input_shape)
    if mode == "auto":
        mode = "cold" if image else "none"
    if mode != "none" and not image:
        raise InvalidInputException(
            f"augment='{mode}' needs image-shaped inputs (H x W or C x H x W per sample); this "
            f"pool's inputs have shape {tuple(input_shape)} per sample. Register the inputs as "
            f"images or pass augment='none'")
    if mode == "none" or (mode == "cold" and labels_per_class >= SCARCE):
        return None
    return lambda rows, gen: pixel_shifts(rows, input_shape, gen)


def check_mode(mode: str) -> None:
    """Raises unless `mode` names an augmentation mode."""
    if mode not in MODES:
        raise InvalidInputException(f"augment must be one of {', '.join(MODES)}; got '{mode}'")


def pixel_shifts(rows: Tensor, shape: tuple[int, ...], gen: torch.Generator,
                 max_shift: int = 1) -> Tensor:
    """Each row (a flattened image of `shape`) moved by its own random offset of up to
    `max_shift` pixels along each axis, zero-filled where pixels move in from outside."""
    n, (h, w) = rows.shape[0], shape[-2:]
    m = max_shift
    images = torch.nn.functional.pad(rows.reshape(n, -1, h, w), (m, m, m, m))
    dy = torch.randint(0, 2 * m + 1, (n, 1, 1), generator=gen)
    dx = torch.randint(0, 2 * m + 1, (n, 1, 1), generator=gen)
    ys = (dy + torch.arange(h).view(1, h, 1)).expand(n, h, w)
    xs = (dx + torch.arange(w).view(1, 1, w)).expand(n, h, w)
    picked = images[torch.arange(n).view(n, 1, 1), :, ys, xs]    # n x h x w x C
    return picked.permute(0, 3, 1, 2).reshape(n, -1)


def _is_image(shape: tuple[int, ...]) -> bool:
    return len(shape) in (2, 3) and min(shape[-2:]) >= 4
