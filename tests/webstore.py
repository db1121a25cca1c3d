"""A small store for the web page's tests: digits images (real thumbnails), a tiny MLP captured at
one checkpoint, a free-text column holding markup (for the escaping checks)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import metaql
from metaql.demo import DigitsMLP

INJECTION = "<script>alert('x')</script>"


def build(path: str, n_train: int = 60, n_test: int = 20, hidden: int = 16, epochs: int = 2) -> dict:
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = (x[: n_train + n_test] / 16.0).astype(np.float32)
    y = y[: n_train + n_test].astype(np.int64)
    noisy = y.copy()
    noisy[:6] = (noisy[:6] + 1) % 10                     # a few flipped labels to review
    torch.manual_seed(0)
    con = metaql.connect(path, config={"progress": False})
    note = np.array([INJECTION if i == 3 else f"note {i}" for i in range(n_train + n_test)], dtype=object)
    con.add_samples(np.arange(n_train), "train", noisy[:n_train], x[:n_train],
                    columns={"true_label": y[:n_train], "note": note[:n_train]})
    con.add_samples(n_train + np.arange(n_test), "test", y[n_train:], x[n_train:],
                    columns={"true_label": y[n_train:], "note": note[n_train:]})
    model = DigitsMLP(hidden)
    xt, yt = torch.from_numpy(x[:n_train]), torch.from_numpy(noisy[:n_train])
    for epoch in range(1, epochs + 1):
        capture = con.capture(model, layers=["fc1", "fc2"], checkpoint=f"epoch{epoch}", lr=0.1, epoch=epoch) \
            if epoch == epochs else None
        if capture:
            capture.__enter__()
        for start in range(0, n_train, 20):
            idx = torch.arange(start, min(n_train, start + 20))
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            capture.backward(loss, idx.numpy()) if capture else loss.backward()
            with torch.no_grad():          # plain SGD by hand: torch.optim's first use imports dynamo (seconds)
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
        if capture:
            capture.__exit__(None, None, None)
    con.update_predictions()
    con.close()
    return {"x": x, "given": noisy, "true": y}
