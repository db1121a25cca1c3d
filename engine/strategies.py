"""The physical strategies of an influence scan, one registered object each.

A strategy says where it applies (how the layer is stored), what it costs (flops and bytes read,
after MetaStore's formulas: papers/000 §17-18, DESIGN.md "The math"), what it needs of the query
side, how many numbers one training sample takes in a chunk, and how it scores a chunk. The cost
model, the optimizer, the executor and EXPLAIN all look strategies up here by name instead of
comparing strings; a new strategy is one class and one `register` call.
"""
from __future__ import annotations

import numpy as np
import torch

from metaql.engine import operators as ops

BYTES_PER_NUMBER = 4


class ScanStrategy:
    name = ""
    stored: tuple[str, ...] = ("factored",)    # storage modes it reads
    baseline = False      # shown by EXPLAIN and run when forced, never picked by cost
    approximate = False   # an estimate of the score (metaql.approx prices and picks it, not the cost model)
    replays = False       # reads factors replayed now, not the stored shards
    needs: frozenset = frozenset({"gbar"})    # of the query side: "gbar" (average gradient), "rows"
    each = False          # scores every query sample apart (the train x query matrix, query=each(set))
    self_influence = False    # scores each training sample against itself (SELF_INFLUENCE: no query side)

    def applies_to(self, kind) -> bool:
        """False where the strategy is not exact for a layer kind (engine.operators says which)."""
        return True

    def estimate(self, sh) -> dict[str, float]:
        """{flops, bytes} over N training samples for the shapes `sh` (engine.cost.Shapes)."""
        raise NotImplementedError

    def extra_numbers(self, meta, tensors: dict, q, per_sample: int) -> int:
        """Numbers one training sample takes in a chunk, from the stored ones (`per_sample`)."""
        return per_sample

    def scores(self, kind, meta, chunk: dict, q) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<strategy {self.name}>"


def _params(sh) -> int:
    return sh.din * sh.dout


def _query_side(sh) -> int:
    """Flops of building the query batch's average gradient."""
    return sh.b * sh.sq * _params(sh)


def _read(sh) -> int:
    return sh.n * sh.s * (sh.din + sh.dout) * BYTES_PER_NUMBER


class FullDot(ScanStrategy):
    """Stored full gradients against the query side's flattened average gradient."""
    name, stored = "full_dot", ("full",)

    def estimate(self, sh):
        return {"flops": sh.n * _params(sh) + _query_side(sh), "bytes": sh.n * _params(sh) * BYTES_PER_NUMBER}

    def scores(self, kind, meta, chunk, q):
        return ops.full_dot(chunk["G"].float(), q)


class Iterate(ScanStrategy):
    """Gram products of rows with every query sample's rows; no gradient is built."""
    name, needs = "iterate", frozenset({"rows"})

    def estimate(self, sh):
        # the two (S, B*Sq) Gram products per sample are written and read back
        return {"flops": sh.n * sh.b * sh.s * sh.sq * (sh.din + sh.dout),
                "bytes": _read(sh) + 3 * sh.n * sh.s * sh.b * sh.sq * BYTES_PER_NUMBER}

    def extra_numbers(self, meta, tensors, q, per_sample):
        if q is None or "x_rows" not in q:
            return per_sample
        from metaql.storage.layers import kind_named
        # a convolution may build patches (kernel taps x the input) and per-tap products
        taps = int(np.prod(meta.extra.get("kernel", [1]))) if meta.extra else 1
        rows = kind_named(meta.kind).positions(meta, {k: v[:1] for k, v in tensors.items()})
        return per_sample * taps + rows * len(q["x_rows"]) * (2 * taps + 1)

    def scores(self, kind, meta, chunk, q):
        return ops.iterate(kind, meta, chunk, q)


class BatchAverage(ScanStrategy):
    """Lemma 7: one product of each training sample's rows with the query's average gradient."""
    name = "batch_average"

    def estimate(self, sh):
        # the (S, dout) product per sample is written, multiplied in place and read back
        return {"flops": sh.n * sh.s * _params(sh) + _query_side(sh),
                "bytes": _read(sh) + 3 * sh.n * sh.s * sh.dout * BYTES_PER_NUMBER}

    def scores(self, kind, meta, chunk, q):
        return ops.batch_average(kind, meta, chunk, q)


