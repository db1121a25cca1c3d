"""A labeling session: who labeled what and when, a budget, and the last round's trained state.

Pure Python over numpy/torch: the table functions build one from the catalog, the benchmark and
users drive one directly. `save(dir)` / `LabelingSession.load(dir)` persist it as JSON plus
safetensors (never pickle), so a session survives a restart and a cached model is reused.

Oracle mode (experiments): give `oracle` (the true label of every pool sample, aligned with
`pool_ids`) and `ask_oracle(ids)` labels samples as a perfect human would.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from metaql.errors import IOException, InvalidInputException, Warning as MetaQLWarning
from metaql.labeling.dmn import OWAConfig, OWAResult
from metaql.labeling.embedding import TrainConfig
from metaql.labeling.lancet import (LancetConfig, LancetResult, ModelFactory, check_budget,
                                    run_lancet, warm_start)
from metaql.labeling.propagation import Propagated
from metaql.labeling.semigan import SemiGAN
from metaql.labeling.termination import StopDecision
from metaql.storage.artifacts import load_unit, save_unit

FORMAT = 1


class LabelingSession:
    """Human labels over a pool of sample ids, a labeling budget, and cached LANCET state."""

    def __init__(self, pool_ids: Sequence[int] | np.ndarray, num_classes: int,
                 budget: int | None = None, oracle: Sequence[int] | np.ndarray | None = None,
                 config: LancetConfig | None = None, make_model: ModelFactory | None = None
                 ) -> None:
        self.pool_ids = np.asarray(pool_ids, dtype=np.int64)
        if np.unique(self.pool_ids).size != self.pool_ids.size:
            raise InvalidInputException("the pool lists some sample id more than once")
        if num_classes < 2:
            raise InvalidInputException(f"num_classes must be at least 2, got {num_classes}")
        if budget is not None and not 0 < budget <= self.pool_ids.size:
            raise InvalidInputException(
                f"budget {budget} must be positive and at most the pool's size "
                f"({self.pool_ids.size} samples)")
        self.num_classes, self.budget = int(num_classes), budget
        self.oracle = None if oracle is None else np.asarray(oracle, dtype=np.int64)
        if self.oracle is not None and self.oracle.shape != self.pool_ids.shape:
            raise InvalidInputException("the oracle needs one label per pool sample")
        self.config = config or LancetConfig()
        self.make_model = make_model
        self._row = {int(i): r for r, i in enumerate(self.pool_ids)}
        self.labels: dict[int, tuple[int, str, dt.datetime]] = {}   # id -> (label, by, at)
        self.result: LancetResult | None = None
        self.result_key: str | None = None

    # -- labels -----------------------------------------------------------------------------------
    def label(self, ids: Iterable[int], labels: Iterable[int], by: str = "human",
              at: dt.datetime | None = None, overwrite: bool = False) -> int:
        """Records labels; returns how many are new. Never silently replaces a human label:
        a different label for a labeled id raises unless overwrite=True (then it warns)."""
        ids_a = np.asarray(list(ids), dtype=np.int64)
        labels_a = np.asarray(list(labels), dtype=np.int64)
        self._check_new_labels(ids_a, labels_a)
        changed = [(int(i), self.labels[int(i)][0], int(y)) for i, y in zip(ids_a, labels_a)
                   if int(i) in self.labels and self.labels[int(i)][0] != int(y)]
        if changed and not overwrite:
            shown = ", ".join(f"{i}: {old} -> {new}" for i, old, new in changed[:5])
            raise InvalidInputException(
                f"{len(changed)} label(s) contradict earlier human labels ({shown}); pass "
                f"overwrite=True to replace them")
        if changed:
            warnings.warn(f"replacing {len(changed)} earlier human label(s)", MetaQLWarning,
                          stacklevel=2)
        fresh = [int(i) for i in ids_a if int(i) not in self.labels]
        if self.budget is not None and len(self.labels) + len(fresh) > self.budget:
            raise InvalidInputException(
                f"{len(fresh)} new label(s) exceed the budget of {self.budget} "
                f"({self.budget - len(self.labels)} left)")
        when = at or dt.datetime.now(dt.timezone.utc)
        for i, y in zip(ids_a, labels_a):
            i, y = int(i), int(y)
            if i in self.labels and self.labels[i][0] == y:
                continue   # the same label again keeps its first author and time
            self.labels[i] = (y, by, when)
        return len(fresh)

    def ask_oracle(self, ids: Iterable[int], by: str = "oracle") -> np.ndarray:
        """Oracle mode: labels `ids` with their true labels and returns them."""
        if self.oracle is None:
            raise InvalidInputException("this session has no oracle; pass oracle=... to create one")
        ids_a = np.asarray(list(ids), dtype=np.int64)
        truth = self.oracle[self.rows(ids_a)]
        self.label(ids_a, truth, by=by)
        return truth

    def _check_new_labels(self, ids: np.ndarray, labels: np.ndarray) -> None:
        if ids.shape != labels.shape:
            raise InvalidInputException(f"{ids.size} id(s) but {labels.size} label(s)")
        self.rows(ids)   # raises on ids outside the pool
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.size:
            raise InvalidInputException(
                f"labels must lie in [0, {self.num_classes}); got {sorted(set(bad.tolist()))[:10]}")
        order = np.argsort(ids, kind="stable")
        dup = (ids[order][1:] == ids[order][:-1]) & (labels[order][1:] != labels[order][:-1])
        if dup.any():
            raise InvalidInputException(
                f"sample {int(ids[order][1:][dup][0])} is given two different labels in one call")

    def rows(self, ids: Iterable[int]) -> np.ndarray:
        """Pool rows of sample ids; raises naming ids that are not in the pool."""
        ids_l = [int(i) for i in ids]
        missing = [i for i in ids_l if i not in self._row]
        if missing:
            raise InvalidInputException(
                f"{len(missing)} sample id(s) are not in the pool: {missing[:10]}")
        return np.asarray([self._row[i] for i in ids_l], dtype=np.int64)

    @property
    def labeled_ids(self) -> np.ndarray:
        return np.asarray(sorted(self.labels), dtype=np.int64)

    @property
    def n_labeled(self) -> int:
        return len(self.labels)

    @property
    def budget_left(self) -> int | None:
        return None if self.budget is None else self.budget - len(self.labels)

    def key(self) -> str:
        """Content hash of the labeled set (ids and labels): the cache key of trained state."""
        ids = self.labeled_ids
        labels = np.asarray([self.labels[int(i)][0] for i in ids], dtype=np.int64)
        h = hashlib.sha256()
        h.update(np.int64(self.num_classes).tobytes())
        h.update(ids.tobytes())
        h.update(labels.tobytes())
        return h.hexdigest()[:16]

    # -- LANCET rounds ----------------------------------------------------------------------------
    def fit(self, x: torch.Tensor, progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
            warm: bool = True) -> LancetResult:
        """The round for the current labels; reused while the labeled set is unchanged.

        With warm=True a new round continues training the previous round's model (fewer steps)
        unless the labeled set has grown by `config.retrain_growth` since; warm=False always
        trains from scratch.
        """
        key = self.key()
        if self.result is not None and self.result_key == key:
            return self.result
        if x.shape[0] != self.pool_ids.size:
            raise InvalidInputException(
                f"{x.shape[0]} input row(s) for a pool of {self.pool_ids.size} samples")
        ids = self.labeled_ids
        labels = torch.as_tensor([self.labels[int(i)][0] for i in ids], dtype=torch.long)
        previous = warm_start(self.result, len(ids), self.config) if warm else None
        self.result = run_lancet(x, torch.as_tensor(self.rows(ids)), labels, self.num_classes,
                                 self.config, model=previous, make_model=self.make_model,
                                 progress=progress)
        self.result_key = key
        return self.result

    def candidates(self, x: torch.Tensor, budget: int, **fit_args: Any) -> tuple[np.ndarray, np.ndarray]:
        """(sample ids, weights) of the `budget` unlabeled samples to label next."""
        left = self.pool_ids.size - self.n_labeled
        check_budget(budget, left)
        if self.budget_left is not None and budget > self.budget_left:
            raise InvalidInputException(
                f"{budget} candidates asked for, but only {self.budget_left} label(s) are left "
                f"in the budget of {self.budget}")
        rows, weights = self.fit(x, **fit_args).candidates(budget, x, self.config.after_stop)
        return self.pool_ids[rows.numpy()], weights.numpy()

    def propagated(self, x: torch.Tensor, **fit_args: Any) -> dict[str, np.ndarray]:
        """Every pool sample: sample_id, label, confidence, source ('human' or 'propagated')."""
        p = self.fit(x, **fit_args).propagated
        return {"sample_id": self.pool_ids.copy(), "label": p.labels.numpy().astype(np.int64),
                "confidence": p.confidence.numpy().astype(np.float64),
                "source": np.where(p.human.numpy(), "human", "propagated")}

    def status(self, x: torch.Tensor, **fit_args: Any) -> StopDecision:
        """The §10.4 stop decision for the current labels."""
        return self.fit(x, **fit_args).decision

    # -- persistence ------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Writes session.json and tensors (safetensors) under `directory` as one unit (a new
        version made current atomically, storage/artifacts.py); returns `directory`."""
        save_unit(directory, self._write_files)
        return Path(directory)

    def _write_files(self, d: Path) -> None:
        ids = self.labeled_ids
        tensors = {
            "pool_ids": torch.from_numpy(self.pool_ids),
            "labeled_ids": torch.from_numpy(ids),
            "labeled_labels": torch.as_tensor([self.labels[int(i)][0] for i in ids], dtype=torch.long),
            "labeled_at_us": torch.as_tensor([_micros(self.labels[int(i)][2]) for i in ids],
                                             dtype=torch.long),
        }
        if self.oracle is not None:
            tensors["oracle"] = torch.from_numpy(self.oracle)
        meta: dict[str, Any] = {
            "format": FORMAT, "num_classes": self.num_classes, "budget": self.budget,
            "labeled_by": [self.labels[int(i)][1] for i in ids],
            "config": config_to_json(self.config), "result_key": None,
        }
        if self.result is not None:
            meta.update(_save_result(self.result, d))
            meta["result_key"] = self.result_key
        save_file(tensors, str(d / "session.safetensors"))
        (d / "session.json").write_text(json.dumps(meta, indent=1, default=str))

    @classmethod
    def load(cls, directory: str | Path, make_model: ModelFactory | None = None,
             model_from: Callable[[dict[str, Any]], torch.nn.Module] | None = None
             ) -> "LabelingSession":
        """Reads a saved session (checked against its manifest). A cached model other than
        SemiGAN needs `model_from(description)` to rebuild it before its weights are loaded."""
        return load_unit(directory, lambda d: cls._read_files(d, make_model, model_from))

    @classmethod
    def _read_files(cls, d: Path, make_model: ModelFactory | None,
                    model_from: Callable[[dict[str, Any]], torch.nn.Module] | None) -> "LabelingSession":
        try:
            meta = json.loads((d / "session.json").read_text())
            t = load_file(str(d / "session.safetensors"))
        except (OSError, ValueError) as e:
            raise IOException(f"cannot read a labeling session from {d}: {e}") from e
        if meta.get("format") != FORMAT:
            raise IOException(f"{d} holds session format {meta.get('format')}, expected {FORMAT}")
        session = cls(t["pool_ids"].numpy(), meta["num_classes"], meta["budget"],
                      t["oracle"].numpy() if "oracle" in t else None,
                      _config_from_json(meta["config"]), make_model)
        ats = [dt.datetime.fromtimestamp(us / 1e6, dt.timezone.utc) for us in t["labeled_at_us"].tolist()]
        for i, y, by, at in zip(t["labeled_ids"].tolist(), t["labeled_labels"].tolist(),
                                meta["labeled_by"], ats):
            session.labels[int(i)] = (int(y), by, at)
        if meta.get("result_key"):
            session.result = _load_result(meta, d, model_from)
            session.result_key = meta["result_key"]
        return session


