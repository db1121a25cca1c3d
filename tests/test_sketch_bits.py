"""Sketches stored in 8 or 4 bits (capture's sketch_bits=, storage/quantize.py): integer codes and a
scale per row in the shard, scores within the rounding's bound of the explicit float sketch, unbiased
rounding, the recorded error bound, TOPK's norms of the numbers read back, and bad options refused."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metaql
from metaql.approx.projection import count_sketch, relative_error
from metaql.distributed.shards import shard_tensors as remote_shard_tensors
from metaql.errors import InvalidInputException
from metaql.storage.quantize import LEVELS, SCALE, decoded, encoded, quantization_variance
from tests.bruteforce import per_sample_grads
from tests.models import MLP, SeqModel

M = 20


def _sketch_store(con, model, x, y, ids_train, m=M, **kw):
    con.add_samples(ids_train, "train", y[ids_train].numpy(), x[ids_train])
    test = np.arange(len(ids_train), len(x))
    con.add_samples(test, "test", y[test].numpy(), x[test])
    with con.capture(model, layers=["proj"], checkpoint="c0", lr=0.5, storage={"proj": "projected"},
                     sketch_dim=m, sketch_dist="count", **kw) as cap:
        for lo in range(0, len(ids_train), 4):
            b = ids_train[lo:lo + 4]
            cap.backward(F.cross_entropy(model(x[b]), y[b]), b)


def _explicit_sketch(model, x, y, spec) -> torch.Tensor:
    """S vec([W | b]) per sample from torch.func gradients and the count sketch's buckets and signs."""
    g = per_sample_grads(model, x, y)
    G = torch.cat([g["proj.weight"], g["proj.bias"].unsqueeze(-1)], -1).double().flatten(1)
    m = spec["sketch"]
    buckets, signs = count_sketch(spec["seed"], m, G.shape[1])
    return torch.zeros(len(G), m, dtype=torch.double).index_add_(1, buckets, G * signs.double())


