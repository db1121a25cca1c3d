"""nn.Conv1d and nn.Conv2d (stride, padding of any mode, dilation, groups).

Stored: the raw input (Cin x H x W) and the output gradient (Cout x H' x W'), S*(Cin + Cout)
numbers, not unfolded patches. The canonical rows come from unfolding at query time: X rows are
the patches (Cin/groups * kh * kw wide), D rows the output-gradient pixels. With groups, each
group contributes its own rows with D zero outside the group's output channels, so that D^T X
stacks to the (Cout, Cin/groups * kh * kw) weight gradient exactly.
"""
from __future__ import annotations

import functools
import itertools
import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metaql.storage.layers.base import LayerKind, LayerMeta, register

# Where the convolution-form fast paths give way (measured on VGG16 shapes, one thread):
WEIGHT_GRAD_MIN_PIXELS = 16  # Gbar by the weight-gradient kernel: 2x faster at 8x8 outputs, 1.7x slower at 2x2
TAPS_MAX_PIXELS = 8          # X Gram by kernel taps: 1.9x faster than the convolution at 2x2, 1.15x slower at 4x4
TAPS_ONE_PRODUCT_BELOW = 16  # query rows: below, per-tap calls cost more than the products they save (3x at 4)
# D Gram with few query rows as one product with a block-diagonal matrix (L times the useful
# multiply-adds, in one call) up to this many output positions: on 512 channels and R = L query rows,
# 0.40 ms against 1.10 ms of per-sample products at L = 4 (400 samples), 1.33 against 1.26 at L = 8
BLOCK_DIAGONAL_MAX_POSITIONS = 4
# weight-gradient numbers built at once by full_squared_norms (4 MiB: a cache's worth; 64 MiB was
# 2.7x slower on digits conv2 at 2,696 samples, 3.5-5x on 8x8 VGG convolutions of 64-128 channels)
FULL_NORM_GROUP = 1 << 20
# Samples per call of the weight-gradient kernel with the samples as groups: 16 was the fastest of
# 8..256 on digits conv2 (16->32, 8x8: 27 GFLOP/s against 6 at 32 and more), 32->64 at 16x16 and
# 64->64 at 8x8 (2.5-4x faster than 128 at a time), one thread
GRADIENT_GROUP = 16
# ... except for small weight gradients (a first layer on one or a few input channels), where the
# kernel's cost per call dominates: digits conv1 (1->16, 144 numbers) 35.6 ms for 2,048 samples at 16
# a call, 10.9 ms at 256; 3->64 at 32x32 (1,728 numbers) was fastest at 16
SMALL_GRADIENT_NUMBERS = 512
SMALL_GRADIENT_GROUP = 256
# X Gram of a few-pixel input as one product with a dense tap matrix (input pixel x output position)
# when at least this fraction of its pixel-position pairs meets a kernel tap (conv13's 2x2: all)
DENSE_TAPS_MIN_FILL = 0.5
# Convolution outputs made at once by the scan's forward convolutions (batch_average, each_gradient):
# 2 MiB, in cache while multiplied by the output gradient and summed. On digits conv2 (2,000 samples,
# a 16 MB output at once) blocks of 64-512 samples ran 2x faster than one call, on 32->64 at 16x16
# blocks of 16-64 2.5x faster than 512; conv13 (512->512, 2x2) gained little (compute-bound)
CONV_BLOCK_NUMBERS = 1 << 19
# the largest dense tap matrix a forward convolution is turned into (64 MiB of float32)
DENSE_MAX_NUMBERS = 1 << 24


