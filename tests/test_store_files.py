"""A store owns exactly its files: what an open creates, opens or refuses, and no symlink is followed."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metaql
from metaql.storage.store import Store
from tests.models import MLP


def _captured(path, n=12):
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(n, 6), torch.randint(0, 3, (n,))
    con = metaql.connect(str(path))
    con.add_samples(np.arange(n), "train", y.numpy(), x)
    with con.capture(model, checkpoint="c0", lr=0.1, shard_size=4) as cap:
        cap.backward(F.cross_entropy(model(x), y), np.arange(n))
    con.close()


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _victim(tmp_path) -> Path:
    victim = tmp_path / "victim"
    (victim / "deep").mkdir(parents=True)
    (victim / "thesis.txt").write_text("years of work")
    (victim / "deep" / "data.bin").write_bytes(b"\x00\x01")
    return victim


def test_a_plain_directory_is_refused_and_left_alone(tmp_path):
    docs = tmp_path / "docs"
    (docs / "inputs").mkdir(parents=True)
    (docs / "inputs" / "photo.png").write_bytes(b"png")
    (docs / "notes.txt").write_text("mine")
    before = _files(docs)
    with pytest.raises(metaql.IOException, match="looks like a MetaQL store whose catalog.duckdb is missing"):
        metaql.connect(str(docs))
    (docs / "inputs" / "photo.png").rename(docs / "photo.png")
    (docs / "inputs").rmdir()
    with pytest.raises(metaql.IOException, match="non-empty directory that is not a MetaQL store"):
        metaql.connect(str(docs))
    with pytest.raises(metaql.IOException, match="not a MetaQL store"):
        metaql.connect(str(docs), read_only=True)
    assert sorted(os.listdir(docs)) == ["notes.txt", "photo.png"]
    assert _files(docs) == {"notes.txt": before["notes.txt"], "photo.png": before["inputs/photo.png"]}


def test_what_an_open_creates_or_refuses(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(metaql.IOException, match="open it without read_only to create one"):
        metaql.connect(str(empty), read_only=True)
    with pytest.raises(metaql.IOException, match="does not exist"):
        metaql.connect(str(tmp_path / "nowhere"), read_only=True)
    assert not (tmp_path / "nowhere").exists() and os.listdir(empty) == []
    metaql.connect(str(empty)).close()              # an empty directory becomes a store
    assert (empty / "catalog.duckdb").is_file()
    (tmp_path / "file.mq").write_text("x")
    with pytest.raises(metaql.IOException, match="is a file"):
        metaql.connect(str(tmp_path / "file.mq"))


def test_a_missing_catalog_is_refused_never_recreated(tmp_path):
    store = tmp_path / "s.mq"
    _captured(store)
    for name in ("catalog.duckdb", "catalog.duckdb.wal"):
        (store / name).unlink(missing_ok=True)
    before = _files(store)
    assert any(k.startswith("tensors/") for k in before) and any(k.startswith("inputs/") for k in before)
    for read_only in (False, True):
        with pytest.raises(metaql.IOException, match="restore catalog.duckdb from a backup"):
            metaql.connect(str(store), read_only=read_only)
    assert _files(store) == before and not (store / "catalog.duckdb").exists()


def test_a_symlinked_folder_is_refused_and_its_target_untouched(tmp_path):
    victim = _victim(tmp_path)
    store = tmp_path / "s.mq"
    _captured(store)
    real_inputs = (store / "inputs").rename(tmp_path / "real_inputs")
    (store / "inputs").symlink_to(victim)          # a received store: inputs -> ../victim
    before = _files(victim)
    for read_only in (False, True):
        with pytest.raises(metaql.IOException, match=r"inputs is a symlink .*follows no symlinks"):
            metaql.connect(str(store), read_only=read_only)
    assert _files(victim) == before
    (store / "inputs").unlink()
    real_inputs.rename(store / "inputs")
    # deeper links, the weights and artifacts folders, the catalog file: all refused by name
    ckpt = store / "tensors" / "c0"
    for link, make in [(store / "tensors" / "c9", lambda p: p.symlink_to(victim)),
                       (ckpt / "fc1" / "evil.arrow", lambda p: p.symlink_to(victim / "thesis.txt")),
                       (store / "artifacts", lambda p: p.symlink_to(victim))]:
        make(link)
        with pytest.raises(metaql.IOException, match=f"{link.name} is a symlink"):
            metaql.connect(str(store))
        link.unlink()
    (store / "weights").rename(tmp_path / "real_weights")
    (store / "weights").symlink_to(tmp_path / "real_weights")
    with pytest.raises(metaql.IOException, match="weights is a symlink"):
        metaql.connect(str(store))
    (store / "weights").unlink()
    (tmp_path / "real_weights").rename(store / "weights")
    (store / "catalog.duckdb").rename(tmp_path / "cat.duckdb")
    (store / "catalog.duckdb").symlink_to(tmp_path / "cat.duckdb")
    with pytest.raises(metaql.IOException, match="catalog.duckdb is a symlink"):
        metaql.connect(str(store))
    (store / "catalog.duckdb").unlink()
    (tmp_path / "cat.duckdb").rename(store / "catalog.duckdb")
    assert _files(victim) == before
    with metaql.connect(str(store)) as con:           # restored: it opens and is whole
        assert con.verify() == []


def test_the_store_writes_through_no_symlink_made_after_it_opened(tmp_path):
    victim = _victim(tmp_path)
    store = Store(tmp_path / "s.mq")
    try:
        (store.root / "artifacts").mkdir()
        (store.root / "artifacts" / "elite").symlink_to(victim)
        with pytest.raises(metaql.IOException, match="elite is a symlink"):
            store.artifact_dir("elite", "train")
        assert not (victim / "train").exists()
        with pytest.raises(metaql.IOException, match="outside the store"):
            store.folder_for_write("../victim/x")
        (store.root / "inputs").symlink_to(victim)
        with pytest.raises(metaql.IOException, match="inputs is a symlink"):
            store._inside("inputs/thesis.txt")      # how every shard file is found
    finally:
        store.close()


def test_a_second_writer_in_this_process_is_refused_with_its_pid(store_dir):
    with metaql.connect(store_dir) as con:
        con.add_samples(np.arange(3), "train")
        with pytest.raises(metaql.IOException, match=rf"open for writing by process {os.getpid()} \(this process\)"
                                                     r".*read_only=True"):
            metaql.connect(store_dir)
        assert con.execute("SELECT count(*) FROM samples").fetchone() == (3,)
    with metaql.connect(store_dir) as con:            # closing released the lock
        assert con.execute("SELECT count(*) FROM samples").fetchone() == (3,)


@pytest.mark.parametrize("damage", ["junk", "flipped block"])
@pytest.mark.parametrize("read_only", [False, True])
def test_a_damaged_catalog_is_an_io_error_naming_the_store(tmp_path, damage, read_only):
    path = tmp_path / "s.mq"
    with metaql.connect(str(path)) as con:
        con.add_samples(np.arange(5), "train", labels=[0, 1, 0, 1, 0])
    catalog = path / "catalog.duckdb"
    data = bytearray(catalog.read_bytes())
    if damage == "junk":
        data = bytearray(b"garbage" * 100)
    else:
        data[5000:5100] = b"\xff" * 100          # raised a raw duckdb.Error before
    catalog.write_bytes(bytes(data))
    with pytest.raises(metaql.IOException, match=str(catalog)):
        metaql.connect(str(path), read_only=read_only)
    assert catalog.read_bytes() == bytes(data)     # refused, never rebuilt


def test_tampered_catalog_rows_never_reach_outside_the_store(tmp_path):
    """A received store whose catalog names paths outside it: reads, verify and the writable open's
    cleanup refuse them, and the victim's files stay as they were."""
    path, victim = tmp_path / "s.mq", tmp_path / "victim"
    victim.mkdir()
    (victim / "x.arrow").write_bytes(b"keep")
    (victim / "w.safetensors").write_bytes(b"keep")
    _captured(path)
    import duckdb
    db = duckdb.connect(str(path / "catalog.duckdb"))
    db.execute("UPDATE shards SET file = '../victim/x.arrow' WHERE shard_id = (SELECT min(shard_id) FROM shards "
               "WHERE kind = 'factors')")
    db.execute("UPDATE shards SET file = ? WHERE shard_id = (SELECT max(shard_id) FROM shards)",
               [str(victim / "x.arrow")])
    db.execute("UPDATE checkpoints SET weights_file = '../victim/w.safetensors'")
    db.execute("INSERT INTO pending_files (file) VALUES ('../victim/x.arrow'), (?), ('tensors/../../victim/w.safetensors')",
               [str(victim / "w.safetensors")])
    db.close()
    with metaql.connect(str(path), config={"trusted_factories": ["tests.models:MLP"]}) as con:
        problems = con.verify()
        assert any("outside the store" in p for p in problems)
        for query in ("SELECT * FROM SELF_INFLUENCE()", "SELECT * FROM INFLUENCE(query=point(1))"):
            with pytest.raises(metaql.IOException, match="outside the store"):
                con.execute(query)
    assert sorted(p.name for p in victim.iterdir()) == ["w.safetensors", "x.arrow"]
    assert (victim / "x.arrow").read_bytes() == b"keep" and (victim / "w.safetensors").read_bytes() == b"keep"


