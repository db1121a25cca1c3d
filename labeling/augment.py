"""Augmentation of the labeled batch: random one-pixel shifts of image-shaped inputs, at a cold start.

With 2 labels per class, SemiGAN's discriminator and its linear head fit the exact pixels of the
few labeled images; a labeled image shifted by a pixel is still the same class, so shifting the
labeled batch at every step spreads each label's evidence to the labeled image's neighbourhood
(the Continuity condition of papers/000 §7 asks for labeled points near the unlabeled ones).
Only the labeled batch is shifted: shifting the unlabeled batch as well makes the feature-matching
generator chase the shifted distribution instead of the pool's, and cost accuracy on digits.
Only while labels are scarce (mode 'auto': fewer than `SCARCE` per class): on 8 x 8 digits a
shift drops an eighth of the image, and once a few labels per class cover the classes that loss of
detail costs more than the regularization gains.

Measured on digits (benchmarks/results/lancet.md, Notes): development splits 10-16, 20 labels,
0.801 with shifts against 0.786 for LabelSpreading; shifting in every round cost 0.01-0.03 at
100-200 labels on the benchmark's splits, shifting only at a cold start did not.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from metaql.engine.errors import InvalidInputException

Augment = Callable[[Tensor, torch.Generator], Tensor]   # (flat rows, generator) -> flat rows

MODES = ("auto", "shift", "none")
SCARCE = 3.0   # labels per class below which 'auto' shifts


def labeled_augmentation(mode: str, input_shape: tuple[int, ...],
                         labels_per_class: float = 0.0) -> Augment | None:
    """The augmentation a round applies to labeled batches, or None.

    mode 'auto' shifts when the pool's inputs are images (per sample H x W or C x H x W, both
    sides at least 4 pixels) and the round has fewer than SCARCE labels per class, and does
    nothing for flat feature vectors; 'shift' shifts in every round and insists on images;
    'none' turns augmentation off.
    """
    check_mode(mode)
    image = _is_image(input_shape)
    if mode == "shift" and not image:
        raise InvalidInputException(
            f"augment='shift' needs image-shaped inputs (H x W or C x H x W per sample); this "
            f"pool's inputs have shape {tuple(input_shape)} per sample. Register the inputs as "
            f"images or pass augment='none'")
    if mode == "none" or not image or (mode == "auto" and labels_per_class >= SCARCE):
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
