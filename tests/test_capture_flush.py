"""The writer's per-flush catalog work (issue #19): a flush costs the same few catalog round trips
however many layers it writes, its sample_norms rows are the ones the per-shard statements wrote,
and the convolution norms computed a few samples at a time are each sample's own."""
import duckdb
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import metaql
from metaql.storage import norms
from metaql.storage.layers import conv as conv_module, kind_named


def _flush_round_trips(tmp_path, n_layers: int) -> int:
    """Catalog statements of one Store.write_factor_shards of `n_layers` linear layers."""
    con = metaql.connect(str(tmp_path / f"s{n_layers}"))
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(n_layers)])
    x = torch.randn(6, 4)
    con.add_samples(np.arange(6), "train", np.zeros(6, np.int64))
    with con.capture(model, layers="*", checkpoint="c0", lr=0.1, shard_size=100, background=False) as cap:
        cap.backward(model(x).pow(2).sum(1).mean(), np.arange(6))
        writer = cap.writer
        batches, seen = writer.batches, writer.seen
        entries = [writer._entry(layer, batches, seen) for layer in writer._layers_in(batches)]
        store = con.store
        before = store.round_trips.count
        store.write_factor_shards("c0", entries)
        trips = store.round_trips.count - before
        writer.batches, writer.seen, writer._counts = [], [], {}     # written above: not again on exit
    assert len(store.factor_shards("c0", None)) == n_layers
    assert store.sql("SELECT count(*) FROM sample_norms").fetchone()[0] == 6 * n_layers
    con.close()
    return trips


def test_a_flush_makes_the_same_round_trips_for_one_layer_and_for_four(tmp_path):
    # one sequence call, one layers read, one shards INSERT, one norms INSERT, the DELETE and the
    # transaction: a statement per layer cost 1-5 ms each (and its GIL hold) on the writer thread
    assert _flush_round_trips(tmp_path, 1) == _flush_round_trips(tmp_path, 4)


def _inserted_one_by_one(rows):
    """What norms.insert wrote before: one statement per shard, the values as Python lists."""
    db = _norms_table()
    for checkpoint, layer, file, ids, sq, nuc in rows:
        db.execute(f"INSERT INTO {norms.TABLE} SELECT ?, ?, ?, unnest(?), unnest(?), unnest(?)",
                   [checkpoint, layer, file, ids.tolist(), sq.tolist(), [None] * len(ids) if nuc is None else nuc.tolist()])
    return db.execute(f"SELECT * FROM {norms.TABLE} ORDER BY file, sample_id").fetchall()


def _norms_table():
    db = duckdb.connect()
    db.execute(f"CREATE TABLE {norms.TABLE} (checkpoint VARCHAR NOT NULL, layer VARCHAR NOT NULL, file VARCHAR "
               "NOT NULL, sample_id BIGINT NOT NULL, sq_norm DOUBLE NOT NULL, nuc_bound DOUBLE)")
    return db


@settings(max_examples=8, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=1, max_size=4), st.integers(0, 2**16))
def test_norm_rows_of_a_flush_go_in_as_the_per_shard_statements_wrote_them(shards, seed):
    rng = np.random.default_rng(seed)
    rows = [("ck'0", f"layer {i}", f"tensors/ck/l{i}/{i:06d}.arrow", rng.permutation(100)[:n].astype(np.int64),
             rng.random(n) * 10.0 ** rng.integers(-30, 30), rng.random(n) if nuclear else None)
            for i, (n, nuclear) in enumerate(shards)]
    db = _norms_table()
    norms.insert(db, rows)
    got = db.execute(f"SELECT * FROM {norms.TABLE} ORDER BY file, sample_id").fetchall()
    assert got == _inserted_one_by_one(rows)
    assert db.execute(f"SELECT DISTINCT typeof(layer), typeof(nuc_bound) FROM {norms.TABLE}").fetchall() in (
        [], [("VARCHAR", "DOUBLE")])


def test_a_failed_flush_leaves_no_norm_rows(tmp_path):
    db = _norms_table()
    db.execute("BEGIN TRANSACTION")
    norms.insert(db, [("c", "l", "f", np.arange(3), np.ones(3), None)])
    db.execute("ROLLBACK")
    assert db.execute(f"SELECT count(*) FROM {norms.TABLE}").fetchone()[0] == 0


