"""Hooks that see each watched module's inputs (forward) and its outputs' gradients (backward).

Calls are indexed so that the i-th input pairs with the i-th output gradient even though the
backward pass visits calls in reverse order; a module called twice contributes both calls.

Layers picked by a pattern (`layers='*'`, `'bert.encoder.layer.*.attention.*'`) are optional: one
that no gradient reaches in the first batch (BERT's pooler when the loss does not use it, a module
whose parent calls its weights directly) is dropped, and one warning lists everything skipped and
why. A layer named explicitly must get its gradient, or the batch is refused before anything of it
is stored.
"""
from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from metaql.errors import BinderException, CatalogException, InvalidInputException, Warning, user_stacklevel
from metaql.storage.layers import KINDS, LayerKind, find_kind, kind_for

_GLOB = set("*?[")
NOTICE_NAMES = 20     # names a skip notice or an error spells out before "and N more"
# a pattern leaves out a full-only layer larger than this (a GPT-2 Conv1D under the fallback kind
# would store millions of numbers per sample); named explicitly, any size is captured
PATTERN_MAX_FULL = 1 << 20


@dataclass
class Selection:
    """The watched modules of a model, and what the layer patterns matched but cannot capture."""
    modules: dict[str, nn.Module]
    optional: set[str] = field(default_factory=set)        # picked by a pattern, not by name
    skipped: dict[str, str] = field(default_factory=dict)  # {module: why it is not captured}
    batchnorms: dict[str, nn.Module] = field(default_factory=dict)
    root: nn.Module | None = None       # the model: its input's leading dimension is the batch


