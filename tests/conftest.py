import os

import pytest
import torch
from hypothesis import settings

# Keep torch from oversubscribing the cores: under pytest-xdist (`-n 2`) each worker already has a
# core of its own, so it computes on one thread; a plain run uses up to two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
# A store never calibrated is calibrated by a background thread after its first costly query
# (engine/autocalibrate.py): in the suite that thread would compete with the tests for the cores and
# could change later picks between tests. test_autocalibrate.py clears this to test it.
os.environ.setdefault("METAQL_AUTO_CALIBRATE", "0")
settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=15, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def store_dir(tmp_path):
    return str(tmp_path / "store.mq")
