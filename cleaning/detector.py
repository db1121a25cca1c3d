"""What every score-based detector here shares: scoring, the threshold, save and load.

A fitted detector holds ``score_`` (an nn.Module mapping samples to anomaly scores), the
per-sample input shape ``shape_`` and ``threshold_``. ``save`` writes the module's tensors with
safetensors and everything else as JSON; ``load`` rebuilds the module from the JSON and never
unpickles anything.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from metaql.cleaning import checks
from metaql.cleaning.scores import make_score
from metaql.errors import IOException, InvalidInputException
from metaql.storage.artifacts import load_unit, save_unit

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "detector.json"
FORMAT_VERSION = 1
SCORE_BATCH = 4096   # bounds memory when scoring large sets


def scores_of(score: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Omega of every sample, in chunks so that a large set never needs one huge forward pass."""
    with torch.no_grad():
        return torch.cat([score(chunk) for chunk in x.split(SCORE_BATCH)])


class ScoreDetector:
    """Base class: subclasses set ``score_``, ``shape_`` and ``threshold_`` in ``fit``."""

    score_kind = "svdd"
    squared_score = False

    def get_params(self) -> dict[str, Any]:
        """The constructor arguments (scikit-learn's convention)."""
        return {k: getattr(self, k) for k in self._param_names()}

    def set_params(self, **params: Any) -> "ScoreDetector":
        for k, v in params.items():
            if k not in self._param_names():
                raise InvalidInputException(f"{type(self).__name__} has no parameter '{k}'")
            setattr(self, k, v)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Anomaly scores Omega(x) of the samples (float64, higher = more anomalous)."""
        self._require_fitted()
        x = checks.score_inputs(X, self.shape_)
        return scores_of(self.score_.eval(), x).double().numpy()

    def score_samples(self, X: Any) -> np.ndarray:
        """scikit-learn's sign convention: higher = more normal (the negated decision function)."""
        return -self.decision_function(X)

    def predict(self, X: Any) -> np.ndarray:
        """1 for samples whose score is above ``threshold_`` (anomalies), else 0."""
        return (self.decision_function(X) > self.threshold_).astype(np.int64)

    # ---- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Writes the fitted detector into directory ``path`` as one unit (weights.safetensors and
        detector.json in a new version made current atomically, storage/artifacts.py): a crash
        leaves the previous detector whole, never new weights with an old threshold."""
        self._require_fitted()
        path = Path(path)
        save_unit(path, self._write_files)
        return path

    def _write_files(self, path: Path) -> None:
        tensors = {k: v.detach().contiguous().clone() for k, v in self.score_.state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_FILE))
        config = {"format": FORMAT_VERSION, "class": type(self).__name__, "params": self.get_params(),
                  "shape": list(self.shape_), "score_kind": self.score_kind, "squared": self.squared_score,
                  "state": self._fitted_state()}
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ScoreDetector":
        """A detector saved by ``save`` (checked against its manifest); the class is checked
        against the one asked for."""
        if not Path(path).is_dir():
            raise IOException(f"no saved detector at {path}")
        return load_unit(path, cls._load_files)

    @classmethod
    def _load_files(cls, path: Path) -> "ScoreDetector":
        try:
            config = json.loads((path / CONFIG_FILE).read_text())
            tensors = load_file(str(path / WEIGHTS_FILE))
        except FileNotFoundError as e:
            raise IOException(f"no saved detector at {path}: {e}") from None
        except (ValueError, OSError) as e:
            raise IOException(f"the detector at {path} is unreadable: {e}") from None
        if config.get("format") != FORMAT_VERSION or config.get("class") != cls.__name__:
            raise IOException(f"{path} holds a {config.get('class')} (format {config.get('format')}), "
                              f"not a {cls.__name__} (format {FORMAT_VERSION})")
        det = cls(**config["params"])
        det.shape_ = tuple(config["shape"])
        det.score_ = make_score(config["score_kind"], det.shape_)
        if hasattr(det.score_, "squared"):
            det.score_.squared = config["squared"]
        det.score_.load_state_dict(tensors)
        det.score_.eval()
        det._restore_state(config["state"])
        return det

    # ---- hooks for subclasses ----------------------------------------------------------------
    def _fitted_state(self) -> dict[str, Any]:
        return {"threshold": self.threshold_}

    def _restore_state(self, state: dict[str, Any]) -> None:
        self.threshold_ = state["threshold"]

    def _param_names(self) -> list[str]:
        import inspect
        return [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]

    def _require_fitted(self) -> None:
        if getattr(self, "score_", None) is None:
            raise InvalidInputException(f"this {type(self).__name__} is not fitted yet; call fit first")
