"""LANCET's pure algorithm: CFM loss (Eq. 27), OWA weights (Alg. 2), the stop rule (§10.4), the
session (labels, budget, save/load) and its errors. Small shapes and few steps: seconds, not
minutes."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from metaql.engine.errors import InvalidInputException, Warning as MetaQLWarning
from metaql.labeling.cfm import cfm_loss
from metaql.labeling.dmn import (MAX_LOSS, OWAConfig, OWAResult, online_weight_approximation,
                                 select_candidates)
from metaql.labeling.embedding import TrainConfig, train_embedding
from metaql.labeling.lancet import LancetConfig, LancetResult, run_lancet
from metaql.labeling.propagation import Propagated
from metaql.labeling.semigan import SemiGAN, SemiGANConfig
from metaql.labeling.session import LabelingSession, _config_from_json, config_to_json
from metaql.labeling.termination import stop_decision

FAST_OWA = OWAConfig(iterations=150, batch_size=64)
TINY = LancetConfig(train=TrainConfig(steps=80, batch_size=64), owa=FAST_OWA,
                    semigan={"hidden": [32], "feature_dim": 16, "lr": 3e-3}, warm_steps=20)


@pytest.fixture(autouse=True)
def _one_thread():
    # the nets here are tiny: more threads only add overhead on a shared 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blobs(n_per: int, classes: int = 3, dim: int = 8, spread: float = 6.0, seed: int = 0):
    """Well-separated Gaussian blobs: (x, y) with n_per samples per class, shuffled."""
    g = torch.Generator().manual_seed(seed)
    centers = spread * torch.eye(classes, dim)
    y = torch.arange(classes).repeat_interleave(n_per)
    x = centers[y] + torch.randn(y.numel(), dim, generator=g)
    perm = torch.randperm(y.numel(), generator=g)
    return x[perm], y[perm]


# -- CFM loss, Eq. 27 -------------------------------------------------------------------------------
def test_cfm_loss_matches_eq27_in_one_dimension():
    # mu_l = (0, 2), mu_u = (1, 4): pull |0-1| + |2-4| = 3; push max(0, 3-|0-4|) + max(0, 3-|2-1|) = 2
    z_l, y_l = torch.tensor([[0.0], [2.0]]), torch.tensor([0, 1])
    z_u, p_u = torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([0, 1, 1])
    assert cfm_loss(z_l, y_l, z_u, p_u, 2, margin=3.0).item() == pytest.approx(5.0)


def test_cfm_loss_matches_eq27_in_two_dimensions():
    z_l = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    y_l = torch.tensor([0, 0, 1])                       # mu_l0 = (1, 0), mu_l1 = (0, 4)
    z_u = torch.tensor([[1.0, 3.0], [3.0, 4.0], [3.0, 0.0]])
    p_u = torch.tensor([0, 1, 1])                       # mu_u0 = (1, 3), mu_u1 = (3, 2)
    expected = (3.0 + math.sqrt(13.0)                   # ||mu_l0 - mu_u0|| + ||mu_l1 - mu_u1||
                + (5.0 - math.sqrt(8.0))                # lambda - ||mu_l0 - mu_u1||
                + (5.0 - math.sqrt(2.0)))               # lambda - ||mu_l1 - mu_u0||
    assert cfm_loss(z_l, y_l, z_u, p_u, 2, margin=5.0).item() == pytest.approx(expected, rel=1e-6)


def test_cfm_loss_leaves_out_classes_absent_on_one_side():
    # class 2 has a labeled center but no unlabeled sample predicted as 2: no term mentions it
    z_l, y_l = torch.tensor([[0.0], [2.0], [9.0]]), torch.tensor([0, 1, 2])
    z_u, p_u = torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([0, 1, 1])
    with_absent = cfm_loss(z_l, y_l, z_u, p_u, 3, margin=3.0)
    assert with_absent.item() == pytest.approx(5.0 + max(0.0, 3.0 - abs(9.0 - 1.0))
                                               + max(0.0, 3.0 - abs(9.0 - 4.0)))


def _cfm_by_loops(z_l, y_l, z_u, p_u, k, margin):
    mu_l = {c: z_l[y_l == c].mean(0) for c in range(k) if (y_l == c).any()}
    mu_u = {c: z_u[p_u == c].mean(0) for c in range(k) if (p_u == c).any()}
    total = 0.0
    for m in mu_l:
        if m in mu_u:
            total += float(torch.linalg.vector_norm(mu_l[m] - mu_u[m]))
        for n in mu_u:
            if n != m:
                total += max(0.0, margin - float(torch.linalg.vector_norm(mu_l[m] - mu_u[n])))
    return total


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 5), st.integers(1, 4), st.integers(1, 12), st.integers(1, 12),
       st.floats(0.1, 5.0), st.integers(0, 2**16))
def test_cfm_loss_equals_the_sum_of_eq27(k, dim, n_l, n_u, margin, seed):
    g = torch.Generator().manual_seed(seed)
    z_l, z_u = torch.randn(n_l, dim, generator=g), torch.randn(n_u, dim, generator=g)
    y_l, p_u = torch.randint(k, (n_l,), generator=g), torch.randint(k, (n_u,), generator=g)
    got = cfm_loss(z_l.double(), y_l, z_u.double(), p_u, k, margin).item()
    assert got == pytest.approx(_cfm_by_loops(z_l.double(), y_l, z_u.double(), p_u, k, margin),
                                rel=1e-9, abs=1e-9)


def test_cfm_gradient_is_finite_when_centers_coincide():
    z_l = torch.zeros(2, 3, requires_grad=True)
    z_u = torch.zeros(2, 3, requires_grad=True)
    cfm_loss(z_l, torch.tensor([0, 1]), z_u, torch.tensor([0, 1]), 2, 1.0).backward()
    assert torch.isfinite(z_l.grad).all() and torch.isfinite(z_u.grad).all()


# -- OWA weights, Algorithm 2 -----------------------------------------------------------------------
@settings(max_examples=6, deadline=None)
@given(st.integers(1, 30), st.integers(1, 60), st.integers(1, 6), st.integers(0, 2**16))
def test_owa_weights_are_nonnegative_and_normalized(n_l, n_u, dim, seed):
    g = torch.Generator().manual_seed(seed)
    z_l, z_u = torch.randn(n_l, dim, generator=g), torch.randn(n_u, dim, generator=g) + 1.0
    r = online_weight_approximation(z_l, z_u, OWAConfig(iterations=10, batch_size=16, seed=seed))
    assert r.weights.shape == (n_u,)
    assert (r.weights >= 0).all()
    assert r.weights.mean().item() == pytest.approx(1.0, rel=1e-5)   # mean 1 = Eq. 46 times N_u
    assert math.isfinite(r.dmn_loss)


def two_clusters(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(200, 2, generator=g)
    b = torch.randn(200, 2, generator=g) + torch.tensor([8.0, 0.0])
    return a, b


def test_owa_weights_fall_far_from_the_labeled_set():
    a, b = two_clusters()
    # labeled: half of cluster A; unlabeled: the other half of A and all of B
    r = online_weight_approximation(a[::2], torch.cat([a[1::2], b]), FAST_OWA)
    w_a, w_b = r.weights[:100], r.weights[100:]
    assert w_b.mean() < 0.5 * w_a.mean()
    smallest = torch.sort(r.weights).indices[:20]
    assert (smallest >= 100).all()            # the candidates all come from the unlabeled cluster


# -- the stop rule, §10.4 ---------------------------------------------------------------------------
def test_stop_rule_fires_once_the_labeled_set_covers_the_pool():
    a, b = two_clusters()
    pool = torch.cat([a, b])
    every_other = torch.arange(400) % 2 == 0
    covered = online_weight_approximation(pool[every_other], pool[~every_other], FAST_OWA)
    decision = stop_decision(covered, 200, 200)
    assert decision.should_stop, decision.reason
    assert decision.loss_ratio > 0.9 and decision.min_weight > 0.1
    one_side = online_weight_approximation(a[::2], torch.cat([a[1::2], b]), FAST_OWA)
    decision = stop_decision(one_side, 100, 300)
    assert not decision.should_stop
    assert decision.n_below_alpha > 0 and "continue" in decision.reason


def test_stop_rule_reads_both_conditions():
    w = torch.tensor([0.5, 1.5, 1.0])
    near = OWAResult(w, torch.ones(3), torch.ones(2), 0.95 * MAX_LOSS)
    far = OWAResult(w, torch.ones(3), torch.ones(2), 0.5 * MAX_LOSS)
    low = OWAResult(torch.tensor([0.05, 1.45, 1.5]), torch.ones(3), torch.ones(2), MAX_LOSS)
    assert stop_decision(near, 2, 3).should_stop
    assert not stop_decision(far, 2, 3).should_stop
    assert not stop_decision(low, 2, 3).should_stop
    assert stop_decision(low, 2, 3, alpha_t=0.01).should_stop
    everything = stop_decision(None, 5, 0)
    assert everything.should_stop and "every pool sample" in everything.reason


# -- a whole round ----------------------------------------------------------------------------------
def test_a_round_propagates_labels_with_confidence():
    x, y = blobs(60)
    labeled = torch.tensor([int((y == c).nonzero()[i]) for c in range(3) for i in range(3)])
    r = run_lancet(x, labeled, y[labeled], 3, TINY)
    p = r.propagated
    assert p.human.sum() == 9 and (p.labels[labeled] == y[labeled]).all()
    assert ((p.confidence >= 0) & (p.confidence <= 1)).all() and (p.confidence[labeled] == 1).all()
    rest = ~p.human
    assert (p.labels[rest] == y[rest]).float().mean() > 0.9
    rows, weights = r.candidates(5)
    assert rows.unique().numel() == 5 and not p.human[rows].any() and (weights >= 0).all()
    assert weights[0] == r.owa.weights.min()         # the first pick: the round's smallest weight


class PlainModel(nn.Module):
    """A model without train_step: the protocol's minimum (features, logits, num_classes)."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Sequential(nn.Linear(in_dim, 16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def features(self, x):
        return self.body(x)

    def logits(self, x):
        return self.head(self.body(x))


