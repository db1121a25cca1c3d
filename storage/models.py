"""Model weights per checkpoint (safetensors, never pickle) and the factory that rebuilds a model.

A store records a model as an importable factory ("package.module:callable") plus JSON keyword
arguments, so the shell can replay samples at a checkpoint without the training script.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from metaql.engine.errors import BinderException, IOException
from metaql.storage.tensorfile import fsync_path


def save_weights(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(tmp))
    fsync_path(tmp)             # the catalog records the file's checksum: it must be on disk first
    tmp.replace(path)
    fsync_path(path.parent)


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    if not path.exists():
        raise IOException(f"weights file {path} is missing; the checkpoint cannot be replayed")
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


def factory_of(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def build_model(factory: str, kwargs_json: str | None) -> nn.Module:
    module_name, _, attr = factory.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise BinderException(
            f"cannot rebuild the model: factory '{factory}' is not importable ({e}); "
            "install the package that defines it, or pass the model to con.attach_model(model)"
        ) from None
    return obj(**json.loads(kwargs_json or "{}"))


def factory_is_rebuildable(model: nn.Module, factory: str, kwargs: dict) -> bool:
    """True when the recorded factory builds a model with the same parameter names and shapes."""
    try:
        if ":" not in factory or "<locals>" in factory or factory.startswith("__main__:"):
            return False
        # a throwaway build must not draw from the user's RNG (dropout masks, data order)
        with torch.random.fork_rng(devices=[]):
            other = build_model(factory, json.dumps(kwargs))
    except Exception:  # any failure means "not rebuildable"; the caller warns
        return False
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return mine == {k: tuple(v.shape) for k, v in other.state_dict().items()}


def init_kwargs(model: nn.Module) -> dict:
    """Constructor kwargs a model advertises in a `metaql_config` dict attribute, else none."""
    cfg = getattr(model, "metaql_config", None)
    return dict(cfg) if isinstance(cfg, dict) else {}
