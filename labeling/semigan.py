"""SemiGAN (Salimans et al. 2016; papers/000 Eq. 32-35): LANCET's default embedding model.

The discriminator D has K+1 outputs: the K classes and "fake". Its last hidden layer is the
semantic embedding M(x); its output layer is the linear head that propagates labels (§9: "our
linear neural network can simply be implemented as the final layer of the discriminator").
The generator G is trained by feature matching (Eq. 32); D by the labeled loss (Eq. 33), the
unlabeled real/fake loss (Eq. 34) and the regularizer LANCET adds: the CFM loss (Eq. 35).

Inputs are flat float vectors (N x in_dim); reshape images before handing them in.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from metaql.labeling.embedding import Regularizer


@dataclass
class SemiGANConfig:
    """Shapes and optimiser of a SemiGAN; JSON-able so a cached model can be rebuilt."""

    in_dim: int
    num_classes: int
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    feature_dim: int = 128
    noise_dim: int = 32                 # generator input s ~ N(0, I)
    input_noise: float = 0.3            # Gaussian noise on D's input (Salimans et al.)
    hidden_noise: float = 0.5           # ... and on its hidden layers; off in eval mode
    lr: float = 2e-3
    # Evaluate with an exponential moving average of D's weights (0: off), the parameter averaging
    # customary in semi-supervised GAN training (kin to the historical averaging of Salimans et al.
    # 2016 §3.3; papers/000 line 833 trains "following the typical training process of SemiGAN"):
    # it keeps the step-to-step jitter of the adversarial game out of the labels and the embedding.
    # On digits its effect was small (20-label round, 5 splits: 0.718 -> 0.719 at 3000 steps)
    ema_decay: float = 0.999            # the customary decay (horizon ~1000 steps)
    seed: int = 0


class GaussianNoise(nn.Module):
    """Adds N(0, sigma^2) noise in training mode; the identity in eval mode."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:
        return x + self.sigma * torch.randn_like(x) if self.training and self.sigma > 0 else x


