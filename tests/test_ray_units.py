"""The Ray engine's tasks over all passes of a group of samples (distributed/ray_units.py), run in
this process (ray_units.local_runner: the same task function, no Ray cluster): which shards go
together, the driver's merge of each task's k best, and answers equal to the local engine's full
scan, including the stores whose shards do not line up (the scan falls back to pass by pass)."""
from __future__ import annotations

import numpy as np
import pytest

import metaql
from metaql.distributed import ray_engine, ray_units
from metaql.distributed.unit_scan import BestK, best_k
from metaql.distributed.units import plan_units
from tests.cluster_stores import build_store

QUERIES = [
    "SELECT TOPK(10) train FROM INFLUENCE(layers=[fc1, fc2], query=batch(test), checkpoints=all) ORDER BY ASC",
    "SELECT TOPK(7) train FROM INFLUENCE(layers=*, query=point(100), checkpoints=all, similarity=cosine) ORDER BY DESC",
    "SELECT TOPK(20) train FROM SELF_INFLUENCE(layers=[fc1, fc2], checkpoints=all) ORDER BY DESC",
    "SELECT sample_id, score FROM INFLUENCE(layers=*, query=batch(test), checkpoints=all, reduce=sum)",
    "SELECT * FROM INFLUENCE(layers=[fc2], query=batch(test), total=true)",
    "SELECT sample_id, score FROM SELF_INFLUENCE(layers=*, checkpoints=all)",
]


def row(lo, hi, n=None, b=100):
    return {"min_id": lo, "max_id": hi, "rows": n if n is not None else hi - lo + 1, "bytes": b}


def test_flush_aligned_shards_make_one_unit_per_flush():
    train = np.arange(100)
    seq = [[row(0, 49), row(50, 99)] for _ in range(3)]
    units = plan_units(seq, train)
    assert units.layout == "flush-aligned" and not units.check and len(units.shards) == 2
    shuffled = [[row(0, 98, 50), row(1, 99, 50)] for _ in range(2)]
    assert plan_units(shuffled, train).check          # overlapping ranges: the ids are checked
    assert len(plan_units(seq, np.arange(60, 70)).shards) == 1     # a shard with no training id is left out


def test_other_layouts_make_range_components_or_none():
    train = np.arange(100)
    halves = [[row(0, 49), row(50, 99)], [row(0, 24), row(25, 49), row(50, 74), row(75, 99)]]
    units = plan_units(halves, train)
    assert units.layout == "range components" and not units.check
    assert [[len(p) for p in u] for u in units.shards] == [[1, 2], [1, 2]]
    tangled = [[row(0, 60, 50), row(40, 99, 50)], [row(0, 99, 100)]]
    assert plan_units(tangled, train) is None          # one component over several shards: pass by pass
    assert plan_units([[dict(row(0, 9), min_id=None)]], train) is None


def test_merged_best_k_is_the_stable_sort_of_all_rows(monkeypatch):
    monkeypatch.setattr(BestK, "MERGE_ROWS", 50)        # cut many times
    rng = np.random.default_rng(0)
    score = rng.integers(0, 20, 1000).astype(float)     # many ties: broken by position
    pos = rng.permutation(1000)
    for ascending in (True, False):
        merged = BestK(25, ascending)
        for chunk in np.array_split(np.arange(1000), 37):
            merged.add(*best_k(pos[chunk], score[chunk], 25, ascending))
        order = np.argsort(pos)
        want = np.argsort(score[order] if ascending else -score[order], kind="stable")[:25]
        got_pos, got_score = merged.result()
        assert got_pos.tolist() == pos[order][want].tolist() and got_score.tolist() == score[order][want].tolist()


# ---- on small stores: the cluster step (they need no Ray, but building stores takes seconds) ----
@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    out = {}
    for name, kw in (("seq", {}), ("shuffled", {"shuffle": True, "checkpoints": 1}), ("shuffled2", {"shuffle": True})):
        out[name] = str(tmp_path_factory.mktemp(name) / "s.mq")
        build_store(out[name], shard_size=32, n_train=96, digits=False, **{"checkpoints": 2, **kw})
        with metaql.connect(out[name]) as con:       # keeps the cost model's constants: measured once
            con.execute(QUERIES[2])
    return out


@pytest.fixture
def in_process(monkeypatch):
    """Unit tasks run here; the pass-by-pass fallback runs the local loop; Ray never starts."""
    merges = []
    real = ray_units.merge

    def merge(*args):
        result = real(*args)
        merges.append(result is not None)       # False: the driver refused the tasks' results
        return result
    monkeypatch.setattr(ray_units, "ray_runner", ray_units.local_runner)
    monkeypatch.setattr(ray_units, "merge", merge)
    monkeypatch.setattr(ray_engine, "uses_ray", lambda ctx, strategy: False)
    return merges


