"""Per-sample gradients held as factors, and the three products weighted K-means needs of them.

A sample's gradient G_j is the concatenation of blocks (a layer at a checkpoint), block b scaled
by sqrt(scale_b). Every product is computed from the blocks' canonical rows (X, D) with the layer
kinds' primitives, never from a built gradient matrix:

    ||G_j||^2          sum_b scale_b * sum((D D^T) * (X X^T))        (the self-norm operator)
    C_u                per block the weighted batch average sum_j u_j G_j / sum_j u_j
    <G_j, C_u>         sum_b scale_b * sum(D_j * (X_j C^T))          (Lemma 7, one scan)
    ||C_u||^2          sum_b scale_b * ||C_b||_F^2

so a centroid (a weighted batch average of its cluster's members) costs one pass over the rows and
its distances to every sample one more. A layer stored full (norm layers, small layers) is a matrix per sample
already; its products are plain matrix products.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from metaql.storage.layers.base import LayerKind

CHUNK = 4096        # samples per product: bounds the (chunk, S, width) intermediates
ROWS_CACHE = 2 ** 25    # canonical rows kept between K-means passes up to this many numbers per block


@dataclass
class Block:
    """One layer's per-sample factors (batch first, in the order of the samples) at one checkpoint.
    The kinds' rows are float32 (as the engine scores); sums over samples are kept in float64."""
    name: str          # 'checkpoint/layer', for messages
    kind: object
    meta: object
    factors: dict
    scale: float = 1.0

    @property
    def full(self) -> bool:
        """Stored as full gradients (a kind that is never factored, or a layer whose full form is
        smaller than its factors, which capture then stores as 'G')."""
        return "G" in self.factors or not self.kind.factored

    @property
    def count(self) -> int:
        return next(iter(self.factors.values())).shape[0]

    def chunks(self):
        for start in range(0, self.count, CHUNK):
            yield {k: v[start:start + CHUNK] for k, v in self.factors.items()}

    def rows(self):
        """(X, D) of each chunk. K-means reads them once per centroid per iteration, so they are
        built once (a convolution's rows are its input patches) when they fit in ROWS_CACHE."""
        cached = getattr(self, "_rows", None)
        if cached is not None:
            return cached
        out = [self.kind.rows(self.meta, c) for c in self.chunks()]
        if sum(t.numel() for xd in out for t in xd) <= ROWS_CACHE:
            self._rows = out
        return out


class FactoredGradients:
    """The gradients of N samples as blocks of factors; see the module's docstring."""

    def __init__(self, blocks: list[Block]):
        if not blocks:
            raise ValueError("no gradient blocks")
        self.blocks = blocks
        self.n = blocks[0].count

    def scaled(self, scales: list[float]) -> "FactoredGradients":
        """The same factors with other block scales (GBC's draws share one read of the factors)."""
        return FactoredGradients([Block(b.name, b.kind, b.meta, b.factors, s) for b, s in zip(self.blocks, scales)])

    def sq_norms(self) -> torch.Tensor:
        out = torch.zeros(self.n, dtype=torch.float64)
        for b in self.blocks:
            if b.scale == 0:
                continue
            parts = [_full(b, c).pow(2).sum(1) for c in b.chunks()] if b.full else \
                [(b.kind.self_gram_x(b.meta, x) * b.kind.self_gram_d(b.meta, d)).sum(dim=(1, 2)) for x, d in b.rows()]
            out += b.scale * torch.cat(parts).double()
        return out

    def centroid(self, u: torch.Tensor) -> list[torch.Tensor | None]:
        """Per block the weighted average sum_j u_j G_j / sum_j u_j (u >= 0, not all zero)."""
        u = u.double() / u.double().sum()
        out = []
        for b in self.blocks:
            if b.scale == 0:
                out.append(None)
                continue
            total = None
            for start, c in zip(range(0, b.count, CHUNK), b.chunks() if b.full else b.rows()):
                part = _weighted_sum(b, c, u[start:start + CHUNK])
                total = part if total is None else total + part
            out.append(total)
        return out

    def dots(self, centroid: list) -> tuple[torch.Tensor, float]:
        """(<G_j, C> for every j, ||C||^2) for a centroid made by `centroid`."""
        out = torch.zeros(self.n, dtype=torch.float64)
        norm = 0.0
        for b, c in zip(self.blocks, centroid):
            if c is None:
                continue
            parts = [_full(b, ch) @ c.reshape(-1) for ch in b.chunks()] if b.full else \
                [b.kind.apply_average(b.meta, x, d, c.float()) for x, d in b.rows()]
            out += b.scale * torch.cat(parts).double()
            norm += b.scale * float(c.double().pow(2).sum())
        return out, norm

    def layer_energy(self) -> list[float]:
        """A(l) of GBC (Eq. 14) per block: ||(1/N) sum_j G_j^(l)||_F^2, the batch average's norm."""
        mean = self.centroid(torch.ones(self.n, dtype=torch.float64))
        return [0.0 if c is None else float(c.double().pow(2).sum()) for c in mean]


def _full(b: Block, chunk: dict) -> torch.Tensor:
    return b.kind.full(b.meta, chunk).double()


def _weighted_sum(b: Block, chunk, u: torch.Tensor) -> torch.Tensor:
    """sum_j u_j G_j over a chunk (factors when stored full, else its rows (X, D)), in the block's
    gradient shape (dout, din [+1]) or flat (full)."""
    if b.full:
        return u @ _full(b, chunk)
    x, d = chunk
    # the gradient D^T X is linear in each side: scale whichever side holds numbers (an embedding's
    # D side holds token ids)
    w = u.to(x.dtype if x.is_floating_point() else d.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    if d.is_floating_point():
        d = d * w
    else:
        x = x * w
    if type(b.kind).average is not LayerKind.average:
        return b.kind.average(b.meta, x, d).double() * x.shape[0]
    # the dense form's sum over samples and rows as one matrix product (einsum's batched path is
    # several times slower for one row per sample)
    g = d.reshape(-1, d.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    if b.meta.bias:
        g = torch.cat([g, d.sum(dim=(0, 1)).unsqueeze(-1)], dim=-1)
    return g.double()
