"""The Ray engine against the local one on a local Ray cluster started once for the module
(ray.init(num_cpus=2)): the README's queries give identical answers; a killed worker is retried or
fails the query with a metaql.Error; con.interrupt() cancels the tasks."""
from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

import metaql
from tests.cluster_stores import README_QUERIES, answers, build_store

INFL = README_QUERIES[0]
SELF = next(q for q in README_QUERIES if q.startswith("SELECT TOPK") and "SELF_INFLUENCE" in q)

pytestmark = pytest.mark.cluster
ray = pytest.importorskip("ray")
from metaql.distributed import ray_engine  # noqa: E402


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
    return path, info


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
    for query, local, remote in zip(README_QUERIES, info["local"], got):
        assert remote == local, query     # exact: the same chunks, the same float operations
    assert all(len(a) > 0 for a in got)


def test_shard_groups_by_bytes(cluster, store, monkeypatch):
    path, info = store
    with metaql.connect(path, read_only=True, config={"engine": "ray"}) as con:
        rows = con.execute("SELECT bytes FROM shards WHERE checkpoint = 'epoch0' AND layer = 'fc1' "
                           "ORDER BY shard_id").fetchall()
        monkeypatch.setattr(ray_engine, "TASK_BYTES", rows[0][0] + rows[1][0])
        assert answers(con) == info["local"]
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
    assert got == info["local"][0]     # ... and its task re-run: the whole answer


def test_worker_dying_every_time_fails_the_query(cluster, store, monkeypatch):
    path, info = store
    monkeypatch.setattr(ray_engine, "MAX_RETRIES", 1)
    monkeypatch.setenv("METAQL_RAY_FAULT", "kill")
    with metaql.connect(path, read_only=True, config={"engine": "ray"}) as con:
        with pytest.raises(metaql.OperationalError, match="worker died.*returned nothing"):
            con.execute(SELF).fetchall()
        monkeypatch.delenv("METAQL_RAY_FAULT")       # the connection stays usable
        assert con.execute(SELF).fetchall() == info["local"][README_QUERIES.index(SELF)]


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