def test_a_fifo_in_a_store_is_refused_never_waited_on(tmp_path):
    """A FIFO in a shard's place blocked verify() and queries forever (open() waits for a writer)."""
    import signal

    def too_long(signum, frame):
        raise TimeoutError("blocked on a FIFO")
    path = tmp_path / "s.mq"
    _captured(path)
    shard = next((path / "tensors").rglob("*.arrow"))
    shard.unlink()
    os.mkfifo(shard)
    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(20)
    try:
        with pytest.raises(metaql.IOException, match="not a regular file"):
            metaql.connect(str(path), read_only=True)
        shard.unlink()
        shard.write_bytes(b"")
        with metaql.connect(str(path), read_only=True) as con:   # a FIFO appearing after the open
            shard.unlink()
            os.mkfifo(shard)
            assert any("not a regular file" in p for p in con.verify())
            with pytest.raises(metaql.IOException, match="not a regular file"):
                con.execute("SELECT * FROM SELF_INFLUENCE()")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("tamper", [
    "CREATE TABLE s2 AS SELECT * FROM shards; DROP TABLE shards; "
    "CREATE VIEW shards AS SELECT * FROM s2 WHERE length(current_setting('home_directory')) >= 0",
    "CREATE MACRO current_database() AS 'temp'",
    "DROP TABLE pending_files; CREATE TABLE pending_files (file INTEGER)",
])
@pytest.mark.parametrize("read_only", [False, True])
def test_a_catalog_whose_tables_or_functions_were_replaced_is_refused(tmp_path, tamper, read_only):
    """Views standing in for MetaQL's tables ran their author's SQL inside MetaQL's own queries; a
    macro shadowing a DuckDB function changed what MetaQL's SQL did; a retyped column leaked a raw
    TypeError."""
    import duckdb
    path = tmp_path / "s.mq"
    _captured(path)
    db = duckdb.connect(str(path / "catalog.duckdb"))
    for statement in tamper.split("; "):
        db.execute(statement)
    db.close()
    with pytest.raises(metaql.IOException, match="tampered"):
        metaql.connect(str(path), read_only=read_only)


def test_a_reader_opens_while_a_writer_renames_its_staged_shards(tmp_path, monkeypatch):
    """CI: a reader process opening beside a capturing writer failed with 'cannot open the store
    ... No such file or directory: .../000012-b6d4913c.arrow.tmp': the open's walk for symlinks
    listed a staged shard the writer renamed before the walk looked at it. A file gone meanwhile is
    passed over (it was no symlink, FIFO or device)."""
    from metaql.storage import files
    _captured(tmp_path / "s.mq")
    walk = os.walk

    def walk_with_a_vanished_file(top, *args, **kwargs):
        for dirpath, dirnames, filenames in walk(top, *args, **kwargs):
            yield dirpath, dirnames, filenames + ["000099-0a1b2c3d.arrow.tmp"]
    monkeypatch.setattr(files.os, "walk", walk_with_a_vanished_file)
    with metaql.connect(str(tmp_path / "s.mq"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM samples").fetchall() == [(12,)]
