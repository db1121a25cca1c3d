"""ELITE's default training schedule (issue #19): the documented one everywhere it is stated, and
still cleaning the well-separated toy set of test_elite.py as the old default (150 epochs at lr 3e-4)
does. Speed is measured in benchmarks/bench_elite_schedule.py, not here."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from sklearn.metrics import roc_auc_score

import metaql.cleaning.elite_function  # noqa: F401  registers ELITE
from metaql.cleaning.elite import EliteDetector
from metaql.engine.functions import REGISTRY
from tests.test_elite import polluted_table

# the schedule confirmed in benchmarks/results/elite_schedule.md
EPOCHS, LR = 35, 1e-3
OLD_EPOCHS, OLD_LR = 150, 3e-4
README = Path(__file__).resolve().parents[1] / "README.md"


def detector_defaults() -> tuple[int, float]:
    params = inspect.signature(EliteDetector).parameters
    return params["epochs"].default, params["lr"].default


def table_function_defaults() -> tuple[int, float]:
    params = REGISTRY.get("ELITE").params
    return params["epochs"].default, params["lr"].default


def readme_signature_defaults() -> tuple[int, float]:
    """epochs and lr as the README's ELITE(...) signature line states them."""
    text = README.read_text()
    start = text.index("- `ELITE(data=<set>")
    signature = text[start:text.index("` returns", start)]
    epochs, lr = re.search(r"epochs=(\d+)", signature), re.search(r"lr=([0-9.e-]+)", signature)
    return (int(epochs[1]) if epochs else None), (float(lr[1]) if lr else None)


def test_default_schedule_is_the_documented_one():
    assert detector_defaults() == (EPOCHS, LR)
    assert table_function_defaults() == (EPOCHS, LR)
    assert readme_signature_defaults() == (EPOCHS, LR)
    assert EliteDetector().epochs == EPOCHS and EliteDetector().lr == LR


def toy_sets():
    xu, yu = polluted_table(0)
    xl, yl = polluted_table(1, n_normal=5, n_anomalous=5)
    xt, yt = polluted_table(2, n_normal=100, n_anomalous=30)
    return (xu, yu), (xl, yl), (xt, yt)


# the default, and the old default (150 epochs at lr 3e-4, the authors' code) when they differ: the
# bar below is one the old default meets too (0.98-1.0 on seeds 0-2, as is 35 epochs at 1e-3), so a changed default is held
# to the same standard rather than to itself
SCHEDULES = sorted({(EPOCHS, LR), (OLD_EPOCHS, OLD_LR)})


@pytest.mark.parametrize("score", ["svdd", "ae"])
@pytest.mark.parametrize("epochs,lr", SCHEDULES)
def test_default_schedule_still_cleans_the_toy_set(score, epochs, lr):
    (xu, yu), (xl, yl), (xt, yt) = toy_sets()
    kwargs = {} if (epochs, lr) == (EPOCHS, LR) else {"epochs": epochs, "lr": lr}
    for seed in (0,):
        det = EliteDetector(score=score, seed=seed, **kwargs).fit(xu, xl, yl)
        assert len(det.val_loss_by_epoch()) == epochs + 1      # it ran the schedule's epochs
        assert roc_auc_score(yu, det.decision_function(xu)) > 0.97
        assert roc_auc_score(yt, det.decision_function(xt)) > 0.97