def full_scan(path, monkeypatch) -> list:
    import metaql.engine.pruning as pruning
    with monkeypatch.context() as m:      # the local engine's full scan: its pruned TOPK re-scores rows
        m.setattr(pruning, "why_not", lambda plan, ctx: "off")   # in other chunks (float32 rounding)
        with metaql.connect(path, read_only=True) as con:
            return [con.execute(q).fetchall() for q in QUERIES]


@pytest.mark.cluster
@pytest.mark.parametrize("name,merges", [("seq", [True] * 6), ("shuffled", [True] * 6), ("shuffled2", [])])
def test_answers_equal_the_local_full_scan(stores, in_process, monkeypatch, name, merges):
    """seq: units by id ranges; shuffled: by flushes, ids checked; shuffled2 (two checkpoints in
    different orders): no units, the scan runs pass by pass as before."""
    path = stores[name]
    if merges and all(merges):
        want = full_scan(path, monkeypatch)
    else:         # the scan ran as before: the local engine's answers, its pruned TOPK included
        with metaql.connect(path, read_only=True) as con:
            want = [con.execute(q).fetchall() for q in QUERIES]
    with metaql.connect(path, read_only=True, config={"engine": "ray"}) as con:
        got = [con.execute(q).fetchall() for q in QUERIES]
    assert got == want and all(got)
    assert in_process == merges


@pytest.mark.cluster
def test_a_non_finite_score_is_the_local_engines_error(stores, in_process, monkeypatch):
    from metaql.distributed import unit_scan
    real = unit_scan.unit_totals

    def poisoned(parts, scan, bad):
        where, s, nrm = parts[1][0]
        parts[1][0] = (where, np.where(np.arange(len(s)) < 3, np.inf, s), nrm)
        return real(parts, scan, bad)
    monkeypatch.setattr(unit_scan, "unit_totals", poisoned)
    with metaql.connect(stores["seq"], read_only=True, config={"engine": "ray"}) as con:
        units = con.execute("SELECT count(*) FROM shards WHERE layer = 'fc2' AND checkpoint = 'epoch0'").fetchone()[0]
        with pytest.raises(metaql.InvalidInputException, match=rf"^{3 * units} scores of layer fc2 at checkpoint epoch0 "):
            con.execute(QUERIES[2])     # 3 per unit: the count is over every task, the check the first failing


@pytest.mark.cluster
def test_shards_that_do_not_line_up_send_the_scan_pass_by_pass(stores, in_process, monkeypatch):
    """A task that finds a unit's passes holding other ids, or two tasks holding the same sample
    (a store the capture cannot write: it stores a sample once per checkpoint and layer), refuses
    the units; the scan then runs pass by pass, with the local engine's answers."""
    from metaql.distributed import unit_scan
    from metaql.storage.catalog_snapshot import CatalogSnapshot
    path = stores["seq"]
    with metaql.connect(path, read_only=True) as con:
        shards = con.execute("SELECT file, checksum, rows, min_id, max_id, bytes FROM shards WHERE kind = 'factors' "
                             "AND checkpoint = 'epoch0' ORDER BY layer, shard_id").fetchall()
        want = con.execute(QUERIES[2]).fetchall()
    spec = [dict(zip(("file", "checksum", "rows", "min_id", "max_id", "bytes"), r)) for r in shards]
    half = len(spec) // 2            # fc1's shards, then fc2's
    misfit = [[[spec[0]], [spec[half + 1]]]]     # fc1's first flush beside fc2's second
    scan = unit_scan.Scan(np.arange(96), [unit_scan.Pass(0, "fc1", None, None, "", ""),
                                          unit_scan.Pass(0, "fc2", None, None, "", "")],
                          [None, None], ["epoch0"], [0.1], [None], "dot", None, 5)
    assert unit_scan.scan_units(path, misfit, scan, check=True) == {"unaligned": True}

    def twice(ctx, groups, shared, check, where):          # every task claims sample 0
        for _ in groups:
            yield {"unaligned": False, "all": np.array([0]), "bad": 0, "seconds": 0, "pos": np.zeros(0, int),
                   "score": np.zeros(0)}
    monkeypatch.setattr(ray_units, "ray_runner", twice)
    monkeypatch.setattr(ray_engine, "TASK_BYTES", 1)           # a task per unit
    monkeypatch.setattr(CatalogSnapshot, "factor_shards", lambda self, c, layer: [   # ranges overlap: checked
        dict(r, min_id=0, max_id=95) for r in self._factor_shards.get((c, layer), [])])
    with metaql.connect(path, read_only=True, config={"engine": "ray"}) as con:
        assert con.execute(QUERIES[2]).fetchall() == want
    assert in_process == [False]
