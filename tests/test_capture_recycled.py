"""The capture's per-step copies (issue #19): they go into tensors an earlier flush is done with,
not into new memory (a new page costs a fault: on the digits CNN 300 us for a 512 KiB copy against
30 us into memory touched before), and the gradient factors are scaled into them; the stored
factors are the same bits as with copies into new memory, and an overflow of the scaling is refused."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaql
from metaql.storage import capture as capture_module
from tests.test_capture_writer import SmallCNN, _data, _stored


class SharedInput(nn.Module):
    """Two linear layers read the same input (stored once, as Q/K/V projections are) and conv and
    linear layers: every buffered form a recycled copy can take."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.a, self.b = nn.Linear(4 * 16, 5), nn.Linear(4 * 16, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1)
        return self.head(torch.relu(self.a(h)) * torch.tanh(self.b(h)))


def _capture(model_factory, x, y, background, batch=4, shard_size=8, reduction="mean", storage=None):
    torch.manual_seed(0)
    model = model_factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    con = metaql.connect(":memory:")
    con.add_samples(np.arange(len(x)), "train", y.numpy(), x)
    with con.capture(model, layers="*", checkpoint="c0", lr=0.1, shard_size=shard_size, background=background,
                     storage=storage) as cap:
        for s in range(0, len(x), batch):
            xb = x[s:s + batch].clone()
            cap.backward(F.cross_entropy(model(xb), y[s:s + batch], reduction=reduction),
                         np.arange(s, min(s + batch, len(x))), reduction=reduction)
            xb.mul_(0)        # the caller reuses its input buffer
            opt.step()
            opt.zero_grad()
    return con


def test_a_written_flushs_copies_take_the_next_batches_rows(monkeypatch):
    """Inline (the flush in this thread, so the order is fixed): the batches after the first flush
    copy into the tensors that flush gave back. Before, every copy was new memory."""
    given = set()
    original = capture_module._Recycled.give_back

    def give_back(self, tensors, flush=False):
        tensors = list(tensors)
        given.update(t.data_ptr() for t in tensors)
        return original(self, tensors, flush)
    monkeypatch.setattr(capture_module._Recycled, "give_back", give_back)
    x, y = _data(24)
    torch.manual_seed(0)
    model = SmallCNN()
    con = metaql.connect(":memory:")
    con.add_samples(np.arange(24), "train", y.numpy(), x)
    with con.capture(model, layers="*", checkpoint="c0", lr=0.1, shard_size=8, background=False) as cap:
        for s in range(0, 12, 4):
            cap.backward(F.cross_entropy(model(x[s:s + 4]), y[s:s + 4]), np.arange(s, s + 4))
        third = {t.data_ptr() for _, ts, _ in cap.writer.batches[-1].values() if not isinstance(ts, capture_module._FullRows)
                 for t in ([ts.block] if isinstance(ts, capture_module._Packed) else ts.values())}
    con.close()
    # conv2 (I, DO) and fc (X, D) are factored and settled after the first batch: one block (packed)
    # holds their four factors, in memory the first flush gave back
    assert len(third) == 1 and third <= given, "the batch after a flush copied into new memory"
    assert not cap.writer.recycled._free, "a closed capture keeps a flush's worth of copies alive"


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("background", [False, True])
def test_recycled_copies_store_the_same_bits_as_new_ones(monkeypatch, reduction, background):
    """Six flushes through recycled tensors (a shared suffix among them) against the same capture
    whose copies are all new (give_back a no-op): every stored factor equal bit for bit."""
    x, y = _data(48)
    recycled = _stored(_capture(SharedInput, x, y, background, reduction=reduction, storage="factored"))
    monkeypatch.setattr(capture_module._Recycled, "give_back", lambda self, tensors, flush=False: None)
    fresh = _stored(_capture(SharedInput, x, y, background, reduction=reduction, storage="factored"))
    assert recycled.keys() == fresh.keys() and len(recycled) == 4
    for layer, (ids, tensors, _) in recycled.items():
        assert np.array_equal(ids, fresh[layer][0]) and ids.tolist() == list(range(48))
        for k, t in tensors.items():
            assert torch.equal(t, fresh[layer][1][k]), (layer, k)


