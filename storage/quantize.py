"""8- and 4-bit storage of sketched gradients: each row as small integer codes and one float32 scale.

A sketched layer (metaql.approx: the layer's gradient reduced to m numbers) is stored full, as one
tensor "G" of shape (rows, m). With `sketch_bits=8` the shard holds instead "G" as int8 codes and
"G_scale" (rows,): a row's numbers are its codes times its scale, the row's largest magnitude / L
(L = 127). With `sketch_bits=4` the codes lie in -7..7 (L = 7) and two share a byte ("G" uint8,
(rows, m / 2): code + 8 in each nibble, the low one first; such a sketch's m is even, see
approx/capture.py). At equal bytes that is four (eight) times the numbers of float32, and the
sketch's error falls as 1/m.

The codes are rounded stochastically (up with probability the fraction's part), from a generator
seeded by the layer's seed, the checkpoint and the shard's first id (so the rounding of one sample
in two checkpoints is independent), so a capture is reproducible and the rounding
is unbiased: E[decoded] = G. Given the sketches, each number's error is independent with mean 0
and variance at most scale^2 / 4, so for a query side t the error of <decoded, t> has variance at
most ||t||^2 scale^2 / 4 <= (q^2 / 4) ||G||^2 ||t||^2 with q = 1/L (the largest magnitude is at
most the row's norm): a relative variance of q^2 / 4 (1.6e-5 at 8 bits, 5.1e-3 at 4) on top of the
sketch's own (approx/projection.py spec_variance adds it to the layer's recorded bound). The bound
takes the worst case of a row whose norm is all in one number; a sketch's largest number is
typically 3-4 standard deviations of its m, so the rounding's actual share is far smaller (about
(absmax / L)^2 / 6 per number against the sketch's own variance of about one number's square).

Readers get float32 "G" back (`decoded`, called where a shard's tensors are read), so every
operator sees a full-stored layer as before; the flush's norms (TOPK's bounds) are taken from the
decoded numbers, the very ones a scan multiplies.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

SCALE = "G_scale"
LEVELS = {8: 127, 4: 7}             # bits -> the largest code


def quantization_variance(bits: int | None) -> float:
    """The relative variance the rounding adds to an inner product (see the module docstring)."""
    if not bits:
        return 0.0
    return 1.0 / (4.0 * LEVELS[bits] ** 2)


def encoded(tensors: dict[str, torch.Tensor], bits: int, seed: int, ids: np.ndarray,
            checkpoint: str = "") -> dict[str, torch.Tensor]:
    """{"G": codes (int8, or two 4-bit codes a byte in uint8), "G_scale": float32 scales} of a sketched
    shard's {"G": numbers}; the rounding's generator is seeded by the layer's `seed`, `checkpoint` and
    the shard's first id."""
    from metaql.errors import InvalidInputException
    g = tensors["G"].detach().float()
    if bits == 4 and g.shape[1] % 2:
        raise InvalidInputException(f"a 4-bit sketch needs an even number of numbers per row, not {g.shape[1]}")
    if not bool(torch.isfinite(g).all()):
        # a sketch in float16 (dtype='float16') overflows above 65504: no codes could stand for it
        raise InvalidInputException("a sketch to store in fewer bits has NaN or infinite numbers; nothing of this "
                                    "flush was stored (with dtype='float16', capture in 'float32' or 'bfloat16')")
    top = LEVELS[bits]
    scale = g.abs().amax(dim=1) / top
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    first = int(ids[0]) if len(ids) else 0
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{checkpoint}:{first}".encode()))
    # floor(x + u), u uniform in [0, 1): rounds up with probability x's fractional part (unbiased)
    codes = torch.floor(g / safe[:, None] + torch.rand(g.shape, generator=generator)).clamp_(-top, top)
    return {"G": codes.to(torch.int8) if bits == 8 else _packed_nibbles(codes), SCALE: scale}


def decoded(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A shard's tensors with 8- or 4-bit "G" turned back into float32 numbers (others as they are)."""
    if SCALE not in tensors:
        return tensors
    out = {n: t for n, t in tensors.items() if n != SCALE}
    codes = tensors["G"] if tensors["G"].dtype == torch.int8 else _unpacked_nibbles(tensors["G"])
    out["G"] = codes.float() * tensors[SCALE].float()[:, None]
    return out


def _packed_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(rows, m) codes in -7..7, m even -> (rows, m / 2) uint8, code + 8 per nibble, low nibble first."""
    biased = (codes + 8).to(torch.uint8)
    return biased[:, 0::2] | (biased[:, 1::2] << 4)


def _unpacked_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The codes (rows, 2 x bytes) of _packed_nibbles' bytes."""
    both = torch.stack([packed & 15, packed >> 4], dim=2).reshape(packed.shape[0], 2 * packed.shape[1])
    return both.to(torch.int8) - 8
