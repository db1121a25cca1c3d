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


def training_loss(omega: torch.Tensor, meta: torch.Tensor, eta_m: float, margin: float) -> torch.Tensor:
    """The objective whose gradient is Eq. 14's update: (1/n) sum_i alpha_i l(x_i, y_i).

    Its gradient is -(1/n) sum_i M_i grad Omega_i over the samples whose hinge is active (a
    normal: |M_i| grad Omega_i with M_i < 0; an anomaly below C: -|M_i| grad Omega_i with
    M_i > 0); anomalies above C add nothing. So keeping labels as per-sample state between
    iterations (Sec. 3.3.3, "starts with assuming that all unlabeled training samples are
    normal") changes nothing: the first-order flip test of Eq. 8-10, with the hinge handled
    exactly, gives -sign(M_i) whatever the current label (results/elite.md, Notes).
    """
    y = pseudo_labels(meta.detach())
    alpha = sample_weights(meta.detach(), eta_m)
    return (alpha * hinge_loss(omega, y, margin)).mean()
