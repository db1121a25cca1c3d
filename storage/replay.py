"""Replay: per-sample factors of given samples at fixed weights, in eval mode.

Used for samples never trained on (test samples at query time) and for exact factors at a saved
checkpoint. Weights are never touched: gradients are taken w.r.t. the layer outputs only.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from metaql.errors import Error, InvalidInputException
from metaql.storage.hooks import LayerHooks
from metaql.storage.inputs import batch_size as batch_size_of, call_model, take_rows


def iter_replay(model: nn.Module, hooks: LayerHooks, inputs, labels: torch.Tensor | None,
                target: str = "label", batch_size: int = 256, task=None
                ) -> Iterator[tuple[slice, dict[str, dict[str, torch.Tensor]]]]:
    """Yields (rows, {layer: factors}) batch by batch, through the given (unattached) hooks.
    `inputs` are held in memory in any structure storage/inputs.py accepts (a tensor, a tuple, a
    dict); `labels` are the task's stored targets (metaql.storage.tasks; default classification)."""
    n = batch_size_of(inputs)
    batches = ((rows, take_rows(inputs, rows), None if labels is None else labels[rows])
               for rows in (slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)))
    return replay_batches(model, hooks, batches, target, task)


@dataclass(eq=False)
class ReplayTally:
    """Replays counted while it is open (replay_tally): samples, batches, and seconds by the cost
    model's clock (engine.cost.work_clock), reading the inputs included."""
    samples: int = 0
    batches: int = 0
    seconds: float = 0.0

    def text(self) -> str:
        return f"{self.samples} sample(s) in {self.batches} batch(es), {self.seconds:.3g} s"


_TALLIES = threading.local()


@contextlib.contextmanager
def replay_tally() -> Iterator[ReplayTally]:
    """Counts the replays this thread runs inside the block (nested tallies each count them):
    EXPLAIN ANALYZE says what a statement's query sides and rescoring cost."""
    tally = ReplayTally()
    stack = _TALLIES.__dict__.setdefault("stack", [])
    stack.append(tally)
    try:
        yield tally
    finally:
        stack[:] = [t for t in stack if t is not tally]


def _count(samples: int, seconds: float) -> None:
    for tally in getattr(_TALLIES, "stack", ()):
        tally.samples += samples
        tally.batches += 1
        tally.seconds += seconds


# ---- what a replay costs, learned from this process's replays ----------------------------------
# A replay's time is affine in its batch, with a large fixed part (one thread here: the digits MLP
# 0.61 ms for 1 sample, 0.59 ms for 64, 4.3 ms for 1,024), so no per-sample rate prices both a query
# of 8 samples and a rescoring of 500; the cost model does not see the model's own layers either.
# So each replay of a model the store rebuilt (Store.model_at tags it with REPLAY_KEY) is kept as
# (samples, seconds), and a line a + b x samples per batch is fitted to them once two batch sizes
# were seen (a query side and con.replay's batches of 256, or two query sides of different sizes).
REPLAY_KEY = "_metaql_replay_key"
MAX_SEEN = 64           # observations kept per model and thread count (the latest)
_SEEN: dict[tuple, list[tuple[int, float]]] = {}
_SEEN_LOCK = threading.Lock()


def _observe(model: nn.Module, samples: int, seconds: float) -> None:
    key = getattr(model, REPLAY_KEY, None)
    if key is None:
        return
    with _SEEN_LOCK:
        key = (*key, torch.get_num_threads())
        if key not in _SEEN:        # the first batch warms up (lazy initialisation, the weights' pages)
            _SEEN[key] = []
            return
        seen = _SEEN[key]
        seen.append((samples, seconds))
        del seen[:-MAX_SEEN]


def replay_seconds(key: tuple, samples: int, batch_size: int = 256, kept=()) -> float | None:
    """Seconds (the cost model's clock) to replay `samples` samples of the model `key` names
    (REPLAY_KEY's (store root, model id)) in batches of `batch_size`, by the line fitted to this
    process's replays of it at the current thread count and the earlier processes' ones the
    catalog `kept` (Store.kept_replay_times); None until two batch sizes were seen."""
    with _SEEN_LOCK:
        seen = list(_SEEN.get((*key, torch.get_num_threads()), ()))
    fit = affine_fit([tuple(o) for o in kept] + seen)
    if fit is None or samples <= 0:
        return None if fit is None else 0.0
    a, b = fit
    full, rest = divmod(samples, batch_size)
    return full * (a + b * batch_size) + (a + b * rest if rest else 0.0)


def seen_for(root: str) -> dict[str, list[tuple[int, float]]]:
    """This process's replay times of the models of the store at `root`, by "model id/threads"
    (what Store.close keeps in the catalog for the next processes)."""
    with _SEEN_LOCK:
        return {f"{key[1]}/{key[2]}": list(seen) for key, seen in _SEEN.items() if key[0] == root and seen}


