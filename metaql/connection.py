"""The Python face, after DuckDB's: `connect()`, `Connection.execute/sql`, fetch methods.

    con = metaql.connect("runs/digits.mq")
    con.execute("SELECT TOPK(50) train FROM INFLUENCE(layers=*, query=batch(?)) ORDER BY ASC", ["test_wrong"])
    con.fetchall(); con.df(); con.arrow(); con.fetchnumpy()
"""
from __future__ import annotations

import functools
import itertools
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import duckdb
import numpy as np
import pyarrow as pa

from metaql import ast
from metaql.binder import bind_call, check_func_select, check_topk, value_of
from metaql.engine import executor
from metaql.errors import (DUCKDB_NAMES, BinderException, CatalogException, Error, InternalException, InterruptException,
                           InvalidInputException, IOException, ProgrammingError)
from metaql.engine.functions import REGISTRY
from metaql.parser import parse, split_statements
from metaql.planner import plan_call, plan_topk
from metaql.relation import ARROW_TYPES, Relation, renamed
from metaql.result import Result
from metaql.sqlcalls import blanked, bound_parameters, rewritten
from metaql.storage.catalog import SHOWN, nearest_name, query_arrow, register, unregister
from metaql.storage.catalog_snapshot import CatalogSnapshot
from metaql.storage.replay import replay_tally
from metaql.storage.sqlguard import check_syntax, checked_statements, retarget_insert
from metaql.storage.files import CATALOG, SNAPSHOT
from metaql.storage.store import Store

_DESCRIBE_ANY = re.compile(r"^\s*describe\b", re.I)      # DESCRIBE x, which DuckDB ran
_CALL_IDS = itertools.count()          # private relation names, unique per process
_PRIVATE = re.compile(r"_metaql_call_\d+")


def connect(database: str = ":memory:", read_only: bool = False, config: dict | None = None) -> "Connection":
    """Opens (or creates) a store: a directory, or ':memory:' for a throwaway one.

    config keys: 'progress' (bool: progress bars, default on a terminal), 'trusted_factories' (model
    factories this process may run, see README), 'device' ('cpu' / 'cuda' for the scans),
    'force_strategy' (pin one query strategy; benchmarks and tests), 'engine' ('local', the default, or
    'ray': scans as Ray tasks over the shards, pip install 'metaql[ray]'), 'address' (the Ray
    cluster's, default: the one this process joined, else a local one) and 'auto_calibrate' (bool,
    default true: fit the cost model to a layer in the background after a query on it,
    engine/autocalibrate.py), 'topk_pruning' (true, false or 'auto', the default: exact TOPK pruning,
    engine/pruning.py) and 'approx_route' ('auto', the default, 'index' or 'exact': how a TOPK under
    error= over a projected index runs, approx/route.py). Other keys are refused."""
    return Connection(database, read_only, config)


def _catalog_errors(method: Callable) -> Callable:
    """A Python-API method whose DuckDB errors (read-only writes, constraints, a transaction the
    user left open) surface as the matching metaql.Error; the user's own model code raises as is."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except duckdb.Error as e:
            raise _duck_error(e) from e
    return wrapper


# connect(config=...) keys: what each one does is in connect()'s docstring
CONFIG_KEYS = ("address", "approx_route", "auto_calibrate", "device", "engine", "force_strategy", "progress",
               "topk_pruning", "trusted_factories")


def _checked_config(config) -> dict:
    """A copy of `config`, refusing keys MetaQL does not know (a typo would otherwise be ignored)."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise InvalidInputException(f"config must be a dict, got {type(config).__name__}")
    for key in config:
        if key not in CONFIG_KEYS:
            import difflib
            hint = difflib.get_close_matches(str(key), CONFIG_KEYS, n=1)
            raise InvalidInputException(f"unknown config key {key!r}." + (f" Did you mean {hint[0]!r}?" if hint else "")
                                        + f" Known keys: {', '.join(CONFIG_KEYS)}")
    for key in ("progress", "auto_calibrate"):
        if key in config and not isinstance(config[key], bool):
            raise InvalidInputException(f"config[{key!r}] must be true or false, got {config[key]!r}")
    # isinstance, not `in (True, False, 'auto')`: 1 == True would pass as true
    if "topk_pruning" in config and not (isinstance(config["topk_pruning"], bool) or config["topk_pruning"] == "auto"):
        raise InvalidInputException(f"config['topk_pruning'] must be true, false or 'auto', got "
                                    f"{config['topk_pruning']!r}")
    from metaql.approx.route import ROUTES
    if "approx_route" in config and config["approx_route"] not in ROUTES:
        raise InvalidInputException(f"config['approx_route'] must be 'auto', 'index' or 'exact', got "
                                    f"{config['approx_route']!r}")
    if "device" in config:
        _check_device(config["device"])
    if "force_strategy" in config:
        from metaql.engine.strategies import STRATEGIES
        if config["force_strategy"] not in STRATEGIES:     # else every query ignores it without a word
            raise InvalidInputException(f"config['force_strategy'] must name a strategy ({', '.join(sorted(STRATEGIES))}), "
                                        f"got {config['force_strategy']!r}")
    if "engine" in config or "address" in config:
        from metaql.distributed.ray_engine import check_engine_config
        check_engine_config(config)
    return dict(config)


def _check_device(device) -> None:
    """config['device']: a device torch knows and this machine has, refused at connect rather than
    as an internal error at the first query that replays."""
    import torch
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidInputException(f"config['device'] must be a torch device such as 'cpu' or 'cuda', got {device!r}") \
            from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputException(f"config['device'] is {device!r} but this torch has no CUDA device "
                                    "(torch.cuda.is_available() is False); use 'cpu', or leave device out")


