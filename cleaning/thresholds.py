"""Decision thresholds on anomaly scores for ``predict``."""
from __future__ import annotations

import torch


def balanced_threshold(scores: torch.Tensor, anomalous: torch.Tensor) -> float:
    """The cut on ``scores`` that maximises balanced accuracy (mean of the two recalls) on labeled data.

    A sample is called anomalous when its score is > the cut. Candidate cuts are midpoints between
    consecutive distinct sorted scores (plus one below all); ties in balanced accuracy go to the
    middle of the best run of cuts, which keeps the cut away from any one labeled sample.
    """
    s, order = torch.sort(scores.double())
    a = anomalous[order].double()
    n_anom, n_norm = a.sum(), (1 - a).sum()
    # cutting after position k: samples 0..k called normal
    normals_below = torch.cat([torch.zeros(1, dtype=s.dtype), torch.cumsum(1 - a, 0)])
    anomalies_above = n_anom - torch.cat([torch.zeros(1, dtype=s.dtype), torch.cumsum(a, 0)])
    balanced = 0.5 * (normals_below / n_norm.clamp_min(1) + anomalies_above / n_anom.clamp_min(1))
    cuts = torch.cat([s[:1] - 1.0, (s[:-1] + s[1:]) / 2, s[-1:] + 1.0])
    distinct = torch.cat([torch.tensor([True]), s[1:] > s[:-1], torch.tensor([True])])
    balanced = torch.where(distinct, balanced, torch.full_like(balanced, -1.0))
    best = torch.nonzero(balanced == balanced.max()).flatten()
    return float(cuts[best[len(best) // 2]])
