"""Capture or replay: the precision each gives (issue #17, "checkpoints as users think of them").

The digits task of `metaql demo` (10% of the training labels flipped), trained with SGD; the same
three checkpoints (after 1/3, 2/3 and all of the epochs) stored two ways:

- capture: `con.capture(...)` around the checkpoint's epoch. Each batch's factors are those of the
  weights that batch saw, as training moved them; the checkpoint's saved weights (used for the
  query side's replay and for predictions) are those on entering the epoch.
- replay: `con.checkpoint(model, name, lr)` after the epoch, then `con.replay(name, "train")`: every
  factor at exactly the checkpoint's weights, in eval mode, like the query side.

Reports precision@k (k = number of flipped labels) of SELF_INFLUENCE (DESC) and of INFLUENCE against
all test samples and against the misclassified ones (ASC), per model and seed, and their mean.
Writes benchmarks/results/capture_vs_replay.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import metaql
from metaql.demo import DigitsMLP, digits_with_flips

RESULTS = Path(__file__).resolve().parent / "results"
QUERIES = {
    "self-influence": "SELECT TOPK({k}) train FROM SELF_INFLUENCE(layers=*) ORDER BY DESC",
    "influence, all test": "SELECT TOPK({k}) train FROM INFLUENCE(layers=*, query=batch(test)) ORDER BY ASC",
    "influence, test_wrong": "SELECT TOPK({k}) train FROM INFLUENCE(layers=*, query=batch(test_wrong)) ORDER BY ASC",
}


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions and a linear head on the 8x8 digits."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        h = torch.relu(self.conv1(x.reshape(-1, 1, 8, 8)))
        h = F.max_pool2d(torch.relu(self.conv2(h)), 2)
        return self.fc(h.flatten(1))


MODELS = {"mlp": (DigitsMLP, ["fc1", "fc2"]), "cnn": (DigitsCNN, ["conv1", "conv2", "fc"])}


def one_run(model_name: str, mode: str, seed: int, epochs: int, lr: float = 0.1) -> dict[str, float]:
    make, layers = MODELS[model_name]
    torch.manual_seed(seed)
    xtr, ytr, ytrue, xte, yte = digits_with_flips(seed=seed)
    flipped = np.nonzero(ytr != ytrue)[0]
    marks = {max(1, epochs // 3), max(1, 2 * epochs // 3), epochs}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "cannot rebuild this model in another process": one process here
        con = metaql.connect(str(Path(tmp) / "s.mq"), config={"progress": False})
        con.add_samples(np.arange(len(xtr)), "train", ytr, xtr)
        con.add_samples(len(xtr) + np.arange(len(xte)), "test", yte, xte)
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
        for epoch in range(1, epochs + 1):
            cap = con.capture(model, layers=layers, checkpoint=f"e{epoch}", lr=lr, epoch=epoch) \
                if mode == "capture" and epoch in marks else None
            if cap:
                cap.__enter__()
            perm = torch.randperm(len(x))
            for start in range(0, len(x), 64):
                idx = perm[start:start + 64]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                cap.backward(loss, idx.numpy()) if cap else loss.backward()
                opt.step()
                opt.zero_grad()
            if cap:
                cap.__exit__(None, None, None)
            if mode == "replay" and epoch in marks:
                con.checkpoint(model, f"e{epoch}", lr=lr, epoch=epoch)
                con.replay(f"e{epoch}", "train", layers=layers)
        con.update_predictions()
        con.execute("CREATE SET test_wrong AS SELECT sample_id FROM samples WHERE split = 'test' AND pred <> label")
        k = len(flipped)
        out = {}
        for name, q in QUERIES.items():
            ids = con.execute(q.format(k=k)).arrow().column("sample_id").to_numpy()
            out[name] = float(np.isin(ids, flipped).sum() / k)
        con.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="one seed, 6 epochs")
    args = p.parse_args()
    seeds, epochs = (1, 6) if args.quick else (args.seeds, args.epochs)
    torch.set_num_threads(1)
    began = time.time()
    rows = []
    for model_name in MODELS:
        for mode in ("capture", "replay"):
            runs = [one_run(model_name, mode, s, epochs) for s in range(seeds)]
            mean = {q: float(np.mean([r[q] for r in runs])) for q in QUERIES}
            rows.append((model_name, mode, mean, runs))
            print(model_name, mode, {q: round(v, 3) for q, v in mean.items()}, flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    lines = ["# Capture or replay: precision@k of the flipped labels (issue #17)", "",
             f"- command: `python benchmarks/bench_capture_vs_replay.py{' --quick' if args.quick else ''}`"
             f" ({seeds} seeds, {epochs} epochs, SGD lr 0.1, batches of 64, checkpoints after 1/3, 2/3 and all"
             " of the epochs, every layer)",
             f"- commit {commit}, torch {torch.__version__}, python {platform.python_version()}, 1 torch thread, "
             f"{time.time() - began:.0f} s", "",
             "| model | factors | " + " | ".join(QUERIES) + " |", "|---|---|" + "---:|" * len(QUERIES)]
    for model_name, mode, mean, runs in rows:
        cells = [f"{mean[q]:.3f} ({', '.join(f'{r[q]:.3f}' for r in runs)})" for q in QUERIES]
        lines.append(f"| {model_name} | {mode} | " + " | ".join(cells) + " |")
    lines += ["", "Mean over seeds (each seed's value in brackets); random ranking gives 0.100."]
    RESULTS.mkdir(exist_ok=True)
    name = "capture_vs_replay_quick.md" if args.quick else "capture_vs_replay.md"
    (RESULTS / name).write_text("\n".join(lines) + "\n")
    (RESULTS / name.replace(".md", ".json")).write_text(json.dumps(
        [{"model": m, "mode": mo, "mean": me, "runs": r} for m, mo, me, r in rows], indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