def _open_store(database, read_only: bool) -> Store:
    """A store directory, or a store on object storage (s3://bucket/path, gs://, file://), which
    opens read-only whatever `read_only` says: MetaQL writes only local stores."""
    if not isinstance(database, (str, os.PathLike)):
        raise InvalidInputException(f"database should be a store directory's path or ':memory:', not "
                                    f"{type(database).__name__} {database!r:.40}")
    if isinstance(database, str) and "://" in database:
        from metaql.distributed.objectstore import RemoteStore
        return RemoteStore(database)
    if Path(database).name in (CATALOG, CATALOG + ".wal", SNAPSHOT) and Path(database).is_file():
        raise IOException(f"{database} is a file inside a store; pass the store's folder, {Path(database).parent}")
    return Store(database, read_only=read_only)


def _positive(name: str, value, high: int = 1 << 24) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= high:
        raise InvalidInputException(f"{name} must be a whole number in [1, {high:,}], got {value!r}")


class Connection:
    def __init__(self, database: str = ":memory:", read_only: bool = False, config: dict | None = None):
        from metaql import builtins  # noqa: F401  registers the built-in table functions
        from metaql.engine.memory import pin_thresholds

        # one allocator regime for calibration and queries, whatever this process freed before
        pin_thresholds()
        self.database = database
        self.config = _checked_config(config)
        from metaql.storage.models import trusted_factories
        trusted = trusted_factories(self.config.get("trusted_factories"))   # checked before the store opens
        self.store = _open_store(database, read_only)
        self.store.trusted_factories |= trusted
        self.registry = REGISTRY.copy()
        self._result: Result | None = None
        self._interrupt = threading.Event()
        self._owns_store = True
        # progress bars on long work, on a terminal by default; config={"progress": False} turns them off
        show = self.config.get("progress", sys.stderr.isatty())
        self.progress: Callable = _bar_progress if show else _quiet_progress

    # ---- statements ----------------------------------------------------------------------------
    def execute(self, query: str, parameters: Any = None) -> "Connection":
        """Runs every statement in `query`; the last one's result is fetched from the connection."""
        self._check_open()
        statements = _parsed(query, self.registry.names())
        if not statements:
            raise ProgrammingError("no statement to execute")
        for stmt in statements:
            self._result = self._run(stmt, parameters)
        return self

    def sql(self, query: str, parameters: Any = None) -> "Relation":
        """A lazy relation for one statement, like DuckDB's `sql()`: parsed now (syntax errors
        surface at once), run on each fetch; relational methods compose it (metaql/relation.py)."""
        self._check_open()
        statements = _parsed(query, self.registry.names())
        if len(statements) != 1:
            raise ProgrammingError(f"sql() takes one statement, got {len(statements)}")
        return Relation.of_statement(self, statements[0], split_statements(query)[0].strip(), parameters)

    def cursor(self) -> "Connection":
        """A second connection to the same store, for another thread: its own DuckDB connection
        and result, the same functions and config. Closing it leaves this connection open;
        closing this connection closes it."""
        self._check_open()
        other = object.__new__(Connection)
        other.__dict__.update(self.__dict__)
        other.store = self.store.cursor()
        other._result, other._interrupt, other._owns_store = None, threading.Event(), True
        other._registered = {}      # con.register() names are per connection, as in DuckDB
        return other

    def _run(self, stmt, params) -> Result:
        self.store.refresh()   # a reader sees the store's last commit
        self._catalog = None   # one catalog snapshot per statement, read on first use (_statement_catalog)
        try:
            return self._run_one(stmt, params)
        finally:
            self.store.committed()   # a writer publishes what the statement committed, for readers

    def _run_one(self, stmt, params) -> Result:
        self._interrupt.clear()
        try:
            with _sigint_to(self._interrupt, self.store.db.interrupt):
                return self._dispatch(stmt, params)
        except BaseException as e:
            # a cancelled or failed statement may leave an execute() result behind whose complete()
            # re-raises its error: every later statement on the connection would fail with it
            _drop_pending(getattr(self.store, "db", None))
            translated = as_metaql_error(e)
            if translated is e:
                raise
            raise translated from _cause(e)

    def _dispatch(self, stmt, params) -> Result:
        from metaql.engine.calibrate import calibrate_store, is_calibrate
        if isinstance(stmt, ast.PlainSQL) and is_calibrate(stmt.text):     # the cost model's constants
            return Result(calibrate_store(self.store))
        if isinstance(stmt, ast.PlainSQL):
            return self._plain_sql(stmt.text, params)
        if isinstance(stmt, ast.SQLWithCalls):
            return self._sql_with_calls(stmt, params)
        if isinstance(stmt, ast.CreateSet):
            return self._create_set(stmt, params)
        if isinstance(stmt, ast.DropSet):
            self.store.drop_set(stmt.name, stmt.if_exists)
            return Result.message(f"dropped set {stmt.name}")
        if isinstance(stmt, ast.DropCheckpoint):
            return self._drop_checkpoint(stmt.name, stmt.if_exists)
        if isinstance(stmt, ast.Show):
            return self._show(stmt.what)
        if isinstance(stmt, ast.Describe):
            return self._describe(stmt.name)
        if isinstance(stmt, ast.Explain):
            return self._explain(stmt, params)
        plan = self._plan(stmt, params)
        return self._run_plan(stmt, plan)

    def _plan(self, stmt, params):
        ctx = self._context()
        if isinstance(stmt, ast.TopKSelect):
            k = check_topk(_whole_number(value_of(stmt.k, params)))
            _check_ranks_by_score(self.registry.get(stmt.call.name))
            bound = bind_call(stmt.call, self.registry, params, ctx.catalog)
            passed = frozenset(stmt.call.args) | frozenset(list(bound.function.params)[:len(stmt.call.positional)])
            return plan_topk(bound, ctx, k, stmt.ascending, stmt.train_set, passed)
        raise ProgrammingError(f"cannot plan {type(stmt).__name__}")

    def _run_plan(self, stmt, plan) -> Result:
        from metaql.engine.optimizer import optimize
        table = executor.execute(optimize(plan, self._statement_catalog(), self.config), self._context())
        return Result(_conformed(self.registry.get(stmt.call.name), table))

    def _create_set(self, stmt: ast.CreateSet, params) -> Result:
        if stmt.body is None:
            if stmt.text:       # a parse error placed in the statement, not in the query cut out of it
                check_syntax(blanked(stmt.text, stmt.lo, stmt.hi, []), stmt.text)
            n = self.store.create_set(stmt.name, stmt.query, params, replace=stmt.replace)
        else:
            with self._call_relations(stmt.body, params) as text:
                text, duck_params = bound_parameters(text, params)
                n = self.store.create_set(stmt.name, text, duck_params, replace=stmt.replace,
                                          definition=stmt.query)
        return Result.message(f"set {stmt.name}: {n} samples{_no_predictions_hint(self.store, stmt.query, n)}")

    def _sql_with_calls(self, stmt: ast.SQLWithCalls, params, plans=None) -> Result:
        """Runs each table-function call, gives DuckDB its result as a relation, and lets DuckDB
        run the statement around the calls (the SQL guard judges that final statement)."""
        _check_forgotten_topk(stmt)
        with self._call_relations(stmt, params, plans) as text:
            result = self._plain_sql(*bound_parameters(text, params))
        return _with_approximations(result, self._approximations)

    def _call_plans(self, stmt: ast.SQLWithCalls, params) -> list:
        """Every call bound and planned before any runs: a wrong name in the second call fails
        before the first call's work."""
        from metaql.engine.optimizer import optimize
        ctx = self._context()
        return [optimize(plan_call(bind_call(call, self.registry, params, ctx.catalog), ctx), ctx.catalog,
                         self.config) for _, call in stmt.calls]

    @contextmanager
    def _call_relations(self, stmt: ast.SQLWithCalls, params, plans=None):
        """Yields the statement's SQL with each call replaced by a registered private relation
        holding its result; errors name the user's call, never the private name."""
        _check_sql_around_calls(stmt)
        plans = plans if plans is not None else self._call_plans(stmt, params)
        private = [f"_metaql_call_{next(_CALL_IDS)}" for _ in stmt.calls]
        shown = {name: _clipped(stmt.text[span.start:span.end]) for name, (span, _) in zip(private, stmt.calls)}
        registered = []
        self._approximations = []      # what approximate calls (error=) guarantee, for the result
        try:
            for name, plan, (_, call) in zip(private, plans, stmt.calls):
                table = executor.execute(plan, self._context())
                if table.schema.metadata and APPROX_KEY in table.schema.metadata:
                    self._approximations.append(table.schema.metadata[APPROX_KEY])
                register(self.store.db, name, _conformed(self.registry.get(call.name), table))
                registered.append(name)
            yield rewritten(stmt.text, stmt.lo, stmt.hi, [span for span, _ in stmt.calls], private)
        except BaseException as e:
            raise _renamed(as_metaql_error(e), shown) from _cause(e)
        finally:
            for name in registered:
                try:
                    unregister(self.store.db, name)
                except duckdb.Error:    # the statement's own error is the one to report
                    pass

    def _plain_sql(self, text: str, params) -> Result:
        statements = _refuse_internal_writes(text, self.store.root)
        if any(s.labels_insert for s in statements):
            return self._insert_labels(statements, params)
        from metaql.pyobjects import with_python_objects
        try:
            table = with_python_objects(self, lambda: query_arrow(self.store.db, text, params))
        except duckdb.CatalogException as e:
            missing = re.search(r"Table Function with name (\w+) does not exist", str(e))
            if missing:
                self.registry.get(missing.group(1))  # raises with MetaQL's functions and a hint
            table = re.search(r"Table with name (\w+) does not exist", str(e))
            if table and table.group(1) in self.registry:     # DuckDB's hint would be a system table
                name = table.group(1).upper()
                raise CatalogException(f"{name} is a table function: call it with its arguments in parentheses, "
                                       f"e.g. SELECT * FROM {name}(...) (DESCRIBE {name} lists them)") from None
            if table and _DESCRIBE_ANY.match(text):
                raise self._unknown_described(table.group(1)) from None
            raise
        return Result.message("ok") if table is None else Result(table)

    def _unknown_described(self, name: str) -> CatalogException:
        """DESCRIBE of a name that is neither a table function nor a table: DuckDB's message has no
        hint, so the nearest of MetaQL's table functions and the catalog's tables is named."""
        tables = [r[0] for r in self.store.db.execute("SELECT DISTINCT table_name FROM information_schema.tables "
                                                      "ORDER BY 1").fetchall()]
        hint = nearest_name(name, self.registry.names() + tables)
        extra = f" Did you mean {hint}?" if hint else ""
        # DuckDB's opening kept: the shell prints errors its way (tests/test_shell.py)
        return CatalogException(f"Table with name {name} does not exist!{extra} DESCRIBE takes a table function "
                                f"({', '.join(self.registry.names())}) or a table (SHOW TABLES lists them)")

    def _insert_labels(self, statements, params) -> Result:
        """INSERT INTO labels runs into a scratch table; its rows then go through the labels API,
        which refuses a label that contradicts an earlier one."""
        from metaql.storage.labels import SCRATCH_TABLE, add_labels_from_sql
        if len(statements) != 1:
            raise ProgrammingError("run INSERT INTO labels as a statement of its own")
        n = add_labels_from_sql(self.store, retarget_insert(statements[0].text, SCRATCH_TABLE), params)
        return Result.message(f"labels: {n} newly labeled")

    def _drop_checkpoint(self, name: str, if_exists: bool) -> Result:
        known = name in {c["name"] for c in self.store.checkpoints()}
        self.store.drop_checkpoint(name, if_exists)
        return Result.message(f"dropped checkpoint {name}" if known else f"no checkpoint {name}: nothing dropped")

    def _show(self, what: str) -> Result:
        if what == "functions":
            rows = [(f.name, ", ".join(f"{p.name}: {p.describe()}" for p in f.params.values()),
                     _first_sentence(f.doc)) for f in (self.registry.get(n) for n in self.registry.names())]
            return Result(pa.table({"name": [r[0] for r in rows], "arguments": [r[1] for r in rows],
                                    "description": [r[2] for r in rows]}))
        if what not in SHOWN:
            raise BinderException(f"SHOW {what.upper()}: use SHOW LAYERS, CHECKPOINTS, SETS, FUNCTIONS or TABLES")
        return Result(self.store.listing(what))

    def _describe(self, name: str) -> Result:
        """A table function's arguments (name, type, default), then the columns it declares it
        returns, each as `-> column` with its SQL type (an alternative result, such as INFLUENCE's
        total=true, marked as such)."""
        fn = self.registry.get(name)
        rows = [(p.name, p.type_name, "(required)" if p.required else p.default_text) for p in fn.params.values()]
        for i, columns in enumerate([fn.columns] + list(fn.alternatives)):
            rows += [(f"-> {c}", t, "(output column)" if i == 0 else f"(output column, alternative {i})")
                     for c, t in columns]
        return Result(pa.table({"argument": [r[0] for r in rows], "type": [r[1] for r in rows],
                                "default": [r[2] for r in rows]}, schema=pa.schema([
                                    ("argument", pa.string()), ("type", pa.string()), ("default", pa.string())])))

    def _explain(self, stmt: ast.Explain, params) -> Result:
        from metaql.engine.explain import explain_lines
        from metaql.engine.optimizer import optimize
        if isinstance(stmt.statement, ast.SQLWithCalls):
            return self._explain_calls(stmt.statement, stmt.analyze, params)
        trips = self.store.round_trips.count
        plan = optimize(self._plan(stmt.statement, params), self._statement_catalog(), self.config)
        if stmt.analyze:
            t0 = time.perf_counter()
            with replay_tally() as replays:
                self._run_plan(stmt.statement, plan)
            total = time.perf_counter() - t0
        lines = explain_lines(plan, analyze=stmt.analyze, ctx=self._context())
        if stmt.analyze:
            lines += _analyze_footer(self.store.round_trips.count - trips, replays, total)
        return Result(pa.table({"plan": lines}))

    def _explain_calls(self, stmt: ast.SQLWithCalls, analyze: bool, params) -> Result:
        """The plan of each table-function call in the statement (one after the other, each
        headed by the call when there are several); ANALYZE runs the whole statement."""
        from metaql.engine.explain import explain_lines
        trips = self.store.round_trips.count
        _check_sql_around_calls(stmt)       # no plan for a statement that cannot run
        plans = self._call_plans(stmt, params)
        if analyze:
            t0 = time.perf_counter()
            with replay_tally() as replays:
                self._sql_with_calls(stmt, params, plans)
            total = time.perf_counter() - t0
        lines = []
        for (span, _), plan in zip(stmt.calls, plans):
            if len(plans) > 1:
                lines.append(_clipped(stmt.text[span.start:span.end]))
            lines += explain_lines(plan, analyze=analyze, indent="  " if len(plans) > 1 else "", ctx=self._context())
        if analyze:
            # every statement the whole EXPLAIN ANALYZE sent to the catalog: binding, planning, the
            # calls' scans and DuckDB's run of the statement around them
            lines += _analyze_footer(self.store.round_trips.count - trips, replays, total)
        return Result(pa.table({"plan": lines}))

    def _context(self) -> executor.Context:
        return executor.Context(self.store, self.registry, self.config,
                                _interruptible(self.progress, self._interrupt.is_set), self._interrupt.is_set,
                                self._statement_catalog())

    def _statement_catalog(self) -> CatalogSnapshot:
        """The running statement's catalog snapshot: the binder, the optimizer and every call of the
        statement read the catalog through it, each part once."""
        if getattr(self, "_catalog", None) is None or self._catalog.store is not self.store:
            self._catalog = CatalogSnapshot(self.store)
        return self._catalog

    # ---- results (DuckDB's cursor-style fetch on the connection) --------------------------------
    def _last(self) -> Result:
        if self._result is None:
            raise ProgrammingError("no result: execute a statement first")
        return self._result

    def fetchone(self):
        return self._last().fetchone()

    def fetchmany(self, size: int = 1):
        return self._last().fetchmany(size)

    def fetchall(self):
        return self._last().fetchall()

    def df(self):
        return self._last().df()

    fetchdf = df

    def arrow(self) -> pa.Table:
        return self._last().arrow()

    fetch_arrow_table = arrow

    def fetchnumpy(self) -> dict[str, np.ndarray]:
        return self._last().fetchnumpy()

    def pl(self):
        return self._last().pl()

    def torch(self):
        return self._last().torch()

    @property
    def description(self):
        return None if self._result is None else self._result.description

    @property
    def approximation(self) -> dict | None:
        """The last result's bound and certificate when it was approximate (error=), else None."""
        return self._last().approximation

    # ---- data in ----------------------------------------------------------------------------------
    @_catalog_errors
    def add_samples(self, ids, split: str, labels=None, inputs=None, columns=None) -> int:
        """Registers samples (ids, split, labels; inputs for replay; extra catalog columns). Inputs:
        a tensor, a tuple or dict of them (a tokenizer's output), or lists of per-sample
        variable-length tensors; replay calls model(x), model(*xs), model(**d) (storage/inputs.py)."""
        self._check_open()
        return self.store.add_samples(ids, split, labels, inputs, columns)

    @_catalog_errors
    def capture(self, model, layers=None, checkpoint: str = "ckpt0", lr: float = 1.0, **kwargs):
        """A context manager that captures per-sample factors in the training loop
        (see metaql.storage.capture.Capture)."""
        from torch import nn

        from metaql.storage.capture import Capture
        self._check_open()
        if not isinstance(model, nn.Module):
            raise InvalidInputException(f"con.capture takes a torch.nn.Module, got {type(model).__name__}")
        if layers is not None and not isinstance(layers, str) and not (
                isinstance(layers, (list, tuple)) and all(isinstance(n, str) for n in layers)):
            raise InvalidInputException(f"layers= takes a module name, a glob pattern ('*', 'encoder.*') or a list of "
                                        f"them, got {layers!r:.60}")
        _known_keywords("con.capture", kwargs, Capture.__init__)
        if "shard_size" in kwargs:
            _positive("shard_size", kwargs["shard_size"])
        return Capture(self.store, model, layers, checkpoint, lr, **kwargs)

    @_catalog_errors
    def checkpoint(self, model, name: str, lr: float, epoch: int | None = None, step: int | None = None,
                   factory: str | None = None, kwargs: dict | None = None, task=None) -> dict:
        """Registers the model's current weights as checkpoint `name` for replay, capturing
        nothing (see metaql.storage.checkpoints); `lr` is the learning rate TracIn weighs it by;
        `task` the loss replay uses (metaql.storage.tasks; default classification)."""
        from metaql.storage.checkpoints import register_checkpoint
        self._check_open()
        return register_checkpoint(self.store, model, name, lr, epoch, step, factory, kwargs, task)

    @_catalog_errors
    def drop_checkpoint(self, name: str, if_exists: bool = False) -> None:
        """Removes checkpoint `name`: its catalog rows (the checkpoint, its shards, their per-sample
        norms, REWEIGHT's sample weights) in one transaction, then its weights and shard files, as
        DROP CHECKPOINT [IF EXISTS] name does. Then a capture of that name starts afresh."""
        self._check_open()
        self.store.refresh()
        self.store.drop_checkpoint(name, if_exists)

    @_catalog_errors
    def replay(self, checkpoint: str, samples: str = "train", layers=None, **kwargs) -> int:
        """Stores exact factors of a set's samples at a saved checkpoint (eval mode). Keyword
        arguments go to metaql.storage.capture.replay_into_store: target, batch_size, shard_size,
        dtype ('float32' | 'float16' | 'bfloat16') and storage ({layer: 'factored' | 'full'}). `layers`
        defaults to the layers the store holds (every layer, '*', when it holds none)."""
        from metaql.storage.capture import replay_into_store
        self._check_open()
        _known_keywords("con.replay", kwargs, replay_into_store, skip=("store", "checkpoint", "ids", "layers", "progress"))
        for size in ("batch_size", "shard_size"):
            if size in kwargs:
                _positive(size, kwargs[size])
        from metaql.engine.plan import user_work
        try:
            with user_work():     # a background calibration waits (engine/autocalibrate.py)
                return replay_into_store(self.store, checkpoint, self.store.set_ids(samples), layers,
                                         progress=self.progress, **kwargs)
        finally:
            self.store.committed()

    @_catalog_errors
    def influence(self, query, layers="*", train: str = "train", checkpoints="all", similarity: str = "dot",
                  loss: str = "label", reduce: str = "mean", total: bool = False, each: bool = False,
                  topk: int | None = None, direction: str = "proponents", error: float | None = None) -> Result:
        """INFLUENCE against query samples passed as tensors, not registered in the store:
        `query=(inputs, labels)` (labels for loss='label'), or `inputs` alone with loss='pred' or
        'expected'. The other arguments are INFLUENCE's; the result has its columns. each=True:
        the train x query matrix (query_id is the row of the query tensors), as query=each(set);
        topk and direction as INFLUENCE's; error= as INFLUENCE's (README "Approximation")."""
        from metaql.engine.functions import SampleRef
        from metaql.engine.influence import COLUMNS, ERROR_RANGE, TOTAL_COLUMNS, influence_plan
        from metaql.engine.optimizer import optimize
        self._check_open()
        self.store.refresh()
        side = _tensor_side(query, loss)
        if each:
            side.mode, side.label = "each", f"each(tensors({len(side.ids)} samples))"
        layers = ("*",) if layers == "*" else ([layers] if isinstance(layers, str) else list(layers))
        self._catalog = None
        ctx = self._context()
        if error is not None and (isinstance(error, bool) or not isinstance(error, (int, float))
                                  or error not in ERROR_RANGE):
            raise InvalidInputException(f"error= should be a number in {ERROR_RANGE}, not {error!r:.40}")
        plan = influence_plan(ctx, layers, side, SampleRef("batch", train), checkpoints, similarity, loss,
                              total, reduce, topk, direction, error)
        table = executor.execute(optimize(plan, ctx.catalog, self.config), ctx)
        names = [c for c, _ in (plan.columns if each else TOTAL_COLUMNS if total else COLUMNS)]
        return Result(table.select(names))

    @_catalog_errors
    def update_predictions(self, checkpoint: str | None = None, batch_size: int = 1024) -> int:
        """Fills samples.pred and samples.loss from the model at a checkpoint (default: the last)."""
        from metaql.storage.predictions import update_predictions
        self._check_open()
        _positive("batch_size", batch_size)
        try:
            return update_predictions(self.store, checkpoint, batch_size)
        finally:
            self.store.committed()

    @_catalog_errors
    def capture_activations(self, layers, samples: str = "test", checkpoint: str | None = None,
                            reduce: str = "max", batch_size: int = 256, reuse: bool = True) -> Result:
        """Stores the activations of `layers` (module names) for a set's samples at a checkpoint
        (default the last), by replay in eval mode with forward hooks; a convolution's channel is
        reduced over space by `reduce` ('max' or 'mean'). Returns per layer the rows written and
        held (metaql.diagnosis.activations; the same as CAPTURE_ACTIVATIONS(...))."""
        from metaql.diagnosis.functions import capture_table
        self._check_open()
        _positive("batch_size", batch_size)
        names = [layers] if isinstance(layers, str) else list(layers)
        return Result(capture_table(self.store, names, self.store.set_ids(samples), checkpoint, reduce,
                                    batch_size, reuse, self.progress))

    @_catalog_errors
    def label(self, ids, labels, by: str = "human", overwrite: bool = False) -> int:
        """Records human labels (with who and when) in the catalog's `labels` table; returns how
        many samples were newly labeled. A label that contradicts an earlier one raises, unless
        overwrite=True (which warns). `INSERT INTO labels ...` works too."""
        from metaql.storage.labels import add_labels
        self._check_open()
        if not isinstance(by, str):
            raise InvalidInputException(f"by= names who labeled, as a string; got {type(by).__name__}")
        try:
            return add_labels(self.store, ids, labels, by=by, overwrite=overwrite)
        finally:
            self.store.committed()

    @_catalog_errors
    def annotate(self, ids, labels, by: str = "human") -> int:
        """Appends annotations (with who and when) to the catalog's `annotations` table: a sample
        may get any number, none is replaced (active label cleaning's label distribution). Returns
        how many were added. `INSERT INTO annotations VALUES (id, label, 'who', now())` works too."""
        from metaql.storage.labels import add_annotations
        self._check_open()
        if not isinstance(by, str):
            raise InvalidInputException(f"by= names who annotated, as a string; got {type(by).__name__}")
        try:
            return add_annotations(self.store, ids, labels, by=by)
        finally:
            self.store.committed()

    def attach_model(self, model) -> None:
        """Uses this in-process model's architecture (a deep copy; the weights always come from the
        checkpoint's file) when the store's recorded factory is not trusted or not importable."""
        from torch import nn

        from metaql.errors import InvalidInputException
        self._check_open()
        if not isinstance(model, nn.Module):
            raise InvalidInputException(f"attach_model takes a torch.nn.Module, got {type(model).__name__}")
        from metaql.storage.capture import unwrapped
        self.store.live_model = unwrapped(model)

    def register_function(self, fn: Callable, name: str | None = None, replace: bool = False,
                          columns: list[tuple[str, str]] | None = None) -> None:
        """Adds a table function to this connection: a plain function `fn(ctx, **typed_args)` that
        returns a pyarrow.Table (or a dict of columns). `columns`, e.g. [("sample_id", "BIGINT"),
        ("score", "DOUBLE")], declares what it returns; a call whose result differs fails."""
        self.registry.register(fn, name=name, replace=replace, columns=columns)

    @_catalog_errors
    def verify(self, repair: bool = False) -> list[str]:
        """Every problem of the store, one line each ([] when all is well). repair=True also drops
        the catalog rows of shards whose file is missing or corrupt: their checkpoints turn partial
        until con.replay(checkpoint, ...) or the same capture run again stores those samples again."""
        self._check_open()
        self.store.refresh()
        return self.store.verify(repair)

    def interrupt(self) -> None:
        """Asks the running statement to stop (from another thread): MetaQL's operators at the
        next shard, DuckDB's SQL at once."""
        self._interrupt.set()
        self.store.db.interrupt()

    # ---- DuckDB's relational API (metaql/relation.py, metaql/pyobjects.py) ----------------------------
    def register(self, view_name: str, python_object) -> "Connection":
        """Makes a pandas/polars DataFrame, a pyarrow Table/RecordBatchReader/Dataset or a dict of
        columns queryable as `view_name` on this connection (a temporary view: nothing is stored).
        Names of the store's tables and views, and MetaQL's own, are refused."""
        from metaql.pyobjects import check_name, ensure_registered, registrable
        self._check_open()
        obj = registrable(python_object)
        name = check_name(self, view_name)
        db = ensure_registered(self)
        try:
            register(db, name, obj)
        except duckdb.Error as e:
            raise _duck_error(e) from None
        self._registered[name.lower()] = (name, obj)
        return self

    def unregister(self, view_name: str) -> "Connection":
        """Forgets a name con.register() gave (a name it did not give is left alone)."""
        from metaql.pyobjects import ensure_registered
        self._check_open()
        entry = self.__dict__.get("_registered", {}).pop(str(view_name).lower(), None)
        if entry is not None:
            try:
                unregister(ensure_registered(self), entry[0])
            except duckdb.Error:    # already gone with a reader's reopened catalog
                pass
        return self

    def table(self, table_name: str) -> "Relation":
        """A relation over a table or view of the store, or a registered object; the name of a
        MetaQL set or of a split (not shadowed by a table; a set wins over a split, as in queries)
        gives its members' sample_id."""
        from metaql.relation import _literal, _name
        self._check_open()
        self.store.refresh()
        text = f"SELECT * FROM {_name(table_name)}"
        try:
            self._plain_sql(f"{text} LIMIT 0", None)
        except (duckdb.CatalogException, CatalogException):
            if table_name in self.store.set_names():
                text = f"SELECT sample_id FROM set_members WHERE set_name = {_literal(table_name)} ORDER BY sample_id"
            elif table_name in self.store.splits():
                text = f"SELECT sample_id FROM samples WHERE split = {_literal(table_name)} ORDER BY sample_id"
            else:
                raise CatalogException(f"Table with name {table_name} does not exist: it is no table, view, "
                                       "registered object, set or split of this store (SHOW TABLES, SHOW SETS, "
                                       "SELECT DISTINCT split FROM samples)") from None
        except duckdb.Error as e:
            raise _duck_error(e) from None
        return Relation.of_statement(self, ast.PlainSQL(text), text, None).set_alias(table_name.split(".")[-1])

    def view(self, view_name: str) -> "Relation":
        return self.table(view_name)

    def executemany(self, query: str, parameters=None) -> "Connection":
        """Runs one statement once per parameter set, like DuckDB's executemany; the last run's
        result is fetched from the connection."""
        self._check_open()
        statements = _parsed(query, self.registry.names())
        if len(statements) != 1:
            raise ProgrammingError(f"executemany() takes one statement, got {len(statements)}")
        if parameters is None or isinstance(parameters, (str, bytes, dict)):
            raise InvalidInputException("executemany() takes a sequence of parameter sets, e.g. [[1], [2]]")
        for params in parameters:
            self._result = self._run(statements[0], params)
        return self

    # ---- lifecycle ----------------------------------------------------------------------------------
    def close(self) -> None:
        if self.store is not None and self._owns_store:
            self.store.close()
        self.store = None

    def _check_open(self) -> None:
        if self.store is None or self.store.closed:
            raise ProgrammingError("the connection is closed")

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        database = self.database
        if isinstance(database, str) and "://" in database:   # an object-storage URI: no credentials shown
            from metaql.distributed.objectstore import public_uri
            database = public_uri(database)
        return f"<metaql.Connection {database!r}{' read-only' if self.store and self.store.read_only else ''}>"


