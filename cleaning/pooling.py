"""A 2 x 2 max pool equal to nn.MaxPool2d(2) in values, gradients and ties, with a faster forward
on small NCHW maps.

On one CPU thread max_pool2d's forward over contiguous (NCHW) maps of 8 x 8 pixels costs ~1 ms for
184 x 16 maps, ~6 ns an element and a fifth of an ELITE step, while on channels-last maps it
costs a quarter of that, the copies to and from that layout included. Its backward (a scatter by
the saved indices) is cheap on NCHW maps but not on channels-last ones. So the forward here runs
on a channels-last copy and brings values and indices back to NCHW, and the backward is
max_pool2d's own NCHW kernel with those indices: the same values, indices and gradient, bit for
bit (the channels-last kernel also keeps the first maximum of a window, and NaN wins), and twice
differentiable (ELITE's meta_gradient='virtual' backpropagates through the backward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KERNEL = [2, 2]
# below this many elements the copies cost more than they save (20 x 16 maps of 8 x 8: 0.7x)
MIN_ELEMENTS = 1 << 15


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:   # type: ignore[override]
        values, indices = max_pool2x2_with_indices(x)
        ctx.save_for_backward(x, indices)
        ctx.mark_non_differentiable(indices)
        return values

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:   # type: ignore[override]
        x, indices = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, KERNEL, KERNEL, [0, 0], [1, 1], False, indices)


def max_pool2x2_with_indices(x: Tensor) -> tuple[Tensor, Tensor]:
    """max_pool2d_with_indices(x, 2) of a 4-d x, as contiguous NCHW tensors."""
    values, indices = F.max_pool2d_with_indices(x.contiguous(memory_format=torch.channels_last), 2)
    return values.contiguous(), indices.contiguous()


class MaxPool2x2(nn.Module):
    """nn.MaxPool2d(2) (stride 2, no padding, floor) on 4-d inputs, with the faster forward."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.numel() < MIN_ELEMENTS:   # channels-last needs a batch dimension
            return F.max_pool2d(x, 2)
        return _MaxPool2x2.apply(x)
