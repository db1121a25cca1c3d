"""The capture's per-step fast path (issue #19): factors the caller can still change are copied and
the kind's own results are not; one set test for ids no layer has seen, and each layer's own ids
when some layer has seen them (a resumed capture, a second epoch before the flush)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaql


class KeepsActivation(nn.Module):
    """Keeps its hidden activation (fc2's input) where the caller can reach it after the step."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        self.h = torch.relu(self.fc1(x))
        return self.fc2(self.h)


def _data(n=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _factors(con, checkpoint, layer):
    parts = [con.store.shard_tensors(r) for r in con.store.factor_shards(checkpoint, layer)]
    ids = np.concatenate([p[0] for p in parts])
    order = torch.from_numpy(np.argsort(ids))
    return np.sort(ids), {k: torch.cat([p[1][k] for p in parts])[order] for k in parts[0][1]}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_inputs_and_gradients_the_caller_changes_after_the_step_are_stored_as_they_were(reduction):
    """fc1's input is the caller's batch and fc2's the model's kept activation: both are changed in
    place after cap.backward, before the flush; with reduction='sum' fc2's D is the very gradient
    autograd handed to the hook. The stored rows are those of the step."""
    torch.manual_seed(0)
    model, (x, y) = KeepsActivation(), _data()
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(16), "train", y.numpy(), x)
        expected = {}
        with con.capture(model, layers="*", checkpoint="c0", shard_size=16, storage="factored") as cap:
            for s in (0, 8):
                xb = x[s:s + 8].clone()
                loss = F.cross_entropy(model(xb), y[s:s + 8], reduction=reduction)
                cap.backward(loss, np.arange(s, s + 8), reduction=reduction)
                expected[s] = (xb.clone(), model.h.detach().clone())
                xb.mul_(0)
                model.h.detach().mul_(0)
        ids, fc1 = _factors(con, "c0", "fc1")
        _, fc2 = _factors(con, "c0", "fc2")
        assert ids.tolist() == list(range(16))
        assert torch.equal(fc1["X"][:, 0], torch.cat([expected[0][0], expected[8][0]]))
        assert torch.equal(fc2["X"][:, 0], torch.cat([expected[0][1], expected[8][1]]))
        assert fc2["D"].abs().sum() > 0


def test_each_layer_stores_the_ids_it_lacks_when_another_layer_holds_them():
    """A checkpoint captured for fc1 alone, then for every layer: fc1 skips what it holds, fc2
    stores every id; a second epoch inside one capture (before its flush) stores nothing twice."""
    torch.manual_seed(0)
    model, (x, y) = KeepsActivation(), _data()
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(16), "train", y.numpy(), x)
        with con.capture(model, layers=["fc1"], checkpoint="c0", storage="factored") as cap:
            cap.backward(F.cross_entropy(model(x[:8]), y[:8]), np.arange(8))
        first = _factors(con, "c0", "fc1")[1]["X"]
        with pytest.warns(metaql.Warning, match="already captured for checkpoint 'c0' earlier in this capture"), \
                con.capture(model, layers="*", checkpoint="c0", shard_size=1000, storage="factored") as cap:
            for epoch in range(2):
                for s in (0, 8):
                    cap.backward(F.cross_entropy(model(x[s:s + 8]) * (1 + epoch), y[s:s + 8]), np.arange(s, s + 8))
        for layer in ("fc1", "fc2"):
            ids, fs = _factors(con, "c0", layer)
            assert ids.tolist() == list(range(16)), layer      # each id once per layer
        ids, fs = _factors(con, "c0", "fc1")
        assert torch.equal(fs["X"][:8], first)                  # the first capture's rows stay
        assert torch.equal(fs["X"][8:, 0], x[8:])


def test_repeated_ids_in_one_batch_are_refused_with_the_ids():
    model, (x, y) = KeepsActivation(), _data()
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(16), "train", y.numpy(), x)
        with con.capture(model, layers="*", checkpoint="c0") as cap:
            with pytest.raises(metaql.InvalidInputException, match=r"sample ids \[3\] repeat within one batch"):
                cap.backward(F.cross_entropy(model(x[:4]), y[:4]), [1, 3, 3, 5])
            cap.backward(F.cross_entropy(model(x[:4]), y[:4]), [0, 1, 2, 3])
        assert con.store.stored_ids("c0", "fc1").tolist() == [0, 1, 2, 3]
