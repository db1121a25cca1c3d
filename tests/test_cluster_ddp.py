"""Capture under torch.distributed: two gloo ranks (torch.multiprocessing spawn) capture their own
samples of each global batch into their own shards, rank 0 commits; the store equals a
one-process capture of the same training (factors to 1e-6, the same sample ids)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metaql
from metaql.demo import DigitsMLP
from tests.ddp_helpers import assert_same_factors, free_port

pytestmark = pytest.mark.cluster
N, BATCH, STEPS = 96, 32, 3


def data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(N, 64, generator=g), torch.randint(0, 10, (N,), generator=g)


def batches():
    order = torch.randperm(N, generator=torch.Generator().manual_seed(2))
    return [order[i * BATCH:(i + 1) * BATCH] for i in range(STEPS)]


def new_store(path: str) -> None:
    x, y = data()
    with metaql.connect(path) as con:
        con.add_samples(np.arange(N), "train", y.numpy(), x)


def _rank_main(rank: int, world: int, port: int, path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from metaql.distributed.ddp import distributed_capture
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = DDP(DigitsMLP())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = data()
        con = metaql.connect(path) if rank == 0 else None
        with distributed_capture(con if rank == 0 else path, model, layers=["fc1", "fc2"], checkpoint="c0",
                                 lr=0.1, shard_size=8) as cap:
            for ids in batches():
                mine = ids[rank::world]                   # this rank's share of the global batch
                cap.backward(F.cross_entropy(model(x[mine]), y[mine]), mine.numpy())
                opt.step()
                opt.zero_grad()
        if con is not None:
            con.close()
    finally:
        dist.destroy_process_group()


def one_process(path: str) -> None:
    new_store(path)
    torch.manual_seed(0)
    model = DigitsMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    with metaql.connect(path) as con:
        with con.capture(model, layers=["fc1", "fc2"], checkpoint="c0", lr=0.1, shard_size=8) as cap:
            for ids in batches():
                # DDP averages the ranks' mean gradients: the mean over the global batch
                cap.backward(F.cross_entropy(model(x[ids]), y[ids]), ids.numpy())
                opt.step()
                opt.zero_grad()


def rank_of(ids: np.ndarray) -> int | None:
    """The rank whose share of the batches holds all of `ids`, else None."""
    for rank in (0, 1):
        share = set(np.concatenate([b[rank::2].numpy() for b in batches()]).tolist())
        if share.issuperset(ids.tolist()):
            return rank
    return None


def test_two_gloo_ranks_store_what_one_process_stores(tmp_path):
    ddp, single = str(tmp_path / "ddp.mq"), str(tmp_path / "one.mq")
    new_store(ddp)
    torch.multiprocessing.spawn(_rank_main, args=(2, free_port(), ddp), nprocs=2, join=True)
    one_process(single)
    assert_same_factors(ddp, single, "c0", 2 * N, atol=1e-6)       # the same sample ids, each once
    with metaql.connect(ddp, read_only=True) as con:
        assert con.verify() == []
        assert con.execute("SELECT status FROM checkpoints").fetchall() == [("complete",)]
        owners = [rank_of(con.store.shard_tensors(row)[0]) for row in con.store._shard_rows("factors", "c0")]
        mine = con.execute("SELECT * FROM SELF_INFLUENCE(layers=*) ORDER BY sample_id").fetchall()
    with metaql.connect(single, read_only=True) as con:
        theirs = con.execute("SELECT * FROM SELF_INFLUENCE(layers=*) ORDER BY sample_id").fetchall()
    assert sorted(set(owners)) == [0, 1]     # each shard holds one rank's samples; both ranks wrote
    np.testing.assert_allclose(np.array(mine), np.array(theirs), rtol=1e-5)
    assert not Path(ddp + ".ranks", "c0").exists()      # the parts were adopted and removed


def captured_parts(tmp_path):
    """A store with rank 0's samples (even ids) and rank 1's part store (odd ids), as the ranks
    leave them before rank 0 adopts the part."""
    from metaql.distributed.ddp import part_dir
    from metaql.storage.capture import Capture
    from metaql.storage.store import Store
    path = str(tmp_path / "s.mq")
    new_store(path)
    x, y = data()
    con = metaql.connect(path)
    part = Store(part_dir(Path(path).resolve(), "c0", 1))
    for store, ids in ((con.store, np.arange(0, N, 2)), (part, np.arange(1, N, 2))):
        torch.manual_seed(0)
        model = DigitsMLP()
        with Capture(store, model, ["fc1", "fc2"], "c0", 0.1, shard_size=16) as cap:
            cap.require_registered = store is con.store     # as distributed_capture: a part holds no samples
            for chunk in np.array_split(ids, 3):
                cap.backward(F.cross_entropy(model(x[chunk]), y[chunk]), chunk)
    part.close()
    return con


def test_rank0_dying_before_it_removes_the_parts_adopts_nothing_twice(tmp_path, monkeypatch):
    from metaql.distributed import ddp
    con = captured_parts(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(ddp.shutil, "rmtree", lambda *a, **k: None)      # the crash: parts left behind
        ddp.adopt_parts(con.store, "c0", 2, [None, "complete"])
    ddp.adopt_parts(con.store, "c0", 2, [None, "complete"])          # the rerun
    assert con.verify() == []
    ids = con.execute("SELECT layer, count(*), sum(rows) FROM shards WHERE kind = 'factors' GROUP BY layer "
                      "ORDER BY layer").fetchall()
    assert [(layer, int(rows)) for layer, _, rows in ids] == [("fc1", N), ("fc2", N)]
    con.close()


def test_a_rank_that_did_not_finish_fails_the_capture_and_marks_it_partial(tmp_path):
    from metaql.distributed import ddp
    con = captured_parts(tmp_path)
    with pytest.raises(metaql.OperationalError, match=r"ranks \[1\] did not finish"):
        ddp.adopt_parts(con.store, "c0", 2, [None, "partial"])
    assert con.execute("SELECT status FROM checkpoints").fetchall() == [("partial",)]
    con.close()


def test_a_rank_killed_mid_capture_and_restarted_leaves_each_sample_once(tmp_path):
    from metaql.distributed import ddp
    from metaql.distributed.ddp import part_dir
    from metaql.storage.capture import Capture
    from metaql.storage.store import Store
    path = str(tmp_path / "s.mq")
    new_store(path)
    x, y = data()
    con = metaql.connect(path)

    def capture(store, ids, fail_after=None):
        torch.manual_seed(0)
        model = DigitsMLP()
        with Capture(store, model, ["fc1", "fc2"], "c0", 0.1, shard_size=16) as cap:
            cap.require_registered = store is con.store     # as distributed_capture: a part holds no samples
            for n, chunk in enumerate(np.array_split(ids, 3)):
                if n == fail_after:
                    raise RuntimeError("rank died")
                cap.backward(F.cross_entropy(model(x[chunk]), y[chunk]), chunk)

    capture(con.store, np.arange(0, N, 2))
    part = Store(part_dir(Path(path).resolve(), "c0", 1))
    with pytest.raises(RuntimeError):
        capture(part, np.arange(1, N, 2), fail_after=2)       # rank 1 dies after two batches
    status = part.checkpoint("c0")["status"]
    part.close()
    with pytest.raises(metaql.OperationalError):
        ddp.adopt_parts(con.store, "c0", 2, [None, status])
    part = Store(part_dir(Path(path).resolve(), "c0", 1))    # the restarted rank resumes its part
    capture(part, np.arange(1, N, 2))
    status = part.checkpoint("c0")["status"]
    part.close()
    ddp.adopt_parts(con.store, "c0", 2, [None, status])
    assert con.verify() == []
    rows = con.execute("SELECT layer, sum(rows) FROM shards WHERE kind = 'factors' GROUP BY layer ORDER BY layer")
    assert [(layer, int(n)) for layer, n in rows.fetchall()] == [("fc1", N), ("fc2", N)]
    assert con.execute("SELECT status FROM checkpoints").fetchall() == [("complete",)]
    con.close()


def _rank_failing(rank: int, world: int, port: int, path: str, out: str, fault: str) -> None:
    """A two-rank capture with a fault: 'layer', rank 1 names a layer the model lacks (it fails
    before its capture begins); 'commit', rank 0's adoption of the parts fails. Each rank writes
    its outcome to out/rank<r>."""
    import torch.distributed as dist
    from metaql.distributed import ddp
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x, y = data()
    model = DigitsMLP()
    con = metaql.connect(path) if rank == 0 else None
    if fault == "commit" and rank == 0:
        def adopt_fails(*args, **kwargs):
            raise metaql.IOException("disk full")
        ddp.adopt_parts = adopt_fails
    layers = ["nope"] if fault == "layer" and rank == 1 else ["fc1"]
    try:
        with ddp.distributed_capture(con if rank == 0 else path, model, layers=layers, checkpoint="c0",
                                     lr=0.1) as cap:
            ids = np.arange(rank, 16, world)
            cap.backward(F.cross_entropy(model(x[ids]), y[ids]), ids)
        outcome = "ok"
    except metaql.Error as e:
        outcome = f"{type(e).__name__}: {e}"
    finally:
        if con is not None:
            con.close()
        dist.destroy_process_group()
    Path(out, f"rank{rank}").write_text(outcome)


def run_ranks_with(fault: str, tmp_path) -> str:
    """Runs _rank_failing on 2 ranks (failing the test if a rank hangs); the store's path."""
    path = str(tmp_path / "s.mq")
    new_store(path)
    ctx = torch.multiprocessing.spawn(_rank_failing, args=(2, free_port(), path, str(tmp_path), fault), nprocs=2,
                                      join=False)
    deadline = 120
    while not ctx.join(timeout=5):
        deadline -= 5
        assert deadline > 0, "a rank hangs"
    return path


def test_a_rank_failing_before_its_capture_begins_fails_rank0_without_a_hang(tmp_path):
    path = run_ranks_with("layer", tmp_path)
    assert Path(tmp_path, "rank1").read_text().startswith("CatalogException: unknown layer 'nope'")
    assert "ranks [1] did not finish" in Path(tmp_path, "rank0").read_text()
    with metaql.connect(path, read_only=True) as con:
        assert con.execute("SELECT status FROM checkpoints").fetchall() == [("partial",)]


def test_rank0s_failed_commit_fails_every_rank(tmp_path):
    """Rank 1 does not report a capture the store lacks (it returned normally before)."""
    run_ranks_with("commit", tmp_path)
    assert Path(tmp_path, "rank0").read_text() == "IOException: disk full"
    assert Path(tmp_path, "rank1").read_text().startswith(
        "OperationalError: rank 0 could not commit checkpoint 'c0' (IOException: disk full)")