@pytest.mark.parametrize("small_group", [3, 256])
@pytest.mark.parametrize("channels", [(1, 4), (16, 32)])
def test_conv_sample_gradients_in_groups_are_each_samples_own(monkeypatch, small_group, channels):
    """sample_gradients (a full-stored convolution's rows) calls the weight-gradient kernel on
    groups of samples, larger groups for small weight gradients (1 -> 4 channels: 36 numbers) than
    for others (16 -> 32): every grouping gives each sample's own gradient (autograd, one at a time)."""
    monkeypatch.setattr(conv_module, "SMALL_GRADIENT_GROUP", small_group)
    torch.manual_seed(0)
    module = nn.Conv2d(*channels, 3, padding=1)
    inp, dout = torch.randn(7, channels[0], 5, 5), torch.randn(7, channels[1], 5, 5)
    kind = kind_named("conv")
    got = conv_module.sample_gradients(kind.meta("c", module), {"I": inp, "DO": dout})
    for i in range(len(inp)):
        module.zero_grad()
        (module(inp[i:i + 1]) * dout[i:i + 1]).sum().backward()
        want = torch.cat([module.weight.grad.reshape(channels[1], -1), module.bias.grad[:, None]], 1)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group", [2 * 3 * 9 * 3, 1 << 20])
def test_conv_norms_in_groups_of_samples_are_each_samples_own(monkeypatch, group):
    """full_squared_norms builds the weight gradients a few samples at a time (FULL_NORM_GROUP
    numbers): every grouping gives each sample's own squared norm (autograd, one sample at a time)."""
    monkeypatch.setattr(conv_module, "FULL_NORM_GROUP", group)
    torch.manual_seed(0)
    module = nn.Conv2d(2, 3, 3, padding=1)
    inp, dout = torch.randn(7, 2, 5, 5), torch.randn(7, 3, 5, 5)
    kind = kind_named("conv")
    got = kind.full_squared_norms(kind.meta("c", module), {"I": inp, "DO": dout})
    want = []
    for i in range(len(inp)):
        module.zero_grad()
        (module(inp[i:i + 1]) * dout[i:i + 1]).sum().backward()
        want.append(sum((p.grad ** 2).sum() for p in module.parameters()))
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("background", [False, True])
def test_a_capture_flushes_when_its_buffer_passes_the_byte_cap(tmp_path, monkeypatch, background):
    """A flush comes at shard_size rows or at capture.MAX_BUFFER_BYTES buffered, whichever is first
    (at 2,048 rows a MiniLM buffered 5 GB): with a cap of a batch and a half, every second batch
    flushes, and the stored factors are those of one shard per layer."""
    from metaql.storage import capture
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))

    def stored(path, cap_bytes):
        monkeypatch.setattr(capture, "MAX_BUFFER_BYTES", cap_bytes, raising=False)
        with metaql.connect(str(path)) as con:
            con.add_samples(np.arange(24), "train", y.numpy())
            with con.capture(model, layers="*", checkpoint="c0", lr=0.1, shard_size=2048,
                             background=background) as cap:
                for i in range(0, 24, 4):
                    cap.backward(nn.functional.cross_entropy(model(x[i:i + 4]), y[i:i + 4]), np.arange(i, i + 4))
            rows = con.store.factor_shards("c0", "2")
            ids, tensors = zip(*(con.store.shard_tensors(r) for r in rows))
            return len(rows), np.concatenate(ids), {n: torch.cat([t[n] for t in tensors]) for n in tensors[0]}

    batch = 4 * 4 * (5 + 4 + 4 + 3)       # float32 X and DO of both layers, 4 samples
    n_capped, ids_capped, capped = stored(tmp_path / "capped", int(1.5 * batch))
    n_one, ids_one, one = stored(tmp_path / "one", 1 << 30)
    assert (n_capped, n_one) == (3, 1)
    assert (ids_capped == ids_one).all()
    for name in one:
        assert torch.equal(capped[name], one[name])


def _layer_model_and_store(tmp_path):
    con = metaql.connect(str(tmp_path / "store"))
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    con.add_samples(np.arange(24), "train", np.zeros(24, np.int64))
    return con, model, torch.randn(24, 4)


