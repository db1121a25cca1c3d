"""Exact TOPK pruning (engine/pruning.py, storage/norms.py): the pruned scan's top k is the full
scan's, ASC and DESC, ties included, for every registered layer kind, on stores drawn by hypothesis;
stores without stored norms still answer; EXPLAIN ANALYZE reports the fraction pruned."""
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import metaql
from metaql.engine.executor import top_k
from tests.test_kind_registry_exact import _registered_kinds, example_model

NTRAIN = 16


def _store(con, model, x, y, draw, shard_size=5):
    """NTRAIN training samples resampled from the example's inputs (duplicates: exact ties), some
    scaled down (small gradients, which pruning skips), two checkpoints, several shards each."""
    base = len(x) - 2
    pick = torch.tensor(draw(st.lists(st.integers(0, base - 1), min_size=NTRAIN, max_size=NTRAIN)))
    xt, yt = x[pick].clone(), y[pick].clone()
    if xt.is_floating_point():
        scale = torch.tensor(draw(st.lists(st.sampled_from([1.0, 1.0, 0.1, 1e-3]), min_size=NTRAIN,
                                           max_size=NTRAIN)))
        xt = xt * scale.reshape(-1, *[1] * (xt.dim() - 1))
    ids = np.arange(NTRAIN)
    con.add_samples(ids, "train", yt.numpy(), xt)
    con.add_samples(NTRAIN + np.arange(2), "test", y[base:].numpy(), x[base:])
    for ckpt, lr in (("c0", 0.5), ("c1", 0.2)):
        with con.capture(model, layers=["body"], checkpoint=ckpt, lr=lr, shard_size=shard_size) as cap:
            for lo in range(0, NTRAIN, 8):
                out = model(xt[lo:lo + 8])
                cap.backward(F.cross_entropy(out, yt[lo:lo + 8]), ids[lo:lo + 8])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))


def _topk(con, k, order, prune, reduce="mean"):
    con.config["topk_pruning"] = prune
    return con.execute(f"SELECT TOPK({k}) train FROM INFLUENCE(layers=[body], query=batch(test), "
                       f"reduce={reduce}) ORDER BY {order}").arrow()


