"""The handler interface every layer kind implements, and the registry that finds it.

Every kind maps its stored factors to a canonical linear form: per sample, rows X (S, din) and
D (S, dout) with gradient [D^T X | D^T 1] (the bias column, when the layer has one, is a virtual
column of ones: the primitives add its terms instead of copying X to append it). The primitives
below are what the engine's operators are built from; dense kinds use the defaults, a kind with
a cheaper structure (an embedding's one-hot rows) overrides them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from metaql.errors import BinderException, CatalogException


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
    # 'package.module:Class' of the kind: another process imports it (if trusted) to read the layer
    kind_class: str = ""

    @property
    def params(self) -> int:
        return self.dout * (self.din + int(self.bias))

    def to_dict(self) -> dict:
        return asdict(self)


class LayerKind:
    kind: str = ""
    factored: bool = True        # False: only full per-sample gradients make sense (norm layers)
    # what a module must compute exactly as the registered type does for the kind to apply (find_kind)
    modelled_methods: tuple[str, ...] = ("forward",)
    param_names: tuple[str, ...] = ("weight", "bias")      # the first is required
    # children whose parameters this kind captures as part of the layer (nn.MultiheadAttention's
    # out_proj): a pattern does not pick them separately, and naming them is refused
    covers_children: tuple[str, ...] = ()
    # factors that are the output gradients laid out as they are (reshaped, stacked or concatenated
    # over calls, nothing else): scaling them is scaling the gradients element for element, so a
    # capture multiplies them by the loss's scale in the copy its buffer keeps (storage/capture.py)
    gradient_factors: tuple[str, ...] = ()

    def unfit(self, module: nn.Module) -> str:
        """'' when a module of the registered type is one this kind models, else why not."""
        return ""

    # ---- capture ------------------------------------------------------------------------------
    def meta(self, name: str, module: nn.Module) -> LayerMeta:
        raise NotImplementedError

    def factors(self, module: nn.Module, inputs: list[torch.Tensor],
                grad_outputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-sample factors (leading dim = batch) from the module's calls in one forward pass."""
        raise NotImplementedError

    def call_problem(self, args: tuple, kwargs: dict, output) -> str:
        """'' when the hooks can capture this call of the module, else why not."""
        return ""

    def saved_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[object, str]:
        """(what `factors` needs of this call's inputs, '') or (None, why the call cannot be captured)."""
        return args[0].detach(), ""

    def call_batch(self, saved) -> int:
        """The number of samples a call saved by `saved_call` ran on."""
        return saved.shape[0] if saved.dim() else 1

    def call_output(self, output) -> tuple[object, object]:
        """(the output tensor whose gradient `factors` receives, a replacement for the module's
        output or None): a kind may hand on an output rebuilt as views of that one tensor, so its
        gradient gathers the gradients of every output (the fallback kind on an LSTM)."""
        return output, None

    def suffix_name(self) -> str | None:
        """The factor that is the layer's input as-is (shared between layers reading one input)."""
        return None

    # ---- canonical form -------------------------------------------------------------------------
    def rows(self, meta: LayerMeta, factors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """X (B, S, din) and D (B, S, dout): each sample's weight gradient is D^T X."""
        raise NotImplementedError

    def full_squared_norms(self, meta: LayerMeta, factors: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Each sample's squared gradient norm by a kind's own fast way of building its gradients
        (a convolution's weight-gradient kernel), or None: engine.operators.squared_norm then
        builds them from the rows."""
        return None

    def positions(self, meta: LayerMeta, factors: dict[str, torch.Tensor]) -> int:
        """S, the number of rows each sample contributes (for the cost formulas)."""
        return self.rows(meta, {k: v[:1] for k, v in factors.items()})[0].shape[1]

    def stored_numbers(self, meta: LayerMeta, factors: dict[str, torch.Tensor]) -> int:
        """Numbers stored per sample in factored form (what the space formula compares)."""
        return sum(math.prod(v.shape[1:]) for v in factors.values())

    def full_numbers(self, meta: LayerMeta) -> int:
        return meta.params

    # ---- primitives on the canonical form (dense defaults) ---------------------------------------
    def gram_x_factors(self, meta: LayerMeta, factors: dict[str, torch.Tensor], xr: torch.Tensor) -> torch.Tensor:
        """gram_x straight from stored factors: a kind may skip building its X rows (conv)."""
        return self.gram_x(meta, self.rows(meta, factors)[0], xr)

    def d_rows(self, meta: LayerMeta, factors: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.rows(meta, factors)[1]

    def gram_x(self, meta: LayerMeta, x: torch.Tensor, xr: torch.Tensor) -> torch.Tensor:
        """(N, S, R): each training row's X against R query rows (plus the bias column's 1*1)."""
        g = torch.einsum("nsi,ri->nsr", x, xr)
        return g + 1.0 if meta.bias else g

    def gram_d(self, meta: LayerMeta, d: torch.Tensor, dr: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nso,ro->nsr", d, dr)

    def self_gram_x(self, meta: LayerMeta, x: torch.Tensor) -> torch.Tensor:
        """(N, S, S): each sample's rows against its own."""
        g = torch.einsum("nsi,nti->nst", x, x)
        return g + 1.0 if meta.bias else g

    def self_gram_d(self, meta: LayerMeta, d: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nso,nto->nst", d, d)

    def flat_rows(self, meta: LayerMeta, t: torch.Tensor) -> torch.Tensor:
        """All rows of a batch side by side (R, width)."""
        return t.reshape(-1, t.shape[-1])

    def average_of(self, meta: LayerMeta, factors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Gbar of a batch straight from its stored factors: a kind may skip building its rows (conv)."""
        x, d = self.rows(meta, factors)
        return self.average(meta, x, d)

    def average_scores(self, meta: LayerMeta, factors: dict[str, torch.Tensor], gbar: torch.Tensor) -> torch.Tensor:
        """Lemma 7 straight from stored factors: a kind may skip building its rows (conv)."""
        x, d = self.rows(meta, factors)
        return self.apply_average(meta, x, d, gbar)

    def apply_average(self, meta: LayerMeta, x: torch.Tensor, d: torch.Tensor, gbar: torch.Tensor) -> torch.Tensor:
        """<grad_n, Gbar> = sum(D_n * (X_n Gbar^T)) for each sample (Lemma 7); Gbar is (dout, din [+1])."""
        rows, weight = x.reshape(-1, x.shape[-1]), gbar[:, :meta.din].T
        y = torch.addmm(gbar[:, meta.din], rows, weight) if meta.bias else rows @ weight
        # in place on the fresh product: no second (N, S, dout) buffer, unlike einsum("nso,nso->n")
        return y.reshape(d.shape).mul_(d).sum(dim=(1, 2))

    def outer(self, meta: LayerMeta, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Per-sample full gradients (N, dout, din [+1])."""
        w = torch.einsum("nso,nsi->noi", d, x)
        return torch.cat([w, d.sum(1).unsqueeze(-1)], dim=-1) if meta.bias else w

    def average(self, meta: LayerMeta, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Gbar (dout, din [+1]): the batch mean of the gradients, without building each one."""
        w = torch.einsum("nso,nsi->oi", d, x)
        if meta.bias:
            w = torch.cat([w, d.sum(dim=(0, 1)).unsqueeze(-1)], dim=-1)
        return w / x.shape[0]

    # ---- full gradients ---------------------------------------------------------------------------
    def full(self, meta: LayerMeta, factors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample full gradients (B, params): the matrix D^T X flattened row-major, so the
        weight's gradient is [:, :din] of each row of the matrix and the bias's is [:, din]."""
        if "G" in factors:
            return factors["G"].float()
        x, d = self.rows(meta, factors)
        return self.outer(meta, x, d).reshape(x.shape[0], -1)

    def torch_grad_vector(self, meta: LayerMeta, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Flattens torch's per-sample parameter gradients (keys 'weight', 'bias'; batch first)
        in the order of `full`, so tests compare against torch.func."""
        w = grads["weight"].reshape(grads["weight"].shape[0], meta.dout, -1)
        if meta.bias:
            w = torch.cat([w, grads["bias"].reshape(-1, meta.dout, 1)], dim=2)
        return w.reshape(w.shape[0], -1)


KINDS: dict[type, LayerKind] = {}
_BY_NAME: dict[str, LayerKind] = {}


_FALLBACK: list[LayerKind] = []      # the general kind, for modules no specialised kind captures


def register_fallback(cls: type[LayerKind]) -> type[LayerKind]:
    """Registers the kind that captures any module with parameters no specialised kind takes; it
    implements `applies(module) -> str` ('' or why not)."""
    handler = cls()
    _FALLBACK[:] = [handler]
    _BY_NAME[handler.kind] = handler
    return cls


def register(*module_types: type):
    def wrap(cls: type[LayerKind]) -> type[LayerKind]:
        handler = cls()
        for t in module_types:
            KINDS[t] = handler
        _BY_NAME[handler.kind] = handler
        return cls
    return wrap


_PENDING: list[tuple[str, str, LayerKind]] = []    # (module, class name, kind) of types not imported yet


def register_lazy(module_name: str, class_name: str):
    """Registers a kind for a class of a library MetaQL does not import itself (transformers): the
    type is looked up once its module is imported, which any model of it has done."""
    def wrap(cls: type[LayerKind]) -> type[LayerKind]:
        handler = cls()
        _PENDING.append((module_name, class_name, handler))
        _BY_NAME[handler.kind] = handler
        return cls
    return wrap


def _register_pending() -> None:
    import sys
    for entry in list(_PENDING):
        module = sys.modules.get(entry[0])
        if module is not None:
            _PENDING.remove(entry)
            if isinstance(getattr(module, entry[1], None), type):
                KINDS[getattr(module, entry[1])] = entry[2]


def kind_for(name: str, module: nn.Module) -> LayerKind:
    kind, why = find_kind(module)
    if kind is None:
        supported = ", ".join(sorted({t.__name__ for t in KINDS}))
        raise BinderException(f"layer '{name}' {why}; supported layer kinds: {supported} "
                              "(leave it out of layers=, or use layers='*', which skips it with a notice)")
    return kind


def find_kind(module: nn.Module) -> tuple[LayerKind | None, str]:
    """(the kind that captures `module` exactly, '') or (None, why no kind does).

    Kinds are registered for exact module types. A subclass may use its parent's kind only when it
    computes what the parent does: it overrides none of the methods the kind models (forward) and
    its own parameters are the parent's (not e.g. weight_norm's weight_g/weight_v); otherwise the
    kind's factors would be the gradients of another function, silently wrong."""
    kind, why = _specialised_kind(module)
    if kind is None and _FALLBACK:
        unfit = _FALLBACK[0].applies(module)
        if not unfit:
            return _FALLBACK[0], ""
        if not _refused_by_own_kind(module):
            why = f"is a {type(module).__name__} that {unfit}"
    return kind, why


def _refused_by_own_kind(module: nn.Module) -> bool:
    _register_pending()
    """True when the kind registered for exactly this type refused it (its reason is the one to show)."""
    kind = KINDS.get(type(module))
    return kind is not None and bool(kind.unfit(module))


def _specialised_kind(module: nn.Module) -> tuple[LayerKind | None, str]:
    _register_pending()
    mro = type(module).__mro__
    base = next((t for t in mro if t in KINDS), None)
    if base is None:
        return None, f"is a {type(module).__name__}, which MetaQL cannot capture yet"
    kind = KINDS[base]
    overriding = [c.__name__ for c in mro[:mro.index(base)]
                  if any(m in vars(c) for m in kind.modelled_methods)]
    if overriding:
        return None, (f"is a {type(module).__name__}, a subclass of {base.__name__} whose own forward "
                      f"(in {overriding[0]}) MetaQL cannot model: capturing it as a plain {base.__name__} "
                      "would store wrong gradients")
    unfit = kind.unfit(module)
    if unfit:
        return None, f"is a {type(module).__name__} that {unfit}"
    own = {n for n, _ in module.named_parameters(recurse=False)}
    if not own or not own <= set(kind.param_names) or kind.param_names[0] not in own:
        return None, (f"is a {type(module).__name__} whose parameters ({', '.join(sorted(own)) or 'none'}) "
                      f"are not a plain {base.__name__}'s ({', '.join(kind.param_names)}; e.g. weight_norm or "
                      "a parametrization computes its weight), so its gradients are not the kind's")
    return kind, ""


def kind_named(kind: str) -> LayerKind:
    if kind not in _BY_NAME:
        raise CatalogException(f"layer kind '{kind}' is not registered in this process: import the module "
                               "that registers it (metaql.storage.layers.register) before querying")
    return _BY_NAME[kind]


def kind_registered(kind: str) -> bool:
    return kind in _BY_NAME


def kind_class_of(kind: str) -> str:
    """The importable 'package.module:Class' of a registered kind."""
    cls = type(_BY_NAME[kind])
    return f"{cls.__module__}:{cls.__qualname__}"