def _steps(cap, model, x, batch=6):
    for s in range(0, len(x), batch):
        cap.backward(model(x[s:s + batch]).pow(2).sum(1).mean(), np.arange(s, min(s + batch, len(x))))


@pytest.mark.parametrize("background", [False, True])
def test_a_capture_flush_reads_no_layer_rows(tmp_path, monkeypatch, background):
    """The writer hands write_factor_shards the layer metas it read when it settled each layer's
    mode: before, every flush read them again (a round trip on the writer thread)."""
    from metaql.storage.store import Store
    con, model, x = _layer_model_and_store(tmp_path)
    asked = []
    original = Store.layer_metas
    monkeypatch.setattr(Store, "layer_metas", lambda self, names: asked.append(names) or original(self, names))
    with con.capture(model, layers="*", checkpoint="c0", lr=0.1, shard_size=6, background=background) as cap:
        _steps(cap, model, x)
    assert cap.writer.flushes >= 4 and asked == []
    n = con.execute("SELECT count(*) FROM SELF_INFLUENCE(layers=*)").fetchone()[0]
    assert n == 24 and con.store.sql("SELECT count(*) FROM sample_norms").fetchone()[0] == 24 * 2
    con.close()


@pytest.mark.parametrize("background", [False, True])
def test_a_finishing_capture_publishes_the_catalog_once(tmp_path, monkeypatch, background):
    """Flushes publish the catalog for readers as they commit (here each one: no minimum interval),
    but once the capture exits its last flush leaves that to finish_checkpoint, which publishes
    right after: before, the exit published twice (a snapshot copies the whole catalog). With the
    writer thread a flush still queued at the exit leaves it to finish_checkpoint too."""
    from metaql.storage import snapshot
    monkeypatch.setattr(snapshot, "MIN_INTERVAL", 0.0)
    monkeypatch.setattr(snapshot, "COPY_SHARE_INVERSE", 0)
    con, model, x = _layer_model_and_store(tmp_path)
    snapshots = []
    original = snapshot.Publisher._snapshot
    monkeypatch.setattr(snapshot.Publisher, "_snapshot", lambda self: snapshots.append(1) or original(self))
    with con.capture(model, layers="*", checkpoint="c0", lr=0.1, shard_size=6, background=background) as cap:
        _steps(cap, model, x[:21])       # batches of 6, 6, 6 (a flush each) and 3 (flushed on exit)
        during = len(snapshots)
    assert cap.writer.flushes == 4
    if not background:
        assert during == 3 and len(snapshots) == 4       # three flushes, then the exit's one publish
    assert len(snapshots) <= cap.writer.flushes         # before: one per flush, and the exit's
    reader = metaql.connect(str(tmp_path / "store"), read_only=True)
    assert reader.execute("SELECT count(*) FROM SELF_INFLUENCE(layers=*)").fetchone()[0] == 21
    assert reader.execute("SELECT status FROM checkpoints").fetchall() == [("complete",)]
    reader.close()
    con.close()


def test_what_committed_is_published_when_the_finish_fails(tmp_path, monkeypatch):
    """The last flush leaves publishing to finish_checkpoint; if that fails (a disk or catalog
    error), what the flushes committed is published all the same, and later commits publish
    themselves again."""
    from metaql.storage import snapshot
    from metaql.storage.store import Store
    monkeypatch.setattr(snapshot, "MIN_INTERVAL", 0.0)
    monkeypatch.setattr(snapshot, "COPY_SHARE_INVERSE", 0)
    con, model, x = _layer_model_and_store(tmp_path)

    def failing(self, name, status="complete"):
        raise OSError("the disk failed")
    monkeypatch.setattr(Store, "finish_checkpoint", failing)
    with pytest.raises(OSError, match="disk failed"):
        with con.capture(model, layers="*", checkpoint="c0", lr=0.1, shard_size=6, background=False) as cap:
            _steps(cap, model, x[:21])
    assert not cap.writer._finishing
    reader = metaql.connect(str(tmp_path / "store"), read_only=True)
    assert reader.execute("SELECT count(*) FROM shards WHERE kind = 'factors'").fetchone()[0] == 4 * 2
    reader.close()
    con.close()
