"""Replay: per-sample factors of given samples at fixed weights, in eval mode.

Used for samples never trained on (test samples at query time) and for exact factors at a saved
checkpoint. Weights are never touched: gradients are taken w.r.t. the layer outputs only.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from metaql.storage.hooks import LayerHooks


def iter_replay(model: nn.Module, hooks: LayerHooks, inputs: torch.Tensor,
                labels: torch.Tensor | None, target: str = "label", batch_size: int = 256, task=None
                ) -> Iterator[tuple[slice, dict[str, dict[str, torch.Tensor]]]]:
    """Yields (rows, {layer: factors}) batch by batch, through the given (unattached) hooks.
    `labels` are the task's stored targets (metaql.storage.tasks; default classification)."""
    from metaql.storage.tasks import Classification
    task = task or Classification()
    task.check_target(target)
    hooks.attach()
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for start in range(0, inputs.shape[0], batch_size):
                rows = slice(start, min(start + batch_size, inputs.shape[0]))
                hooks.clear()
                loss = task.losses(model(inputs[rows]), inputs[rows], None if labels is None else labels[rows],
                                   target)
                outputs = [o for outs in hooks.outputs.values() for o in outs]
                # autograd.grad w.r.t. the outputs fires their hooks and leaves .grad of weights alone;
                # an output the loss does not use is left to hooks.factors to report by its layer's name
                if outputs:
                    torch.autograd.grad(loss.sum(), outputs, allow_unused=True)
                yield rows, hooks.factors()
    finally:
        hooks.detach()
        model.train(was_training)


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
    if parts[0].dim() < 3 or all(p.shape[1:] == parts[0].shape[1:] for p in parts):
        return torch.cat(parts)
    rows = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, 0, 0, rows - p.shape[1])) for p in parts])
