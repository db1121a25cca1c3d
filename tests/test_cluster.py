"""The Ray engine against the local one on a local Ray cluster started once for the module
(ray.init(num_cpus=2)): the README's queries give identical answers; a killed worker is retried or
fails the query with a metaql.Error; con.interrupt() cancels the tasks. Stores on S3-compatible
object storage: moto's server on 127.0.0.1 started by the module; the same store uploaded and
queried from the bucket, locally and by Ray workers. One module, so that the store is built and
Ray started once."""
from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

import metaql
from pathlib import Path

from tests.cluster_stores import README_QUERIES, answers, build_store

INFL = README_QUERIES[0]
SELF = next(q for q in README_QUERIES if q.startswith("SELECT TOPK") and "SELF_INFLUENCE" in q)

pytestmark = pytest.mark.cluster
ray = pytest.importorskip("ray")
moto_server = pytest.importorskip("moto.server")
pafs = pytest.importorskip("pyarrow.fs")
from metaql.distributed import ray_engine, ray_units  # noqa: E402
from metaql.distributed.objectstore import upload_store  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ray") / "s.mq")
    info = build_store(path)
    with metaql.connect(path, read_only=True) as con:
        info["local"] = answers(con)
    info["full"] = full_scan_answers(path)
    return path, info


def full_scan_answers(path) -> list:
    """The local engine's answers without TOPK pruning: pruning re-scores its survivors in other
    chunks than a full scan, whose float32 matmuls round the last bits differently; the Ray engine's
    tasks score every sample in the full scan's chunks."""
    import metaql.engine.pruning as pruning
    real = pruning.why_not
    pruning.why_not = lambda plan, ctx: "off"
    try:
        with metaql.connect(path, read_only=True) as con:
            return answers(con)
    finally:
        pruning.why_not = real


@pytest.fixture
def small_tasks(monkeypatch):
    monkeypatch.setattr(ray_engine, "TASK_BYTES", 1)     # one task per shard: 4 per layer pass


def tasks_run(store_path, info, folder, monkeypatch) -> list:
    """The README's answers under the Ray engine, and checks that Ray tasks computed them."""
    folder.mkdir()
    monkeypatch.setenv("METAQL_RAY_FAULT", f"sleep:0:{folder}")
    with metaql.connect(store_path, read_only=True, config={"engine": "ray"}) as con:
        got = answers(con)
    assert len(os.listdir(folder)) >= len(README_QUERIES) * 4      # tasks ran, not the local loop
    return got


def test_readme_queries_identical_to_local(cluster, store, small_tasks, tmp_path, monkeypatch):
    path, info = store
    got = tasks_run(path, info, tmp_path / "done", monkeypatch)
    for query, full, local, remote in zip(README_QUERIES, info["full"], info["local"], got):
        assert remote == full, query      # exact: the same chunks, the same float operations
        # the local engine's pruned TOPK (INFLUENCE, dot): the same samples in the same order,
        # scores equal to float32 rounding of the rows it re-scored
        assert close_rows(remote, local), query
    assert all(len(a) > 0 for a in got)


def close_rows(a: list, b: list, rtol: float = 1e-6) -> bool:
    """The same rows in the same order, floats within rtol."""
    def same(u, v):
        return u == v or isinstance(u, float) and isinstance(v, float) and abs(u - v) <= rtol * abs(v)
    return len(a) == len(b) and all(len(x) == len(y) and all(map(same, x, y)) for x, y in zip(a, b))


def test_tasks_cover_every_pass_of_their_samples(cluster, store, small_tasks, tmp_path, monkeypatch):
    """A TOPK's tasks score all layers and checkpoints of their shards (a task per flush here) and
    return k rows each; with units off, a task per shard per pass, as before: the same answer."""
    path, info = store
    query = "SELECT TOPK(10) train FROM SELF_INFLUENCE(layers=[fc1, fc2], checkpoints=all) ORDER BY DESC"
    counts, rows = {}, {}
    with metaql.connect(path, read_only=True) as con:
        flushes = con.execute("SELECT count(*) FROM shards WHERE checkpoint = 'epoch0' AND layer = 'fc1'").fetchone()[0]
        want = con.execute(query).fetchall()
    for by_units in (True, False):
        monkeypatch.setattr(ray_units, "BY_UNITS", by_units)
        folder = tmp_path / f"units-{by_units}"
        folder.mkdir()
        monkeypatch.setenv("METAQL_RAY_FAULT", f"sleep:0:{folder}")
        with metaql.connect(path, read_only=True, config={"engine": "ray"}) as con:
            rows[by_units] = con.execute(query).fetchall()
        counts[by_units] = len(os.listdir(folder))
    assert rows[True] == rows[False] == want
    assert counts == {True: flushes, False: 4 * flushes}      # 2 checkpoints x 2 layers


