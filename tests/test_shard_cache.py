"""Open shards stay open between statements (storage/store.py SHARD_CACHE) without a file
descriptor each (storage/tensorfile.Shard). With 16 kept, every statement over a store of more
shards reopened and faulted in every one: 1.27 s of a MiniLM index TOPK's rescoring at N = 3,000."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

import metaql
from metaql.storage import tensorfile
from tests.models import SeqModel

STMT = "SELECT sample_id, score FROM INFLUENCE(layers=*, query=batch(test))"


def _many_shards(tmp_path, shards_per_layer=8):
    torch.manual_seed(0)
    model = SeqModel(6, 6, 3)
    n, size = 8 * shards_per_layer, 8
    x, y = torch.randn(n + 4, 3, 6), torch.randint(0, 3, (n + 4,))
    ids = np.arange(n + 4)
    con = metaql.connect(str(tmp_path / "store"), config={"progress": False})
    con.add_samples(ids[:n], "train", y[:n].numpy(), x[:n])
    con.add_samples(ids[n:], "test", y[n:].numpy(), x[n:])
    with con.capture(model, layers="*", checkpoint="c0", lr=0.5, shard_size=size, factory="tests.models:SeqModel",
                     kwargs=model.metaql_config) as cap:
        for lo in range(0, n, size):
            cap.backward(F.cross_entropy(model(x[lo:lo + size]), y[lo:lo + size]), ids[lo:lo + size])
    return con


def test_a_second_statement_opens_no_shard_and_holds_no_descriptors(tmp_path, monkeypatch):
    con = _many_shards(tmp_path)
    shards = con.execute("SELECT count(*) FROM shards WHERE kind = 'factors'").fetchone()[0]
    assert shards > 16                       # more than the old cache held
    opened = []
    real = tensorfile.Shard.__init__
    monkeypatch.setattr(tensorfile.Shard, "__init__", lambda self, path: (opened.append(path), real(self, path))[1])
    fds = len(os.listdir("/proc/self/fd"))
    first = con.execute(STMT).fetchall()
    assert len([p for p in opened if "tensors" in p.parts]) == shards        # and the query's input shards
    assert len(os.listdir("/proc/self/fd")) < fds + 8          # not one descriptor per open shard
    opened.clear()
    assert con.execute(STMT).fetchall() == first
    assert [p for p in opened if "tensors" in p.parts] == []      # the first statement's are still open
    con.close()
