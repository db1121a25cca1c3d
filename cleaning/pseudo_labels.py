"""ELITE's losses and label rule: the hinge loss (Eq. 4, 6) and pseudo labels and weights (Eq. 10-14).

Labels here follow the paper: +1 normal, -1 anomaly (and 0 for "no opinion", a meta-gradient of
exactly zero). The public API's 0 normal / 1 anomaly is converted at its boundary.
"""
from __future__ import annotations

import torch


def hinge_loss(omega: torch.Tensor, y: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-sample loss of Eq. 4: Omega for normals, max(C - Omega, 0) for anomalies, 0 for label 0."""
    anomalous = (margin - omega).clamp_min(0)
    return torch.where(y > 0, omega, torch.where(y < 0, anomalous, torch.zeros_like(omega)))


def validation_loss(omega: torch.Tensor, y: torch.Tensor, margin: float) -> torch.Tensor:
    """Eq. 6: the mean hinge loss over the labeled examples."""
    return hinge_loss(omega, y, margin).mean()


def pseudo_labels(meta: torch.Tensor) -> torch.Tensor:
    """Eq. 10 / Algorithm 1 line 11: y_i = -sign(M_i).

    M_i = dL^v/d eps_i; a negative M_i means up-weighting sample i as normal lowers the validation
    loss, so it is labeled normal (+1); a positive one means the opposite, so anomaly (-1).
    """
    return -torch.sign(meta)


def sample_weights(meta: torch.Tensor, eta_m: float) -> torch.Tensor:
    """Algorithm 1 line 12: alpha_i = eta_M * |M_i| (larger |M_i|: more say over the validation loss)."""
    return eta_m * meta.abs()


ANOMALY_LOSSES = ("linear", "hinge")


def sample_loss(omega: torch.Tensor, y: torch.Tensor, margin: float, anomaly_loss: str) -> torch.Tensor:
    """The per-sample training loss under pseudo labels y.

    'hinge' is Eq. 4 as written: an anomaly stops contributing once Omega >= C. 'linear' keeps
    C - Omega for every anomaly, the form the paper's own derivations use ("we assume C is large
    enough and therefore max{C - Omega, 0} = C - Omega", Eq. 8 and the proof of Theorem 1), under
    which the step is exactly -(1/n) sum_i M_i grad Omega_i (Eq. 16) and Theorem 1's monotone
    decrease of L^v holds; the authors' published code trains this way too. The validation loss
    (Eq. 6) keeps the hinge either way.
    """
    if anomaly_loss == "hinge":
        return hinge_loss(omega, y, margin)
    linear = margin - omega
    return torch.where(y > 0, omega, torch.where(y < 0, linear, torch.zeros_like(omega)))


def training_loss(omega: torch.Tensor, meta: torch.Tensor, eta_m: float, margin: float,
                  anomaly_loss: str = "hinge") -> torch.Tensor:
    """The objective whose gradient is Eq. 14's update: (1/n) sum_i alpha_i l(x_i, y_i).

    Its gradient is -(1/n) sum_i M_i grad Omega_i (a normal: |M_i| grad Omega_i with M_i < 0; an
    anomaly: -|M_i| grad Omega_i with M_i > 0), over every sample with the linear anomaly loss and
    over the active hinges with Eq. 4's (anomalies above C then add nothing). So keeping labels as
    per-sample state between iterations (Sec. 3.3.3, "starts with assuming that all unlabeled
    training samples are normal") changes nothing: the first-order flip test of Eq. 8-10 gives
    -sign(M_i) whatever the current label (results/elite.md, Notes).
    """
    y = pseudo_labels(meta.detach())
    alpha = sample_weights(meta.detach(), eta_m)
    return (alpha * sample_loss(omega, y, margin, anomaly_loss)).mean()


def training_coefficients(omega: torch.Tensor, meta: torch.Tensor, eta_m: float, margin: float,
                          anomaly_loss: str = "hinge") -> torch.Tensor:
    """d training_loss / d Omega_i = alpha_i l'(Omega_i) / n, written out (no autograd graph).

    Bit for bit what autograd gives: (1/n) alpha_i, negated for a pseudo-anomaly whose loss is
    active (the hinge's clamp passes the gradient where C - Omega >= 0), zero where y_i = 0.
    It spares the step a graph over ~15 small tensors and its backward.
    """
    y = pseudo_labels(meta.detach())
    scaled = sample_weights(meta.detach(), eta_m) * (omega.new_ones(()) / omega.numel())
    negative = y < 0
    if anomaly_loss == "hinge":
        negative &= (margin - omega.detach()) >= 0
    zero = torch.zeros_like(scaled)
    return torch.where(y > 0, scaled, torch.where(negative, -scaled, zero))