class LayerHooks:
    def __init__(self, modules: dict[str, nn.Module] | Selection):
        sel = modules if isinstance(modules, Selection) else Selection(dict(modules))
        self.modules = dict(sel.modules)
        self.optional, self.skipped, self.batchnorms = set(sel.optional), dict(sel.skipped), sel.batchnorms
        self.root = sel.root
        self.kinds: dict[str, LayerKind] = {n: kind_for(n, m) for n, m in self.modules.items()}
        self._call_batch = {n: k.call_batch for n, k in self.kinds.items()}
        self._handles: dict[str, list] = {}
        self._first = True      # the first batch decides which optional layers stay
        self.clear()

    def clear(self) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {n: [] for n in self.modules}
        self.outputs: dict[str, list[torch.Tensor]] = {n: [] for n in self.modules}
        self.grads: dict[str, dict[int, torch.Tensor]] = {n: {} for n in self.modules}
        self.recomputing: dict[str, list[bool]] = {n: [] for n in self.modules}   # per call: run by a backward
        self.normalized: dict[str, torch.Tensor] = {}    # batch-statistics norm inputs (first batch)
        self.refused: dict[str, str] = {}                # {layer: why a call of it cannot be captured}
        self._computing = False     # a kind recomputing a module (torch.func) must not be recorded
        self._reran = False         # a call was recorded inside a backward pass (see _drop_recomputations)
        self.batch: int | None = None   # samples in the model's last call (its input is batch first)

    def attach(self) -> "LayerHooks":
        for name, module in self.modules.items():
            self._handles.setdefault(name, []).append(
                module.register_forward_hook(self._forward_hook(name), with_kwargs=True))
        if self.root is not None:
            self._handles.setdefault("\1root", []).append(
                self.root.register_forward_pre_hook(self._batch_hook, with_kwargs=True))
        if self._first:
            for name, bn in self.batchnorms.items():
                self._handles.setdefault("\0" + name, []).append(bn.register_forward_hook(self._norm_hook(name)))
        return self

    def detach(self) -> None:
        for handles in self._handles.values():
            for h in handles:
                h.remove()
        self._handles.clear()
        self.clear()

    def _forward_hook(self, name: str):
        kind = self.kinds[name]
        # a kind that keeps the base class's call methods needs none of their calls (one per layer
        # call: a few microseconds each on steps of a few hundred)
        plain = all(getattr(type(kind), m) is getattr(LayerKind, m)
                    for m in ("call_problem", "call_output", "saved_call"))

        def hook(module, inputs, kwargs, output):
            if self._computing or not torch.is_grad_enabled():
                return
            if plain:
                if not (isinstance(output, torch.Tensor) and output.requires_grad):
                    return
                saved, replacement = inputs[0].detach(), None
            else:
                saved, output, replacement = self._saved_call(name, kind, module, inputs, kwargs, output)
                if saved is None:
                    return
            calls = self.inputs[name]
            call = len(calls)
            calls.append(saved)
            self.outputs[name].append(output)
            # gradient checkpointing reruns the forward inside the backward pass (see _recomputations)
            if torch._C._current_graph_task_id() != -1:
                self.recomputing[name].append(True)
                self._reran = True
            else:
                self.recomputing[name].append(False)
            grads = self.grads[name]

            def keep_grad(grad):
                grads[call] = grad.detach()
            output.register_hook(keep_grad)
            return replacement
        return hook

    def _saved_call(self, name: str, kind: LayerKind, module, inputs, kwargs, output):
        """(what the kind saves of the call, its output tensor, a replacement output), or (None, ...)
        when the call is not captured (refused: recorded in self.refused)."""
        problem = kind.call_problem(inputs, kwargs, output)
        if problem:
            self.refused[name] = problem
            return None, output, None
        output, replacement = kind.call_output(output)
        if not (isinstance(output, torch.Tensor) and output.requires_grad):
            return None, output, None
        saved, problem = kind.saved_call(module, inputs, kwargs)
        if problem:
            self.refused[name] = problem
            return None, output, None
        return saved, output, replacement

    def _batch_hook(self, module, args, kwargs):
        if not self._computing:
            if args and isinstance(args[0], torch.Tensor) and args[0].dim():
                self.batch = args[0].shape[0]       # the usual call, model(x), without the walk
                return
            first = next((t for t in _tensors((args, kwargs)) if t.dim()), None)
            self.batch = None if first is None else first.shape[0]

    def _norm_hook(self, name: str):
        def hook(module, inputs, output):
            if _batch_statistics(module) and torch.is_grad_enabled() and inputs[0].grad_fn is not None:
                self.normalized[name] = inputs[0]
        return hook

    def factors(self, scale: float = 1.0, deferred: bool = False):
        """Per-layer per-sample factors of the last forward/backward; `scale` undoes a mean loss.
        Raises (before anything of the batch is stored) when a required layer got no gradient.
        `deferred`: the factors a kind lists in gradient_factors are left unscaled (the capture
        scales them in its buffer's copy) and the result is (factors, {layer: the names left unscaled})."""
        self._drop_recomputations()
        # _no_gradient's reasons, asked only of the layers it has one for (this runs every step)
        missing = {n: self._no_gradient(n) for n, calls in self.inputs.items()
                   if not calls or len(self.grads[n]) != len(calls) or n in self.refused}
        missing.update(self._broadcast())
        if self._first:
            self._first_batch(missing)
        for name, why in missing.items():
            if len(self.inputs[name]) or name in self.refused:
                raise InvalidInputException(
                    f"layer '{name}' {why}, so it has no per-sample gradient; nothing of this batch was "
                    f"stored (leave '{name}' out of layers=, or make the loss depend on its output)")
        out, unscaled = {}, {}
        self._computing = True
        try:
            for name, calls in self.inputs.items():
                if not calls:
                    continue
                grads, kind = self.grads[name], self.kinds[name]
                if scale == 1.0 or (deferred and kind.gradient_factors):
                    given = [grads[i] for i in range(len(calls))]
                    if scale != 1.0:
                        unscaled[name] = kind.gradient_factors
                else:
                    given = [grads[i] * scale for i in range(len(calls))]
                out[name] = kind.factors(self.modules[name], calls, given)
        finally:
            self._computing = False
        return (out, unscaled) if deferred else out

    def _drop_recomputations(self) -> None:
        """Forgets calls that a backward pass ran and no gradient reached: gradient checkpointing
        (torch.utils.checkpoint, Hugging Face's gradient_checkpointing_enable) without reentry reruns
        a block's forward to rebuild what it did not save, and the gradient reaches the first call's
        output. (With reentry the first call runs without grad and is never recorded; the rerun's
        outputs get the gradient and stay.)"""
        if not self._reran:
            return
        for name, flags in self.recomputing.items():
            reran = [i for i, flag in enumerate(flags) if flag and i not in self.grads[name]]
            if not reran:
                continue
            kept = [i for i in range(len(flags)) if i not in reran]
            self.inputs[name] = [self.inputs[name][i] for i in kept]
            self.outputs[name] = [self.outputs[name][i] for i in kept]
            self.grads[name] = {new: self.grads[name][old] for new, old in enumerate(kept) if old in self.grads[name]}
            self.recomputing[name] = [flags[i] for i in kept]

    def _no_gradient(self, name: str) -> str:
        calls, grads = len(self.inputs[name]), len(self.grads[name])
        if name in self.refused:
            return self.refused[name]
        if calls == 0:
            return "saw no forward call through its own forward (its parent may use its weights directly)"
        if grads != calls:
            return (f"saw {calls} forward calls but {grads} gradients: the loss does not depend on its "
                    f"output{'' if grads == 0 else ' of every call'}")
        return ""

    def _broadcast(self) -> dict[str, str]:
        """{layer: why} for layers called on fewer rows than the batch (GPT-2's position embedding
        reads position ids of shape (1, T), broadcast over the samples): the gradient torch hands
        back is the batch's sum, from which no sample's own gradient can be separated."""
        batch = self.batch
        if batch is not None and all(self._call_batch[n](c) == batch
                                     for n, calls in self.inputs.items() for c in calls):
            return {}       # every call on the model's batch: the usual step, told without the sets below
        sizes = {n: {self._call_batch[n](c) for c in calls} for n, calls in self.inputs.items() if calls}
        batch = batch if batch is not None else _most_common(sizes.values())
        return {n: (f"is called on inputs of leading dimension {sorted(s - {batch})[0]}, not the batch's {batch} "
                    "(an input shared by every sample, such as position ids, or samples merged into rows): its "
                    "gradient cannot be split into per-sample ones")
                for n, s in sizes.items() if s != {batch} and n not in self.refused}

    def _first_batch(self, missing: dict[str, str]) -> None:
        """Drops optional layers no gradient reached, warns once about every skipped module, and
        warns about layers whose factors a batch-statistics norm couples across samples."""
        self._first = False
        dropped = {n: why for n, why in missing.items() if n in self.optional}
        for name in dropped:
            self._drop(name)
            del missing[name]
        self.skipped.update(dropped)
        for h in [h for key in list(self._handles) if key.startswith("\0") for h in self._handles.pop(key)]:
            h.remove()
        if self.skipped:
            warnings.warn(f"layers: skipped {len(self.skipped)} module(s) with parameters: "
                          + _listed(f"'{n}' ({why})" for n, why in self.skipped.items()), Warning,
                          stacklevel=user_stacklevel())
        coupled = coupled_layers(self.normalized, self.outputs)
        if coupled:
            warnings.warn(
                "per-sample factors are inexact for "
                + _listed(f"'{layer}' (its output reaches {', '.join(repr(b) for b in bns)})"
                          for layer, bns in coupled.items())
                + ": a BatchNorm normalizing with batch statistics (train mode) mixes the samples of a batch, "
                "so a sample's gradient depends on the others; replay the checkpoint (con.replay, eval "
                "mode) for exact factors", Warning, stacklevel=user_stacklevel())
        self.normalized = {}

    def _drop(self, name: str) -> None:
        for h in self._handles.pop(name, []):
            h.remove()
        for d in (self.modules, self.kinds, self._call_batch, self.inputs, self.outputs, self.grads, self.refused,
                  self.recomputing):
            d.pop(name, None)


