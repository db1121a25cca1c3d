"""A statement fuzzer for MetaQL, shared by tests/test_fuzz.py (hypothesis) and
benchmarks/fuzz_statements.py (100,000 statements).

Statements are built from the language's pieces (keywords, the registry's table functions and
their argument names, the store's layers, sets and checkpoints) with hostile values (huge and
negative integers, NaN, infinities, quotes, deep lists, parameters), plus the README's examples
mutated: truncated, spliced with noise, pieces repeated. Everything draws from one `random.Random`,
so hypothesis drives it through `st.randoms()` and the benchmark through a seeded generator.

Each statement runs under a watchdog that cancels it (`con.interrupt()`) after `cancel_after`
seconds: a statement the user asked to be long (ELITE for 10,000 epochs) is cut short that way,
and one that does not stop soon after the cancel is a bug the outcome table shows.
"""
from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import metaql
from tests.models import MLP

README = Path(__file__).resolve().parents[1] / "README.md"
_STATEMENT_START = re.compile(r"^(SELECT|CREATE|EXPLAIN|SHOW|DESCRIBE|DROP|INSERT)\b")

LAYERS = ["fc1", "fc2"]
SETS = ["train", "test", "val", "odd", "nosuch"]
CHECKPOINTS = ["c0", "c1", "all", "last", "c9"]
NUMBERS = ["0", "1", "2", "3", "-1", "7", "0.9", "1.0", "1e308", "-1e308", "1e999", "1e-320", ".5",
           str(2 ** 31), str(2 ** 31 + 1), str(2 ** 63 - 1), str(2 ** 63), str(2 ** 64), "1" + "0" * 30,
           "9" * 400, "9" * 401, "9" * 5000, "+4", "-0"]
WORDS = ["nan", "inf", "true", "false", "all", "last", "dot", "cosine", "label", "pred", "expected",
         "svdd", "hinge", "linear", "factored", "none", "cold", "shift", "auto", "dmn", "confidence",
         "null", "NULL", "sample_id", "score"]
STRINGS = ["'a'", "'it''s'", "''", "'x'' ; DROP TABLE samples; --'", "'label'", "'w'", "'%s'", "'\\'",
           "'" + "z" * 300 + "'", "'label\" FROM samples; --'"]
NOISE = list("()[],'=*;?$-.\"\n\t ") + ["--", "/*", "*/", "SELECT", "FROM", "(", "[", "''", "$1", "$x",
                                        "point(", "batch(", "TOPK(", "ORDER BY", "ASC", "\x00", "é"]
KEYWORDS = ["SELECT", "TOPK", "FROM", "ORDER", "BY", "ASC", "DESC", "EXPLAIN", "ANALYZE", "SHOW",
            "DESCRIBE", "CREATE", "OR", "REPLACE", "SET", "DROP", "IF", "EXISTS", "AS", "WHERE", "LIMIT",
            "JOIN", "USING", "train", "*"]
# Values a caller can pass as parameters: also what the grammar cannot write.
PARAMS = [None, 0, 1, -1, 2 ** 63, 10 ** 30, 0.9, float("nan"), float("inf"), -float("inf"), "train",
          "test", "fc1", "it's", "", [], ["fc1"], [["fc1"]], {"a": 1}, b"\xff", True, np.int64(3),
          np.float32(0.5), object()]
# Keep valid long-running calls rare: small step counts unless a huge (refused) one is drawn.
SMALL_WORK = {"epochs": ["1", "2"], "steps": ["1", "2", "3"], "batch_size": ["4", "16"],
              "budget": ["1", "2", "3"]}

# Calls valid on small_store, with small work: about 0.5 s each.
VALID_CALLS = {"INFLUENCE": "query=batch(test)", "SELF_INFLUENCE": "checkpoints=[c1]",
               "ELITE": "data=train, labeled=val, epochs=2, batch_size=16",
               "LANCET": "pool=train, steps=3", "LANCET_STATUS": "pool=train, steps=3",
               "LANCET_CANDIDATES": "pool=train, budget=2, steps=3"}


def readme_examples() -> list[str]:
    """The SQL statements of the README (one per statement, continuation lines joined)."""
    out, buf = [], []
    for line in README.read_text().splitlines():
        s = line.strip()
        if buf or _STATEMENT_START.match(s):
            buf.append(s)
            if s.endswith(";"):
                out.append(" ".join(buf))
                buf = []
    return out


