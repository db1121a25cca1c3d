"""What a convolution scan's output blocks cost in page faults, by the allocator's history (engine/memory.py).

VGG16 conv1's forward convolution (3 -> 64 channels at 32 x 32) over 200 samples, in blocks of 8 (2 MiB
outputs, as storage/layers/conv.py's batch_average runs it) or in one call (a 52 MB output, as before
183447a), each case in a fresh interpreter: with nothing before it ('fresh'), after one convolution
backward ('after backward': larger blocks freed first, as a capture's training step does), or with
the thresholds pinned as metaql.connect pins them ('pinned'). Best of 5, the thread's CPU time, one
torch thread; the page faults and system time of that run.

    python benchmarks/alloc_faults.py
"""
from __future__ import annotations

import os
import subprocess
import sys

CASE = r"""
import resource, sys, time, torch, torch.nn.functional as F
torch.set_num_threads(1)
history, blocks = sys.argv[1], sys.argv[2] == "blocks"
if history == "after backward":
    w0 = torch.randn(64, 3, 3, 3, requires_grad=True)
    F.conv2d(torch.randn(100, 3, 32, 32), w0, padding=1).sum().backward()
if history == "pinned":
    from metaql.engine import memory
    assert memory.pin_thresholds(), memory.why_not()
g = torch.Generator().manual_seed(0)
x, w = torch.randn(200, 3, 32, 32, generator=g), torch.randn(64, 3, 3, 3, generator=g)
def run():
    if blocks:
        for a in range(0, 200, 8):
            F.conv2d(x[a:a + 8], w, None, padding=1)
    else:
        F.conv2d(x, w, None, padding=1)
best = None
for _ in range(5):
    r0 = resource.getrusage(resource.RUSAGE_THREAD); t0 = time.thread_time()
    run()
    took = time.thread_time() - t0; r1 = resource.getrusage(resource.RUSAGE_THREAD)
    if best is None or took < best[0]:
        best = (took, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt)
print(f"{1e6 * best[0] / 200:.1f} {1e3 * best[1]:.1f} {best[2]}")
"""


def main() -> None:
    print(f"load {os.getloadavg()[0]:.1f}")
    print("| output | history | us/sample (thread CPU) | of which system ms (200 samples) | page faults |")
    print("|---|---|---|---|---|")
    for blocks in ("blocks", "whole"):
        for history in ("fresh", "after backward", "pinned"):
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
            out = subprocess.run([sys.executable, "-c", CASE, history, blocks], env=env, capture_output=True,
                                 text=True, check=True).stdout.split()
            label = "8-sample blocks (2 MiB)" if blocks == "blocks" else "one call (52 MB)"
            print(f"| {label} | {history} | {out[0]} | {out[1]} | {out[2]} |", flush=True)


if __name__ == "__main__":
    main()
