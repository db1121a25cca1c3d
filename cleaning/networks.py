"""Networks sized to the input: a small conv net for images (N, C, H, W), an MLP for tables (N, F).

Every layer with parameters is a Linear or a Conv2d, and nothing mixes samples (no batch norm),
so a sample's score depends on that sample alone; the factored meta-gradient
(metaql.cleaning.metagrad) relies on both. Deep SVDD networks are built with ``bias=False``:
with bias terms the network can map every input onto the center and the score collapses
(Ruff et al. 2018, Prop. 2).
"""
from __future__ import annotations

from torch import nn

from metaql.cleaning.pooling import MaxPool2x2

SLOPE = 0.1          # LeakyReLU slope of Ruff et al.'s networks
MAX_CONV_BLOCKS = 3
FIRST_CHANNELS = 16


def representation_dim(shape: tuple[int, ...]) -> int:
    """Embedding size of the Deep SVDD encoder for inputs of this (per-sample) shape."""
    if len(shape) == 1:
        return max(8, min(32, shape[0]))
    return 32


def bottleneck_dim(shape: tuple[int, ...]) -> int:
    """Code size of the autoencoder; below the input size so that it cannot learn the identity."""
    if len(shape) == 1:
        return max(1, min(32, shape[0] // 2))
    return 32


def encoder(shape: tuple[int, ...], out_dim: int, bias: bool) -> nn.Sequential:
    """An encoder from one sample's shape ((F,) or (C, H, W)) to ``out_dim`` features."""
    if len(shape) == 1:
        return _mlp([shape[0], hidden_width(shape[0]), out_dim], bias)
    channels, sizes = _conv_plan(shape)
    layers: list[nn.Module] = []
    for cin, cout in zip(channels[:-1], channels[1:]):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=bias), nn.LeakyReLU(SLOPE), MaxPool2x2()]
    h, w = sizes[-1]
    layers += [nn.Flatten(), nn.Linear(channels[-1] * h * w, out_dim, bias=bias)]
    return nn.Sequential(*layers)


def decoder(shape: tuple[int, ...], in_dim: int, bias: bool) -> nn.Sequential:
    """The mirror of ``encoder``: from ``in_dim`` features back to one sample's shape."""
    if len(shape) == 1:
        return _mlp([in_dim, hidden_width(shape[0]), shape[0]], bias)
    channels, sizes = _conv_plan(shape)
    h, w = sizes[-1]
    layers: list[nn.Module] = [nn.Linear(in_dim, channels[-1] * h * w, bias=bias), nn.LeakyReLU(SLOPE),
                               nn.Unflatten(1, (channels[-1], h, w))]
    # nearest upsampling to the exact sizes seen on the way down, so odd sizes (7 -> 3) come back
    for k in range(len(channels) - 1, 1, -1):
        layers += [nn.Upsample(size=sizes[k - 1]), nn.Conv2d(channels[k], channels[k - 1], 3, padding=1, bias=bias),
                   nn.LeakyReLU(SLOPE)]
    layers += [nn.Upsample(size=sizes[0]), nn.Conv2d(channels[1], channels[0], 3, padding=1, bias=bias)]
    return nn.Sequential(*layers)


def autoencoder(shape: tuple[int, ...], code_dim: int, bias: bool) -> nn.Sequential:
    """Encoder then decoder; ``ae[0]`` is the encoder (reused to initialise Deep SVDD)."""
    return nn.Sequential(encoder(shape, code_dim, bias), decoder(shape, code_dim, bias))


def hidden_width(features: int) -> int:
    """Hidden layer width of the tabular MLPs."""
    return max(32, min(128, 2 * features))


def _mlp(widths: list[int], bias: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(nn.LeakyReLU(SLOPE))
    return nn.Sequential(*layers)


def _conv_plan(shape: tuple[int, ...]) -> tuple[list[int], list[tuple[int, int]]]:
    """Channel counts and spatial sizes per conv block: halve the image while it is >= 4 pixels."""
    c, h, w = shape
    channels, sizes = [c], [(h, w)]
    while min(h, w) >= 4 and len(channels) <= MAX_CONV_BLOCKS:
        channels.append(FIRST_CHANNELS * 2 ** (len(channels) - 1))
        h, w = h // 2, w // 2
        sizes.append((h, w))
    return channels, sizes
