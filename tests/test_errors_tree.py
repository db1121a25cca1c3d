"""The exception tree (issue #18): a leaf module, DB-API 2.0's classes, DuckDB's names under them."""
import subprocess
import sys

import duckdb
import numpy as np
import pytest

import metaql
from metaql import errors


def test_leaf_module_imports_nothing_of_the_package():
    code = ("import sys, metaql.errors; "
            "print(sorted(m for m in sys.modules if m == 'metaql' or m.startswith('metaql.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['metaql', 'metaql.errors']"


def test_storage_layer_imports_the_leaf_not_the_engine():
    from pathlib import Path
    root = Path(metaql.__file__).resolve().parent.parent
    for folder in ("storage", "cleaning", "labeling"):
        for path in (root / folder).rglob("*.py"):
            assert "metaql.engine.errors" not in path.read_text(), path


def test_db_api_hierarchy():
    e = metaql
    assert issubclass(e.DatabaseError, e.Error) and issubclass(e.InterfaceError, e.Error)
    for cls in (e.OperationalError, e.IntegrityError, e.DataError, e.ProgrammingError, e.NotSupportedError,
                e.InternalError):
        assert issubclass(cls, e.DatabaseError)
    for name, base in [("ParserException", e.ProgrammingError), ("BinderException", e.ProgrammingError),
                       ("CatalogException", e.ProgrammingError), ("InvalidInputException", e.ProgrammingError),
                       ("ConversionException", e.DataError), ("OutOfRangeException", e.DataError),
                       ("IOException", e.OperationalError), ("ConstraintException", e.IntegrityError),
                       ("NotImplementedException", e.NotSupportedError), ("InternalException", e.InternalError),
                       ("InterruptException", e.DatabaseError)]:
        cls = getattr(metaql, name)
        assert issubclass(cls, base), name
        # the same DB-API class as DuckDB's class of that name
        duck = getattr(duckdb, name)
        assert issubclass(duck, getattr(duckdb, base.__name__)), name
    # classes that gained a DB-API base still catch as before
    assert issubclass(e.ConversionException, e.InvalidInputException)
    assert issubclass(e.ConstraintException, e.InvalidInputException)
    from metaql.engine.errors import Error as OldError
    assert OldError is metaql.Error


def test_duckdb_errors_map_to_the_class_of_the_same_name():
    con = metaql.connect(":memory:")
    con.add_samples(np.arange(3), "train", np.zeros(3, dtype=np.int64))
    con.execute("CREATE TABLE t (a INTEGER PRIMARY KEY)")
    con.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(metaql.ConstraintException) as caught:
        con.execute("INSERT INTO t VALUES (1)")
    assert isinstance(caught.value, metaql.IntegrityError)
    with pytest.raises(metaql.ConversionException) as caught:
        con.execute("SELECT CAST('x' AS INTEGER)")
    assert isinstance(caught.value, metaql.DataError)
    with pytest.raises(metaql.CatalogException):
        con.execute("SELECT * FROM no_such_table")
    con.close()
