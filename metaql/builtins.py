"""Imports the modules whose table functions register themselves in the global registry.

The face reaches ELITE and LANCET only through the registry, never by name."""
from __future__ import annotations

import importlib

from metaql.engine import influence  # noqa: F401

for _module in ("metaql.cleaning.elite_function", "metaql.labeling.lancet_functions",
                "metaql.diagnosis.functions", "metaql.active.gradnorm", "metaql.active.cleaning",
                "metaql.active.session_functions", "metaql.pivotal.functions",
                "metaql.approx"):
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as _e:  # a part not built yet; its functions are simply absent
        if _e.name != _module:
            raise