class SemiGAN(nn.Module):
    """Discriminator (K+1 outputs) and feature-matching generator; implements EmbeddingModel."""

    def __init__(self, config: SemiGANConfig) -> None:
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        with torch.random.fork_rng(devices=[]):   # seeded weights, the caller's RNG untouched
            torch.manual_seed(config.seed)
            self.body = _discriminator_body(config)
            self.head = weight_norm(nn.Linear(config.feature_dim, config.num_classes + 1))
            self.generator = _generator(config)
        self._opt_d: torch.optim.Optimizer | None = None
        self._opt_g: torch.optim.Optimizer | None = None
        self.average: nn.ModuleDict | None = None
        if config.ema_decay > 0:
            self.average = nn.ModuleDict({"body": copy.deepcopy(self.body),
                                          "head": copy.deepcopy(self.head)})
            self.average.requires_grad_(False)
        self._average_steps = 0

    def train(self, mode: bool = True) -> "SemiGAN":
        # each training run (a round) restarts the average's warm-up, so a warm-started round is
        # not dragged back towards the previous round's weights
        if mode and not self.training:
            self._average_steps = 0
        return super().train(mode)

    def _eval_nets(self) -> tuple[nn.Module, nn.Module]:
        """The averaged body and head in eval mode when averaging is on, else the live ones."""
        if self.average is not None and not self.training:
            return self.average["body"], self.average["head"]
        return self.body, self.head

    # -- the EmbeddingModel protocol ------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        return self._eval_nets()[0](x)

    def logits(self, x: Tensor) -> Tensor:
        """Class logits (N x K): the fake output is dropped, leaving P_D(y | x, y <= K)."""
        body, head = self._eval_nets()
        return head(body(x))[:, : self.num_classes]

    def train_step(self, x_l: Tensor, y_l: Tensor, x_u: Tensor,
                   regularizer: Regularizer) -> dict[str, float]:
        """One discriminator step (Eq. 35) then one generator step (Eq. 32)."""
        opt_d, opt_g = self._optimizers()
        k, n_l, n_u = self.num_classes, x_l.shape[0], x_u.shape[0]
        with torch.no_grad():   # D's step needs G's samples, not their graph
            fake = self.generator(torch.randn(n_u, self.config.noise_dim))
        # one pass over the three batches: the same noise layers, a third of the overhead
        z = self.body(torch.cat([x_l, x_u, fake]))
        out = self.head(z)
        z_l, z_u = z[:n_l], z[n_l:n_l + n_u]
        out_l, out_u, out_f = out[:n_l], out[n_l:n_l + n_u], out[n_l + n_u:]
        loss_l = nn.functional.cross_entropy(out_l[:, :k], y_l)                       # Eq. 33
        real_u = torch.logsumexp(out_u[:, :k], 1) - torch.logsumexp(out_u, 1)       # log P(y<=K|x)
        fake_f = out_f[:, k] - torch.logsumexp(out_f, 1)                            # log P(K+1|G(s))
        loss_u = -(real_u.mean() + fake_f.mean())                                   # Eq. 34
        loss_cfm = regularizer(z_l, y_l, z_u, out_u[:, :k])
        opt_d.zero_grad()
        (loss_l + loss_u + loss_cfm).backward()
        opt_d.step()
        self._update_average()

        # Eq. 32; the real side reuses this step's features (taken before D's update)
        fake = self.generator(torch.randn(n_u, self.config.noise_dim))
        with _frozen(self.body):   # G's loss needs no gradient of D's weights (opt_d drops it)
            loss_g = (z_u.detach().mean(0) - self.body(fake).mean(0)).square().sum()
            opt_g.zero_grad()
            loss_g.backward()
        opt_g.step()
        return {"loss_l": loss_l.item(), "loss_u": loss_u.item(),
                "loss_cfm": float(loss_cfm.detach()), "loss_g": loss_g.item()}

    @torch.no_grad()
    def _update_average(self) -> None:
        if self.average is None:
            return
        self._average_steps += 1
        n = self._average_steps
        # the usual warm-up (TensorFlow's ExponentialMovingAverage): early on, follow the weights
        decay = min(self.config.ema_decay, (1 + n) / (10 + n))
        live = [*self.body.parameters(), *self.head.parameters()]
        torch._foreach_lerp_(list(self.average.parameters()), live, 1.0 - decay)   # one call

    def set_lr_scale(self, scale: float) -> None:
        """Sets both optimisers' learning rate to scale * config.lr (the trainer's decay)."""
        for opt in self._optimizers():
            for group in opt.param_groups:
                group["lr"] = scale * self.config.lr

    def _optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        # Created lazily: a model rebuilt from a cache starts a fresh optimiser, by design
        if self._opt_d is None or self._opt_g is None:
            d_params = list(self.body.parameters()) + list(self.head.parameters())
            # fused: one kernel per step instead of one per tensor (these nets are tiny)
            self._opt_d = torch.optim.Adam(d_params, lr=self.config.lr, betas=(0.5, 0.999),
                                           fused=True)
            self._opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.config.lr,
                                           betas=(0.5, 0.999), fused=True)
        return self._opt_d, self._opt_g

    def describe(self) -> dict[str, Any]:
        """The JSON-able config that `SemiGAN.from_description` rebuilds the model from."""
        return {"kind": "semigan", **asdict(self.config)}

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> "SemiGAN":
        fields = {k: v for k, v in description.items() if k != "kind"}
        fields.setdefault("ema_decay", 0.0)   # saved before averaging existed: no average weights
        return cls(SemiGANConfig(**fields))


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """`module`'s parameters without requires_grad inside the block (gradients still flow
    through it to its inputs), restored afterwards."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _discriminator_body(c: SemiGANConfig) -> nn.Sequential:
    layers: list[nn.Module] = [GaussianNoise(c.input_noise)]
    width = c.in_dim
    for i, h in enumerate([*c.hidden, c.feature_dim]):
        if i > 0:
            layers.append(GaussianNoise(c.hidden_noise))
        layers += [weight_norm(nn.Linear(width, h)), nn.ReLU()]
        width = h
    return nn.Sequential(*layers)


def _generator(c: SemiGANConfig) -> nn.Sequential:
    width, layers = c.noise_dim, []
    for h in reversed(c.hidden):
        layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.Softplus()]
        width = h
    layers += [nn.Linear(width, c.in_dim), nn.Sigmoid()]
    return nn.Sequential(*layers)