def test_shard_groups_by_bytes(cluster, store, monkeypatch):
    path, info = store
    with metaql.connect(path, read_only=True, config={"engine": "ray"}) as con:
        rows = con.execute("SELECT bytes FROM shards WHERE checkpoint = 'epoch0' AND layer = 'fc1' "
                           "ORDER BY shard_id").fetchall()
        monkeypatch.setattr(ray_engine, "TASK_BYTES", rows[0][0] + rows[1][0])
        assert answers(con) == info["full"]
    target = rows[0][0] + rows[1][0]
    specs = [{"bytes": b, "i": i} for i, (b,) in enumerate(rows)]
    groups = ray_engine.task_groups(specs, target)
    assert [s for g in groups for s in g] == specs and len(groups) < len(specs)
    assert all(len(g) == 1 or sum(s["bytes"] for s in g) <= target for g in groups)


def test_killed_worker_is_retried(cluster, store, small_tasks, tmp_path, monkeypatch):
    path, info = store
    claim = tmp_path / "kill-me"
    claim.touch()
    monkeypatch.setenv("METAQL_RAY_FAULT", f"kill-once:{claim}")
    with metaql.connect(path, read_only=True, config={"engine": "ray"}) as con:
        got = con.execute(INFL).fetchall()
    assert not claim.exists()          # a worker was killed mid-query ...
    assert got == info["full"][0]      # ... and its task re-run: the whole answer


def test_worker_dying_every_time_fails_the_query(cluster, store, monkeypatch):
    path, info = store
    monkeypatch.setattr(ray_engine, "MAX_RETRIES", 1)
    monkeypatch.setenv("METAQL_RAY_FAULT", "kill")
    with metaql.connect(path, read_only=True, config={"engine": "ray"}) as con:
        with pytest.raises(metaql.OperationalError, match="worker died.*returned nothing"):
            con.execute(SELF).fetchall()
        monkeypatch.delenv("METAQL_RAY_FAULT")       # the connection stays usable
        assert con.execute(SELF).fetchall() == info["full"][README_QUERIES.index(SELF)]


def test_interrupt_cancels_every_task(cluster, store, small_tasks, tmp_path, monkeypatch):
    path, info = store
    done = tmp_path / "done"
    done.mkdir()
    monkeypatch.setenv("METAQL_RAY_FAULT", f"sleep:4:{done}")
    with metaql.connect(path, read_only=True, config={"engine": "ray"}) as con:
        timer = threading.Timer(1.0, con.interrupt)
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(metaql.InterruptException):
            con.execute(SELF)
        assert time.monotonic() - t0 < 4.0      # it did not wait for the tasks
        time.sleep(5.0)
        assert os.listdir(done) == []           # no task ran to its end: every one was cancelled


def test_a_corrupt_shard_fails_with_the_workers_error(cluster, store, tmp_path):
    path, info = store
    copy = tmp_path / "copy.mq"
    shutil.copytree(path, copy)
    with metaql.connect(str(copy), read_only=True) as con:
        rel = con.execute("SELECT file FROM shards WHERE layer = 'fc2' ORDER BY shard_id LIMIT 1").fetchone()[0]
    with open(copy / rel, "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    with metaql.connect(str(copy), read_only=True, config={"engine": "ray"}) as con:
        with pytest.raises(metaql.IOException, match="corrupt"):
            con.execute(SELF)


# ---- stores on S3 (moto's server) ------------------------------------------------------------
@pytest.fixture(scope="module")
def s3():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    yield f"testing:testing@metaql/{{}}?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1" \
          "&allow_bucket_creation=true"
    server.stop()


def uri(s3, name: str) -> str:
    return "s3://" + s3.format(name)


def objects(s3, name: str) -> dict:
    fs, base = pafs.FileSystem.from_uri(uri(s3, name))
    return {i.path: (i.size, i.mtime) for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))}


@pytest.fixture(scope="module")
def published(s3, store):
    path, info = store
    return path, info, upload_store(path, uri(s3, "store"))


def test_a_store_read_from_s3_answers_as_the_local_one(s3, published):
    path, info, counts = published
    assert counts["files"] > 16 and counts["skipped"] == 0
    before = objects(s3, "store")
    with metaql.connect(uri(s3, "store")) as con:
        assert con.store.read_only
        assert answers(con) == info["local"]
        assert con.verify() == []
        with pytest.raises(metaql.Error):
            con.execute("CREATE SET odd AS SELECT sample_id FROM samples WHERE sample_id % 2 = 1")
    assert objects(s3, "store") == before          # reading wrote nothing to the bucket


def test_uploading_again_skips_the_files_already_there(s3, published):
    path, info, counts = published
    again = upload_store(path, uri(s3, "store"))
    assert again["files"] == 1 and again["skipped"] == counts["files"] - 1      # the catalog only


def test_a_missing_store_and_a_corrupt_object_are_refused(s3, published):
    path, info, _ = published
    with pytest.raises(metaql.IOException, match="no MetaQL store"):
        metaql.connect(uri(s3, "nothing-here"))
    upload_store(path, uri(s3, "broken"))
    with metaql.connect(path, read_only=True) as con:
        rel = con.execute("SELECT file FROM shards WHERE layer = 'fc1' ORDER BY shard_id LIMIT 1").fetchone()[0]
    fs, base = pafs.FileSystem.from_uri(uri(s3, "broken"))
    data = bytearray(fs.open_input_file(f"{base}/{rel}").read())
    data[300] ^= 0xFF
    with fs.open_output_stream(f"{base}/{rel}") as f:
        f.write(bytes(data))
    with metaql.connect(uri(s3, "broken")) as con:
        with pytest.raises(metaql.IOException, match="corrupt"):
            con.execute(SELF)