def test_any_model_with_features_and_logits_plugs_in():
    x, y = blobs(40)
    labeled = torch.arange(12)
    torch.manual_seed(0)
    r = run_lancet(x, labeled, y[labeled], 3, TINY, make_model=lambda d, k, s: PlainModel(d, k))
    assert isinstance(r.model, PlainModel) and len(r.propagated) == 120
    with pytest.raises(InvalidInputException, match="features"):
        run_lancet(x, labeled, y[labeled], 3, TINY, make_model=lambda d, k, s: nn.Linear(d, k))


def test_semigan_labels_with_its_averaged_weights():
    x, y = blobs(30)
    model = SemiGAN(SemiGANConfig(in_dim=8, num_classes=3, hidden=[32], feature_dim=16,
                                  input_noise=0.0, hidden_noise=0.0))   # comparable outputs
    train_embedding(model, x, torch.arange(9), y[:9], TrainConfig(steps=30, batch_size=64))
    with torch.no_grad():
        averaged = model.average["head"](model.average["body"](x))[:, :3]
        live = model.head(model.body(x))[:, :3]
    assert torch.equal(model.logits(x), averaged) and not torch.allclose(averaged, live)
    model.train()                                 # training mode: the live weights
    assert torch.equal(model.logits(x), live)


def test_a_semigan_saved_before_averaging_still_loads():
    old = SemiGAN(SemiGANConfig(in_dim=8, num_classes=3, hidden=[32], feature_dim=16,
                                ema_decay=0.0))
    description = {k: v for k, v in old.describe().items() if k != "ema_decay"}
    rebuilt = SemiGAN.from_description(description)
    rebuilt.load_state_dict(old.state_dict())     # strict: no averaged weights expected
    assert rebuilt.average is None


