"""Per-sample gradients held as factors, and the three products weighted K-means needs of them.

A sample's gradient G_j is the concatenation of blocks (a layer at a checkpoint), block b scaled
by sqrt(scale_b). Every product is computed from the blocks' canonical rows (X, D) with the layer
kinds' primitives, never from a built gradient matrix:

    ||G_j||^2          sum_b scale_b * sum((D D^T) * (X X^T))        (the self-norm operator, once)
    C_c                per block the weighted batch average sum_j U_jc G_j / sum_j U_jc,
                       a small (dout, din [+1]) matrix per layer and centroid
    <G_j, C_c>         sum_b scale_b * sum(D_j * (X_j C_c^T))        (Lemma 7)
    ||C_c||^2          sum_b scale_b * ||C_c,b||_F^2

The k centroids of a partition are built in one pass over the rows (each sample read for its own
cluster only), and <G_j, C_c> for all j and c is one more pass: X (rows, din) times the k centroids
side by side (din, k*dout), then D. So a Lloyd iteration reads the rows twice whatever k is. A layer
the store keeps full (norm layers, layers whose gradient is smaller than their factors; replayed
ones are held the same way, sources.py) is a matrix per sample already; its products are plain
matrix products.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from metaql.storage.layers.base import LayerKind

CHUNK = 4096        # samples per product: bounds the (chunk, S, width) intermediates
ROWS_CACHE = 2 ** 25    # canonical rows kept between K-means passes up to this many numbers per block
SCORE_NUMBERS = 2 ** 24  # bound on the (rows, k * dout) product scoring all centroids at once


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

    def parts(self):
        """Each chunk's full gradients (N, P) when stored full, else its rows (X, D). K-means reads
        them twice per iteration, so they are built once (a convolution's rows are its input
        patches) when they fit in ROWS_CACHE."""
        cached = getattr(self, "_parts", None)
        if cached is not None:
            return cached
        out = [_full(self, c) if self.full else self.kind.rows(self.meta, c) for c in self.chunks()]
        if sum(t.numel() for part in out for t in ([part] if self.full else part)) <= ROWS_CACHE:
            self._parts = out
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
            parts = [f.pow(2).sum(1) for f in b.parts()] if b.full else \
                [(b.kind.self_gram_x(b.meta, x) * b.kind.self_gram_d(b.meta, d)).sum(dim=(1, 2)) for x, d in b.parts()]
            out += b.scale * torch.cat(parts).double()
        return out

    def centroids(self, weights: torch.Tensor, normalize: bool = True) -> list[torch.Tensor | None]:
        """Per block the k weighted averages C_c = sum_j U_jc G_j / sum_j U_jc, stacked (k, *shape),
        for the columns of U (N, k) (U >= 0, no column all zero); normalize=False: the sums
        sum_j U_jc G_j as given (any signs; the cosine clustering's turned unit gradients). Only a
        column's non-zero rows are read, so the centroids of a partition (one non-zero per row)
        cost one pass for all k."""
        u = weights.double()
        if normalize:
            u = u / u.sum(0, keepdim=True)
        members = [torch.nonzero(u[:, c]).flatten() for c in range(u.shape[1])]
        out = []
        for b in self.blocks:
            if b.scale == 0:
                out.append(None)
                continue
            totals = [None] * len(members)
            for start, part in zip(range(0, b.count, CHUNK), b.parts()):
                size = (part if b.full else part[0]).shape[0]
                for c, idx in enumerate(members):
                    local = idx[(idx >= start) & (idx < start + size)]
                    if len(local):
                        s = _weighted_sum(b, _take(b, part, local - start), u[local, c])
                        totals[c] = s if totals[c] is None else totals[c] + s
            out.append(torch.stack(totals))
        return out

    def scores(self, centroids: list) -> tuple[torch.Tensor, torch.Tensor]:
        """((N, k) <G_j, C_c>, (k,) ||C_c||^2) for centroids made by `centroids`: per block one scan
        of the rows against all k centroids at once (one product k * dout wide), not k scans."""
        k = next(c.shape[0] for c in centroids if c is not None)
        out = torch.zeros(self.n, k, dtype=torch.float64)
        norms = torch.zeros(k, dtype=torch.float64)
        for b, c in zip(self.blocks, centroids):
            if c is None:
                continue
            out += b.scale * torch.cat([_scores(b, part, c) for part in b.parts()]).double()
            norms += b.scale * c.double().flatten(1).pow(2).sum(1)
        return out, norms

    def centroid(self, u: torch.Tensor) -> list[torch.Tensor | None]:
        """Per block the weighted average sum_j u_j G_j / sum_j u_j (u >= 0, not all zero)."""
        return [None if c is None else c[0] for c in self.centroids(u.reshape(-1, 1))]

    def dots(self, centroid: list) -> tuple[torch.Tensor, float]:
        """(<G_j, C> for every j, ||C||^2) for a centroid made by `centroid`."""
        dots, norms = self.scores([None if c is None else c.unsqueeze(0) for c in centroid])
        return dots[:, 0], float(norms[0])

    def layer_energy(self) -> list[float]:
        """A(l) of GBC (Eq. 14) per block: ||(1/N) sum_j G_j^(l)||_F^2, the batch average's norm."""
        mean = self.centroid(torch.ones(self.n, dtype=torch.float64))
        return [0.0 if c is None else float(c.double().pow(2).sum()) for c in mean]


def _full(b: Block, chunk: dict) -> torch.Tensor:
    return b.kind.full(b.meta, chunk).double()


def _take(b: Block, part, idx: torch.Tensor):
    return part[idx] if b.full else (part[0][idx], part[1][idx])


def _scores(b: Block, part, c: torch.Tensor) -> torch.Tensor:
    """(n, k) <G_j, C_c> for the samples of one part (a full matrix or rows (X, D))."""
    if b.full:
        return part @ c.reshape(c.shape[0], -1).T
    x, d = part
    if type(b.kind).apply_average is not LayerKind.apply_average:      # a kind's own Lemma 7 (embedding)
        return torch.stack([b.kind.apply_average(b.meta, x, d, ci.float()) for ci in c], 1)
    return dense_scores(b.meta, x, d, c.float())


def dense_scores(meta, x: torch.Tensor, d: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Lemma 7 against k matrices at once: sum(D_n * (X_n C_c^T)) for every sample n and c, as
    one product X (rows, din) @ (din, k*dout), split over the centroids so that the (rows, k*dout)
    intermediate stays under SCORE_NUMBERS."""
    n, s, dout = d.shape
    rows = x.reshape(-1, x.shape[-1])
    group = max(1, SCORE_NUMBERS // max(1, rows.shape[0] * dout))
    out = []
    for lo in range(0, c.shape[0], group):
        cg = c[lo:lo + group]
        w = cg[:, :, :meta.din].reshape(-1, meta.din).T
        y = torch.addmm(cg[:, :, meta.din].reshape(-1), rows, w) if meta.bias else rows @ w
        out.append(y.reshape(n, s, -1, dout).mul_(d.unsqueeze(2)).sum(dim=(1, 3)))
    return torch.cat(out, 1)


def _weighted_sum(b: Block, chunk, u: torch.Tensor) -> torch.Tensor:
    """sum_j u_j G_j over a chunk (its full gradients when stored full, else its rows (X, D)), in
    the block's gradient shape (dout, din [+1]) or flat (full)."""
    if b.full:
        return u @ chunk
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
