"""Meta-gradients of a whole mini-batch (Algorithm 1, lines 6-10), in two exact forms.

With the virtual step theta_hat(eps) = theta - eta * (1/n) sum_i eps_i grad Omega(x_i; theta) the
meta-gradient of sample i is

    M_i = dL^v(theta_hat(eps)) / d eps_i |_{eps=0} = -(eta / n) <grad L^v(theta), grad Omega(x_i; theta)>.

``factored`` evaluates the inner products without any per-sample gradient. For a layer whose output
is linear in its weight W (Linear, Conv2d), the per-sample gradient is D_i^T X_i (X_i the input rows
of sample i, D_i the gradient of Omega_i w.r.t. the output rows), so

    <grad_i W, G> = sum(D_i * (X_i G^T)) = sum(D_i * layer(x_i; weight=G, bias=None)),

i.e. running the layer once more with the validation gradient G as its weight gives X_i G^T for
the whole batch in one matrix product (a convolution for Conv2d, which also spares the unfold).
The bias adds <sum_s D_{i,s}, g_b>. X is taken by forward hooks, D by one backward of sum_i Omega_i
to the layer outputs (no cross-sample layers, so row i of that gradient belongs to sample i alone).

``virtual`` is the learning-to-reweight form (Ren et al. 2018): per-sample weights eps = 0, a
virtual SGD step built with create_graph, the validation loss at theta_hat, and one more backward
to eps (a double backward through the network).

Both return a `backward(c)` that adds grad sum_i c_i Omega_i to the parameters, so the training
step (Eq. 14) reuses the forward: ``factored`` builds it from the captured factors (grad W =
sum_i c_i D_i^T X_i) without a second backward pass, ``virtual`` backpropagates the kept graph.
``factored`` is the default: it needs one first-order backward to the layer outputs plus one
forward-like pass per layer, where ``virtual`` needs a create_graph backward, a forward at
theta_hat and a double backward; benchmarks/bench_elite.py measures the two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

ValLoss = Callable[[torch.Tensor], torch.Tensor]   # validation scores -> scalar validation loss


@dataclass
class MetaStep:
    meta: torch.Tensor       # (n,) meta-gradients M_i
    scores: torch.Tensor     # (n,) Omega(x_i; theta), detached
    val_loss: float          # L^v(theta) before the step
    backward: Callable[[torch.Tensor], None]
    """backward(c) adds grad_theta sum_i c_i Omega(x_i; theta) to the parameters' .grad (the Eq. 14 step)."""


def meta_gradients_factored(score: nn.Module, x: torch.Tensor, x_val: torch.Tensor,
                            val_loss: ValLoss, lr: float) -> MetaStep:
    """Meta-gradients from factored inner products captured with forward hooks (see module doc).

    One forward over the batch and the validation samples together and one backward to the layer
    outputs serve both sides: no layer mixes samples, so the rows of d(sum_i Omega_i + L^v)/d out
    are D_i for a batch sample and d L^v / d out for a validation one, and the validation
    gradient of a layer is then sum_v D_v^T X_v (the same products autograd would form). This
    halves the passes of computing L^v's gradient apart from the batch's.
    """
    layers = _weight_layers(score)
    captured: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def keep(module, inputs, output):
        captured.append((module, inputs[0].detach(), output))

    handles = [m.register_forward_hook(keep) for m in layers]
    try:
        both = score(torch.cat([x, x_val]))
    finally:
        for h in handles:
            h.remove()
    n = x.shape[0]
    scores, lv = both[:n], val_loss(both[n:])
    d_out = torch.autograd.grad(scores.sum() + lv, [out for _, _, out in captured])
    factors = [(module, inp[:n], d[:n]) for (module, inp, _), d in zip(captured, d_out)]
    dots = torch.zeros(n, dtype=scores.dtype, device=scores.device)
    with torch.no_grad():
        for (module, inp, _), d in zip(captured, d_out):
            g_val = dict(zip(map(id, _own_params(module)), _layer_grads(module, inp[n:], d[n:])))
            dots += _layer_dots(module, inp[:n], d[:n], g_val)

    def backward(coeffs: torch.Tensor) -> None:
        # the gradient of sum_i c_i Omega_i w.r.t. a layer's output is c_i D_i: no second backward pass
        with torch.no_grad():
            for module, inp, d in factors:
                _accumulate_layer_grads(module, inp, coeffs.reshape(-1, *[1] * (d.dim() - 1)) * d)

    return MetaStep(-lr / n * dots, scores.detach(), float(lv.detach()), backward)