def assert_same_top_k(con, pruned: pa.Table, order: str, k: int, reduce="mean"):
    """The pruned answer against the full scan's: the same ranks' scores, each id one whose full
    score is that rank's, and ids identical wherever the full scan's scores are not tied within
    float32 rounding (the scan's operators round a sample's score by about 1e-7 differently in
    batches of other sizes); exact ties ordered by sample_id."""
    con.config["topk_pruning"] = False
    full = con.execute(f"SELECT sample_id, score FROM INFLUENCE(layers=[body], query=batch(test), "
                       f"reduce={reduce})").arrow()
    ids, scores = full.column("sample_id").to_numpy(), full.column("score").to_numpy()
    ranked = np.argsort(scores if order == "ASC" else -scores, kind="stable")
    want_ids, want = ids[ranked][:k], scores[ranked][:k]
    got_ids, got = pruned.column("sample_id").to_numpy(), pruned.column("score").to_numpy()
    tol = 1e-5 * max(1e-30, np.abs(scores).max())
    assert len(got) == len(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    of = dict(zip(ids.tolist(), scores.tolist()))
    np.testing.assert_allclose([of[i] for i in got_ids], want, rtol=0, atol=tol)
    gaps = np.abs(np.diff(scores[ranked]))
    apart = np.ones(len(want), bool)
    apart[:-1] &= gaps[:len(want) - 1] > tol
    apart[1:] &= gaps[:len(want) - 1] > tol
    if len(want) < len(ranked):
        apart[-1] &= gaps[len(want) - 1] > tol
    assert (got_ids[apart] == want_ids[apart]).all()
    same = got[1:] == got[:-1]
    assert (got_ids[1:][same] > got_ids[:-1][same]).all()


# each kind in one order, the orders alternating over the kinds (the fast suite's time budget)
KIND_ORDERS = [(kind, "ASC" if i % 2 == 0 else "DESC") for i, kind in enumerate(_registered_kinds())]


@pytest.mark.parametrize("kind,order", KIND_ORDERS)
@settings(max_examples=1, deadline=None, derandomize=True)
@given(data=st.data())
def test_pruned_top_k_is_the_full_scans(kind, order, data):
    model, x, y = example_model(kind, data.draw)
    with metaql.connect(":memory:") as con, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _store(con, model, x, y, data.draw)
        k = data.draw(st.integers(1, NTRAIN - 1), label="k")
        reduce = data.draw(st.sampled_from(["mean", "sum"]), label="reduce")
        assert_same_top_k(con, _topk(con, k, order, True, reduce), order, k, reduce)


def small_gradient_store(con) -> None:
    """60 training samples, most gradients 1000x smaller than those of the query sets `same` and
    `other` (two of the large ones, with their labels and with other labels), captured at c0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False), torch.nn.Tanh(),
                                torch.nn.Linear(5, 3, bias=False))
    model.metaql_config = {}
    x, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    x *= torch.where(torch.arange(60) % 10 == 0, 1.0, 1e-3).reshape(-1, 1)
    xq = torch.cat([x[[0, 10]], x[[0, 10]]])
    yq = torch.cat([y[[0, 10]], (y[[0, 10]] + 1) % 3])
    ids = np.arange(60)
    con.add_samples(ids, "train", y.numpy(), x)
    con.add_samples(60 + np.arange(4), "test", yq.numpy(), xq)
    con.execute("CREATE SET same AS SELECT sample_id FROM samples WHERE sample_id IN (60, 61)")
    con.execute("CREATE SET other AS SELECT sample_id FROM samples WHERE sample_id IN (62, 63)")
    with con.capture(model, layers=["0", "2"], checkpoint="c0", lr=0.1, shard_size=16) as cap:
        cap.backward(F.cross_entropy(model(x), y), ids)


def test_pruning_skips_small_gradients_and_explain_analyze_says_how_much():
    """Most samples' gradients 1000x smaller, the query two of the large ones (same labels for
    DESC, other labels for ASC): the top 2 cannot be among the small ones, and at least half of
    the sample-layer scores are skipped (a test that fails if nothing is pruned)."""
    with metaql.connect(":memory:") as con:
        small_gradient_store(con)
        for order, query in (("DESC", "same"), ("ASC", "other")):
            q = f"SELECT TOPK(2) train FROM INFLUENCE(layers=*, query=batch({query})) ORDER BY {order}"
            con.config["topk_pruning"] = True
            lines = con.execute("EXPLAIN ANALYZE " + q).arrow().column("plan").to_pylist()
            line = next(s for s in lines if "pruning:" in s)
            assert float(line.split("pruning: ")[1].split("%")[0]) >= 50, line
            got = con.execute(q).arrow()
            con.config["topk_pruning"] = False
            want = con.execute(q).arrow()
            assert got.column("sample_id").to_pylist() == want.column("sample_id").to_pylist()
            np.testing.assert_allclose(got.column("score").to_numpy(), want.column("score").to_numpy(), rtol=1e-6)


def _small_store(path):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    model.metaql_config = {}
    x, y = torch.randn(22, 4), torch.randint(0, 3, (22,))
    with metaql.connect(path) as con:
        con.add_samples(np.arange(20), "train", y[:20].numpy(), x[:20])
        con.add_samples(20 + np.arange(2), "test", y[20:].numpy(), x[20:])
        with con.capture(model, layers=["0"], checkpoint="c0", lr=0.1, shard_size=8) as cap:
            cap.backward(F.cross_entropy(model(x[:20]), y[:20]), np.arange(20))
        assert con.execute("SELECT count(*) FROM sample_norms").fetchone()[0] == 20
        con.store.db.execute("DELETE FROM sample_norms")     # as a store captured before norms were kept


Q = "SELECT TOPK(3) train FROM INFLUENCE(layers=*, query=batch(test)) ORDER BY DESC"


def test_store_without_norms_read_only_is_scanned_in_full_and_written_nothing(tmp_path):
    path = tmp_path / "old.mq"
    _small_store(path)
    with metaql.connect(path, read_only=True, config={"topk_pruning": True}) as con:    # pruned at any cost
        lines = con.execute("EXPLAIN ANALYZE " + Q).arrow().column("plan").to_pylist()
        assert any("pruning: off (no stored gradient norms" in s for s in lines), lines
        got = con.execute(Q).arrow()
        assert con.execute("SELECT count(*) FROM sample_norms").fetchone()[0] == 0
    with metaql.connect(path, config={"topk_pruning": False}) as con:      # the documented switch
        lines = con.execute("EXPLAIN ANALYZE " + Q).arrow().column("plan").to_pylist()
        assert any("pruning: off" in s for s in lines), lines
        assert got.equals(con.execute(Q).arrow())


def test_store_without_norms_writable_computes_them_on_first_use(tmp_path):
    path = tmp_path / "old.mq"
    _small_store(path)
    with metaql.connect(path, config={"topk_pruning": True}) as con:     # pruned at any cost
        lines = con.execute("EXPLAIN ANALYZE " + Q).arrow().column("plan").to_pylist()
        assert any("20 norms computed on first use" in s for s in lines), lines
        assert con.execute("SELECT count(*) FROM sample_norms").fetchone()[0] == 20
        got = con.execute(Q).arrow()
        assert_same_top_k_linear(con, got)


def assert_same_top_k_linear(con, got):
    con.config["topk_pruning"] = False
    want = con.execute(Q).arrow()
    assert got.column("sample_id").to_pylist() == want.column("sample_id").to_pylist()
    np.testing.assert_allclose(got.column("score").to_numpy(), want.column("score").to_numpy(), rtol=1e-6)


class _ConvLin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.metaql_config = {}
        self.conv, self.fc = torch.nn.Conv1d(2, 3, 3), torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def test_stored_norms_are_the_gradients_norms():
    """sample_norms holds ||g||^2 of each sample's stored gradient (SELF_INFLUENCE at lr 1)."""
    torch.manual_seed(2)
    model = _ConvLin()
    x, y = torch.randn(7, 2, 4), torch.randint(0, 2, (7,))
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(7), "train", y.numpy(), x)
        with con.capture(model, layers=["conv", "fc"], checkpoint="c0", lr=1.0, shard_size=3) as cap:
            cap.backward(F.cross_entropy(model(x), y), np.arange(7))
        for layer in ("conv", "fc"):
            stored = con.execute("SELECT sq_norm FROM sample_norms WHERE layer = ? ORDER BY sample_id",
                                 [layer]).fetchnumpy()["sq_norm"]
            self_inf = con.execute(f"SELECT score FROM SELF_INFLUENCE(layers=[{layer}]) ORDER BY sample_id"
                                   ).fetchnumpy()["score"]
            np.testing.assert_allclose(stored, self_inf, rtol=1e-5)


def test_top_k_keeps_row_order_among_ties():
    """Ties go to the earlier row (sample_id order in a scan), whatever the table's length."""
    n = 5000
    scores = np.zeros(n)
    scores[::7] = 1.0
    table = pa.table({"sample_id": np.arange(n), "score": scores})
    assert top_k(table, 3, False).column("sample_id").to_pylist() == [0, 7, 14]
    assert top_k(table, 3, True).column("sample_id").to_pylist() == [1, 2, 3]


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), rank=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_spectral_norm_is_the_largest_singular_value(rows, cols, rank, seed):
    from metaql.engine.pruning import spectral_norm
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(rows, min(rank, rows, cols), generator=g) @ torch.randn(min(rank, rows, cols), cols, generator=g)
    exact = float(torch.linalg.matrix_norm(m.double(), ord=2))
    assert spectral_norm(m) == pytest.approx(exact, rel=1e-9, abs=1e-12)