def test_ray_workers_read_the_shards_from_s3(cluster, s3, published):
    path, info, _ = published
    with metaql.connect(uri(s3, "store"), config={"engine": "ray"}) as con:
        assert answers(con) == info["full"]
    with metaql.connect(uri(s3, "store"), config={"engine": "ray"}) as con:
        for query in README_QUERIES:
            if "each(" not in query:       # the train x query matrix runs on the driver
                con.execute(query)
        # the driver fetched only what replaying the query side needs; workers read the shards
        assert not (Path(con.store.root) / "tensors").exists()


def capture(path: str, checkpoint: str, pause: float = 0.0) -> None:
    """A checkpoint of 96 random digits captured into the store at `path` (made with its samples
    on first use), in 3 batches of 32, pausing after each (a training step's time)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from metaql.demo import DigitsMLP
    from tests.cluster_stores import random_digits
    x, y = (torch.from_numpy(a) for a in random_digits(96)[:2])
    torch.manual_seed(len(checkpoint))
    model = DigitsMLP()
    with metaql.connect(path) as con:
        if not con.execute("SELECT count(*) FROM samples").fetchone()[0]:
            con.add_samples(np.arange(96), "train", y.numpy(), x.numpy())
        with con.capture(model, layers=["fc1", "fc2"], checkpoint=checkpoint, lr=0.1, shard_size=32) as cap:
            for start in range(0, 96, 32):
                idx = torch.arange(start, start + 32)
                cap.backward(F.cross_entropy(model(x[idx]), y[idx]), idx.numpy())
                time.sleep(pause)


ALL_SELF = "SELECT sample_id, score FROM SELF_INFLUENCE(layers=*, checkpoints=all)"


def test_a_store_published_while_it_is_captured(s3, tmp_path):
    """A Publisher uploads round after round while the store is captured; a reader polling the
    bucket all along only ever opens catalogs whose every file is there (verify() clean but for
    the checkpoint still capturing), sees the capture progress, and after the last round gets the
    local store's answers."""
    from metaql.distributed.objectstore import Publisher
    path, target = str(tmp_path / "live.mq"), uri(s3, "live")
    seen, problems, capturing, stop = set(), [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                with metaql.connect(target) as con:
                    seen.add(con.execute("SELECT count(*) FROM shards WHERE kind = 'factors'").fetchone()[0])
                    for problem in con.verify():        # a checkpoint still capturing is no damage
                        (capturing if "is capturing" in problem else problems).append(problem)
            except metaql.IOException as e:
                if "no MetaQL store" not in str(e):    # before the first round
                    problems.append(str(e))
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        with Publisher(path, target, every=0.2) as pub:
            for c in ("first", "second"):
                capture(path, c, pause=1.0)
    finally:
        stop.set()
        thread.join()
    assert problems == [] and pub.rounds > 2
    assert capturing and len(seen) > 2       # states in between: the reader saw the capture progress
    with metaql.connect(path, read_only=True) as local, metaql.connect(target) as remote:
        assert remote.execute(ALL_SELF).fetchall() == local.execute(ALL_SELF).fetchall()


def test_a_round_that_fails_midway_leaves_the_previous_catalog(s3, tmp_path, monkeypatch):
    """Files go first and the catalog last: a round that fails after some of a new checkpoint's
    files leaves the bucket's previous catalog, which names only files already there and answers
    as before; the next round completes the new one."""
    from metaql.distributed import objectstore
    path, target = str(tmp_path / "grow.mq"), uri(s3, "grow")
    capture(path, "first")
    pub = objectstore.Publisher(path, target)
    pub.publish()
    with metaql.connect(target) as con:
        before = con.execute(ALL_SELF).fetchall()
    capture(path, "second")
    real, calls = objectstore.put, []

    def failing(fs, source, dest, counts, force=False):
        calls.append(dest)
        if len(calls) > 2:
            raise OSError("connection reset (test)")
        return real(fs, source, dest, counts, force)
    monkeypatch.setattr(objectstore, "put", failing)
    with pytest.raises(metaql.IOException, match="catalog there is the previous one"):
        pub.publish()
    assert len(calls) == 3 and not any(c.endswith("catalog.duckdb") for c in calls)
    with metaql.connect(target) as con:
        assert con.verify() == [] and con.execute(ALL_SELF).fetchall() == before
    monkeypatch.setattr(objectstore, "put", real)
    pub.publish()
    with metaql.connect(target) as con, metaql.connect(path, read_only=True) as local:
        after = con.execute(ALL_SELF).fetchall()
        assert con.verify() == [] and after == local.execute(ALL_SELF).fetchall() and after != before
