"""DROP CHECKPOINT / con.drop_checkpoint, and con.verify(repair=True) for a damaged shard."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metaql
from metaql.storage import durable
from tests.models import MLP


# the pending rows of checkpoint c0's files: its folders and its weights (a shard's random hex suffix
# may itself hold 'c0', and add_samples' inputs row stays pending until the next open)
PENDING_C0 = ("SELECT count(*) FROM pending_files WHERE file LIKE 'tensors/c0/%' OR file LIKE 'activations/c0/%' "
              "OR file = 'weights/c0.safetensors'")


def _captured(store_dir, names=("c0", "c1"), n=12):
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(n, 6), torch.randint(0, 3, (n,))
    con = metaql.connect(store_dir)
    con.add_samples(np.arange(n), "train", y.numpy(), x)
    for name in names:
        _capture(con, model, x, y, name)
    con.attach_model(model)
    return con, model, x, y


def _capture(con, model, x, y, name):
    with con.capture(model, checkpoint=name, lr=0.1, shard_size=4) as cap:
        for part in np.array_split(np.arange(len(x)), 3):
            cap.backward(F.cross_entropy(model(x[part]), y[part]), part)


def _files(root, name):
    return sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*")
                  if p.is_file() and (f"/{name}/" in p.as_posix() or p.name == f"{name}.safetensors"))


def test_drop_checkpoint_removes_its_rows_and_files_and_a_capture_of_that_name_starts_afresh(store_dir):
    con, model, x, y = _captured(store_dir)
    assert _files(store_dir, "c0")
    assert con.execute("DROP CHECKPOINT c0").fetchall() == [("dropped checkpoint c0",)]
    assert [c["name"] for c in con.store.checkpoints()] == ["c1"]
    for table in ("shards", "sample_norms"):
        assert con.execute(f"SELECT count(*) FROM {table} WHERE checkpoint = 'c0'").fetchone() == (0,)
    assert con.execute(PENDING_C0).fetchone() == (0,)
    assert _files(store_dir, "c0") == [] and not (Path(store_dir) / "tensors" / "c0").exists()
    assert con.verify() == []
    assert con.execute("DROP CHECKPOINT IF EXISTS c0").fetchall() == [("no checkpoint c0: nothing dropped",)]
    with pytest.raises(metaql.CatalogException, match="unknown checkpoint 'c11'. Did you mean 'c1'"):
        con.execute("DROP CHECKPOINT c11")
    _capture(con, model, x, y, "c0")            # the same name again: a new checkpoint, after c1
    assert [(c["name"], c["ordinal"], c["status"]) for c in con.store.checkpoints()] == \
        [("c1", 1, "complete"), ("c0", 2, "complete")]
    assert con.execute("SELECT count(*) FROM SELF_INFLUENCE()").fetchone() == (12,)
    con.drop_checkpoint("c1")
    assert con.execute("SELECT count(*) FROM SELF_INFLUENCE(checkpoints=last)").fetchone() == (12,)
    con.close()


def test_drop_checkpoint_ends_the_warning_of_a_partial_checkpoint(store_dir):
    con, model, x, y = _captured(store_dir, names=("c0",))
    with pytest.raises(RuntimeError):
        with con.capture(model, checkpoint="bad2", lr=0.1) as cap:
            cap.backward(F.cross_entropy(model(x[:4]), y[:4]), np.arange(4))
            raise RuntimeError("refused batch")
    with pytest.warns(metaql.Warning, match=r"left out checkpoint 'bad2' \(partial\).*DROP CHECKPOINT bad2"):
        con.execute("SELECT * FROM SELF_INFLUENCE()")
    con.execute("DROP CHECKPOINT bad2")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        con.execute("SELECT * FROM SELF_INFLUENCE()")
    con.close()


def test_drop_checkpoint_is_refused_during_its_capture_and_on_a_read_only_store(store_dir):
    con, model, x, y = _captured(store_dir, names=("c0",))
    with con.capture(model, checkpoint="c1", lr=0.1) as cap:
        cap.backward(F.cross_entropy(model(x[:4]), y[:4]), np.arange(4))
        with pytest.raises(metaql.InvalidInputException, match="'c1' is being captured"):
            con.execute("DROP CHECKPOINT c1")
    con.close()
    with metaql.connect(store_dir, read_only=True) as ro:
        with pytest.raises(metaql.IOException, match="read-only"):
            ro.execute("DROP CHECKPOINT c0")
        with pytest.raises(metaql.IOException, match="read-only"):
            ro.drop_checkpoint("c0")
    with metaql.connect(store_dir) as con:
        assert [c["name"] for c in con.store.checkpoints()] == ["c0", "c1"]


def test_files_of_a_drop_killed_after_its_commit_are_deleted_on_the_next_open(store_dir, monkeypatch):
    con, *_ = _captured(store_dir)
    files = _files(store_dir, "c0")

    def killed(root, rels):
        raise KeyboardInterrupt     # the process dies after the catalog committed, before any file went
    monkeypatch.setattr(durable, "remove_own", killed)
    with pytest.raises(KeyboardInterrupt):
        con.drop_checkpoint("c0")
    monkeypatch.undo()
    assert all((Path(store_dir) / f).exists() for f in files)
    assert con.execute(PENDING_C0).fetchone() == (len(files),)
    con.close()
    with metaql.connect(store_dir) as con:
        assert _files(store_dir, "c0") == [] and con.verify() == []
        assert [c["name"] for c in con.store.checkpoints()] == ["c1"]


def test_verify_repair_drops_a_corrupt_shard_and_replay_refills_exactly_its_ids(store_dir):
    con, model, x, y = _captured(store_dir, names=("c0",))
    rel = con.execute("SELECT file FROM shards WHERE kind = 'factors' AND layer = 'fc1' ORDER BY shard_id "
                      "LIMIT 1 OFFSET 1").fetchone()[0]
    lost = con.store.stored_ids("c0", "fc1")[4:8].tolist()
    con.close()
    with open(os.path.join(store_dir, rel), "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xfe\xfd\xfc")
    con = metaql.connect(store_dir)
    con.attach_model(model)
    with pytest.raises(metaql.IOException, match=r"corrupt \(checksum mismatch\); con.verify\(repair=True\)"):
        con.execute("SELECT * FROM SELF_INFLUENCE()")
    report = con.verify(repair=True)
    assert report[0].startswith(f"repaired: {rel} (checkpoint 'c0' layer 'fc1')")
    assert "checkpoint 'c0' is partial: con.verify(repair=True) dropped the damaged shards holding 4" in report[1]
    assert not os.path.exists(os.path.join(store_dir, rel))
    assert sorted(set(range(12)) - set(con.store.stored_ids("c0", "fc1").tolist())) == sorted(lost)
    assert con.replay("c0") == 4            # exactly the dropped ids, for the layer that lost them
    assert con.verify() == [] and con.store.checkpoint("c0")["status"] == "complete"
    assert sorted(con.store.stored_ids("c0", "fc1").tolist()) == list(range(12))
    assert con.execute("SELECT count(*) FROM SELF_INFLUENCE()").fetchone() == (12,)
    con.close()


def test_verify_repair_then_the_same_capture_run_again_refills_the_ids(store_dir):
    con, model, x, y = _captured(store_dir, names=("c0",))
    rel = con.execute("SELECT file FROM shards WHERE kind = 'factors' AND layer = 'fc2' ORDER BY shard_id "
                      "LIMIT 1").fetchone()[0]
    os.remove(os.path.join(store_dir, rel))
    assert any(p.startswith("repaired: ") for p in con.verify(repair=True))
    _capture(con, model, x, y, "c0")        # resumed: stores what fc2 lost, and completes c0
    assert con.verify() == []
    assert sorted(con.store.stored_ids("c0", "fc2").tolist()) == list(range(12))
    con.close()


def test_repair_is_refused_inside_the_checkpoints_capture_and_a_capture_that_misses_dropped_ids_stays_partial(
        store_dir):
    """verify(repair=True) inside the checkpoint's own capture let its exit mark it complete with
    holes; and a capture ending complete while a repair's samples are still missing hid them."""
    con, model, x, y = _captured(store_dir, names=("c0",))
    rel = con.execute("SELECT file FROM shards WHERE layer = 'fc1' ORDER BY shard_id LIMIT 1").fetchone()[0]
    os.remove(os.path.join(store_dir, rel))
    with pytest.warns(metaql.Warning, match="saw no batch"):
        with con.capture(model, checkpoint="c0", lr=0.1):
            with pytest.raises(metaql.InvalidInputException, match="'c0' is being captured"):
                con.verify(repair=True)
    assert any(p.startswith("repaired: ") for p in con.verify(repair=True))
    with con.capture(model, checkpoint="c0", lr=0.1) as cap:        # sees only 8..11, not the lost 0..3
        cap.backward(F.cross_entropy(model(x[8:]), y[8:]), np.arange(8, 12))
    assert con.store.checkpoint("c0")["status"] == "partial"
    _capture(con, model, x, y, "c0")
    assert con.store.checkpoint("c0")["status"] == "complete" and con.verify() == []
    con.close()


