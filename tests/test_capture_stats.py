"""cap.stats says what a capture did and how long training waited for its writer thread; a capture
whose training waited a noticeable share of its time for the writer says so when it ends."""
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metaql
from metaql.storage import capture as capture_module
from tests.models import MLP


def _capture(con, model, x, y, checkpoint, shard_size=8, steps=4):
    with con.capture(model, checkpoint=checkpoint, lr=0.1, shard_size=shard_size) as cap:
        for part in np.array_split(np.arange(len(x)), steps):
            cap.backward(F.cross_entropy(model(x[part]), y[part]), part)
        during = dict(cap.stats)
    return cap, during


def test_stats_count_the_capture_and_a_quick_writer_is_not_reported(store_dir):
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(32, 6), torch.randint(0, 3, (32,))
    with metaql.connect(store_dir) as con:
        con.add_samples(np.arange(32), "train", y.numpy(), x)
        with warnings.catch_warnings():
            warnings.simplefilter("error", metaql.Warning)
            cap, during = _capture(con, model, x, y, "c0")
        st = cap.stats
        assert (st["batches"], st["samples"], st["flushes"]) == (4, 32, 4)
        # every factor of both layers: fc1 (6 inputs + 5 outputs) and fc2 (5 + 3) per sample, float32
        assert st["factor_bytes"] == 32 * 4 * ((6 + 5) + (5 + 3))
        assert 0 <= st["writer_wait_s"] <= st["seconds"] and st["writer_busy_s"] > 0
        assert during["batches"] == 4 and during["seconds"] <= st["seconds"]
        time.sleep(0.05)
        assert cap.stats["seconds"] == st["seconds"]          # frozen once the capture ended


def test_a_capture_that_waited_for_its_writer_warns_with_the_figures(store_dir, monkeypatch):
    import metaql.storage.store as store_module
    real = store_module.stage_shard

    def slow_disk(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.15)
        return real(*args, **kwargs)
    monkeypatch.setattr(store_module, "stage_shard", slow_disk)
    monkeypatch.setattr(capture_module, "WRITER_WAIT_WARN_S", 0.1)
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(32, 6), torch.randint(0, 3, (32,))
    with metaql.connect(store_dir) as con:
        con.add_samples(np.arange(32), "train", y.numpy(), x)
        with pytest.warns(metaql.Warning, match=r"training waited .* for the capture's writer thread.*dtype='float16'"):
            cap, _ = _capture(con, model, x, y, "c0", shard_size=4, steps=8)
        assert cap.stats["writer_wait_s"] > 0.1 and cap.stats["flushes"] == 8
        assert con.verify() == []


def test_a_capture_that_saw_no_batch_says_so(store_dir):
    """A loop that calls loss.backward() instead of cap.backward() trained and stored nothing,
    and the capture ended as if all was well."""
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(8, 6), torch.randint(0, 3, (8,))
    with metaql.connect(store_dir) as con:
        con.add_samples(np.arange(8), "train", y.numpy(), x)
        with pytest.warns(metaql.Warning, match=r"saw no batch.*cap\.backward\(loss, ids\)"):
            with con.capture(model, checkpoint="c0", lr=0.1):
                F.cross_entropy(model(x), y).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error", metaql.Warning)
            _capture(con, model, x, y, "c1")
