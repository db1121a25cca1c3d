"""Per-sample losses for replay: on the true label, the predicted label, or the expected loss
under the model's own predicted distribution, sum_c p_c * CE(c) = the predictive entropy.

For `expected` the gradient is that of the expectation (p depends on the weights too): the
expectation of the gradients with p held fixed is identically zero for softmax cross-entropy
(sum_c p_c (p - e_c) = 0), so it would make every influence score zero."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from metaql.errors import BinderException, InvalidInputException

LOSS_TARGETS = ("label", "pred", "expected")


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor | None, target: str = "label") -> torch.Tensor:
    logits = logits.reshape(logits.shape[0], -1)
    if target == "label":
        if labels is None:
            raise BinderException("loss=label needs labels; these samples have none (use loss=pred)")
        return F.cross_entropy(logits, _whole(labels), reduction="none")
    if target == "pred":
        return F.cross_entropy(logits, logits.argmax(1).detach(), reduction="none")
    if target == "expected":
        logp = F.log_softmax(logits, dim=1)
        return -(logp.exp() * logp).sum(1)
    raise BinderException(f"unknown loss target '{target}'; use one of {', '.join(LOSS_TARGETS)}")


def _whole(labels: torch.Tensor) -> torch.Tensor:
    """Class indices as int64; float labels only when whole (a query's 1.7 was truncated to 1)."""
    if labels.is_floating_point():
        bad = ~torch.isfinite(labels) | (labels != torch.round(labels))
        if bad.any():
            raise InvalidInputException(f"labels must be whole class indices; {int(bad.sum())} are not (e.g. "
                                        f"{labels[bad][:3].tolist()}); pass integers, or round them yourself")
    return labels.long()