@register(nn.Conv1d, nn.Conv2d)
class Conv(LayerKind):
    kind = "conv"
    gradient_factors = ("DO",)
    modelled_methods = ("forward", "_conv_forward")

    def meta(self, name: str, module: nn.Module) -> LayerMeta:
        dims = 1 if isinstance(module, nn.Conv1d) else 2
        k = tuple(module.kernel_size)
        shapes = {"weight": list(module.weight.shape)}
        if module.bias is not None:
            shapes["bias"] = list(module.bias.shape)
        extra = {"dims": dims, "kernel": list(k), "stride": list(module.stride),
                 "dilation": list(module.dilation), "groups": module.groups,
                 "pad": list(module._reversed_padding_repeated_twice),
                 "pad_mode": "constant" if module.padding_mode == "zeros" else module.padding_mode}
        cin_g = module.in_channels // module.groups
        return LayerMeta(name, self.kind, cin_g * int(torch.tensor(k).prod()), module.out_channels,
                         module.bias is not None, shapes, extra)

    def factors(self, module, inputs, grad_outputs):
        if len(inputs) == 1:
            return {"I": inputs[0], "DO": grad_outputs[0]}
        # several calls (of equal shapes): each call's tensors side by side on a new "call" axis
        return {"I": torch.stack(inputs, dim=1), "DO": torch.stack(grad_outputs, dim=1)}

    def suffix_name(self):
        return "I"

    def rows(self, meta: LayerMeta, factors):
        inp, dout = factors["I"].float(), factors["DO"].float()
        dims = meta.extra["dims"]
        if inp.dim() == dims + 3:            # several calls: fold the call axis into rows
            b, c = inp.shape[:2]
            xs, ds = zip(*(self._rows_one(meta, inp[:, i], dout[:, i]) for i in range(c)))
            return torch.cat(xs, dim=1), torch.cat(ds, dim=1)
        return self._rows_one(meta, inp, dout)

    def positions(self, meta, factors):
        """S from the output gradient's shape: the rows `rows` builds (output positions, times the
        groups and the calls), without unfolding a sample's patches as the base form does: that was
        a fixed cost of every scan that asks (Iterate, EachGradient), 0.06 ms on conv13 (512, 2x2),
        0.33 ms on a 256-channel 8x8 convolution, against scans of a few ms at B = 1."""
        dout, dims = factors["DO"], meta.extra["dims"]
        calls = dout.shape[1] if dout.dim() == dims + 3 else 1
        return calls * meta.extra["groups"] * math.prod(dout.shape[-dims:])

    def gram_x_factors(self, meta, factors, xr):
        """X_n X_q^T without unfolding the training side (kh*kw times fewer numbers to write): a
        convolution of the stored input with the query's patches as filters, or, on inputs of a
        few pixels, products over the kernel taps."""
        inp = factors["I"].float()
        if not _plain(meta, inp):
            return super().gram_x_factors(meta, factors, xr)
        inp, padding = _conv_input(meta, inp)
        if math.prod(inp.shape[2:]) <= TAPS_MAX_PIXELS:
            dense = _dense_taps(meta, inp, xr, padding)
            g = _gram_x_by_taps(meta, inp, xr, padding) if dense is None else \
                (inp.reshape(inp.shape[0], -1) @ dense).reshape(inp.shape[0], -1, xr.shape[0])
        else:
            filters = xr.reshape(xr.shape[0], inp.shape[1], *meta.extra["kernel"])
            g = _conv(meta, inp, filters, None, padding)                        # (N, R, *out)
            g = g.flatten(2).transpose(1, 2)                                   # (N, L, R)
        return g + 1.0 if meta.bias else g

    def average_scores(self, meta, factors, gbar):
        """Lemma 7 as one forward convolution with Gbar as the weight: <D_n, conv(I_n, Gbar)>.
        Measured 2-2.6x faster than im2col and a matrix product (VGG16 conv7 and conv13 shapes)."""
        inp, dout = factors["I"].float(), factors["DO"].float()
        if not _plain(meta, inp):
            return super().average_scores(meta, factors, gbar)
        inp, padding = _conv_input(meta, inp)
        scores = dense_scores(meta, inp, dout, gbar.unsqueeze(0), padding, gbar)
        if scores is not None:
            return scores[:, 0]
        # contiguous once: a sliced Gbar (bias column cut off) would be copied by every block's call
        weight = gbar[:, :meta.din].reshape(dout.shape[1], inp.shape[1], *meta.extra["kernel"]).contiguous()
        bias = gbar[:, meta.din].contiguous() if meta.bias else None
        return torch.cat([_conv(meta, inp[i:j], weight, bias, padding).mul_(dout[i:j]).flatten(1).sum(1)
                          for i, j in sample_blocks(inp.shape[0], math.prod(dout.shape[1:]))])

    def full_squared_norms(self, meta, factors):
        """||grad_n||^2 through the weight-gradient kernel with the samples as groups (one call per
        few samples, no unfolded patches: 5x faster than the Gram form on digits conv2, whose
        unfold alone cost more than the products)."""
        inp, dout = factors["I"].float(), factors["DO"].float()
        if not _plain(meta, inp):
            return None
        numbers = _weight_numbers(meta, inp, dout)
        step = max(1, min(_gradient_group(numbers), FULL_NORM_GROUP // max(1, numbers)))
        out = []
        for i, w, d in _weight_gradient_groups(meta, inp, dout, step):
            norms = w.reshape(w.shape[0], -1).pow(2).sum(1)
            if meta.bias:
                norms += d.flatten(2).sum(2).pow(2).sum(1)
            out.append(norms)
        return torch.cat(out)

    def average_of(self, meta, factors):
        """Gbar by the convolution's own weight-gradient kernel when the output has many pixels;
        on a few pixels im2col is cheaper."""
        inp, dout = factors["I"].float(), factors["DO"].float()
        if not _plain(meta, inp) or math.prod(dout.shape[2:]) < WEIGHT_GRAD_MIN_PIXELS:
            return super().average_of(meta, factors)
        inp, padding = _conv_input(meta, inp)
        e = meta.extra
        weight_grad = torch.nn.grad.conv1d_weight if e["dims"] == 1 else torch.nn.grad.conv2d_weight
        w = weight_grad(inp, (dout.shape[1], inp.shape[1], *e["kernel"]), dout, stride=e["stride"],
                        padding=padding, dilation=e["dilation"]).reshape(dout.shape[1], -1)
        if meta.bias:
            w = torch.cat([w, dout.sum(dim=[0, *range(2, dout.dim())]).unsqueeze(-1)], dim=-1)
        return w / inp.shape[0]

    def gram_d(self, meta, d, dr):
        """With few query rows, products on the stored (C, L) layout beat one large product on the
        transposed rows (3x on conv13 at R = 4): on a few output positions one product of every
        sample's flat output gradient with a block-diagonal matrix of the query rows (2.7x the
        per-sample products on conv13's 2x2), else per-sample products; with many rows, the large one."""
        stored = d.transpose(1, 2)
        if dr.shape[0] < TAPS_ONE_PRODUCT_BELOW and stored.is_contiguous():
            n, length = d.shape[:2]
            if length <= BLOCK_DIAGONAL_MAX_POSITIONS:
                return (stored.reshape(n, -1) @ _block_diagonal(dr, length)).reshape(n, length, dr.shape[0])
            return torch.matmul(dr, stored).transpose(1, 2)
        return super().gram_d(meta, d, dr)

    def d_rows(self, meta, factors):
        dout = factors["DO"].float()
        if not _plain(meta, dout):
            return self.rows(meta, factors)[1]
        return dout.flatten(2).transpose(1, 2)

    def _rows_one(self, meta, inp, dout):
        e = meta.extra
        if any(e["pad"]):
            inp = F.pad(inp, e["pad"], mode=e["pad_mode"])
        if e["dims"] == 1:
            inp, dout = inp.unsqueeze(2), dout.unsqueeze(2)
            kernel, stride, dil = (1, *e["kernel"]), (1, *e["stride"]), (1, *e["dilation"])
        else:
            kernel, stride, dil = tuple(e["kernel"]), tuple(e["stride"]), tuple(e["dilation"])
        b, g = inp.shape[0], e["groups"]
        x = patches(inp, kernel, stride, dil)                                  # (B, L, Cin*kk)
        length = x.shape[1]
        if g > 1:
            width = x.shape[-1] // g
            x = x.reshape(b, length, g, width).transpose(1, 2).reshape(b, g * length, width)
        d = dout.reshape(b, dout.shape[1], length).transpose(1, 2)            # (B, L, Cout)
        if g > 1:
            cout_g = d.shape[2] // g
            blocks = torch.zeros(b, g, length, d.shape[2], dtype=d.dtype, device=d.device)
            for j in range(g):                                                 # a loop over groups, not samples
                blocks[:, j, :, j * cout_g:(j + 1) * cout_g] = d[:, :, j * cout_g:(j + 1) * cout_g]
            d = blocks.reshape(b, g * length, d.shape[2])
        return x, d


def sample_blocks(n: int, per_sample: int) -> list[tuple[int, int]]:
    """(start, end) of blocks of samples whose convolution outputs (per_sample numbers each) hold
    CONV_BLOCK_NUMBERS; one empty block when n = 0."""
    step = max(1, CONV_BLOCK_NUMBERS // max(1, per_sample))
    return [(i, min(i + step, n)) for i in range(0, max(n, 1), step)]


def _plain(meta: LayerMeta, inp: torch.Tensor) -> bool:
    """One call and one group: the shapes the convolution-form fast paths handle."""
    return meta.extra["groups"] == 1 and inp.dim() == meta.extra["dims"] + 2


def _conv_input(meta: LayerMeta, inp: torch.Tensor):
    """(input, padding) for F.convNd: symmetric zero padding happens inside the convolution,
    without a padded copy; any other padding is applied to the input first."""
    pad, mode = meta.extra["pad"], meta.extra["pad_mode"]
    symmetric = mode == "constant" and all(pad[i] == pad[i + 1] for i in range(0, len(pad), 2))
    if symmetric:
        return inp, tuple(reversed(pad[::2]))
    return (F.pad(inp, pad, mode=mode) if any(pad) else inp), 0


def _gram_x_by_taps(meta: LayerMeta, inp: torch.Tensor, xr: torch.Tensor, padding) -> torch.Tensor:
    """X_n X_q^T for inputs of a few pixels (VGG16's last block: 2x2), where a convolution with R
    filters spends its time on set-up. Each output position adds up, over the kernel taps that
    land inside the input, input pixel . query slice of that tap."""
    n, c = inp.shape[:2]
    taps = _taps(meta, tuple(inp.shape[2:]), padding)
    dev = inp.device
    r, k = xr.shape[0], math.prod(meta.extra["kernel"])
    pixels = inp.flatten(2).transpose(1, 2)                                 # (N, P, C), a view
    out = torch.zeros(n, taps.outputs, r, dtype=pixels.dtype, device=dev)
    if r < TAPS_ONE_PRODUCT_BELOW:
        # few query rows: one product of every pixel with every (tap, row), (N*P, C) @ (C, taps*R);
        # some products fall outside the input and are dropped, cheaper than one call per tap
        per_tap = xr.reshape(r, c, k).permute(1, 2, 0).reshape(c, k * r)
        a = (pixels.reshape(-1, c) @ per_tap).reshape(n, -1, r)            # (N, P*taps, R)
        return out.index_add_(1, taps.output_of.to(dev), a.index_select(1, taps.pixel_tap.to(dev)))
    # many query rows: per tap, only the pixels it reaches (on 2x2 with padding 1, 16 products of 36)
    xq = xr.reshape(r, c, k)
    for t, (pix, outs) in taps.by_tap.items():
        # within one tap each output position appears once: no index collisions
        a = pixels[:, pix.to(dev), :].reshape(-1, c) @ xq[:, :, t].T         # (N*|pix|, R)
        out[:, outs.to(dev), :] += a.reshape(n, len(pix), r)
    return out


# One (key, weak reference to the query rows, matrix): the chunks of one scan share it, and it is
# dropped with the query rows (a matrix of conv13 at B = 1000 holds 32 M numbers)
_DENSE_CACHE: list = []


def dense_forward(meta: LayerMeta, inp: torch.Tensor, filters: torch.Tensor, padding, owner: torch.Tensor):
    """On inputs of a few pixels, the convolution with `filters` (F, C * kernel taps) as a function
    of the stored input, inp -> (N, L, F), by one product with the filters' dense tap matrix; None
    where the convolution's own kernel is the better form (more pixels, sparse taps, or a matrix
    above DENSE_MAX_NUMBERS). On conv13's 2x2 maps every (pixel, position) pair meets a tap, so the
    product does the convolution's useful work and no more, at the GEMM's rate: 3x oneDNN's
    direct convolution there (24-31 against 86 GFLOP/s, one thread). `owner`: the query-side
    tensor the filters come from, which the matrix is kept for (a scan's chunks build it once)."""
    if math.prod(inp.shape[2:]) > TAPS_MAX_PIXELS:
        return None
    taps = _taps(meta, tuple(inp.shape[2:]), padding)
    if inp.shape[1] * math.prod(inp.shape[2:]) * taps.outputs * filters.shape[0] > DENSE_MAX_NUMBERS:
        return None
    dense = _dense_taps(meta, inp, filters, padding, owner)
    if dense is None:
        return None
    return lambda x: (x.reshape(x.shape[0], -1) @ dense).reshape(x.shape[0], taps.outputs, filters.shape[0])


def dense_scores(meta: LayerMeta, inp: torch.Tensor, dout: torch.Tensor, grads: torch.Tensor, padding,
                 owner: torch.Tensor) -> torch.Tensor | None:
    """(N, B) <D_n, conv(I_n, G_j)> for B gradients `grads` (B, Cout, din [+ bias]) as filters, by
    one product with their dense tap matrix (dense_forward), or None where that form does not apply."""
    b, cout = grads.shape[:2]
    dense = dense_forward(meta, inp, grads[:, :, :meta.din].reshape(b * cout, meta.din), padding, owner)
    if dense is None:
        return None
    n = inp.shape[0]
    d = dout.reshape(n, cout, -1).transpose(1, 2)                              # (N, L, Cout)
    scores = dense(inp).reshape(n, -1, b, cout).mul_(d.unsqueeze(2)).sum(dim=(1, 3))
    return scores.add_(d.sum(1) @ grads[:, :, meta.din].T) if meta.bias else scores


def _dense_taps(meta: LayerMeta, inp: torch.Tensor, xr: torch.Tensor, padding,
                owner: torch.Tensor | None = None) -> torch.Tensor | None:
    """The query rows as one (C*P, L*R) matrix M with M[(c, p), (l, r)] = xr[r, c, tap] for the
    tap that takes input pixel p to output position l (zero where none does), so that
    X_n X_q^T = I_n (C*P) @ M, one product with no patches and no per-tap calls; None where
    fewer than DENSE_TAPS_MIN_FILL of the (p, l) pairs meet a tap (the zeros would cost more)."""
    c, size = inp.shape[1], tuple(inp.shape[2:])
    taps = _taps(meta, size, padding)
    p, k, r = math.prod(size), math.prod(meta.extra["kernel"]), xr.shape[0]
    if len(taps.output_of) < DENSE_TAPS_MIN_FILL * p * taps.outputs:
        return None

    def build():
        dev = xr.device
        pix, tap = (taps.pixel_tap // k).to(dev), (taps.pixel_tap % k).to(dev)
        m = xr.new_zeros(c, p, taps.outputs, r)
        m[:, pix, taps.output_of.to(dev), :] = xr.reshape(r, c, k)[:, :, tap].permute(1, 2, 0)
        return m.reshape(c * p, taps.outputs * r)
    return _kept_for(_DENSE_CACHE, (meta.name, size, str(padding), tuple(xr.shape)), xr if owner is None else owner,
                     build)


# The same for the block-diagonal matrix of the D Gram (one entry, dropped with the query rows)
_BLOCK_CACHE: list = []


def _block_diagonal(dr: torch.Tensor, length: int) -> torch.Tensor:
    """The query's D rows (R, C) as a (C*L, L*R) matrix M with M[(c, l), (l, r)] = dr[r, c], zero
    off the diagonal blocks, so that a sample's stored output gradient (C, L), flat, times M is its
    (L, R) D Gram: one product for a whole chunk instead of one per sample."""
    def build():
        r, c = dr.shape
        m = dr.new_zeros(c, length, length, r)
        at = torch.arange(length, device=dr.device)
        m[:, at, at, :] = dr.T.unsqueeze(1)
        return m.reshape(c * length, length * r)
    return _kept_for(_BLOCK_CACHE, length, dr, build)


def _kept_for(cache: list, key, rows: torch.Tensor, build) -> torch.Tensor:
    """build() made once for these query rows: the cache's one entry (key, weak reference to the
    rows, matrix) serves the chunks of a scan and is dropped with the rows."""
    if cache and cache[0][0] == key and cache[0][1]() is rows:
        return cache[0][2]
    m = build()
    cache[:] = [(key, weakref.ref(rows, lambda _ref: cache.clear()), m)]
    return m


def sample_gradients(meta: LayerMeta, factors) -> torch.Tensor | None:
    """Each sample's gradient (N, Cout, Cin*kh*kw [+1]) by the weight-gradient kernel with the
    samples as groups, _gradient_group() at a time (no unfolded patches: 5x faster than the einsum
    over patches on digits conv2); None where the convolution is not plain."""
    inp, dout = factors["I"].float(), factors["DO"].float()
    if not _plain(meta, inp):
        return None
    out = inp.new_empty(inp.shape[0], dout.shape[1], meta.din + int(bool(meta.bias)))
    step = _gradient_group(_weight_numbers(meta, inp, dout))
    for i, w, _ in _weight_gradient_groups(meta, inp, dout, step):
        out[i:i + w.shape[0], :, :meta.din] = w.reshape(w.shape[0], dout.shape[1], -1)
    if meta.bias:
        out[:, :, meta.din] = dout.flatten(2).sum(2)
    return out


def _weight_numbers(meta: LayerMeta, inp: torch.Tensor, dout: torch.Tensor) -> int:
    """Numbers of one sample's weight gradient (Cin x Cout x kernel taps; the bias apart)."""
    return inp.shape[1] * dout.shape[1] * math.prod(meta.extra["kernel"])


def _gradient_group(numbers: int) -> int:
    """Samples per call of the weight-gradient kernel for a weight gradient of `numbers` numbers."""
    return SMALL_GRADIENT_GROUP if numbers <= SMALL_GRADIENT_NUMBERS else GRADIENT_GROUP


def _weight_gradient_groups(meta: LayerMeta, inp: torch.Tensor, dout: torch.Tensor, step: int):
    """(first sample, its group's weight gradients (b, Cout, Cin, *kernel), the group's output
    gradients), `step` samples a call of the weight-gradient kernel with the samples as groups."""
    inp, padding = _conv_input(meta, inp)
    e = meta.extra
    weight_grad = torch.nn.grad.conv1d_weight if e["dims"] == 1 else torch.nn.grad.conv2d_weight
    cin, cout = inp.shape[1], dout.shape[1]
    for i in range(0, inp.shape[0], step):
        x, d = inp[i:i + step], dout[i:i + step]
        b = x.shape[0]
        w = weight_grad(x.reshape(1, b * cin, *x.shape[2:]), (b * cout, cin, *e["kernel"]),
                        d.reshape(1, b * cout, *d.shape[2:]), stride=e["stride"], padding=padding,
                        dilation=e["dilation"], groups=b)
        yield i, w.reshape(b, cout, cin, *e["kernel"]), d


@dataclass(frozen=True)
class Taps:
    """Where each kernel tap lands, for an input size: every (output position, input pixel, tap)
    inside the input, flat (output_of, pixel_tap = pixel * taps + tap) and grouped by tap."""
    outputs: int
    output_of: torch.Tensor
    pixel_tap: torch.Tensor
    by_tap: dict[int, tuple[torch.Tensor, torch.Tensor]]     # tap -> (input pixels, output positions)


@functools.lru_cache(maxsize=64)
def _taps_cached(kernel, stride, dilation, size, padding) -> Taps:
    out = [(s + 2 * p - d * (k - 1) - 1) // st + 1 for s, p, d, k, st in zip(size, padding, dilation, kernel, stride)]
    triples = []
    for o, pos in enumerate(itertools.product(*map(range, out))):
        for t, off in enumerate(itertools.product(*map(range, kernel))):
            at = [q * st + f * d - p for q, st, f, d, p in zip(pos, stride, off, dilation, padding)]
            if all(0 <= a < s for a, s in zip(at, size)):
                triples.append((o, int(np.ravel_multi_index(at, size)), t))
    k = math.prod(kernel)
    by_tap = {t: (torch.tensor([p for _, p, u in triples if u == t]), torch.tensor([o for o, _, u in triples if u == t]))
              for t in sorted({u for _, _, u in triples})}
    return Taps(math.prod(out), torch.tensor([o for o, _, _ in triples], dtype=torch.long),
                torch.tensor([p * k + t for _, p, t in triples], dtype=torch.long), by_tap)


def _taps(meta: LayerMeta, size, padding) -> Taps:
    e = meta.extra
    pad = (0,) * len(size) if padding == 0 else tuple(padding)
    return _taps_cached(tuple(e["kernel"]), tuple(e["stride"]), tuple(e["dilation"]), size, pad)


def _conv(meta: LayerMeta, inp, weight, bias, padding):
    e = meta.extra
    conv = F.conv1d if e["dims"] == 1 else F.conv2d
    return conv(inp, weight, bias, stride=e["stride"], dilation=e["dilation"], padding=padding)


def patches(inp: torch.Tensor, kernel, stride, dilation) -> torch.Tensor:
    """im2col as strided views and one copy: (B, C, H, W) -> (B, L, C*kh*kw), C-major like the
    weight's layout. On CPU this is an order of magnitude faster than F.unfold for many channels."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    v = inp.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)   # B C oh ow span_h span_w
    v = v[..., ::dh, ::dw]
    b, c, oh, ow = v.shape[:4]
    return v.permute(0, 2, 3, 1, 4, 5).reshape(b, oh * ow, c * kh * kw)
