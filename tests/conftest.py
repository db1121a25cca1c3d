import os

import pytest
import torch
from hypothesis import settings

# Two cores: keep torch from oversubscribing when pytest runs alongside other work.
torch.set_num_threads(min(2, os.cpu_count() or 1))
settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=15, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def store_dir(tmp_path):
    return str(tmp_path / "store.mq")
