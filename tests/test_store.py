"""The store: reopen, sets, durability, corruption and bad input never corrupt it."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metaql
from tests.models import MLP


def _captured(store_dir, n=12, checkpoints=1, shard_size=4):
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(n, 6), torch.randint(0, 3, (n,))
    con = metaql.connect(store_dir)
    con.add_samples(np.arange(n), "train", y.numpy(), x, columns={"weight": np.linspace(0, 1, n)})
    for c in range(checkpoints):
        with con.capture(model, checkpoint=f"c{c}", lr=0.1, shard_size=shard_size) as cap:
            for part in np.array_split(np.arange(n), 3):
                cap.backward(F.cross_entropy(model(x[part]), y[part]), part)
    return con


def test_reopen_keeps_everything(store_dir):
    con = _captured(store_dir)
    con.execute("CREATE SET light AS SELECT sample_id FROM samples WHERE weight < 0.5")
    before = con.execute("SELECT * FROM SELF_INFLUENCE() ORDER BY sample_id").fetchall()
    con.close()
    with metaql.connect(store_dir, read_only=True) as con:
        assert con.execute("SELECT * FROM SELF_INFLUENCE() ORDER BY sample_id").fetchall() == before
        assert con.execute("SELECT size FROM sets WHERE name = 'light'").fetchone() == (6,)
        assert con.execute("SELECT count(*) FROM shards WHERE kind = 'factors'").fetchone()[0] == 6
        assert con.verify() == []
        with pytest.raises(metaql.IOException, match="read-only"):
            con.execute("CREATE SET x AS SELECT 1 AS sample_id")


def test_corrupt_and_missing_shards_are_named(store_dir):
    _captured(store_dir).close()
    files = sorted((p for p in (os.path.join(r, f) for r, _, fs in os.walk(store_dir) for f in fs)
                    if p.endswith(".arrow") and "tensors" in p))
    with open(files[0], "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xfe\xfd\xfc")
    os.remove(files[1])
    with metaql.connect(store_dir) as con:
        problems = con.verify()
        assert any("corrupt" in p and os.path.basename(files[0]) in p for p in problems)
        assert any("missing" in p and os.path.basename(files[1]) in p for p in problems)
        with pytest.raises(metaql.IOException, match=r"(corrupt|missing).*con.verify\(repair=True\)"):
            con.execute("SELECT * FROM SELF_INFLUENCE()")


def test_catalog_paths_never_leave_the_store(store_dir):
    con = _captured(store_dir)
    con.store.db.execute("UPDATE shards SET file = '../../etc/passwd' WHERE shard_id = (SELECT min(shard_id) FROM shards WHERE kind='factors')")
    with pytest.raises(metaql.IOException, match="outside the store"):
        con.execute("SELECT * FROM SELF_INFLUENCE()")
    con.close()


def test_bad_samples_change_nothing(store_dir):
    with metaql.connect(store_dir) as con:
        con.add_samples([1, 2], "train", [0, 1], torch.zeros(2, 6))
        cases = [
            (dict(ids=[3, 3], split="train"), "duplicate"),
            (dict(ids=[2, 5], split="train"), "already registered"),
            (dict(ids=[5, 6], split="train", labels=[1]), "2 ids but 1 labels"),
            (dict(ids=[5, 6], split="train", inputs=torch.tensor([[float("nan")] * 6] * 2)), "NaN"),
            (dict(ids=[], split="train"), "no sample ids"),
            (dict(ids=[0.5], split="train"), "integers"),
        ]
        for kwargs, message in cases:
            with pytest.raises(metaql.InvalidInputException, match=message):
                con.add_samples(**kwargs)
        assert con.execute("SELECT count(*) FROM samples").fetchone() == (2,)
        assert con.execute("SELECT count(*) FROM shards").fetchone() == (1,)


def test_failed_set_statements_change_nothing(store_dir):
    with metaql.connect(store_dir) as con:
        con.add_samples([1, 2, 3], "train", [0, 1, 0])
        con.execute("CREATE SET a AS SELECT sample_id FROM samples WHERE label = 0")
        with pytest.raises(metaql.CatalogException, match="already exists"):
            con.execute("CREATE SET a AS SELECT sample_id FROM samples")
        with pytest.raises(metaql.BinderException, match="not registered"):
            con.execute("CREATE OR REPLACE SET a AS SELECT 99 AS sample_id")
        with pytest.raises(metaql.BinderException, match="query failed"):
            con.execute("CREATE SET b AS SELECT nope FROM samples")
        for create in ("CREATE", "CREATE OR REPLACE"):     # a set named like a split hid the split
            with pytest.raises(metaql.CatalogException, match="'train' is a split"):
                con.execute(f"{create} SET train AS SELECT 1 AS sample_id")
        assert con.execute("SELECT name, size FROM sets").fetchall() == [("a", 2)]
        with pytest.raises(metaql.ProgrammingError, match="would break the store"):
            con.execute("DELETE FROM shards")
        con.execute("DROP SET a")
        assert con.execute("SELECT count(*) FROM set_members").fetchone() == (0,)


def test_second_writer_gets_a_clear_error(store_dir):
    _captured(store_dir, n=6).close()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import metaql, time, sys
        con = metaql.connect({store_dir!r}); print("open", flush=True); time.sleep(30)""")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(metaql.IOException, match=r"open for writing by process \d+.*read_only=True"):
            metaql.connect(store_dir)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.e2e