class Reconstruct(ScanStrategy):
    """Builds each training gradient, then one inner product (the paper's baseline)."""
    name = "reconstruct"

    def estimate(self, sh):
        # each built gradient is written, multiplied by Gbar into a second one, and both read back
        return {"flops": sh.n * (sh.s * _params(sh) + _params(sh)) + _query_side(sh),
                "bytes": _read(sh) + 4 * sh.n * _params(sh) * BYTES_PER_NUMBER}

    def extra_numbers(self, meta, tensors, q, per_sample):
        return per_sample + meta.params

    def scores(self, kind, meta, chunk, q):
        return ops.reconstruct(kind, meta, chunk, q)


class Recompute(ScanStrategy):
    """Replays each training sample now instead of reading its factors, then scores them as the
    stored form would (full_dot or batch_average). Its formula is a lower bound (at least this
    layer's forward and two backward products; the whole model's are extra), so it is a baseline."""
    name, stored, baseline, replays = "recompute", ("factored", "full"), True, True

    def estimate(self, sh):
        return {"flops": sh.n * 4 * sh.s * _params(sh) + _query_side(sh),
                "bytes": sh.n * sh.s * sh.din * BYTES_PER_NUMBER}

    def delegate(self, kind) -> tuple[str, ScanStrategy]:
        """(storage mode, strategy) that scores the replayed factors."""
        return ("factored", STRATEGIES["batch_average"]) if kind.factored else ("full", STRATEGIES["full_dot"])


class SelfNorm(ScanStrategy):
    """Self-influence of a layer stored full: each stored gradient's squared norm."""
    name, stored, needs, self_influence = "self_norm", ("full",), frozenset(), True
    form = None

    def estimate(self, sh):
        return {"flops": 2 * sh.n * sh.s * _params(sh), "bytes": sh.n * sh.s * sh.din * BYTES_PER_NUMBER}


class SelfGram(SelfNorm):
    """||g_n||^2 = sum((X_n X_n^T) * (D_n D_n^T)) from the factors: S^2 (din + dout) per sample,
    no gradient built; the cheap form when a sample has few rows (a linear layer: one)."""
    name, stored, form = "self_gram", ("factored",), "gram"

    def estimate(self, sh):
        return {"flops": sh.n * sh.s * sh.s * (sh.din + sh.dout), "bytes": _read(sh)}


class SelfFull(SelfNorm):
    """Each sample's gradient D_n^T X_n built inside the chunk (never stored), then its squared
    norm: S din dout per sample, the cheap form when S > din dout / (din + dout) (a small
    convolution with many output pixels: digits conv2 at 8x8 has S = 64 against 36)."""
    name, stored, form = "self_full", ("factored",), "full"

    def estimate(self, sh):
        return {"flops": sh.n * (sh.s + 1) * _params(sh), "bytes": _read(sh)}


# ---- the train x query matrix (query=each(set)): scores (N, B), one column per query sample ------
# Each estimate also gives `space`: the numbers the query side holds (every query sample's rows or
# gradients, kept apart), which the optimizer weighs against engine.cost.SPACE_LIMIT.

def _accumulate(sh) -> int:
    """Bytes of adding a layer's (N, B) scores into the block's float64 sums."""
    return sh.n * sh.b * 8


class EachIterate(Iterate):
    """Gram products of each training sample's rows with every query sample's rows, summed per
    query sample: iterate kept apart per column; no gradient is built on either side."""
    name, each = "each_iterate", True

    def estimate(self, sh):
        return {"flops": sh.n * sh.b * sh.s * sh.sq * (sh.din + sh.dout + 1), "bytes": _read(sh) + _accumulate(sh),
                "space": sh.b * sh.sq * (sh.din + sh.dout)}

    def scores(self, kind, meta, chunk, q):
        return ops.pairwise_iterate(kind, meta, chunk, q)


