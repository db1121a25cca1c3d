"""The conditional feature matching (CFM) loss, papers/000 Eq. 27.

    loss_cfm = sum_m [ ||mu_l,m - mu_u,m|| + sum_{n != m} max(0, lambda - ||mu_l,m - mu_u,n||) ]

mu_l,m is the center of the labeled embeddings of class m, mu_u,n the center of the unlabeled
embeddings the classifier currently assigns to class n. A class absent from either side has no
center; the terms that would need it are left out (they are undefined, not zero).
"""
from __future__ import annotations

import torch
from torch import Tensor


def class_centers(z: Tensor, classes: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Returns (centers C x d, present C bool): the mean embedding per class, and which classes occur."""
    onehot = torch.nn.functional.one_hot(classes.long(), num_classes).to(z.dtype)  # N x C
    counts = onehot.sum(0)
    # clamp only guards the division; absent classes are masked out by `present`
    centers = (onehot.T @ z) / counts.clamp_min(1.0).unsqueeze(1)
    return centers, counts > 0


def cfm_loss(z_l: Tensor, y_l: Tensor, z_u: Tensor, pred_u: Tensor, num_classes: int,
             margin: float) -> Tensor:
    """Eq. 27 for labeled embeddings z_l (labels y_l) and unlabeled ones z_u (predicted pred_u).

    Gradients flow into the embeddings only; the assignment of unlabeled samples to classes is a
    hard argmax, as in the paper ("objects classified to class c_m").
    """
    mu_l, has_l = class_centers(z_l, y_l, num_classes)
    mu_u, has_u = class_centers(z_u, pred_u, num_classes)
    dist = torch.linalg.vector_norm(mu_l.unsqueeze(1) - mu_u.unsqueeze(0), dim=-1)  # C x C
    valid = has_l.unsqueeze(1) & has_u.unsqueeze(0)
    same = torch.eye(num_classes, dtype=torch.bool, device=z_l.device)
    pull = torch.where(valid & same, dist, torch.zeros_like(dist)).sum()
    push = torch.where(valid & ~same, torch.relu(margin - dist), torch.zeros_like(dist)).sum()
    return pull + push
