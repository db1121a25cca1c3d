"""engine/memory.py: a convolution scan's 2 MiB output blocks reuse heap memory in any process
after connect, instead of faulting fresh pages in a process that never freed a larger block (the
cost then depended on the process's history: VGG16 conv1's batch_average 230-300 against 77-85
us per sample). Counted in page faults, not timed; each case in a fresh interpreter, whose
allocator has no history."""
import os
import subprocess
import sys

import pytest

from metaql.engine import memory

SCRIPT = r"""
import resource, sys, torch
torch.set_num_threads(1)
import metaql
from torch import nn
from metaql.engine import memory, operators as ops
from metaql.storage.layers import find_kind
con = metaql.connect(":memory:")
m = nn.Conv2d(3, 64, 3, padding=1)          # VGG16 conv1: 2 MiB outputs for 8 samples
kind, _ = find_kind(m)
meta = kind.meta("conv1", m)
g = torch.Generator().manual_seed(0)
f = {"I": torch.randn(64, 3, 32, 32, generator=g), "DO": torch.randn(64, 64, 32, 32, generator=g)}
q = ops.query_side(kind, meta, {k: v[:1] for k, v in f.items()}, None)
ops.batch_average(kind, meta, f, q)         # the heap grows once
before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
ops.batch_average(kind, meta, f, q)
print(memory.pin_thresholds(), resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or memory._glibc() is None,
                                reason="glibc's allocator on Linux")


def _faults(pin: str) -> tuple[bool, int]:
    env = {**os.environ, memory.ENV_KEY: pin}
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    pinned, faults = out.stdout.split()
    return pinned == "True", int(faults)


def test_pinned_scan_reuses_heap_memory():
    pinned, faults = _faults("1")
    assert pinned
    assert faults < 200          # 8 blocks x 512 pages each when every block maps fresh pages


def test_unpinned_process_faults_on_every_block():
    """The control: what the pin removes is there without it (8 blocks of 512 pages)."""
    pinned, faults = _faults("0")
    assert not pinned
    assert faults > 2000


def test_user_thresholds_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert memory._reason_not() == "the user set the allocator's thresholds"
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv(memory.ENV_KEY, "0")
    assert memory._reason_not() == f"{memory.ENV_KEY}=0"
