"""Label propagation by the linear head on the embedding (papers/000 §9).

Each unlabeled sample gets the argmax of softmax(W z + b) over the K classes and that
probability as its confidence; human-labeled samples keep their label with confidence 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Propagated:
    """Per pool row: label, confidence in [0, 1], and whether a human gave the label."""

    labels: Tensor        # N, int64
    confidence: Tensor    # N, float32
    human: Tensor         # N, bool

    def __len__(self) -> int:
        return self.labels.numel()


@torch.no_grad()
def embed(model: nn.Module, x: Tensor, batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Returns (features N x d, class logits N x K) in eval mode, in bounded batches."""
    model.eval()
    zs, ls = [], []
    for part in torch.split(x, batch_size):
        zs.append(model.features(part))
        ls.append(model.logits(part))
    return torch.cat(zs), torch.cat(ls)


def propagate(logits: Tensor, labeled: Tensor, labels: Tensor) -> Propagated:
    """Labels for every row from the head's logits, human labels (rows `labeled`) kept as given."""
    probs = torch.softmax(logits.float(), dim=1)
    confidence, predicted = probs.max(dim=1)
    human = torch.zeros(logits.shape[0], dtype=torch.bool)
    human[labeled] = True
    predicted[labeled] = labels.long()
    confidence[labeled] = 1.0
    return Propagated(predicted, confidence, human)
