"""A query result: an Arrow table with DuckDB's fetch methods and a cursor position."""
from __future__ import annotations

import numpy as np
import pyarrow as pa


class Result:
    def __init__(self, table: pa.Table):
        self._table = table
        self._pos = 0

    @classmethod
    def message(cls, text: str) -> "Result":
        return cls(pa.table({"status": [text]}))

    @property
    def description(self):
        """DB-API description: (name, type_code, None, None, None, None, None) per column."""
        return [(f.name, str(f.type), None, None, None, None, None) for f in self._table.schema]

    @property
    def columns(self) -> list[str]:
        return self._table.column_names

    def __len__(self) -> int:
        return self._table.num_rows

    def _rows(self, start: int, stop: int) -> list[tuple]:
        return rows_of(self._table.slice(start, max(stop - start, 0)))

    def fetchone(self):
        rows = self.fetchmany(1)
        return rows[0] if rows else None

    def fetchmany(self, size: int = 1) -> list[tuple]:
        rows = self._rows(self._pos, self._pos + size)
        self._pos += len(rows)
        return rows

    def fetchall(self) -> list[tuple]:
        rows = self._rows(self._pos, self._table.num_rows)
        self._pos = self._table.num_rows
        return rows

    def arrow(self) -> pa.Table:
        return self._table

    @property
    def approximation(self) -> dict | None:
        """What an approximate answer (INFLUENCE(..., error=e)) guarantees: its bound and, for a
        TOPK, the two-phase certificate (metaql.approx.execute); None for an exact answer."""
        import json
        raw = (self._table.schema.metadata or {}).get(b"metaql.approx")
        return None if raw is None else json.loads(raw)

    def df(self):
        return self._table.to_pandas()

    def fetchnumpy(self) -> dict[str, np.ndarray]:
        return {n: self._table.column(n).to_numpy(zero_copy_only=False) for n in self._table.column_names}

    def pl(self):
        try:
            import polars
        except ImportError:
            raise ImportError("pl() needs polars: pip install polars") from None
        return polars.from_arrow(self._table)

    def torch(self) -> dict:
        import torch
        return {k: torch.as_tensor(v) for k, v in self.fetchnumpy().items() if v.dtype.kind in "iufb"}

    def show(self, max_rows: int = 20) -> None:
        from metaql.format import render
        print(render(self._table, "box", max_rows))

    def __repr__(self) -> str:
        from metaql.format import render
        return render(self._table, "box", 20)


def rows_of(table) -> list[tuple]:
    """The rows of an Arrow table or batch as tuples, column by column (two columns of one name,
    as a join's ON gives, are both kept)."""
    return list(zip(*(c.to_pylist() for c in table.columns))) if table.num_columns else [()] * table.num_rows
