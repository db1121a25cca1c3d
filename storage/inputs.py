"""Sample inputs of any structure: what `con.add_samples(inputs=...)` accepts, how the inputs shards
store it, and how replay hands a batch back to the model.

Accepted (one entry per sample id; every tensor's first axis is the sample):

    a tensor                          replayed as model(x)
    a tuple of inputs                 replayed as model(*xs)              (several inputs)
    a dict / Mapping of inputs        replayed as model(**d)              (a tokenizer's BatchEncoding)
    a list of per-sample tensors      one variable-length input: sample i's tensor has shape (L_i, ...)

A tuple or dict may nest and may hold lists. A list always means one tensor per sample; pass several
inputs as a tuple. The variable-length inputs of one sample share its length L_i (ids, mask and token
types of one sequence). Each inputs shard stores them zero-padded to the shard's longest sequence plus
the lengths; replay pads each batch to that batch's longest sequence only, and hands the model a padding
mask (int64, 1 on real positions) unless the inputs carry one themselves:

    a dict without an 'attention_mask' key  gets d['attention_mask']     (MASK_KEY)
    a tuple                                 gets the mask as its last element: model(*xs, mask)
    a bare list                             becomes model(padded, mask)

So a model that masks its padding (attention masks, a masked mean) has the same per-sample
gradients at any padded length. Leaves are stored one tensor column each ('input', 'input.0',
'input.attention_mask'), and the structure is recorded in every inputs shard, so it survives a
reopen. Tasks (storage/tasks.py) receive the batch in the same structure as the model does.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from metaql.errors import InvalidInputException

ROOT = "input"
MASK_KEY = "attention_mask"
LENGTHS = "lengths"          # the tensor column of sequence lengths in an inputs shard
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DTYPES = {"float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool"}


@dataclass
class Flat:
    """Registered inputs as leaves: {name: (N, ...) tensor} (variable-length ones zero-padded to the
    longest), the per-sample lengths (or None) and the JSON structure that rebuilds them."""
    spec: dict
    leaves: dict[str, torch.Tensor]
    lengths: torch.Tensor | None

    def shard_tensors(self, rows: slice) -> dict[str, torch.Tensor]:
        """The tensor columns of one inputs shard: these rows, padded to their own longest."""
        out = {}
        width = int(self.lengths[rows].max()) if self.lengths is not None else None
        for leaf in leaves_of(self.spec):
            t = self.leaves[leaf["leaf"]][rows]
            if leaf["var"]:
                t = t[:, :width]
            out[leaf["leaf"]] = t.to(torch.uint8) if t.dtype == torch.bool else t
        if self.lengths is not None:
            out[LENGTHS] = self.lengths[rows]
        return out


def flatten(inputs, n: int) -> Flat:
    """Checks inputs for n samples and splits them into leaves; InvalidInputException on anything
    replay could not hand back to the model exactly."""
    leaves: dict[str, torch.Tensor] = {}
    lengths: list[torch.Tensor | None] = [None]
    tree = _node(inputs, ROOT, n, leaves, lengths)
    mask = None
    if lengths[0] is not None:
        if "dict" in tree:
            mask = None if MASK_KEY in tree["dict"] else MASK_KEY
        else:
            mask = "last"
    return Flat({"root": tree, "mask": mask}, leaves, lengths[0])


def _node(x, name: str, n: int, leaves: dict, lengths: list) -> dict:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        t = _tensor(x, name)
        if t.dim() == 0 or t.shape[0] != n:
            raise InvalidInputException(f"inputs '{name}' has {0 if t.dim() == 0 else t.shape[0]} rows for {n} "
                                        "sample ids; every input needs one row per sample (its first axis)")
        leaves[name] = t
        return {"leaf": name, "var": False, "shape": list(t.shape[1:]), "dtype": _dtype(t)}
    if isinstance(x, list):
        return _sequences(x, name, n, leaves, lengths)
    if isinstance(x, tuple):
        if not x:
            raise InvalidInputException(f"inputs '{name}' is an empty tuple; pass at least one tensor")
        return {"tuple": [_node(v, f"{name}.{i}", n, leaves, lengths) for i, v in enumerate(x)]}
    if isinstance(x, Mapping):
        if not x:
            raise InvalidInputException(f"inputs '{name}' is an empty dict; pass at least one tensor")
        bad = [k for k in x if not (isinstance(k, str) and _KEY.match(k))]
        if bad:
            raise InvalidInputException(f"inputs dict keys must be identifiers (the model's keyword arguments), "
                                        f"got {bad[:3]}")
        return {"dict": {k: _node(v, f"{name}.{k}", n, leaves, lengths) for k, v in x.items()}}
    raise InvalidInputException(f"inputs '{name}' is a {type(x).__name__}; inputs are tensors (or numpy arrays), "
                                "tuples or dicts of them, or lists of per-sample tensors")


def _sequences(items: list, name: str, n: int, leaves: dict, lengths: list) -> dict:
    """A list of per-sample tensors of varying first-axis length: padded with zeros."""
    if len(items) != n:
        raise InvalidInputException(f"inputs '{name}' is a list of {len(items)} items for {n} sample ids; a list "
                                    "holds one tensor per sample (variable length): pass several inputs as a tuple")
    ts = [_tensor(v if isinstance(v, (torch.Tensor, np.ndarray)) else _number_list(v, name, i), f"{name}[{i}]")
          for i, v in enumerate(items)]
    rest = ts[0].shape[1:] if ts[0].dim() else None
    for i, t in enumerate(ts):
        if t.dim() == 0 or t.shape[0] == 0:
            raise InvalidInputException(f"inputs '{name}' sample {i} is {'a scalar' if t.dim() == 0 else 'empty'}; "
                                        "each sample's sequence needs at least one position")
        if t.shape[1:] != rest:
            raise InvalidInputException(f"inputs '{name}' sample {i} has shape {tuple(t.shape)} but sample 0 has "
                                        f"{tuple(ts[0].shape)}: only the first axis (the length) may vary")
    dtype = ts[0].dtype
    if any(t.dtype != dtype for t in ts):
        raise InvalidInputException(f"inputs '{name}' mixes dtypes {sorted({str(t.dtype) for t in ts})}; "
                                    "give every sample the same dtype")
    lens = torch.tensor([t.shape[0] for t in ts], dtype=torch.int64)
    if lengths[0] is None:
        lengths[0] = lens
    elif not torch.equal(lengths[0], lens):
        i = int((lengths[0] != lens).nonzero()[0])
        raise InvalidInputException(f"inputs '{name}' sample {i} has length {int(lens[i])} but the other "
                                    f"variable-length inputs give it {int(lengths[0][i])}: the sequences of "
                                    "one sample must share one length (pad them yourself otherwise)")
    padded = torch.zeros(n, int(lens.max()), *rest, dtype=dtype)
    for i, t in enumerate(ts):
        padded[i, :t.shape[0]] = t
    leaves[name] = padded
    return {"leaf": name, "var": True, "shape": list(rest), "dtype": _dtype(padded)}


def _number_list(v, name: str, i: int) -> torch.Tensor:
    """A plain list of numbers (a tokenizer's ids without return_tensors) as a tensor."""
    if isinstance(v, (list, tuple)) and all(isinstance(e, (int, float, bool)) for e in v):
        return torch.as_tensor(v)
    raise InvalidInputException(f"inputs '{name}' sample {i} is a {type(v).__name__}; a list of inputs holds one "
                                "tensor (or list of numbers) per sample")


def _tensor(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu()
    if _dtype(t) not in _DTYPES:
        raise InvalidInputException(f"inputs '{name}' has dtype {t.dtype}; MetaQL stores {', '.join(sorted(_DTYPES))}")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise InvalidInputException(f"inputs '{name}' contains NaN or infinite values; clean them first")
    return t


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def leaves_of(spec: dict) -> list[dict]:
    out = []

    def walk(node):
        if "leaf" in node:
            out.append(node)
        for child in node.get("tuple", []):
            walk(child)
        for child in node.get("dict", {}).values():
            walk(child)
    walk(spec["root"])
    return out


def legacy_spec(shard_meta: dict) -> dict:
    """The structure of an inputs shard written before structured inputs: one tensor 'input'."""
    info = shard_meta["tensors"][ROOT]
    return {"root": {"leaf": ROOT, "var": False, "shape": info["shape"], "dtype": info["dtype"]}, "mask": None}


def described(spec: dict) -> str:
    """The structure as a user reads it: (N, 3), {input_ids: [(N, L)]}; [ ] marks variable length."""
    def show(node):
        if "leaf" in node:
            dims = ", ".join(["N"] + (["L"] if node["var"] else []) + [str(d) for d in node["shape"]])
            return f"[({dims})]" if node["var"] else f"({dims})"
        if "tuple" in node:
            return "(" + ", ".join(show(c) for c in node["tuple"]) + ")"
        return "{" + ", ".join(f"{k}: {show(c)}" for k, c in node["dict"].items()) + "}"
    return show(spec["root"])


def same_layout(a: dict, b: dict) -> bool:
    """Whether inputs registered as `a` and as `b` can share a batch: the same tree, keys, shapes
    and variable-length leaves (dtypes may differ: torch.cat promotes them)."""
    def strip(node):
        if "leaf" in node:
            return ("leaf", node["leaf"], node["var"], tuple(node["shape"]))
        if "tuple" in node:
            return ("tuple", tuple(strip(c) for c in node["tuple"]))
        return ("dict", tuple((k, strip(c)) for k, c in node["dict"].items()))
    return strip(a["root"]) == strip(b["root"]) and a.get("mask") == b.get("mask")


def collate(spec: dict, pieces: list[dict[str, torch.Tensor]]):
    """One batch in the registered structure from pieces of inputs shards ({column: rows}): fixed
    leaves concatenated, variable-length ones cut or zero-padded to the batch's longest sequence."""
    lengths = torch.cat([p[LENGTHS] for p in pieces]) if LENGTHS in pieces[0] else None
    width = int(lengths.max()) if lengths is not None else None
    leaves = {}
    for leaf in leaves_of(spec):
        parts = [p[leaf["leaf"]] for p in pieces]
        if leaf["var"]:
            parts = [_to_width(t, width) for t in parts]
        t = torch.cat(parts) if len(parts) > 1 else parts[0]
        leaves[leaf["leaf"]] = t.to(torch.bool) if leaf["dtype"] == "bool" else t
    batch = build(spec["root"], leaves)
    if spec.get("mask"):
        mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
        if spec["mask"] == MASK_KEY:
            batch[MASK_KEY] = mask
        elif isinstance(batch, tuple):
            batch = batch + (mask,)
        else:
            batch = (batch, mask)
    return batch


def _to_width(t: torch.Tensor, width: int) -> torch.Tensor:
    if t.shape[1] >= width:
        return t[:, :width]
    pad = torch.zeros(t.shape[0], width - t.shape[1], *t.shape[2:], dtype=t.dtype)
    return torch.cat([t, pad], dim=1)


def build(node: dict, leaves: dict[str, torch.Tensor]):
    if "leaf" in node:
        return leaves[node["leaf"]]
    if "tuple" in node:
        return tuple(build(c, leaves) for c in node["tuple"])
    return {k: build(c, leaves) for k, c in node["dict"].items()}


def single_tensor(inputs, who: str, instead: str) -> torch.Tensor:
    """Inputs a function reads as one (N, ...) feature tensor; a clear error for structured ones."""
    if isinstance(inputs, torch.Tensor):
        return inputs
    raise InvalidInputException(f"{who} reads the registered inputs as one tensor, but this store's inputs are "
                                f"a {type(inputs).__name__} of tensors; {instead}")


def call_model(model, inputs):
    """The model's output on a batch: model(x), model(*xs) for a tuple, model(**d) for a dict."""
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def take_rows(inputs, rows):
    """Rows (a slice or an index tensor) of every tensor of a structured batch."""
    if isinstance(inputs, tuple):
        return tuple(take_rows(v, rows) for v in inputs)
    if isinstance(inputs, Mapping):
        return {k: take_rows(v, rows) for k, v in inputs.items()}
    return inputs[rows]


def batch_size(inputs) -> int:
    """Samples in a structured batch: the first axis of its first tensor."""
    first = first_tensor(inputs)
    if first is None:
        raise InvalidInputException("the inputs hold no tensor")
    return first.shape[0]


def first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    for v in values:
        t = first_tensor(v)
        if t is not None:
            return t
    return None


class InputReader:
    """The registered inputs of given (unique) sample ids, batch by batch, read shard by shard.

    Iterating yields (positions into `ids`, batch in the registered structure), in the shards'
    order. Only the rows of one batch are copied out of the memory-mapped shards at a time, and a
    shard is let go as soon as its rows are read, so memory does not grow with the number of ids
    (`peak_rows` records the most rows held at once). Every id's inputs are found before the
    first batch is yielded: a missing one raises before any work is done."""

    def __init__(self, store, ids, batch_size: int = 256, shard_rows: list[dict] | None = None):
        from metaql.errors import BinderException
        from metaql.storage.store import _as_ids
        self.store, self.ids, self.batch_size = store, _as_ids(ids), max(1, int(batch_size))
        if len(np.unique(self.ids)) != len(self.ids):
            raise InvalidInputException("the inputs of a sample are read once per pass: pass each id once")
        self.peak_rows = 0
        self._plan = self._locate(store._shard_rows("inputs") if shard_rows is None else shard_rows)
        found = sum(len(idx) for _, idx, _ in self._plan)
        if found != len(self.ids):
            unknown = np.setdiff1d(self.ids, store.registered_ids())
            if len(unknown):     # not a sample at all: "no registered inputs" would mislead
                raise BinderException(f"{len(unknown)} of these ids are not registered samples (e.g. "
                                      f"{unknown[:5].tolist()}); register them with "
                                      "con.add_samples(ids, split, labels, inputs)")
        if len(self.ids) and found == 0:
            raise BinderException("none of these samples has registered inputs; "
                                  "pass inputs= to con.add_samples so they can be replayed")
        if found != len(self.ids):
            have = np.concatenate([self.ids[pos] for _, _, pos in self._plan])
            missing = np.setdiff1d(self.ids, have)
            raise BinderException(f"{len(missing)} samples have no registered inputs "
                                  f"(e.g. {missing[:5].tolist()}); they cannot be replayed")

    def _locate(self, shard_rows: list[dict]) -> list[tuple[dict, np.ndarray, np.ndarray]]:
        """(shard row, rows of the shard, their positions in ids) for each shard holding some."""
        order = np.argsort(self.ids, kind="stable")
        wanted = self.ids[order]
        plan = []
        for row in shard_rows:
            if len(wanted) == 0 or row["max_id"] < wanted[0] or row["min_id"] > wanted[-1]:
                continue
            shard_ids = self.store.input_shard(row).ids
            idx = np.nonzero(np.isin(shard_ids, wanted))[0]
            if len(idx):
                plan.append((row, idx, order[np.searchsorted(wanted, shard_ids[idx])]))
        return plan

    def __iter__(self):
        pieces, where, held = [], [], 0
        for row, idx, pos in self._plan:
            shard = self.store.input_shard(row)
            spec = self.store.input_spec(row, shard)
            columns = {n: shard.tensor(n) for n in shard.names()}      # views of the mapped file
            start = 0
            while start < len(idx):
                take = min(len(idx) - start, self.batch_size - held)
                rows = torch.from_numpy(idx[start:start + take])
                pieces.append({n: t[rows] for n, t in columns.items()})
                where.append(pos[start:start + take])
                held += take
                self.peak_rows = max(self.peak_rows, held)
                start += take
                if held == self.batch_size:
                    yield np.concatenate(where), collate(spec, pieces)
                    pieces, where, held = [], [], 0
            del shard, columns
        if pieces:
            yield np.concatenate(where), collate(spec, pieces)