def test_a_shard_whose_ids_nothing_tells_keeps_its_checkpoint_partial_until_as_many_are_stored(store_dir):
    """With the file gone and no norms naming it, the repair recorded no ids, and any replay then
    marked the checkpoint complete with the shard's samples still missing."""
    con, model, x, y = _captured(store_dir, names=("c0",))
    rel = con.execute("SELECT file FROM shards WHERE layer = 'fc1' ORDER BY shard_id LIMIT 1 OFFSET 1").fetchone()[0]
    con.execute("CREATE SET few AS SELECT sample_id FROM samples WHERE sample_id < 2")
    con.close()
    os.remove(os.path.join(store_dir, rel))
    with metaql.connect(store_dir) as con:
        con.store.db.execute("DELETE FROM sample_norms WHERE file = ?", [rel])   # a store from before norms
        report = con.verify(repair=True)
        assert "4 samples whose ids could not be read" in report[1]
        con.attach_model(model)
        con.replay("c0", "few")                       # stores nothing fc1 lacks: still partial
        assert con.store.checkpoint("c0")["status"] == "partial"
        assert con.replay("c0") == 4
        assert con.store.checkpoint("c0")["status"] == "complete" and con.verify() == []


def test_drop_checkpoint_removes_a_distributed_captures_part_stores(store_dir):
    """A later capture of the name resumed the dropped run's other ranks from STORE.ranks/<name>."""
    from metaql.distributed.ddp import part_dir
    con, *_ = _captured(store_dir, names=("c0",))
    part = part_dir(Path(con.store.root), "c0", 1)
    part.mkdir(parents=True)
    (part / "catalog.duckdb").write_text("a rank's part store")
    con.drop_checkpoint("c0")
    assert not part.parent.exists()
    con.close()


def test_an_empty_remote_store_is_named_by_its_address(store_dir):
    metaql.connect(store_dir).close()
    with metaql.connect("file://" + str(store_dir)) as con:
        with pytest.raises(metaql.CatalogException, match=r"the store file://.* has no captured layers"):
            con.execute("SELECT * FROM SELF_INFLUENCE()")