def test_killed_capture_leaves_only_complete_shards_and_resumes(store_dir):
    script = textwrap.dedent(f"""
        import numpy as np, torch, torch.nn.functional as F, metaql, sys
        sys.path.insert(0, {os.getcwd()!r})
        from tests.models import MLP
        torch.manual_seed(0)
        model, x, y = MLP(), torch.randn(1600, 6), torch.randint(0, 3, (1600,))
        con = metaql.connect({store_dir!r})
        if con.execute("SELECT count(*) FROM samples").fetchone()[0] == 0:
            con.add_samples(np.arange(1600), "train", y.numpy(), x)
        with con.capture(model, checkpoint="c0", lr=0.1, shard_size=16) as cap:
            for i, part in enumerate(np.array_split(np.arange(1600), 200)):
                cap.backward(F.cross_entropy(model(x[part]), y[part]), part)
                if i == 20: print("going", flush=True)
        print("done", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "going"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with metaql.connect(store_dir) as con:
        assert [p.split(":")[0] for p in con.verify()] == ["checkpoint 'c0' is capturing"]   # killed mid-capture
        rows = con.execute("SELECT sum(rows) FROM shards WHERE kind='factors' AND layer='fc1'").fetchone()[0]
        assert rows is not None and rows % 16 == 0 and rows < 1600
        leftovers = [f for r, _, fs in os.walk(store_dir) for f in fs if f.endswith(".tmp")]
        assert leftovers == []
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "done" in out.stdout, out.stderr
    with metaql.connect(store_dir) as con:
        ids = con.store.stored_ids("c0", "fc1")
        assert len(ids) == 1600 and len(np.unique(ids)) == 1600
        assert con.execute("SELECT status FROM checkpoints").fetchone() == ("complete",)
        assert con.verify() == []


def test_capture_memory_is_bounded_by_the_shard_size(store_dir):
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(3000, 6), torch.randint(0, 3, (3000,))
    with metaql.connect(store_dir) as con:
        con.add_samples(np.arange(3000), "train", y.numpy(), x)
        peak = 0
        with con.capture(model, checkpoint="c0", shard_size=100) as cap:
            for part in np.array_split(np.arange(3000), 100):
                cap.backward(F.cross_entropy(model(x[part]), y[part]), part)
                peak = max(peak, sum(len(i) for i in cap.writer.ids))
        assert peak < 100
        assert con.execute("SELECT max(rows), count(*) FROM shards WHERE kind='factors' AND layer='fc1'").fetchone()[0] < 100 + 30


@pytest.mark.parametrize("dtype, tolerance", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_half_precision_storage(store_dir, dtype, tolerance):
    from tests.bruteforce import rel_err, stored_full
    torch.manual_seed(0)
    model, x, y = MLP(din=6, hidden=32), torch.randn(20, 6), torch.randint(0, 3, (20,))
    fulls = {}
    for mode in ("float32", dtype):
        with metaql.connect(store_dir + mode) as con:
            con.add_samples(np.arange(20), "train", y.numpy(), x)
            with con.capture(model, checkpoint="c0", dtype=mode) as cap:
                cap.backward(F.cross_entropy(model(x), y), np.arange(20))
            fulls[mode] = stored_full(con.store, "c0", "fc1", np.arange(20))[1]
            fulls[mode + "_bytes"] = con.execute("SELECT sum(bytes)::BIGINT FROM shards WHERE layer='fc1'").fetchone()[0]
    assert rel_err(fulls[dtype], fulls["float32"]) < tolerance
    assert fulls[dtype + "_bytes"] < 0.75 * fulls["float32_bytes"]


def test_nan_batches_are_refused_and_store_nothing(store_dir):
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(8, 6), torch.randint(0, 3, (8,))
    with metaql.connect(store_dir) as con:
        con.add_samples(np.arange(8), "train", y.numpy(), x)
        with con.capture(model, checkpoint="c0", shard_size=4) as cap:
            cap.backward(F.cross_entropy(model(x[:4]), y[:4]), np.arange(4))
            bad = x[4:].clone()
            bad[1, 2] = float("inf")    # the loss stays finite (tanh saturates), the factors do not
            with pytest.raises(metaql.InvalidInputException, match="NaN or infinite"):
                cap.backward(F.cross_entropy(model(bad), y[4:]), np.arange(4, 8))
        assert sorted(con.store.stored_ids("c0", "fc1")) == [0, 1, 2, 3]
        assert con.verify() == []
