"""The stop rule of papers/000 §10.4 and the diagnostics behind it.

LANCET suggests stopping when both hold:
  (1) the DMN cannot tell labeled from weighted unlabeled embeddings: its loss (Eq. 40, as
      E_l[l] + E_u[w l]) is near its maximum log 4 ~ 1.386, here within `loss_tolerance` of it;
  (2) the density ratio is bounded: every unlabeled OWA weight w_i (~ p_l/p_u) exceeds alpha_t
      (default 0.1, i.e. beta = p_u/p_l below 10).
A pool with no unlabeled sample left stops trivially.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from metaql.labeling.dmn import MAX_LOSS, OWAResult


@dataclass
class StopDecision:
    """Whether to stop labeling, why, and the numbers the decision was made from."""

    should_stop: bool
    reason: str
    dmn_loss: float
    max_loss: float
    loss_ratio: float           # dmn_loss / max_loss; 1 when the distributions match
    min_weight: float
    alpha_t: float
    n_below_alpha: int          # unlabeled samples with w_i <= alpha_t (regions lacking labels)
    n_labeled: int
    n_unlabeled: int

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def stop_decision(owa: OWAResult | None, n_labeled: int, n_unlabeled: int,
                  alpha_t: float = 0.1, loss_tolerance: float = 0.05) -> StopDecision:
    """Applies §10.4 to an OWA result (None when nothing is left unlabeled)."""
    if owa is None or n_unlabeled == 0:
        return StopDecision(True, "every pool sample has a human label", MAX_LOSS, MAX_LOSS, 1.0,
                            float("inf"), alpha_t, 0, n_labeled, 0)
    ratio = owa.dmn_loss / MAX_LOSS
    min_weight = float(owa.weights.min())
    below = int((owa.weights <= alpha_t).sum())
    matched = ratio >= 1.0 - loss_tolerance
    bounded = below == 0
    return StopDecision(matched and bounded, _reason(matched, bounded, ratio, below, alpha_t,
                                                     loss_tolerance),
                        owa.dmn_loss, MAX_LOSS, ratio, min_weight, alpha_t, below,
                        n_labeled, n_unlabeled)


def _reason(matched: bool, bounded: bool, ratio: float, below: int, alpha_t: float,
            tolerance: float) -> str:
    loss = (f"DMN loss at {ratio:.0%} of its maximum log 4 "
            f"({'within' if matched else 'outside'} the {tolerance:.0%} tolerance)")
    weights = (f"all weights above alpha_t={alpha_t:g}" if bounded else
               f"{below} unlabeled sample(s) with weight <= alpha_t={alpha_t:g}")
    if matched and bounded:
        return f"stop: {loss}; {weights}"
    return f"continue: {loss}; {weights}"