def test_the_scaling_done_in_the_copy_equals_scaling_the_gradients():
    """The mean loss's gradients are multiplied back by the batch size in the copy the buffer keeps
    (LayerKind.gradient_factors): the stored D is the hooks' gradient times the batch size."""
    x, y = _data(8)
    torch.manual_seed(0)
    model = SharedInput()
    seen = {}
    con = metaql.connect(":memory:")
    con.add_samples(np.arange(8), "train", y.numpy(), x)
    with con.capture(model, layers="*", checkpoint="c0", lr=0.1, shard_size=8, storage="factored") as cap:
        def keep(module, grad_input, grad_output):
            seen["D"] = grad_output[0].clone()
        out = model.head.register_full_backward_hook(keep)
        cap.backward(F.cross_entropy(model(x), y), np.arange(8))
        out.remove()
    stored = _stored(con)["head"][1]["D"]
    assert torch.equal(stored[:, 0], seen["D"] * 8.0)


def test_gradients_that_overflow_once_scaled_are_refused():
    """Finite gradients of the mean loss that overflow once multiplied back by the batch size: the
    flush is refused (raised at the latest when the capture exits) and nothing of it is stored.
    Here d loss / d out = (1/4) * 1e19 * 1e20 = 2.5e38 per sample, finite, and 4 times that is not."""
    model = nn.Sequential(nn.Linear(3, 2))
    lin = model[0]
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    x = torch.ones(4, 3)
    con = metaql.connect(":memory:")
    con.add_samples(np.arange(4), "train", np.zeros(4, dtype=np.int64), x)
    with pytest.raises(metaql.InvalidInputException, match="overflow"):
        with con.capture(model, layers="*", checkpoint="c0", lr=0.1, shard_size=4, storage="factored") as cap:
            cap.backward((model(x) * 1e20 * 1e19).sum(1).mean(), np.arange(4))
    assert not con.store.factor_shards("c0", None)
    con.close()


def _epoch_captures(con, model, x, y, checkpoints):
    """One capture per checkpoint, each an epoch in one flush (the shard larger than the epoch)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for c in checkpoints:
        with con.capture(model, layers="*", checkpoint=c, lr=0.1, shard_size=1024) as cap:
            for s in range(0, len(x), 4):
                cap.backward(F.cross_entropy(model(x[s:s + 4]), y[s:s + 4]), np.arange(s, s + 4))
                opt.step()
                opt.zero_grad()


def test_a_capture_takes_the_copies_the_stores_last_capture_left(monkeypatch):
    """Issue #19: a capture per epoch whose epoch fits in one flush never reused a copy (it gave
    its copies back only at its end, and dropped them): every batch of every epoch copied into new
    memory, 7x the cost on the MLP. The next capture on the store now takes them: after the first
    epoch no batch allocates."""
    from metaql.demo import DigitsMLP
    x, y = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)), torch.randint(0, 10, (32,))
    con = metaql.connect(":memory:")
    con.add_samples(np.arange(32), "train", y.numpy(), x)
    new, empty = [], capture_module._Recycled._empty

    def counted(self, shape, dtype):
        new.append(not self._free.get((shape, dtype)))
        return empty(self, shape, dtype)
    monkeypatch.setattr(capture_module._Recycled, "_empty", counted)
    torch.manual_seed(0)
    model = DigitsMLP()
    _epoch_captures(con, model, x, y, ["c0"])
    first, new[:] = sum(new), []
    _epoch_captures(con, model, x, y, ["c1", "c2"])
    assert first >= 7 and sum(new) == 0


def test_the_copies_left_to_the_next_capture_are_bounded():
    recycled = capture_module._Recycled()
    recycled.give_back([recycled.block(1024, torch.float32) for _ in range(10)], flush=True)
    kept = recycled.trimmed(3 * 4096 + 100)
    assert kept is recycled and sum(len(f) for f in kept._free.values()) == 3
    assert capture_module._Recycled().trimmed(1 << 20) is None


def test_the_copies_kept_for_the_next_capture_go_with_the_store_and_stay_with_it_until_taken():
    """Found in review: closing the store did not drop them (a Capture the caller keeps holds the
    store), and a capture built but never entered, or a replay, took them and dropped them."""
    from metaql.demo import DigitsMLP
    x, y = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)), torch.randint(0, 10, (32,))
    con = metaql.connect(":memory:")
    con.add_samples(np.arange(32), "train", y.numpy(), x)
    model = DigitsMLP()
    _epoch_captures(con, model, x, y, ["c0"])
    kept = con.store._capture_copies
    assert kept is not None
    con.capture(model, layers="*", checkpoint="never_entered", lr=0.1)
    con.replay("c0", "train", layers=["fc1"])
    assert con.store._capture_copies is kept
    store = con.store
    con.close()
    assert store._capture_copies is None
