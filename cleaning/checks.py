"""Input checks of the detectors: every bad input fails here, before any training starts.

Errors are ``InvalidInputException`` (bad data) from the project's exception tree; messages say
what was wrong and what is accepted.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from metaql.errors import InvalidInputException

NORMAL_NAMES = {"normal", "inlier", "0"}
ANOMALY_NAMES = {"anomaly", "anomalous", "outlier", "1"}


def as_features(x: Any, name: str) -> torch.Tensor:
    """A float32 tensor of samples: (N, F) tables or (N, C, H, W) images ((N, H, W) gets C = 1)."""
    if not isinstance(x, torch.Tensor):
        try:
            x = np.asarray(x)
        except ValueError as e:   # ragged nested lists
            raise InvalidInputException(f"{name} is not a rectangular array: {e}") from None
        if x.dtype.kind not in "iuf":
            raise InvalidInputException(f"{name} must hold numbers, got dtype {x.dtype}")
    t = torch.as_tensor(x)
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in _INT_TYPES):
        raise InvalidInputException(f"{name} must hold numbers, got dtype {t.dtype}")
    if t.numel() == 0:
        raise InvalidInputException(f"{name} is empty (shape {tuple(t.shape)})")
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() not in (2, 4):
        raise InvalidInputException(f"{name} must be (N, F) features or (N, C, H, W) images, "
                                    f"got shape {tuple(t.shape)}")
    t = t.detach().to(torch.float32).contiguous()
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
    if bad.any():
        rows = torch.nonzero(bad).flatten()[:5].tolist()
        raise InvalidInputException(f"{name} has NaN or infinite values in {int(bad.sum())} samples "
                                    f"(rows {rows}{'...' if bad.sum() > 5 else ''}); clean or drop them first")
    return t


def as_labels(y: Any, name: str = "y_labeled") -> torch.Tensor:
    """Labels as a float tensor in the paper's convention: +1 normal, -1 anomaly.

    Accepted: 0 / 1 (1 = anomaly), booleans (True = anomaly), the strings 'normal' / 'anomaly'.
    """
    arr = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    if arr.ndim == 2 and 1 in arr.shape:  # a column or row vector
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise InvalidInputException(f"{name} must be one label per sample, got shape {arr.shape}")
    if arr.dtype.kind in "USO":
        words = np.char.lower(np.char.strip(arr.astype(str)))
        anomaly, normal = np.isin(words, list(ANOMALY_NAMES)), np.isin(words, list(NORMAL_NAMES))
    elif arr.dtype.kind in "biuf":
        anomaly, normal = arr == 1, arr == 0
    else:
        raise InvalidInputException(f"{name} has unsupported dtype {arr.dtype}")
    unknown = ~(anomaly | normal)
    if unknown.any():
        shown = sorted({str(v) for v in arr[unknown]})[:5]
        raise InvalidInputException(f"{name} has labels outside {{normal, anomaly}}: {shown}; "
                                    "use 0 / 'normal' for normal and 1 / 'anomaly' for anomalous samples")
    return torch.from_numpy(np.where(anomaly, -1.0, 1.0).astype(np.float32))


def fit_inputs(x_unlabeled: Any, x_labeled: Any, y_labeled: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked (unlabeled, labeled, labels) for ``fit``; labels +1 normal / -1 anomaly."""
    xu = as_features(x_unlabeled, "X_unlabeled")
    xl = as_features(x_labeled, "X_labeled")
    y = as_labels(y_labeled)
    if len(y) != xl.shape[0]:
        raise InvalidInputException(f"X_labeled has {xl.shape[0]} samples but y_labeled has {len(y)} labels")
    if xu.shape[1:] != xl.shape[1:]:
        raise InvalidInputException(f"X_unlabeled samples have shape {tuple(xu.shape[1:])} but X_labeled "
                                    f"samples have shape {tuple(xl.shape[1:])}; they must match")
    if not (y < 0).any():
        raise InvalidInputException("the labeled set has no anomaly; ELITE needs at least one labeled "
                                    "anomaly and one labeled normal sample")
    if not (y > 0).any():
        raise InvalidInputException("the labeled set has no normal sample; ELITE needs at least one labeled "
                                    "anomaly and one labeled normal sample")
    return xu, xl, y


def score_inputs(x: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """Checked samples to score with a detector fitted on samples of ``shape``."""
    t = as_features(x, "X")
    if tuple(t.shape[1:]) != tuple(shape):
        raise InvalidInputException(f"X samples have shape {tuple(t.shape[1:])}, the detector was fitted "
                                    f"on shape {tuple(shape)}")
    return t


_INT_TYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
