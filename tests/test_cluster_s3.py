"""Stores on S3-compatible object storage: moto's server on 127.0.0.1 started by the module; a
store written locally, uploaded, and queried from the bucket (locally and by Ray workers)."""
from __future__ import annotations

from pathlib import Path

import pytest

import metaql
from tests.cluster_stores import README_QUERIES, answers, build_store

INFL = README_QUERIES[0]
SELF = next(q for q in README_QUERIES if q.startswith("SELECT TOPK") and "SELF_INFLUENCE" in q)

pytestmark = pytest.mark.cluster
moto_server = pytest.importorskip("moto.server")
pafs = pytest.importorskip("pyarrow.fs")
from metaql.distributed.objectstore import upload_store  # noqa: E402


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
def published(s3, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("s3") / "s.mq")
    info = build_store(path)
    with metaql.connect(path, read_only=True) as con:
        info["local"] = answers(con)
    counts = upload_store(path, uri(s3, "store"))
    return path, info, counts


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


def test_ray_workers_read_the_shards_from_s3(s3, published):
    ray = pytest.importorskip("ray")
    path, info, _ = published
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with metaql.connect(uri(s3, "store"), config={"engine": "ray"}) as con:
            assert answers(con) == info["local"]
        with metaql.connect(uri(s3, "store"), config={"engine": "ray"}) as con:
            for query in README_QUERIES:
                if "each(" not in query:       # the train x query matrix runs on the driver
                    con.execute(query)
            # the driver fetched only what replaying the query side needs; workers read the shards
            assert not (Path(con.store.root) / "tensors").exists()
    finally:
        if started:
            ray.shutdown()
