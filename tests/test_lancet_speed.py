"""The hand-written OWA step and the leaner SemiGAN step (issue #19) against autograd and Adam."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from metaql.labeling.dmn import (FlatAdam, FlatDMN, OWAConfig, distribution_matching_network,
                                 online_weight_approximation)
from metaql.labeling.embedding import TrainConfig, cfm_regularizer
from metaql.labeling.lancet import LancetConfig
from metaql.labeling.semigan import SemiGAN, SemiGANConfig
from metaql.labeling.session import LabelingSession


def autograd_batch_gradient(dmn: nn.Module, x: torch.Tensor, n_l: int, w_u: torch.Tensor) -> torch.Tensor:
    """Eq. 43's batch loss differentiated by autograd, flattened in parameter order."""
    logp = torch.log_softmax(dmn(x), dim=1)
    loss = (-logp[:n_l, 1].sum() - (w_u * logp[n_l:, 0]).sum()) / x.shape[0]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(dmn.parameters()))])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flat_dmn_gradient_equals_autograd(seed):
    torch.manual_seed(seed)
    dmn = distribution_matching_network(7, 5).double()
    x, w_u = torch.randn(11, 7, dtype=torch.double), torch.rand(6, dtype=torch.double) * 2
    want = autograd_batch_gradient(dmn, x, 5, w_u)
    got = FlatDMN(dmn).gradient(x, 5, w_u)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        unlabeled = -torch.log_softmax(dmn(x), dim=1)[:, 0]
    assert torch.allclose(FlatDMN(dmn).unlabeled_loss(x), unlabeled, rtol=1e-10)


def test_flat_adam_equals_torch_adam():
    torch.manual_seed(0)
    p_ref = torch.randn(20, dtype=torch.double, requires_grad=True)
    p_flat = p_ref.detach().clone()
    ref = torch.optim.Adam([p_ref], lr=1e-2, weight_decay=1e-3)
    mine = FlatAdam(p_flat, 1e-2, 1e-3)
    for _ in range(5):
        g = torch.randn(20, dtype=torch.double)
        p_ref.grad = g.clone()
        ref.step()
        mine.step(g.clone())
    assert torch.allclose(p_flat, p_ref.detach(), rtol=1e-12, atol=1e-14)


def test_owa_writes_the_trained_weights_back_into_the_dmn():
    torch.manual_seed(0)
    z_l, z_u = torch.randn(8, 4), torch.randn(30, 4) + 1.0
    r = online_weight_approximation(z_l, z_u, OWAConfig(iterations=20, batch_size=8, hidden=6))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = distribution_matching_network(4, 6)
    moved = [not torch.equal(a, b) for a, b in zip(r.dmn.parameters(), fresh.parameters())]
    assert all(moved)
    assert r.weights.shape == (30,) and float(r.weights.mean()) == pytest.approx(1.0, rel=1e-5)


def test_owa_refuses_a_dmn_of_another_shape():
    with pytest.raises(ValueError, match="distribution_matching_network"):
        FlatDMN(nn.Sequential(nn.Linear(4, 2)))


def test_semigan_step_leaves_no_gradient_frozen():
    torch.manual_seed(0)
    model = SemiGAN(SemiGANConfig(in_dim=6, num_classes=3, hidden=[8], feature_dim=5, noise_dim=4))
    model.train()
    x = torch.rand(12, 6)
    model.train_step(x[:3], torch.tensor([0, 1, 2]), x[3:], cfm_regularizer(3, TrainConfig()))
    assert all(p.requires_grad for p in model.body.parameters())
    assert all(p.grad is not None for p in model.generator.parameters())


class CountingModel(nn.Module):
    """A protocol model that counts its training steps."""

    def __init__(self, in_dim: int, num_classes: int, seed: int) -> None:
        super().__init__()
        self.num_classes, self.steps = num_classes, 0
        self.net = nn.Linear(in_dim, num_classes)

    def features(self, x):
        return self.net(x)

    def logits(self, x):
        return self.net(x)

    def train_step(self, x_l, y_l, x_u, regularize):
        self.steps += 1
        return {}


def test_retrain_steps_apply_to_fresh_rounds_after_the_first():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((40, 5)).astype(np.float32))
    oracle = np.arange(40) % 4
    config = LancetConfig(train=TrainConfig(steps=9), warm_steps=2, retrain_steps=4,
                          owa=OWAConfig(iterations=3, batch_size=4))
    session = LabelingSession(np.arange(40), 4, oracle=oracle, config=config,
                              make_model=CountingModel)
    session.ask_oracle(np.arange(8))
    assert session.fit(x).model.steps == 9           # the first round: config.train.steps
    session.ask_oracle(np.arange(8, 16))             # the labels doubled: a fresh model
    assert session.fit(x).model.steps == 4
    session.ask_oracle(np.arange(16, 18))            # a few more: the same model, warm
    assert session.fit(x).model.steps == 6
