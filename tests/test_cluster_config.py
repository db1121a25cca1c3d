"""The engine config keys, checked at connect() without starting Ray (the fast suite)."""
from __future__ import annotations

import importlib.util

import pytest

import metaql
from metaql.distributed import ray_engine


def test_unknown_engine_is_refused():
    with pytest.raises(metaql.InvalidInputException, match="engine.*local, ray"):
        metaql.connect(":memory:", config={"engine": "spark"})


def test_address_without_the_ray_engine_is_refused():
    with pytest.raises(metaql.InvalidInputException, match="'engine': 'ray'"):
        metaql.connect(":memory:", config={"address": "auto"})
    with pytest.raises(metaql.InvalidInputException, match="address"):
        metaql.connect(":memory:", config={"engine": "ray", "address": 6379})


def test_ray_engine_without_ray_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(metaql.InvalidInputException, match=r"pip install 'metaql\[ray\]'"):
        metaql.connect(":memory:", config={"engine": "ray"})


def test_local_engine_is_the_default_and_explicit_local_is_accepted():
    with metaql.connect(":memory:", config={"engine": "local"}) as con:
        assert con.config["engine"] == "local"


def test_tasks_group_consecutive_shards_up_to_the_byte_target():
    specs = [{"bytes": b} for b in (40, 40, 30, 100, 10)]
    assert [len(g) for g in ray_engine.task_groups(specs, 80)] == [2, 1, 1, 1]
    assert [len(g) for g in ray_engine.task_groups(specs, 1)] == [1, 1, 1, 1, 1]
    assert ray_engine.task_groups([], 80) == []
