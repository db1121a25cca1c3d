"""Hooks that see each watched module's inputs (forward) and its outputs' gradients (backward).

Calls are indexed so that the i-th input pairs with the i-th output gradient even though the
backward pass visits calls in reverse order; a module called twice contributes both calls.
"""
from __future__ import annotations

import torch
from torch import nn

from metaql.storage.layers import LayerKind, kind_for


class LayerHooks:
    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.kinds: dict[str, LayerKind] = {n: kind_for(n, m) for n, m in modules.items()}
        self._handles: list = []
        self.clear()

    def clear(self) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {n: [] for n in self.modules}
        self.outputs: dict[str, list[torch.Tensor]] = {n: [] for n in self.modules}
        self.grads: dict[str, dict[int, torch.Tensor]] = {n: {} for n in self.modules}

    def attach(self) -> "LayerHooks":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return
            call = len(self.inputs[name])
            self.inputs[name].append(inputs[0].detach())
            self.outputs[name].append(output)

            def keep_grad(grad, name=name, call=call):
                self.grads[name][call] = grad.detach()
            output.register_hook(keep_grad)
        return hook

    def factors(self, scale: float = 1.0) -> dict[str, dict[str, torch.Tensor]]:
        """Per-layer per-sample factors of the last forward/backward; `scale` undoes a mean loss."""
        out = {}
        for name, module in self.modules.items():
            calls = len(self.inputs[name])
            if calls == 0:
                continue
            if len(self.grads[name]) != calls:
                raise RuntimeError(f"layer '{name}' saw {calls} forward calls but "
                                   f"{len(self.grads[name])} gradients; did backward reach it?")
            grads = [self.grads[name][i] * scale if scale != 1.0 else self.grads[name][i]
                     for i in range(calls)]
            out[name] = self.kinds[name].factors(module, self.inputs[name], grads)
        return out


def watched_modules(model: nn.Module, layers: list[str] | str | None) -> dict[str, nn.Module]:
    """Resolves layer names (or '*' / None for every supported layer) to modules."""
    from metaql.storage.layers import KINDS
    from metaql.storage.catalog import require_name

    named = dict(model.named_modules())
    if layers in (None, "*", ["*"]):
        picked = {n: m for n, m in named.items() if n and any(isinstance(m, t) for t in KINDS)}
        if not picked:
            raise ValueError("the model has no layer of a supported kind")
        return picked
    if isinstance(layers, str):
        layers = [layers]
    out = {}
    for n in layers:
        require_name("layer", n, [k for k in named if k])
        kind_for(n, named[n])
        out[n] = named[n]
    return out
