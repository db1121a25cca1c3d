"""Which layers a capture stores projected, and with which projection.

`storage` is a mode for every layer ('factored', 'full', 'projected', 'auto') or {layer: mode};
`max_error` (a number or {layer: number}) is the standard deviation of the relative error the user
allows (metaql.approx.projection); `proj_dim` fixes k on both sides instead. 'projected' stores the
layer projected; 'auto' stores it projected only when a max_error (or proj_dim) is given for it
AND the projected form stores fewer numbers per sample than the exact one, else exactly (the
space formula, as without a request). A layer keeps its first capture's choice and projection in
every later checkpoint and resumed capture (every checkpoint is scored alike)."""
from __future__ import annotations

import torch

from metaql.approx.kind import KIND, CaptureProjection, projectable
from metaql.approx.projection import SKETCH_DISTS, dims_for_error, layer_seed, relative_error
from metaql.errors import InvalidInputException
from metaql.storage.quantize import LEVELS
from metaql.storage.layers import LayerMeta

EXACT_MODES = ("factored", "full")
MODES = EXACT_MODES + ("projected", "auto")


class ProjectionRequest:
    def __init__(self, storage=None, max_error=None, proj_dim: int | None = None, proj_seed: int = 0,
                 sketch_dim: int | None = None, sketch_budget: int | None = None, sketch_dist: str = "gaussian",
                 sketch_bits: int | None = None):
        if storage is not None and not isinstance(storage, (str, dict)):
            raise InvalidInputException("storage= takes a mode ('factored', 'full', 'projected', 'auto') or "
                                        f"{{layer: mode}}, not {type(storage).__name__}")
        for mode in ([storage] if isinstance(storage, str) else (storage or {}).values()):
            if mode not in MODES:
                raise InvalidInputException(f"storage mode must be one of {', '.join(MODES)}, not {mode!r:.40}")
        for name, v in (("proj_dim", proj_dim), ("sketch_dim", sketch_dim), ("sketch_budget", sketch_budget)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InvalidInputException(f"{name} must be a positive whole number, not {v!r:.40}")
        for e in (max_error.values() if isinstance(max_error, dict) else [max_error]):
            if e is not None:
                dims_for_error(2, 2, e)       # validates the number
        if isinstance(proj_seed, bool) or not isinstance(proj_seed, int):
            raise InvalidInputException(f"proj_seed must be a whole number, not {proj_seed!r:.40}")
        self.storage, self.max_error, self.proj_dim, self.proj_seed = storage, max_error, proj_dim, proj_seed
        if sketch_dist not in SKETCH_DISTS:
            raise InvalidInputException(f"sketch_dist must be one of {', '.join(SKETCH_DISTS)}, not {sketch_dist!r:.40}")
        if sketch_dim is not None and sketch_budget is not None:
            raise InvalidInputException("give sketch_dim= (numbers per layer) or sketch_budget= (numbers per sample "
                                        "over every projected layer), not both")
        if sketch_bits is not None and (isinstance(sketch_bits, bool) or sketch_bits not in LEVELS):
            raise InvalidInputException(f"sketch_bits must be one of {', '.join(map(str, LEVELS))} (or None: the "
                                        f"capture's dtype), not {sketch_bits!r:.40}")
        if sketch_bits is not None and sketch_dim is None and sketch_budget is None:
            raise InvalidInputException("sketch_bits= stores sketches in fewer bits: give sketch_dim= or "
                                        "sketch_budget= too")
        self.sketch_dim, self.sketch_budget, self.sketch_dist = sketch_dim, sketch_budget, sketch_dist
        self.sketch_bits = sketch_bits
        self.allocated: dict[str, int] = {}     # sketch_budget's share per layer, from the first batch
        self.sketched: set[str] = set()     # layers whose projected gradient is sketched: stored full
        self.exact = {layer: m for layer, m in (storage.items() if isinstance(storage, dict) else ())
                      if m in EXACT_MODES}      # the plain overrides the store has always taken

    def mode(self, layer: str) -> str | None:
        return self.storage if isinstance(self.storage, str) else (self.storage or {}).get(layer)

    def exact_mode(self, layer: str) -> str | None:
        """The exact mode asked for the layer ('factored', 'full'), else None (the space formula)."""
        if layer in self.sketched:
            return "full"
        mode = self.mode(layer)
        return mode if mode in EXACT_MODES else None

    def error(self, layer: str) -> float | None:
        return self.max_error.get(layer) if isinstance(self.max_error, dict) else self.max_error

    def check_layers(self, layers: list[str]) -> None:
        """Refuses a per-layer storage= or max_error= naming a layer the capture does not watch: a
        typo left that layer in the default mode for good (its mode is set at its first capture)."""
        from metaql.storage.catalog import nearest_name
        for arg, value in (("storage", self.storage), ("max_error", self.max_error)):
            for name in (value if isinstance(value, dict) else {}):
                if name not in layers:
                    hint = nearest_name(str(name), layers)
                    raise InvalidInputException(
                        f"{arg}= names layer '{name}', which this capture does not watch"
                        + (f"; did you mean '{hint}'?" if hint else "") + f" (its layers: {', '.join(layers[:10])}"
                        + (", ..." if len(layers) > 10 else "") + ")")

    def check(self, registered: dict[str, tuple[str, LayerMeta]]) -> None:
        """Refuses, before any training step, a request that contradicts a layer's stored form."""
        for layer, (_, meta) in registered.items():
            mode = self.mode(layer)
            stored_bits = meta.extra.get("projection", {}).get("bits") if meta.kind == KIND else None
            sketched = meta.kind == KIND and meta.extra["projection"].get("sketch")
            if self.sketch_bits is not None and sketched and stored_bits != self.sketch_bits:
                raise InvalidInputException(
                    f"layer '{layer}' is sketched in {stored_bits or 'full'} bits in this store (set at its first "
                    f"capture), so sketch_bits={self.sketch_bits} cannot apply; drop sketch_bits=, or capture into "
                    "a new store")
            if meta.kind == KIND and mode in EXACT_MODES and isinstance(self.storage, dict):
                raise InvalidInputException(
                    f"layer '{layer}' is stored projected in this store (set at its first capture), so "
                    f"storage={{'{layer}': '{mode}'}} cannot apply; drop it, or capture into a new store")
            if meta.kind != KIND and mode == "projected" and isinstance(self.storage, dict):
                raise InvalidInputException(
                    f"layer '{layer}' is stored exactly in this store (set at its first capture), so "
                    f"storage={{'{layer}': 'projected'}} cannot apply; drop it, or capture into a new store")

    def decide(self, layer: str, kind, module, factors: dict[str, torch.Tensor],
               registered: dict[str, tuple[str, LayerMeta]]) -> CaptureProjection | None:
        """The layer's projection (None: stored exactly), on its first batch of this capture."""
        if layer in registered:
            meta = registered[layer][1]
            return CaptureProjection(kind, meta.extra["projection"], meta) if meta.kind == KIND else None
        mode = self.mode(layer)
        if mode in (None, "factored", "full"):
            return None
        base = kind.meta(layer, module)
        why = projectable(kind, base, factors)
        if why:
            if mode == "auto" or isinstance(self.storage, str):   # a request for every layer skips it
                return None
            raise InvalidInputException(f"layer '{layer}' cannot be stored projected: {why}; store it "
                                        "'factored' or 'full', or leave it out of storage=")
        din, dout = base.din + int(base.bias), base.dout
        dims = self._dims(layer, din, dout, mode)
        if dims is None:
            return None
        k_in, k_out = dims
        m = self.allocated.get(layer, self.sketch_dim)
        if m and self.sketch_bits == 4:
            m += m % 2          # two codes to a byte (storage/quantize.py): an even number of them
        sketch = m if m and m < (k_in or din) * (k_out or dout) else None
        if k_in is None and k_out is None and sketch is None:    # the bound allows no reduction
            return None
        bits = self.sketch_bits if sketch else None
        spec = {"seed": layer_seed(self.proj_seed, layer), "k_in": k_in, "k_out": k_out, "sketch": sketch,
                "dist": "gaussian", "error": relative_error(k_in, k_out, sketch, bits)}
        if sketch:
            spec["sketch_dist"] = self.sketch_dist
        if bits:
            spec["bits"] = bits
        if mode == "auto" and not smaller(kind, base, factors, k_in or din, k_out or dout, sketch):
            return None
        if sketch:
            self.sketched.add(layer)
        return CaptureProjection(kind, spec)

    def _dims(self, layer: str, din: int, dout: int, mode: str):
        if self.proj_dim is not None:
            k = self.proj_dim
            return (k if din > k else None), (k if dout > k else None)
        err = self.error(layer)
        if err is None and (self.sketch_dim or self.sketch_budget):
            return None, None           # no Kronecker stage: the unprojected gradient is sketched
        if err is None:
            if mode == "auto":
                return None
            raise InvalidInputException(
                f"storage='projected' for layer '{layer}' needs the error you allow: max_error= (the standard "
                "deviation of the relative error of an inner product, e.g. 0.1) or proj_dim= (k per side)")
        return dims_for_error(din, dout, err)


    def allocate(self, layers: dict[str, tuple]) -> None:
        """sketch_budget's numbers split among the layers to be decided, in proportion to each
        one's mean squared per-sample gradient norm on this first batch (the Neyman allocation:
        with a query whose layers weigh as the training samples' do, the summed score's variance,
        sum over layers of 2 ||g_l||^2 ||G_l||^2 / m_l, is least for m_l in proportion to
        ||g_l|| ||G_l||); at least two each (a layer's bound sqrt(2/m) then stays within 1, so
        error=1 always admits the store: error= must cover the largest layer bound), the remainder to
        the largest fractions.
        `layers`: {layer: (kind, module, factors)} of the batch, factors as stored (scaled)."""
        if not self.sketch_budget or not layers:
            return
        energy = {}
        for layer, (kind, module, factors) in layers.items():
            meta = kind.meta(layer, module)
            if self.mode(layer) not in ("projected", "auto") or projectable(kind, meta, factors):
                continue
            energy[layer] = mean_squared_norm(kind, meta, factors)
        if not energy:
            return
        total = sum(energy.values())
        floor = 2 if self.sketch_budget >= 2 * len(energy) else 1
        budget = max(self.sketch_budget, len(energy))
        share = {l: (budget - floor * len(energy)) * (e / total if total > 0 else 1 / len(energy))
                 for l, e in energy.items()}
        dims = {l: floor + int(v) for l, v in share.items()}
        for l in sorted(share, key=lambda l: int(share[l]) - share[l])[:budget - sum(dims.values())]:
            dims[l] += 1
        self.allocated.update(dims)


def mean_squared_norm(kind, meta: LayerMeta, factors: dict[str, torch.Tensor]) -> float:
    """The batch's mean ||g_i||_F^2 from the rows (sum over position pairs of (x_s . x_t)(d_s . d_t),
    no gradient built); the built gradients where the kind stores full only."""
    if not kind.factored:
        return float(kind.full(meta, factors).double().pow(2).sum(1).mean())
    x, d = kind.rows(meta, factors)
    x, d = x.double(), d.double()
    if meta.bias:
        x = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], dim=-1)
    return float((x @ x.transpose(1, 2)).mul_(d @ d.transpose(1, 2)).sum((1, 2)).mean())


def smaller(kind, base: LayerMeta, factors, k_in: int, k_out: int, sketch: int | None = None) -> bool:
    """Whether the projected form (factors or the projected gradient, the smaller) stores fewer
    numbers per sample than the exact form the space formula would pick."""
    one = {k: v[:1] for k, v in factors.items()}
    s = kind.positions(base, one)
    exact = min(kind.stored_numbers(base, one), kind.full_numbers(base))
    return (sketch or min(s * (k_in + k_out), k_in * k_out)) < exact