def affine_fit(seen: list[tuple[int, float]]) -> tuple[float, float] | None:
    """(a, b) of seconds = a + b x samples by least squares through the median time of each batch
    size (a replay that lost a time slice moves it less), both kept >= 0; None with fewer than two
    distinct batch sizes."""
    sizes = sorted({n for n, _ in seen})
    if len(sizes) < 2:
        return None
    n = np.array(sizes, dtype=np.float64)
    t = np.array([np.median([s for m, s in seen if m == size]) for size in sizes])
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(n), n], 1), t, rcond=None)
    if b < 0:
        return float(t.mean()), 0.0
    if a < 0:
        return 0.0, float((t * n).sum() / (n * n).sum())
    return float(a), float(b)


def replay_batches(model: nn.Module, hooks: LayerHooks, batches, target: str = "label", task=None):
    """Yields (key, {layer: factors}) for each (key, inputs, labels) of `batches`, which may be read
    lazily (Store.input_batches): one batch's inputs and factors are held at a time."""
    from metaql.engine.cost import work_clock
    from metaql.storage.tasks import Classification
    task = task or Classification()
    task.check_target(target)
    if hooks.root is None:
        hooks.root = model      # the model's batch size, for layers that see a batch of one
    hooks.attach()
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            began = work_clock()
            for key, x, y in batches:
                hooks.clear()
                loss = _losses(model, task, x, y, target)
                outputs = [o for outs in hooks.outputs.values() for o in outs]
                # autograd.grad w.r.t. the outputs fires their hooks and leaves .grad of weights alone;
                # an output the loss does not use is left to hooks.factors to report by its layer's name
                if outputs:
                    torch.autograd.grad(loss.sum(), outputs, allow_unused=True)
                factors = hooks.factors()
                rows, spent = batch_size_of(x), work_clock() - began
                _count(rows, spent)
                _observe(model, rows, spent)
                yield key, factors
                began = work_clock()
    finally:
        hooks.detach()
        model.train(was_training)


def _losses(model: nn.Module, task, x, y, target: str) -> torch.Tensor:
    """The task's per-sample losses of the model on one batch. What the model or its loss cannot
    take (a wrong shape or dtype, a class beyond its outputs) is an error of the samples given, and
    is said as one rather than as torch's bare exception."""
    try:
        return task.losses(call_model(model, x), x, y, target)
    except Error:
        raise
    except (RuntimeError, IndexError, ValueError, TypeError) as e:
        cause = (str(e).strip().splitlines() or [""])[0][:300]
        raise InvalidInputException(
            f"the model cannot take these samples ({type(e).__name__}: {cause}); give inputs of the "
            "training samples' shape and dtype, one row per sample, and labels its loss accepts") from e


def stored_batches(store, ids: np.ndarray, labels: torch.Tensor | None, batch_size: int = 256, shard_rows=None):
    """(positions into ids, inputs, labels) of registered samples, read from the store batch by
    batch; `labels` are aligned with ids."""
    for pos, x in store.input_batches(ids, batch_size, shard_rows):
        yield pos, x, None if labels is None else labels[torch.from_numpy(pos)]


def stored_replay_factors(store, model, modules, ids, labels, target="label", batch_size=256, task=None,
                          shard_rows=None):
    """replay_factors of registered samples whose inputs are streamed from the store; the factors
    come back in the order of `ids`."""
    parts: dict[str, dict[str, list[torch.Tensor]]] = {}
    where = []
    for pos, factors in replay_batches(model, LayerHooks(modules), stored_batches(store, ids, labels, batch_size, shard_rows),
                                       target, task):
        where.append(pos)
        for layer, fs in factors.items():
            for k, v in fs.items():
                parts.setdefault(layer, {}).setdefault(k, []).append(v)
    order = torch.from_numpy(np.argsort(np.concatenate(where))) if where else None
    return {layer: {k: _cat_padded(v)[order] for k, v in fs.items()} for layer, fs in parts.items()}


def replay_factors(model, modules, inputs, labels, target="label", batch_size=256, task=None):
    """All factors of the given samples, concatenated: {layer: {factor: (N, ...)}}."""
    parts: dict[str, dict[str, list[torch.Tensor]]] = {}
    for _, factors in iter_replay(model, LayerHooks(modules), inputs, labels, target, batch_size, task):
        for layer, fs in factors.items():
            for k, v in fs.items():
                parts.setdefault(layer, {}).setdefault(k, []).append(v)
    return {layer: {k: _cat_padded(v) for k, v in fs.items()} for layer, fs in parts.items()}


def _cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenates along the batch, zero-padding the row axis (zero rows add nothing)."""
    if parts[0].dim() < 2 or all(p.shape[1:] == parts[0].shape[1:] for p in parts):
        return torch.cat(parts)
    # batches padded to different lengths: a factor whose axis 1 varies is indexed by position
    # (an embedding's (N, L) ids among them), and zero rows, or id 0 against a zero row, add nothing
    rows = max(p.shape[1] for p in parts)
    return torch.cat([_pad_axis1(p, rows) for p in parts])


def _pad_axis1(t: torch.Tensor, rows: int) -> torch.Tensor:
    pad = torch.zeros(t.shape[0], rows - t.shape[1], *t.shape[2:], dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)
