"""The executor's scan loop (issue #19): a shard's rows are matched to the sorted training ids by
binary search, and a layer stored full does not pay a second pass for norms nobody asked for."""
import numpy as np
import torch

from metaql.engine.executor import Context, chunk_scores, train_chunks
from metaql.engine.functions import REGISTRY
from metaql.storage.layers import kind_named


def test_train_chunks_find_the_training_rows_of_unsorted_shards():
    rng = np.random.default_rng(0)
    train = np.sort(rng.choice(100, 30, replace=False))
    shards = [rng.permutation(np.arange(lo, lo + 25)) for lo in (0, 25, 50, 75)] + [np.arange(200, 210)]
    batches = [(ids, {"G": torch.from_numpy(ids.astype(np.float32))[:, None]}) for ids in shards]
    ctx = Context(None, REGISTRY)
    got = list(train_chunks(batches, train, None, "full_dot", None, ctx))
    pos = np.concatenate([p for p, _ in got])
    vals = np.concatenate([c["G"][:, 0].numpy() for _, c in got]).astype(np.int64)
    assert sorted(vals) == list(train)                      # each training id once, nothing else
    assert (train[pos] == vals).all()                       # at its position among the sorted ids


def test_full_layer_norms_only_when_asked():
    kind = kind_named("linear")
    meta = kind.meta("l", torch.nn.Linear(3, 2))
    g = torch.randn(5, meta.params)
    q = {"count": 1, "gbar_flat": torch.randn(meta.params)}
    scores, norms = chunk_scores(kind, meta, "full", "full_dot", {"G": g}, q, "dot")
    assert np.allclose(scores, (g.double() @ q["gbar_flat"].double()).numpy(), rtol=1e-5)
    assert np.all(np.asarray(norms) == 0)                   # dot: no norms computed
    _, norms = chunk_scores(kind, meta, "full", "full_dot", {"G": g}, q, "cosine")
    assert np.allclose(norms, (g.double() ** 2).sum(1).numpy(), rtol=1e-5)


def test_rows_at_is_a_slice_only_for_consecutive_positions():
    from metaql.engine.matrix import rows_at
    assert rows_at(np.array([3, 4, 5, 6])) == slice(3, 7)
    assert rows_at(np.array([7])) == slice(7, 8)
    for pos in (np.array([3, 5, 6]), np.array([4, 3, 5]), np.array([5, 4]), np.array([], dtype=np.int64)):
        assert rows_at(pos) is pos


def test_topk_merged_block_by_block_equals_one_sort():
    """TopK over blocks (with ties, empty blocks, k above the count) equals sorting all scores at
    once by (-score, id), per query sample."""
    from metaql.engine.matrix import TopK
    rng = np.random.default_rng(1)
    ids = rng.permutation(40)
    scores = rng.integers(0, 5, (40, 3)).astype(float)          # many ties
    for k, largest in ((3, True), (7, False), (50, True)):
        keeper = TopK(3, k, largest)
        for lo, hi in ((0, 0), (0, 11), (11, 11), (11, 30), (30, 40)):
            keeper.merge(ids[lo:hi], scores[lo:hi])
        sign = 1 if largest else -1
        for j in range(3):
            want = sorted(range(40), key=lambda i: (-sign * scores[i, j], ids[i]))[:k]
            assert list(keeper.ids[j]) == [ids[i] for i in want]
            assert list(keeper.scores()[j]) == [scores[i, j] for i in want]