@pytest.mark.parametrize("bits,asked", [(8, M), (8, M + 1), (4, M), (4, M + 1)])
def test_sketch_is_stored_as_codes_and_scores_within_the_rounding_bound(tmp_path, bits, asked):
    """4 bits store two codes to a byte: an odd sketch_dim is rounded up to even."""
    torch.manual_seed(0)
    model, x, y = SeqModel(6, 9, 3), torch.randn(15, 5, 6), torch.randint(0, 3, (15,))
    ids = np.arange(12)
    m = asked + asked % 2 if bits == 4 else asked
    with metaql.connect(str(tmp_path / "q.mq")) as con:
        _sketch_store(con, model, x, y, ids, m=asked, sketch_bits=bits)
        spec = con.store.layer_meta("proj")[0].extra["projection"]
        assert spec["sketch"] == m
        assert spec["bits"] == bits and spec["error"] == pytest.approx(relative_error(None, None, m, bits))
        assert spec["error"] > relative_error(None, None, m)
        rows = con.store.factor_shards("c0", "proj")
        raw = con.store.open_shard(rows[0]["file"], rows[0]["checksum"])
        codes = raw.tensor("G")
        assert raw.tensor(SCALE).dtype == torch.float32
        assert (codes.dtype, codes.shape[1]) == ((torch.int8, m) if bits == 8 else (torch.uint8, m // 2))
        got = con.execute("SELECT score FROM INFLUENCE(layers=[proj], query=batch(test), error=1) "
                          "ORDER BY sample_id").fetchnumpy()["score"]
        read = [con.store.shard_tensors(r)[1]["G"] for r in rows]
        assert all(g.shape[1] == m for g in read)
        assert con.verify() == []
        scales = np.concatenate([g.abs().amax(1).numpy() / LEVELS[bits] for g in read])
    s = _explicit_sketch(model, x, y, spec)
    t = s[12:].mean(0)
    expected = 0.5 * (s[:12] @ t).numpy()
    # each stored number is off by less than its row's scale: |<e_i, t>| <= sqrt(m) scale_i ||t||
    bound = 0.5 * math.sqrt(m) * scales * float(t.norm()) * 1.0001 + 1e-6 * np.abs(expected).max()
    assert np.all(np.abs(got - expected) <= bound), np.abs(got - expected) / bound
    assert np.abs(got - expected).max() > 0          # the codes are not the float sketch itself


def test_8bit_shards_are_a_quarter_of_float32_and_read_back_alike(tmp_path):
    torch.manual_seed(1)
    model, x, y = SeqModel(6, 9, 3), torch.randn(15, 5, 6), torch.randint(0, 3, (15,))
    ids = np.arange(12)
    sizes = {}
    for bits in (None, 8):
        with metaql.connect(str(tmp_path / f"b{bits}.mq")) as con:
            _sketch_store(con, model, x, y, ids, sketch_bits=bits)
            sizes[bits] = con.execute("SELECT sum(bytes) FROM shards WHERE kind = 'factors'").fetchone()[0]
            row = con.store.factor_shards("c0", "proj")[0]
            local = con.store.shard_tensors(row)[1]
            spec = {"file": row["file"], "checksum": row["checksum"]}
            remote = remote_shard_tensors(str(con.store.root), spec)[1]     # the Ray workers' reader
            assert set(local) == set(remote) == {"G"} and local["G"].dtype == remote["G"].dtype == torch.float32
            torch.testing.assert_close(local["G"], remote["G"])
            if bits:
                raw = con.store.open_shard(row["file"], row["checksum"])
                assert raw.tensor("G").nbytes == 12 * M and raw.tensor(SCALE).nbytes == 12 * 4
    # 12 x 20 x 4 bytes of numbers against 12 x (20 + 4), less the second column's fixed part (schema, padding)
    assert sizes[None] - sizes[8] >= 12 * (M * 4 - M - 4) - 400


@pytest.mark.parametrize("bits", [8, 4])
def test_rounding_is_unbiased_and_its_variance_within_the_bound(bits):
    """Over 4,000 shards (seeds from their first ids), the decoded rows' mean is within 4 standard
    errors of the numbers, and each number's error variance is at most scale^2 / 4."""
    torch.manual_seed(2)
    g = torch.randn(3, 50) * torch.tensor([[1.0], [1e-3], [40.0]])
    g[1, 7] = 0.0
    draws = torch.stack([decoded(encoded({"G": g}, bits, 5, np.array([i])))["G"] for i in range(4000)])
    scale = g.abs().amax(1, keepdim=True) / LEVELS[bits]
    err = draws - g
    assert err.abs().max() <= float((scale * 1.0001).max())
    assert torch.all(err.abs() <= scale * 1.0001)
    se = scale / 2 / math.sqrt(len(draws))
    assert torch.all((err.mean(0)).abs() <= 4 * se + 1e-12)
    assert torch.all(err.var(0) <= scale ** 2 / 4 * 1.1)
    assert quantization_variance(bits) == pytest.approx(1 / (4 * LEVELS[bits] ** 2))
    zero = encoded({"G": torch.zeros(2, 6)}, bits, 0, np.array([0]))      # a row of zeros: scale 0, codes 0
    assert torch.equal(decoded(zero)["G"], torch.zeros(2, 6))


@pytest.mark.parametrize("bits", [8, 4])
def test_topk_norms_are_those_of_the_numbers_read_back(tmp_path, bits):
    """The flush's squared norms (TOPK's bounds) equal those of the decoded rows, and a pruned TOPK
    over an 8-bit store answers as the full scan does."""
    torch.manual_seed(3)
    model, x, y = MLP(8, 12, 3), torch.randn(70, 8), torch.randint(0, 3, (70,))
    ids = np.arange(64)
    with metaql.connect(str(tmp_path / "n.mq")) as con:
        con.add_samples(ids, "train", y[:64].numpy(), x[:64])
        con.add_samples(np.arange(64, 70), "test", y[64:].numpy(), x[64:])
        with con.capture(model, layers="*", checkpoint="c0", lr=1.0, storage="projected", sketch_dim=6,
                         sketch_dist="count", sketch_bits=bits, shard_size=16) as cap:
            for lo in range(0, 64, 8):
                cap.backward(F.cross_entropy(model(x[lo:lo + 8]), y[lo:lo + 8]), ids[lo:lo + 8])
        for layer in ("fc1", "fc2"):
            kept = con.execute("SELECT sample_id, sq_norm FROM sample_norms WHERE layer = ? ORDER BY sample_id",
                               [layer]).fetchnumpy()
            parts = [con.store.shard_tensors(r) for r in con.store.factor_shards("c0", layer)]
            sq = {int(i): float(v) for ids_, t in parts for i, v in zip(ids_, t["G"].double().pow(2).sum(1))}
            np.testing.assert_allclose(kept["sq_norm"], [sq[int(i)] for i in kept["sample_id"]], rtol=1e-5)
        answers = []
        for prune in (True, False):
            con.config["topk_pruning"] = prune
            answers.append(con.execute("SELECT TOPK(5) train FROM INFLUENCE(layers=*, query=batch(test), "
                                       "error=1) ORDER BY DESC").fetchall())
        assert answers[0] == answers[1]


@pytest.mark.parametrize("bits", [None, 4])
def test_a_sketch_that_overflows_float16_is_refused_not_stored(tmp_path, bits):
    """A sketch built at the flush in dtype='float16' can exceed 65504: the flush is refused with
    advice (it stored infinities before, and in 4 bits misread the shard's width)."""
    torch.manual_seed(5)
    model, x, y = SeqModel(6, 9, 3), torch.randn(15, 5, 6), torch.randint(0, 3, (15,))
    ids = np.arange(12)
    with metaql.connect(str(tmp_path / "o.mq")) as con:
        con.add_samples(ids, "train", y[:12].numpy(), x[:12])
        with pytest.raises(InvalidInputException, match="overflow to infinity .* stored in the capture's dtype"):
            with con.capture(model, layers=["proj"], checkpoint="c0", lr=1.0, storage={"proj": "projected"},
                             sketch_dim=6, sketch_dist="count", sketch_bits=bits, dtype="float16",
                             background=False) as cap:
                cap.backward(F.cross_entropy(model(x[:12]), y[:12]) * 3e5, ids)
        assert con.execute("SELECT count(*) FROM shards WHERE kind = 'factors'").fetchone()[0] == 0


def test_zero_row_shards_read_back_in_their_dtype(tmp_path):
    from metaql.storage.tensorfile import Shard, write_shard
    for bits in (8, 4):
        path = tmp_path / f"z{bits}.arrow"
        write_shard(path, np.zeros(0, np.int64), encoded({"G": torch.zeros(0, 6)}, bits, 0, np.zeros(0, np.int64)))
        shard = Shard(path)
        assert decoded({n: shard.tensor(n) for n in shard.names()})["G"].shape == (0, 6)


def test_sketch_bits_options_are_checked():
    with metaql.connect(":memory:") as con:
        model = MLP(4, 5, 2)
        with pytest.raises(InvalidInputException, match="sketch_bits must be one of 8, 4"):
            con.capture(model, storage="projected", sketch_dim=4, sketch_bits=3)
        with pytest.raises(InvalidInputException, match="sketch_bits must be one of 8, 4"):
            con.capture(model, storage="projected", sketch_dim=4, sketch_bits=True)
        with pytest.raises(InvalidInputException, match="give sketch_dim= or sketch_budget="):
            con.capture(model, storage="projected", proj_dim=2, sketch_bits=8)


def test_sketch_bits_against_a_layer_stored_otherwise_is_refused(tmp_path):
    """A layer keeps its first capture's sketch: a later capture asking other bits is refused before
    any step (it was silently stored as before); leaving sketch_bits out keeps the stored form."""
    torch.manual_seed(6)
    model, x, y = SeqModel(6, 9, 3), torch.randn(15, 5, 6), torch.randint(0, 3, (15,))
    ids = np.arange(12)
    with metaql.connect(str(tmp_path / "k.mq")) as con:
        _sketch_store(con, model, x, y, ids, sketch_bits=8)
        with pytest.raises(InvalidInputException, match="sketched in 8 bits in this store"):
            con.capture(model, layers=["proj"], checkpoint="c1", storage={"proj": "projected"}, sketch_dim=M,
                        sketch_dist="count", sketch_bits=4)
        with con.capture(model, layers=["proj"], checkpoint="c1", lr=0.5, storage={"proj": "projected"},
                         sketch_dim=M, sketch_dist="count") as cap:
            cap.backward(F.cross_entropy(model(x[:4]), y[:4]), ids[:4])
        row = con.store.factor_shards("c1", "proj")[0]
        assert con.store.open_shard(row["file"], row["checksum"]).tensor("G").dtype == torch.int8


@pytest.mark.cluster
def test_ray_units_answer_as_the_local_engine_on_a_4bit_store(tmp_path, monkeypatch):
    """The Ray engine's unit tasks (run in this process, as tests/test_ray_units.py does) read the
    4-bit shards through distributed/shards.py and answer as the local engine's full scan."""
    import metaql.engine.pruning as pruning
    from metaql.distributed import ray_engine, ray_units
    torch.manual_seed(4)
    model, x, y = MLP(8, 12, 3), torch.randn(70, 8), torch.randint(0, 3, (70,))
    ids = np.arange(64)
    path = str(tmp_path / "r.mq")
    with metaql.connect(path) as con:
        con.add_samples(ids, "train", y[:64].numpy(), x[:64])
        con.add_samples(np.arange(64, 70), "test", y[64:].numpy(), x[64:])
        with con.capture(model, layers="*", checkpoint="c0", lr=1.0, storage="projected", sketch_dim=7,
                         sketch_dist="count", sketch_bits=4, shard_size=16) as cap:
            for lo in range(0, 64, 8):
                cap.backward(F.cross_entropy(model(x[lo:lo + 8]), y[lo:lo + 8]), ids[lo:lo + 8])
    trusted = {"trusted_factories": ["tests.models:MLP"]}      # the query side's replay builds the model
    queries = ["SELECT TOPK(6) train FROM INFLUENCE(layers=*, query=batch(test), error=1) ORDER BY DESC",
               "SELECT sample_id, score FROM SELF_INFLUENCE(layers=*, error=1) ORDER BY sample_id"]
    with monkeypatch.context() as m:
        m.setattr(pruning, "why_not", lambda plan, ctx: "off")
        with metaql.connect(path, read_only=True, config=trusted) as con:
            want = [con.execute(q).fetchall() for q in queries]
    merges = []
    real = ray_units.merge
    monkeypatch.setattr(ray_units, "ray_runner", ray_units.local_runner)
    monkeypatch.setattr(ray_units, "merge", lambda *a: merges.append(True) or real(*a))
    monkeypatch.setattr(ray_engine, "uses_ray", lambda ctx, strategy: False)
    with metaql.connect(path, read_only=True, config={"engine": "ray", **trusted}) as con:
        got = [con.execute(q).fetchall() for q in queries]
    assert merges and got == want and all(got)


def test_one_samples_roundings_in_two_checkpoints_are_independent(tmp_path):
    """The rounding's generator is seeded by the checkpoint too: the same weights captured under two
    checkpoints round differently (the same stream in both made their errors add up, not average)."""
    torch.manual_seed(7)
    model, x, y = SeqModel(6, 9, 3), torch.randn(15, 5, 6), torch.randint(0, 3, (15,))
    ids = np.arange(12)
    with metaql.connect(str(tmp_path / "c.mq")) as con:
        _sketch_store(con, model, x, y, ids, sketch_bits=4)
        with con.capture(model, layers=["proj"], checkpoint="c1", lr=0.5) as cap:
            for lo in range(0, 12, 4):
                cap.backward(F.cross_entropy(model(x[lo:lo + 4]), y[lo:lo + 4]), ids[lo:lo + 4])
        raw = {c: [con.store.open_shard(r["file"], r["checksum"]) for r in con.store.factor_shards(c, "proj")]
               for c in ("c0", "c1")}
        codes = {c: torch.cat([s.tensor("G") for s in shards]) for c, shards in raw.items()}
        scales = {c: torch.cat([s.tensor(SCALE) for s in shards]) for c, shards in raw.items()}
    torch.testing.assert_close(scales["c0"], scales["c1"])      # the same numbers: the same scales
    assert not torch.equal(codes["c0"], codes["c1"])