class Generator:
    """Statements for the registry of a connection (its functions and their arguments)."""

    def __init__(self, con: metaql.Connection):
        self.functions = {name: list(con.registry.get(name).params) for name in con.registry.names()}
        self.examples = readme_examples()

    # ---- values ------------------------------------------------------------------------------
    def value(self, r: random.Random, depth: int = 0, arg: str = "") -> str:
        if arg in SMALL_WORK and r.random() < 0.7:
            return r.choice(SMALL_WORK[arg])
        k = r.random()
        if k < 0.25:
            return r.choice(NUMBERS)
        if k < 0.40:
            return r.choice(LAYERS + SETS + CHECKPOINTS + WORDS)
        if k < 0.50:
            return r.choice(STRINGS)
        if k < 0.58:
            return r.choice(["?", "$1", "$2", "$name", "$x"])
        if k < 0.63:
            return "*"
        if k < 0.80:
            return f"{r.choice(['point', 'batch', 'Point', 'sum'])}({self.value(r, depth + 1)})"
        if k < 0.93 and depth < 3:
            return "[" + ", ".join(self.value(r, depth + 1) for _ in range(r.randint(0, 3))) + "]"
        n = r.choice([2, 31, 32, 33, 100, 1000, 5000])
        return "[" * n + r.choice(["fc1", "", "1"]) + "]" * r.choice([n, 0, n - 1])

    def arguments(self, r: random.Random, fn: str) -> str:
        names = self.functions.get(fn, []) + ["nosuch", "Layers", "k"]
        parts = []
        for _ in range(r.randint(0, 5)):
            name = r.choice(names)
            parts.append(f"{name}={self.value(r, arg=name)}" if r.random() < 0.85 else self.value(r))
        if parts and r.random() < 0.1:
            parts.append(parts[0])                               # a duplicate argument
        return ", ".join(parts)

    def call(self, r: random.Random) -> str:
        fn = r.choice(list(self.functions) + ["influence", "NOSUCH", "read_csv"])
        return f"{fn}({self.arguments(r, fn.upper())})"

    # ---- statements --------------------------------------------------------------------------
    def statement(self, r: random.Random) -> str:
        kind = r.random()
        if kind < 0.22:
            s = self.topk(r)
        elif kind < 0.44:
            s = self.func_select(r)
        elif kind < 0.50:
            s = f"EXPLAIN {'ANALYZE ' if r.random() < 0.5 else ''}{r.choice([self.topk, self.func_select])(r)}"
        elif kind < 0.56:
            s = r.choice([f"SHOW {r.choice(['LAYERS', 'SETS', 'CHECKPOINTS', 'FUNCTIONS', 'TABLES', 'x'])}",
                          f"DESCRIBE {r.choice(list(self.functions) + ['nosuch', 'samples'])}"])
        elif kind < 0.66:
            s = self.catalog_change(r)
        elif kind < 0.70:
            s = self.plain_sql(r)
        elif kind < 0.705:
            s = self.valid_call(r)
        elif kind < 0.92:
            s = self.mutated_example(r)
        else:
            s = " ".join(r.choice(KEYWORDS + NOISE) for _ in range(r.randint(1, 12)))
        return s + (";" if r.random() < 0.5 else "")

    def topk(self, r: random.Random) -> str:
        k = r.choice(["1", "5", "0", str(2 ** 31), str(2 ** 31 + 1), "1" + "0" * 30, "9" * 5000, "-1", "x"])
        order = r.choice([" ORDER BY ASC", " ORDER BY DESC", "", " ORDER BY up", " ORDER BY score DESC"])
        return f"SELECT TOPK({k}) {r.choice(['train', 'test', 'odd', 'x'])} FROM {self.call(r)}{order}"

    def func_select(self, r: random.Random) -> str:
        cols = r.choice(["*", "sample_id, score", "count(*)", "train", "sample_id", "max(score)", "x"])
        alias = r.choice(["", " AS r", " r"])
        tail = r.choice(["", " WHERE score > 0", " ORDER BY score LIMIT 3", " ORDER BY ASC",
                         " JOIN samples USING (sample_id) WHERE label = 1", " LIMIT -1", " WHERE (((1)))"])
        return f"SELECT {cols} FROM {self.call(r)}{alias}{tail}"

    def valid_call(self, r: random.Random) -> str:
        """A call that runs (briefly): ELITE, LANCET and INFLUENCE reach their loops and artifacts."""
        fn, args = r.choice(list(VALID_CALLS.items()))
        extra = self.arguments(r, fn) if r.random() < 0.3 else ""
        return f"SELECT * FROM {fn}({', '.join(a for a in (args, extra) if a)})"

    def catalog_change(self, r: random.Random) -> str:
        name = r.choice(["s1", "s2", "odd", "train", "x y", "1bad", "s" * 200])
        body = r.choice(["SELECT sample_id FROM samples WHERE sample_id % 2 = 1",
                         "SELECT sample_id FROM samples WHERE split = 'test'", "SELECT 1", "SELECT 'x'",
                         "SELECT NULL", "SELECT sample_id, label FROM samples", "SELECT 1/0",
                         "SELECT 9223372036854775807", "SELECT sample_id FROM nosuch", "SELECT ?"])
        sid, label = r.choice(["0", "1", "39", "999", "-1", "NULL"]), r.choice(["0", "1", "2", "-5", "NULL", "'a'"])
        return r.choice([f"CREATE SET {name} AS {body}", f"CREATE OR REPLACE SET {name} AS {body}",
                         f"DROP SET {name}", f"DROP SET IF EXISTS {name}",
                         f"INSERT INTO labels (sample_id, label) VALUES ({sid}, {label})"])

    def plain_sql(self, r: random.Random) -> str:
        return r.choice(["SELECT count(*) FROM samples", "SELECT * FROM samples WHERE sample_id = ?",
                         "SELECT split, count(*) FROM samples GROUP BY split", "SELECT 'a'::INT",
                         "SELECT * FROM nosuch", "SELECT [1][5]", "SELECT ?, ?", "SELECT $1",
                         "SELECT * FROM labels", "SELECT 1e308 * 10", "SELECT * FROM shards LIMIT 1",
                         "SELECT * FROM read_json('nosuch.json')", "SELECT (" * 40 + "1" + ")" * 40])

    def mutated_example(self, r: random.Random) -> str:
        s = r.choice(self.examples).rstrip(";")
        for _ in range(r.randint(1, 3)):
            m = r.random()
            at = r.randint(0, len(s))
            if m < 0.3:
                s = s[:at]                                                   # truncated
            elif m < 0.6:
                s = s[:at] + r.choice(NOISE + KEYWORDS) + s[at:]             # noise spliced in
            elif m < 0.8:
                end = min(len(s), at + r.randint(1, 20))
                s = s[:at] + s[at:end] * r.randint(2, 4) + s[end:]           # a piece repeated
            else:
                s = s[:at] + s[at + r.randint(1, 8):]                        # a piece deleted
        return s

    def parameters(self, r: random.Random):
        if r.random() < 0.6:
            return None
        values = [r.choice(PARAMS) for _ in range(r.randint(0, 3))]
        return {"name": values[0] if values else 1, "x": "train"} if r.random() < 0.3 else values


