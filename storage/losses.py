"""Per-sample losses for replay: on the true label, the predicted label, or the expectation over
the predicted distribution (the gradient of sum_c p_c * CE(c) with p held fixed is the expected
gradient, and its factors are exact because a layer's input does not depend on the label)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from metaql.engine.errors import BinderException

LOSS_TARGETS = ("label", "pred", "expected")


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor | None, target: str = "label") -> torch.Tensor:
    logits = logits.reshape(logits.shape[0], -1)
    if target == "label":
        if labels is None:
            raise BinderException("loss=label needs labels; these samples have none (use loss=pred)")
        return F.cross_entropy(logits, labels.long(), reduction="none")
    if target == "pred":
        return F.cross_entropy(logits, logits.argmax(1).detach(), reduction="none")
    if target == "expected":
        logp = F.log_softmax(logits, dim=1)
        return -(logp.exp().detach() * logp).sum(1)
    raise BinderException(f"unknown loss target '{target}'; use one of {', '.join(LOSS_TARGETS)}")