def _most_common(sizes) -> int | None:
    counts: dict[int, int] = {}
    for s in sizes:
        for b in s:
            counts[b] = counts.get(b, 0) + 1
    return max(counts, key=lambda b: (counts[b], b)) if counts else None


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def coupled_layers(normalized: dict[str, torch.Tensor], outputs: dict[str, list[torch.Tensor]]) -> dict[str, list[str]]:
    """{watched layer: batch-statistics norms its output flows into}, found on the autograd graph."""
    nodes = {}
    for layer, outs in outputs.items():
        for o in outs:
            if o.grad_fn is not None:
                nodes.setdefault(o.grad_fn, []).append(layer)
    out: dict[str, list[str]] = {}
    for bn, x in normalized.items():
        for layer in sorted({layer for node in _upstream(x.grad_fn) for layer in nodes.get(node, [])}):
            out.setdefault(layer, []).append(bn)
    return out


def _upstream(node) -> set:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        todo.extend(next_fn for next_fn, _ in n.next_functions)
    return seen


def _batch_statistics(module: nn.Module) -> bool:
    return module.training or getattr(module, "running_mean", None) is None


def _listed(items) -> str:
    items = list(items)
    more = f", and {len(items) - NOTICE_NAMES} more" if len(items) > NOTICE_NAMES else ""
    return "; ".join(items[:NOTICE_NAMES]) + more


def select_layers(model: nn.Module, layers: list[str] | str | None) -> Selection:
    """Resolves layer names and glob patterns ('*' or None for every layer) to modules.

    A name must be a module of a kind MetaQL captures exactly (else a clear error). A pattern
    (fnmatch over module names, '*' crossing dots) picks the matching modules that have parameters
    of their own; those no kind captures are listed in `skipped`, and a pattern that matches no
    module at all is an error that names some modules."""
    named = {n: m for n, m in model.named_modules() if n}
    if layers is None:
        layers = ["*"]
    elif isinstance(layers, str):
        layers = [layers]
    if not layers:
        raise BinderException("layers= is empty; name layers, glob patterns ('encoder.*'), or '*' for all")
    sel = Selection({}, batchnorms={n: m for n, m in named.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)},
                    root=model)
    explicit = [n for n in layers if not (_GLOB & set(str(n)))]
    for pattern in [p for p in layers if _GLOB & set(str(p))]:
        _add_pattern(sel, named, pattern)
    for n in explicit:
        _require_layer(n, named)
        kind_for(n, named[n])
        sel.optional.discard(n)
        sel.skipped.pop(n, None)
        sel.modules[n] = named[n]
    _drop_covered(sel, explicit, named)
    _skip_covered(sel, named)
    _warn_tied(sel.modules)
    if not sel.modules:
        raise BinderException("no layer of the model is of a kind MetaQL captures"
                              + (": " + _listed(f"'{n}' {why}" for n, why in sel.skipped.items()) if sel.skipped else ""))
    order = list(named)
    sel.modules = dict(sorted(sel.modules.items(), key=lambda kv: order.index(kv[0])))
    return sel


