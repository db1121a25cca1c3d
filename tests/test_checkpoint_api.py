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