def _quiet_progress(it, total=None, desc=""):
    return it


def _bar_progress(it, total=None, desc=""):
    from tqdm import tqdm
    return tqdm(it, total=total, desc=desc, file=sys.stderr, leave=False, mininterval=0.5)


def _whole_number(value) -> int:
    """TOPK(?)'s count: a whole number, not a bool or a float."""
    import numbers
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise BinderException(f"TOPK(n) needs a whole number, not {value!r:.60}")


def _check_ranks_by_score(fn) -> None:
    """TOPK(n) ranks by a `score` column; a function that declares none is refused before it runs."""
    names = [n for n, _ in fn.columns]
    if names and "score" not in names:
        raise BinderException(f"TOPK(n) ranks by a score column, and {fn.name} returns ({', '.join(names)}); "
                              f"write SELECT * FROM {fn.name}(...) ORDER BY <column> DESC LIMIT n")


def _check_forgotten_topk(stmt: ast.SQLWithCalls) -> None:
    """`SELECT train FROM INFLUENCE(...) ORDER BY ASC`: a TOPK(n) forgotten, said so."""
    if len(stmt.calls) != 1:
        return
    span, call = stmt.calls[0]
    head = re.match(r"^\s*select\s+(.*?)\s+from\s*$", stmt.text[stmt.lo:span.start], re.I | re.S)
    if head:
        check_func_select(ast.FuncSelect(head.group(1), call, None, stmt.text[span.end:stmt.hi].strip().rstrip(";")))


