"""The exception tree lives in `metaql.errors` (a leaf module that imports nothing of MetaQL);
this alias keeps `from metaql.errors import ...` working for code written before the move."""
from metaql.errors import *  # noqa: F401,F403
from metaql.errors import DUCKDB_NAMES, Warning, __all__  # noqa: F401