# -- the session: labels, budget, persistence -------------------------------------------------------
def test_session_round_trips_through_save_and_load(tmp_path):
    x, y = blobs(30)
    ids = np.arange(1000, 1090)
    s = LabelingSession(ids, 3, budget=40, oracle=y.numpy(), config=TINY)
    s.label([1000, 1001], [int(y[0]), int(y[1])], by="ana")
    s.ask_oracle(ids[2:12])
    before = s.propagated(x)
    s.save(tmp_path / "session")
    t = LabelingSession.load(tmp_path / "session")
    assert t.labels == s.labels and t.budget == 40 and t.budget_left == 28
    assert t.config == s.config                             # every knob, each in its place
    assert t.labels[1000][1] == "ana" and t.labels[1005][1] == "oracle"
    assert np.array_equal(t.oracle, s.oracle) and t.key() == s.key()
    assert t.result is not None and t.result_key == s.key()
    for name in ("model", "owa"):
        assert getattr(t.result, name) is not None
    after = t.propagated(x)                                 # the cached round, not a retrain
    for k in before:
        assert np.array_equal(before[k], after[k])
    assert t.status(x) == s.status(x)
    for a, b in zip(s.result.model.state_dict().values(), t.result.model.state_dict().values()):
        assert torch.equal(a, b)


