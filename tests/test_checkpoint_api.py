"""con.checkpoint (issue #17): a checkpoint's weights registered for replay without capturing;
replay and INFLUENCE on it equal brute force at exactly those weights."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metaql
from tests.bruteforce import per_sample_grads, rel_err
from tests.models import MLP


def _flat(grads):
    return torch.cat([v.reshape(v.shape[0], -1) for v in grads.values()], dim=1).double()


def _train(model, x, y, steps=5):
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_checkpoint_then_replay_equals_bruteforce():
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(14, 6), torch.randint(0, 3, (14,))
    train, test = np.arange(10), np.arange(10, 14)
    with metaql.connect(":memory:") as con:
        con.add_samples(train, "train", y[:10].numpy(), x[:10])
        con.add_samples(test, "test", y[10:].numpy(), x[10:])
        _train(model, x[:10], y[:10])
        row = con.checkpoint(model, "final", lr=0.05, epoch=1, step=5)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        assert (row["status"], row["epoch"], row["step"]) == ("complete", 1, 5)
        assert con.store.layers() == [] and con.verify() == []
        _train(model, x[:10], y[:10])      # training goes on: the checkpoint keeps the weights it saved
        assert con.replay("final", "train") == 10
        got = con.execute("SELECT sample_id, score FROM INFLUENCE(query=batch(test)) ORDER BY sample_id").fetchnumpy()
        self_inf = con.execute("SELECT score FROM SELF_INFLUENCE() ORDER BY sample_id").fetchnumpy()["score"]
    model.load_state_dict(saved)
    g = _flat(per_sample_grads(model, x[:10], y[:10]))
    gq = _flat(per_sample_grads(model, x[10:], y[10:])).mean(0)
    assert list(got["sample_id"]) == list(range(10))
    assert rel_err(torch.from_numpy(got["score"]), 0.05 * g @ gq) < 1e-5
    assert rel_err(torch.from_numpy(self_inf), 0.05 * (g * g).sum(1)) < 1e-5


def test_checkpoint_name_taken_or_not_a_model():
    with metaql.connect(":memory:") as con:
        con.checkpoint(MLP(), "c0", lr=0.1)
        with pytest.raises(metaql.CatalogException, match="'c0' already exists"):
            con.checkpoint(MLP(), "c0", lr=0.1)
        with pytest.raises(metaql.InvalidInputException, match="takes a torch.nn.Module"):
            con.checkpoint({"weight": 1}, "c1", lr=0.1)
        assert [c["name"] for c in con.store.checkpoints()] == ["c0"]


def test_replay_is_idempotent_across_overlapping_layer_sets():
    """Replaying [fc1] and then [fc1, fc2] stored fc1's rows twice on the old code: SELF_INFLUENCE came
    out exactly 2x on fc1 and verify() said nothing. Now each layer stores only the ids it lacks."""
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(10, 6), torch.randint(0, 3, (10,))
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(10), "train", y.numpy(), x)
        con.checkpoint(model, "c0", lr=1.0)
        assert con.replay("c0", "train", layers=["fc1"]) == 10
        con.replay("c0", "train", layers=["fc1", "fc2"])
        con.replay("c0", "train", layers=["fc1", "fc2"])            # again: nothing new to store
        assert sorted(con.store.stored_ids("c0", "fc1")) == list(range(10))
        assert sorted(con.store.stored_ids("c0", "fc2")) == list(range(10))
        assert con.verify() == []
        got = con.execute("SELECT score FROM SELF_INFLUENCE() ORDER BY sample_id").fetchnumpy()["score"]
    g = _flat(per_sample_grads(model, x, y))
    assert rel_err(torch.from_numpy(got), (g * g).sum(1)) < 1e-5


def test_shards_record_which_weights_computed_their_factors():
    """Capture stores each sample's factors at the weights of the batch it came in (they move
    after every step); replay at the checkpoint's own. Each shard records which (issue #17)."""
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(12, 6), torch.randint(0, 3, (12,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(12), "train", y.numpy(), x)
        with con.capture(model, layers=["fc1"], checkpoint="live", lr=0.1, shard_size=4) as cap:
            for b in range(3):
                rows = slice(4 * b, 4 * b + 4)
                cap.backward(F.cross_entropy(model(x[rows]), y[rows]), np.arange(12)[rows])
                opt.step()
                opt.zero_grad()
        con.checkpoint(model, "after", lr=0.1)
        con.replay("after", "train", layers=["fc1"])
        seen = con.sql("SELECT checkpoint, min_id, seen_from_batch, seen_to_batch FROM shards "
                       "WHERE kind = 'factors' ORDER BY checkpoint DESC, min_id").fetchall()
        assert seen[:3] == [("live", 0, 0, 0), ("live", 4, 1, 1), ("live", 8, 2, 2)]
        assert {(r[2], r[3]) for r in seen[3:]} == {(None, None)}
        shown = con.execute("SHOW CHECKPOINTS").df().set_index("name")["factors_from"].to_dict()
    assert shown == {"live": "training batches 0-2 after these weights", "after": "these weights (replay)"}


def test_a_model_in_data_parallel_is_captured_and_replayed_as_the_model_itself():
    """nn.DataParallel on one device (or none) calls its module: on the old code its layers were
    stored as 'module.fc1' with weights that no replay could load into the model's factory."""
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(10, 6), torch.randint(0, 3, (10,))
    wrapped = torch.nn.DataParallel(model)
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(8), "train", y[:8].numpy(), x[:8])
        con.add_samples(np.arange(8, 10), "test", y[8:].numpy(), x[8:])
        with con.capture(wrapped, checkpoint="c", lr=1.0, factory="tests.models:MLP", kwargs=model.metaql_config) as cap:
            cap.backward(F.cross_entropy(wrapped(x[:8]), y[:8]), np.arange(8))
        con.checkpoint(wrapped, "later", lr=1.0, factory="tests.models:MLP", kwargs=model.metaql_config)
        con.replay("later", "train")
        assert sorted(r[0] for r in con.execute("SELECT name FROM layers").fetchall()) == ["fc1", "fc2"]
        got = con.execute("SELECT score FROM INFLUENCE(query=batch(test), checkpoints=[later]) "
                          "ORDER BY sample_id").fetchnumpy()["score"]
    g = _flat(per_sample_grads(model, x, y))
    assert rel_err(torch.from_numpy(got), g[:8] @ g[8:].mean(0)) < 1e-5


def test_data_parallel_over_several_devices_is_refused():
    wrapped = torch.nn.DataParallel(MLP())
    wrapped.device_ids = [0, 1]          # as on a two-GPU machine: replicas in threads
    with metaql.connect(":memory:") as con:
        with pytest.raises(metaql.InvalidInputException, match="DataParallel over 2 devices"):
            con.capture(wrapped, checkpoint="c", lr=1.0)
