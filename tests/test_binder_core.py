"""Issue #18's engine internals: one binder against one catalog snapshot per statement, a counted
catalog, strategies as registered objects, the optimizer as rules over a copy of the plan."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metaql
from tests.models import SeqModel


@pytest.fixture(scope="module")
def con(tmp_path_factory):
    """SeqModel (layers tok, proj, head) captured at 2 checkpoints over 8 train and 4 test samples."""
    torch.manual_seed(0)
    model, x, y = SeqModel(), torch.randn(12, 3, 4), torch.randint(0, 2, (12,))
    c = metaql.connect(str(tmp_path_factory.mktemp("binder") / "store"), config={"progress": False})
    c.add_samples(np.arange(8), "train", y[:8].numpy(), x[:8])
    c.add_samples(np.arange(8, 12), "test", y[8:].numpy(), x[8:])
    for ckpt in ("c0", "c1"):
        with c.capture(model, checkpoint=ckpt, lr=0.1, factory="tests.models:SeqModel",
                       kwargs=model.metaql_config) as cap:
            cap.backward(F.cross_entropy(model(x[:8]), y[:8]), np.arange(8))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
    yield c
    c.close()


CALLS_WITH_UNKNOWN_SET = [
    "ELITE(data=nosuch, labeled=train)",
    "ELITE(data=train, labeled=nosuch)",
    "LANCET(pool=nosuch)",
    "LANCET_STATUS(pool=nosuch)",
    "LANCET_CANDIDATES(pool=nosuch, budget=2)",
    "INFLUENCE(query=batch(nosuch))",
    "SELF_INFLUENCE(train=nosuch)",
]


@pytest.mark.parametrize("call", CALLS_WITH_UNKNOWN_SET)
def test_explain_refuses_an_unknown_set_as_running_does(con, call):
    with pytest.raises(metaql.CatalogException, match="unknown set 'nosuch'") as explained:
        con.execute(f"EXPLAIN SELECT * FROM {call}")
    with pytest.raises(metaql.CatalogException) as ran:
        con.execute(f"SELECT * FROM {call}")
    assert str(explained.value) == str(ran.value)


def test_binder_resolves_columns_samples_and_says_did_you_mean(con):
    with pytest.raises(metaql.CatalogException, match="unknown set 'tran'. Did you mean 'train'"):
        con.execute("EXPLAIN SELECT * FROM ELITE(data=tran, labeled=test)")
    with pytest.raises(metaql.BinderException, match="unknown samples column 'lable'.*Did you mean 'label'"):
        con.execute("EXPLAIN SELECT * FROM ELITE(data=train, labeled=test, label_column=lable)")
    with pytest.raises(metaql.CatalogException, match="sample 999 is not registered"):
        con.execute("EXPLAIN SELECT * FROM INFLUENCE(query=point(999))")
    with pytest.raises(metaql.CatalogException, match="unknown checkpoint 'c9'"):
        con.execute("EXPLAIN SELECT * FROM SELF_INFLUENCE(checkpoints=[c9])")


def test_layer_glob_patterns(con):
    by_glob = con.execute("SELECT sample_id, score FROM INFLUENCE(query=batch(test), layers='t*') "
                          "ORDER BY sample_id").fetchall()
    by_name = con.execute("SELECT sample_id, score FROM INFLUENCE(query=batch(test), layers=[tok]) "
                          "ORDER BY sample_id").fetchall()
    assert by_glob == by_name
    plan = [r[0] for r in con.execute("EXPLAIN SELECT * FROM SELF_INFLUENCE(layers=['*o*', head])").fetchall()]
    assert "layers=3" in plan[0]
    with pytest.raises(metaql.CatalogException, match="pattern 'enc.\\*' matches no stored layer"):
        con.execute("EXPLAIN SELECT * FROM SELF_INFLUENCE(layers='enc.*')")


def _round_trips(con, sql: str) -> int:
    lines = [r[0] for r in con.execute("EXPLAIN ANALYZE " + sql).fetchall()]
    found = [int(m.group(1)) for m in map(re.compile(r"^catalog round trips: (\d+)$").match, lines) if m]
    assert len(found) == 1, lines
    return found[0]


def test_catalog_round_trips_per_influence_query(con):
    """2 checkpoints x 3 layers. Read once per statement: the sets and splits, each side's members,
    the layers, the checkpoints, the cost constants, the factor shards' rows and the inputs' shard
    rows (9); per checkpoint its model, its task and the query side's stored targets (8 each); the
    statement DuckDB runs around the call (3). Old main made 53 (62 counting registrations), and
    5 more per layer and checkpoint."""
    con.execute("SELECT * FROM INFLUENCE(query=batch(test))")      # cost constants measured and kept
    every = _round_trips(con, "SELECT * FROM INFLUENCE(query=batch(test))")
    one = _round_trips(con, "SELECT * FROM INFLUENCE(query=batch(test), layers=[head])")
    assert every == one                              # nothing per layer
    assert every <= 9 + 2 * 8 + 3
    topk = _round_trips(con, "SELECT TOPK(3) train FROM INFLUENCE(query=batch(test)) ORDER BY ASC")
    assert topk <= 9 + 2 * 8 + 1                     # + the stored gradient norms a pruned TOPK reads


def test_counter_sees_every_statement_sent(con):
    before = con.store.round_trips.count
    con.store.db.execute("SELECT 1").fetchone()
    con.store.sql("SELECT 2").fetchone()
    assert con.store.round_trips.count == before + 2


def test_optimizer_rules_work_on_a_copy(con):
    from metaql.engine import optimizer
    from metaql.engine.influence import influence_plan
    from metaql.engine.functions import SampleRef
    ctx = con._context()
    plan = influence_plan(ctx, query=SampleRef("batch", "test"))
    assert plan.strategies == [] and all(callable(r) for r in optimizer.RULES)
    optimized = optimizer.optimize(plan, ctx.catalog, {})
    assert plan.strategies == [] and optimized is not plan
    assert len(optimized.strategies) == 6
    assert optimizer.optimize(optimized, ctx.catalog) is optimized     # not optimized twice


def test_a_registered_strategy_is_costed_explained_and_run(con):
    from metaql.engine import strategies

    class Doubled(strategies.BatchAverage):
        name = "doubled_for_test"

        def scores(self, kind, meta, chunk, q):
            return 2 * super().scores(kind, meta, chunk, q)

    strategies.register(Doubled())
    try:
        plain = con.execute("SELECT score FROM INFLUENCE(query=batch(test), layers=[head], "
                            "checkpoints=[c0]) ORDER BY sample_id").fetchnumpy()["score"]
        forced = metaql.connect(str(con.store.root), read_only=True,
                                config={"force_strategy": "doubled_for_test", "progress": False,
                                        "trusted_factories": ["tests.models:SeqModel"]})
        try:
            plan = [r[0] for r in forced.execute("EXPLAIN SELECT * FROM INFLUENCE(query=batch(test), "
                                                 "layers=[head], checkpoints=[c0])").fetchall()]
            assert "c0/head (linear): doubled_for_test" in plan[1] and "doubled_for_test*=" in plan[1]
            got = forced.execute("SELECT score FROM INFLUENCE(query=batch(test), layers=[head], "
                                 "checkpoints=[c0]) ORDER BY sample_id").fetchnumpy()["score"]
        finally:
            forced.close()
        np.testing.assert_allclose(got, 2 * plain, rtol=1e-6)
    finally:
        del strategies.STRATEGIES["doubled_for_test"]


def test_engine_and_face_send_no_catalog_sql():
    """The catalog's SQL lives in storage/ (its typed owner); engine/ and metaql/ call its methods."""
    root = Path(metaql.__file__).resolve().parent.parent
    direct = re.compile(r"(store|db)\.(sql|execute|executemany)\(")
    tables = re.compile(r"\b(meta|samples|models|checkpoints|layers|shards|sets|set_members|labels|pending_files)\b")
    offending = [f"{path.name}:{i}: {line.strip()}"
                 for folder in ("engine", "metaql") for path in sorted((root / folder).glob("*.py"))
                 for i, line in enumerate(path.read_text().splitlines(), 1)
                 if direct.search(line) and tables.search(line)]
    assert offending == []