class EachGradient(ScanStrategy):
    """Lemma 7 against each query sample's own gradient: one product of the training rows with the
    B query gradients side by side (for a convolution, one convolution with B*Cout filters)."""
    name, each, needs = "each_gradient", True, frozenset({"grads"})

    def applies_to(self, kind):
        return ops.has_pairwise_gradient(kind)

    def estimate(self, sh):
        return {"flops": sh.n * sh.s * sh.b * (_params(sh) + sh.dout) + _query_side(sh),
                "bytes": _read(sh) + _accumulate(sh), "space": sh.b * _params(sh)}

    def extra_numbers(self, meta, tensors, q, per_sample):
        from metaql.storage.layers import kind_named
        kind = kind_named(meta.kind)
        rows = kind.positions(meta, {k: v[:1] for k, v in tensors.items()})
        taps = int(np.prod(meta.extra.get("kernel", [1]))) if meta.extra else 1
        width = meta.din if meta.kind == "embedding" else meta.dout     # an embedding gathers rows of dim
        return per_sample * taps + rows * (q["count"] if q else 1) * width

    def scores(self, kind, meta, chunk, q):
        return ops.pairwise_gradient(kind, meta, chunk, q)


class EachReconstruct(ScanStrategy):
    """Builds each training gradient, then one product with every query gradient: the fallback for
    a kind with no factored pairwise product."""
    name, each, needs = "each_reconstruct", True, frozenset({"flat"})

    def estimate(self, sh):
        # the built gradients are written and read back once: N * P numbers of traffic
        return {"flops": sh.n * (sh.s + sh.b) * _params(sh) + _query_side(sh),
                "bytes": _read(sh) + sh.n * _params(sh) * BYTES_PER_NUMBER + _accumulate(sh),
                "space": sh.b * _params(sh)}

    def extra_numbers(self, meta, tensors, q, per_sample):
        return per_sample + meta.params + (q["count"] if q else 1)

    def scores(self, kind, meta, chunk, q):
        return ops.pairwise_reconstruct(kind, meta, chunk, q)


class EachFullDot(ScanStrategy):
    """Stored full gradients against every query sample's gradient: one (N, P) x (P, B) product."""
    name, stored, each, needs = "each_full_dot", ("full",), True, frozenset({"flat"})

    def estimate(self, sh):
        return {"flops": sh.n * sh.b * _params(sh) + _query_side(sh),
                "bytes": sh.n * _params(sh) * BYTES_PER_NUMBER + _accumulate(sh), "space": sh.b * _params(sh)}

    def extra_numbers(self, meta, tensors, q, per_sample):
        return per_sample + (q["count"] if q else 1)

    def scores(self, kind, meta, chunk, q):
        return ops.pairwise_full(chunk["G"], q)


STRATEGIES: dict[str, ScanStrategy] = {}


def register(strategy: ScanStrategy) -> ScanStrategy:
    STRATEGIES[strategy.name] = strategy
    return strategy


# registration order is the order of the estimates (and so of ties in the optimizer's pick)
for _cls in (FullDot, Iterate, BatchAverage, Reconstruct, Recompute, SelfNorm, SelfGram, SelfFull,
             EachFullDot, EachIterate, EachGradient, EachReconstruct):
    register(_cls())


def strategy_named(name: str) -> ScanStrategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        from metaql.errors import InvalidInputException
        raise InvalidInputException(f"unknown strategy '{name}'; strategies: "
                                    f"{', '.join(n for n, s in STRATEGIES.items() if s.stored)}") from None


def applicable(stored: str, each: bool = False, kind=None, self_influence: bool = False) -> list[ScanStrategy]:
    """The strategies that read a layer stored `stored`, in registration order: those that score
    each query sample apart when `each`, those that score each sample against itself when
    `self_influence`, else those that score the query side as one; with a layer `kind`, only
    those exact for it."""
    return [s for s in STRATEGIES.values()
            if stored in s.stored and s.each == each and s.self_influence == self_influence
            and (kind is None or s.applies_to(kind))]


def needs_of(names) -> set[str]:
    """What of the query side the strategies `names` need together (None: everything)."""
    if names is None:
        return {"gbar", "rows"}
    return set().union(*(STRATEGIES[n].needs for n in names)) if names else set()