# ---- a small real store ----------------------------------------------------------------------------
def small_store(path: str = ":memory:", n_train: int = 32, n_test: int = 8) -> metaql.Connection:
    """Train and test samples of a 6-feature, 3-class problem; an MLP captured at two
    checkpoints, the test samples replayed at the second; a set `odd`, a `val` split with 0/1 labels for ELITE, and two human labels."""
    torch.manual_seed(0)
    n = n_train + n_test + 8
    x, y = torch.randn(n, 6), torch.randint(0, 3, (n,))
    con = metaql.connect(path, config={"progress": False})
    ids = np.arange(n)
    con.add_samples(ids[:n_train], "train", y[:n_train].numpy(), x[:n_train])
    con.add_samples(ids[n_train:n_train + n_test], "test", y[n_train:n_train + n_test].numpy(),
                    x[n_train:n_train + n_test])
    con.add_samples(ids[-8:], "val", np.array([0, 1] * 4), x[-8:])
    model = MLP()
    for c, lr in enumerate([0.1, 0.05]):
        with con.capture(model, checkpoint=f"c{c}", lr=lr, factory="tests.models:MLP",
                         kwargs=model.metaql_config) as cap:
            cap.backward(F.cross_entropy(model(x[:n_train]), y[:n_train]), ids[:n_train])
    con.replay("c1", samples="test")     # test samples with factors at one checkpoint of two
    con.execute("CREATE SET odd AS SELECT sample_id FROM samples WHERE sample_id % 2 = 1")
    con.label([0, 1], [0, 1], by="fuzz")
    return con


# ---- running ------------------------------------------------------------------------------------------
class Watchdog:
    """Cancels the connection's running statement after `seconds` (one timer thread, reused)."""

    def __init__(self, con: metaql.Connection, seconds: float):
        self.con, self.seconds = con, seconds
        self._deadline: float | None = None
        self._cv = threading.Condition()
        self._stop = False
        self.fired = False
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        with self._cv:
            while not self._stop:
                if self._deadline is None:
                    self._cv.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cv.wait(left)
                    continue
                self.fired, self._deadline = True, None
                self.con.interrupt()

    def arm(self) -> None:
        with self._cv:
            self.fired, self._deadline = False, time.monotonic() + self.seconds
            self._cv.notify()

    def disarm(self) -> None:
        with self._cv:
            self._deadline = None
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()


def run_one(con: metaql.Connection, statement: str, params, watchdog: Watchdog) -> tuple[str, float]:
    """(outcome, seconds): 'ok', a metaql error class name, 'cancelled' (the watchdog fired), or
    'OTHER:<type>' for an exception outside metaql.Error."""
    t0 = time.perf_counter()
    watchdog.arm()
    try:
        con.execute(statement, params).fetchall()
        outcome = "ok"
    except metaql.InterruptException:
        outcome = "cancelled" if watchdog.fired else "InterruptException"
    except metaql.Error as e:
        outcome = type(e).__name__
    except Exception as e:  # noqa: BLE001 - what the fuzzer looks for
        outcome = f"OTHER:{type(e).__module__}.{type(e).__name__}"
    finally:
        watchdog.disarm()
    return outcome, time.perf_counter() - t0


def fuzz(con: metaql.Connection, statements, cancel_after: float, on_result=None) -> Counter:
    """Runs (statement, params) pairs; returns the outcome counts."""
    counts: Counter = Counter()
    watchdog = Watchdog(con, cancel_after)
    try:
        for statement, params in statements:
            outcome, seconds = run_one(con, statement, params, watchdog)
            counts[outcome] += 1
            if on_result is not None:
                on_result(statement, params, outcome, seconds)
    finally:
        watchdog.close()
    return counts
