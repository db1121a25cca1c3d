"""The train x query matrix (INFLUENCE(..., query=each(set))) and its per-query top-k, checked
against explicitly built per-sample gradients (torch.func), against the single-query INFLUENCE of
each query sample, and against a brute-force sort (ties to the smaller sample id)."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import metaql
from metaql.engine import cost, executor
from metaql.engine.matrix import TopK
from metaql.engine.strategies import applicable
from metaql.storage.layers import kind_named
from tests.bruteforce import per_sample_grads, rel_err
from tests.models import MLP
from tests.test_influence_query import _build, _flat
from tests.test_kind_registry_exact import LR, NTRAIN, _per_sample, _registered_kinds, example_model


def _matrix(con, sql: str, ntrain: int, qids) -> np.ndarray:
    """(N, B) from the rows of a matrix query, checking it holds every (query, train) pair once."""
    rows = con.execute(sql).fetchnumpy()
    n = len(rows["score"])
    assert n == ntrain * len(qids)
    out = np.full((ntrain, len(qids)), np.nan)
    col = {int(q): j for j, q in enumerate(qids)}
    out[rows["sample_id"], [col[int(q)] for q in rows["query_id"]]] = rows["score"]
    assert not np.isnan(out).any()
    return out


def _strategies(kind: str) -> list[str]:
    k = kind_named(kind)
    return [s.name for s in applicable("factored" if k.factored else "full", each=True, kind=k)]


@pytest.mark.parametrize("kind", _registered_kinds())
@settings(max_examples=1, deadline=None)
@given(data=st.data())
def test_matrix_equals_per_sample_gradients_for_every_kind(kind, data):
    """Every matrix strategy that applies to the kind, forced in turn, gives LR * G_train G_query^T;
    each column equals the single-query INFLUENCE of that query sample (point(id))."""
    model, x, y = example_model(kind, data.draw)
    ids = np.arange(len(x))
    qids = ids[NTRAIN:]
    flat = kind_named(kind).torch_grad_vector
    with metaql.connect(":memory:") as con, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        con.add_samples(ids[:NTRAIN], "train", y[:NTRAIN].numpy(), x[:NTRAIN])
        con.add_samples(qids, "test", y[NTRAIN:].numpy(), x[NTRAIN:])
        with con.capture(model, layers=["body"], checkpoint="c0", lr=LR) as cap:
            cap.backward(F.cross_entropy(model(x[:NTRAIN]), y[:NTRAIN]), ids[:NTRAIN])
        meta, _ = con.store.layer_meta("body")
        g = flat(meta, _per_sample(model, x[:NTRAIN], y[:NTRAIN])).double()
        gq = flat(meta, _per_sample(model, x[NTRAIN:], y[NTRAIN:])).double()
        want = LR * g @ gq.T
        sql = "SELECT * FROM INFLUENCE(layers=[body], query=each(test))"
        for strategy in _strategies(kind):
            con.config["force_strategy"] = strategy
            got = _matrix(con, sql, NTRAIN, qids)
            assert rel_err(torch.from_numpy(got), want) < 1e-4, strategy
        con.config.pop("force_strategy")
        for j, q in enumerate(qids):
            one = con.execute(f"SELECT score FROM INFLUENCE(layers=[body], query=point({q})) "
                              "ORDER BY sample_id").fetchnumpy()["score"]
            assert np.allclose(got[:, j], one, rtol=1e-5, atol=1e-7 * np.abs(one).max())


def _sorted_topk(scores: np.ndarray, ids: np.ndarray, k: int, largest: bool):
    """Per column: (ids, scores) of the k best by a full sort, ties to the smaller id."""
    out = []
    for j in range(scores.shape[1]):
        key = -scores[:, j] if largest else scores[:, j]
        order = np.lexsort((ids, key))[:k]
        out.append((ids[order], scores[order, j]))
    return out


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.lists(st.integers(1, 7), min_size=1, max_size=5),
       st.booleans(), st.integers(0, 2 ** 16))
def test_running_topk_equals_a_full_sort_with_ties(b, k, blocks, largest, seed):
    """Blocks merged one by one (scores drawn from few values: many ties) keep exactly what one
    sort of everything would, ties to the smaller sample id."""
    rng = np.random.default_rng(seed)
    keeper, all_ids, all_scores, next_id = TopK(b, k, largest), [], [], 0
    for m in blocks:
        ids = np.arange(next_id, next_id + m) * 3 + rng.integers(0, 3, m)    # increasing, with gaps
        next_id += m
        scores = rng.integers(-2, 3, (m, b)).astype(float)
        keeper.merge(ids, scores)
        all_ids.append(ids), all_scores.append(scores)
    want = _sorted_topk(np.concatenate(all_scores), np.concatenate(all_ids), k, largest)
    for j, (ids, scores) in enumerate(want):
        assert keeper.ids[j].tolist() == ids.tolist()
        assert keeper.scores()[j].tolist() == scores.tolist()


def _mlp_store(con, seed, duplicates=False):
    torch.manual_seed(seed)
    model, x, y = MLP(), torch.randn(16, 6), torch.randint(0, 3, (16,))
    if duplicates:      # equal training samples: equal scores, so top-k has ties to break
        x[1], y[1], x[5], y[5] = x[0], y[0], x[0], y[0]
    lrs = [0.5, 0.25]
    states = _build(con, model, x, y, 11, 2, lrs, seed)
    return model, x, y, lrs, states


def _bruteforce_matrix(model, states, lrs, x, y, ntrain, similarity="dot"):
    total = torch.zeros(ntrain, len(x) - ntrain, dtype=torch.float64)
    for state, lr in zip(states, lrs):
        model.load_state_dict(state)
        g = _flat(per_sample_grads(model, x[:ntrain], y[:ntrain]), ["fc1", "fc2"]).double()
        gq = _flat(per_sample_grads(model, x[ntrain:], y[ntrain:]), ["fc1", "fc2"]).double()
        s = g @ gq.T
        if similarity == "cosine":
            s = s / (g.norm(dim=1)[:, None] * gq.norm(dim=1)[None, :])
        total += lr * s
    return total


@settings(max_examples=3, deadline=None)
@given(st.integers(0, 2 ** 16), st.sampled_from(["dot", "cosine"]), st.integers(1, 5), st.integers(1, 40))
@example(43591, "cosine", 1, 1)      # a score that cancels to near zero (CI of 2026-12-03)
def test_matrix_over_checkpoints_and_layers_with_small_blocks(seed, similarity, k, block):
    """Two checkpoints (lr-weighted) and two layers summed; blocks of a few training samples and
    chunks that split the query side, so that top-k merges many blocks: the matrix equals brute
    force, its columns the single-query INFLUENCE, its top-k a sort of it."""
    with pytest.MonkeyPatch.context() as mp, metaql.connect(":memory:") as con:
        mp.setattr(cost, "BLOCK_NUMBERS", block)
        mp.setattr(executor, "CHUNK_NUMBERS", 16)
        model, x, y, lrs, states = _mlp_store(con, seed, duplicates=True)
        qids = np.arange(11, 16)
        got = _matrix(con, f"SELECT * FROM INFLUENCE(query=each(test), similarity={similarity})", 11, qids)
        for j, q in list(enumerate(qids))[::3]:
            one = con.execute(f"SELECT score FROM INFLUENCE(query=point({q}), similarity={similarity}) "
                              "ORDER BY sample_id").fetchnumpy()["score"]
            # both are float32 sums: a score that cancels to near zero keeps an error of the column's
            # scale, not its own (seed 43591, cosine: -1.52163e-4 against -1.52167e-4 failed rtol alone)
            assert np.allclose(got[:, j], one, rtol=1e-5, atol=1e-6 * np.abs(one).max())
        both = con.execute(f"SELECT * FROM INFLUENCE(query=each(test), similarity={similarity}, topk={k}, "
                           "direction=both)").fetchnumpy()
        asc = con.execute(f"SELECT TOPK({k}) train FROM INFLUENCE(query=each(test), similarity={similarity}) "
                          "ORDER BY ASC").fetchnumpy()
    want = _bruteforce_matrix(model, states, lrs, x, y, 11, similarity)
    assert rel_err(torch.from_numpy(got), want) < 1e-5
    ids = np.arange(11)
    for role, largest in (("proponent", True), ("opponent", False)):
        for j, (top_ids, top_scores) in enumerate(_sorted_topk(got, ids, k, largest)):
            mine = (both["query_id"] == qids[j]) & (both["role"] == role)
            assert both["sample_id"][mine].tolist() == top_ids.tolist()
            assert both["score"][mine].tolist() == top_scores.tolist()
            assert both["rank"][mine].tolist() == list(range(1, k + 1))
            if not largest:
                at = asc["query_id"] == qids[j]
                assert asc["sample_id"][at].tolist() == top_ids.tolist()


def test_query_tensors_each_equal_the_registered_set(store_dir):
    """con.influence(query=(x, y), each=True): the same matrix as query=each(test) over the same
    samples registered, query_id being the row of the tensors; top-k alike."""
    with metaql.connect(store_dir) as con:
        _, x, y, _, _ = _mlp_store(con, 7)
        sql = _matrix(con, "SELECT * FROM INFLUENCE(query=each(test))", 11, np.arange(11, 16))
        got = con.influence(query=(x[11:], y[11:]), each=True).fetchnumpy()
        top = con.influence(query=(x[11:], y[11:]), each=True, topk=2, direction="opponents").fetchnumpy()
        sql_top = con.execute("SELECT * FROM INFLUENCE(query=each(test), topk=2, direction=opponents)").fetchnumpy()
        with pytest.raises(metaql.BinderException, match="topk= should be positive"):
            con.influence(query=(x[11:], y[11:]), each=True, topk=0)
    assert sorted(set(got["query_id"].tolist())) == list(range(5))
    mine = np.zeros_like(sql)
    mine[got["sample_id"], got["query_id"]] = got["score"]
    assert np.allclose(mine, sql, rtol=1e-6)
    assert top["sample_id"].tolist() == sql_top["sample_id"].tolist()
    assert (top["query_id"] + 11).tolist() == sql_top["query_id"].tolist()


def test_query_tensor_labels_are_checked_like_registered_ones(store_dir):
    """A query label of 1.7 was truncated to class 1 without a word (add_samples refuses it), and a
    single sample without its batch axis got a bare count mismatch."""
    with metaql.connect(store_dir) as con:
        _, x, y, _, _ = _mlp_store(con, 7)
        with pytest.raises(metaql.InvalidInputException, match=r"whole class indices; 1 are not \(e\.g\. \[1\.7"):
            con.influence(query=(x[11:13], torch.tensor([1.7, 2.0])))
        same = con.influence(query=(x[11:13], torch.tensor([1.0, 2.0]))).fetchall()
        assert same == con.influence(query=(x[11:13], torch.tensor([1, 2]))).fetchall()
        with pytest.raises(metaql.InvalidInputException, match=r"pass x\.unsqueeze\(0\)"):
            con.influence(query=(x[11], torch.tensor([1])))


def test_matrix_errors_say_what_to_do(store_dir):
    with metaql.connect(store_dir) as con:
        _mlp_store(con, 3)
        con.execute("CREATE SET nothing AS SELECT sample_id FROM samples WHERE false")
        cases = [
            ("SELECT * FROM INFLUENCE(query=each(nothing))", metaql.InvalidInputException, "set 'nothing' is empty"),
            ("SELECT * FROM INFLUENCE(query=each(tset))", metaql.CatalogException, "unknown set 'tset'.*Did you mean 'test'"),
            ("SELECT * FROM INFLUENCE(query=each(test), topk=0)", metaql.BinderException, "topk= should be positive"),
            ("SELECT * FROM INFLUENCE(query=each(test), topk=-3)", metaql.BinderException, "topk= should be positive"),
            ("SELECT TOPK(0) train FROM INFLUENCE(query=each(test)) ORDER BY ASC", metaql.BinderException, "TOPK"),
            ("SELECT * FROM INFLUENCE(query=batch(test), topk=3)", metaql.BinderException, "use it with query=each"),
            ("SELECT * FROM INFLUENCE(query=each(test), total=true)", metaql.BinderException, "GROUP BY query_id"),
            ("SELECT * FROM INFLUENCE(query=each(test), direction=sideways)", metaql.BinderException,
             "proponents, opponents, both"),
            ("SELECT * FROM INFLUENCE(query=each(test), train=each(train))", metaql.BinderException,
             "write train=batch"),
            ("SELECT TOPK(2) train FROM INFLUENCE(query=each(test), topk=3) ORDER BY ASC", metaql.BinderException,
             "give it once"),
            ("SELECT TOPK(2) train FROM INFLUENCE(query=each(test), direction=opponents) ORDER BY DESC",
             metaql.BinderException, "leave direction= out"),
            ("SELECT * FROM INFLUENCE(query=each(test, train))", metaql.BinderException, "each\\(set\\)"),
        ]
        for sql, error, message in cases:
            with pytest.raises(error, match=message):
                con.execute(sql)
        # the query side's rows in SQL: per query sample, a count and a sum
        rows = con.execute("SELECT query_id, count(*), sum(score) FROM INFLUENCE(query=each(test)) "
                           "GROUP BY query_id ORDER BY query_id").fetchall()
        assert [r[0] for r in rows] == list(range(11, 16)) and all(r[1] == 11 for r in rows)


def test_explain_shows_the_matrix_strategy_and_space(store_dir):
    with metaql.connect(store_dir) as con:
        _mlp_store(con, 4)
        text = "\n".join(r[0] for r in con.execute(
            "EXPLAIN ANALYZE SELECT * FROM INFLUENCE(query=each(test), topk=3, direction=both)").fetchall())
    assert "query=each(test) (5 samples)" in text
    assert "MATRIX 11 train x 5 query samples, top-3 both per query sample: 30 rows" in text
    assert "each_iterate*=" in text and "each_gradient=" in text and "query side" in text
    assert text.count("measured=") == 4         # 2 checkpoints x 2 layers


def test_cost_model_picks_by_shape_and_space():
    consts = {"sec_per_flop": 1e-10, "sec_per_byte": 1e-10}
    from metaql.engine.optimizer import candidates

    def pick(sh):
        ests = cost.estimates(sh)
        for e in ests.values():
            e["seconds"] = cost.seconds(e, consts)
        return min(candidates(ests), key=lambda name: ests[name]["seconds"])
    # a digits-CNN conv (16 -> 32, 3x3, 8x8 outputs): many rows per sample. One query sample:
    # Lemma 7 with its gradient; many: building each training gradient once, (S + B) P < S B P
    conv = dict(n=1000, s=64, sq=64, din=16 * 9 + 1, dout=32, stored="factored", each=True, kind="conv")
    assert pick(cost.Shapes(b=1, **conv)) == "each_gradient"
    assert pick(cost.Shapes(b=64, **conv)) == "each_reconstruct"
    # one row per sample on a 4096 x 4096 linear: Gram products; the per-query gradients of 1000
    # queries (64 GiB) would not fit anyway
    fc = dict(n=10_000, s=1, sq=1, din=4097, dout=4096, stored="factored", each=True, kind="linear")
    assert pick(cost.Shapes(b=1000, **fc)) == "each_iterate"
    assert cost.estimates(cost.Shapes(b=1000, **fc))["each_gradient"]["space"] > cost.SPACE_LIMIT
    # full-stored kinds have their own; the fallback kind has only the full product
    assert list(cost.estimates(cost.Shapes(n=10, s=1, b=3, sq=1, din=1, dout=8, stored="full", each=True,
                                           kind="fallback"))) == ["each_full_dot"]
    assert cost.matrix_space(10_000, 1000, None)["held"] == 10_000_000
    assert cost.matrix_space(10_000, 1000, 10, 2)["rows"] == 20_000