def meta_gradients_virtual(score: nn.Module, x: torch.Tensor, x_val: torch.Tensor,
                           val_loss: ValLoss, lr: float) -> MetaStep:
    """Meta-gradients by differentiating the validation loss after a virtual step w.r.t. eps."""
    names, params = zip(*[(k, p) for k, p in score.named_parameters() if p.requires_grad])
    buffers = dict(score.named_buffers())
    scores = score(x)
    eps = torch.zeros_like(scores, requires_grad=True)
    grads = torch.autograd.grad((eps * scores).sum() / x.shape[0], params, create_graph=True,
                                allow_unused=True)
    theta_hat = {k: p if g is None else p - lr * g for k, p, g in zip(names, params, grads)}
    lv = val_loss(functional_call(score, {**theta_hat, **buffers}, (x_val,)))
    meta, = torch.autograd.grad(lv, eps, retain_graph=True)

    def backward(coeffs: torch.Tensor) -> None:
        scores.backward(coeffs)

    return MetaStep(meta.detach(), scores.detach(), float(lv.detach()), backward)


METHODS = {"factored": meta_gradients_factored, "virtual": meta_gradients_virtual}


def _weight_layers(score: nn.Module) -> list[nn.Module]:
    """The modules holding trainable parameters; raises if one is of a kind the factored form lacks."""
    mixing = [type(m).__name__ for m in score.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if mixing:
        raise TypeError(f"factored meta-gradients need per-sample layers; {sorted(set(mixing))} in training mode "
                        "mixes the samples of a batch: use meta_gradient='virtual'")
    layers = [m for m in score.modules() if any(p.requires_grad for p in _own_params(m))]
    unsupported = [type(m).__name__ for m in layers if not isinstance(m, (nn.Linear, nn.Conv2d))
                   or isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str))]
    if unsupported:
        raise TypeError(f"factored meta-gradients support Linear and zero-padded Conv2d layers (numeric "
                        f"padding), not {sorted(set(unsupported))}; use meta_gradient='virtual'")
    return layers


def _own_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def _layer_dots(module: nn.Module, inp: torch.Tensor, d: torch.Tensor,
                g_val: dict[int, torch.Tensor | None]) -> torch.Tensor:
    """<per-sample gradient of this layer's parameters, validation gradient> for every sample."""
    n = inp.shape[0]
    g_w, g_b = g_val.get(id(module.weight)), g_val.get(id(module.bias)) if module.bias is not None else None
    dots = torch.zeros(n, dtype=d.dtype, device=d.device)
    if g_w is not None:
        dots += (d * _apply_weight(module, inp, g_w)).reshape(n, -1).sum(dim=1)
    if g_b is not None:
        per_channel = d.reshape(n, -1, d.shape[-1]).sum(1) if isinstance(module, nn.Linear) else d.flatten(2).sum(2)
        dots += per_channel @ g_b
    return dots


def _layer_grads(module: nn.Module, inp: torch.Tensor, g_out: torch.Tensor) -> list[torch.Tensor]:
    """The gradients of the layer's trainable parameters (weight, then bias) for input ``inp`` and
    output gradient ``g_out``, summed over the samples."""
    if isinstance(module, nn.Linear):
        rows_out, rows_in = g_out.reshape(-1, g_out.shape[-1]), inp.reshape(-1, inp.shape[-1])
        g_w, g_b = rows_out.T @ rows_in, rows_out.sum(0)
    else:
        g_w = torch.nn.grad.conv2d_weight(inp, module.weight.shape, g_out, module.stride, module.padding,
                                          module.dilation, module.groups)
        g_b = g_out.sum(dim=(0, 2, 3))
    return [g for p, g in ((module.weight, g_w), (module.bias, g_b)) if p is not None and p.requires_grad]


def _accumulate_layer_grads(module: nn.Module, inp: torch.Tensor, g_out: torch.Tensor) -> None:
    """Adds the weight (and bias) gradient of a layer with input ``inp`` and output gradient ``g_out``."""
    for p, g in zip(_own_params(module), _layer_grads(module, inp, g_out)):
        p.grad = g if p.grad is None else p.grad + g


def _apply_weight(module: nn.Module, inp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's linear map with another weight and no bias: X G^T, batched over samples."""
    if isinstance(module, nn.Linear):
        return F.linear(inp, weight)
    return F.conv2d(inp, weight, None, module.stride, module.padding, module.dilation, module.groups)
