"""A multi-shard store for the cluster tests: the demo's digits, split and MLP with flipped labels,
two checkpoints, shards of 128 samples, and the sets the README's queries name."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import metaql
from metaql.demo import DigitsMLP, digits_with_flips

N_TRAIN = 1437         # the demo's split: the README's point(1500) is a test sample


def readme_statements() -> list[str]:
    from metaql.parser import split_statements
    from tests.test_readme import blocks
    return [" ".join(st.split()) for b in blocks("sql") for st in split_statements(b)]


# The README's statements: the sets its queries name (plain SQL over the catalog), then every
# SELECT that calls INFLUENCE or SELF_INFLUENCE (TOPK, joins, total, cosine, each(set), ...)
README_SETS = [st for st in readme_statements() if st.upper().startswith("CREATE")
               and "INFLUENCE" not in st.upper() and "(" not in st.split(" AS ", 1)[1].split("FROM", 1)[1]]
README_QUERIES = [st for st in readme_statements() if st.upper().startswith("SELECT") and "INFLUENCE(" in st.upper()]


def random_digits(n_train: int):
    """Digits-shaped random data (scikit-learn's digits take seconds to load; the fast suite's
    tests need only the shapes)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n_train + 120, 64, generator=g).numpy(), torch.randint(0, 10, (n_train + 120,), generator=g).numpy()
    return x[:n_train], y[:n_train], y[:n_train], x[n_train:], y[n_train:]


def build_store(path: str, checkpoints: int = 2, shard_size: int = 128, n_train: int = N_TRAIN,
                digits: bool = True, shuffle: bool = False) -> dict:
    """`shuffle`: each checkpoint's capture visits the samples in its own random order (shards
    whose id ranges overlap)."""
    torch.manual_seed(0)
    xtr, ytr, ytrue, xte, yte = digits_with_flips(seed=0) if digits else random_digits(n_train)
    xtr, ytr, ytrue = xtr[:n_train], ytr[:n_train], ytrue[:n_train]
    train_ids, test_ids = np.arange(len(xtr)), len(xtr) + np.arange(len(xte))
    with metaql.connect(path) as con:
        con.add_samples(train_ids, "train", ytr, xtr, columns={"true_label": ytrue, "flipped": ytr != ytrue})
        con.add_samples(test_ids, "test", yte, xte, columns={"true_label": yte, "flipped": np.zeros(len(yte), bool)})
        model = DigitsMLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
        for epoch in range(checkpoints):
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch)) if shuffle \
                else torch.arange(len(x))
            batches = [order[s:s + 50] for s in range(0, len(x), 50)]
            with con.capture(model, layers=["fc1", "fc2"], checkpoint=f"epoch{epoch}", lr=0.1,
                             shard_size=shard_size) as cap:
                for idx in batches:
                    cap.backward(F.cross_entropy(model(x[idx]), y[idx]), idx.numpy())
                    opt.step()
                    opt.zero_grad()
        con.update_predictions()
        for statement in README_SETS if digits else []:
            con.execute(statement)
    return {}


def answers(con) -> list:
    """Each README query's rows; without an ORDER BY their order is DuckDB's to choose (GROUP BY
    runs in parallel), so those are compared as sorted lists."""
    return [rows if "ORDER BY" in q.upper() else sorted(rows, key=repr)
            for q in README_QUERIES for rows in [con.execute(q).fetchall()]]