def test_describe_shows_declared_output_columns(con):
    rows = con.execute("DESCRIBE INFLUENCE").fetchall()
    assert ("-> sample_id", "BIGINT", "(output column)") in rows
    assert ("-> score", "DOUBLE", "(output column)") in rows
    assert ("-> train_samples", "BIGINT", "(output column, alternative 1)") in rows
    assert rows[0][0] == "query"
    elite = dict((a, t) for a, t, _ in con.execute("DESCRIBE ELITE").fetchall())
    assert elite["-> is_anomaly"] == "BOOLEAN" and elite["label_column"] == "ColumnName"


def test_explain_names_each_layers_kind(con):
    """Issue #17: the store and EXPLAIN say which kind each layer got (EXPLAIN did not)."""
    kinds = {r[0]: r[1] for r in con.execute("SELECT name, kind FROM layers").fetchall()}
    text = "\n".join(r[0] for r in con.execute("EXPLAIN SELECT * FROM INFLUENCE(query=batch(test))").fetchall())
    for layer, kind in kinds.items():
        assert f"c0/{layer} ({kind}): " in text and f"c1/{layer} ({kind}): " in text, (layer, kind, text)


def _replays(con, sql: str) -> str | None:
    lines = [r[0] for r in con.execute("EXPLAIN ANALYZE " + sql).fetchall()]
    found = [line for line in lines if line.startswith("replays: ")]
    assert len(found) <= 1, lines
    return found[0] if found else None


def test_explain_analyze_counts_the_model_replays(con):
    """The query side's replay (4 test samples at each of 2 checkpoints, one batch each) is
    counted in EXPLAIN ANALYZE's footer; a statement that replays nothing has no such line."""
    line = _replays(con, "SELECT * FROM INFLUENCE(query=batch(test))")
    assert re.fullmatch(r"replays: 8 sample\(s\) in 2 batch\(es\), [0-9.e-]+ s", line), line
    assert _replays(con, "SELECT * FROM INFLUENCE(query=batch(test), checkpoints=[c1])").startswith(
        "replays: 4 sample(s) in 1 batch(es)")
    assert _replays(con, "SELECT * FROM SELF_INFLUENCE()") is None


def test_replay_tallies_nest():
    from metaql.storage.hooks import watched_modules
    from metaql.storage.replay import replay_factors, replay_tally
    from tests.models import MLP
    model = MLP()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with replay_tally() as outer:
        replay_factors(model, watched_modules(model, ["fc1"]), x, y, batch_size=2)
        with replay_tally() as inner:
            replay_factors(model, watched_modules(model, ["fc1"]), x[:1], y[:1])
    replay_factors(model, watched_modules(model, ["fc1"]), x, y)      # counted by neither
    assert (outer.samples, outer.batches, inner.samples, inner.batches) == (6, 4, 1, 1)
    assert outer.seconds >= inner.seconds > 0
