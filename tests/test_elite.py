"""ELITE (metaql.cleaning): exact meta-gradients, the label rule, cleaning, input errors, persistence."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.func import functional_call, grad, vmap

from metaql.cleaning.baselines import DeepSAD, DeepSVDD
from metaql.cleaning.elite import EliteDetector
from metaql.cleaning.metagrad import METHODS, meta_gradients_factored
from metaql.cleaning.pseudo_labels import (hinge_loss, pseudo_labels, sample_weights, training_loss,
                                           validation_loss)
from metaql.cleaning.scores import make_score
from metaql.cleaning.thresholds import balanced_threshold
from metaql.engine.errors import InvalidInputException, IOException

LR = 0.01


# ---- meta-gradients against torch.func ---------------------------------------------------------

def explicit_meta(score: nn.Module, x, x_val, y_val, margin):
    """M_i = -(lr/n) <grad L^v, grad Omega_i> from per-sample gradients (vmap of grad)."""
    params = {k: p.detach() for k, p in score.named_parameters()}
    buffers = dict(score.named_buffers())

    def omega(p, xi):
        return functional_call(score, {**p, **buffers}, (xi[None],))[0]

    per_sample = vmap(grad(omega), in_dims=(None, 0))(params, x)
    g_val = grad(lambda p: validation_loss(functional_call(score, {**p, **buffers}, (x_val,)), y_val, margin))(params)
    dots = sum((per_sample[k].reshape(len(x), -1) * g_val[k].reshape(1, -1)).sum(1) for k in params)
    return -LR / len(x) * dots, per_sample


shapes = st.one_of(st.tuples(st.integers(1, 6)),
                   st.tuples(st.integers(1, 2), st.integers(4, 9), st.integers(4, 9)))


@pytest.mark.parametrize("method", sorted(METHODS))
@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(["svdd", "ae"]), shape=shapes, n=st.integers(1, 7), seed=st.integers(0, 2 ** 16))
def test_meta_gradients_equal_per_sample_inner_products(method, kind, shape, n, seed):
    torch.manual_seed(seed)
    score = make_score(kind, shape).double()
    x, x_val = torch.randn(n, *shape, dtype=torch.double), torch.randn(6, *shape, dtype=torch.double)
    y_val = torch.tensor([1.0, 1, 1, -1, -1, -1], dtype=torch.double)
    score.standardize.fit(x_val)
    score.prepare(x_val)
    with torch.no_grad():
        margin = float(score(x_val).mean()) * 1.1
    want, per_sample = explicit_meta(score, x, x_val, y_val, margin)

    step = METHODS[method](score, x, x_val, lambda o: validation_loss(o, y_val, margin), LR)
    scale = want.abs().max().clamp_min(1e-30)
    assert float((step.meta - want).abs().max() / scale) < 1e-4

    # the training step's gradient from the same step: sum_i c_i grad Omega_i
    coeffs = torch.randn(n, dtype=torch.double)
    score.zero_grad(set_to_none=True)
    step.backward(coeffs)
    for name, p in score.named_parameters():
        expect = (per_sample[name] * coeffs.reshape(-1, *[1] * p.dim())).sum(0)
        assert torch.allclose(p.grad, expect, rtol=1e-6, atol=1e-9 * float(expect.abs().max()) + 1e-12), name


def test_factored_form_refuses_layers_that_mix_samples():
    score = make_score("svdd", (4,))
    score.net.insert(1, nn.BatchNorm1d(score.net[0].out_features, affine=False))
    x = torch.randn(5, 4)
    with pytest.raises(TypeError, match="virtual"):
        meta_gradients_factored(score, x, x, lambda o: o.mean(), LR)


# ---- the pseudo-label rule and weights (Eq. 4, 10-14) -----------------------------------------

def test_pseudo_labels_weights_and_loss_follow_eq_4_and_10_to_14():
    meta = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0])
    assert pseudo_labels(meta).tolist() == [1.0, 1.0, 0.0, -1.0, -1.0]          # y = -sign(M)
    assert sample_weights(meta, eta_m=2.0).tolist() == [4.0, 1.0, 0.0, 1.0, 6.0]  # alpha = eta_M |M|

    omega = torch.tensor([0.2, 0.5, 1.0, 0.3, 1.5], requires_grad=True)
    # Eq. 4 with C = 1: Omega for normals, max(C - Omega, 0) for anomalies, nothing for label 0
    assert torch.allclose(hinge_loss(omega, pseudo_labels(meta), 1.0), torch.tensor([0.2, 0.5, 0.0, 0.7, 0.0]))
    loss = training_loss(omega, meta, eta_m=2.0, margin=1.0, anomaly_loss="hinge")
    assert float(loss.detach()) == pytest.approx((4 * 0.2 + 1 * 0.5 + 1 * 0.7) / 5)
    # Eq. 14: the step follows alpha_i * dl/dOmega_i / n (pulled in, pushed out until Omega >= C)
    loss.backward()
    assert torch.allclose(omega.grad, torch.tensor([4.0, 1.0, 0.0, -1.0, 0.0]) / 5)


def test_linear_anomaly_loss_gives_the_step_of_theorem_1():
    meta = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0])
    omega = torch.tensor([0.2, 0.5, 1.0, 0.3, 1.5], requires_grad=True)
    loss = training_loss(omega, meta, eta_m=2.0, margin=1.0, anomaly_loss="linear")   # C - Omega
    assert float(loss.detach()) == pytest.approx((4 * 0.2 + 1 * 0.5 + 1 * 0.7 + 6 * (1 - 1.5)) / 5)
    loss.backward()
    # Eq. 16: d loss / d Omega_i = -eta_M M_i / n for every sample, the anomaly above C included
    assert torch.allclose(omega.grad, -2.0 * meta / 5)


def test_label_is_normal_when_the_sample_gradient_agrees_with_the_validation_gradient():
    dots = torch.tensor([3.0, -1.0, 0.25, -0.01])            # <grad L^v, grad Omega_i>
    meta = -LR / len(dots) * dots                              # Eq. 13
    assert pseudo_labels(meta).tolist() == torch.sign(dots).tolist()
    assert torch.allclose(sample_weights(meta, 5.0), 5.0 * LR / 4 * dots.abs())


def test_validation_loss_is_the_mean_hinge_of_eq_6():
    omega = torch.tensor([0.1, 0.3, 2.0, 0.5])
    y = torch.tensor([1.0, 1.0, -1.0, -1.0])
    assert float(validation_loss(omega, y, 1.0)) == pytest.approx((0.1 + 0.3 + 0.0 + 0.5) / 4)


def test_balanced_threshold_separates_the_labeled_scores():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.9, 1.0])
    cut = balanced_threshold(scores, torch.tensor([False, False, False, True, True]))
    assert 0.3 < cut < 0.9


# ---- cleaning a polluted toy set ------------------------------------------------------------------

def polluted_table(seed: int, n_normal=180, n_anomalous=40, features=4):
    """Normals from N(0, I); anomalies on a shell of radius 7 around them (well separated)."""
    g = np.random.default_rng(seed)
    normal = g.normal(size=(n_normal, features))
    direction = g.normal(size=(n_anomalous, features))
    anomalous = 7 * direction / np.linalg.norm(direction, axis=1, keepdims=True) + 0.3 * g.normal(size=direction.shape)
    x = np.concatenate([normal, anomalous]).astype(np.float32)
    return x, np.r_[np.zeros(n_normal), np.ones(n_anomalous)].astype(int)


@pytest.mark.parametrize("score", ["svdd", "ae"])
def test_polluted_toy_set_is_cleaned(score):
    xu, yu = polluted_table(0)
    xl, yl = polluted_table(1, n_normal=5, n_anomalous=5)
    xt, yt = polluted_table(2, n_normal=100, n_anomalous=30)
    labels = np.where(yl == 1, "anomaly", "normal")            # string labels are accepted
    det = EliteDetector(score=score, epochs=30, batch_size=64, lr=1e-3, seed=0).fit(xu, xl, labels)
    assert roc_auc_score(yu, det.decision_function(xu)) > 0.97   # the training pollution is found
    assert roc_auc_score(yt, det.decision_function(xt)) > 0.97   # and new anomalies are too
    assert (det.predict(xt) == yt).mean() > 0.9
    # the training log: one row per step, and the validation loss went down
    assert len(det.history_) == 30 * int(np.ceil(len(xu) / 64))
    by_epoch = det.val_loss_by_epoch()
    assert len(by_epoch) == 31 and min(by_epoch) < by_epoch[0]
    # the kept parameters are those of the lowest validation loss
    y_val = torch.where(torch.from_numpy(yl == 1), -1.0, 1.0)
    kept = validation_loss(torch.from_numpy(det.decision_function(xl)).float(), y_val, det.margin_)
    assert float(kept) == pytest.approx(min(by_epoch), rel=1e-5)


def test_images_are_scored_with_a_conv_net():
    g = torch.Generator().manual_seed(0)
    normal = torch.zeros(60, 1, 8, 8)
    normal[:, :, 2:6, 3:5] = 1.0                               # a bar
    anomalous = torch.zeros(12, 1, 8, 8)
    anomalous[:, :, 3:5, 1:7] = 1.0                            # a crossing bar
    x = torch.cat([normal, anomalous]) + 0.05 * torch.randn(72, 1, 8, 8, generator=g)
    y = np.r_[np.zeros(60), np.ones(12)].astype(int)
    det = EliteDetector(epochs=8, batch_size=32, lr=1e-3).fit(x, x[[0, 1, 2, 60, 61, 62]], [0, 0, 0, 1, 1, 1])
    assert isinstance(det.score_.net[0], nn.Conv2d)
    assert all(getattr(m, "bias", None) is None for m in det.score_.net.modules())   # Deep SVDD: no bias
    assert roc_auc_score(y, det.decision_function(x)) > 0.95


# ---- bad input fails before training -------------------------------------------------------------

GOOD_U = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
GOOD_L = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
GOOD_Y = [0, 0, 1, 1]


def _with_nan(a, value):
    a = a.copy()
    a[1, 2] = value
    return a


BAD_INPUTS = {
    "no labeled anomaly": (GOOD_U, GOOD_L, [0, 0, 0, 0], "no anomaly"),
    "no labeled normal": (GOOD_U, GOOD_L, ["anomaly"] * 4, "no normal"),
    "label outside {0, 1}": (GOOD_U, GOOD_L, [0, 1, 2, 1], "outside"),
    "unknown label name": (GOOD_U, GOOD_L, ["normal", "anomaly", "weird", "normal"], "outside"),
    "NaN feature": (_with_nan(GOOD_U, np.nan), GOOD_L, GOOD_Y, "NaN"),
    "inf feature": (GOOD_U, _with_nan(GOOD_L, np.inf), GOOD_Y, "infinite"),
    "empty unlabeled set": (np.zeros((0, 3), np.float32), GOOD_L, GOOD_Y, "empty"),
    "empty labeled set": (GOOD_U, np.zeros((0, 3), np.float32), [], "empty"),
    "feature shapes differ": (GOOD_U, GOOD_L[:, :2], GOOD_Y, "must match"),
    "label count differs": (GOOD_U, GOOD_L, [0, 1, 1], "3 labels"),
    "not a table or images": (GOOD_U.reshape(20, 3, 1, 1, 1), GOOD_L, GOOD_Y, "shape"),
    "non-numeric features": (np.array([["a", "b", "c"]] * 5), GOOD_L, GOOD_Y, "numbers"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_before_training(case, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started on bad input")

    monkeypatch.setattr(EliteDetector, "_initial_score", no_training)
    monkeypatch.setattr(EliteDetector, "_train", no_training)
    xu, xl, y, message = BAD_INPUTS[case]
    with pytest.raises(InvalidInputException, match=message):
        EliteDetector().fit(xu, xl, y)


@pytest.mark.parametrize("param", [{"score": "knn"}, {"meta_gradient": "exact"}, {"lr": 0.0}, {"margin": -1.0},
                                   {"optimizer": "lbfgs"}, {"batch_size": 0}, {"anomaly_loss": "squared"}])
def test_bad_parameters_raise_before_training(param, monkeypatch):
    monkeypatch.setattr(EliteDetector, "_initial_score", lambda *a: pytest.fail("training started"))
    with pytest.raises(InvalidInputException):
        EliteDetector(**param).fit(GOOD_U, GOOD_L, GOOD_Y)


def test_scoring_checks_its_input():
    det = EliteDetector(epochs=1).fit(GOOD_U, GOOD_L, GOOD_Y)
    with pytest.raises(InvalidInputException, match="shape"):
        det.decision_function(GOOD_U[:, :2])
    with pytest.raises(InvalidInputException, match="NaN"):
        det.decision_function(_with_nan(GOOD_U, np.nan))
    with pytest.raises(InvalidInputException, match="not fitted"):
        EliteDetector().decision_function(GOOD_U)


# ---- persistence ---------------------------------------------------------------------------------

@pytest.mark.parametrize("score,shape", [("svdd", (1, 8, 8)), ("ae", (5,))])
def test_save_load_round_trip_gives_identical_scores(score, shape, tmp_path):
    g = torch.Generator().manual_seed(0)
    xu, xl = torch.randn(40, *shape, generator=g), torch.randn(6, *shape, generator=g)
    det = EliteDetector(score=score, epochs=3, batch_size=16, margin=None if score == "svdd" else 2.0)
    det.fit(xu, xl, [0, 0, 0, 1, 1, 1])
    det.save(tmp_path / "det")
    # one unit: a version directory made current by the CURRENT pointer (storage/artifacts.py)
    version = (tmp_path / "det" / (tmp_path / "det" / "CURRENT").read_text())
    assert sorted(p.name for p in version.iterdir()) == ["MANIFEST.json", "detector.json", "weights.safetensors"]
    back = EliteDetector.load(tmp_path / "det")
    x = torch.randn(25, *shape, generator=g)
    assert np.array_equal(back.decision_function(x), det.decision_function(x))
    assert np.array_equal(back.predict(x), det.predict(x))
    assert (back.threshold_, back.margin_, back.get_params()) == (det.threshold_, det.margin_, det.get_params())
    assert back.history_ == json.loads(json.dumps(det.history_))
    assert back.val_loss_by_epoch() == det.val_loss_by_epoch()


def test_load_refuses_another_kind_of_detector(tmp_path):
    EliteDetector(epochs=1).fit(GOOD_U, GOOD_L, GOOD_Y).save(tmp_path / "e")
    with pytest.raises(IOException, match="EliteDetector"):
        DeepSAD.load(tmp_path / "e")
    with pytest.raises(IOException, match="no saved detector"):
        EliteDetector.load(tmp_path / "missing")


# ---- the baselines share the network ---------------------------------------------------------

def test_baselines_fit_and_round_trip(tmp_path):
    xu, yu = polluted_table(0)
    xl, yl = polluted_table(1, n_normal=5, n_anomalous=5)
    sad = DeepSAD(epochs=20, batch_size=64, lr=1e-3).fit(xu, xl, yl)
    svdd = DeepSVDD(epochs=20, batch_size=64, lr=1e-3).fit(xu)
    assert roc_auc_score(yu, sad.decision_function(xu)) > 0.9
    assert roc_auc_score(yu, svdd.decision_function(xu)) > 0.5
    sad.save(tmp_path / "sad")
    assert np.array_equal(DeepSAD.load(tmp_path / "sad").decision_function(xu), sad.decision_function(xu))
