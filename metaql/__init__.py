"""MetaQL: an embedded gradient query engine for deep-learning training data.

    import metaql
    con = metaql.connect("runs/digits.mq")
    con.execute("SELECT TOPK(50) train FROM INFLUENCE(layers=*, query=batch(test_wrong)) ORDER BY ASC")
    con.fetchall()
"""
from metaql.errors import *  # noqa: F401,F403  the exception tree (a leaf module)
from metaql.errors import __all__ as _ERRORS
from metaql.errors import Warning  # noqa: F401

__version__ = "0.1.0"
apilevel = "2.0"
threadsafety = 1
paramstyle = "qmark"

__all__ = ["connect", "Connection", "Result", *_ERRORS, "SetName", "LayerList", "CheckpointList", "SampleRef",
           "sql", "default_connection"]

# The connection pulls in torch, DuckDB and Arrow; importing it lazily keeps `metaql --help` instant.
# The type hints are lazy too, so that `import metaql.errors` loads nothing but the exception tree.
_LAZY = {"connect": "metaql.connection", "Connection": "metaql.connection", "Result": "metaql.result",
         "SetName": "metaql.engine.functions", "LayerList": "metaql.engine.functions",
         "CheckpointList": "metaql.engine.functions", "SampleRef": "metaql.engine.functions"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'metaql' has no attribute {name!r}")


_default = None


def default_connection():
    """The process's in-memory connection that `metaql.sql()` runs on (opened on first use)."""
    global _default
    if _default is None or _default.store is None:
        from metaql.connection import connect
        _default = connect(":memory:")
    return _default


def sql(query: str, parameters=None):
    """Runs `query` on the default in-memory connection, like `duckdb.sql()`: a lazy relation."""
    return default_connection().sql(query, parameters)
