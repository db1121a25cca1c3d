"""The 'projected' layer kind: a layer stored as its randomly projected factors.

Stored: PX = [X | 1] P_in (B, S, k_in) and PD = D P_out (B, S, k_out), or (when smaller by the
space formula, S (k_in + k_out) > k_in k_out) the projected gradient G~ = PD^T PX itself, as the
engine stores any layer full. The catalog's meta is that of a plain linear layer of width k_in and
k_out without bias, so every exact strategy of the engine scores projected factors unchanged; its
`extra` records the projection (seed, k_in, k_out, the error bound) and the base layer's meta.

Factors that are not projected yet (a query side replayed now, a re-compute) are the base kind's:
`rows` projects them with the recorded seed, so both sides of an inner product see the same P.
"""
from __future__ import annotations

import torch

from metaql.approx.projection import project_rows, sketched
from metaql.storage.layers.base import LayerKind, LayerMeta, kind_named, register

KIND = "projected"


@register()
class Projected(LayerKind):
    kind = KIND

    def rows(self, meta: LayerMeta, factors):
        if "PX" in factors:
            return factors["PX"].float(), factors["PD"].float()
        base = base_meta(meta)
        x, d = kind_named(base.kind).rows(base, factors)
        return project_rows(x, d, base.bias, meta.extra["projection"])


    def full(self, meta: LayerMeta, factors):
        """The projected gradient flattened (k_out x k_in), or its dense sketch (m numbers)."""
        if "G" in factors:
            return factors["G"].float()
        x, d = self.rows(meta, factors)
        g = torch.einsum("nso,nsi->noi", d, x).reshape(x.shape[0], -1)
        spec = meta.extra["projection"]
        return sketched(g, spec) if spec.get("sketch") else g

    def average_of(self, meta: LayerMeta, factors):
        if not meta.extra["projection"].get("sketch"):
            return super().average_of(meta, factors)
        return self.full(meta, factors).mean(0, keepdim=True)     # (1, m): the sketched layer's meta


def base_meta(meta: LayerMeta) -> LayerMeta:
    """The meta the layer would have had stored exactly."""
    return LayerMeta(**meta.extra["base"])


def is_projected(meta: LayerMeta) -> bool:
    return meta.kind == KIND


def projectable(kind: LayerKind, meta: LayerMeta, factors: dict[str, torch.Tensor]) -> str:
    """'' when a kind's canonical rows are dense numbers (what a projection multiplies), else why not."""
    if not kind.factored:
        return f"its kind '{kind.kind}' is stored full only (no factors to project)"
    x, d = kind.rows(meta, {k: v[:1] for k, v in factors.items()})
    if not (x.is_floating_point() and d.is_floating_point()):
        return f"its kind '{kind.kind}' has index rows (one-hot, not dense), which are not projected"
    return ""


class CaptureProjection(Projected):
    """The capture side of one projected layer: its meta, and its base factors projected."""

    def __init__(self, base_kind: LayerKind, spec: dict, meta: LayerMeta | None = None):
        self.base_kind, self.spec, self._meta = base_kind, spec, meta

    def meta(self, name: str, module) -> LayerMeta:
        if self._meta is None:
            base = self.base_kind.meta(name, module)
            din, dout = base.din + int(base.bias), base.dout
            # a sketched layer reads as a (1 x m) layer stored full: its gradient is the sketch
            width, height = (self.spec["sketch"], 1) if self.spec.get("sketch") else \
                (self.spec["k_in"] or din, self.spec["k_out"] or dout)
            self._meta = LayerMeta(name, KIND, width, height, False, {},
                                   {"projection": dict(self.spec), "base": base.to_dict()})
        return self._meta

    def project(self, name: str, module, factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        base = base_meta(self.meta(name, module))
        x, d = self.base_kind.rows(base, factors)
        px, pd = project_rows(x, d, base.bias, self.spec)
        return {"PX": px, "PD": pd}
