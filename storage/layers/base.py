"""The handler interface every layer kind implements, and the registry that finds it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from metaql.engine.errors import BinderException


@dataclass
class LayerMeta:
    """What the catalog records of a watched layer: enough to rebuild its gradient's shape."""
    name: str
    kind: str
    din: int            # width of the canonical X rows (bias column not included)
    dout: int           # width of the canonical D rows
    bias: bool
    param_shapes: dict[str, list[int]] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def params(self) -> int:
        return self.dout * (self.din + int(self.bias))

    def to_dict(self) -> dict:
        return asdict(self)


class LayerKind:
    kind: str = ""

    def meta(self, name: str, module: nn.Module) -> LayerMeta:
        raise NotImplementedError

    def factors(self, module: nn.Module, inputs: list[torch.Tensor],
                grad_outputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-sample factors (leading dim = batch) from the module's calls in one forward pass."""
        raise NotImplementedError

    def rows(self, meta: LayerMeta, factors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The canonical linear form: X (B, S, din [+1 for bias]) and D (B, S, dout), so that each
        sample's gradient is D^T X (flattened weight then bias, see `full`)."""
        raise NotImplementedError

    def positions(self, meta: LayerMeta, factors: dict[str, torch.Tensor]) -> int:
        """S, the number of rows each sample contributes (for the cost formulas)."""
        return self.rows(meta, {k: v[:1] for k, v in factors.items()})[0].shape[1]

    def full(self, meta: LayerMeta, factors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample full gradients (B, params): the matrix D^T X flattened row-major, so the
        weight's gradient is [:, :din] of each row of the matrix and the bias's is [:, din]."""
        x, d = self.rows(meta, factors)
        return torch.einsum("bso,bsi->boi", d, x).reshape(x.shape[0], -1)

    def factored_numbers(self, meta: LayerMeta, positions: int) -> int:
        return positions * (meta.din + meta.dout)

    def full_numbers(self, meta: LayerMeta) -> int:
        return meta.params

    def torch_grad_vector(self, meta: LayerMeta, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Flattens torch's per-sample parameter gradients (keys 'weight', 'bias'; batch first)
        in the order of `full`, so tests compare against torch.func."""
        w = grads["weight"].reshape(grads["weight"].shape[0], meta.dout, -1)
        if meta.bias:
            w = torch.cat([w, grads["bias"].reshape(-1, meta.dout, 1)], dim=2)
        return w.reshape(w.shape[0], -1)


KINDS: dict[type, LayerKind] = {}
_BY_NAME: dict[str, LayerKind] = {}


def register(*module_types: type):
    def wrap(cls: type[LayerKind]) -> type[LayerKind]:
        handler = cls()
        for t in module_types:
            KINDS[t] = handler
        _BY_NAME[handler.kind] = handler
        return cls
    return wrap


def kind_for(name: str, module: nn.Module) -> LayerKind:
    for t in type(module).__mro__:
        if t in KINDS:
            return KINDS[t]
    supported = ", ".join(sorted({t.__name__ for t in KINDS}))
    raise BinderException(
        f"layer '{name}' is a {type(module).__name__}, which MetaQL cannot capture yet; "
        f"supported layer kinds: {supported}"
    )


def kind_named(kind: str) -> LayerKind:
    return _BY_NAME[kind]