def _warn_tied(modules: dict[str, nn.Module]) -> None:
    """Layers sharing one parameter (GPT-2's lm_head and wte, tied) are captured each with its own
    use of it: torch's gradient of the shared parameter is their sum, which per-layer scores lack."""
    owners: dict[int, list[str]] = {}
    for name, module in modules.items():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    tied = sorted({tuple(names) for names in owners.values() if len(names) > 1})
    if tied:
        warnings.warn("layers " + "; ".join(" and ".join(f"'{n}'" for n in t) for t in tied) + " share a parameter "
                      "(tied weights): each is scored with its own use of it, not with the shared parameter's "
                      "gradient (their sum); untie them (e.g. tie_word_embeddings=False) or select one of them "
                      "for a parameter-level answer", Warning, stacklevel=4)


def _skip_covered(sel: Selection, named: dict[str, nn.Module]) -> None:
    """A skipped layer's covered children (out_proj of an attention no kind models) are skipped with it."""
    for parent in list(sel.skipped):
        kind = KINDS.get(type(named[parent]))
        for child in kind.covers_children if kind is not None else ():
            name = f"{parent}.{child}"
            if name in sel.optional:
                sel.modules.pop(name, None)
                sel.optional.discard(name)
                sel.skipped[name] = f"is part of '{parent}', which is skipped"


def _drop_covered(sel: Selection, explicit: list[str], named: dict[str, nn.Module]) -> None:
    """Children a selected layer's kind captures with it (nn.MultiheadAttention's out_proj) are not
    layers of their own: a pattern's pick is dropped silently, a name is refused."""
    for name in explicit:
        parent, _, child = name.rpartition(".")
        kind = KINDS.get(type(named.get(parent)))
        if kind is not None and child in kind.covers_children:
            raise BinderException(f"layer '{name}' is captured as part of layer '{parent}' (its kind {kind.kind} "
                                  f"covers it; torch never calls it itself); name '{parent}' in layers= instead")
    for parent, module in list(sel.modules.items()):
        for child in find_kind(module)[0].covers_children:
            name = f"{parent}.{child}"
            sel.modules.pop(name, None)
            sel.optional.discard(name)
            sel.skipped.pop(name, None)


def _add_pattern(sel: Selection, named: dict[str, nn.Module], pattern: str) -> None:
    matched = [n for n in named if fnmatch.fnmatchcase(n, pattern)]
    if not matched:
        if not named:       # a bare layer (nn.Linear(...)) as the whole model: layers are its submodules
            raise CatalogException(f"layer pattern '{pattern}' matches no module: the model has no submodules, and "
                                   "layers are named submodules; wrap it, e.g. nn.Sequential(nn.Linear(...)), and "
                                   "capture layers='*' (its layer is then '0')")
        raise CatalogException(f"layer pattern '{pattern}' matches no module of the model; its modules "
                               f"include: {_listed(repr(n) for n in named)}")
    for n in matched:
        module = named[n]
        if n in sel.modules or not any(True for _ in module.parameters(recurse=False)):
            continue      # a container or a parameterless module: nothing of its own to capture
        kind, why = find_kind(module)
        if kind is not None and not kind.factored and _numbers(module) > PATTERN_MAX_FULL:
            kind, why = None, (f"would store all its {_numbers(module)} parameters' gradients per sample as the "
                               f"{kind.kind} kind; name it in layers= to capture it anyway")
        if kind is None:
            sel.skipped[n] = why
        else:
            sel.modules[n] = module
            sel.optional.add(n)


def _numbers(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _require_layer(name: str, named: dict[str, nn.Module]) -> None:
    from metaql.storage.catalog import require_name
    require_name("layer", name, list(named))


def watched_modules(model: nn.Module, layers: list[str] | str | None) -> dict[str, nn.Module]:
    """Resolves layer names and patterns to modules (see select_layers)."""
    return select_layers(model, layers).modules