def _analyze_footer(trips: int, replays, total: float) -> list[str]:
    """EXPLAIN ANALYZE's last lines: catalog round trips, the model replays the statement ran
    (query sides, rescored candidates; in the cost model's clock, reading inputs included, left
    out of the layers' estimates), the wall time."""
    replayed = [f"replays: {replays.text()}"] if replays.batches else []
    return [f"catalog round trips: {trips}", *replayed, f"total: {total:.4f} s"]


def _clipped(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3] + "..."


def _renamed(e: BaseException, shown: dict[str, str]) -> BaseException:
    """`e` with every private relation name replaced by the user's call."""
    return renamed(e, shown, _PRIVATE, "a table function's result")


APPROX_KEY = b"metaql.approx"       # metaql.approx.execute.METADATA_KEY


def _with_approximations(result: Result, found: list[bytes]) -> Result:
    """The result of SQL around approximate calls, carrying their bounds and certificates (one
    call's as is; several as {"calls": [...]}) where it has a table."""
    if not found or result.arrow() is None:
        return result
    import json
    value = found[0] if len(found) == 1 else json.dumps({"calls": [json.loads(f) for f in found]}).encode()
    table = result.arrow()
    return Result(table.replace_schema_metadata({**(table.schema.metadata or {}), APPROX_KEY: value}))


