"""`metaql demo [STORE]`: the whole path on real data, in about a minute on a laptop CPU.

Trains a small network on scikit-learn's digits with 10% of the training labels flipped,
captures gradient factors at three checkpoints in the training loop, asks which training samples
hurt the misclassified test samples most, and scores the answer against the flipped set.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import metaql
from metaql.errors import IOException
from metaql.format import render
from metaql.storage.catalog import is_metaql_catalog
from metaql.storage.files import CATALOG, LOCK, STORE_ENTRIES, WriterLock

DEFAULT_STORE = "metaql-demo.mq"
QUERIES = {
    "influence on test_wrong":
        "SELECT TOPK({k}) train FROM INFLUENCE(layers=[fc1, fc2], query=batch(test_wrong)) ORDER BY ASC",
    "self-influence":
        "SELECT TOPK({k}) train FROM SELF_INFLUENCE(layers=[fc1, fc2]) ORDER BY DESC",
}


class DigitsMLP(nn.Module):
    """64 pixels -> 128 hidden -> 10 classes; importable so a store can rebuild it."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.metaql_config = {"hidden": hidden}
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.reshape(x.shape[0], -1))))


def digits_with_flips(flip: float = 0.1, seed: int = 0):
    """(x_train, y_noisy, y_true, x_test, y_test): digits scaled to [0, 1], a seeded split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    rng = np.random.default_rng(seed)
    noisy = ytr.copy()
    flipped = rng.choice(len(ytr), int(round(flip * len(ytr))), replace=False)
    noisy[flipped] = (ytr[flipped] + rng.integers(1, 10, len(flipped))) % 10
    return xtr, noisy, ytr, xte, yte


def run(store: str, epochs: int = 30, checkpoints=(10, 20, 30), lr: float = 0.1, seed: int = 0,
        out=sys.stdout, progress: bool | None = None) -> dict:
    """Builds the demo store and prints its answers; `progress`: bars on standard error (default:
    when it is a terminal, as for a connection's own bars)."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = now - clock
        clock = now

    torch.manual_seed(seed)
    xtr, ytr, ytrue, xte, yte = digits_with_flips(seed=seed)
    flipped = ytr != ytrue
    progress = sys.stderr.isatty() if progress is None else progress
    con = metaql.connect(store, config={"progress": progress})
    train_ids, test_ids = np.arange(len(xtr)), len(xtr) + np.arange(len(xte))
    con.add_samples(train_ids, "train", ytr, xtr, columns={"true_label": ytrue, "flipped": flipped})
    con.add_samples(test_ids, "test", yte, xte, columns={"true_label": yte, "flipped": np.zeros(len(yte), bool)})
    lap("load and register data")

    model = DigitsMLP()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    bar = _bar(range(1, epochs + 1), progress, "train")
    for epoch in bar:
        perm = torch.randperm(len(x))
        capture = con.capture(model, layers=["fc1", "fc2"], checkpoint=f"epoch{epoch}", lr=lr, epoch=epoch) \
            if epoch in checkpoints else None
        if capture:
            capture.__enter__()
        for start in range(0, len(x), 64):
            idx = perm[start:start + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if capture:
                capture.backward(loss, idx.numpy())
            else:
                loss.backward()
            opt.step()
            opt.zero_grad()
        if capture:
            capture.__exit__(None, None, None)
    lap("train and capture")

    con.update_predictions()
    con.execute("CREATE OR REPLACE SET test_wrong AS "
                "SELECT sample_id FROM samples WHERE split = 'test' AND pred <> label")
    test_acc = con.execute("SELECT avg((pred = label)::INT) FROM samples WHERE split = 'test'").fetchone()[0]
    n_wrong = con.execute("SELECT count(*) FROM samples WHERE split = 'test' AND pred <> label").fetchone()[0]
    lap("predict and create set")

    k = int(flipped.sum())
    print(f"store: {Path(store).resolve()}", file=out)
    print(f"test accuracy {test_acc:.3f}; {n_wrong} misclassified test samples in set test_wrong", file=out)
    precision = {}
    for name, template in QUERIES.items():
        query = template.format(k=k)
        answer = con.execute(query).arrow()
        lap(f"query: {name}")
        hits = int(np.isin(answer.column("sample_id").to_numpy(), np.nonzero(flipped)[0]).sum())
        precision[name] = hits / k
        print(f"\n{query}", file=out)
        print(render(answer, "box", 6), file=out)
        print(f"precision@{k} against the {k} flipped training labels: {precision[name]:.3f} "
              f"(random ranking: {k / len(xtr):.3f})", file=out)
    stored = con.execute("SELECT sum(bytes)::BIGINT FROM shards WHERE kind = 'factors'").fetchone()[0]
    con.close()
    print(f"\nfactor bytes on disk: {stored / 2**20:.2f} MiB", file=out)
    print("time per stage:", file=out)
    width = max(map(len, timings))
    for stage, seconds in timings.items():
        print(f"  {stage:<{width}} {seconds:7.2f} s", file=out)
    return {"precision": precision, "k": k, "test_accuracy": test_acc, "timings": timings, "store": store}


def _bar(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, desc=desc, file=sys.stderr, leave=False)


def _epochs(text: str) -> int:
    """--epochs: at least one, or no checkpoint is captured and there is nothing to query."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of epochs >= 1, not {text!r}")
    return n


def _unusable(path: Path, force: bool) -> str | None:
    """Why the demo may not write its store at `path`, or None. --force replaces a MetaQL store
    that no process is writing, and nothing else: `metaql demo . --force` must not empty the
    user's folder."""
    if os.path.islink(path) or (os.path.lexists(path) and not path.is_dir()):
        return f"{path} is a file or a link; name a directory for the demo's store"
    if not path.exists() or not any(path.iterdir()):
        return None
    if not _is_store(path):
        return (f"{path} is a non-empty directory that is not a MetaQL store, or holds files of yours beside one; "
                "name a new or empty directory (--force replaces only a MetaQL store)")
    if not force:
        return f"{path} exists; pass --force to replace it, or name another directory"
    return None


def _is_store(path: Path) -> bool:
    """A MetaQL store and nothing else: only the store's own entries, and a catalog MetaQL wrote."""
    if not (path / CATALOG).is_file() or not set(os.listdir(path)) <= STORE_ENTRIES:
        return False
    written = is_metaql_catalog(path / CATALOG)
    # None: unreadable now, e.g. a writer holds it (then the lock says whose store it is)
    return written if written is not None else (path / LOCK).is_file() and not _lock_free(path)


def _lock_free(path: Path) -> bool:
    try:
        WriterLock(path).release()
    except IOException:
        return False
    return True


def _replace(path: Path) -> str | None:
    """Removes the store at `path` while holding its writer lock, so that no process opens it
    meanwhile; why it cannot, if a process is writing it."""
    try:
        lock = WriterLock(path)
    except IOException as e:
        return f"{e}; close it before replacing the store"
    try:
        shutil.rmtree(path)
    finally:
        lock.release()
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="metaql demo", description=__doc__.split("\n\n")[0])
    p.add_argument("store", nargs="?", default=DEFAULT_STORE, help=f"store directory (default: {DEFAULT_STORE})")
    p.add_argument("--epochs", type=_epochs, default=30, help="epochs to train (default 30; checkpoints "
                   "after a third, two thirds and all of them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace the store if it exists")
    args = p.parse_args(argv)
    path = Path(args.store)
    refusal = _unusable(path, args.force)
    if refusal is None and os.path.lexists(path) and any(path.iterdir()):
        refusal = _replace(path)
    if refusal:
        print(f"Error: {refusal}", file=sys.stderr)
        return 1
    e = args.epochs
    run(args.store, epochs=e, checkpoints=(max(1, e // 3), max(1, 2 * e // 3), e), seed=args.seed)
    return 0