def test_session_never_silently_overwrites_a_human_label():
    s = LabelingSession(np.arange(10), 3)
    s.label([1, 2], [0, 1], by="ana")
    assert s.label([1], [0], by="bob") == 0 and s.labels[1][1] == "ana"   # same label: kept
    with pytest.raises(InvalidInputException, match="contradict"):
        s.label([2, 3], [2, 1], by="bob")
    assert s.labels[2][0] == 1 and 3 not in s.labels                      # nothing half-done
    with pytest.warns(MetaQLWarning, match="replacing 1"):
        s.label([2], [2], by="bob", overwrite=True)
    assert s.labels[2][:2] == (2, "bob")


@pytest.mark.parametrize("call, match", [
    (lambda s: s.label([99], [0]), "not in the pool"),
    (lambda s: s.label([1], [7]), r"\[0, 3\)"),
    (lambda s: s.label([1, 1], [0, 1]), "two different labels"),
    (lambda s: s.label([1, 2], [0]), "2 id"),
    (lambda s: s.ask_oracle([1]), "no oracle"),
])
def test_session_rejects_bad_labels(call, match):
    with pytest.raises(InvalidInputException, match=match):
        call(LabelingSession(np.arange(10), 3))


def test_budget_larger_than_the_pool_is_an_error():
    with pytest.raises(InvalidInputException, match="at most the pool's size"):
        LabelingSession(np.arange(10), 3, budget=11)
    x, y = blobs(10)
    s = LabelingSession(np.arange(30), 3, budget=12, oracle=y.numpy(), config=TINY)
    s.ask_oracle(range(9))
    with pytest.raises(InvalidInputException, match="larger than the 21 unlabeled"):
        s.candidates(x, 25)
    with pytest.raises(InvalidInputException, match="only 3 label"):
        s.candidates(x, 5)
    with pytest.raises(InvalidInputException, match="exceed the budget"):
        s.ask_oracle(range(9, 13))


def test_a_class_without_labels_warns_and_one_class_is_an_error():
    x, y = blobs(20)
    s = LabelingSession(np.arange(60), 3, oracle=y.numpy(), config=TINY)
    s.ask_oracle(np.nonzero(y.numpy() == 0)[0][:3])
    with pytest.raises(InvalidInputException, match="at least two classes"):
        s.fit(x)
    s.ask_oracle(np.nonzero(y.numpy() == 1)[0][:3])
    with pytest.warns(MetaQLWarning, match=r"class\(es\) \[2\] have no labeled sample"):
        out = s.propagated(x)
    assert not (out["label"] == 2).any()


def test_a_pool_without_labels_is_an_error():
    x, _ = blobs(5)
    with pytest.raises(InvalidInputException, match="no human label"):
        LabelingSession(np.arange(15), 3, config=TINY).fit(x)