def _micros(at: dt.datetime) -> int:
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.timezone.utc)
    return int(round(at.timestamp() * 1e6))


def config_to_json(c: LancetConfig) -> dict[str, Any]:
    """Every knob of a round as JSON: what a session saves, and (less after_stop, which only
    picks from a trained round) what its cache entries are keyed by."""
    return {"train": c.train.__dict__, "owa": c.owa.__dict__, "semigan": c.semigan,
            "warm_steps": c.warm_steps, "alpha_t": c.alpha_t, "loss_tolerance": c.loss_tolerance,
            "retrain_growth": c.retrain_growth, "after_stop": c.after_stop}


def _config_from_json(j: dict[str, Any]) -> LancetConfig:
    # by keyword: the dataclass's field order is no file format
    return LancetConfig(train=TrainConfig(**j["train"]), owa=OWAConfig(**j["owa"]),
                        semigan=dict(j["semigan"]), warm_steps=j["warm_steps"],
                        alpha_t=j["alpha_t"], loss_tolerance=j["loss_tolerance"],
                        # sessions saved before these knobs existed get the defaults
                        retrain_growth=j.get("retrain_growth", LancetConfig.retrain_growth),
                        after_stop=j.get("after_stop", LancetConfig.after_stop))


def _save_result(r: LancetResult, d: Path) -> dict[str, Any]:
    """Writes the model and the round's tensors; returns the JSON fields describing them."""
    state = {k: v.detach().contiguous() for k, v in r.model.state_dict().items()}
    save_file(state, str(d / "model.safetensors"))
    tensors = {"labels": r.propagated.labels, "confidence": r.propagated.confidence,
               "human": r.propagated.human.to(torch.uint8), "unlabeled": r.unlabeled}
    if r.owa is not None:
        tensors.update(weights=r.owa.weights, unlabeled_loss=r.owa.unlabeled_loss,
                       labeled_loss=r.owa.labeled_loss)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "result.safetensors"))
    describe = getattr(r.model, "describe", None)
    return {"model": describe() if describe else {"kind": type(r.model).__name__},
            "decision": r.decision.as_row(),
            "dmn_loss": None if r.owa is None else r.owa.dmn_loss}


def _load_result(meta: dict[str, Any], d: Path,
                 model_from: Callable[[dict[str, Any]], torch.nn.Module] | None) -> LancetResult:
    description = meta["model"]
    if model_from is not None:
        model = model_from(description)
    elif description.get("kind") == "semigan":
        model = SemiGAN.from_description(description)
    else:
        raise IOException(f"the cached model is a {description.get('kind')}; pass model_from= "
                          f"to rebuild it")
    model.load_state_dict(load_file(str(d / "model.safetensors")))
    model.eval()
    t = load_file(str(d / "result.safetensors"))
    propagated = Propagated(t["labels"], t["confidence"], t["human"].bool())
    owa = (OWAResult(t["weights"], t["unlabeled_loss"], t["labeled_loss"], meta["dmn_loss"])
           if "weights" in t else None)
    config = _config_from_json(meta["config"])
    return LancetResult(model, propagated, t["unlabeled"], owa, StopDecision(**meta["decision"]),
                        owa_config=config.owa)
