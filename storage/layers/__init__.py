"""Per-layer-kind handlers, registered by module class (after Opacus' registry).

A handler turns what the hooks saw for one module (its inputs and the gradients of its outputs,
one entry per call in the forward pass) into per-sample factors, and maps stored factors back to
the canonical linear form (X rows, D rows) that the engine's operators work on. Adding a layer
kind means adding one file here that subclasses `LayerKind` and decorates it with `register`.
"""
from __future__ import annotations

from metaql.storage.layers.base import (KINDS, LayerKind, LayerMeta, find_kind, kind_class_of, kind_for, kind_named,
                                         kind_registered, register, register_fallback)

# Importing the modules registers their kinds.
from metaql.storage.layers import conv, embedding, fallback, hf_conv1d, linear, mha, norm  # noqa: F401,E402

__all__ = ["KINDS", "LayerKind", "LayerMeta", "find_kind", "kind_class_of", "kind_for", "kind_named", "kind_registered",
           "register", "register_fallback"]
