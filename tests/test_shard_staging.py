"""A flush stages every layer's shard file (written to its temporary name, CRC32 taken as the bytes
are written, disk write started) before it makes any durable and renames it into place, so the disk
writes while the writer serializes the other layers and computes their norms."""
import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import metaql
from metaql.storage import tensorfile
from tests.models import MLP

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64]


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 9), shape=st.lists(st.integers(1, 5), min_size=0, max_size=3),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_checksum_taken_while_writing_equals_the_files_and_the_shard_reads_back(tmp_path_factory, rows, shape,
                                                                                 dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(rows, *shape, generator=g) * 100).to(dtype)
    path = tmp_path_factory.mktemp("s") / "f" / "shard.arrow"
    nbytes, checksum = tensorfile.write_shard(path, np.arange(rows) * 7, {"T": t, "U": t[:, None]})
    assert checksum == tensorfile.file_checksum(path) and nbytes == path.stat().st_size
    assert not tensorfile.temp_path(path).exists()
    shard = tensorfile.Shard(path)
    assert shard.ids.tolist() == (np.arange(rows) * 7).tolist()
    assert torch.equal(shard.tensor("T"), t) and torch.equal(shard.tensor("U"), t[:, None])


def test_a_flush_stages_every_layers_file_before_publishing_any(store_dir, monkeypatch):
    import metaql.storage.store as store_module
    events = []
    real_stage, real_publish = store_module.stage_shard, tensorfile.StagedShard.publish

    def stage(path, *args, **kwargs):
        events.append(("stage", path.name))
        return real_stage(path, *args, **kwargs)

    def publish(self):      # a flush's files (other files, e.g. the inputs', are written whole by write_shard)
        if ("stage", self.path.name) in events:
            assert self.tmp.exists() and not self.path.exists()
            events.append(("publish", self.path.name))
        real_publish(self)
    monkeypatch.setattr(store_module, "stage_shard", stage)
    monkeypatch.setattr(tensorfile.StagedShard, "publish", publish)
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(8, 6), torch.randint(0, 3, (8,))
    with metaql.connect(store_dir) as con:
        con.add_samples(np.arange(8), "train", y.numpy(), x)
        with con.capture(model, checkpoint="c0", lr=0.1, shard_size=8) as cap:
            cap.backward(F.cross_entropy(model(x), y), np.arange(8))
        assert [e[0] for e in events] == ["stage", "stage", "publish", "publish"]
        assert {e[1] for e in events if e[0] == "stage"} == {e[1] for e in events if e[0] == "publish"}
        assert con.verify() == []
        assert sorted(con.store.stored_ids("c0", "fc1")) == list(range(8))