def test_warm_rounds_continue_the_previous_model():
    x, y = blobs(30)
    s = LabelingSession(np.arange(90), 3, oracle=y.numpy(), config=TINY)
    s.ask_oracle(range(9))
    first = s.fit(x).model
    s.ask_oracle(range(9, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # every class is labeled: no warning expected
        second = s.fit(x)
    assert second.model is first                 # trained further, not rebuilt
    assert s.fit(x) is second                    # unchanged labels: the cached round


def test_a_round_retrains_once_the_labeled_set_has_grown_enough():
    x, y = blobs(30)
    config = LancetConfig(**{**TINY.__dict__, "retrain_growth": 1.5})
    s = LabelingSession(np.arange(90), 3, oracle=y.numpy(), config=config)
    s.ask_oracle(range(9))
    first = s.fit(x).model
    s.ask_oracle(range(9, 13))                   # 13 < 1.5 x 9: continue the model
    second = s.fit(x)
    assert second.model is first and len(second.log) == len(range(0, TINY.warm_steps, 50))
    s.ask_oracle(range(13, 20))                  # 20 >= 1.5 x 13: a fresh model, full length
    third = s.fit(x)
    assert third.model is not first
    assert len(third.log) == len(range(0, TINY.train.steps, 50))
    assert s.fit(x, warm=False).model is third.model   # unchanged labels: still the cached round


# -- candidates once the stop rule has fired ---------------------------------------------------------
def _round(should_stop: bool) -> LancetResult:
    """A hand-built round over 8 rows, rows 0-1 human-labeled, with known confidences and weights."""
    confidence = torch.tensor([1.0, 1.0, 0.9, 0.4, 0.8, 0.3, 0.95, 0.6])
    human = torch.zeros(8, dtype=torch.bool)
    human[:2] = True
    unlabeled = torch.arange(2, 8)
    weights = torch.tensor([0.5, 1.5, 0.2, 1.0, 1.7, 1.1])
    # a DMN loss at its maximum (the sides match) or well below it (they do not)
    owa = OWAResult(weights, torch.zeros(6), torch.zeros(2),
                    dmn_loss=MAX_LOSS if should_stop else 0.5 * MAX_LOSS)
    decision = stop_decision(owa, 2, 6)
    g = torch.Generator().manual_seed(0)
    return LancetResult(nn.Identity(), Propagated(torch.zeros(8, dtype=torch.long), confidence,
                                                  human), unlabeled, owa, decision,
                        features=torch.randn(8, 4, generator=g), owa_config=FAST_OWA)


def test_past_the_stop_point_candidates_are_the_least_confident_labels():
    r = _round(should_stop=True)
    assert r.decision.should_stop
    rows, weights = r.candidates(3, after_stop="confidence")
    assert rows.tolist() == [5, 3, 7]                       # confidences 0.3, 0.4, 0.6
    assert weights.tolist() == pytest.approx([1.0, 1.5, 1.1])   # their OWA weights
    dmn_rows, dmn_weights = r.candidates(3, after_stop="dmn")   # the paper's rule on request
    z, human = r.features, r.propagated.human
    pick, weights = select_candidates(z[human], z[~human], 3, r.owa_config)
    assert dmn_rows.tolist() == r.unlabeled[pick].tolist() and torch.equal(dmn_weights, weights)


def test_a_session_picks_by_its_configured_rule():
    ids = np.arange(100, 108)
    for rule, expected in [("confidence", [105, 103, 107]), ("dmn", None)]:
        s = LabelingSession(ids, 2, config=LancetConfig(after_stop=rule))
        s.label([100, 101], [0, 1])
        s.result, s.result_key = _round(should_stop=True), s.key()   # a cached, stopped round
        got, _ = s.candidates(torch.zeros(8, 4), 3)
        if expected is not None:
            assert got.tolist() == expected
        else:
            assert got.tolist() == ids[s.result.candidates(3, after_stop="dmn")[0].numpy()].tolist()


def test_before_the_stop_point_candidates_come_from_the_dmn_whatever_the_rule():
    r = _round(should_stop=False)
    assert not r.decision.should_stop
    by_confidence, w1 = r.candidates(3, after_stop="confidence")
    by_dmn, w2 = r.candidates(3, after_stop="dmn")
    assert by_confidence.tolist() == by_dmn.tolist() and torch.equal(w1, w2)


def test_an_unknown_candidate_rule_is_a_clear_error():
    with pytest.raises(InvalidInputException, match="after_stop must be one of confidence, dmn"):
        LancetConfig(after_stop="margin")
    with pytest.raises(InvalidInputException, match="after_stop"):
        _round(True).candidates(2, after_stop="margin")


def test_the_candidate_rule_is_saved_and_old_sessions_get_the_default():
    saved = config_to_json(LancetConfig(after_stop="dmn"))
    assert _config_from_json(saved).after_stop == "dmn"
    del saved["after_stop"], saved["retrain_growth"]       # a session saved before both knobs
    old = _config_from_json(saved)
    assert old.after_stop == LancetConfig.after_stop and old.retrain_growth == 1.5