def _conformed(fn, table) -> pa.Table:
    """The function's result with exactly its declared columns and types (a safe cast, e.g.
    float32 to DOUBLE, is made); anything else is refused, so that SQL over a function can rely
    on what DESCRIBE and the docs say it returns."""
    if not isinstance(table, pa.Table):
        raise InternalException(f"table function {fn.name} returned {type(table).__name__}, not a pyarrow.Table")
    if not fn.columns:
        return table
    shapes = [fn.columns] + list(fn.alternatives)
    declared = " or ".join("(" + ", ".join(f"{n} {t}" for n, t in cols) + ")" for cols in shapes)
    got = ", ".join(f"{f.name} {f.type}" for f in table.schema)
    wrong = InvalidInputException(f"table function {fn.name} returned the columns ({got}) but declares "
                                  f"{declared}; it must return the declared columns, in that order")
    columns = next((cols for cols in shapes if table.column_names == [n for n, _ in cols]), None)
    if columns is None:
        raise wrong
    if any(t.upper() not in ARROW_TYPES for _, t in columns):
        return table     # a type this check does not know: the names are checked, the type is the function's
    schema = pa.schema([(n, ARROW_TYPES[t.upper()]) for n, t in columns])
    if table.schema.equals(schema):
        return table
    try:
        return table.select(schema.names).cast(schema, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        raise wrong from None


def _refuse_internal_writes(text: str, store_root=None) -> list:
    """Plain SQL may read the catalog's bookkeeping tables but not write them (files would dangle),
    nor COPY into the store's folder: decided on each parsed statement (storage/sqlguard.py), never
    on its first word."""
    return checked_statements(text, store_root=store_root)


_CANCELLED = "query cancelled; nothing was changed"


def as_metaql_error(e: BaseException) -> BaseException:
    """The exception a statement raises for `e`: metaql.Error as it is; a cancel as
    InterruptException; DuckDB's errors as the matching metaql class; anything else (a bug, in
    MetaQL or in a user's table function) as InternalException naming the original type.
    SystemExit and the like pass through."""
    if isinstance(e, Error):
        return e
    if isinstance(e, (KeyboardInterrupt, duckdb.InterruptException)):
        return InterruptException(_CANCELLED)
    if isinstance(e, duckdb.Error):
        return _duck_error(e)
    if isinstance(e, RecursionError):
        return ProgrammingError("the statement is nested too deeply to run; flatten it")
    if isinstance(e, Exception):
        text = str(e)
        text = text if len(text) <= 500 else text[:500] + "..."
        return InternalException(f"{type(e).__module__}.{type(e).__qualname__}: {text} "
                                 "(please report this with the statement that caused it)")
    return e


def _cause(e: BaseException) -> BaseException | None:
    """What a translated error chains to: the original traceback for a bug, nothing for errors
    whose message already says it all (but the cause it names: a user's table function's exception)."""
    if isinstance(e, Error):
        return e.__cause__
    return e if isinstance(e, Exception) and not isinstance(e, duckdb.Error) else None


def _parsed(query: str, function_names) -> list:
    if not isinstance(query, str):
        raise ProgrammingError(f"a statement is a string, not {type(query).__name__}")
    try:
        return parse(query, function_names)
    except BaseException as e:
        translated = as_metaql_error(e)
        if translated is e:
            raise
        raise translated from _cause(e)


def _first_sentence(doc: str) -> str:
    """A docstring's first sentence, however its lines wrap (its first line ends mid-sentence)."""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    return re.split(r"(?<=[.:;])\s+(?=[A-Z(])", paragraph)[0]


def _check_sql_around_calls(stmt: ast.SQLWithCalls) -> None:
    """The SQL around a statement's calls parses before any call runs (a typo after the WHERE would
    otherwise be reported after a whole INFLUENCE scan), its errors placed in the user's text."""
    check_syntax(blanked(stmt.text, stmt.lo, stmt.hi, [span for span, _ in stmt.calls]), stmt.text)


def _drop_pending(db) -> None:
    abort = getattr(db, "abort", None)
    if abort is None:
        return
    try:
        abort()
    except Exception:  # a closed connection has nothing pending; the statement's error matters
        pass


def _interruptible(progress: Callable, interrupted: Callable[[], bool]) -> Callable:
    """The context's progress wrapper, checking for a cancel at every item: every loop a table
    function reports progress on (LANCET's training steps, ELITE's epochs) stops at once."""
    def wrap(it, total=None, desc=""):
        for item in progress(it, total=total, desc=desc):
            if interrupted():
                raise InterruptException(_CANCELLED)
            yield item
    return wrap


# DuckDB's exception classes and MetaQL's of the same name, most specific first (metaql/errors.py).
_DUCK_CLASSES = DUCKDB_NAMES


def _duck_error(e: Exception) -> Error:
    msg = str(e)
    for name, cls in _DUCK_CLASSES:
        duck = getattr(duckdb, name, None)
        if duck is not None and isinstance(e, duck):
            return cls(msg)
    return ProgrammingError(msg)


FORCE_CANCEL_AFTER_S = 1.0    # a statement that has not seen a Ctrl-C by then is stopped where it is


@contextmanager
def _sigint_to(event: threading.Event, interrupt_duckdb: Callable[[], None]):
    """While a statement runs in the main thread, Ctrl-C sets `event` (the executor checks it
    between shards) and interrupts DuckDB's running SQL. A statement that has not stopped
    FORCE_CANCEL_AFTER_S later (a table function that never checks, a sleep, a long loop) gets a
    KeyboardInterrupt where it is, so one Ctrl-C stops any statement; a second one stops it at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    main, lock, running, timers = threading.get_ident(), threading.Lock(), [True], []

    def force() -> None:
        with lock:      # never after the statement ended: the signal would hit the caller's code
            if running[0]:
                signal.pthread_kill(main, signal.SIGINT)    # a real signal also ends a sleep

    def handler(signum, frame):
        if event.is_set():
            if running[0]:
                raise KeyboardInterrupt
            return
        event.set()
        interrupt_duckdb()
        timers.append(threading.Timer(FORCE_CANCEL_AFTER_S, force))
        timers[-1].daemon = True
        timers[-1].start()
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        try:
            with lock:
                running[0] = False
            for timer in timers:
                timer.cancel()
        finally:
            signal.signal(signal.SIGINT, previous)
        if event.is_set():
            event.clear()
            raise InterruptException("query cancelled; nothing was changed")


def _known_keywords(call: str, kwargs: dict, target, skip=("self", "store", "model", "layers", "checkpoint", "lr")) -> None:
    """Refuses a keyword `target` does not take, with the nearest one: Python's own TypeError
    ('unexpected keyword argument max_eror') names no alternative and comes from deep inside."""
    import inspect

    from metaql.storage.catalog import nearest_name
    taken = [n for n in inspect.signature(target).parameters if n not in skip]
    for name in kwargs:
        if name not in taken:
            hint = nearest_name(name, taken)
            raise InvalidInputException(f"{call} takes no argument {name}=" + (f"; did you mean {hint}=?" if hint else "")
                                        + f" (it takes {', '.join(taken)})")


def _no_predictions_hint(store, query: str, n: int) -> str:
    """Why a set over samples.pred or samples.loss came out empty, when no prediction was made yet
    (a query `pred <> label` is then false for every sample, silently)."""
    if n or not re.search(r"\b(pred|loss)\b", query, re.I) or store.has_predictions():
        return ""
    return " (samples.pred and samples.loss are NULL everywhere: run con.update_predictions() first)"


def _tensor_side(query, loss: str):
    """The query side of con.influence: (inputs, labels) or inputs, checked like add_samples."""
    from metaql.engine.plan import Side
    import torch

    from metaql.storage.inputs import first_tensor
    inputs, labels = (query if isinstance(query, tuple) and len(query) == 2 else (query, None))
    if isinstance(inputs, np.ndarray):      # DuckDB users hand numpy arrays as often as tensors
        inputs = torch.from_numpy(inputs) if inputs.dtype != object else inputs
    first = first_tensor(inputs)
    if first is None or first.dim() == 0 or first.shape[0] == 0:
        raise InvalidInputException("query= takes (inputs, labels) or inputs: tensors with one row per query sample")
    n = first.shape[0]
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point() and not torch.isfinite(inputs).all():
        raise InvalidInputException("the query inputs contain NaN or infinite values")
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels))
        if labels.shape[:1] != (n,):
            one = (f" (the inputs' first axis is the samples': for one sample of shape {tuple(first.shape)}, pass "
                   "x.unsqueeze(0))" if first.dim() == 1 and labels.numel() == 1 else "")
            raise InvalidInputException(f"{n} query inputs but {labels.shape[0] if labels.dim() else 1} labels{one}")
    elif loss == "label":
        raise InvalidInputException("loss='label' needs the query's labels: pass query=(inputs, labels), or use "
                                    "loss='pred' or 'expected'")
    return Side("batch", np.arange(n), f"tensors({n} samples)", inputs=inputs, targets=labels)
