"""GRADNORM: each pool sample's gradient norm of an unsupervised loss (Wang et al., AAAI 2022).

The pool is replayed at the checkpoint (storage/replay.py) with the unsupervised loss, and each
layer's per-sample squared norm comes from the replayed factors through engine/operators.squared_norm
(what SELF_INFLUENCE uses): the Gram form, or each gradient built inside a few-sample chunk when
that is cheaper for the layer's shapes; no gradient is kept. The score is the norm over all chosen layers together, sqrt(sum_layers ||g||^2).

Two readings of the paper's "expected" loss (Eq. 6), both offered:

    expectation='loss'  the norm of the gradient of L_exp = sum_c p_c CE(c) with p attached to the
                        graph (the published code's reading: its posterior is not detached). Since
                        sum_c p_c CE(c) = -sum_c p_c log p_c = H(p), this is exactly entropy-gradnorm
                        (Eq. 7) for classification: loss='expected' and loss='entropy' agree.
                        With p detached the gradient would be sum_c p_c (p - e_c) = 0 at the logits,
                        identically zero for softmax cross-entropy, so that variant is not offered.
    expectation='norm'  the expected gradient norm sum_c p_c ||grad CE(x, c)||: C replays, one per
                        class c with every pool sample labeled c, p from one forward pass.
Several checkpoints: the mean of the per-checkpoint scores.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from metaql.engine import operators as ops
from metaql.engine.functions import CheckpointList, LayerList, SetName, table_function
from metaql.errors import BinderException, InvalidInputException
from metaql.storage.catalog_snapshot import catalog_of
from metaql.storage.hooks import LayerHooks, watched_modules
from metaql.storage.replay import replay_batches, stored_batches
from metaql.storage.tasks import task_at
from metaql.active.predict import probabilities

COLUMNS = [("sample_id", "BIGINT"), ("score", "DOUBLE")]
LOSSES = ("expected", "entropy")
EXPECTATIONS = ("loss", "norm")
CLASS_TASKS = ("classification", "sequence_classification")
BATCH = 256


@table_function("GRADNORM", COLUMNS)
def gradnorm(ctx, pool: SetName, loss: Literal["expected", "entropy"] = "expected",
             layers: LayerList = ("*",), checkpoints: CheckpointList = "last",
             expectation: Literal["loss", "norm"] = "loss") -> pa.Table:
    """Gradient norm of an unsupervised loss for each sample of `pool` (its labels are never read),
    by replay at the checkpoint(s): loss=expected (Eq. 6) or entropy (Eq. 7); expectation=loss is
    the norm of the expected loss's gradient (equal to entropy's for classification),
    expectation=norm the expected norm sum_c p_c ||grad CE(c)|| (C replays). Highest first = what
    active learning by gradient norm sends for annotation."""
    if loss not in LOSSES:
        raise BinderException(f"loss must be one of {', '.join(LOSSES)}, not '{loss}'")
    if expectation not in EXPECTATIONS:
        raise BinderException(f"expectation must be one of {', '.join(EXPECTATIONS)}, not '{expectation}'")
    if loss == "entropy" and expectation == "norm":
        raise BinderException("expectation=norm averages per-class gradient norms, which only loss=expected "
                              "has; use loss=expected, expectation=norm (or loss=entropy alone)")
    catalog = catalog_of(ctx)
    ids = np.sort(catalog.set_ids(str(pool)))
    if len(ids) == 0:
        raise InvalidInputException(f"set '{pool}' is empty: GRADNORM has no samples to score")
    names = layer_spec(catalog, layers)
    ckpts = catalog.checkpoint_names(checkpoints)
    total = np.zeros(len(ids))
    for ckpt in ctx.progress(ckpts, desc="checkpoints"):
        total += pool_norms(ctx.store, ckpt, ids, names, expectation, catalog, ctx.progress)
    return pa.table({"sample_id": pa.array(ids, pa.int64()), "score": pa.array(total / len(ckpts))})


def layer_spec(catalog, layers):
    """The store's captured layers that `layers` names (as INFLUENCE reads them); a store with none
    captured (checkpoints registered by con.checkpoint only) resolves `layers` on the model itself."""
    return catalog.layer_names(layers) if catalog.layers else list(layers)


def pool_norms(store, ckpt: str, ids: np.ndarray, layers: list[str], expectation: str, catalog,
               progress=None) -> np.ndarray:
    """Each pool sample's score at one checkpoint. progress: the statement's progress wrapper,
    given every replay's batches (it also stops a cancelled statement between batches)."""
    model, task = store.model_at(ckpt), task_at(store, ckpt)
    if expectation == "loss":
        task.check_target("expected")      # a task without a predictive distribution is refused here
        return np.sqrt(squared_norms(store, model, task, ids, None, "expected", layers, catalog, progress))
    if task.name not in CLASS_TASKS:
        raise BinderException(f"expectation=norm replays every class as a label, which a {task.name} model "
                              "does not have; use expectation=loss")
    p = probabilities(store, model, ids, catalog.input_shards, progress)
    score = np.zeros(len(ids))
    for c in range(p.shape[1]):
        labels = torch.full((len(ids),), c, dtype=torch.long)
        score += p[:, c] * np.sqrt(squared_norms(store, model, task, ids, labels, "label", layers, catalog, progress))
    return score


def squared_norms(store, model, task, ids, labels, target: str, layers: list[str], catalog,
                  progress=None) -> np.ndarray:
    """sum over `layers` of each sample's squared gradient norm of the `target` loss, from the
    factors of one replay streamed batch by batch (one batch's factors held at a time)."""
    hooks = LayerHooks(watched_modules(model, layers))
    metas = {name: hooks.kinds[name].meta(name, module) for name, module in hooks.modules.items()}
    out = np.zeros(len(ids))
    batches = stored_batches(store, ids, labels, BATCH, catalog.input_shards)
    if progress is not None:
        batches = progress(batches, total=-(-len(ids) // BATCH), desc="gradient norms")
    for pos, factors in replay_batches(model, hooks, batches, target, task):
        # a layer the loss does not reach has no factors: its gradient is zero
        for name, fs in factors.items():
            out[pos] += layer_squared_norm(hooks.kinds[name], metas[name], fs)
    if not np.isfinite(out).all():
        raise InvalidInputException("some gradient norms are not finite (inf or NaN): the model's outputs or "
                                    "weights overflow; check them, or leave the offending layers out")
    return out


def layer_squared_norm(kind, meta, factors: dict[str, torch.Tensor]) -> np.ndarray:
    if kind.factored:
        sq = ops.squared_norm(kind, meta, factors)
    else:       # norm layers: their per-sample gradients are small, built by the kind itself
        g = kind.full(meta, factors).double()
        sq = (g * g).sum(1)
    return sq.double().cpu().numpy()
