"""A small multi-shard store for the cluster tests: the demo's digits MLP with flipped labels,
two checkpoints, shards of 128 samples, a test_wrong set (the README's queries need it)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import metaql
from metaql.demo import DigitsMLP, digits_with_flips

N_TRAIN = 600

# the README's INFLUENCE / SELF_INFLUENCE / TOPK queries (section "The language")
README_QUERIES = [
    "SELECT TOPK(10) train FROM INFLUENCE(layers=[fc1, fc2], query=batch(test_wrong)) ORDER BY ASC",
    "SELECT TOPK(10) train FROM INFLUENCE(layers=*, query=point({point}), checkpoints=all, similarity=cosine) "
    "ORDER BY DESC",
    "SELECT sample_id, score FROM INFLUENCE(layers=[fc2], train=batch(suspects), query=batch(test_wrong))",
    "SELECT * FROM INFLUENCE(layers=[fc2], train=batch(suspects), query=batch(test_wrong), total=true)",
    "SELECT TOPK(20) train FROM SELF_INFLUENCE(layers=[fc1, fc2]) ORDER BY DESC",
    "SELECT s.sample_id, s.label, s.true_label, r.score FROM SELF_INFLUENCE(layers=*) AS r JOIN samples s "
    "USING (sample_id) WHERE s.flipped ORDER BY r.score DESC LIMIT 5",
    "SELECT * FROM INFLUENCE(layers=[fc2], query=batch(test), checkpoints=last)",
    "SELECT sample_id, score FROM INFLUENCE(layers=*, query=batch(test_wrong), reduce=sum, similarity=dot)",
]


def random_digits(n_train: int):
    """Digits-shaped random data (scikit-learn's digits take seconds to load; the fast suite's
    tests need only the shapes)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n_train + 120, 64, generator=g).numpy(), torch.randint(0, 10, (n_train + 120,), generator=g).numpy()
    return x[:n_train], y[:n_train], y[:n_train], x[n_train:], y[n_train:]


def build_store(path: str, checkpoints: int = 2, shard_size: int = 128, n_train: int = N_TRAIN,
                digits: bool = True) -> dict:
    torch.manual_seed(0)
    xtr, ytr, ytrue, xte, yte = digits_with_flips(seed=0) if digits else random_digits(n_train)
    xtr, ytr, ytrue = xtr[:n_train], ytr[:n_train], ytrue[:n_train]
    xte, yte = xte[:120], yte[:120]
    train_ids, test_ids = np.arange(len(xtr)), 10_000 + np.arange(len(xte))
    with metaql.connect(path) as con:
        con.add_samples(train_ids, "train", ytr, xtr, columns={"true_label": ytrue, "flipped": ytr != ytrue})
        con.add_samples(test_ids, "test", yte, xte, columns={"true_label": yte, "flipped": np.zeros(len(yte), bool)})
        model = DigitsMLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
        for epoch in range(checkpoints):
            with con.capture(model, layers=["fc1", "fc2"], checkpoint=f"epoch{epoch}", lr=0.1,
                             shard_size=shard_size) as cap:
                for start in range(0, len(x), 50):
                    idx = torch.arange(start, min(start + 50, len(x)))
                    cap.backward(F.cross_entropy(model(x[idx]), y[idx]), idx.numpy())
                    opt.step()
                    opt.zero_grad()
        con.update_predictions()
        con.execute("CREATE OR REPLACE SET test_wrong AS "
                    "SELECT sample_id FROM samples WHERE split = 'test' AND pred <> label")
        con.execute("CREATE SET suspects AS SELECT sample_id FROM samples WHERE split = 'train' AND sample_id % 3 = 0")
    return {"point": int(test_ids[0])}


def answers(con, point: int) -> list:
    return [con.execute(q.format(point=point)).fetchall() for q in README_QUERIES]
